"""Metrics over k samples per problem: avg@k, pass@k, maj@k (:func:`evaluate_samples`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from theory import pass_at_k

from ..tasks import Problem
from .answers import normalize_answer
from .registry import grade_answer, grade_detailed
from .verify import DEFAULT_TIMEOUT_S


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
