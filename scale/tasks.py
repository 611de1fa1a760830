r"""Verifiable tasks for the GRPO trainer: problem records, generated tasks, local datasets, prompts.

A task is a list of :class:`Problem` records split into a ``train`` and a held-out ``eval`` part that
never share a problem. :func:`make_task` builds one from a spec string::

    make_task("arithmetic:digits=2,ops=3", seed=0)
    make_task("arithmetic:digits=1,ops=2,operators=+-*/,n_train=500,n_eval=100")
    make_task("countdown:numbers=4,max_value=25,max_target=100")
    make_task("sorting:length=5,max_value=99")
    make_task("jsonl:path=data/gsm8k_train.jsonl,eval_path=data/gsm8k_test.jsonl")
    make_task("parquet:path=data/train.parquet,eval_frac=0.1,question=problem,answer=solution")

Spec format: ``name`` or ``name:key=value,key=value`` (the format of :func:`theory.rules.make_rule`).
Unknown names, unknown keys and values of the wrong type raise ``ValueError`` naming the field.

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

The safe arithmetic parser (:func:`evaluate_arithmetic`) is a small recursive-descent parser over
numbers, ``+ - * /`` (also ``×``, ``÷``, ``\times``, ``\cdot``, ``\div``), parentheses and
``\frac{..}{..}``; anything else is rejected. Model output is never passed to ``eval``.

This module imports neither torch nor transformers (a tokenizer is duck-typed); ``datasets`` is
imported only to read Parquet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

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

DEFAULT_INSTRUCTION = r"Please reason step by step, and put your final answer within \boxed{}."
"""User-prompt suffix of arXiv 2508.02260's released code (the answer is then graded from ``\\boxed{}``)."""

GRADERS = ("math", "countdown", "sorting")
"""Values of :attr:`Problem.grader`; :func:`scale.grading.grade_answer` dispatches on them."""


