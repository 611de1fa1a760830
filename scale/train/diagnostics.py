"""The theory diagnostics of a training step: measured vs predicted entropy change, batch statistics.

Every ``diag.diag_every`` steps the trainer scores the step's tokens in float32 before and after the
update (the same no-grad forward both times), and compares the measured change of their entropies with
two first-order predictions (arXiv 2602.03392):

* the **tabular** (E6) sum ``-sum_t alpha_t (S*_t - E_p[S]_t)`` over the tokens, with ``alpha_t`` the
  plain-SGD logit step (E5) of each token (:func:`theory.diagnostics.tabular_entropy_change`), and its
  quadrant parts;
* the **network-level** first order (E4) along the realised parameter change ``dtheta``, a JVP of the
  summed entropy (:func:`entropy_jvp`).

Every step also logs the batch statistics of :func:`theory.diagnostics.batch_statistics` (entropy by
advantage sign, ``S*``, ``E_p[S]``, the deviation, Cor 3.5 ratio, quadrant shares), the entropy by
relative position and the response lengths; the "Logged metrics" table of :mod:`scale.metrics_log`
defines the keys. Means over an empty set are 0 (:mod:`theory.diagnostics`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

import theory
from theory.diagnostics import batch_statistics, masked_mean, tabular_entropy_change

from ..config import TrainConfig
from ..distributed import Dist, all_reduce_sum, full_tensor, gather_rows, gathered
from ..rollout import Rollout, decoder_and_head, forward_hidden, score_all
from ..token_stats import TokenStats
from .runtime import sync


def _entropy_sum(ro: Rollout, hidden: torch.Tensor, weight, bias, temperature: float, chunk: int):
    """Sum of ``H`` over the response tokens, chunked over tokens; plain torch ops (forward-mode AD)."""
    cdt = torch.promote_types(hidden.dtype, torch.float32)  # logits in float32 at least, as token_stats
    h, W = hidden[ro.mask].to(cdt), weight.to(cdt)  # (n, D), (V, D)
    total = h.new_zeros(())
    for s in range(0, h.shape[0], chunk):
        z = h[s : s + chunk] @ W.T  # (c, V)
        if bias is not None:
            z = z + bias.to(cdt)
        z = z / temperature
        total = total + theory.entropy_from_logp(theory.log_softmax(z)).sum()
    return total


def _chunks(parts: Sequence[slice], size: int) -> list[slice]:
    """``parts`` cut into consecutive slices of at most ``size`` rows."""
    return [slice(s, min(s + size, p.stop)) for p in parts for s in range(p.start, p.stop, size)]


def score_rows(model, ro: Rollout, parts: Sequence[slice] | None, dd: Dist, cfg: TrainConfig, **kw):
    """No-grad token statistics of the global batch: :func:`score_all` on one process; with several,
    each scores its ``parts`` and the rows are all-gathered (:func:`scale.distributed.gather_rows`)."""
    batch = cfg.rollout.score_batch
    if not dd.enabled:
        return score_all(model, ro, batch, **kw)
    local = TokenStats.cat([score_all(model, ro.rows(p), batch, **kw) for p in parts])
    return local.map(lambda x: gather_rows(x, dd, ro.n, cfg.optim.minibatches))


def entropy_jvp(
    model,
    ro: Rollout,
    theta0: dict[str, torch.Tensor],
    cfg: TrainConfig,
    parts: Sequence[slice] | None = None,
) -> torch.Tensor:
    """``d/de sum_t H_t(theta0 + e * dtheta)`` at ``e = 0`` with ``dtheta = theta - theta0`` (all tokens).

    Runs the decoder functionally (``torch.func.functional_call``) under ``torch.func.jvp``; attention
    uses sdpa's math kernel (the fused CPU kernel has no forward-mode derivative). Batched like the
    scoring passes; the derivative is linear, so the chunks' results add up. ``parts``: only these rows
    (a process's share; the caller sums over processes).
    """
    from torch.func import jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    decoder, weight, bias = decoder_and_head(model)
    names = {id(p): n for n, p in model.named_parameters()}
    prefix = next(n for n, mod in model.named_modules() if mod is decoder) + "."
    w_name, b_name = names[id(weight)], (names.get(id(bias)) if bias is not None else None)
    tangents = {n: (p.detach() - theta0[n]) for n, p in model.named_parameters()}
    tau, chunk = cfg.rollout.temperature, cfg.model.chunk_size

    def f(ps, part: Rollout):
        dec = {k[len(prefix) :]: v for k, v in ps.items() if k.startswith(prefix)}
        hidden = forward_hidden(decoder, part, dec)
        b = ps[b_name] if b_name is not None else bias
        return _entropy_sum(part, hidden, ps[w_name], b, tau, chunk)

    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):  # e.g. flash attention: no forward-mode AD
        model.set_attn_implementation("eager")
    try:
        total = None
        with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            for sl in _chunks(parts if parts is not None else [slice(0, ro.n)], cfg.rollout.score_batch):
                part = ro.rows(sl)
                _, d = jvp(lambda ps, part=part: f(ps, part), (theta0,), (tangents,))
                total = d if total is None else total + d
    finally:
        if impl not in ("sdpa", "eager"):
            model.set_attn_implementation(impl)
    return total


@dataclass
class Probe:
    """The state before a diagnosed update: the float32 token statistics, the parameters (for the JVP)
    and the accumulating per-token SGD-equivalent logit steps ``alpha`` (E5)."""

    before: TokenStats
    theta0: dict[str, torch.Tensor] | None
    alpha: torch.Tensor  # (N, T)
    seconds: float = 0.0

    def add_step(self, rows: slice, grad_logp: torch.Tensor, lr: float, clip: torch.Tensor) -> None:
        """One optimizer update's step sizes: the surrogate's ``-dL/dlog p`` plays ``r A / n`` in (E5)."""
        self.alpha[rows] += theory.effective_step_size(lr, -grad_logp, ratio=clip)


def probe_before(run, ro: Rollout, like: torch.Tensor) -> Probe:
    """Score the batch (float32, no grad) and keep the parameters, before the update."""
    t0 = time.perf_counter()
    cfg = run.cfg
    with gathered(run.model):  # (under FSDP the parameters are the full tensors in here)
        before = score_rows(run.model, ro, run.own, run.dd, cfg, temperature=cfg.rollout.temperature,
                            chunk_size=cfg.model.chunk_size, s_star=True, baseline=True)  # fmt: skip
        theta0 = None
        if cfg.diag.jvp:
            theta0 = {n: full_tensor(p.detach()).clone() for n, p in run.model.named_parameters()}
    return Probe(before, theta0, torch.zeros_like(like), time.perf_counter() - t0)


def probe_after(run, ro: Rollout, probe: Probe, adv_eff: torch.Tensor) -> dict[str, Any]:
    """The measured entropy change of the update on the same tokens, and its two predictions."""
    t0 = time.perf_counter()
    cfg, dd, mask = run.cfg, run.dd, ro.mask
    alpha = all_reduce_sum(probe.alpha, dd) if dd.enabled else probe.alpha  # each process: its own rows
    with gathered(run.model):  # one gather for the after-update scoring and the JVP
        after = score_rows(run.model, ro, run.own, dd, cfg, temperature=cfg.rollout.temperature,
                           chunk_size=cfg.model.chunk_size)  # fmt: skip
        d_jvp = entropy_jvp(run.model, ro, probe.theta0, cfg, run.own) if cfg.diag.jvp else None
    before = probe.before
    n_tok = mask.sum().to(before.entropy.dtype)
    m: dict[str, Any] = {}
    # per-token differences summed (not a difference of two sums: no cancellation)
    m["theory/dH_measured"] = torch.where(mask, after.entropy - before.entropy, 0.0).sum() / n_tok
    dh_tab, parts = tabular_entropy_change(alpha, before.s_star - before.baseline, adv_eff, mask)
    m["theory/dH_tabular"] = dh_tab
    for name, v in parts.items():
        m[f"theory/dH_tabular/{name}"] = v
    if d_jvp is not None:
        m["theory/dH_jvp"] = all_reduce_sum(d_jvp, dd) / n_tok
    sync(run.device)
    probe.seconds += time.perf_counter() - t0
    return m


def batch_metrics(cfg: TrainConfig, ro: Rollout, old: TokenStats, adv: torch.Tensor, adv_eff: torch.Tensor,
                  rule_out) -> dict[str, Any]:  # fmt: skip
    """The step's entropy statistics before the update (:func:`theory.diagnostics.batch_statistics`),
    the entropy by relative position, the rule's metrics and the response lengths."""
    mask, T = ro.mask, ro.mask.shape[1]
    m = batch_statistics(entropy=old.entropy, logp=old.logp, s_star=old.s_star, baseline=old.baseline,
                         adv=adv, valid=mask, adv_eff=adv_eff)  # fmt: skip
    lengths = mask.sum(-1, keepdim=True)  # (N, 1)
    K = cfg.diag.pos_buckets
    rel = torch.arange(T, device=mask.device)[None, :] / lengths.clamp_min(1)  # (N, T) in [0, 1)
    bucket = (rel * K).floor().long().clamp(max=K - 1)
    for i in range(K):
        m[f"entropy/pos_bucket_{i}"] = masked_mean(old.entropy, mask & (bucket == i))
    if rule_out is not None:
        for key, v in rule_out.metrics.items():
            m[f"rule/{key}"] = v
    len_f = lengths[:, 0].float()
    m["len/mean"], m["len/min"], m["len/max"] = len_f.mean(), len_f.min(), len_f.max()
    m["len/truncated_frac"] = ro.truncated.float().mean()
    return m


def sample_records(ro, tok, old, dev, quad, adv_seq, rewards, problems, step, cfg) -> list[dict[str, Any]]:
    """The logged completions of a step (schema in :mod:`scale.metrics_log`): the first sample of the
    first prompts, then second samples, ..."""
    G, P = cfg.rollout.group_size, cfg.rollout.prompts
    count = min(cfg.diag.samples_per_step, ro.n)
    rows = [(i % P) * G + i // P for i in range(count)]
    sel = torch.tensor(rows, device=ro.mask.device)
    mask = ro.mask[sel].cpu()
    cols = {
        "response": ro.response[sel].cpu(), "entropy": old.entropy[sel].cpu(),
        "s_star": old.s_star[sel].cpu(), "deviation": dev[sel].cpu(), "quadrant": quad[sel].cpu(),
        "logp": old.logp[sel].cpu(),
    }  # fmt: skip
    adv = adv_seq[sel].cpu().tolist()
    out = []
    for j, row in enumerate(rows):
        keep = mask[j]
        ids = cols["response"][j][keep].tolist()
        out.append(
            {
                "step": step,
                "prompt": ro.prompts[row],
                "completion": ro.completions[row],
                "tokens": [tok.decode([i]) for i in ids],
                "entropy": cols["entropy"][j][keep].tolist(),
                "s_star": cols["s_star"][j][keep].tolist(),
                "deviation": cols["deviation"][j][keep].tolist(),
                "quadrant": cols["quadrant"][j][keep].tolist(),
                "advantage": adv[j],
                "reward": rewards[row],
                "logp": cols["logp"][j][keep].tolist(),
                "answer": problems[row // G].answer,
                "truncated": bool(ro.truncated[row]),
            }
        )
    return out
