"""Rewards: :class:`CorrectnessReward`, and :func:`safe_reward` / :class:`SafeReward` (errors become 0)."""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..tasks import Problem
from .registry import grade
from .verify import DEFAULT_TIMEOUT_S, run_with_deadline


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
    timeout_s: float | None = None,
) -> float:
    """``float(fn(completion, problem))``, or 0.0 if ``fn`` raises, runs longer than ``timeout_s`` seconds
    (:func:`scale.grading.verify.run_with_deadline`), or returns something that is not a finite real number
    (a bool, int, float, NumPy scalar or 0-d array/tensor is fine), counted in ``stats.n_errors``;
    ``strict=True`` re-raises instead (``TimeoutError`` for an overrun, ``ValueError`` for a non-finite or
    non-numeric result).

    >>> stats = RewardStats()
    >>> safe_reward(lambda c, p: 1 / 0, "x", None, stats=stats), stats.n_errors
    (0.0, 1)
    """
    if stats is not None:
        stats.n_calls += 1
    try:
        value = run_with_deadline(lambda: fn(completion, problem), timeout_s, "the reward function")
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
    """A reward function wrapped by :func:`safe_reward` (with its ``timeout_s``) and its :class:`RewardStats`.

    >>> r = SafeReward(lambda c, p: float(c))
    >>> r("0.5", None), r("oops", None), r.n_errors, r.n_calls
    (0.5, 0.0, 1, 2)
    """

    def __init__(
        self, fn: Callable[[str, Any], float], *, strict: bool = False, timeout_s: float | None = None
    ):
        self.fn, self.strict, self.timeout_s, self.stats = fn, strict, timeout_s, RewardStats()

    @property
    def n_errors(self) -> int:
        return self.stats.n_errors

    @property
    def n_calls(self) -> int:
        return self.stats.n_calls

    def __call__(self, completion: str, problem: Any) -> float:
        return safe_reward(
            self.fn, completion, problem, strict=self.strict, stats=self.stats, timeout_s=self.timeout_s
        )

    def batch(self, completions: Sequence[str], problems: Sequence[Any]) -> list[float]:
        """Rewards for aligned lists of completions and problems."""
        if len(completions) != len(problems):
            raise ValueError(f"{len(completions)} completions but {len(problems)} problems")
        return [self(c, p) for c, p in zip(completions, problems, strict=True)]
