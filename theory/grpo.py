"""GRPO advantages and the effective logit step size.

Sources: GRPO (Shao et al., arXiv 2402.03300) group-normalised advantages; the variants used by TRL,
verl and the Trinity-RFT reference code for arXiv 2602.03392 (``docs/equations.md`` §4.1 and §5.2);
the effective step size ``alpha = eta r A`` of Theorem 3.3's derivation (E5).
"""

from __future__ import annotations

from typing import Literal

import array_api_compat

from ._xp import Array, as_float, broadcast_shape, namespace

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

    Defined results: a group whose rewards are all equal gets ``A = 0``; a singleton group (``G = 1``)
    uses mean 0 and std 1 as verl and the reference code do, so ``A = R / (1 + eps)``.

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
    centred = r - xp.mean(r, axis=-1, keepdims=True)  # (..., G)
    # an all-equal group gets exactly 0 (the float mean of equal values can be off by an ulp)
    tied = xp.max(r, axis=-1, keepdims=True) == xp.min(r, axis=-1, keepdims=True)  # (..., 1)
    centred = xp.where(tied, xp.zeros_like(centred), centred)
    if scale == "none":
        return centred
    if scale == "group":
        std = xp.std(r, axis=-1, correction=correction, keepdims=True)  # (..., 1)
    else:
        n = array_api_compat.size(r)
        std = xp.std(xp.reshape(r, (-1,)), correction=correction) if n > correction else xp.ones(())
    return centred / (std + eps)


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
