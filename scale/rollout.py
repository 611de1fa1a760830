r"""Rollouts for the GRPO trainer: batched sampling with a KV cache, response masks, scoring forwards.

A :class:`Rollout` holds one step's ``N = P x G`` sequences in one padded layout::

    input_ids   (N, L)   [left-padded prompt | response, right-padded]      L = Lp + T
    attention   (N, L)   1 on real prompt tokens and on the response up to its first eos (inclusive)
    response    (N, T)   input_ids[:, Lp:]
    mask        (N, T)   bool, True on response tokens that enter the loss

Prompts are left-padded so that every response starts at column ``Lp``. The pad token may equal eos
(SmolLM2 and ``tiny``: ``pad == eos == <|im_end|>``), so padding is found from the attention mask and
the first eos, never from pad ids. A response keeps its first eos (the model must learn to stop) and
nothing after it; one without eos in ``max_new_tokens`` is *truncated* (all its tokens count). Trailing
columns that no sequence uses are cut, so ``T`` is the longest response.

Position ids are ``cumsum(attention) - 1`` (what ``generate`` uses with left padding), passed
explicitly to every forward so that models with absolute positions score exactly what they sampled;
RoPE models are shift-invariant anyway.

**Sampling** (:func:`sample`) is a KV-cache decode loop of our own rather than ``model.generate``, for
two reasons. (1) *Shared prefix*: the ``G`` samples of a prompt share its prompt, so the prompt is
run once per prompt (``P`` rows) and its KV cache repeated ``G`` times; ``generate`` would run it
``N = P x G`` times (the prefill is most of a short rollout's cost). (2) *Behaviour statistics for
free*: the loop holds each step's raw logits, so the sampled token's ``log p`` and the position's
``H``, ``S*`` (E2) and ``E_p[S]`` (E7) under ``softmax(logits / τ)`` are computed right there with the
:mod:`theory` functions (``Rollout.behaviour``) and the trainer needs no extra no-grad forward to get
``log π_old``. As TRL and verl do, the statistics use the tempered but *untruncated* distribution;
with ``top_p < 1`` or ``top_k > 0`` the true sampling distribution is truncated. The sampling itself
follows ``generate``'s processors in their order (min-new-tokens eos ban, temperature, top-k, top-p;
:func:`filter_logits`) and draws with ``torch.multinomial`` from torch's global RNG.

**Scoring** (:func:`score`) runs the decoder only (``model.get_decoder()``), takes the final hidden
states of the positions that predict response tokens, and hands them with the lm_head weight to
:func:`scale.token_stats.token_stats`, which never builds the ``(N, V)`` logits. It shares prefixes
too (:func:`forward_hidden`): the distinct prompts of the rows go through the decoder once, with the
KV cache (and its autograd graph) indexed out to every row, then the responses run on top of it. The
gradient is the full forward's (the prompt's activations receive the sum over its ``G`` responses);
only the floating-point rounding differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .distributed import is_fsdp
from .token_stats import TokenStats, logit_stats, token_stats

__all__ = [
    "Rollout",
    "decoder_and_head",
    "eos_ids",
    "filter_logits",
    "forward_hidden",
    "response_mask",
    "sample",
    "score",
]


@dataclass
class Rollout:
    """One step's sampled sequences (see the module docstring for the layout).

    Attributes:
        input_ids: ``(N, L)`` prompt and response token ids.
        attention_mask: ``(N, L)`` long, 1 on real tokens (prompt, and response up to its first eos).
        position_ids: ``(N, L)`` ``cumsum(attention_mask) - 1`` clamped at 0.
        prompt_len: ``Lp``, the padded prompt length; responses start at this column.
        response: ``(N, T)`` response token ids (``input_ids[:, Lp:]``).
        mask: ``(N, T)`` bool, response tokens that count (up to and including the first eos).
        truncated: ``(N,)`` bool, responses that hit ``max_new_tokens`` without an eos.
        prompts: the ``N`` prompt texts (each repeated ``G`` times).
        completions: the ``N`` decoded responses (special tokens removed).
        group: ``(N,)`` long, the prompt index ``0..P-1`` of each sequence; rows of one prompt are
            consecutive.
        behaviour: the sampling policy's per-token statistics (``logp``, ``entropy``, ``s_star``,
            ``baseline``, each ``(N, T)``, 0 where ``mask`` is False) recorded while sampling, or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_len: int
    response: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor
    prompts: list[str]
    completions: list[str]
    group: torch.Tensor
    behaviour: TokenStats | None = None

    @property
    def n(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, sl) -> Rollout:
        """The sequences ``sl`` (a slice) as a smaller :class:`Rollout` (tensors are views)."""
        idx = range(self.n)[sl]
        beh = None if self.behaviour is None else self.behaviour.map(lambda x: x[sl])
        return Rollout(
            self.input_ids[sl], self.attention_mask[sl], self.position_ids[sl], self.prompt_len,
            self.response[sl], self.mask[sl], self.truncated[sl],
            [self.prompts[i] for i in idx], [self.completions[i] for i in idx], self.group[sl], beh,
        )  # fmt: skip


