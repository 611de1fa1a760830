"""GRPO advantages and the effective logit step size.

Sources: GRPO (Shao et al., arXiv 2402.03300) group-normalised advantages; the variants used by TRL,
verl and the Trinity-RFT reference code for arXiv 2602.03392 (``docs/equations.md`` §4.1 and §5.2);
the effective step size ``alpha = eta r A`` of Theorem 3.3's derivation (E5).
"""

from __future__ import annotations

import math
from typing import Literal

import array_api_compat

from ._xp import Array, as_float, broadcast_shape, last_axis_extreme, namespace

__all__ = ["grpo_advantages", "effective_step_size", "ADVANTAGE_PRESETS"]

#: Keyword presets for :func:`grpo_advantages` matching each framework's defaults.
#: All three use the unbiased (n - 1) standard deviation; they differ in ``eps``.
ADVANTAGE_PRESETS: dict[str, dict] = {
    # Trinity-RFT (reference code of arXiv 2602.03392) and verl: torch.std (unbiased) + 1e-6,
    # a singleton group gets mean 0 and std 1.
    "reference": {"scale": "group", "correction": 1, "eps": 1e-6},
    "verl": {"scale": "group", "correction": 1, "eps": 1e-6},
    # TRL GRPOConfig(scale_rewards="group"): (r - mean) / (std + 1e-4).
    "trl": {"scale": "group", "correction": 1, "eps": 1e-4},
    # Dr. GRPO (arXiv 2503.20783), TRL scale_rewards="none", verl norm_adv_by_std_in_grpo=False.
    "dr_grpo": {"scale": "none", "correction": 1, "eps": 0.0},
}


