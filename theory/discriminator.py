"""The entropy discriminator ``S``, its sampled-token value ``S*``, and the GRPO baseline ``E_p[S]``.

Source: arXiv 2602.03392 (Wang et al., 2026), §3.1–3.2: the discriminator (E2), its sign condition
(Thm 3.2), the dynamic baseline ``E_p[S]`` of Theorem 3.3 (E7) and the quadrant table of §4.2 in
``docs/equations.md``.

Every function accepts NumPy or torch arrays (any array-API array) and returns the same namespace.
"""

from __future__ import annotations

import array_api_compat

from ._xp import (
    Array,
    as_float,
    broadcast_shape,
    check_logits,
    finite_logp,
    log_softmax_parts,
    namespace,
)
from .rowstats import row_statistics

__all__ = [
    "discriminator",
    "s_star",
    "vocab_baseline",
    "deviation",
    "sign_threshold",
    "quadrant",
    "entropy_change_sign",
    "QUADRANTS",
    "QUADRANT_DH_SIGN",
]

#: Names of the codes returned by :func:`quadrant`, in code order 0..3 (§4.2 quadrant table).
#: ``pos``/``neg`` is the sign of the advantage, ``high``/``low`` the sign of ``S* - E_p[S]``.
QUADRANTS = ("pos_high", "pos_low", "neg_high", "neg_low")

#: The sign of the first-order entropy change (E6) that the tokens of each quadrant produce when they
#: alone drive an update, ``-sign(A) * sign(S* - E_p[S])`` (Theorem 3.3, the §4.2 quadrant table):
#: reinforcing a sampled token that is likelier than average lowers the entropy, and so on.
QUADRANT_DH_SIGN = {"pos_high": -1, "pos_low": 1, "neg_high": 1, "neg_low": -1}


def _stats(logits: Array):
    """``(xp, logp, p, finite log p, H)`` for ``(..., V)`` logits; shared by the functions below."""
    xp = namespace(logits)
    check_logits(logits)
    z = as_float(xp, logits, "logits")
    logp = log_softmax_parts(xp, z)  # (..., V)
    p = xp.exp(logp)  # (..., V)
    lp = finite_logp(xp, logp)  # (..., V), 0 where p == 0
    H = -xp.sum(p * lp, axis=-1, keepdims=True)  # (..., 1)
    return xp, logp, p, lp, H


def discriminator(logits: Array) -> Array:
    r"""Entropy discriminator ``S_i = p_i (H + log p_i)`` for every vocabulary item (E2).

    .. math:: S_i = p_i\,\bigl(H(p) + \log p_i\bigr)

    ``S`` is minus the gradient of the entropy in logit space, ``dH/dz_i = -S_i`` (equations §2.5),
    so raising logit ``i`` by ``eps`` changes the entropy by ``-eps S_i`` to first order (E3).
    ``S_i > 0`` exactly when ``p_i > exp(-H)``; ``sum_i S_i = 0``; ``S_i >= -exp(-H-1)``.
    Masked (``-inf``) logits get ``S_i = 0``.

    Args:
        logits: ``(..., V)`` logits, e.g. ``(B, T, V)``.

    Returns:
        ``(..., V)`` discriminator values.

    Example:
        >>> import numpy as np
        >>> from theory import discriminator
        >>> S = discriminator(np.log(np.array([0.7, 0.2, 0.1])))
        >>> np.round(S, 4), abs(float(S.sum())) < 1e-15
        (array([ 0.3116, -0.1615, -0.1501]), True)

    Reference: arXiv 2602.03392, Theorem 3.2 ("indicator" ``S = p * (H + LP)`` in the released code).
    """
    xp, logp, p, lp, H = _stats(logits)
    return p * (H + lp)


