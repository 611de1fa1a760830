"""Evaluation metrics shared by the toy and the trainer.

``pass_at_k`` is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
on Code", arXiv 2107.03374, §2.1); arXiv 2602.03392 §7 reports Avg@K and Pass@K with it.
"""

from __future__ import annotations

from ._xp import as_float, namespace

__all__ = ["pass_at_k"]


def pass_at_k(n: int, c, k: int):
    r"""Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n - c, k) / C(n, k)``.

    Chen et al. 2021, arXiv 2107.03374 §2.1 (the Pass@K of arXiv 2602.03392 §7).

    ``C(n - c, k) / C(n, k) = prod_{j < k} (n - c - j) / (n - j)``, computed as a product of ``k`` ratios
    (no factorials, no overflow); a factor ``n - c - j <= 0`` means ``C(n - c, k) = 0`` and pass@k = 1.

    Args:
        n: samples per problem (python int >= 1).
        c: correct samples per problem, integer array of any shape ``(...)`` with ``0 <= c <= n``.
        k: ``1 <= k <= n``.

    Returns:
        ``(...)`` floating array (float64 for NumPy integer input): the probability that at least one of
        ``k`` samples drawn without replacement from the ``n`` is correct.

    >>> import numpy as np
    >>> pass_at_k(4, np.array([0, 1, 4]), 2).tolist()
    [0.0, 0.5, 1.0]
    """
    n, k = int(n), int(k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, n={n}], got {k!r}")
    xp = namespace(c)
    c = as_float(xp, c, "c")
    if k == n:  # every sample drawn: the product below is exactly 1 for c = 0 and has a factor 0 otherwise
        return xp.astype(c > 0, c.dtype)
    ratio, zero = xp.ones_like(c), xp.zeros_like(c)
    for j in range(k):  # (maximum, not clip: array-api-compat's clip costs ~25 us a call on NumPy)
        ratio = ratio * xp.maximum(n - c - j, zero) / (n - j)
    return 1.0 - ratio
