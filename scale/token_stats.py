r"""Per-token statistics from the final hidden states, through the lm_head in chunks of tokens.

A GRPO trainer needs, at every response position ``(b, t)``, the log-probability of the sampled token
and often the entropy of the whole next-token distribution; the entropy-dynamics diagnostics also want
the discriminator ``S*`` (E2) and the dynamic baseline ``E_p[S]`` (E7). All of them are reductions over
the vocabulary of the logits

.. math:: z_{bt} = (h_{bt} W^\top + b) / \tau \in \mathbb R^V,

so materialising ``z`` for all ``N = B*T`` tokens at once costs ``4 N V`` bytes in float32 (about 10 GB
for 16k tokens of a 151k vocabulary) — and autograd would keep several such tensors for the backward.
:func:`token_stats` never does: it processes ``chunk_size`` tokens at a time, in the forward *and* in
the backward.

How (a custom :class:`torch.autograd.Function`, ``_ChunkedTokenStats``):

* forward: per chunk, ``z_c = (h_c W^T + b) / τ`` in float32 (float64 if the inputs are float64), then
  :func:`theory.row_statistics` on that chunk (the target's log-prob, ``H``, ``S*``, ``E_p[S]`` in one
  pass per row block); only the ``(N,)`` results are kept. Saved for backward: the inputs (``hidden``,
  ``weight``, ``bias``, ``target``, ``mask``) — no vocabulary-sized activation.
* backward: per chunk, ``z_c`` is recomputed and the gradient w.r.t. ``z_c`` comes from torch autograd
  through the same theory functions (``∂ log p_k/∂z = e_k − p`` and ``∂H/∂z = −S``, docs/equations.md
  §2.5, are not re-derived here); the linear layer's backward is applied by hand,
  ``grad_h_c = dz_c W / τ`` and ``grad_W += dz_c^T h_c / τ`` (an in-place ``addmm_`` into one buffer).

Why not ``torch.utils.checkpoint`` around each chunk (same numbers)? It also recomputes the no-grad
statistics in backward, leaves the weight gradient to autograd's accumulation of one ``(V, D)``
gradient per chunk, and keeps autograd's saved tensors of the recomputed chunk. Measured on CPU
(torch 2.13, allocator peak from the profiler, forward + backward of ``log p`` and ``H``,
``N = 2048, V = 49152, D = 576``; full logits 384 MB): unchunked 2400 MB; checkpoint 413 MB
(chunk 256) / 1313 MB (chunk 1024); this function 269 MB / 737 MB, the same with ``S*`` and
``E_p[S]``. The price of either is one more ``(N, D) x (D, V)`` matmul in backward (4 instead of 3).
Double backward is not supported.

Memory: the transient peak is three to four ``(chunk_size, V)`` float32 arrays (forward and backward
alike), plus, for a bfloat16/float16 lm_head, one float32 copy of the weight ``(V, D)`` while the
function runs, and in backward the float32 weight-gradient buffer ``(V, D)``. Autocast is switched
off inside, so the logits stay float32 within a caller's ``torch.autocast`` region.

Masked positions (``mask`` False: prompt, padding) get 0 in every output and exactly zero gradient;
their targets may hold anything (e.g. ``-100``). With ``skip_masked=True`` only the masked-in tokens
go through the lm_head (fewer FLOPs when there is much padding, at the cost of one host
synchronisation to count them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

import theory

__all__ = ["TokenStats", "logit_stats", "token_stats"]


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics, each ``(B, T)`` float32 (float64 for float64 inputs); 0 at masked positions.

    Attributes:
        logp: ``log p(target)`` under ``softmax(z / τ)``; differentiable w.r.t. hidden, weight, bias.
        entropy: ``H = −Σ_i p_i log p_i`` of the whole next-token distribution, or None if not asked for;
            differentiable only with ``entropy_grad=True``.
        s_star: ``S* = p_k (H + log p_k)`` (E2) of the target token, no gradient, or None.
        baseline: ``E_{i~p}[S_i]`` (E7), no gradient, or None.
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    s_star: torch.Tensor | None = None
    baseline: torch.Tensor | None = None

    def astuple(self) -> tuple[torch.Tensor | None, ...]:
        """``(logp, entropy, s_star, baseline)``, the tensors themselves (no copies)."""
        return self.logp, self.entropy, self.s_star, self.baseline

    def map(self, fn) -> TokenStats:
        """``fn`` applied to every field that is not None."""
        return TokenStats(*(None if x is None else fn(x) for x in self.astuple()))

    @staticmethod
    def cat(parts: Sequence[TokenStats]) -> TokenStats:
        """The ``parts`` concatenated along the rows (dim 0), field by field."""
        cols = zip(*(p.astuple() for p in parts), strict=True)
        return TokenStats(*(None if c[0] is None else torch.cat(c, 0) for c in cols))


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is never used for logits)."""
    f64 = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if f64 else torch.float32