def eos_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a response: the tokenizer's eos and the generation config's."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra is not None:
        ids.update(int(i) for i in extra)
    if not ids:
        raise ValueError("the tokenizer has no eos token, so responses could never end")
    return sorted(ids)


def response_mask(response: torch.Tensor, eos: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, truncated)`` for ``(N, T)`` sampled ids: tokens up to and including the first eos.

    >>> m, tr = response_mask(torch.tensor([[5, 2, 2], [5, 6, 7]]), [2])
    >>> m.tolist(), tr.tolist()
    ([[True, True, False], [True, True, True]], [False, True])
    """
    is_eos = torch.isin(response, torch.tensor(list(eos), device=response.device))  # (N, T)
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # an eos strictly earlier
    mask = ~seen_before
    truncated = ~is_eos.any(-1)
    return mask, truncated


def _add_special_tokens(tokenizer) -> bool:
    return not getattr(tokenizer, "chat_template", None)  # chat-template text already holds its specials


def _tokenize_prompts(tokenizer, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(P, Lp)`` ids and attention mask."""
    enc = tokenizer(
        list(texts), padding=True, padding_side="left", return_tensors="pt",
        add_special_tokens=_add_special_tokens(tokenizer),
    )  # fmt: skip
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def prompt_lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    """The token count of each prompt as the sampler encodes it (no padding)."""
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=_add_special_tokens(tokenizer))
    return [len(ids) for ids in enc["input_ids"]]


