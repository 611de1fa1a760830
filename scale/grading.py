r"""Graders, rewards and evaluation metrics for verifiable tasks (:mod:`scale.tasks`).

**Answer extraction** (:func:`extract_answer`), first rule that finds something wins:

1. the content of the last *complete* ``\boxed{...}`` (or ``\fbox{...}``), nested braces balanced, so
   ``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``; a final ``\boxed{`` cut off by the length limit is
   skipped;
2. the text after the last "answer is", "answer:", "Answer =" (case-insensitive, e.g. "The final answer
   is 42 apples.") or GSM8K's ``#### 42``, up to the end of the line or of the sentence (a period
   followed by a space or the end), with surrounding ``$`` removed;
3. the last number in the text (``-3``, ``1,234``, ``0.5``, ``7/3``);

and ``None`` (graded wrong) when there is none.

**Answer comparison** (:func:`answers_match`), in order:

1. *fast exact path*: both strings parse as plain numbers after light normalisation
   (:func:`parse_number`: ``$``, ``\$``, ``\%``/``%``, ``^\circ``/``°``, ``\text{...}``, thousands
   separators ``1,234``, a leading ``x =``, and trailing unit words such as ``42 apples`` or ``5
   dollars`` are removed; ``a/b``, ``\frac{a}{b}`` and decimals are read exactly). Equal numbers are a
   match; two different *integers* are a mismatch; other numeric pairs go on to math-verify (its float
   rounding makes ``0.333333`` match ``1/3``). Identical normalised strings are a match too.
2. *math-verify* (HuggingFace ``math_verify``, https://github.com/huggingface/Math-Verify):
   ``verify(parse("\boxed{ref}"), parse("\boxed{pred}"))``, with a **hard time bound per call**
   (``timeout_s``, default :data:`DEFAULT_TIMEOUT_S`). A call that runs out of time, or raises, counts
   as wrong.

About the time bound: math-verify's own ``parsing_timeout`` / ``timeout_seconds`` options use
``signal.alarm`` with whole seconds, per parse and *per comparison pair*, and only in the main thread
(elsewhere ``parse`` / ``verify`` raise ``ValueError``). Nested inside a caller's own alarm they would
also cancel it (``alarm`` and ``setitimer(ITIMER_REAL)`` are one timer). So this module turns them off
(``parsing_timeout=None``, ``timeout_seconds=None``) and bounds the *whole* parse + verify call itself:
in the main thread with ``signal.setitimer`` (fractional seconds; any timer the caller had set is
restored afterwards), elsewhere (threads, or no ``setitimer``) in a persistent child Python process
(started with :mod:`subprocess`) that is killed and restarted when a call overruns. The first call
warms math-verify up (imports, sympy caches) outside the bound.

**Rewards.** :class:`CorrectnessReward` gives ``correct`` / ``incorrect`` (1 / 0 by default;
``CorrectnessReward.pm1()`` gives +1 / -1, the reward of arXiv 2508.02260's released code).
:func:`safe_reward` / :class:`SafeReward` call any reward function and turn an exception (or a result
that is not a finite number) into reward 0, counted in ``n_errors``; ``strict=True`` re-raises.

**Metrics over k samples per problem** (:func:`evaluate_samples`): ``avg@k`` is the mean accuracy over
all samples; ``pass@k`` the mean over problems of the unbiased estimator :func:`theory.pass_at_k`
(Chen et al. 2021, arXiv 2107.03374); ``maj@k`` grades the majority answer of the first ``k`` samples
(:func:`majority_vote`: votes go to :func:`normalize_answer` forms, samples without an answer do not
vote, and a tie goes to the tied answer that appears first in sample order).

No torch import here; ``math_verify`` (and sympy) are imported on first use.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from theory import pass_at_k

from .tasks import Problem, check_countdown, check_sorted

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "CorrectnessReward",
    "EvalResult",
    "GradeResult",
    "RewardStats",
    "SafeReward",
    "answers_match",
    "avg_at_k",
    "evaluate_samples",
    "extract_answer",
    "extract_boxed",
    "grade",
    "grade_answer",
    "grade_detailed",
    "maj_at_k",
    "majority_vote",
    "math_verify_equal",
    "normalize_answer",
    "parse_number",
    "pass_at_k_mean",
    "safe_reward",
]

DEFAULT_TIMEOUT_S = 2.0
"""Default bound, in seconds, on one math-verify comparison (parse of both sides + verify)."""

# --------------------------------------------------------------------------------------------------
# Extraction


_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    r"""Content of the last complete ``\boxed{...}`` / ``\fbox{...}`` (nested braces balanced), else None.

    >>> extract_boxed(r"so $x = \boxed{\frac{1}{2}}$, and \boxed{")
    '\\frac{1}{2}'
    """
    if not isinstance(text, str):
        return None
    opens = {m.end() - 1 for m in _BOX_RE.finditer(text)}  # positions of the "{" that open a box
    if not opens:
        return None
    stack: list[int] = []
    best: tuple[int, int] | None = None
    i, n = 0, len(text)
    while i < n:  # one pass, so a long completion full of unclosed boxes stays linear
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in "{}":
            i += 2  # escaped brace \{ \} (a set) does not count
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            start = stack.pop()
            if start in opens and (best is None or start > best[0]):
                best = (start, i)
        i += 1
    return None if best is None else text[best[0] + 1 : best[1]]


_ANSWER_IS_RE = re.compile(r"(?:answer\s*(?:is|:|=)|####)\s*:?\s*([^\n]*)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def extract_answer(text: str | None) -> str | None:
    r"""The final answer in a completion (the order of the rules is in the module docstring).

    >>> extract_answer(r"... so the total is \boxed{ 7 }."), extract_answer("The answer is 42 apples.")
    (' 7 ', '42 apples')
    >>> extract_answer("3 + 4 = 7, minus 1 is 6"), extract_answer("I do not know")
    ('6', None)
    """
    if not isinstance(text, str) or not text:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    matches = list(_ANSWER_IS_RE.finditer(text))
    for m in reversed(matches):
        tail = re.split(r"\.(?:\s|$)", m.group(1), maxsplit=1)[0].strip().strip("$").strip()
        if tail:
            return tail
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].strip() if numbers else None


# --------------------------------------------------------------------------------------------------
# Normalisation and the fast path

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_REMOVE = (
    r"\left",
    r"\right",
    r"\!",
    r"\,",
    r"\;",
    r"\:",
    r"\displaystyle",
    "^{\\circ}",
    "^\\circ",
    "\\circ",
    "\\degree",
    "°",
    "\\%",
    "%",
    "\\$",
    "$",
)
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_FULL = re.compile(
    rf"^(?P<sign>[-+]?)\s*(?:"
    rf"\\frac\s*\{{\s*(?P<fn>-?(?:{_NUM}))\s*\}}\s*\{{\s*(?P<fd>{_NUM})\s*\}}"  # \frac{a}{b}
    rf"|\\frac(?P<sn>\d)(?P<sd>\d)"  # \frac12
    rf"|(?P<a>{_NUM})(?:\s*/\s*(?P<b>{_NUM}))?"  # a, a/b
    rf")(?:\s+[A-Za-z][A-Za-z\s.]*)?$"  # trailing unit words
)


def _clean(s: str) -> str:
    s = s.strip()
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("{,}", ","), ("−", "-"), ("\\ ", " ")):
        s = s.replace(old, new)
    prev = None
    while prev != s:  # \text{...} -> " ... " (innermost first)
        prev, s = s, _TEXT_CMD_RE.sub(r" \1 ", s)
    for token in _REMOVE:
        s = s.replace(token, "")
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "").replace("~", " ")
    s = " ".join(s.split()).strip().rstrip(".").strip()
    s = re.sub(r"^[A-Za-z]\s*=\s*", "", s)  # "x = 5" -> "5"
    return s


def _to_fraction(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def parse_number(answer: str | None) -> Fraction | None:
    r"""The exact number an answer string denotes, or None if it is not a plain number.

    Handles integers, decimals, ``a/b``, ``\frac{a}{b}``, signs, thousands separators, ``$``, ``%``,
    degrees, ``\text{}`` and trailing unit words (see the module docstring).

    >>> [parse_number(s) for s in [r"\frac{1}{2}", "1,234", r"90^\circ", r"\$5", "5 dollars", "x+1"]]
    [Fraction(1, 2), Fraction(1234, 1), Fraction(90, 1), Fraction(5, 1), Fraction(5, 1), None]
    """
    if not isinstance(answer, str):
        return None
    s = _clean(answer)
    if len(s) > 100:
        return None
    m = _NUMBER_FULL.match(s)
    if m is None:
        return None
    try:
        if m.group("fn") is not None:
            num, den = _to_fraction(m.group("fn")), _to_fraction(m.group("fd"))
        elif m.group("sn") is not None:
            num, den = Fraction(int(m.group("sn"))), Fraction(int(m.group("sd")))
        else:
            num = _to_fraction(m.group("a"))
            den = _to_fraction(m.group("b")) if m.group("b") else Fraction(1)
        if den == 0:
            return None
        value = num / den
    except (ValueError, ZeroDivisionError):
        return None
    return -value if m.group("sign") == "-" else value


def normalize_answer(answer: str | None) -> str | None:
    r"""Canonical form of an answer, used for exact matching and majority voting.

    Numbers become their exact reduced form (``"0.5"``, ``"1/2"`` and ``"\frac{1}{2}"`` all give
    ``"1/2"``; ``"1,234"`` gives ``"1234"``); anything else is :func:`_clean`-ed with all whitespace
    removed. ``None`` or an empty answer gives ``None``.

    >>> [normalize_answer(s) for s in ["0.5", r"\frac{1}{2}", " 42 apples", r"x^2 + 1", "  "]]
    ['1/2', '1/2', '42', 'x^2+1', None]
    """
    if not isinstance(answer, str):
        return None
    value = parse_number(answer)
    if value is not None:
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    s = "".join(_clean(answer).split())
    return s or None


# --------------------------------------------------------------------------------------------------
# math-verify under a hard time bound


class _GraderTimeout(BaseException):
    """Raised by our SIGALRM handler; a BaseException so math-verify's ``except Exception`` lets it pass."""