def s_star(logp: Array, entropy: Array) -> Array:
    r"""Discriminator of a sampled token from its log-probability and its position's entropy.

    .. math:: S_* = p_k\,(H + \log p_k) = e^{\log p_k}\,(H + \log p_k)

    (E2) evaluated at the sampled token ``k``, elementwise, with no vocabulary axis: this is what a
    trainer computes from the per-token log-prob and entropy it already has. ``logp = -inf`` gives 0.

    Args:
        logp: ``(...)`` log-probability of the sampled token, e.g. ``(B, T)``.
        entropy: ``(...)`` entropy of the same positions, broadcastable against ``logp``.

    Returns:
        ``(...)`` values of ``S*``, in ``[-exp(-H-1), H]``.

    Example:
        >>> import numpy as np
        >>> from theory import s_star
        >>> np.round(s_star(np.log(np.array([0.5, 0.1])), np.array([1.0, 1.0])), 4)
        array([ 0.1534, -0.1303])
    """
    if isinstance(entropy, int | float):  # a python scalar entropy: one value for every token
        xp = namespace(logp)
        logp = as_float(xp, logp, "logp")
        entropy = xp.asarray(float(entropy), dtype=logp.dtype, device=array_api_compat.device(logp))
    else:
        xp = namespace(logp, entropy)
    logp = as_float(xp, logp, "logp")
    entropy = as_float(xp, entropy, "entropy")
    broadcast_shape(("logp", logp), ("entropy", entropy))
    if logp.dtype != entropy.dtype:
        dtype = xp.result_type(logp, entropy)
        logp, entropy = xp.astype(logp, dtype), xp.astype(entropy, dtype)
    return xp.exp(logp) * (entropy + finite_logp(xp, logp))


def vocab_baseline(logits: Array) -> Array:
    r"""The GRPO dynamic baseline ``E_{i~p}[S_i] = sum_i p_i^2 (H + log p_i)`` (E7).

    .. math:: \mathbb E_{i\sim p}[S_i] = H\sum_i p_i^2 + \sum_i p_i^2 \log p_i
              = \operatorname{Cov}_{a\sim p}(p_a, \log p_a) \ \ge 0

    Theorem 3.3 says a GRPO step on sampled token ``k`` moves the entropy by
    ``-alpha (S_k - E_p[S])`` (E6); Clip_V thresholds this deviation. Equal to 0 exactly for a
    distribution that is uniform on its support. (Trinity-RFT's Clip_V calls it ``nec``/``N``.)

    Args:
        logits: ``(..., V)`` logits.

    Returns:
        ``(...)`` baseline values, ``>= 0`` up to rounding.

    Example:
        >>> import numpy as np
        >>> from theory import vocab_baseline
        >>> round(float(vocab_baseline(np.log(np.array([0.7, 0.2, 0.1])))), 4)
        0.1708
    """
    return row_statistics(logits, baseline=True).baseline


def deviation(logits: Array, k: Array) -> Array:
    r"""Deviation of the sampled token's discriminator from the baseline, ``D = S_k - E_p[S]``.

    .. math:: D = S_k - \mathbb E_{i\sim p}[S_i]

    The driver of the GRPO entropy change (E6): ``dH ~= -alpha D``. Clip_V's ``D_t``; Trinity-RFT's
    ``xD`` is ``-D``. Its on-policy mean is exactly 0 (Corollary 3.4, E8).

    Args:
        logits: ``(..., V)`` logits.
        k: ``(...)`` integer index of the sampled token at each position, in ``[0, V)``
            (validated; one host sync on an accelerator).

    Returns:
        ``(...)`` deviations.

    Example:
        >>> import numpy as np
        >>> from theory import deviation
        >>> z = np.log(np.array([0.7, 0.2, 0.1]))
        >>> np.round(deviation(np.stack([z, z]), np.array([0, 2])), 4)
        array([ 0.1408, -0.3209])
    """
    return row_statistics(logits, k, baseline=True).deviation


