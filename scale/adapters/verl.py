r"""The :mod:`theory.rules` rules as verl policy losses (verl's registry, verl's signature).

verl's extension point (``verl/trainer/ppo/core_algos.py`` and ``verl/workers/utils/losses.py`` at
verl-project/verl tag ``v0.9.0``, commit ``483b8a009ba3a97563edee3a19887e4862b8094a``; the PyPI wheel
``verl==0.9.1`` and ``main`` @ ``1dda039b`` have the same code there): policy losses live in
``POLICY_LOSS_REGISTRY``, are added with the decorator ``register_policy_loss(name)`` and are chosen
by ``actor_rollout_ref.actor.policy_loss.loss_mode=<name>``. The actor's ``ppo_loss`` calls the chosen
function **once per micro-batch** with keywords only::

    fn(old_log_prob=, log_prob=, advantages=, response_mask=, loss_agg_mode=, config=,
       rollout_is_weights=)  ->  (loss: 0-d tensor, metrics: dict[str, float])

All tensors ``(B, T)``; ``config`` is the ``ActorConfig`` (``clip_ratio``, ``clip_ratio_low``,
``clip_ratio_high``, ``clip_ratio_c`` read with ``config.get``), whose ``global_batch_info`` holds
``dp_size``, ``batch_num_tokens`` (valid tokens of the global mini-batch, all data-parallel ranks),
``global_batch_size`` and ``loss_scale_factor`` for ``agg_loss``. Entropy is **not** passed (``ppo_loss``
adds ``−entropy_coeff · H`` itself), nor are group ids or ``E_p[S]``.

Two ways to use a rule, by where its batch statistics are taken (anchors §6 #9):

1. **Per call** -- :func:`make_policy_loss` / :func:`register_rule_loss` /
   :func:`register_from_env`: a function with verl's signature that runs the rule on the tensors of
   the call, i.e. on verl's **micro-batch** (what verl's own ``clip_cov`` / ``kl_cov`` do; their
   authors call it an approximation of the global statistics). Only rules whose inputs are in the
   signature work from verl's call site: ``clip_cov``, ``kl_cov``, ``position_bonus``,
   ``prob_weighted``. Rules that need ``entropy`` (``clip_b``, ``high_entropy_mask``,
   ``quadrant_mask``), ``baseline`` (``clip_v``) or ``group`` (``ppl_shaping``) raise ``ValueError``
   unless the caller passes those tensors as extra keywords (verl's ``ppo_loss`` does not).
   The output is applied by :func:`scale.loss.grpo_loss` (``keep``, ``adv``, ``weight``, ``kl_coef``,
   ``entropy_coef``: the project's semantics), with verl's dual-clip PPO surrogate
   (``clip_ratio_c``), ``rollout_is_weights`` as a factor of ``weight`` (verl multiplies the surrogate
   by it) and verl's aggregation (``agg_loss``):

   ==========================  =============================================================
   ``loss_agg_mode``           loss (``K`` = kept tokens of the call)
   ==========================  =============================================================
   ``token-mean``              ``Σ_K ℓ / (N / dp)``, ``N`` = ``batch_num_tokens`` x (kept / valid
                               tokens of the call); without ``batch_num_tokens``: ``|K|``
   ``token-sum``               ``Σ_K ℓ · dp``
   ``seq-mean-token-mean``     ``Σ_i mean_{K_i} ℓ / (global_batch_size / dp)`` (or the call's
                               sequences with a valid token)
   ``seq-mean-token-sum``      ``Σ_K ℓ / (global_batch_size / dp)`` (same fallback)
   ``seq-mean-token-sum-norm`` the same divided by ``loss_scale_factor`` (or ``T``)
   ==========================  =============================================================

   ``batch_num_tokens`` counts valid tokens; the kept tokens of the other micro-batches and ranks are
   unknown inside one call, so ``token-mean`` scales the global count by the call's kept fraction --
   exact when the call sees the whole mini-batch (one micro-batch, one rank), an estimate otherwise.
   With no rule (or a rule that changes nothing) the loss is verl's ``vanilla`` loss (tested).

2. **Global** -- :func:`rule_batch_fields`: run the rule once on the whole training batch on the
   driver (where verl has the old-log-prob pass's ``entropys``: ``ray_trainer.py`` computes and then
   pops them) and write its output into verl's own batch fields before the batch is split:
   ``response_mask ← keep`` (verl then counts ``batch_num_tokens`` over kept tokens: ``keep`` leaves
   the loss **and** the normaliser, exactly), ``advantages ← adv``, ``rollout_is_weights ← weight x``
   the existing weights; the unchanged ``vanilla`` loss then applies them. ``kl_coef`` and
   ``entropy_coef`` have no channel there (``ValueError``). This needs a hook in verl's trainer loop
   (e.g. a ``RayPPOTrainer`` subclass); the function itself is tested on tensors only.

Numerics and metrics follow verl's vanilla loss: log-ratios clamped to ``[−20, 20]``; metrics
``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` (verl's definitions, over the kept
tokens), plus ``actor/entdyn/kept_frac`` and ``actor/entdyn/<rule metric>``, as python floats.

``verl`` is optional: the registration functions take the ``register`` decorator factory to use and
import verl's only when none is given. Installing ``verl==0.9.1`` next to this project's stack would
downgrade ``transformers`` (verl pins ``transformers<5.11``); see ``docs/scaling.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable
from typing import Any

import torch

from scale.loss import LossConfig, grpo_loss
from theory.rules import Rule, RuleOutput, TokenBatch, make_rule

__all__ = [
    "AGG_MODES",
    "ENV_VAR",
    "RuleBatchFields",
    "make_policy_loss",
    "register_from_env",
    "register_rule_loss",
    "rule_batch_fields",
]

#: verl's ``loss_agg_mode`` values (``agg_loss`` in ``core_algos.py``) -> grpo_loss aggregation
AGG_MODES = {
    "token-mean": "token_mean",
    "token-sum": "constant",
    "seq-mean-token-mean": "seq_mean",
    "seq-mean-token-sum": "constant",
    "seq-mean-token-sum-norm": "constant",
}
#: environment variable read by :func:`register_from_env`: ``"name=spec;name2=spec2"``
ENV_VAR = "ENTDYN_VERL_LOSSES"
_EXTRA_FIELDS = ("entropy", "baseline", "group", "position", "step", "stage")


def _cfg_get(config, key: str, default=None):
    if config is None:
        return default
    if hasattr(config, "get"):
        try:
            return config.get(key, default)
        except (TypeError, KeyError):  # pragma: no cover - exotic config objects
            pass
    return getattr(config, key, default)


def _clip_params(config) -> tuple[float, float, float | None]:
    eps = _cfg_get(config, "clip_ratio", 0.2)
    low = _cfg_get(config, "clip_ratio_low", None)
    high = _cfg_get(config, "clip_ratio_high", None)
    c = _cfg_get(config, "clip_ratio_c", 3.0)
    return float(eps if low is None else low), float(eps if high is None else high), float(c)


def _batch_info(config) -> dict[str, Any]:
    info = _cfg_get(config, "global_batch_info", None) or {}
    return {k: info.get(k) for k in ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")}


def _normaliser(mode: str, valid: torch.Tensor, keep: torch.Tensor, info: dict) -> torch.Tensor:
    """The denominator making :func:`scale.loss.grpo_loss` aggregate like verl's ``agg_loss``."""
    dp = float(info.get("dp_size") or 1)
    dev = valid.device
    if mode == "token-mean":
        n_valid = valid.sum().to(torch.float32)
        n_keep = keep.sum().to(torch.float32)
        total = info.get("batch_num_tokens")
        if total is None:
            return n_keep.clamp_min(1.0)
        kept_share = torch.where(n_valid > 0, n_keep / n_valid.clamp_min(1.0), torch.ones((), device=dev))
        return (torch.as_tensor(float(total), device=dev) * kept_share / dp).clamp_min(1e-8)
    if mode == "token-sum":
        return torch.full((), 1.0 / dp, device=dev)
    gbs = info.get("global_batch_size")
    n_seq = (valid.sum(-1) > 0).sum().to(torch.float32) if gbs is None else torch.as_tensor(float(gbs) / dp)
    n_seq = n_seq.to(dev).clamp_min(1e-8)
    if mode == "seq-mean-token-sum-norm":
        lsf = info.get("loss_scale_factor")
        n_seq = n_seq * float(valid.shape[-1] if lsf is None else lsf)
    return n_seq


