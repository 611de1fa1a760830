"""The grader registry (one place to add a grader) and grading: :func:`grade_answer`, :func:`grade`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..tasks import Problem, check_countdown, check_sorted
from .answers import extract_answer
from .verify import DEFAULT_TIMEOUT_S, _match


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


def _reference(problem: Problem | str) -> str:
    return problem if isinstance(problem, str) else problem.answer


#: grader name -> ``fn(answer, problem, timeout_s) -> GradeResult``; :attr:`Problem.grader` names one.
#: Adding a grader is one :func:`register_grader` call: problems accept the name, grading dispatches to it.
GRADERS: dict[str, Callable[[str | None, Any, float | None], GradeResult]] = {}


def register_grader(name: str, fn: Callable[[str | None, Any, float | None], GradeResult] | None = None):
    """Register ``fn(answer, problem, timeout_s) -> GradeResult`` as grader ``name`` (also a decorator).

    >>> @register_grader("even")
    ... def _even(answer, problem, timeout_s):
    ...     return GradeResult(answer is not None and int(answer) % 2 == 0, answer, "even")
    >>> grade_answer("4", Problem("an even number?", "", grader="even")).correct
    True
    >>> del GRADERS["even"]
    """
    if fn is None:
        return lambda f: register_grader(name, f)
    if not (isinstance(name, str) and name.strip()):
        raise ValueError(f"a grader name must be a non-empty string, got {name!r}")
    if name in GRADERS and GRADERS[name] is not fn:
        raise ValueError(f"grader {name!r} is already registered ({GRADERS[name].__name__})")
    GRADERS[name] = fn
    return fn


@register_grader("math")
def _grade_math(answer: str | None, problem: Problem | str, timeout_s: float | None) -> GradeResult:
    ok, method = _match(answer, _reference(problem), timeout_s)
    return GradeResult(ok, answer, method)


@register_grader("countdown")
def _grade_countdown(answer: str | None, problem: Problem, timeout_s: float | None) -> GradeResult:
    meta = problem.meta
    ok = check_countdown(answer, meta["numbers"], int(problem.answer), use_all=bool(meta.get("use_all")))
    return GradeResult(ok, answer, "countdown" if answer is not None else "none")


@register_grader("sorting")
def _grade_sorting(answer: str | None, problem: Problem, timeout_s: float | None) -> GradeResult:
    method = "sorting" if answer is not None else "none"
    return GradeResult(check_sorted(answer, problem.answer), answer, method)


def grade_answer(
    answer: str | None, problem: Problem | str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S
) -> GradeResult:
    """Grade an already extracted answer against a :class:`Problem` (its :attr:`~Problem.grader` from
    :data:`GRADERS`) or a reference string (the ``"math"`` grader)."""
    grader = "math" if isinstance(problem, str) else problem.grader
    if grader not in GRADERS:
        raise ValueError(f"unknown grader {grader!r}; registered: {', '.join(GRADERS)}")
    return GRADERS[grader](answer, problem, timeout_s)


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
