"""Token-selection rules: Clip_B, Clip_V (arXiv 2602.03392), Clip-Cov, KL-Cov (arXiv 2505.22617),
and the high-entropy token mask (the "80/20" rule, arXiv 2506.01939).

Each rule is a frozen dataclass; see :mod:`theory.rules.base` for the interface and
``docs/rules.md`` for formulas, defaults, sources and known differences from each reference code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..discriminator import s_star
from ._stats import count, masked_mean, masked_std, metric, quantile, safe_frac, topk_mask
from .base import Rule, RuleOutput, TokenBatch, register

__all__ = ["ClipB", "ClipV", "ClipCov", "KLCov", "HighEntropyMask"]


def _check_positive(name: str, value: float, *, allow_inf: bool = True) -> None:
    if not (value > 0) or (not allow_inf and math.isinf(value)):
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_fraction(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} is a fraction and must lie in [0, 1], got {value!r} (not a percent)")


def _polarity_metrics(xp, drop, batch: TokenBatch) -> dict:
    """Fractions of valid / positive-advantage / negative-advantage tokens dropped (0-d arrays)."""
    like = batch.logp
    valid, adv = batch.valid, batch.adv
    pos, neg = valid & (adv > 0), valid & (adv < 0)
    frac = lambda sel, of: metric(xp, safe_frac(xp, count(xp, sel, like), count(xp, of, like)))  # noqa: E731
    return {
        "clip_frac": frac(drop, valid),
        "clip_frac_pos": frac(drop & pos, pos),
        "clip_frac_neg": frac(drop & neg, neg),
    }


def _logp(batch: TokenBatch, source: str):
    return batch.behaviour_logp() if source == "old" else batch.logp


def _below(xp, x, mu: float, std):
    """``x < -mu * std``; all False for ``mu = inf`` (no ``inf * 0`` when ``std`` is 0)."""
    if math.isinf(mu):
        return xp.zeros_like(x, dtype=xp.bool)
    return x < -mu * std


def _above(xp, x, mu: float, std):
    """``x > mu * std``; all False for ``mu = inf``."""
    if math.isinf(mu):
        return xp.zeros_like(x, dtype=xp.bool)
    return x > mu * std


@register
@dataclass(frozen=True)
class ClipB(Rule):
    r"""Clip_B: drop tokens whose S* is a batch outlier (arXiv 2602.03392, E10).

    With ``S*_t = p_t (H_t + log p_t)`` (E2) and its mean ``S̄`` and population std ``σ`` over the valid
    tokens of the batch, ``z_t = S*_t - S̄``:

    * ``variant="reference"`` (Trinity-RFT ``ClipBAdvantageFn``, the released code): drop a token iff
      ``A_t < 0`` and ``z_t < -μσ``; positive- and zero-advantage tokens are always kept.
    * ``variant="paper"``: keep iff ``-μσ <= z_t <= μ_high σ`` for every valid token, whatever ``A``
      (``μ_high=None`` means ``μ``; ``math.inf`` makes it one-sided).

    If ``σ < min_std`` every valid token is kept. Dropped tokens leave the loss and its normaliser
    (the reference code rewrites ``response_mask``). ``S̄`` stands in for the per-position baseline
    ``E_p[S]`` (justified by Cor 3.5); Clip_V uses the exact baseline.

    Known differences from the reference: it reads the rollout engine's log-probs (``logp_source="old"``
    here, the default) and the trainer's entropies; ``"current"`` uses the trainer's log-probs, which is
    the quantity the paper's theory refers to.
    """

    variant: Literal["reference", "paper"] = "reference"
    mu: float = 2.5
    mu_high: float | None = None
    logp_source: Literal["old", "current"] = "old"
    min_std: float = 1e-12
    name = "clip_b"
    source = "arXiv 2602.03392 §5 (E10); Trinity-RFT ClipBAdvantageFn (mu=2.5)"
    needs = ("entropy",)

    def __post_init__(self):
        _check_discriminator_rule(self)

    def apply(self, batch, *, noise, state):
        xp = batch.xp
        valid, adv = batch.valid, batch.adv
        S = s_star(_logp(batch, self.logp_source), batch.entropy)  # (B, T)
        mean = masked_mean(xp, S, valid)
        std = masked_std(xp, S, valid, mean)
        z = S - mean
        if self.variant == "reference":
            drop = valid & (adv < 0) & _below(xp, z, self.mu, std)
        else:
            hi = self.mu if self.mu_high is None else self.mu_high
            drop = valid & (_below(xp, z, self.mu, std) | _above(xp, z, hi, std))
        drop = drop & (std >= self.min_std)
        metrics = _polarity_metrics(xp, drop, batch)
        metrics.update({"s_mean": metric(xp, mean), "s_std": metric(xp, std)})
        return RuleOutput(keep=valid & ~drop, adv=adv, metrics=metrics)


def _check_discriminator_rule(rule) -> None:
    """Shared validation of Clip_B and Clip_V: variant, thresholds, log-prob source."""
    if rule.variant not in ("reference", "paper"):
        raise ValueError(f"variant must be 'reference' or 'paper', got {rule.variant!r}")
    _check_positive("mu", rule.mu)
    if rule.mu_high is not None:
        if rule.variant == "reference":
            raise ValueError("mu_high applies to variant='paper' only (the reference is one-sided)")
        _check_positive("mu_high", rule.mu_high)
    if rule.logp_source not in ("old", "current"):
        raise ValueError(f"logp_source must be 'old' or 'current', got {rule.logp_source!r}")


@register
@dataclass(frozen=True)
class ClipV(Rule):
    r"""Clip_V: drop tokens whose deviation ``D = S* - E_p[S]`` is an outlier (arXiv 2602.03392).

    ``D_t`` is the exact driver of the GRPO entropy change (E6): ``ΔH_t ≈ -α_t D_t``. ``σ`` is the
    population std of ``D`` over valid tokens.

    * ``variant="reference"`` (Trinity-RFT ``ClipVAdvantageFn``): with ``xD = -D``, drop a token iff
      ``A_t <= 0`` and ``xD_t > μσ`` (positive-advantage tokens are kept; zero-advantage ones are
      tested too). Cap: if more than ``K = max(floor(max_frac · n_valid), 1)`` *negative*-advantage
      tokens violate, only the ``K`` with the largest ``xD`` are dropped (zero-advantage violators stay
      dropped, as in the code).
    * ``variant="paper"``: keep iff ``-μσ <= D_t - c <= μ_high σ`` for every valid token, with
      ``c = mean(D)`` if ``center`` else 0 (Cor 3.5 says the mean is ≈ 0); no cap.

    If ``σ < min_std`` every valid token is kept. Needs ``TokenBatch.baseline`` (E7, from
    ``theory.vocab_baseline``, one full-vocabulary reduction per position).

    Known differences from the reference: the reference's ``__init__`` default is ``mu=2.0`` while its
    ``default_args`` and example config use 8.5 (used here); its threshold is not mean-centred.
    """

    variant: Literal["reference", "paper"] = "reference"
    mu: float = 8.5
    mu_high: float | None = None
    max_frac: float = 1e-4
    center: bool = False
    logp_source: Literal["old", "current"] = "old"
    min_std: float = 1e-12
    name = "clip_v"
    source = "arXiv 2602.03392 §5; Trinity-RFT ClipVAdvantageFn (mu=8.5, max_frac=1e-4)"
    needs = ("entropy", "baseline")

    def __post_init__(self):
        _check_discriminator_rule(self)
        _check_fraction("max_frac", self.max_frac)

    def apply(self, batch, *, noise, state):
        xp = batch.xp
        valid, adv = batch.valid, batch.adv
        S = s_star(_logp(batch, self.logp_source), batch.entropy)  # (B, T)
        D = S - batch.baseline  # (B, T)
        mean = masked_mean(xp, D, valid)
        std = masked_std(xp, D, valid, mean)
        if self.variant == "reference":
            xD = -D
            violate = valid & (adv <= 0) & _above(xp, xD, self.mu, std)
            neg = violate & (adv < 0)
            k = xp.astype(xp.floor(self.max_frac * count(xp, valid, D)), xp.int64)
            k = xp.maximum(k, xp.ones_like(k))
            capped = topk_mask(xp, xD, neg, k, _kmax(self.max_frac, D))  # == neg when #neg <= k
            drop = (violate & ~neg) | capped
        else:
            hi = self.mu if self.mu_high is None else self.mu_high
            c = mean if self.center else xp.zeros_like(mean)
            drop = valid & (_below(xp, D - c, self.mu, std) | _above(xp, D - c, hi, std))
        drop = drop & (std >= self.min_std)
        metrics = _polarity_metrics(xp, drop, batch)
        metrics.update({"d_mean": metric(xp, mean), "d_std": metric(xp, std)})
        return RuleOutput(keep=valid & ~drop, adv=adv, metrics=metrics)


def _centre(xp, x, valid):
    """``x - mean_valid(x)``, with differences within rounding of the mean snapped to exactly 0.

    Without the snap, equal values (e.g. one advantage shared by every valid token) centre to +-1e-17
    depending on the backend's summation order, and that sign would decide a top-k choice.
    """
    d = x - masked_mean(xp, x, valid)
    if x.shape[-1] * x.shape[-2] == 0:
        return d
    scale = xp.max(xp.where(valid, xp.abs(x), xp.zeros_like(x)), axis=(-2, -1), keepdims=True)
    tol = 16 * xp.finfo(x.dtype).eps * scale
    return xp.where(xp.abs(d) <= tol, xp.zeros_like(d), d)


def _centred_cov(xp, batch: TokenBatch):
    """Per-token ``(A - Ā)(log p - mean log p)`` with both means over valid tokens (verl's Clip/KL-Cov)."""
    valid, adv, logp = batch.valid, batch.adv, batch.logp
    cov = _centre(xp, adv, valid) * _centre(xp, logp, valid)
    return xp.where(valid, cov, xp.zeros_like(cov))


def _kmax(frac: float, like) -> int:
    """A python upper bound of ``max(floor(frac * n_valid), 1)`` from the batch shape alone.

    One more than the float64 value, so a float32 ``floor`` that rounds up still fits.
    """
    return max(int(math.floor(frac * like.shape[-2] * like.shape[-1])), 1) + 1


def _k_of(xp, frac: float, valid, like):
    k = xp.astype(xp.floor(frac * count(xp, valid, like)), xp.int64)
    return xp.maximum(k, xp.ones_like(k))


@register
@dataclass(frozen=True)
class ClipCov(Rule):
    r"""Clip-Cov: detach the gradient of a random few high-covariance tokens (Cui et al., arXiv 2505.22617).

    ``cov_t = (A_t - Ā)(log p_t - mean log p)`` over valid tokens (the per-token term of
    ``Cov(log π, A)``, which drives the entropy change, E4). Candidates: valid tokens with
    ``lb < cov_t < ub`` that the PPO ratio clip (``clip_low``/``clip_high``) has not already clipped.
    ``k = max(floor(frac · n_valid), 1)`` candidates are chosen uniformly at random — the ``k`` largest
    values of the caller's ``noise`` (uniform, same shape) — and get ``weight = 0``: their gradient is
    detached but they stay in the loss normaliser, as in verl's ``corr`` multiplier.

    Defaults are verl's (``clip_cov_ratio=0.0002``, ``lb=1``, ``ub=5``). The bounds are absolute, so
    they assume group-standardised advantages. Known differences: verl computes the statistics per
    micro-batch (here: over whatever batch the caller passes) and draws its subset with an unseeded
    ``randperm``; the recipe runs with the PPO clip widened to [0, 2] (``clip_low=clip_high=1``).
    """

    frac: float = 2e-4
    lb: float = 1.0
    ub: float = 5.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    name = "clip_cov"
    source = "arXiv 2505.22617; verl compute_policy_loss_clip_cov (ratio 2e-4, band (1, 5))"

    def __post_init__(self):
        _check_fraction("frac", self.frac)
        if not self.lb < self.ub:
            raise ValueError(f"lb must be < ub, got lb={self.lb!r}, ub={self.ub!r}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(f"clip_low/clip_high must be >= 0, got {self.clip_low!r}/{self.clip_high!r}")

    def apply(self, batch, *, noise, state):
        if noise is None:
            raise ValueError("ClipCov needs noise: uniform (B, T) values from the caller's generator")
        if tuple(noise.shape) != tuple(batch.logp.shape):
            raise ValueError(f"noise must have shape {tuple(batch.logp.shape)}, got {tuple(noise.shape)}")
        xp = batch.xp
        valid, adv, logp = batch.valid, batch.adv, batch.logp
        ratio = xp.exp(logp - batch.behaviour_logp())
        clipped_ratio = xp.clip(ratio, 1.0 - self.clip_low, 1.0 + self.clip_high)
        ratio_clipped = valid & (-adv * clipped_ratio > -adv * ratio)  # the clipped arm is active
        cov = _centred_cov(xp, batch)
        cand = valid & ~ratio_clipped & (cov > self.lb) & (cov < self.ub)
        k = _k_of(xp, self.frac, valid, logp)
        chosen = topk_mask(xp, xp.astype(noise, logp.dtype), cand, k, _kmax(self.frac, logp))
        weight = xp.where(chosen, xp.zeros_like(logp), xp.ones_like(logp))
        n_valid = count(xp, valid, logp)
        metrics = _polarity_metrics(xp, chosen, batch)
        metrics.update(
            {
                "candidate_frac": metric(xp, safe_frac(xp, count(xp, cand, logp), n_valid)),
                "cov_mean": metric(xp, masked_mean(xp, cov, valid)),
            }
        )
        return RuleOutput(keep=valid, adv=adv, weight=weight, metrics=metrics)


@register
@dataclass(frozen=True)
class KLCov(Rule):
    r"""KL-Cov: a ``|log p - log p_old|`` penalty on the top-covariance tokens (Cui et al., arXiv 2505.22617).

    ``cov_t`` as in :class:`ClipCov`; the ``k = max(floor(frac · n_valid), 1)`` valid tokens with the
    largest ``cov_t`` (ties by position) get ``kl_coef = coef``; the backend adds
    ``coef · |log p_t - log p_old,t|`` to their loss.

    ``coef`` defaults to **1.0**: verl's ``PolicyLossConfig`` says 0.1 but its loss function falls back
    to 1.0, and both the original repository and verl's recipes run with 1 — we follow the runs.
    ``frac`` is a fraction (verl's ``kl_cov_ratio``); the original repository's ``k_percent`` is a
    percentage (0.2 there = 0.002 here). verl's KL-Cov applies **no** PPO ratio clip at all; that is the
    trainer's choice, not this rule's. On-policy (``log p == log p_old``) the penalty is identically 0.
    """

    frac: float = 2e-4
    coef: float = 1.0
    name = "kl_cov"
    source = "arXiv 2505.22617; verl compute_policy_loss_kl_cov (ratio 2e-4, coef 1.0 as in the recipes)"

    def __post_init__(self):
        _check_fraction("frac", self.frac)
        if not self.coef >= 0:
            raise ValueError(f"coef must be >= 0, got {self.coef!r}")

    def apply(self, batch, *, noise, state):
        xp = batch.xp
        valid, logp = batch.valid, batch.logp
        cov = _centred_cov(xp, batch)
        chosen = topk_mask(xp, cov, valid, _k_of(xp, self.frac, valid, logp), _kmax(self.frac, logp))
        kl_coef = xp.where(chosen, xp.full_like(logp, self.coef), xp.zeros_like(logp))
        fracs = _polarity_metrics(xp, chosen, batch)
        metrics = {k.replace("clip_frac", "penalised_frac"): v for k, v in fracs.items()}
        metrics["cov_mean"] = metric(xp, masked_mean(xp, cov, valid))
        return RuleOutput(keep=valid, adv=batch.adv, kl_coef=kl_coef, metrics=metrics)


@register
@dataclass(frozen=True)
class HighEntropyMask(Rule):
    r"""Keep only the highest-entropy tokens, the top ``rho`` of valid tokens ("80/20", arXiv 2506.01939).

    ``τ`` = the ``(1 - rho)`` quantile (linear interpolation) of ``H`` over the batch's valid tokens;
    a token is selected iff ``H_t >= τ``. ``rho = 0.2`` is the paper's recommendation; ``rho = 1`` selects
    everything. Same threshold rule as TRL's ``top_entropy_quantile`` (which computes it per micro-batch
    across ranks; here over the batch the caller passes).

    ``in_normaliser=True`` (default, TRL's behaviour): unselected tokens get ``weight = 0`` and stay in
    the loss normaliser (TRL multiplies ``per_token_loss`` by the mask). ``False``: they get
    ``keep = False`` and leave the normaliser too, so a token-mean loss is about ``1/rho`` larger.
    """

    rho: float = 0.2
    in_normaliser: bool = True
    name = "high_entropy_mask"
    source = "arXiv 2506.01939 (top 20% entropy tokens); TRL top_entropy_quantile"
    needs = ("entropy",)

    def __post_init__(self):
        if not (0.0 < self.rho <= 1.0):
            raise ValueError(f"rho is a fraction of tokens and must lie in (0, 1], got {self.rho!r}")

    def apply(self, batch, *, noise, state):
        xp = batch.xp
        valid, H = batch.valid, batch.entropy
        lead = tuple(H.shape[:-2])
        n = H.shape[-2] * H.shape[-1]  # (not -1: a reshape of an empty array cannot infer it)
        flat_H = xp.reshape(H, lead + (n,))
        flat_v = xp.reshape(valid, lead + (n,))
        tau = quantile(xp, flat_H, flat_v, 1.0 - self.rho)  # (...)
        drop = valid & (H < xp.expand_dims(xp.expand_dims(tau, axis=-1), axis=-1))
        metrics = _polarity_metrics(xp, drop, batch)
        metrics["entropy_threshold"] = tau
        if self.in_normaliser:
            weight = xp.where(drop, xp.zeros_like(H), xp.ones_like(H))
            return RuleOutput(keep=valid, adv=batch.adv, weight=weight, metrics=metrics)
        return RuleOutput(keep=valid & ~drop, adv=batch.adv, metrics=metrics)