# --------------------------------------------------------------------------------------------------
# Records


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
        grader: how to grade, one of :data:`GRADERS`.
        meta: free-form extras (countdown ``numbers``/``solution``/``use_all``, GSM8K ``solution``, ...).
    """

    prompt: str
    answer: str
    id: str = ""
    task: str = ""
    grader: str = "math"
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        if self.grader not in GRADERS:
            raise ValueError(f"Problem.grader must be one of {GRADERS}, got {self.grader!r}")

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


# --------------------------------------------------------------------------------------------------
# Safe arithmetic


class ExpressionError(ValueError):
    """An expression that the safe arithmetic parser rejects (syntax, size, division by zero)."""


_LATEX_REPLACEMENTS = (
    (r"\left", ""),
    (r"\right", ""),
    (r"\times", "*"),
    (r"\cdot", "*"),
    (r"\div", "/"),
    (r"\dfrac", r"\frac"),
    (r"\tfrac", r"\frac"),
    (r"\!", ""),
    (r"\,", ""),
    (r"\;", ""),
    (r"\ ", " "),
    ("×", "*"),
    ("·", "*"),
    ("÷", "/"),
    ("−", "-"),
    ("–", "-"),
)
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<frac>\\frac)|(?P<op>[-+*/()\[\]{}]))")


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            bad = text[pos:].lstrip()[:20]
            raise ExpressionError(f"unexpected input at character {pos + 1}: {bad!r}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


class _Parser:
    """Recursive descent: ``expr := term (('+'|'-') term)*``, ``term := unary (('*'|'/') unary)*``,
    ``unary := '-' unary | atom``, ``atom := number | '(' expr ')' | '[' expr ']' | '{' expr '}' |
    '\\frac' '{' expr '}' '{' expr '}'``."""

    _CLOSE = {"(": ")", "[": "]", "{": "}"}

    def __init__(self, tokens, *, allow_decimals: bool, allow_unary: bool, max_depth: int):
        self.tokens, self.i = tokens, 0
        self.allow_decimals, self.allow_unary, self.max_depth = allow_decimals, allow_unary, max_depth
        self.literals: list[Fraction] = []

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None)

    def take(self, value=None):
        kind, tok = self.peek()
        if kind is None:
            raise ExpressionError("unexpected end of expression")
        if value is not None and tok != value:
            raise ExpressionError(f"expected {value!r}, got {tok!r}")
        self.i += 1
        return kind, tok

    def expr(self, depth: int) -> Fraction:
        if depth > self.max_depth:
            raise ExpressionError(f"expression nested deeper than {self.max_depth}")
        value = self.term(depth)
        while self.peek()[1] in ("+", "-"):
            op = self.take()[1]
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.unary(depth)
        while self.peek()[1] in ("*", "/"):
            op = self.take()[1]
            rhs = self.unary(depth)
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise ExpressionError("division by zero")
            else:
                value = value / rhs
        return value

    def unary(self, depth: int) -> Fraction:
        if self.peek()[1] == "-":
            if not self.allow_unary:
                raise ExpressionError("unary minus is not allowed")
            self.take()
            return -self.unary(depth + 1)
        return self.atom(depth)

    def atom(self, depth: int) -> Fraction:
        kind, tok = self.take()
        if kind == "num":
            if "." in tok and not self.allow_decimals:
                raise ExpressionError(f"decimal number {tok!r} is not allowed")
            value = Fraction(tok)
            self.literals.append(value)
            return value
        if kind == "frac":
            num = self.group(depth, "{")
            den = self.group(depth, "{")
            if den == 0:
                raise ExpressionError("division by zero")
            return num / den
        if tok in self._CLOSE:
            self.i -= 1
            return self.group(depth, tok)
        raise ExpressionError(f"unexpected {tok!r}")

    def group(self, depth: int, open_: str) -> Fraction:
        self.take(open_)
        value = self.expr(depth + 1)
        self.take(self._CLOSE[open_])
        return value


def evaluate_arithmetic(
    text: str,
    *,
    allow_decimals: bool = True,
    allow_unary: bool = True,
    max_length: int = 1000,
    max_depth: int = 50,
) -> tuple[Fraction, list[Fraction]]:
    r"""Exactly evaluate an arithmetic expression without ``eval``; return ``(value, literals)``.

    Accepts non-negative number literals (decimals unless ``allow_decimals=False``), ``+ - * /`` with
    the usual precedence, unary minus (unless ``allow_unary=False``), ``()``, ``[]``, ``{}`` and
    ``\frac{a}{b}``, plus the spellings ``×``, ``÷``, ``·``, ``−``, ``\times``, ``\cdot``, ``\div``,
    ``\left``/``\right``. ``literals`` lists the number literals in order of appearance. Anything else
    (names, calls, ``**``, implicit multiplication, over ``max_length`` characters or ``max_depth``
    nesting, division by zero) raises :class:`ExpressionError` (a ``ValueError``).

    >>> evaluate_arithmetic("(25 - 5) \\times 4 / 3")
    (Fraction(80, 3), [Fraction(25, 1), Fraction(5, 1), Fraction(4, 1), Fraction(3, 1)])
    >>> evaluate_arithmetic("__import__('os')")
    Traceback (most recent call last):
    ...
    scale.tasks.ExpressionError: unexpected input at character 1: "__import__('os')"
    """
    if not isinstance(text, str):
        raise ExpressionError(f"expected a string, got {type(text).__name__}")
    if len(text) > max_length:
        raise ExpressionError(f"expression longer than {max_length} characters")
    for old, new in _LATEX_REPLACEMENTS:
        text = text.replace(old, new)
    tokens = _tokenize(text)
    if not tokens:
        raise ExpressionError("empty expression")
    parser = _Parser(tokens, allow_decimals=allow_decimals, allow_unary=allow_unary, max_depth=max_depth)
    value = parser.expr(0)
    if parser.i != len(tokens):
        raise ExpressionError(f"unexpected {tokens[parser.i][1]!r} after a complete expression")
    return value, parser.literals


def format_fraction(x: Fraction | int) -> str:
    """``Fraction(7, 3)`` -> ``"7/3"``, ``Fraction(-4, 1)`` -> ``"-4"`` (the reference-answer form)."""
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def check_countdown(
    expression: str | None, numbers: Sequence[int], target: int, *, use_all: bool = False
) -> bool:
    r"""Whether ``expression`` reaches ``target`` using each of ``numbers`` at most once.

    The expression is evaluated exactly by :func:`evaluate_arithmetic` (integer literals only, ``+ - *
    /``, parentheses; division is exact, so ``7 / 2`` is 7/2). An optional trailing ``= <target>``
    is allowed (``"(25 - 5) * 4 = 80"``); any other ``=`` makes it wrong. The multiset of literals must
    be contained in ``numbers`` (equal to it with ``use_all=True``). Unparsable input is wrong, never
    an error.

    >>> check_countdown("(25 - 5) * 4", [4, 5, 25, 7], 80)
    True
    >>> check_countdown("25 * 4 - 5 - 5", [4, 5, 25, 7], 90)    # 5 used twice
    False
    """
    if not isinstance(expression, str) or not expression.strip():
        return False
    lhs, eq, rhs = expression.partition("=")
    if eq:
        try:
            rhs_value, rhs_literals = evaluate_arithmetic(rhs, allow_decimals=False)
        except ExpressionError:
            return False
        if len(rhs_literals) != 1 or rhs_value != target:
            return False
    try:
        value, literals = evaluate_arithmetic(lhs, allow_decimals=False)
    except ExpressionError:
        return False
    used, given = Counter(literals), Counter(Fraction(n) for n in numbers)
    if use_all and used != given:
        return False
    if any(used[v] > given[v] for v in used):
        return False
    return value == target


_LIST_ITEM = re.compile(r"^[-−]?\d+$")


def _parse_int_list(text: str) -> list[int] | None:
    text = text.strip().strip(".")
    for old, new in (("\\left", ""), ("\\right", ""), ("\\{", ""), ("\\}", ""), ("−", "-"), ("$", "")):
        text = text.replace(old, new)
    text = text.strip().strip("[](){}").strip()
    if not text:
        return None
    parts = [p.strip() for p in (text.split(",") if "," in text else text.split())]
    if not all(_LIST_ITEM.match(p) for p in parts):
        return None
    return [int(p.replace("−", "-")) for p in parts]


def check_sorted(answer: str | None, reference: str) -> bool:
    """Whether ``answer`` is the list ``reference`` (``"1, 3, 7"``): same integers in the same order.

    The answer may be written ``1, 3, 7``, ``[1, 3, 7]``, ``(1,3,7)`` or ``1 3 7``.

    >>> check_sorted("[1, 3, 7]", "1, 3, 7"), check_sorted("1, 7, 3", "1, 3, 7")
    (True, False)
    """
    if not isinstance(answer, str):
        return False
    got, want = _parse_int_list(answer), _parse_int_list(reference)
    return got is not None and got == want


# --------------------------------------------------------------------------------------------------
# Spec parsing


def _parse_value(text: str, current: Any, where: str) -> Any:
    text = text.strip()
    low = text.lower()
    if isinstance(current, bool):
        if low not in ("true", "false", "1", "0"):
            raise ValueError(f"{where} expects true or false, got {text!r}")
        return low in ("true", "1")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{where} expects an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where} expects a number, got {text!r}") from None
    if current is None and low in ("none", "null", ""):
        return None
    return text


def _config_from_params(cls, name: str, params: Mapping[str, str]):
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in params.items():
        if key not in defaults:
            raise ValueError(f"{name}: unknown parameter {key!r}; parameters: {', '.join(defaults)}")
        kwargs[key] = _parse_value(raw, defaults[key], f"{name}.{key}")
    config = cls(**kwargs)
    config.validate(name)
    return config


def _split_spec(spec: str) -> tuple[str, dict[str, str]]:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"task spec must be a non-empty string, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower().replace("-", "_")
    params: dict[str, str] = {}
    for item in filter(None, (t.strip() for t in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"{name}: expected key=value, got {item!r}")
        if key in params:
            raise ValueError(f"{name}: parameter {key!r} given twice")
        params[key] = value.strip()
    return name, params


def _require(cond: bool, where: str, message: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{where} {message}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Generated tasks


@dataclass(frozen=True)
class _GeneratedConfig:
    n_train: int = 1000
    n_eval: int = 200
    eval_frac: float = 0.2

    def validate(self, name: str) -> None:
        _require(self.n_train >= 0, f"{name}.n_train", "must be >= 0", self.n_train)
        _require(self.n_eval >= 0, f"{name}.n_eval", "must be >= 0", self.n_eval)
        _require(0.0 < self.eval_frac < 1.0, f"{name}.eval_frac", "must lie in (0, 1)", self.eval_frac)


@dataclass(frozen=True)
class ArithmeticConfig(_GeneratedConfig):
    """``arithmetic``: ``ops`` operators over ``ops + 1`` operands of exactly ``digits`` digits."""

    digits: int = 2
    ops: int = 2
    operators: str = "+-*"

    def validate(self, name: str) -> None:
        super().validate(name)
        _require(1 <= self.digits <= 12, f"{name}.digits", "must lie in [1, 12]", self.digits)
        _require(1 <= self.ops <= 20, f"{name}.ops", "must lie in [1, 20]", self.ops)
        ops = self.operators
        _require(
            bool(ops) and set(ops) <= set("+-*/") and len(set(ops)) == len(ops),
            f"{name}.operators",
            "must be distinct characters from '+-*/'",
            ops,
        )


@dataclass(frozen=True)
class CountdownConfig(_GeneratedConfig):
    """``countdown``: ``numbers`` integers in ``[1, max_value]``, target in ``[1, max_target]``."""

    numbers: int = 4
    max_value: int = 25
    max_target: int = 100
    use_all: bool = False

    def validate(self, name: str) -> None:
        super().validate(name)
        _require(2 <= self.numbers <= 8, f"{name}.numbers", "must lie in [2, 8]", self.numbers)
        _require(2 <= self.max_value <= 10_000, f"{name}.max_value", "must lie in [2, 10000]", self.max_value)
        _require(self.max_target >= 2, f"{name}.max_target", "must be >= 2", self.max_target)


@dataclass(frozen=True)
class SortingConfig(_GeneratedConfig):
    """``sorting``: ``length`` integers in ``[min_value, max_value]``, sorted ``asc`` or ``desc``."""

    length: int = 5
    min_value: int = 0
    max_value: int = 99
    order: str = "asc"

    def validate(self, name: str) -> None:
        super().validate(name)
        _require(2 <= self.length <= 50, f"{name}.length", "must lie in [2, 50]", self.length)
        _require(
            self.min_value < self.max_value, f"{name}.max_value", "must exceed min_value", self.max_value
        )
        _require(self.order in ("asc", "desc"), f"{name}.order", "must be asc or desc", self.order)


def _hash01(*parts: Any) -> float:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:15], 16) / 16**15


def _rng(*parts: Any) -> random.Random:
    return random.Random(int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16], 16))


def _draw_split(name: str, seed: int, split: str, n: int, eval_frac: float, draw) -> list[Problem]:
    """Draw ``n`` distinct problems whose hash bucket is ``split``; ``draw(rng) -> (key, Problem)``."""
    rng = _rng(name, seed, split)
    want_eval = split == "eval"
    seen: set[str] = set()
    out: list[Problem] = []
    stall, max_stall = 0, 10_000 + 10 * n  # draws since the last new problem
    while len(out) < n:
        if stall > max_stall:
            raise ValueError(
                f"{name}: found only {len(out)} distinct {split} problems ({max_stall} draws in a row gave "
                f"nothing new); n_{split}={n} is too many for this problem space (lower n_{split} or "
                f"widen the task)"
            )
        key, problem = draw(rng)
        if key in seen or (_hash01(name, key) < eval_frac) != want_eval:
            stall += 1
            continue
        stall = 0
        seen.add(key)
        out.append(dataclasses.replace(problem, id=f"{name}/{hashlib.sha256(key.encode()).hexdigest()[:12]}"))
    return out


def _operand(rng: random.Random, digits: int, nonzero: bool) -> int:
    lo = 10 ** (digits - 1) if digits > 1 else (1 if nonzero else 0)
    return rng.randint(lo, 10**digits - 1)


def _arithmetic_draw(cfg: ArithmeticConfig):
    def draw(rng: random.Random):
        ops = [rng.choice(cfg.operators) for _ in range(cfg.ops)]
        operands = [_operand(rng, cfg.digits, nonzero=False)]
        operands += [_operand(rng, cfg.digits, nonzero=op == "/") for op in ops]
        expr = str(operands[0]) + "".join(f" {op} {x}" for op, x in zip(ops, operands[1:], strict=True))
        value, _ = evaluate_arithmetic(expr)
        prompt = f"What is {expr}?"
        if "/" in cfg.operators:
            prompt += " Give the exact value (a reduced fraction if it is not an integer)."
        meta = {"expression": expr, "operands": operands, "operators": ops}
        return expr, Problem(prompt, format_fraction(value), task="arithmetic", meta=meta)

    return draw


_COUNTDOWN_OPS = ("+", "-", "*", "/")


def _combine(a, b, op: str):
    """Combine pool items ``(value, text, prec)`` (prec 3 = number, 2 = product, 1 = sum) with ``op``."""
    (va, ta, pa), (vb, tb, pb) = a, b
    left_parens = pa == 1 and op in ("*", "/")
    right_parens = (pb == 1 and op in ("-", "*")) or (pb <= 2 and op == "/")
    ta = f"({ta})" if left_parens else ta
    tb = f"({tb})" if right_parens else tb
    if op == "+":
        value = va + vb
    elif op == "-":
        value = va - vb
    elif op == "*":
        value = va * vb
    else:
        value = va / vb
    return value, f"{ta} {op} {tb}", 1 if op in ("+", "-") else 2


def _countdown_draw(cfg: CountdownConfig):
    def draw(rng: random.Random):
        while True:
            numbers = [rng.randint(1, cfg.max_value) for _ in range(cfg.numbers)]
            k = cfg.numbers if cfg.use_all else rng.randint(2, cfg.numbers)
            pool = [(Fraction(x), str(x), 3) for x in rng.sample(numbers, k)]
            while len(pool) > 1:  # combine two random items until one expression is left
                i, j = rng.sample(range(len(pool)), 2)
                a, b = pool[i], pool[j]
                op = rng.choice(_COUNTDOWN_OPS)
                if op == "-" and a[0] < b[0]:
                    a, b = b, a
                if op == "-" and a[0] == b[0]:
                    op = "+"
                if op == "/" and (b[0] in (0, 1) or (a[0] / b[0]).denominator != 1):
                    op = "+"
                if op == "*" and 1 in (a[0], b[0]):
                    op = "+"
                pool = [p for t, p in enumerate(pool) if t not in (i, j)] + [_combine(a, b, op)]
            target, solution, _ = pool[0]
            if target.denominator != 1 or not 1 <= target <= cfg.max_target or target in numbers:
                continue
            target = int(target)
            if not check_countdown(solution, numbers, target, use_all=cfg.use_all):  # pragma: no cover
                raise AssertionError(f"countdown generator produced a wrong solution {solution!r}")
            key = f"{sorted(numbers)}->{target}"
            shown = ", ".join(map(str, numbers))
            rule = "exactly once" if cfg.use_all else "at most once"
            prompt = (
                f"Using the numbers [{shown}], each {rule}, and the operations +, -, *, /, "
                f"write an arithmetic expression that equals {target}. "
                f"Give the expression (not its value) as your final answer."
            )
            meta = {"numbers": numbers, "target": target, "solution": solution, "use_all": cfg.use_all}
            return key, Problem(prompt, str(target), task="countdown", grader="countdown", meta=meta)

    return draw


def _sorting_draw(cfg: SortingConfig):
    def draw(rng: random.Random):
        xs = [rng.randint(cfg.min_value, cfg.max_value) for _ in range(cfg.length)]
        desc = cfg.order == "desc"
        answer = ", ".join(map(str, sorted(xs, reverse=desc)))
        word = "descending" if desc else "ascending"
        prompt = f"Sort the numbers {', '.join(map(str, xs))} in {word} order."
        return ",".join(map(str, xs)) + f":{cfg.order}", Problem(
            prompt, answer, task="sorting", grader="sorting", meta={"numbers": xs, "order": cfg.order}
        )

    return draw


def _generated(name: str, cfg: _GeneratedConfig, draw, spec: str, seed: int) -> Task:
    train = _draw_split(name, seed, "train", cfg.n_train, cfg.eval_frac, draw)
    eval_ = _draw_split(name, seed, "eval", cfg.n_eval, cfg.eval_frac, draw)
    return Task(name, spec, seed, dataclasses.asdict(cfg), train, eval_)


# --------------------------------------------------------------------------------------------------
# Local datasets


@dataclass(frozen=True)
class FileConfig:
    """``jsonl`` / ``parquet``: a question/answer file, with an eval file or a seeded eval fraction."""

    path: str = ""
    eval_path: str | None = None
    eval_frac: float = 0.1
    question: str = "question"
    answer: str = "answer"
    id: str | None = None
    gsm8k: str = "auto"
    limit: int = 0

    def validate(self, name: str) -> None:
        _require(bool(self.path), f"{name}.path", "is required", self.path)
        _require(0.0 <= self.eval_frac < 1.0, f"{name}.eval_frac", "must lie in [0, 1)", self.eval_frac)
        _require(
            self.gsm8k in ("auto", "true", "false"),
            f"{name}.gsm8k",
            "must be auto, true or false",
            self.gsm8k,
        )
        _require(self.limit >= 0, f"{name}.limit", "must be >= 0 (0 = no limit)", self.limit)


def parse_reference_answer(text: Any, gsm8k: str | bool = "auto") -> str:
    """The final answer from a dataset answer field.

    GSM8K convention (arXiv 2110.14168, ``openai/gsm8k``): the field holds the worked solution ending
    with ``#### <answer>``; the text after the last ``####`` is returned, stripped, with thousands
    separators in numbers removed (``"#### 1,234"`` -> ``"1234"``). ``gsm8k="auto"`` applies this when
    ``####`` occurs, ``True`` requires it (``ValueError`` otherwise), ``False`` never applies it.
    Non-string values (ints, floats from Parquet) are converted with ``str``.

    >>> parse_reference_answer("She has 3 + 4 = 7 apples.\\n#### 7"), parse_reference_answer(" 1/2 ")
    ('7', '1/2')
    """
    mode = (
        {"auto": "auto", "true": True, "false": False}.get(gsm8k, gsm8k) if isinstance(gsm8k, str) else gsm8k
    )
    if text is None:
        raise ValueError("answer is missing (None)")
    if isinstance(text, float) and text.is_integer():
        text = int(text)
    text = str(text)
    if mode is not False and "####" in text:
        final = text.rsplit("####", 1)[1].strip()
        final = re.sub(r"(?<=\d),(?=\d{3}\b)", "", final)
    elif mode is True:
        raise ValueError("answer has no GSM8K '####' final-answer marker")
    else:
        final = text.strip()
    if not final:
        raise ValueError("answer is empty")
    return final


def problems_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    gsm8k: str | bool = "auto",
    source: str = "records",
    unit: str = "record",
    task: str = "records",
    positions: Iterable[int] | None = None,
) -> list[Problem]:
    """:class:`Problem` records from dicts (a ``datasets.Dataset`` iterates as dicts).

    Errors (not a mapping, a missing or empty field, a bad GSM8K answer) raise ``ValueError`` naming
    ``source`` and the position ``unit N`` (``positions``, default 1, 2, ...). Without ``id_field`` the
    id is ``"<source file name>:N"``.
    """
    out = []
    for i, rec in zip(itertools.count(1) if positions is None else positions, records, strict=False):
        where = f"{source}: {unit} {i}"
        if not isinstance(rec, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for key in (question_field, answer_field) + ((id_field,) if id_field else ()):
            if key not in rec:
                raise ValueError(f"{where}: missing field {key!r} (fields: {', '.join(map(str, rec))})")
        question = rec[question_field]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: field {question_field!r} must be a non-empty string")
        try:
            answer = parse_reference_answer(rec[answer_field], gsm8k)
        except ValueError as err:
            raise ValueError(f"{where}: field {answer_field!r}: {err}") from None
        meta = {k: v for k, v in rec.items() if k not in (question_field, id_field)}
        if answer != str(rec[answer_field]).strip():
            meta["solution"] = rec[answer_field]
        pid = str(rec[id_field]) if id_field else f"{Path(source).name}:{i}"
        out.append(Problem(question.strip(), answer, id=pid, task=task, meta=meta))
    return out


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    rows = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                msg = f"malformed JSON ({err.msg} at column {err.colno})"
                raise ValueError(f"{path}: line {lineno}: {msg}") from None
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import tempfile

    import datasets  # lazy: heavy (pyarrow, pandas)

    quiet = not datasets.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="entdyn-parquet-") as cache:
            ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True, cache_dir=cache)
            return list(ds)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def load_problems(
    path: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    gsm8k: str | bool = "auto",
    task: str | None = None,
) -> list[Problem]:
    """Load problems from a ``.jsonl`` (one JSON object per line) or ``.parquet`` file.

    JSONL is parsed line by line: blank lines are skipped; a line that is not valid JSON, not an
    object, or lacks a field raises ``ValueError`` with the file path and the 1-based line number.
    Parquet is read with :meth:`datasets.Dataset.from_parquet` (into a temporary cache, so nothing is
    left behind); errors name the 1-based row. Answers go through :func:`parse_reference_answer`.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    kw = dict(question_field=question_field, answer_field=answer_field, id_field=id_field, gsm8k=gsm8k)
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
        return problems_from_records(
            [rec for _, rec in rows],
            positions=[lineno for lineno, _ in rows],
            source=str(path),
            unit="line",
            task=task or "jsonl",
            **kw,
        )
    if suffix == ".parquet":
        return problems_from_records(
            _read_parquet(path), source=str(path), unit="row", task=task or "parquet", **kw
        )
    raise ValueError(f"unsupported dataset file type {suffix!r} for {path} (expected .jsonl or .parquet)")


