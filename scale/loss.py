r"""The clipped GRPO surrogate loss of the torch trainer — the one place a rule's output meets the loss.

Per token ``t`` of a response (all tensors ``(B, T)``), with ``r_t = exp(log p_t − log p_old,t)`` and the
advantage ``A_t`` (the rule's, if a :class:`theory.rules.RuleOutput` is given):

.. math::
    \ell^{\rm clip}_t = \max\bigl(-A_t r_t,\;
                                  -A_t\,\mathrm{clip}(r_t, 1-\epsilon_{\rm low}, 1+\epsilon_{\rm high})\bigr),
    \qquad
    \ell^{\rm pg}_t = \begin{cases} \min(\ell^{\rm clip}_t,\; -A_t c) & A_t < 0 \text{ (dual clip)}\\
                                   \ell^{\rm clip}_t & \text{otherwise}\end{cases}

.. math::
    \ell_t = w_t\,\ell^{\rm pg}_t + c^{KL}_t\,|\log p_t - \log p_{{\rm old},t}|
              - c^{H}_t H_t + \beta\,k_3(t), \qquad
    k_3(t) = e^{\log p_{{\rm ref},t} - \log p_t} - (\log p_{{\rm ref},t} - \log p_t) - 1

and the loss aggregates ``ℓ_t`` over the kept tokens ``K = mask ∧ keep``:

* ``"token_mean"`` (DAPO; TRL's default ``"dapo"``, verl's ``token-mean``): ``Σ_{t∈K} ℓ_t / |K|``;
* ``"seq_mean"`` (the original GRPO): ``(1/B) Σ_i (Σ_{t∈K_i} ℓ_t / |K_i|)``, each sequence's mean over
  its own kept tokens (``|K_i|`` clamped to 1), then the mean over the ``B`` sequences;
* ``"constant"`` (Dr. GRPO): ``Σ_{t∈K} ℓ_t / (B · L)`` with a fixed length ``L`` (``max_length``, by
  default the padded ``T``), so no per-batch length enters the gradient.

Sources, in short: the clipped surrogate is PPO's; ``ε_high > ε_low`` is DAPO's clip-higher (0.28);
the dual clip (a floor ``−A c`` on the loss of negative-advantage tokens, so a huge ratio cannot blow
up a bad token's gradient; ``c = 3``) follows verl's ``compute_policy_loss_vanilla``; ``k_3`` is
Schulman's low-variance, always non-negative estimator of ``KL(π ‖ π_ref)`` from samples of ``π``, the
one TRL (``beta``) and verl (``low_var_kl``) add to the loss.

How a :class:`~theory.rules.RuleOutput` is applied — the same semantics as the NumPy backend
(:func:`toy.grpo.step`) and ``docs/rules.md``:

* ``keep``: a removed token leaves the loss **and** the normaliser (``|K|`` and ``|K_i|`` count kept
  tokens only) and gets exactly zero gradient;
* ``adv`` replaces the advantages;
* ``weight`` multiplies the surrogate term only (0 = gradient detached, token still counted);
* ``kl_coef`` adds ``c |log p − log p_old|`` (KL-Cov), ``entropy_coef`` adds ``−c H`` (entropy bonus;
  pass ``entropy`` with gradient, e.g. ``token_stats(..., entropy_grad=True)``);
* the reference-model k3 term, like every other term, is aggregated over ``K``.

Gradient accumulation: with microbatches of whole sequences, pass the **full batch's** normaliser
(:func:`loss_normaliser` on the full batch) to every call; the sum of the microbatch losses is then the
full-batch loss, and so are the gradients. Rules must run on the full batch (their statistics are batch
statistics); :func:`slice_rule_output` cuts their output into microbatches.

Numerics: ``log r`` and ``log p_ref − log p`` are clamped to ``[−20, 20]`` before ``exp`` (as verl does);
masked tokens are replaced by 0 *before* any non-linear operation, so NaN or ``-inf`` there (padding)
can reach neither the loss nor the gradient. No host synchronisation: metrics are detached 0-d tensors.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from theory.rules import RuleOutput

from .config import AGGREGATIONS, LossConfig  # the hyperparameters live with the other sections

__all__ = ["AGGREGATIONS", "LossConfig", "grpo_loss", "loss_normaliser", "slice_rule_output"]

#: bound on ``|log r|`` and ``|log p_ref - log p|`` before ``exp`` (verl's value)
LOG_RATIO_CLAMP = 20.0


def _kept(mask: torch.Tensor, rule_output: RuleOutput | None) -> torch.Tensor:
    return mask if rule_output is None else mask & rule_output.keep


def loss_normaliser(
    mask: torch.Tensor, config: LossConfig | None = None, rule_output: RuleOutput | None = None
) -> torch.Tensor:
    """The denominator of the loss for the batch ``mask (B, T)``, as a 0-d float32 tensor.

    ``"token_mean"``: the number of kept tokens ``|mask ∧ keep|`` (at least 1); ``"seq_mean"``: ``B``;
    ``"constant"``: ``B · L`` (``L = max_length`` or ``T``). Compute it on the **full** batch and pass it
    to :func:`grpo_loss` for every microbatch to accumulate gradients exactly. No host synchronisation.
    """
    cfg = LossConfig() if config is None else config
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (B, T), got {tuple(mask.shape)}")
    B, T = mask.shape
    if cfg.aggregation == "token_mean":
        keep = _kept(mask, rule_output)
        return keep.sum(dtype=torch.float32).clamp_min(1.0)
    n = B if cfg.aggregation == "seq_mean" else B * (cfg.max_length or T)
    return torch.full((), float(n), dtype=torch.float32, device=mask.device)


def slice_rule_output(out: RuleOutput, rows) -> RuleOutput:
    """The rows ``rows`` (a slice or index tensor over sequences) of every ``(B, T)`` field of ``out``.

    ``metrics`` and ``state`` belong to the whole batch and are passed through unchanged.
    """
    cut = {
        name: None if getattr(out, name) is None else getattr(out, name)[rows]
        for name in ("keep", "adv", "weight", "kl_coef", "entropy_coef")
    }
    return dataclasses.replace(out, **cut)


def _check(name: str, x, shape: tuple[int, ...]) -> None:
    if x is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} must have the shape of logp {shape}, got {tuple(x.shape)}")


def _check_inputs(logp, old_logp, mask, cfg: LossConfig, ref_logp, entropy, rule_output, normaliser) -> None:
    """:func:`grpo_loss`'s argument checks: shapes, dtypes, and the inputs a configuration needs."""
    if logp.ndim != 2:
        raise ValueError(f"logp must have shape (B, T), got {tuple(logp.shape)}")
    shape = tuple(logp.shape)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    _check("mask", mask, shape)
    _check("old_logp", old_logp, shape)
    _check("ref_logp", ref_logp, shape)
    _check("entropy", entropy, shape)
    if rule_output is not None:
        for name in ("keep", "adv", "weight", "kl_coef", "entropy_coef"):
            _check(f"rule_output.{name}", getattr(rule_output, name), shape)
        if rule_output.entropy_coef is not None and entropy is None:
            raise ValueError("entropy is needed: the rule output has an entropy_coef (pass it with grad)")
    if cfg.kl_beta > 0 and ref_logp is None:
        raise ValueError(f"ref_logp is needed when kl_beta > 0 (kl_beta={cfg.kl_beta})")
    if isinstance(normaliser, int | float) and not (math.isfinite(normaliser) and normaliser > 0):
        raise ValueError(f"normaliser must be a finite number > 0, got {normaliser!r}")