def sign_threshold(logits: Array) -> Array:
    r"""The probability ``exp(-H)`` at which a token's discriminator changes sign (Thm 3.2, §2.4).

    .. math:: \operatorname{sign}(S_k) = \operatorname{sign}(p_k - e^{-H})

    Rewarding a single token raises the entropy iff ``p_k < exp(-H)`` (its surprisal exceeds the
    entropy).

    Args:
        logits: ``(..., V)`` logits.

    Returns:
        ``(...)`` thresholds in ``[1/V, 1]``.

    Example:
        >>> import numpy as np
        >>> from theory import sign_threshold
        >>> round(float(sign_threshold(np.zeros(4))), 6)
        0.25
    """
    H = row_statistics(logits).entropy
    return namespace(H).exp(-H)


def _sign(xp, x: Array) -> Array:
    """``sign`` that maps NaN to 0 (an undefined statistic predicts no direction)."""
    s = xp.sign(x)
    return xp.where(xp.isnan(s), xp.zeros_like(s), s)


def quadrant(adv: Array, dev: Array) -> Array:
    r"""Classify tokens by ``sign(A)`` x ``sign(S* - E_p[S])`` (the quadrant table of §4.2).

    ========  ==============  ==============
    code      ``A``           ``S* - E_p[S]``  -> first-order ``dH``
    ========  ==============  ==============
    0         ``> 0``         ``> 0``          decrease (``pos_high``: the collapse driver)
    1         ``> 0``         ``< 0``          increase (``pos_low``)
    2         ``< 0``         ``> 0``          increase (``neg_high``)
    3         ``< 0``         ``< 0``          decrease (``neg_low``)
    -1        ``= 0`` or NaN  or ``= 0``/NaN   no first-order effect
    ========  ==============  ==============

    :data:`QUADRANTS` holds the names of codes 0..3.

    Args:
        adv: ``(...)`` advantages (only the sign is used).
        dev: ``(...)`` deviations ``S* - E_p[S]`` (from :func:`deviation`, or ``s_star - baseline``),
            broadcastable against ``adv``.

    Returns:
        ``(...)`` int64 codes in ``{-1, 0, 1, 2, 3}``.

    Example:
        >>> import numpy as np
        >>> from theory import quadrant
        >>> quadrant(np.array([1.0, 1.0, -1.0, -1.0, 0.0]), np.array([0.3, -0.1, 0.2, -0.2, 0.5]))
        array([ 0,  1,  2,  3, -1])
    """
    xp = namespace(adv, dev)
    broadcast_shape(("adv", adv), ("dev", dev))
    sa = _sign(xp, as_float(xp, adv, "adv"))
    sd = _sign(xp, as_float(xp, dev, "dev"))
    code = 2 * xp.astype(sa < 0, xp.int64) + xp.astype(sd < 0, xp.int64)  # (...) in 0..3
    undefined = (sa == 0) | (sd == 0)
    return xp.where(undefined, xp.full_like(code, -1), code)


def entropy_change_sign(adv: Array, dev: Array) -> Array:
    r"""Sign of the first-order GRPO entropy change, ``-sign(A) sign(S* - E_p[S])`` (E6).

    Because ``alpha = eta r A`` with ``eta, r > 0``, Theorem 3.3 gives
    ``sign(dH) = -sign(A) sign(D)``. Zero where either factor is 0 or NaN.

    Args:
        adv: ``(...)`` advantages.
        dev: ``(...)`` deviations ``S* - E_p[S]``, broadcastable against ``adv``.

    Returns:
        ``(...)`` floats in ``{-1, 0, 1}``.

    Example:
        >>> import numpy as np
        >>> from theory import entropy_change_sign
        >>> entropy_change_sign(np.array([1.0, 1.0, -1.0]), np.array([0.3, -0.1, 0.2]))
        array([-1.,  1.,  1.])
    """
    xp = namespace(adv, dev)
    broadcast_shape(("adv", adv), ("dev", dev))
    return -_sign(xp, as_float(xp, adv, "adv")) * _sign(xp, as_float(xp, dev, "dev"))
