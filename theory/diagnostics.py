r"""Batch statistics of the entropy dynamics, shared by the toy, the trainer and the adapters.

Every backend logs the same numbers about one batch of sampled tokens: the entropy by advantage sign,
the discriminator ``S*`` (E1) and the vocabulary baseline ``E_p[S]`` (E7), their difference (the
deviation that signs the entropy change, E6/E8), the quadrant shares of §4.2, the Corollary 3.5 ratio
and the tabular first-order prediction of the entropy change, ``sum_t -alpha_t (S*_t - E_p[S]_t)`` (E6
summed over tokens, with the step sizes ``alpha_t`` of (E5)). This module computes them once, on NumPy
or torch (array API), for batches ``(..., B, T)``: every leading index is an independent batch (the toy's
runs), every statistic has the leading shape ``(...)``.

**Empty sets.** A mean over no token (no valid token, no token with ``A > 0`` ...) is **0**, the value
the rules (:mod:`theory.rules`) report for an empty selection too; the counts beside it
(``quad/<q>_frac``, the valid-token count) tell an empty set from a zero mean. The Corollary 3.5 ratio
``|mean S*| / |mean (S* - E_p[S])|`` is ``inf`` when the mean deviation is exactly 0 (and 0 when both
means are 0). No statistic is NaN for finite inputs, and nothing here synchronises with the host.

**Non-finite inputs.** :func:`batch_statistics` follows the rules' policy (``docs/rules.md``
"Non-finite inputs", :func:`theory._xp.exclude_nonfinite`): a valid token where any of its inputs is NaN
or infinite counts as not valid in *every* statistic (it is left out of each mean, std and fraction,
numerators and denominators alike), and ``nonfinite_frac`` reports the fraction of the valid tokens
left out. Inputs of less than 32 bits are computed in float32.

Sources: arXiv 2602.03392, Theorem 3.3 / (E6) and Corollaries 3.4-3.5 (``docs/equations.md``).
"""

from __future__ import annotations

from ._xp import Array, exclude_nonfinite, namespace
from .discriminator import QUADRANTS, quadrant

__all__ = ["AXES", "masked_mean", "masked_std", "batch_statistics", "cor35_ratio", "tabular_entropy_change"]

AXES = (-2, -1)  #: the ``(B, T)`` axes every statistic reduces over