def _question_key(p: Problem) -> str:
    return " ".join(p.prompt.split())


def split_problems(
    problems: Sequence[Problem], eval_frac: float, seed: int
) -> tuple[list[Problem], list[Problem]]:
    """Seeded split into ``(train, eval)`` by question: all copies of a question land in one split.

    ``round(eval_frac * n_questions)`` distinct questions (at least 1 when ``eval_frac > 0`` and there
    are at least 2 questions) go to eval; both keep the input order.
    """
    keys = list(dict.fromkeys(_question_key(p) for p in problems))
    n_eval = round(eval_frac * len(keys))
    if eval_frac > 0 and len(keys) >= 2:
        n_eval = min(max(n_eval, 1), len(keys) - 1)
    eval_keys = set(_rng("split", seed).sample(keys, n_eval)) if n_eval else set()
    train = [p for p in problems if _question_key(p) not in eval_keys]
    eval_ = [p for p in problems if _question_key(p) in eval_keys]
    return train, eval_


def _file_task(name: str, cfg: FileConfig, spec: str, seed: int) -> Task:
    kw = dict(
        question_field=cfg.question, answer_field=cfg.answer, id_field=cfg.id, gsm8k=cfg.gsm8k, task=name
    )
    for p in (cfg.path, cfg.eval_path):
        if p and Path(p).suffix.lower() != f".{name}":
            raise ValueError(f"{name}: file {p!r} does not end in .{name}")
    problems = load_problems(cfg.path, **kw)
    if cfg.limit:
        problems = problems[: cfg.limit]
    info: dict[str, Any] = {"n_dropped_overlap": 0}
    if cfg.eval_path:
        eval_ = load_problems(cfg.eval_path, **kw)
        eval_keys = {_question_key(p) for p in eval_}
        train = [p for p in problems if _question_key(p) not in eval_keys]
        info["n_dropped_overlap"] = len(problems) - len(train)
    else:
        train, eval_ = split_problems(problems, cfg.eval_frac, seed)
    return Task(name, spec, seed, dataclasses.asdict(cfg), train, eval_, info)