def _chunk_logits(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, temperature: float):
    """``(h W^T + b) / τ`` for one chunk: ``h (c, D)``, ``W (V, D)`` -> ``(c, V)`` in ``W``'s dtype.

    Autocast is switched off, so the logits stay float32 inside a caller's ``torch.autocast`` region.
    """
    with torch.autocast(h.device.type, enabled=False):
        z = h @ W.T if b is None else torch.addmm(b, h, W.T)
    return z if temperature == 1.0 else z / temperature


def _take(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``x[i, k[i]]``: ``(c, V)``, ``(c,)`` -> ``(c,)``."""
    return x.gather(-1, k[:, None])[:, 0]


def logit_stats(z: torch.Tensor, target: torch.Tensor, *, entropy: bool = True, s_star: bool = False,
                baseline: bool = False) -> tuple[torch.Tensor | None, ...]:
    """``(log p_k, H, S*, E_p[S])`` of rows of logits: ``z (n, V)``, ``target (n,)`` -> four ``(n,)`` or None.

    :func:`theory.row_statistics` (E2, E7 on ``softmax(z)``): one pass per row block over ``z``, no
    ``(n, V)`` log-probabilities. ``H`` is returned when ``entropy`` or ``s_star`` asks for it. Shared by
    the chunked forward below and the sampler's per-step statistics (:func:`scale.rollout.sample`).
    """
    r = theory.row_statistics(z, target, baseline=baseline, check_k=False)  # targets in range by construction
    H = r.entropy if (entropy or s_star) else None
    return r.logp, H, r.s_star if s_star else None, r.baseline


class _ChunkedTokenStats(torch.autograd.Function):
    """Chunked lm_head + token statistics with per-chunk recomputation in backward (see module doc)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, mask, temperature, chunk_size, want_entropy, entropy_grad,
                want_s_star, want_baseline):
        # hidden (N, D); weight (V, D); bias (V,) or None; target (N,) int64 (0 where masked); mask (N,)
        cdt = _compute_dtype(hidden, weight, bias)
        W = weight.to(cdt)  # one float32 copy for a bf16 head (no copy when already cdt)
        b = None if bias is None else bias.to(cdt)
        N = hidden.shape[0]
        need_H = want_entropy or want_s_star
        logp = hidden.new_empty(N, dtype=cdt)
        H = hidden.new_empty(N, dtype=cdt) if need_H else None
        S = hidden.new_empty(N, dtype=cdt) if want_s_star else None
        base = hidden.new_empty(N, dtype=cdt) if want_baseline else None
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            z = _chunk_logits(hidden[s:e].to(cdt), W, b, temperature)  # (c, V)
            parts = logit_stats(z, target[s:e], entropy=need_H, s_star=want_s_star, baseline=want_baseline)
            del z
            for out, part in zip((logp, H, S, base), parts, strict=True):
                if out is not None:
                    out[s:e] = part
        zero = torch.zeros((), dtype=cdt, device=hidden.device)
        outs = [torch.where(mask, x, zero) if x is not None else None for x in (logp, H, S, base)]
        ctx.save_for_backward(hidden, weight, bias, target, mask)
        ctx.temperature, ctx.chunk_size, ctx.cdt = temperature, chunk_size, cdt
        ctx.entropy_grad = entropy_grad
        ctx.set_materialize_grads(False)
        no_grad = [x for x in outs[2:] if x is not None]
        if outs[1] is not None and not entropy_grad:
            no_grad.append(outs[1])
        ctx.mark_non_differentiable(*no_grad)
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_logp, g_H, g_S, g_base):
        hidden, weight, bias, target, mask = ctx.saved_tensors
        tau, chunk, cdt = ctx.temperature, ctx.chunk_size, ctx.cdt
        need_h, need_W, need_b = ctx.needs_input_grad[:3]
        if not ctx.entropy_grad:
            g_H = None
        if (g_logp is None and g_H is None) or not (need_h or need_W or need_b):
            return (None,) * 11
        zero = torch.zeros((), dtype=cdt, device=hidden.device)
        gl = None if g_logp is None else torch.where(mask, g_logp.to(cdt), zero)  # (N,)
        gH = None if g_H is None else torch.where(mask, g_H.to(cdt), zero)  # (N,)
        W = weight.detach().to(cdt)
        b = None if bias is None else bias.detach().to(cdt)
        N, D = hidden.shape
        grad_h = hidden.new_empty((N, D), dtype=cdt) if need_h else None
        grad_W = torch.zeros(W.shape, dtype=cdt, device=W.device) if need_W else None
        grad_b = torch.zeros(W.shape[0], dtype=cdt, device=W.device) if need_b else None
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            h = hidden[s:e].detach().to(cdt)  # (c, D)
            with torch.no_grad():
                z = _chunk_logits(h, W, b, tau)  # (c, V), recomputed
            with torch.enable_grad():
                z.requires_grad_(True)
                logp_all = theory.log_softmax(z)
                outs, grads = [], []
                if gl is not None:
                    outs.append(_take(logp_all, target[s:e]))
                    grads.append(gl[s:e])
                if gH is not None:
                    outs.append(theory.entropy_from_logp(logp_all))
                    grads.append(gH[s:e])
                (dz,) = torch.autograd.grad(outs, z, grads)  # (c, V): d(sum g * stat) / dz
            del logp_all, outs, z
            if tau != 1.0:
                dz = dz / tau
            with torch.autocast(h.device.type, enabled=False):  # the linear layer's backward, by hand
                if need_h:
                    torch.mm(dz, W, out=grad_h[s:e])
                if need_W:
                    grad_W.addmm_(dz.T, h)
            if need_b:
                grad_b += dz.sum(0)
            del dz
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_W is None else grad_W.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        ) + (None,) * 8