class _QuietTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # we provide the timeout ourselves
        return not record.getMessage().startswith("Timeout is disabled")


_warm = False
_warm_lock = threading.Lock()


def _math_verify():
    global _warm
    import math_verify

    if not _warm:
        with _warm_lock:
            if not _warm:
                for name in ("math_verify.parser", "math_verify.grader"):
                    logging.getLogger(name).addFilter(_QuietTimeoutWarning())
                math_verify.verify(
                    math_verify.parse("$1$", parsing_timeout=None),
                    math_verify.parse(r"\boxed{\frac{2}{2}}", parsing_timeout=None),
                    timeout_seconds=None,
                )
                _warm = True
    return math_verify


def _math_verify_unbounded(pred: str, reference: str) -> bool:
    mv = _math_verify()
    gold = mv.parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
    target = mv.parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    if not gold or not target:
        return False
    return bool(mv.verify(gold, target, timeout_seconds=None))


def _with_itimer(fn: Callable[[], Any], timeout_s: float) -> Any:
    """Run ``fn()`` in the main thread; raise :class:`_GraderTimeout` after ``timeout_s`` seconds."""

    def on_alarm(signum, frame):
        raise _GraderTimeout

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    try:
        old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # give an outer timer back what is left of it (at least 1 ms)
            remaining = max(old_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)