def _metrics(cfg: LossConfig, A, keep, mask, log_r, pg, H, k3, aggregate) -> dict[str, torch.Tensor]:
    """:func:`grpo_loss`'s detached 0-d metrics (token means over the kept tokens; no host sync)."""
    dtype, zero = log_r.dtype, log_r.new_zeros(())
    with torch.no_grad():
        n_keep = keep.to(dtype).sum()
        denom = n_keep.clamp_min(1.0)

        def frac(sel: torch.Tensor) -> torch.Tensor:
            return (sel & keep).to(dtype).sum() / denom

        r = torch.exp(log_r).detach()  # the ratio, as in the loss
        dual = cfg.dual_clip
        metrics = {
            "clip_frac_low": frac((A < 0) & (r < 1.0 - cfg.clip_low)),
            "clip_frac_high": frac((A > 0) & (r > 1.0 + cfg.clip_high)),
            "clip_frac_dual": frac((A < 0) & (r > dual)) if dual is not None else zero.detach(),
            "approx_kl": torch.where(keep, torch.expm1(log_r) - log_r, zero).sum() / denom,
            "ratio_mean": torch.where(keep, r, zero).sum() / denom,
            "policy_loss": aggregate(torch.where(keep, pg.detach(), zero)),
            "kept_frac": n_keep / mask.to(dtype).sum().clamp_min(1.0),
        }
        if H is not None:
            metrics["entropy"] = H.detach().sum() / denom
        if k3 is not None:
            metrics["ref_kl"] = torch.where(keep, k3.detach(), zero).sum() / denom
    return metrics


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    config: LossConfig | None = None,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    rule_output: RuleOutput | None = None,
    normaliser: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Clipped GRPO surrogate (with dual clip, rule output, k3 KL) aggregated over the kept tokens.

    The formula, the aggregation modes and how each :class:`~theory.rules.RuleOutput` field is applied
    are in the module docstring (the per-token term is
    ``w·ℓ^pg(A) + c_KL |log p − log p_old| − c_H H + β k3``).

    Args:
        logp: ``(B, T)`` log-prob of each sampled token under the current policy (with gradient).
        old_logp: ``(B, T)`` log-prob under the behaviour policy (detached here); None = ``logp``
            detached, i.e. on-policy (``r ≡ 1``: the ratio clip and any ``|log r|`` penalty are inert).
        adv: ``(B, T)`` advantages, or ``(B,)`` per sequence; ignored when ``rule_output`` is given
            (its ``adv`` is used).
        mask: ``(B, T)`` bool, True on response tokens (False on prompt and padding).
        config: :class:`LossConfig` (default: ``LossConfig()``).
        ref_logp: ``(B, T)`` reference-policy log-probs; needed when ``config.kl_beta > 0``.
        entropy: ``(B, T)`` entropy ``H`` of each position; needed when the rule gives ``entropy_coef``
            (then with gradient), otherwise only logged.
        rule_output: the output of a :mod:`theory.rules` rule on this batch (or the matching rows of
            the full batch's, :func:`slice_rule_output`).
        normaliser: the loss denominator (:func:`loss_normaliser`); None = computed on this batch.

    Returns:
        ``(loss, metrics)``: a 0-d tensor, and detached 0-d tensors ``clip_frac_low``,
        ``clip_frac_high`` (ratio clip active, negative / positive advantages), ``clip_frac_dual``,
        ``approx_kl`` (mean k3 of ``KL(π_old ‖ π)``), ``policy_loss`` (the ``w·ℓ^pg`` part, aggregated
        like the loss), ``kept_frac`` (kept / mask tokens), ``ratio_mean``, plus ``entropy`` (mean ``H``)
        and ``ref_kl`` (mean k3 to the reference) when given. Token means are over this call's kept
        tokens.

    Example:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.2]])).requires_grad_()
        >>> old = torch.log(torch.tensor([[0.25, 0.5], [0.2, 0.4]]))
        >>> adv = torch.tensor([1.0, -1.0])
        >>> mask = torch.tensor([[True, True], [True, False]])
        >>> loss, m = grpo_loss(lp, old, adv, mask)
        >>> round(loss.item(), 4)   # (-1.2 - 1.0 + 1.0) / 3: the first ratio (2.0) clipped to 1.2
        -0.4
        >>> round(m["clip_frac_high"].item(), 4), m["kept_frac"].item()
        (0.3333, 1.0)
    """
    cfg = LossConfig() if config is None else config
    _check_inputs(logp, old_logp, mask, cfg, ref_logp, entropy, rule_output, normaliser)
    shape = tuple(logp.shape)
    B, T = shape

    dtype = torch.promote_types(logp.dtype, torch.float32)
    lp = logp.to(dtype)
    keep = _kept(mask, rule_output)  # (B, T)
    zero = lp.new_zeros(())
    if rule_output is not None:
        A = rule_output.adv
    elif adv.ndim == 1 and adv.shape[0] == B:
        A = adv[:, None].expand(shape)
    else:
        _check("adv", adv, shape)
        A = adv
    A = torch.where(keep, A.detach().to(dtype), zero)  # (B, T); 0 off K: finite everywhere
    old = lp.detach() if old_logp is None else old_logp.detach().to(dtype)

    # --- the clipped, dual-clipped surrogate -----------------------------------------------------
    delta = torch.where(keep, lp - old, zero)  # log r, 0 off K (before any non-linearity)
    log_r = delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_r)  # (B, T)
    pg = torch.maximum(-A * ratio, -A * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high))
    if cfg.dual_clip is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -A * cfg.dual_clip), pg)
    if rule_output is not None and rule_output.weight is not None:
        pg = pg * torch.where(keep, rule_output.weight.detach().to(dtype), zero)
    per_token = pg

    # --- additive per-token terms ----------------------------------------------------------------
    if rule_output is not None and rule_output.kl_coef is not None:  # KL-Cov: c |log p - log p_old|
        per_token = per_token + torch.where(keep, rule_output.kl_coef.detach().to(dtype), zero) * delta.abs()
    H = None if entropy is None else torch.where(keep, entropy.to(dtype), zero)
    if rule_output is not None and rule_output.entropy_coef is not None:  # entropy bonus: -c H
        per_token = per_token - torch.where(keep, rule_output.entropy_coef.detach().to(dtype), zero) * H
    k3 = None
    if ref_logp is not None:
        d = torch.where(keep, ref_logp.detach().to(dtype) - lp, zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        k3 = torch.expm1(d) - d  # e^d - d - 1 >= 0
        if cfg.kl_beta > 0:
            per_token = per_token + cfg.kl_beta * k3
    per_token = torch.where(keep, per_token, zero)  # (B, T)

    # --- aggregation ------------------------------------------------------------------------------
    if normaliser is None:
        normaliser = loss_normaliser(mask, cfg, rule_output)
    if isinstance(normaliser, torch.Tensor):
        normaliser = normaliser.to(dtype)
    keep_f = keep.to(dtype)

    def aggregate(x: torch.Tensor) -> torch.Tensor:
        if cfg.aggregation == "seq_mean":
            return (x.sum(-1) / keep_f.sum(-1).clamp_min(1.0)).sum() / normaliser
        return x.sum() / normaliser

    loss = aggregate(per_token)

    metrics = _metrics(cfg, A, keep, mask, log_r, pg, H, k3, aggregate)
    return loss, metrics