def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    entropy: bool = True,
    entropy_grad: bool = False,
    s_star: bool = False,
    baseline: bool = False,
    skip_masked: bool = False,
) -> TokenStats:
    r"""Token log-probs and entropy statistics from final hidden states, ``chunk_size`` tokens at a time.

    With logits ``z = (h W^T + b) / τ`` and ``p = softmax(z)`` at each position, ``k`` the target token:

    .. math::
        \log p_k, \qquad H = -\sum_i p_i \log p_i, \qquad S_* = p_k (H + \log p_k)\ \text{(E2)}, \qquad
        \mathbb E_{i\sim p}[S_i] = \sum_i p_i^2 (H + \log p_i)\ \text{(E7)}

    each computed by the :mod:`theory` function on a float32 ``(chunk_size, V)`` block of logits (float64
    if ``hidden`` or ``weight`` is float64), never on all ``B*T`` rows at once, in the forward and in the
    backward (per-chunk recomputation; see the module docstring). Dividing by the sampling temperature
    ``τ`` matches TRL/verl, which score ``logits / temperature``.

    Args:
        hidden: ``(B, T, D)`` final hidden states (after the final norm), any float dtype; the row at
            ``t`` predicts ``target[:, t]`` (shift before calling).
        weight: ``(V, D)`` lm_head weight (tied embeddings work).
        target: ``(B, T)`` integer token ids; values at masked positions are ignored.
        mask: ``(B, T)`` bool, True where statistics are wanted; None = everywhere.
        bias: optional ``(V,)`` lm_head bias.
        temperature: ``τ > 0``.
        chunk_size: tokens per chunk (>= 1); the transient memory is a few ``chunk_size x V`` floats.
        entropy: return ``H``.
        entropy_grad: make ``H`` differentiable (for an entropy bonus); implies ``entropy``.
        s_star: return ``S*`` (no gradient).
        baseline: return ``E_p[S]`` (no gradient).
        skip_masked: run the lm_head on masked-in tokens only (one host sync to count them).

    Returns:
        :class:`TokenStats` of ``(B, T)`` tensors, 0 at masked positions. ``entropy`` is also returned
        when only ``s_star`` asked for it.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> h, W = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
        >>> k = torch.randint(0, 11, (2, 5), generator=g)
        >>> st = token_stats(h, W, k, chunk_size=3)
        >>> ref = torch.log_softmax(h @ W.T, -1).gather(-1, k[..., None])[..., 0]
        >>> bool(torch.allclose(st.logp, ref, atol=1e-5))
        True
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden must have shape (B, T, D), got {tuple(hidden.shape)}")
    B, T, D = hidden.shape
    if weight.ndim != 2 or weight.shape[1] != D:
        raise ValueError(f"weight must have shape (V, D) with D = {D}, got {tuple(weight.shape)}")
    V = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must have shape (V,) = ({V},), got {tuple(bias.shape)}")
    if tuple(target.shape) != (B, T):
        raise ValueError(f"target must have shape (B, T) = {(B, T)}, got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor, got dtype {target.dtype}")
    if mask is None:
        mask = torch.ones((B, T), dtype=torch.bool, device=hidden.device)
    if tuple(mask.shape) != (B, T) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape (B, T) = {(B, T)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    temperature = float(temperature)
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if x is not None and not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    entropy = entropy or entropy_grad

    h2 = hidden.reshape(B * T, D)  # (N, D)
    m1 = mask.reshape(B * T)  # (N,)
    k1 = torch.where(m1, target.reshape(B * T), 0).long()  # (N,); masked targets -> 0 (any valid id)
    if skip_masked:
        idx = m1.nonzero().squeeze(1)  # host sync: the number of masked-in tokens
        sel = (h2.index_select(0, idx), weight, bias, k1.index_select(0, idx), m1.index_select(0, idx))
    else:
        sel = (h2, weight, bias, k1, m1)
    outs = _ChunkedTokenStats.apply(*sel, temperature, chunk_size, entropy, entropy_grad, s_star, baseline)
    if skip_masked:
        outs = [None if x is None else x.new_zeros(B * T).index_copy(0, idx, x) for x in outs]
    logp, H, S, base = (None if x is None else x.reshape(B, T) for x in outs)
    return TokenStats(logp=logp, entropy=H, s_star=S, baseline=base)
