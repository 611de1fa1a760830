"""Batch statistics the rules share, written once against the array API (private).

Everything returns arrays (0-d for scalars) and never converts to python numbers, so torch on an
accelerator never synchronises with the host and ``torch.compile`` sees no graph break. Selection by
rank (top-k, random subsets, quantiles) sorts, or takes the ``kmax`` largest values for a bound
``kmax`` known from shapes, because the number of tokens to select depends on the data (a fraction of
the valid tokens) and a data-dependent python ``k`` would need a host sync.
"""

from __future__ import annotations

import array_api_compat

from .._xp import Array

__all__ = [
    "count",
    "masked_mean",
    "masked_std",
    "safe_frac",
    "metric",
    "AXES",
    "topk_mask",
    "quantile",
    "relative_position",
    "sequence_mean",
    "scalar",
]


AXES = (-2, -1)  #: the (B, T) axes a batch statistic reduces over; leading axes are independent batches


def _f(xp, x: Array, like: Array) -> Array:
    return xp.astype(x, like.dtype)


def count(xp, mask: Array, like: Array) -> Array:
    """Number of True entries over the last two axes, ``(..., B, T) -> (..., 1, 1)``, as floats."""
    return xp.sum(_f(xp, mask, like), axis=AXES, keepdims=True)


def masked_mean(xp, x: Array, mask: Array, axis=AXES) -> Array:
    """Mean of ``x`` over ``mask`` along ``axis`` (kept as size-1 axes); 0 where the mask is empty."""
    n = xp.sum(_f(xp, mask, x), axis=axis, keepdims=True)
    total = xp.sum(xp.where(mask, x, xp.zeros_like(x)), axis=axis, keepdims=True)
    return total / xp.maximum(n, xp.ones_like(n))


def masked_std(xp, x: Array, mask: Array, mean: Array | None = None) -> Array:
    """Population standard deviation (denominator ``n``) over ``mask`` and the last two axes; 0 if empty."""
    if mean is None:
        mean = masked_mean(xp, x, mask)
    d = xp.where(mask, x - mean, xp.zeros_like(x))
    n = count(xp, mask, x)
    return xp.sqrt(xp.sum(d * d, axis=AXES, keepdims=True) / xp.maximum(n, xp.ones_like(n)))


def safe_frac(xp, num: Array, den: Array) -> Array:
    """``num / den`` with 0 where ``den == 0`` (a fraction of an empty set is reported as 0)."""
    return num / xp.maximum(den, xp.ones_like(den))


def metric(xp, x: Array) -> Array:
    """A statistic with kept ``(1, 1)`` batch axes -> one value per independent batch, shape ``(...)``."""
    return xp.squeeze(x, axis=AXES) if x.ndim >= 2 else x


def _largest_sorted(xp, s: Array, kmax: int | None) -> Array:
    """The ``kmax`` largest values of ``s`` along the last axis, descending (all of them if ``kmax`` is None).

    The array API has no top-k, so the generic path sorts everything; for torch and numpy, whose partial
    selections are much faster when ``kmax`` is small, this one helper uses them (same values).
    """
    n = s.shape[-1]
    if kmax is None or kmax >= n:
        return xp.sort(s, axis=-1, descending=True)
    if array_api_compat.is_torch_namespace(xp):
        import torch  # only reached with torch arrays: theory never imports torch itself

        return torch.topk(s, kmax, dim=-1, largest=True, sorted=True).values
    if array_api_compat.is_numpy_namespace(xp):
        import numpy as np

        part = -np.partition(-s, kmax - 1, axis=-1)[..., :kmax]
        return -np.sort(-part, axis=-1)
    return xp.sort(s, axis=-1, descending=True)[..., :kmax]