def _verl_metrics(logp, old, adv, keep, clip_low, clip_high, c) -> dict[str, torch.Tensor]:
    """verl's vanilla-loss metrics (its definitions), over the kept tokens."""
    with torch.no_grad():
        k = keep.to(torch.float32)
        n = k.sum().clamp_min(1.0)
        neg_kl = torch.where(keep, (logp - old).clamp(-20.0, 20.0), 0.0)
        r = torch.exp(neg_kl)
        l1 = -adv * r
        l2 = -adv * r.clamp(1 - clip_low, 1 + clip_high)
        clipped = torch.maximum(l1, l2)
        return {
            "actor/pg_clipfrac": ((l2 > l1).float() * k).sum() / n,
            "actor/ppo_kl": (-neg_kl * k).sum() / n,
            "actor/pg_clipfrac_lower": ((clipped > -adv * c) & (adv < 0)).float().mul(k).sum() / n,
        }


def make_policy_loss(rule: Rule | str | dict | None = None, *, seed: int = 0) -> Callable:
    """A verl policy-loss function (verl's signature) applying ``rule`` per call; see the module docstring.

    Args:
        rule: a :class:`theory.rules.Rule`, a :func:`theory.rules.make_rule` spec, or None (then the
            function is verl's ``vanilla`` loss, computed by :func:`scale.loss.grpo_loss`).
        seed: seeds the ``noise`` of random rules (``clip_cov``): call ``i`` uses ``seed`` and ``i``.

    Returns:
        ``policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
        config=None, rollout_is_weights=None, **token_fields) -> (loss, metrics)`` -- the parameter
        names, order and defaults of verl's ``compute_policy_loss_vanilla``. ``token_fields`` are optional
        extra :class:`~theory.rules.TokenBatch` fields for callers that have them (``entropy``,
        ``baseline``, ``group``, ``position``, ``step``, ``stage``); an ``entropy`` with gradient also
        enables rules with ``entropy_coef``. A stateful rule (``entropy_bonus:adaptive=true``) keeps
        its state in the function (``policy_loss.state``). ``policy_loss.rule`` is the rule.
    """
    the_rule = None if rule is None else make_rule(rule)
    counter = itertools.count()

    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
        **token_fields: Any,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        unknown = sorted(set(token_fields) - set(_EXTRA_FIELDS))
        if unknown:
            raise TypeError(f"unexpected keyword arguments {unknown}; extra token fields: {_EXTRA_FIELDS}")
        if loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {', '.join(AGG_MODES)}, got {loss_agg_mode!r}")
        valid = response_mask.bool()
        adv = advantages.to(log_prob.dtype)
        clip_low, clip_high, c = _clip_params(config)
        out = None
        if the_rule is not None:
            entropy = token_fields.get("entropy")
            batch = TokenBatch(
                logp=log_prob.detach(), adv=adv, valid=valid, old_logp=old_log_prob,
                entropy=None if entropy is None else entropy.detach(), baseline=token_fields.get("baseline"),
                group=token_fields.get("group"), position=token_fields.get("position"),
                step=int(token_fields.get("step") or 0), stage=token_fields.get("stage"))
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + next(counter))
            noise = torch.rand(tuple(valid.shape), generator=gen, dtype=torch.float64).to(log_prob)
            out = the_rule(batch, noise=noise, state=policy_loss.state)
            policy_loss.state = out.state
        if rollout_is_weights is not None:
            w = rollout_is_weights.expand(valid.shape)
            if out is None:
                out = RuleOutput(keep=valid, adv=adv, weight=w)
            else:
                out = dataclasses.replace(out, weight=w if out.weight is None else out.weight * w)
        keep = valid if out is None else out.keep & valid
        cfg = LossConfig(clip_low=clip_low, clip_high=clip_high, dual_clip=c,
                         aggregation=AGG_MODES[loss_agg_mode])
        norm = _normaliser(loss_agg_mode, valid, keep, _batch_info(config))
        loss, m = grpo_loss(log_prob, old_log_prob, adv, valid, config=cfg,
                            entropy=token_fields.get("entropy"), rule_output=out, normaliser=norm)
        metrics = _verl_metrics(log_prob.detach(), old_log_prob.detach(), adv if out is None else out.adv,
                                keep, clip_low, clip_high, c)
        metrics["actor/entdyn/kept_frac"] = m["kept_frac"]
        if out is not None and the_rule is not None:
            for k, v in out.metrics.items():
                metrics[f"actor/entdyn/{k}"] = torch.as_tensor(v)
        keys = list(metrics)
        values = torch.stack([torch.as_tensor(metrics[k]).detach().double().reshape(()).cpu() for k in keys])
        return loss, dict(zip(keys, values.tolist(), strict=True))

    policy_loss.rule = the_rule
    policy_loss.state = the_rule.init_state() if the_rule is not None else None
    return policy_loss


