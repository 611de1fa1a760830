"""Advantage-shaping rules: perplexity and position shaping (arXiv 2508.02260) and probability-weighted
advantages (arXiv 2505.12929). They reshape ``A`` before it enters the surrogate; all detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import array_api_compat

from ._stats import masked_mean, metric, quantile, relative_position, scalar, sequence_mean
from .base import Rule, RuleOutput, register

__all__ = ["PPLShaping", "PositionBonus", "ProbWeighted"]


@register
@dataclass(frozen=True)
class PPLShaping(Rule):
    r"""Perplexity-based advantage shaping, "GRPO + PPL" (arXiv 2508.02260 §4.1).

    Per response ``i``: ``ℓ_i = -mean_t log p_old(o_{i,t})`` (log-perplexity over its valid tokens).
    Within each prompt group, ``w_i = (ℓ_i - μ_g) / σ_g`` where ``μ_g`` and the population ``σ_g`` are
    taken over the group's responses inside the IQR fence ``[Q1 - fence·IQR, Q3 + fence·IQR]``
    (``robust=True``; all responses if none is inside; ``σ_g = 1`` if ``σ_g < min_std``). Then

    .. math:: \tilde A_{i,t} = A_{i,t} \cdot \mathrm{clip}(1 - \alpha w_i,\ lo,\ hi)

    for ``direction="low"`` (emphasise low-perplexity responses, the paper's method) and
    ``clip(1 + α w_i)`` for ``"high"`` (the ablation). Defaults from the released scripts: ``α = 0.01``,
    clamp ``(0.8, 1.2)``. Known difference: the released code's ``low`` branch computes this weight but
    never applies it (an apparent bug); this rule implements the paper's formula.
    """

    alpha: float = 0.01
    direction: Literal["low", "high"] = "low"
    clamp: tuple[float, float] = (0.8, 1.2)
    robust: bool = True
    fence: float = 1.5
    min_std: float = 1e-6
    name = "ppl_shaping"
    source = "arXiv 2508.02260 §4.1 (alpha=0.01, clamp [0.8, 1.2], group IQR-robust z-score)"
    needs = ("group",)

    def __post_init__(self):
        if self.direction not in ("low", "high"):
            raise ValueError(f"direction must be 'low' or 'high', got {self.direction!r}")
        lo, hi = self.clamp
        if not (0 <= lo <= 1 <= hi):
            raise ValueError(f"clamp must satisfy 0 <= lo <= 1 <= hi, got {self.clamp!r}")

    def apply(self, batch, *, noise, state):
        xp = batch.xp
        valid, adv = batch.valid, batch.adv
        ell, has = sequence_mean(xp, -batch.behaviour_logp(), valid)  # (..., B), (..., B)
        g = batch.group
        same = xp.expand_dims(g, axis=-1) == xp.expand_dims(g, axis=-2)  # (..., B, B): same prompt
        same = same & xp.expand_dims(has, axis=-2)
        vals = xp.broadcast_to(xp.expand_dims(ell, axis=-2), same.shape)  # row i: the values ℓ_j
        inside = same
        if self.robust:
            q1 = xp.expand_dims(quantile(xp, vals, same, 0.25), axis=-1)  # (..., B, 1)
            q3 = xp.expand_dims(quantile(xp, vals, same, 0.75), axis=-1)
            iqr = q3 - q1
            fenced = same & (vals >= q1 - self.fence * iqr) & (vals <= q3 + self.fence * iqr)
            any_in = xp.any(fenced, axis=-1, keepdims=True)
            inside = xp.where(any_in, fenced, same)
        w_in = xp.astype(inside, ell.dtype)
        n_in = xp.maximum(xp.sum(w_in, axis=-1), xp.ones_like(ell))
        mu = xp.sum(w_in * vals, axis=-1) / n_in  # (..., B)
        dev = xp.where(inside, vals - xp.expand_dims(mu, axis=-1), xp.zeros_like(vals))
        sd = xp.sqrt(xp.sum(dev * dev, axis=-1) / n_in)
        sd = xp.where(sd < self.min_std, xp.ones_like(sd), sd)
        w = (ell - mu) / sd  # (B,)
        sign = -1.0 if self.direction == "low" else 1.0
        lo, hi = self.clamp
        factor = xp.clip(1.0 + sign * self.alpha * w, lo, hi)
        factor = xp.where(has, factor, xp.ones_like(factor))  # (..., B)
        new_adv = xp.where(valid, adv * xp.expand_dims(factor, axis=-1), adv)  # invalid tokens unchanged
        clamped = has & ((factor <= lo) | (factor >= hi)) & (lo < hi)
        per_seq = lambda x: xp.squeeze(masked_mean(xp, x, has, axis=-1), axis=-1)  # noqa: E731  (...)
        metrics = {
            "log_ppl_mean": per_seq(ell),
            "w_abs_mean": per_seq(xp.abs(w)),
            "factor_min": _extreme(xp, xp.min, xp.where(has, factor, xp.full_like(factor, hi)), hi),
            "factor_max": _extreme(xp, xp.max, xp.where(has, factor, xp.full_like(factor, lo)), lo),
            "clamped_frac": per_seq(xp.astype(clamped, ell.dtype)),
        }
        return RuleOutput(keep=valid, adv=new_adv, metrics=metrics)


def _extreme(xp, reduce, x, empty: float):
    """``reduce(x, axis=-1)``, or ``empty`` everywhere when the last axis (the ``B`` sequences) is empty."""
    if x.shape[-1] == 0:
        return xp.full(tuple(x.shape[:-1]), empty, dtype=x.dtype, device=array_api_compat.device(x))
    return reduce(x, axis=-1)


def _sigmoid(xp, x):
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@register
@dataclass(frozen=True)
class PositionBonus(Rule):
    r"""Position-based advantage shaping, "GRPO + POSITION" (arXiv 2508.02260 §4.2).

    With the relative position ``r_{i,t} = (t - 1)/|o_i|`` (or ``TokenBatch.position``):

    .. math:: \tilde A = A + \operatorname{sign}(A)\min\bigl(\alpha\sigma(k(r - c)),\ \mathrm{cap}|A|\bigr)

    so later tokens of correct responses are rewarded more and later tokens of wrong ones penalised
    more; ``A = 0`` tokens are unchanged. Defaults from the released code: ``α = 0.1``, ``k = 15``,
    ``c = 0.5``, ``cap = 0.5``. Gate (the paper applies it in the plateau stage only):
    ``"window"`` active for ``start_step <= step < stop_step`` (the code's ``200 < step < 300``),
    ``"stage"`` active while ``TokenBatch.stage == "plateau"``, ``"always"``.
    """

    alpha: float = 0.1
    k: float = 15.0
    center: float = 0.5
    cap: float = 0.5
    gate: Literal["window", "stage", "always"] = "window"
    start_step: int = 201
    stop_step: int | None = 300
    name = "position_bonus"
    source = "arXiv 2508.02260 §4.2 (alpha=0.1, k=15, cap=0.5; plateau stage / steps 201-299)"

    def __post_init__(self):
        if self.gate not in ("window", "stage", "always"):
            raise ValueError(f"gate must be 'window', 'stage' or 'always', got {self.gate!r}")
        if self.alpha < 0 or self.cap < 0:
            raise ValueError(f"alpha and cap must be >= 0, got alpha={self.alpha!r}, cap={self.cap!r}")

    def active(self, step: int, stage: str | None) -> bool:
        """Whether the bonus applies at ``step`` / ``stage`` (python values: no host sync)."""
        if self.gate == "always":
            return True
        if self.gate == "stage":
            return stage == "plateau"
        return step >= self.start_step and (self.stop_step is None or step < self.stop_step)

    def apply(self, batch, *, noise, state):
        xp = batch.xp
        valid, adv = batch.valid, batch.adv
        on = self.active(batch.step, batch.stage)
        if not on:
            zero = scalar(xp, adv, 0.0)
            return RuleOutput(keep=valid, adv=adv, metrics={"active": zero, "bonus_mean": zero})
        r = batch.position if batch.position is not None else relative_position(xp, valid, adv)
        s = _sigmoid(xp, self.k * (r - self.center))
        bonus = xp.minimum(self.alpha * s, self.cap * xp.abs(adv))
        bonus = xp.where(valid & (adv != 0), bonus, xp.zeros_like(bonus))
        new_adv = adv + xp.sign(adv) * bonus
        metrics = {"active": scalar(xp, adv, 1.0), "bonus_mean": metric(xp, masked_mean(xp, bonus, valid))}
        return RuleOutput(keep=valid, adv=new_adv, metrics=metrics)


@register
@dataclass(frozen=True)
class ProbWeighted(Rule):
    r"""Probability-weighted advantages, "Advantage Reweighting" (arXiv 2505.12929).

    .. math:: \tilde A_t = A_t\,\bigl(\alpha\, p_t + 1 - \alpha\bigr), \qquad p_t = e^{\log p_t}

    Low-probability tokens, whose gradients dominate otherwise, are damped. ``α = 0.2`` as in the
    authors' released scripts (``reweight_k=0.2``, ``reweight_tau=0.8``); ``p`` from the behaviour
    policy (``prob_source="old"``) or the current one. In entropy terms (arXiv 2602.03392 §4.2):
    damping low-probability positive tokens removes entropy-raising updates, so this favours collapse.
    """

    alpha: float = 0.2
    prob_source: Literal["old", "current"] = "old"
    name = "prob_weighted"
    source = "arXiv 2505.12929 Advantage Reweighting (alpha=0.2)"

    def __post_init__(self):
        if not (0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha!r}")
        if self.prob_source not in ("old", "current"):
            raise ValueError(f"prob_source must be 'old' or 'current', got {self.prob_source!r}")

    def apply(self, batch, *, noise, state):
        xp = batch.xp
        lp = batch.behaviour_logp() if self.prob_source == "old" else batch.logp
        factor = self.alpha * xp.exp(lp) + (1.0 - self.alpha)
        new_adv = xp.where(batch.valid, batch.adv * factor, batch.adv)
        metrics = {"factor_mean": metric(xp, masked_mean(xp, factor, batch.valid))}
        return RuleOutput(keep=batch.valid, adv=new_adv, metrics=metrics)