def _count(xp, mask: Array, like: Array) -> Array:
    return xp.sum(xp.astype(mask, like.dtype), axis=AXES)


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean of ``x (..., B, T)`` over ``mask`` per leading index, shape ``(...)``; **0** on an empty mask.

    >>> import numpy as np
    >>> x = np.array([[1.0, 3.0]])
    >>> float(masked_mean(x, np.array([[True, False]]))), float(masked_mean(x, np.zeros((1, 2), bool)))
    (1.0, 0.0)
    """
    xp = namespace(x)
    n = _count(xp, mask, x)
    total = xp.sum(xp.where(mask, x, xp.zeros_like(x)), axis=AXES)
    return total / xp.maximum(n, xp.ones_like(n))


def masked_std(x: Array, mask: Array, mean: Array | None = None) -> Array:
    """Population standard deviation of ``x`` over ``mask`` per leading index; **0** on an empty mask."""
    xp = namespace(x)
    mean = masked_mean(x, mask) if mean is None else mean
    d = xp.where(mask, x - mean[..., None, None], xp.zeros_like(x))
    return xp.sqrt(masked_mean(d * d, mask))


def batch_statistics(
    *,
    entropy: Array,
    logp: Array,
    s_star: Array,
    baseline: Array,
    adv: Array,
    valid: Array,
    adv_eff: Array | None = None,
) -> dict[str, Array]:
    r"""The entropy statistics of one batch, each of shape ``(...)``, keyed as the trainer logs them.

    Args:
        entropy, logp, s_star, baseline: ``(..., B, T)`` per sampled token: ``H`` of its next-token
            distribution, ``log p`` of the token, ``S*`` (E1) and ``E_p[S]`` (E7), all under the
            behaviour policy.
        adv: ``(..., B, T)`` advantage of each token (its sequence's); its sign splits ``entropy/pos``
            and ``entropy/neg``.
        valid: ``(..., B, T)`` bool, the response tokens.
        adv_eff: the advantages the update uses (after a rule); its sign and the deviation's pick the
            quadrant (``theory.quadrant``); default ``adv``.

    Returns:
        ``entropy``, ``entropy/pos``, ``entropy/neg``, ``adv/pos_frac`` and ``adv/neg_frac`` (the
        fractions of valid tokens with ``A > 0`` / ``A < 0``: 0 marks an empty ``entropy/pos|neg``),
        ``logp/mean``, ``s_star/mean``, ``s_star/std``, ``baseline/mean``, ``deviation/mean`` (Cor 3.4:
        about 0 on-policy), ``theory/cor35_ratio`` (Cor 3.5) and ``quad/<q>_frac`` for the four
        quadrants of :data:`theory.QUADRANTS` (fractions of the valid tokens), and ``nonfinite_frac``:
        the fraction of the valid tokens with a NaN or infinite input (``entropy``, ``logp``, ``s_star``,
        ``baseline``, ``adv`` or ``adv_eff``), which every other statistic leaves out (module docstring).
        Means over an empty set are 0.

    Example:
        >>> import numpy as np
        >>> ones = np.ones((1, 2))
        >>> st = batch_statistics(entropy=ones, logp=-ones, s_star=0.5 * ones, baseline=0.25 * ones,
        ...                       adv=np.array([[1.0, -1.0]]), valid=np.ones((1, 2), bool))
        >>> float(st["deviation/mean"]), float(st["theory/cor35_ratio"]), float(st["quad/pos_high_frac"])
        (0.25, 2.0, 0.5)
    """
    xp = namespace(entropy)
    fields = {"entropy": entropy, "logp": logp, "s_star": s_star, "baseline": baseline, "adv": adv,
              "adv_eff": adv_eff}  # fmt: skip
    finite, f = exclude_nonfinite(xp, fields)
    entropy, logp, s_star, baseline, adv = (f[k] for k in ("entropy", "logp", "s_star", "baseline", "adv"))
    adv_eff = f["adv_eff"]
    all_valid, valid = valid, valid & finite
    dev = s_star - baseline
    s_mean = masked_mean(s_star, valid)
    dev_mean = masked_mean(dev, valid)
    pos, neg = valid & (adv > 0), valid & (adv < 0)
    out = {
        "entropy": masked_mean(entropy, valid),
        "entropy/pos": masked_mean(entropy, pos),
        "entropy/neg": masked_mean(entropy, neg),
        "adv/pos_frac": masked_mean(xp.astype(pos, entropy.dtype), valid),
        "adv/neg_frac": masked_mean(xp.astype(neg, entropy.dtype), valid),
        "logp/mean": masked_mean(logp, valid),
        "s_star/mean": s_mean,
        "s_star/std": masked_std(s_star, valid, s_mean),
        "baseline/mean": masked_mean(baseline, valid),
        "deviation/mean": dev_mean,
        "theory/cor35_ratio": cor35_ratio(s_mean, dev_mean),
    }
    quad = quadrant(adv if adv_eff is None else adv_eff, dev)
    for q, name in enumerate(QUADRANTS):
        out[f"quad/{name}_frac"] = masked_mean(xp.astype(quad == q, entropy.dtype), valid)
    out["nonfinite_frac"] = masked_mean(xp.astype(~finite, entropy.dtype), all_valid)
    return out


def cor35_ratio(s_mean: Array, dev_mean: Array) -> Array:
    """``|mean S*| / |mean (S* - E_p[S])|`` (Corollary 3.5): ``inf`` when the deviation's mean is 0 and
    the discriminator's is not, 0 when both are 0."""
    xp = namespace(s_mean)
    num, den = xp.abs(s_mean), xp.abs(dev_mean)
    zero = den == 0
    ratio = num / xp.where(zero, xp.ones_like(den), den)
    inf = xp.full_like(ratio, float("inf"))
    return xp.where(zero, xp.where(num == 0, xp.zeros_like(ratio), inf), ratio)


def tabular_entropy_change(
    alpha: Array, deviation: Array, adv: Array, valid: Array, *, per: Array | float | None = None
) -> tuple[Array, dict[str, Array]]:
    r"""The tabular first-order entropy change ``sum_t -alpha_t (S*_t - E_p[S]_t) / per`` (E6 over tokens).

    Each token's own term of (E6), with ``alpha_t`` its effective logit step size (E5,
    :func:`theory.effective_step_size`): exactly the first-order change of a tabular SGD step with every
    token at its own state, and a sign prediction otherwise (shared parameters, Adam).

    Args:
        alpha: ``(..., B, T)`` step sizes; deviation: ``S* - E_p[S]``; adv: the advantages that pick the
            quadrants; valid: the tokens that count.
        per: the denominator (default: the number of valid tokens, at least 1; the toy passes its number
            of states).

    Returns:
        ``(total, parts)``: the total ``(...)`` and ``parts[q]``, the share of the tokens of quadrant ``q``
        (tokens with ``A = 0`` or a zero deviation belong to no quadrant).
    """
    xp = namespace(alpha)
    contrib = xp.where(valid, -alpha * deviation, xp.zeros_like(alpha))
    if per is None:
        n = _count(xp, valid, alpha)
        per = xp.maximum(n, xp.ones_like(n))
    quad = quadrant(adv, deviation)
    parts = {
        name: xp.sum(xp.where(quad == q, contrib, xp.zeros_like(contrib)), axis=AXES) / per
        for q, name in enumerate(QUADRANTS)
    }
    return xp.sum(contrib, axis=AXES) / per, parts