def _verl_register():
    try:
        from verl.trainer.ppo.core_algos import register_policy_loss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("verl is not importable: pass register= (e.g. a test registry) or install verl") \
            from e
    return register_policy_loss


def register_rule_loss(name: str, rule: Rule | str | dict | None = None, *,
                       register: Callable[[str], Callable] | None = None, seed: int = 0) -> Callable:
    """Register :func:`make_policy_loss` (``rule``) as verl policy loss ``name``; returns the function.

    ``register`` is a decorator factory with verl's ``register_policy_loss(name)`` behaviour; None
    imports verl's. Then ``actor_rollout_ref.actor.policy_loss.loss_mode=<name>`` selects it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    fn = make_policy_loss(rule, seed=seed)
    fn.__name__ = f"entdyn_policy_loss_{name}"
    (register or _verl_register())(name)(fn)
    return fn


def register_from_env(env: str = ENV_VAR, *, register: Callable[[str], Callable] | None = None) -> list[str]:
    """Register the losses listed in the environment variable ``env``: ``"name=spec;name2=spec2"``.

    E.g. ``ENTDYN_VERL_LOSSES="entdyn_clip_cov=clip_cov:frac=0.002;entdyn_kl_cov=kl_cov"``. Returns the
    names registered (none when the variable is unset or empty). This module calls it on import when
    the variable is set, so ``VERL_USE_EXTERNAL_MODULES=scale.adapters.verl`` (verl imports the listed
    modules in every process that imports ``verl``, Ray workers included) makes the losses available.
    """
    text = os.environ.get(env, "").strip()
    names = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        name, eq, spec = item.partition("=")
        if not eq or not name.strip() or not spec.strip():
            raise ValueError(f"{env}: expected 'name=rule spec' entries separated by ';', got {item!r}")
        register_rule_loss(name.strip(), spec.strip(), register=register)
        names.append(name.strip())
    return names


@dataclasses.dataclass(frozen=True)
class RuleBatchFields:
    """The rule's output in verl's batch fields (see :func:`rule_batch_fields`)."""

    response_mask: torch.Tensor  #: ``(B, T)`` ``valid & keep``, same dtype as the input mask
    advantages: torch.Tensor  #: ``(B, T)`` the rule's advantages
    #: ``(B, T)`` ``weight x`` the given weights, or None if both are absent
    rollout_is_weights: torch.Tensor | None
    metrics: dict[str, float]  #: the rule's metrics (python floats) plus ``kept_frac``
    state: Any  #: the rule's new state (pass it back next time)
    output: RuleOutput  #: the raw rule output


def rule_batch_fields(
    rule: Rule | str | dict,
    *,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    old_log_prob: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    baseline: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    step: int = 0,
    state: Any = None,
    noise: torch.Tensor | None = None,
) -> RuleBatchFields:
    """Run ``rule`` once on a whole verl batch and express its output in verl's own batch fields.

    Call it on the driver after the old-log-prob pass (``log_prob`` = ``old_log_probs``, ``entropy`` =
    that pass's ``entropys``) and the advantage computation, before the batch is split into mini- and
    micro-batches; then set ``batch["response_mask"]``, ``batch["advantages"]`` and (if not None)
    ``batch["rollout_is_weights"]`` from the result and train with ``loss_mode=vanilla``. verl counts
    ``batch_num_tokens`` over the new ``response_mask``, so ``keep`` leaves the loss and its normaliser
    exactly, with the rule's statistics taken over the whole batch. A rule output with ``kl_coef`` or
    ``entropy_coef`` raises ``ValueError`` (no such field in verl's loss; use :func:`make_policy_loss`).
    ``group`` is the ``(B,)`` prompt index (verl's ``uid``, as integers); ``noise`` defaults to uniform
    values from a generator seeded with ``step``.
    """
    the_rule = make_rule(rule)
    valid = response_mask.bool()
    if noise is None:
        gen = torch.Generator().manual_seed(int(step))
        noise = torch.rand(tuple(valid.shape), generator=gen, dtype=torch.float64).to(log_prob)
    batch = TokenBatch(logp=log_prob.detach(), adv=advantages.to(log_prob.dtype), valid=valid,
                       old_logp=old_log_prob, entropy=entropy, baseline=baseline, group=group, step=int(step))
    out = the_rule(batch, noise=noise, state=the_rule.init_state() if state is None else state)
    for name in ("kl_coef", "entropy_coef"):
        if getattr(out, name) is not None:
            raise ValueError(f"{the_rule.name} outputs {name}, which verl's batch fields cannot carry; "
                             "use make_policy_loss (per-call statistics) for it")
    keep = out.keep & valid
    w = out.weight
    if rollout_is_weights is not None:
        w = rollout_is_weights if w is None else w * rollout_is_weights
    metrics = {k: torch.as_tensor(v) for k, v in out.metrics.items()}
    metrics["kept_frac"] = keep.sum() / valid.sum().clamp_min(1)
    keys = list(metrics)
    vals = torch.stack([metrics[k].detach().double().reshape(()).cpu() for k in keys]).tolist()
    return RuleBatchFields(response_mask=keep.to(response_mask.dtype),
                           advantages=torch.where(keep, out.adv, 0.0), rollout_is_weights=w,
                           metrics=dict(zip(keys, vals, strict=True)), state=out.state, output=out)


if os.environ.get(ENV_VAR, "").strip():  # pragma: no cover - exercised through verl's external-module hook
    register_from_env()