def grpo_advantages(
    rewards: Array,
    *,
    scale: Literal["group", "batch", "none"] = "group",
    correction: int = 1,
    eps: float = 1e-6,
) -> Array:
    r"""Group-normalised GRPO advantages for rewards of shape ``(..., G)`` (G samples per prompt).

    .. math:: A_{i} = \frac{R_i - \operatorname{mean}_g(R)}{\operatorname{std}(R) + \epsilon}

    ``scale`` picks the denominator: ``"group"`` the std of the sample's own group (GRPO, TRL's default,
    verl, the reference code), ``"batch"`` one std over all rewards in the array (TRL
    ``scale_rewards="batch"``), ``"none"`` no division (Dr. GRPO). ``correction=1`` is the unbiased
    ``n - 1`` estimator that all three frameworks use (``torch.std``); ``0`` the population std.
    :data:`ADVANTAGE_PRESETS` lists each framework's ``(scale, correction, eps)``. ``docs/equations.md``
    §4.1; GRPO is arXiv 2402.03300, Dr. GRPO arXiv 2503.20783.

    Defined results: a group whose rewards are all equal gets ``A = 0`` (also with ``eps = 0``); a
    singleton group (``G = 1``) uses mean 0 and std 1 as verl and the reference code do, so
    ``A = R / (1 + eps)``. A NaN or infinite reward makes its group's advantages NaN (``scale="group"``,
    ``"none"``; every advantage for ``"batch"``, whose std it enters): never a finite wrong number.

    Numerics: huge finite rewards neither overflow nor lose the result. Each group's rewards (all of them
    for ``"batch"``) are divided first by a scale ``c``, the power of two at or below their largest
    ``|R|``, and the advantage is computed as

    .. math:: A_i = \frac{(R_i - \bar R)/c}{\operatorname{std}(R)/c + \epsilon/c},

    equal to the formula above in exact arithmetic, and bit for bit in floating point wherever the direct
    formula does not overflow or underflow (dividing by a power of two is exact). So
    ``grpo_advantages([1e200, 0, 0, 0])`` is ``[1.5, -0.5, -0.5, -0.5]``, what ``[2, 0, 0, 0]`` gives up to
    ``eps``, and rewards of ``1e308`` work. ``"none"`` returns ``c ((R - \bar R)/c)``, infinite only where
    the true centred reward exceeds the float range.

    Args:
        rewards: ``(..., G)`` rewards, e.g. ``(P, G)`` for ``P`` prompts; last axis = the group.
        scale: ``"group"``, ``"batch"`` or ``"none"``.
        correction: degrees-of-freedom correction of the std, ``0`` or ``1``.
        eps: added to the std; ``>= 0``.

    Returns:
        ``(..., G)`` advantages (float, same namespace).

    Example:
        >>> import numpy as np
        >>> from theory import grpo_advantages
        >>> np.round(grpo_advantages(np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])), 4)
        array([[ 0.866, -0.866, -0.866,  0.866],
               [ 0.   ,  0.   ,  0.   ,  0.   ]])
        >>> grpo_advantages(np.array([1e200, 0.0, 0.0, 0.0]))
        array([ 1.5, -0.5, -0.5, -0.5])
    """
    xp = namespace(rewards)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if correction not in (0, 1):
        raise ValueError(f"correction must be 0 or 1, got {correction!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if rewards.ndim == 0 or rewards.shape[-1] == 0:
        raise ValueError(f"rewards must have shape (..., G) with G >= 1, got {tuple(rewards.shape)}")
    r = as_float(xp, rewards, "rewards")
    G = r.shape[-1]
    if G == 1:  # singleton group: mean 0, std 1 (verl / Trinity-RFT convention)
        return r if scale == "none" else r / (1.0 + eps)
    if array_api_compat.size(r) == 0:  # no group at all (a leading axis of size 0)
        return r
    finite = xp.isfinite(r)
    bad = ~xp.all(finite, axis=-1, keepdims=True)  # (..., 1): a group with a NaN / inf reward
    r = xp.where(finite, r, xp.zeros_like(r))  # (computed on zeros there, then set to NaN: no warnings)
    batch, dev = scale == "batch", array_api_compat.device(r)  # (r is not empty from here on)
    if batch:
        bad = xp.any(bad)
    c = _pow2_scale(xp, r, batch)  # (..., 1), or () for "batch"
    u = r / c  # |u| < 2
    centred = u - xp.mean(u, axis=-1, keepdims=True)  # (..., G): (R - mean) / c
    # an all-equal group gets exactly 0 (the float mean of equal values can be off by an ulp)
    tied = last_axis_extreme(xp, r, True) == last_axis_extreme(xp, r, False)  # (..., 1)
    centred = xp.where(tied, xp.zeros_like(centred), centred)
    if scale == "none":
        out = c * centred
    else:
        if scale == "group" and xp.__name__.endswith("numpy"):
            # std(R) / c from the centred values: NumPy's own std computes exactly this (the same bits,
            # two reductions fewer); a tied group's centred values are 0, and so is its std
            std = xp.sqrt(xp.sum(centred * centred, axis=-1, keepdims=True) / (G - correction))
        elif scale == "group":
            std = xp.std(u, axis=-1, correction=correction, keepdims=True)  # (..., 1): std(R) / c
        else:
            n = array_api_compat.size(u)
            std = (xp.std(xp.reshape(u, (-1,)), correction=correction) if n > correction
                   else xp.ones((), dtype=u.dtype, device=dev))  # fmt: skip
            # (an all-zero std with eps = 0 would give 0/0 on tied groups: they are 0 by the where below)
        den = std + _eps_over(xp, eps, c)
        one = xp.ones_like(den)
        out = centred / xp.where(den > 0, den, one)  # den = 0 only where every centred value is 0
    return xp.where(bad, xp.full_like(out, float("nan")), out)


def _pow2_scale(xp, r: Array, batch: bool) -> Array:
    """The power of two at or below ``max |r|`` of each group (last axis) or of all of ``r``; 1 for 0."""
    m = last_axis_extreme(xp, xp.abs(r), True)  # (..., 1)
    if batch:
        m = xp.max(m)
    pos = m > 0
    m = xp.where(pos, m, xp.ones_like(m))
    # log2 of the largest float rounds up to 2**(emax + 1) = inf: cap the exponent at the largest one
    emax = math.frexp(float(xp.finfo(r.dtype).max))[1] - 1
    k = xp.minimum(xp.floor(xp.log2(m)), xp.full_like(m, emax))
    return xp.where(pos, 2.0**k, xp.ones_like(m))


def _eps_over(xp, eps: float, c: Array) -> Array:
    """``eps / c`` without an overflow warning: ``inf`` where the quotient exceeds the float range.

    That happens only for tiny (subnormal) rewards with ``eps > 0``, whose advantages then underflow to 0.
    """
    if eps == 0.0:
        return xp.zeros_like(c)
    tiny = eps / float(xp.finfo(c.dtype).max)  # eps / c is finite for c >= tiny
    floor = xp.full_like(c, tiny)
    ok = c >= floor
    return xp.where(ok, eps / xp.where(ok, c, xp.ones_like(c)), xp.full_like(c, float("inf")))


def effective_step_size(
    lr: Array | float, adv: Array, ratio: Array | float = 1.0, normaliser: Array | float = 1.0
) -> Array:
    r"""Effective logit step of one token's GRPO update, ``alpha = lr * r * A / normaliser`` (E5).

    In the tabular model a token's surrogate ``r A log p_k / n`` moves its logits by ``alpha (e_k - p)``;
    ``normaliser`` is the loss aggregation's denominator for that token (token count for DAPO's token-mean,
    ``|o_i|`` times the number of sequences for GRPO's seq-mean, a constant for Dr. GRPO). The papers absorb
    it into ``eta``; pass it to compare predictions with a real update.

    Example:
        >>> import numpy as np
        >>> from theory import effective_step_size
        >>> effective_step_size(0.1, np.array([1.0, -2.0]), ratio=np.array([1.0, 0.5]), normaliser=4.0)
        array([ 0.025, -0.025])
    """
    xp = namespace(*[a for a in (adv, lr, ratio, normaliser) if hasattr(a, "shape")])
    adv = as_float(xp, adv, "adv")
    for name, v in (("lr", lr), ("ratio", ratio), ("normaliser", normaliser)):
        if hasattr(v, "shape"):
            broadcast_shape(("adv", adv), (name, v))
    return lr * ratio * adv / normaliser