def filter_logits(z: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``(n, V)`` tempered logits with the tokens outside top-k, then outside the top-p nucleus, set to -inf.

    The rules of ``transformers``' ``TopKLogitsWarper`` and ``TopPLogitsWarper`` (in that order, at least
    one token kept): top-k keeps the tokens whose logit is >= the k-th largest (ties at the boundary stay);
    top-p sorts ascending and drops the tokens whose cumulative probability is <= ``1 - top_p``.
    ``top_k = 0`` and ``top_p = 1`` switch the filter off (the input is returned as is).
    """
    if top_k > 0 and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]  # (n, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=False)
        cum = sorted_z.softmax(-1).cumsum(-1)  # (n, V) ascending
        drop = cum <= 1.0 - top_p
        drop[..., -1:] = False  # keep at least the most likely token
        z = z.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return z


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_new_tokens: int = 0,
    stats: bool = True,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt text: one shared-prefix KV-cache decode loop.

    Each prompt is prefilled once and its cache repeated ``group_size`` times (module docstring); then
    one token per step for all ``N`` rows until every row has produced an eos or ``max_new_tokens``
    tokens (finished rows receive the pad token). The sampling stream is torch's global RNG
    (``torch.multinomial``; the trainer seeds it per step). Runs under ``torch.no_grad`` (not
    ``inference_mode``: the ids feed a training forward later). The model's own ``generation_config``
    (e.g. a default ``top_k = 50``) plays no part. ``stats=True`` records :attr:`Rollout.behaviour`.
    Any ``torch.autocast`` region of the caller applies to the model calls; the statistics are computed
    in float32 (float64 for a float64 model).
    """
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    eos_t = torch.tensor(eos, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    ids, attn = _tokenize_prompts(tokenizer, prompts, device)  # (P, Lp)
    P, Lp = ids.shape
    G = int(group_size)
    N = P * G
    pos = (attn.cumsum(-1) - 1).clamp_min(0)  # (P, Lp)
    cdt = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    tau = float(temperature)

    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.cache
    if G > 1:
        cache.batch_repeat_interleave(G)  # (P, ...) -> (N, ...): row i*G + g continues prompt i
    logits = out.logits[:, -1].repeat_interleave(G, 0)  # (N, V)
    del out
    attn_n = attn.repeat_interleave(G, 0)  # (N, Lp), grows by one column per step
    next_pos = pos[:, -1].repeat_interleave(G, 0) + 1  # (N,)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    rec: list[tuple[torch.Tensor, ...]] = []
    for t in range(int(max_new_tokens)):
        z = logits.to(cdt)
        if tau != 1.0:
            z = z / tau
        zs = z.index_fill(-1, eos_t, float("-inf")) if t < min_new_tokens else z
        zs = filter_logits(zs, top_k=int(top_k), top_p=float(top_p))
        nxt = torch.multinomial(zs.softmax(-1), 1)[:, 0]  # (N,)
        nxt = torch.where(done, pad, nxt)
        tokens.append(nxt)
        if stats:
            rec.append(logit_stats(z, nxt, s_star=True, baseline=True))
        done = done | torch.isin(nxt, eos_t)
        if t + 1 == max_new_tokens or bool(done.all()):  # one host sync per step, as generate
            break
        attn_n = torch.cat([attn_n, attn_n.new_ones(N, 1)], 1)
        out = model(input_ids=nxt[:, None], attention_mask=attn_n, position_ids=next_pos[:, None],
                    cache=cache, use_cache=True)  # fmt: skip
        logits = out.logits[:, -1]
        del out
        next_pos = next_pos + 1
    del cache, logits
    response = torch.stack(tokens, 1) if tokens else ids.new_full((N, 1), pad)  # (N, T')
    mask, truncated = response_mask(response, eos)
    T = max(int(mask.sum(-1).max().item()), 1)  # cut unused trailing columns
    response, mask = response[:, :T].contiguous(), mask[:, :T].contiguous()
    behaviour = None
    if stats and rec:
        cols = [torch.stack(c, 1)[:, :T] for c in zip(*rec, strict=True)]  # 4 x (N, T)
        zero = torch.zeros((), dtype=cdt, device=device)
        behaviour = TokenStats(*(torch.where(mask, c, zero).contiguous() for c in cols))
    prompt_ids = ids.repeat_interleave(G, 0)
    input_ids = torch.cat([prompt_ids, response], 1)  # (N, L)
    attention = torch.cat([attn.repeat_interleave(G, 0), mask.long()], 1)
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    rows = response.cpu().tolist()
    keep = mask.cpu().tolist()
    completions = tokenizer.batch_decode(
        [[t for t, k in zip(r, m, strict=True) if k] for r, m in zip(rows, keep, strict=True)],
        skip_special_tokens=True,
    )
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        prompt_len=Lp,
        response=response,
        mask=mask,
        truncated=truncated,
        prompts=[p for p in prompts for _ in range(G)],
        completions=completions,
        group=torch.arange(P, device=device).repeat_interleave(G),
        behaviour=behaviour,
    )


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]:
    """``(decoder, lm_head weight, lm_head bias)`` of a Hugging Face causal LM."""
    head = model.get_output_embeddings()
    return model.get_decoder(), head.weight, getattr(head, "bias", None)


