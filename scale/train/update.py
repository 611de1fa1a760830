"""Phase 5 of a step: PPO epochs over minibatches, micro-batches accumulating one exact gradient.

``optim.ppo_epochs`` passes over ``optim.minibatches`` contiguous minibatches; each is one AdamW/SGD
update. A minibatch's rows are cut into micro-batches (``optim.micro_batch``; several processes: each
takes its ``1/W`` share), whose losses use the minibatch's normaliser
(:func:`scale.loss.loss_normaliser`), so the summed gradients are the minibatch gradient exactly.
:func:`scale.loss.grpo_loss` is the one place the rule's output meets the loss. Each forward runs a
prompt once for all its samples (:func:`scale.rollout.forward_hidden`) with optional activation
checkpointing. Gradients are summed over processes (or reduce-scattered by FSDP), clipped by global
norm, and a non-finite loss or gradient norm stops the run *before* the update is applied.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..checkpoint import latest_checkpoint
from ..distributed import Dist, all_reduce_grads, all_reduce_sum, full_tensor, is_fsdp, run_as_forward
from ..loss import grpo_loss, loss_normaliser, slice_rule_output
from ..rollout import Rollout, score
from ..token_stats import TokenStats
from .runtime import TrainingDiverged, autocast, release_host_memory

#: grpo_loss metrics that are means over the call's kept tokens
_KEPT_MEANS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl", "ratio_mean", "entropy",
               "ref_kl")  # fmt: skip
#: logged key of each grpo_loss metric (means over the step's updates)
_LOGGED = {"policy_loss": "loss/policy", "kept_frac": "loss/kept_frac", "clip_frac_low": "clip/low_frac",
           "clip_frac_high": "clip/high_frac", "clip_frac_dual": "clip/dual_frac", "ratio_mean": "ratio/mean",
           "approx_kl": "kl/approx", "ref_kl": "kl/ref"}  # fmt: skip


def _metric_parts(
    lm: dict[str, torch.Tensor], mask: torch.Tensor, rule_out, r: slice
) -> dict[str, torch.Tensor]:
    """A call's :func:`grpo_loss` metrics as sums: token means times their token counts (kept tokens;
    ``kept_frac``: response tokens); ``policy_loss`` (already over the global normaliser) as is."""
    keep = mask if rule_out is None else mask & rule_out.keep[r]
    n_keep, n_mask = keep.sum(), mask.sum()
    out = {}
    for key, v in lm.items():
        w = n_keep if key in _KEPT_MEANS else n_mask if key == "kept_frac" else None
        out[key] = v if w is None else v * w.to(v.dtype)
    return out


def _reduce_metric_parts(part: dict[str, torch.Tensor], mask: torch.Tensor, mb_out, dd: Dist) -> dict:
    """The minibatch's metrics from every process's :func:`_metric_parts` sums (one all-reduce): token
    means over the minibatch's kept tokens, as one process computes them without micro-batches."""
    keys = sorted(part)
    total = all_reduce_sum(torch.stack([part[k].reshape(()) for k in keys]), dd)
    keep = mask if mb_out is None else mask & mb_out.keep
    n_keep, n_mask = keep.sum().clamp_min(1), mask.sum().clamp_min(1)
    out = {}
    for i, key in enumerate(keys):
        n = n_keep if key in _KEPT_MEANS else n_mask if key == "kept_frac" else None
        out[key] = total[i] if n is None else total[i] / n.to(total.dtype)
    return out


def _add(into: dict[str, torch.Tensor], parts: dict[str, torch.Tensor]) -> None:
    for key, v in parts.items():
        into[key] = into[key] + v if key in into else v


def train_forward(model, ro: Rollout, **kwargs) -> TokenStats:
    """:func:`score` with gradient, run as the root's forward (FSDP's hooks gather and reduce-scatter
    around it: :func:`scale.distributed.run_as_forward`; a plain call without FSDP)."""
    fn = functools.partial(_score_fields, model, ro, **kwargs)
    return TokenStats(*run_as_forward(model, fn))


def _score_fields(model, ro: Rollout, **kwargs) -> tuple:
    st = score(model, ro, **kwargs)
    if is_fsdp(model):  # FSDP hooks the outputs for its backward: no views (an in-place op drops the hook)
        st = st.map(torch.clone)
    return st.astuple()


