r"""Verifiable tasks for the GRPO trainer: problem records, generated tasks, local datasets, prompts.

A task is a list of :class:`Problem` records split into a ``train`` and a held-out ``eval`` part that
never share a problem. :func:`make_task` builds one from a spec string::

    make_task("arithmetic:digits=2,ops=3", seed=0)
    make_task("arithmetic:digits=1,ops=2,operators=+-*/,n_train=500,n_eval=100")
    make_task("countdown:numbers=4,max_value=25,max_target=100")
    make_task("sorting:length=5,max_value=99")
    make_task("jsonl:path=data/gsm8k_train.jsonl,eval_path=data/gsm8k_test.jsonl")
    make_task("parquet:path=data/train.parquet,eval_frac=0.1,question=problem,answer=solution")

Spec format: ``name`` or ``name:key=value,key=value``, parsed by :mod:`theory.spec` (the one parser
rules and the stage detector use too: ``use_all=1``, ``=true`` and ``=yes`` mean the same everywhere).
Unknown names, unknown keys and values of the wrong type raise ``ValueError`` naming the field.

Modules: :mod:`.problems` (records, prompts), :mod:`.checkers` (safe arithmetic, countdown, sorting),
:mod:`.generated`, :mod:`.datasets`; this package holds the :data:`TASKS` registry and :func:`make_task`.

**Generated tasks** (offline, deterministic from ``seed``):

* ``arithmetic`` -- evaluate ``ops`` binary operations over ``ops + 1`` integers of exactly ``digits``
  digits (``digits=1`` means 0..9), with the usual precedence (``*`` and ``/`` before ``+`` and ``-``,
  left to right). ``operators`` picks from ``+-*/``; with ``/`` the exact answer may be a reduced
  fraction ``"p/q"``. The reference is computed exactly with :class:`fractions.Fraction` by
  :func:`evaluate_arithmetic`.
* ``countdown`` -- reach ``target`` from the given numbers with ``+ - * /``, each number used at most
  once (exactly once with ``use_all=true``); any correct expression counts (grader ``"countdown"``,
  :func:`check_countdown`). Puzzles are built from a random solution, so each one is solvable; the
  target is never one of the given numbers. The reference ``answer`` is the target; one solution is in
  ``meta["solution"]``. (The puzzle as used for RL in TinyZero / "Countdown" RLVR set-ups; this is our
  own generator and checker.)
* ``sorting`` -- sort ``length`` integers in ``[min_value, max_value]`` (``order=asc`` or ``desc``);
  the reference is the sorted list written ``"1, 3, 7"`` (grader ``"sorting"``, :func:`check_sorted`).

Train/eval disjointness of generated tasks does not depend on the seed: every distinct problem has a
key (the expression, the number multiset and target, the list), and a hash of ``task name + key`` puts
it in the eval bucket iff the hash falls below ``eval_frac`` (default 0.2). Train draws only from the
train bucket and eval only from the eval bucket, so no eval problem of any seed is a train problem of
any seed (for one ``eval_frac``; the buckets of different ``eval_frac`` values are nested, not
equal). Within a split problems are distinct. If the problem space is too small for ``n_train`` /
``n_eval`` distinct problems, a ``ValueError`` says so.

**Local datasets** (``jsonl`` / ``parquet``, see :func:`load_problems`): one record per line / row with
a question field and an answer field (names configurable). GSM8K (Cobbe et al. 2021, arXiv 2110.14168;
``openai/gsm8k`` on the Hugging Face hub) stores the worked solution in ``answer`` and ends it with a
line ``#### <final answer>``; :func:`parse_reference_answer` keeps what follows the last ``####``
(thousands separators removed) and stores the whole solution in ``meta["solution"]``. Answers without
``####`` are used as they are. JSONL is read directly so that a malformed line raises ``ValueError``
naming the file and the 1-based line number; Parquet goes through :meth:`datasets.Dataset.from_parquet`.
The eval split is an explicit ``eval_path`` file or a seeded ``eval_frac`` of the questions (identical
questions always land in the same split; with an ``eval_path`` file, train questions that also occur
in it are dropped and counted in ``Task.info["n_dropped_overlap"]``).

**Prompts** (:func:`format_prompt`): the question, then an instruction asking for the final answer in
``\boxed{}`` (default :data:`DEFAULT_INSTRUCTION`, the user-prompt suffix of arXiv 2508.02260's released
code), as one user message through the tokenizer's chat template (``apply_chat_template`` with
``add_generation_prompt=True``) when it has one, and as plain text ``"{question}\n{instruction}\n"``
otherwise.

The safe arithmetic parser (:func:`evaluate_arithmetic`, :mod:`.checkers`) never passes model output
to ``eval``.

This module imports neither torch nor transformers (a tokenizer is duck-typed); ``datasets`` is
imported only to read Parquet.
"""

