r"""Problem records, tasks and prompts (:class:`Problem`, :class:`Task`, :func:`format_prompt`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_INSTRUCTION = r"Please reason step by step, and put your final answer within \boxed{}."
"""User-prompt suffix of arXiv 2508.02260's released code (the answer is then graded from ``\\boxed{}``)."""


@dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    Attributes:
        prompt: the question text shown to the model (without the answer-format instruction, which
            :func:`format_prompt` / :meth:`messages` append).
        answer: the reference answer as a string (``"42"``, ``"7/3"``, ``"\\frac{1}{2}"``,
            ``"1, 3, 7"`` for sorting, the target for countdown).
        id: a stable identifier (generated tasks: ``"<task>/<hash of the problem key>"``; files:
            the ``id_field`` value or ``"<file name>:<1-based line or row>"``).
        task: the task name (``"arithmetic"``, ``"countdown"``, ``"sorting"``, ``"jsonl"``, ...).
        grader: how to grade: a name in :data:`scale.grading.GRADERS` (the registry; ``math`` by default).
        meta: free-form extras (countdown ``numbers``/``solution``/``use_all``, GSM8K ``solution``, ...).
    """

    prompt: str
    answer: str
    id: str = ""
    task: str = ""
    grader: str = "math"
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        from ..grading.registry import GRADERS  # (lazy: grading imports this module)

        if self.grader not in GRADERS:
            raise ValueError(f"Problem.grader must be one of {tuple(GRADERS)}, got {self.grader!r}")

    def messages(
        self, instruction: str | None = DEFAULT_INSTRUCTION, system: str | None = None
    ) -> list[dict]:
        """Chat messages: an optional system message, then one user message ``question\\ninstruction``."""
        content = self.prompt if not instruction else f"{self.prompt}\n{instruction}"
        out = [{"role": "system", "content": system}] if system else []
        out.append({"role": "user", "content": content})
        return out


@dataclass
class Task:
    """A task: its name, spec, seed, parameters and the two disjoint splits."""

    name: str
    spec: str
    seed: int
    params: dict[str, Any]
    train: list[Problem]
    eval: list[Problem]
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Task({self.spec!r}, seed={self.seed}, n_train={len(self.train)}, n_eval={len(self.eval)})"


def format_prompt(
    problem: Problem | str,
    tokenizer: Any = None,
    *,
    instruction: str | None = DEFAULT_INSTRUCTION,
    system: str | None = None,
) -> str:
    """The text to feed the model for ``problem``.

    With a tokenizer that has a chat template (``tokenizer.chat_template`` set), returns
    ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`` for
    :meth:`Problem.messages`; otherwise (no tokenizer, or no template) the plain text
    ``"{question}\\n{instruction}\\n"`` (``"{question}\\n"`` when ``instruction`` is None); a plain-text
    ``system`` prompt is put first on its own line.

    >>> format_prompt(Problem("What is 2 + 3?", "5"))
    'What is 2 + 3?\\nPlease reason step by step, and put your final answer within \\\\boxed{}.\\n'
    """
    if isinstance(problem, str):
        problem = Problem(problem, "")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = problem.messages(instruction, system)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):  # pragma: no cover - depends on the tokenizer implementation
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text
    head = f"{system}\n" if system else ""
    return head + problem.prompt + "\n" + (f"{instruction}\n" if instruction else "")