def _minibatch_grads(run, batch, rows: slice, mine: slice, probe) -> tuple[torch.Tensor, list, dict]:
    """Forward and backward of one minibatch's micro-batches (this process's ``mine`` of ``rows``):
    ``(loss sum, [(rows, dL/dlog p)] when diagnosed, metric sums)``; gradients accumulate in ``.grad``."""
    cfg, ro, rule_out = run.cfg, batch.ro, batch.rule_out
    mask = ro.mask
    mb_out = slice_rule_output(rule_out, rows) if rule_out is not None else None
    norm = loss_normaliser(mask[rows], cfg.loss, mb_out)  # global: over micro-batches and processes
    loss_sum, grads, part = torch.zeros((), device=run.device), [], {}
    micro = cfg.micro_batch_size(run.dd.world)  # sequences per forward on this process
    entropy_grad = rule_out is not None and rule_out.entropy_coef is not None
    for s in range(mine.start, mine.stop, micro):
        r = slice(s, min(s + micro, mine.stop))
        with autocast(cfg, run.device):  # FSDP: as the root's forward (its hooks gather)
            st = train_forward(run.model, ro.rows(r), temperature=cfg.rollout.temperature,
                               chunk_size=cfg.model.chunk_size, entropy_grad=entropy_grad,
                               checkpoint=cfg.optim.grad_checkpointing)  # fmt: skip
        if probe is not None:
            st.logp.retain_grad()
        loss, lm = grpo_loss(
            st.logp, batch.old.logp[r], batch.adv[r], mask[r], config=cfg.loss,
            ref_logp=None if batch.ref_logp is None else batch.ref_logp[r], entropy=st.entropy,
            rule_output=None if rule_out is None else slice_rule_output(rule_out, r), normaliser=norm,
        )  # fmt: skip
        loss.backward()
        release_host_memory(run.device)
        if probe is not None:
            grads.append((r, st.logp.grad.detach()))
        loss_sum = loss_sum + loss.detach()
        _add(part, _metric_parts(lm, mask[r], rule_out, r))  # token-weighted partial sums
    # the minibatch's metrics over all its tokens (every process's, every micro-batch's)
    return loss_sum, grads, _reduce_metric_parts(part, mask[rows], mb_out, run.dd)


def ppo_update(run, batch, probe=None) -> dict[str, Any]:
    """Every optimizer update of the step on ``batch`` (the step record of :mod:`scale.train.loop`);
    returns the loss, clipping, ratio, KL, gradient-norm and lr metrics. ``probe``
    (:class:`scale.train.diagnostics.Probe`) collects the per-token logit steps for the diagnostics."""
    cfg, mb = run.cfg, run.cfg.minibatch_size
    sums: dict[str, torch.Tensor] = {}
    n_updates, losses, norms = 0, [], []
    for epoch in range(cfg.optim.ppo_epochs):
        for k in range(cfg.optim.minibatches):
            rows = slice(k * mb, (k + 1) * mb)
            loss_sum, grads, mb_metrics = _minibatch_grads(run, batch, rows, run.own[k] if run.own else rows,
                                                           probe)  # fmt: skip
            _add(sums, mb_metrics)
            n_updates += 1
            if not run.fsdp:  # (FSDP's reduce-scatter has summed the gradient shards in the backward)
                all_reduce_grads(run.params, run.dd)  # sum over processes = the 1-process gradient
            loss_sum = all_reduce_sum(loss_sum, run.dd)
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(run.params, run.max_norm))
            if not bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm)):  # one sync per update
                good = latest_checkpoint(run.run_dir)
                raise TrainingDiverged(
                    f"step {run.state.step}: non-finite loss ({loss_sum.item()}) or gradient norm "
                    f"({grad_norm.item()}) in PPO epoch {epoch + 1}, minibatch {k + 1}; stopped "
                    f"before applying it, no checkpoint written (last good checkpoint: "
                    f"{good if good is not None else 'none'})"
                )
            lr_now = run.optimizer.param_groups[0]["lr"]
            if probe is not None:  # alpha_t = lr * clip factor * (-dL/dlog p_t), the plain-SGD step (E5)
                clip = (run.max_norm / (grad_norm + 1e-6)).clamp(max=1.0)
                for r, g in grads:
                    probe.add_step(r, g, lr_now, clip)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            release_host_memory(run.device)
            losses.append(loss_sum)
            norms.append(grad_norm)
    norms_t = torch.stack(norms)
    m: dict[str, Any] = {"loss/total": torch.stack(losses).mean()}
    for key, name in _LOGGED.items():
        if key in sums:
            m[name] = sums[key] / n_updates
    m["grad_norm"], m["grad_norm/max"] = norms_t.mean(), norms_t.max()
    m["lr"] = lr_now
    return m