from __future__ import annotations

from typing import Any

from theory.spec import build, parse_spec

from .checkers import ExpressionError, check_countdown, check_sorted, evaluate_arithmetic, format_fraction
from .datasets import (
    FileConfig,
    _file_task,
    load_problems,
    parse_reference_answer,
    problems_from_records,
    split_problems,
)
from .generated import (
    ArithmeticConfig,
    CountdownConfig,
    SortingConfig,
    _arithmetic_draw,
    _countdown_draw,
    _generated,
    _sorting_draw,
)
from .problems import DEFAULT_INSTRUCTION, Problem, Task, format_prompt

__all__ = [
    "DEFAULT_INSTRUCTION",
    "GRADERS",
    "TASKS",
    "ArithmeticConfig",
    "ExpressionError",
    "CountdownConfig",
    "FileConfig",
    "Problem",
    "SortingConfig",
    "Task",
    "check_countdown",
    "check_sorted",
    "evaluate_arithmetic",
    "format_fraction",
    "format_prompt",
    "load_problems",
    "make_task",
    "parse_reference_answer",
    "problems_from_records",
    "split_problems",
]


TASKS: dict[str, tuple[type, Any]] = {
    "arithmetic": (ArithmeticConfig, _arithmetic_draw),
    "countdown": (CountdownConfig, _countdown_draw),
    "sorting": (SortingConfig, _sorting_draw),
    "jsonl": (FileConfig, None),
    "parquet": (FileConfig, None),
}
"""Task name -> (config dataclass, generator). ``jsonl``/``parquet`` read files."""


def __getattr__(name: str) -> Any:
    """``scale.tasks.GRADERS``: the grader registry of :mod:`scale.grading` (lazy: grading imports tasks).

    >>> import scale.tasks, scale.grading
    >>> scale.tasks.GRADERS is scale.grading.GRADERS and "math" in scale.tasks.GRADERS
    True
    """
    if name == "GRADERS":
        from ..grading.registry import GRADERS

        return GRADERS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_task(spec: str, seed: int = 0) -> Task:
    """Build a :class:`Task` from a spec string (see the module docstring for names and parameters).

    >>> task = make_task("arithmetic:digits=1,ops=1,n_train=5,n_eval=2", seed=0)
    >>> len(task.train), len(task.eval), task.train[0].grader
    (5, 2, 'math')

    Bad specs raise :class:`theory.spec.SpecError` (a ``ValueError``) naming the field:

    >>> try:
    ...     make_task("arithmetic:digts=2")
    ... except ValueError as err:
    ...     print(err)  # doctest: +ELLIPSIS
    arithmetic: unknown parameter 'digts'; parameters: n_train, n_eval, eval_frac, digits, ...
    """
    name, params = parse_spec(spec, "task spec")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    cls, draw_factory = TASKS[name]
    cfg = build(cls, name, params)  # theory.spec: the grammar rules and the stage detector use
    cfg.validate(name)
    if draw_factory is None:
        return _file_task(name, cfg, spec, seed)
    return _generated(name, cfg, draw_factory(cfg), spec, seed)