def topk_mask(xp, scores: Array, eligible: Array, k: Array, kmax: int | None = None) -> Array:
    """Bool mask of the ``k`` largest ``scores`` among ``eligible`` entries of each ``(B, T)`` batch.

    ``scores``/``eligible`` are ``(..., B, T)``; ``k`` is an integer array of shape ``(..., 1, 1)`` (data
    dependent, never read on the host). ``kmax``, if given, is a python bound ``k <= kmax`` known from
    shapes alone (e.g. ``frac * B * T``): then only the ``kmax`` largest values are selected instead of a
    full sort. Ties at the threshold are broken by position (lower flat index first), so exactly
    ``min(k, #eligible)`` entries are selected per batch.
    """
    shape = tuple(scores.shape)
    lead = shape[:-2]
    n = shape[-2] * shape[-1]
    if n == 0:
        return eligible
    flat = xp.reshape(scores, lead + (n,))
    elig = xp.reshape(eligible, lead + (n,))
    s = xp.where(elig, flat, xp.full_like(flat, -float("inf")))
    srt = _largest_sorted(xp, s, kmax)  # (..., min(kmax, n)), descending
    k = xp.reshape(xp.astype(k, xp.int64), lead + (1,))
    # (not xp.clip(k, 1, n): array_api_compat's clip inspects n with math.isnan, a dynamic-shape graph break)
    idx = xp.minimum(xp.maximum(k, xp.ones_like(k)), xp.full_like(k, srt.shape[-1])) - 1
    thr = xp.take_along_axis(srt, idx, axis=-1)  # (..., 1)
    greater = elig & (s > thr)
    n_greater = xp.sum(xp.astype(greater, xp.int64), axis=-1, keepdims=True)
    tie = elig & (s == thr)
    tie_rank = xp.cumulative_sum(xp.astype(tie, xp.int64), axis=-1)  # 1-based rank among ties
    chosen = (greater | (tie & (tie_rank <= k - n_greater))) & (k > 0)
    return xp.reshape(chosen, shape)


def quantile(xp, x: Array, mask: Array, q: float) -> Array:
    """Linear-interpolation quantile of ``x`` over ``mask`` along the last axis: ``(..., n) -> (...)``.

    Matches ``torch.quantile``/``numpy.quantile`` (method "linear") on the selected values. Rows with
    no selected value (also an empty last axis) give NaN.
    """
    if x.shape[-1] == 0:  # nothing to sort or index (a batch with B = 0 or T = 0)
        return xp.full(tuple(x.shape[:-1]), float("nan"), dtype=x.dtype, device=array_api_compat.device(x))
    big = xp.full_like(x, float("inf"))
    srt = xp.sort(xp.where(mask, x, big), axis=-1)  # selected values first, ascending
    srt = xp.where(xp.isfinite(srt), srt, xp.zeros_like(srt))
    n = xp.sum(xp.astype(mask, xp.int64), axis=-1, keepdims=True)  # (..., 1)
    pos = q * xp.astype(xp.maximum(n - 1, xp.zeros_like(n)), x.dtype)  # (..., 1)
    lo = xp.astype(xp.floor(pos), xp.int64)
    hi = xp.minimum(lo + 1, xp.maximum(n - 1, xp.zeros_like(n)))
    v_lo = xp.take_along_axis(srt, lo, axis=-1)
    v_hi = xp.take_along_axis(srt, hi, axis=-1)
    out = v_lo + (pos - xp.astype(lo, x.dtype)) * (v_hi - v_lo)
    nan = xp.full_like(out, float("nan"))
    return xp.squeeze(xp.where(n > 0, out, nan), axis=-1)


def relative_position(xp, valid: Array, like: Array) -> Array:
    """``r = (t - 1) / |o_i|`` on valid tokens (``t`` counts valid tokens from 1), 0 elsewhere."""
    v = xp.astype(valid, like.dtype)
    t = xp.cumulative_sum(v, axis=-1)  # (B, T)
    length = xp.sum(v, axis=-1, keepdims=True)  # (B, 1)
    r = (t - 1.0) / xp.maximum(length, xp.ones_like(length))
    return xp.where(valid, r, xp.zeros_like(r))


def sequence_mean(xp, x: Array, valid: Array) -> tuple[Array, Array]:
    """Per-sequence mean of ``x`` over valid tokens, ``(..., B, T) -> (..., B)``, and the has-tokens mask."""
    n = xp.sum(xp.astype(valid, x.dtype), axis=-1)
    total = xp.sum(xp.where(valid, x, xp.zeros_like(x)), axis=-1)
    return total / xp.maximum(n, xp.ones_like(n)), n > 0


def scalar(xp, like: Array, value: float) -> Array:
    """A 0-d array holding ``value`` with ``like``'s dtype and device."""
    return xp.asarray(value, dtype=like.dtype, device=array_api_compat.device(like))