# --------------------------------------------------------------------------------------------------
# Factory

TASKS: dict[str, tuple[type, Any]] = {
    "arithmetic": (ArithmeticConfig, _arithmetic_draw),
    "countdown": (CountdownConfig, _countdown_draw),
    "sorting": (SortingConfig, _sorting_draw),
    "jsonl": (FileConfig, None),
    "parquet": (FileConfig, None),
}
"""Task name -> (config dataclass, generator). ``jsonl``/``parquet`` read files."""


def make_task(spec: str, seed: int = 0) -> Task:
    """Build a :class:`Task` from a spec string (see the module docstring for names and parameters).

    >>> task = make_task("arithmetic:digits=1,ops=1,n_train=5,n_eval=2", seed=0)
    >>> len(task.train), len(task.eval), task.train[0].grader
    (5, 2, 'math')
    >>> make_task("arithmetic:digts=2")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: arithmetic: unknown parameter 'digts'; parameters: n_train, n_eval, eval_frac, digits, ...
    """
    name, params = _split_spec(spec)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    cls, draw_factory = TASKS[name]
    cfg = _config_from_params(cls, name, params)
    if draw_factory is None:
        return _file_task(name, cfg, spec, seed)
    return _generated(name, cfg, draw_factory(cfg), spec, seed)