def _replayable_cache(frozen_from=None, expand: torch.Tensor | None = None):
    """A ``DynamicCache`` whose ``update`` can run twice (activation checkpointing replays a layer).

    Recording (``frozen_from`` None): a layer's first ``update`` stores its keys and values as usual; a
    replay returns its inputs and stores nothing. Frozen (``frozen_from`` a recorded cache, its rows
    indexed by ``expand``): ``update`` returns ``cat(stored, new)`` and stores nothing, so the response
    pass reads the prompt's keys and values as often as it is run.
    """
    from transformers import DynamicCache

    class _Replayable(DynamicCache):
        frozen = False

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if self.frozen:
                layer = self.layers[layer_idx]
                return torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)
            if layer_idx < len(self.layers) and self.layers[layer_idx].get_seq_length() > 0:
                return key_states, value_states  # a replay of the recording pass
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    cache = _Replayable()
    if frozen_from is not None:
        import copy

        cache.layers = [copy.copy(layer) for layer in frozen_from.layers]
        cache.batch_select_indices(expand)
        cache.frozen = True
    return cache


class checkpointed_layers:
    """Context manager: ``decoder.layers`` run under ``torch.utils.checkpoint`` (non-reentrant).

    Only each layer's input is kept for the backward; the layer is re-run there (one more forward of
    the decoder, about a third more compute) — the activation memory of a micro-batch drops from ~2 MB
    to ~70 kB per token for SmolLM2. Dropout stays as the model's mode says (the trainer keeps
    ``eval()``). Works with :func:`forward_hidden`'s shared prefix through :func:`_replayable_cache`.
    """

    def __init__(self, decoder, enabled: bool = True):
        self.layers = list(getattr(decoder, "layers", [])) if enabled else []

    def __enter__(self):
        from torch.utils.checkpoint import checkpoint

        for layer in self.layers:
            inner = type(layer).forward.__get__(layer)

            def run(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            layer.forward = run
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.forward
        return False


def _fold_grad(shadow: torch.Tensor, param: torch.Tensor) -> None:
    """Move a shadow parameter's gradient into its parameter's ``.grad`` (post-accumulate hook)."""
    if param.grad is None:
        param.grad = shadow.grad
    else:
        param.grad.add_(shadow.grad)
    shadow.grad = None


def _shadow_params(module) -> dict[str, torch.Tensor]:
    """Each trainable parameter of ``module`` as a new leaf on the same storage, whose gradient is added
    to the parameter's ``.grad`` the moment it is computed.

    The shared-prefix forward uses every weight twice (prompt pass, response pass). With the same leaf in
    both, autograd holds the response pass's gradient of every weight until the prompt pass's arrives:
    a second full-size gradient buffered across the backward (~0.5 GB for SmolLM2). With a shadow leaf in
    the prompt pass each contribution is folded in as soon as it exists.
    """
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            sp = p.detach().requires_grad_(True)
            sp.register_post_accumulate_grad_hook(lambda t, p=p: _fold_grad(t, p))
            out[name] = sp
        else:
            out[name] = p
    return out


def forward_hidden(
    decoder, ro: Rollout, params: dict | None = None, *, share_prefix: bool = True, checkpoint: bool = False
) -> torch.Tensor:
    """``(N, T, D)`` final hidden states at the positions that predict the response tokens.

    Row ``t`` is the decoder output at column ``Lp - 1 + t``, which predicts ``response[:, t]``.
    ``params`` runs the decoder functionally with these tensors (``torch.func.functional_call``).

    ``share_prefix`` (used when ``params`` is None): consecutive rows of one prompt (``ro.group``) share
    its prompt, so the decoder runs on the ``u`` distinct prompts ``(u, Lp)`` with a KV cache, the cache
    is indexed out to the ``N`` rows (differentiably: the prompt's activations get the sum of its rows'
    gradients), and the response columns ``(N, T - 1)`` run on top of it. The result equals the plain
    forward up to rounding; with one row per prompt it runs the plain forward.

    ``checkpoint``: activation checkpointing of the decoder layers (:class:`checkpointed_layers`), when
    grad mode is on and ``params`` is None.
    """
    Lp, T = ro.prompt_len, ro.response.shape[1]
    ckpt = checkpoint and params is None and torch.is_grad_enabled()
    if share_prefix and params is None and ro.n > 1:
        first = torch.ones(ro.n, dtype=torch.bool, device=ro.group.device)
        first[1:] = ro.group[1:] != ro.group[:-1]  # (N,) first row of each run of one prompt
        uniq = first.nonzero()[:, 0]  # (u,) host sync: the number of distinct prompts
        if uniq.numel() < ro.n:
            expand = first.long().cumsum(0) - 1  # (N,) row -> its prompt's index in uniq
            with checkpointed_layers(decoder, ckpt):
                cache = _replayable_cache() if ckpt else None
                prefix_kwargs = dict(input_ids=ro.input_ids[uniq, :Lp],
                                     attention_mask=ro.attention_mask[uniq, :Lp],
                                     position_ids=ro.position_ids[uniq, :Lp], cache=cache,
                                     use_cache=True)  # fmt: skip
                if torch.is_grad_enabled() and not is_fsdp(decoder, recurse=True):  # FSDP swaps the weights
                    shadow = _shadow_params(decoder)
                    pre = torch.func.functional_call(decoder, shadow, args=(), kwargs=prefix_kwargs)
                else:
                    pre = decoder(**prefix_kwargs)
                h0 = pre.last_hidden_state[:, -1:][expand]  # (N, 1, D): predicts response[:, 0]
                if T == 1:
                    return h0
                if ckpt:
                    cache = _replayable_cache(pre.cache, expand)
                else:
                    cache = pre.cache
                    cache.batch_select_indices(expand)
                out = decoder(input_ids=ro.input_ids[:, Lp : Lp + T - 1],
                              attention_mask=ro.attention_mask[:, : Lp + T - 1],
                              position_ids=ro.position_ids[:, Lp : Lp + T - 1], cache=cache,
                              use_cache=True)  # fmt: skip
            return torch.cat([h0, out.last_hidden_state], 1)
    kwargs = dict(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=ro.position_ids,
                  use_cache=False)  # fmt: skip
    if params is None:
        with checkpointed_layers(decoder, ckpt):
            out = decoder(**kwargs)
    else:
        out = torch.func.functional_call(decoder, params, args=(), kwargs=kwargs)
    h = out.last_hidden_state  # (N, L, D)
    return h[:, Lp - 1 : Lp - 1 + T]


def score(
    model,
    ro: Rollout,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    entropy_grad: bool = False,
    s_star: bool = False,
    baseline: bool = False,
    share_prefix: bool = True,
    checkpoint: bool = False,
) -> TokenStats:
    """Per-token statistics of the response tokens under the model's current parameters.

    Differentiable with respect to the parameters when grad mode is on (``logp``, and ``entropy``
    with ``entropy_grad``). See :func:`scale.token_stats.token_stats`; ``share_prefix`` and
    ``checkpoint``: see :func:`forward_hidden`.
    """
    decoder, weight, bias = decoder_and_head(model)
    hidden = forward_hidden(decoder, ro, share_prefix=share_prefix, checkpoint=checkpoint)  # (N, T, D)
    return token_stats(
        hidden, weight, ro.response, ro.mask, bias=bias, temperature=temperature, chunk_size=chunk_size,
        entropy=True, entropy_grad=entropy_grad, s_star=s_star, baseline=baseline,
    )  # fmt: skip


@torch.no_grad()
def score_all(model, ro: Rollout, batch: int, **kwargs) -> TokenStats:
    """:func:`score` over all sequences, ``batch`` at a time, without gradient; results concatenated."""
    return TokenStats.cat([score(model, ro.rows(slice(s, s + batch)), **kwargs)
                           for s in range(0, ro.n, batch)])  # fmt: skip