def _worker_stdio() -> None:  # pragma: no cover - runs in the child process
    """Child side of :class:`_Worker`: JSON lines ``[pred, reference]`` in, ``["ok", bool]`` out."""
    import json
    import sys

    _math_verify()
    print(json.dumps(["ready", None]), flush=True)
    for line in sys.stdin:
        try:
            pred, reference = json.loads(line)
            reply = ["ok", _math_verify_unbounded(pred, reference)]
        except Exception as err:
            reply = ["error", repr(err)]
        print(json.dumps(reply), flush=True)


class _Worker:
    """A child Python process that runs math-verify, for callers outside the main thread.

    Started with :mod:`subprocess` (``python -c "...; _worker_stdio()"``), not :mod:`multiprocessing`,
    so the caller's ``__main__`` script is never re-imported in the child. A call that overruns its
    bound kills the child; the next call starts a fresh one (start-up is not charged to that call).
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None
        self.replies = None

    def _start(self) -> None:
        import os
        import queue
        import subprocess
        import sys
        from pathlib import Path

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # so that ``import scale`` works in the child
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        code = "from scale.grading import _worker_stdio; _worker_stdio()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        replies: queue.Queue = queue.Queue()

        def pump(stream, out):  # one reader thread per child; ends at EOF
            for line in stream:
                out.put(line)
            out.put(None)

        threading.Thread(target=pump, args=(proc.stdout, replies), daemon=True).start()
        self.proc, self.replies = proc, replies
        if self._reply(120.0) is None or self.proc is None:
            code = proc.poll()
            self._stop()
            raise RuntimeError(f"the grading worker process did not start (exit code {code})")

    def _reply(self, timeout_s: float):
        import json
        import queue

        try:
            line = self.replies.get(timeout=timeout_s)
        except queue.Empty:
            return "timeout"
        return None if line is None else json.loads(line)

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
        self.proc = self.replies = None

    def call(self, pred: str, reference: str, timeout_s: float) -> bool:
        import json

        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._stop()
                self._start()
            try:
                self.proc.stdin.write(json.dumps([pred, reference]) + "\n")
                self.proc.stdin.flush()
            except OSError as err:
                self._stop()
                raise RuntimeError(f"grading worker died: {err!r}") from None
            reply = self._reply(timeout_s)
            if reply == "timeout":
                self._stop()
                raise _GraderTimeout
            if reply is None:
                self._stop()
                raise RuntimeError("grading worker died")
            status, value = reply
            if status == "error":
                raise RuntimeError(value)
            return bool(value)


_WORKER = _Worker()


def _can_use_signals() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def math_verify_equal(pred: str, reference: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    r"""math-verify equivalence of ``pred`` and ``reference`` (both wrapped in ``\boxed{}`` and parsed),
    bounded by ``timeout_s`` seconds (None or <= 0: unbounded). Raises ``TimeoutError`` on overrun.

    >>> math_verify_equal(r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2")
    True
    """
    if timeout_s is None or timeout_s <= 0:
        return _math_verify_unbounded(pred, reference)
    try:
        if _can_use_signals():
            _math_verify()  # warm-up outside the bound
            return _with_itimer(lambda: _math_verify_unbounded(pred, reference), float(timeout_s))
        return _WORKER.call(pred, reference, float(timeout_s))
    except _GraderTimeout:
        raise TimeoutError(f"math-verify took longer than {timeout_s} s") from None


# --------------------------------------------------------------------------------------------------
# Grading


@dataclass(frozen=True)
class GradeResult:
    """Outcome of one grading call.

    ``method`` says what decided it: ``"none"`` (no answer found), ``"exact"`` (fast path),
    ``"math_verify"``, ``"timeout"`` (math-verify overran: wrong), ``"error"`` (math-verify raised:
    wrong), ``"countdown"`` or ``"sorting"`` (task checkers).
    """

    correct: bool
    answer: str | None
    method: str


def _match(pred: str | None, reference: str, timeout_s: float | None) -> tuple[bool, str]:
    if pred is None or not str(pred).strip():
        return False, "none"
    a, b = parse_number(pred), parse_number(reference)
    if a is not None and b is not None:
        if a == b:
            return True, "exact"
        if a.denominator == 1 and b.denominator == 1:
            return False, "exact"
    elif normalize_answer(pred) == normalize_answer(reference):
        return True, "exact"
    try:
        return math_verify_equal(pred, reference, timeout_s=timeout_s), "math_verify"
    except TimeoutError:
        return False, "timeout"
    except Exception:
        return False, "error"


def answers_match(pred: str | None, reference: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    r"""Whether an extracted answer equals the reference (fast exact path, then bounded math-verify).

    >>> answers_match(r"\frac{1}{2}", "0.5"), answers_match("1,234", "1234"), answers_match(None, "7")
    (True, True, False)
    """
    return _match(pred, reference, timeout_s)[0]


def _reference(problem: Problem | str) -> str:
    return problem if isinstance(problem, str) else problem.answer


def grade_answer(
    answer: str | None, problem: Problem | str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S
) -> GradeResult:
    """Grade an already extracted answer against a :class:`Problem` (dispatch on ``problem.grader``) or a
    reference string (the ``"math"`` grader)."""
    grader = "math" if isinstance(problem, str) else problem.grader
    if grader == "countdown":
        meta = problem.meta
        ok = check_countdown(answer, meta["numbers"], int(problem.answer), use_all=bool(meta.get("use_all")))
        return GradeResult(ok, answer, "countdown" if answer is not None else "none")
    if grader == "sorting":
        return GradeResult(
            check_sorted(answer, problem.answer), answer, "sorting" if answer is not None else "none"
        )
    if grader != "math":
        raise ValueError(f"unknown grader {grader!r}")
    ok, method = _match(answer, _reference(problem), timeout_s)
    return GradeResult(ok, answer, method)


def grade_detailed(
    completion: str, problem: Problem | str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S
) -> GradeResult:
    """Extract the answer from ``completion`` (:func:`extract_answer`) and grade it (:func:`grade_answer`)."""
    return grade_answer(extract_answer(completion), problem, timeout_s=timeout_s)


def grade(completion: str, problem: Problem | str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    r"""Whether ``completion`` answers ``problem`` correctly.

    >>> grade(r"Half of it: $\boxed{\frac{1}{2}}$", "0.5"), grade("It costs $5.", "5")
    (True, True)
    """
    return grade_detailed(completion, problem, timeout_s=timeout_s).correct


# --------------------------------------------------------------------------------------------------
# Rewards


@dataclass(frozen=True)
class CorrectnessReward:
    """Outcome reward: ``correct`` if :func:`grade` accepts the completion, else ``incorrect``.

    >>> r = CorrectnessReward.pm1()
    >>> r(r"\\boxed{12}", "12"), r("no idea", "12")
    (1.0, -1.0)
    """

    correct: float = 1.0
    incorrect: float = 0.0
    timeout_s: float | None = DEFAULT_TIMEOUT_S

    @classmethod
    def pm1(cls, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> CorrectnessReward:
        """+1 / -1 (arXiv 2508.02260's reward)."""
        return cls(1.0, -1.0, timeout_s)

    def __call__(self, completion: str, problem: Problem | str) -> float:
        return self.correct if grade(completion, problem, timeout_s=self.timeout_s) else self.incorrect


@dataclass
class RewardStats:
    """Counters kept by :func:`safe_reward` / :class:`SafeReward`: calls, errors, the last error messages."""

    n_calls: int = 0
    n_errors: int = 0
    last_errors: deque = field(default_factory=lambda: deque(maxlen=10))


def safe_reward(
    fn: Callable[[str, Any], float],
    completion: str,
    problem: Any,
    *,
    strict: bool = False,
    stats: RewardStats | None = None,
) -> float:
    """``float(fn(completion, problem))``, or 0.0 if ``fn`` raises or returns something that is not a finite
    real number (a bool, int, float, NumPy scalar or 0-d array/tensor is fine), counted in
    ``stats.n_errors``; ``strict=True`` re-raises instead (a non-finite or non-numeric result then
    raises ``ValueError``).

    >>> stats = RewardStats()
    >>> safe_reward(lambda c, p: 1 / 0, "x", None, stats=stats), stats.n_errors
    (0.0, 1)
    """
    if stats is not None:
        stats.n_calls += 1
    try:
        value = fn(completion, problem)
        if not isinstance(value, numbers.Real) and getattr(value, "ndim", None) == 0:
            value = value.item()  # a 0-d array or tensor
        if not isinstance(value, numbers.Real):
            raise ValueError(f"reward function returned {type(value).__name__}, expected a real number")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"reward function returned {value}")
        return value
    except Exception as err:
        if strict:
            raise
        if stats is not None:
            stats.n_errors += 1
            stats.last_errors.append(f"{type(err).__name__}: {err}")
        return 0.0


class SafeReward:
    """A reward function wrapped by :func:`safe_reward`, with its :class:`RewardStats`.

    >>> r = SafeReward(lambda c, p: float(c))
    >>> r("0.5", None), r("oops", None), r.n_errors, r.n_calls
    (0.5, 0.0, 1, 2)
    """

    def __init__(self, fn: Callable[[str, Any], float], *, strict: bool = False):
        self.fn, self.strict, self.stats = fn, strict, RewardStats()

    @property
    def n_errors(self) -> int:
        return self.stats.n_errors

    @property
    def n_calls(self) -> int:
        return self.stats.n_calls

    def __call__(self, completion: str, problem: Any) -> float:
        return safe_reward(self.fn, completion, problem, strict=self.strict, stats=self.stats)

    def batch(self, completions: Sequence[str], problems: Sequence[Any]) -> list[float]:
        """Rewards for aligned lists of completions and problems."""
        if len(completions) != len(problems):
            raise ValueError(f"{len(completions)} completions but {len(problems)} problems")
        return [self(c, p) for c, p in zip(completions, problems, strict=True)]


# --------------------------------------------------------------------------------------------------
# Metrics over k samples per problem


def _as_correct_matrix(correct) -> np.ndarray:
    c = np.asarray(correct, dtype=bool)
    if c.ndim != 2 or c.shape[1] < 1:
        raise ValueError(
            f"correct must be a (problems, samples) array with samples >= 1, got shape {c.shape}"
        )
    return c


def avg_at_k(correct) -> float:
    """Mean accuracy over all samples of a ``(problems, k)`` boolean array (avg@k).

    >>> avg_at_k([[True, False], [True, True]])
    0.75
    """
    return float(_as_correct_matrix(correct).mean())


def pass_at_k_mean(correct, k: int) -> float:
    """Mean over problems of the unbiased pass@k (:func:`theory.pass_at_k`) from a ``(problems, n)`` array.

    >>> pass_at_k_mean([[True, False, False, False], [False] * 4], 2)
    0.25
    """
    c = _as_correct_matrix(correct)
    return float(np.mean(pass_at_k(c.shape[1], c.sum(axis=1), k)))


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent :func:`normalize_answer` form among ``answers``; None if none has an answer.

    ``None`` (no answer) does not vote. Ties go to the tied form whose first occurrence comes first in
    ``answers``. Returns the *original* string of that first occurrence (so it can be graded as is).

    >>> majority_vote(["1/2", "3", "0.5", "3", None, None, None])   # 1/2 and 3 tie; 1/2 came first
    '1/2'
    """
    norms = [normalize_answer(a) for a in answers]
    counts = Counter(n for n in norms if n is not None)
    if not counts:
        return None
    best = max(counts.values())
    for a, n in zip(answers, norms, strict=True):
        if n is not None and counts[n] == best:
            return a
    raise AssertionError("unreachable")  # pragma: no cover


def maj_at_k(
    answers: Sequence[Sequence[str | None]],
    problems: Sequence[Problem | str],
    k: int | None = None,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> float:
    """Fraction of problems whose majority answer (:func:`majority_vote` over the first ``k`` extracted
    answers; all when ``k`` is None) is correct (:func:`grade_answer`).

    >>> maj_at_k([["7", "7", "8"], ["1", "2", None]], ["7", "2"])
    0.5
    """
    if len(answers) != len(problems):
        raise ValueError(f"{len(answers)} answer lists but {len(problems)} problems")
    if not answers:
        raise ValueError("no problems")
    hits = 0
    for row, problem in zip(answers, problems, strict=True):
        row = list(row) if k is None else list(row)[:k]
        if k is not None and len(row) < k:
            raise ValueError(f"maj@{k} needs at least {k} samples per problem, got {len(row)}")
        hits += grade_answer(majority_vote(row), problem, timeout_s=timeout_s).correct
    return hits / len(answers)


@dataclass(frozen=True)
class EvalResult:
    """Metrics from :func:`evaluate_samples`.

    ``correct`` is the ``(problems, n)`` boolean array; ``pass_at`` and ``maj_at`` map k to the metric;
    ``methods`` counts :attr:`GradeResult.method` over all samples (e.g. how many timed out).
    """

    n_problems: int
    n_samples: int
    avg: float
    pass_at: dict[int, float]
    maj_at: dict[int, float]
    correct: np.ndarray = field(repr=False)
    methods: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Flat metric names: ``avg@n``, ``pass@k``, ``maj@k``."""
        out = {f"avg@{self.n_samples}": self.avg}
        out.update({f"pass@{k}": v for k, v in self.pass_at.items()})
        out.update({f"maj@{k}": v for k, v in self.maj_at.items()})
        return out


def evaluate_samples(
    problems: Sequence[Problem | str],
    completions: Sequence[Sequence[str]],
    *,
    ks: Sequence[int] | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> EvalResult:
    """Grade ``n`` completions per problem and compute avg@n, pass@k and maj@k for each k in ``ks``.

    Every problem must have the same number ``n`` of completions; ``ks`` defaults to ``(1, n)`` and
    each k must lie in ``[1, n]``. pass@k uses all ``n`` samples (unbiased estimator); maj@k votes over
    the first ``k``.
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
    if not problems:
        raise ValueError("no problems")
    sizes = {len(c) for c in completions}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            f"every problem needs the same number (>= 1) of completions, got sizes {sorted(sizes)}"
        )
    (n,) = sizes
    ks = sorted(set(ks)) if ks is not None else sorted({1, n})
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"k must lie in [1, n={n}], got {k}")
    results = [
        [grade_detailed(c, p, timeout_s=timeout_s) for c in row]
        for p, row in zip(problems, completions, strict=True)
    ]
    correct = np.array([[r.correct for r in row] for row in results], dtype=bool)
    answers = [[r.answer for r in row] for row in results]
    methods = Counter(r.method for row in results for r in row)
    return EvalResult(
        n_problems=len(problems),
        n_samples=n,
        avg=avg_at_k(correct),
        pass_at={k: pass_at_k_mean(correct, k) for k in ks},
        maj_at={k: maj_at_k(answers, problems, k, timeout_s=timeout_s) for k in ks},
        correct=correct,
        methods=dict(methods),
    )
