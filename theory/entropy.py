"""Softmax, log-softmax and Shannon entropy of a next-token distribution.

Source: arXiv 2602.03392 §3 (notation of ``docs/equations.md`` §1). ``p = softmax(z)`` over the last
(vocabulary) axis, ``H(p) = -sum_i p_i log p_i`` in nats.

All functions take NumPy or torch arrays (any array-API array) of shape ``(..., V)`` and return an
array of the same namespace; torch results are differentiable. See :mod:`theory._xp` for dtype,
masking (``-inf`` logits) and NaN conventions.
"""

from __future__ import annotations

from ._xp import Array, as_float, check_logits, finite_logp, log_softmax_parts, namespace
from .rowstats import row_statistics

__all__ = ["log_softmax", "softmax", "entropy", "entropy_from_logp"]


def log_softmax(logits: Array) -> Array:
    r"""Log-probabilities ``log p_i = z_i - log sum_j exp(z_j)`` over the last axis.

    .. math:: \log p_i = z_i - \log\sum_j e^{z_j}

    Computed with the row maximum subtracted first, so ``|z|`` up to 1e4 (and beyond) in float32 loses
    no precision. A ``-inf`` logit gives ``log p_i = -inf`` exactly. ``docs/equations.md`` §1.

    Args:
        logits: ``(..., V)`` logits.

    Returns:
        ``(..., V)`` log-probabilities, float32 or float64.

    Example:
        >>> import numpy as np
        >>> from theory import log_softmax
        >>> np.round(log_softmax(np.array([0.0, 0.0, -np.inf])), 4)
        array([-0.6931, -0.6931,    -inf])
    """
    xp = namespace(logits)
    check_logits(logits)
    z = as_float(xp, logits, "logits")
    return log_softmax_parts(xp, z)


def softmax(logits: Array) -> Array:
    r"""Probabilities ``p_i = exp(z_i) / sum_j exp(z_j)`` over the last axis.

    .. math:: p_i = \frac{e^{z_i}}{\sum_j e^{z_j}}

    The policy of the tabular setting, ``docs/equations.md`` §1 (arXiv 2602.03392 §3).

    Args:
        logits: ``(..., V)`` logits; ``-inf`` marks a masked entry (probability exactly 0).

    Returns:
        ``(..., V)`` probabilities summing to 1 along the last axis.

    Example:
        >>> import numpy as np
        >>> from theory import softmax
        >>> softmax(np.array([[0.0, np.log(3.0)], [1e4, -1e4]]))
        array([[0.25, 0.75],
               [1.  , 0.  ]])
    """
    xp = namespace(logits)
    return xp.exp(log_softmax(logits))


def entropy_from_logp(logp: Array) -> Array:
    r"""Shannon entropy ``H = -sum_i p_i log p_i`` from log-probabilities ``(..., V) -> (...)``.

    Entries with ``log p_i = -inf`` contribute exactly 0 (the limit of ``p log p``). A row that is no
    log-distribution because its maximum is not finite (a NaN, a ``+inf``, or only ``-inf``) gives NaN, as
    a row of such logits does (:mod:`theory._xp`). ``docs/equations.md`` §1 (arXiv 2602.03392 §3).

    Example:
        >>> import numpy as np
        >>> from theory import entropy_from_logp
        >>> round(float(entropy_from_logp(np.array([np.log(0.5), np.log(0.5), -np.inf]))), 6)
        0.693147
    """
    xp = namespace(logp)
    check_logits(logp, "logp")
    logp = as_float(xp, logp, "logp")
    H = 0.0 - xp.sum(xp.exp(logp) * finite_logp(xp, logp), axis=-1)  # 0.0 - : no -0.0
    # (such a row computes without a floating-point warning: inf * inf, NaN, or 0; no copy of logp)
    bad = ~xp.isfinite(xp.max(logp, axis=-1))  # (...): NaN, +inf or only -inf
    return xp.where(bad, xp.full_like(H, float("nan")), H)


def entropy(logits: Array) -> Array:
    r"""Shannon entropy (nats) of ``softmax(logits)`` over the last axis.

    .. math:: H(p) = -\sum_{i=1}^{V} p_i \log p_i, \qquad p = \mathrm{softmax}(z)

    Section 1 of ``docs/equations.md`` (arXiv 2602.03392 §3). This is the exact entropy of the whole
    next-token distribution, not the sampled-token surprisal ``-log p_k`` that some trainers log.

    Args:
        logits: ``(..., V)`` logits, e.g. ``(B, T, V)``.

    Returns:
        ``(...)`` entropies in ``[0, log V]``.

    Example:
        >>> import numpy as np
        >>> from theory import entropy
        >>> np.round(entropy(np.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -np.inf, -np.inf]])), 6)
        array([1.386294, 0.693147])
    """
    # H = log Z - sum_i e_i s_i / Z with s = z - max z, e = exp(s): one pass per row block
    return row_statistics(logits).entropy
