r"""Rollouts for the GRPO trainer: batched sampling with a KV cache, response masks, scoring forwards.

A :class:`Rollout` holds one step's ``N = P x G`` sequences in one padded layout::

    input_ids   (N, L)   [left-padded prompt | response, right-padded]      L = Lp + T
    attention   (N, L)   1 on real prompt tokens and on the response up to its first eos (inclusive)
    response    (N, T)   input_ids[:, Lp:]
    mask        (N, T)   bool, True on response tokens that enter the loss

Prompts are left-padded so that every response starts at column ``Lp`` and :func:`sample` can run
one batched ``model.generate`` with the KV cache. The pad token may equal eos (SmolLM2 and ``tiny``:
``pad == eos == <|im_end|>``), so padding is found from the attention mask and the first eos, never
from pad ids. A response keeps its first eos (the model must learn to stop) and nothing after it;
one without eos in ``max_new_tokens`` is *truncated* (all its tokens count). Trailing columns that
no sequence uses are cut, so ``T`` is the longest response.

Position ids are ``cumsum(attention) - 1`` (what ``generate`` uses with left padding), passed
explicitly to every scoring forward so that models with absolute positions score exactly what they
sampled; RoPE models are shift-invariant anyway.

Scoring (:func:`score`) runs the decoder only (``model.get_decoder()``), takes the final hidden states
of the positions that predict response tokens, and hands them with the lm_head weight to
:func:`scale.token_stats.token_stats`, which never builds the ``(N, V)`` logits. Generation's own
``scores`` are *processed* logits (after temperature / top-k / top-p warping), so behaviour log-probs
are recomputed by a no-grad forward instead, with the same code as the training forward, at the
sampling temperature (TRL and verl score ``logits / temperature`` too). With ``top_p < 1`` or
``top_k > 0`` the true sampling distribution is truncated, and the scored one is not; this is the
usual convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .token_stats import TokenStats, token_stats

__all__ = ["Rollout", "decoder_and_head", "eos_ids", "forward_hidden", "response_mask", "sample", "score"]


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
        group: ``(N,)`` long, the prompt index ``0..P-1`` of each sequence.
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

    @property
    def n(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, sl) -> Rollout:
        """The sequences ``sl`` (a slice) as a smaller :class:`Rollout` (tensors are views)."""
        idx = range(self.n)[sl]
        return Rollout(
            self.input_ids[sl], self.attention_mask[sl], self.position_ids[sl], self.prompt_len,
            self.response[sl], self.mask[sl], self.truncated[sl],
            [self.prompts[i] for i in idx], [self.completions[i] for i in idx], self.group[sl],
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


def _tokenize_prompts(tokenizer, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(P, Lp)`` ids and attention mask. Chat-template text already holds its specials."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    enc = tokenizer(
        list(texts), padding=True, padding_side="left", return_tensors="pt",
        add_special_tokens=not has_template,
    )  # fmt: skip
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


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
) -> Rollout:
    """Sample ``group_size`` completions for each prompt text in one batched ``generate`` call.

    The sampling stream is torch's global RNG (the trainer seeds it per step). Runs under
    ``torch.no_grad`` (not ``inference_mode``: the ids feed a training forward later). Every
    generation parameter is passed explicitly, so the model's own ``generation_config`` (e.g. a
    default ``top_k = 50``) cannot change the sampling distribution.
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    ids, attn = _tokenize_prompts(tokenizer, prompts, device)  # (P, Lp)
    ids = ids.repeat_interleave(group_size, 0)  # (N, Lp)
    attn = attn.repeat_interleave(group_size, 0)
    gen_cfg = GenerationConfig(
        do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
        max_new_tokens=int(max_new_tokens), min_new_tokens=int(min_new_tokens) or None,
        repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
        bos_token_id=tokenizer.bos_token_id, use_cache=True,
    )  # fmt: skip
    seq = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen_cfg)  # (N, Lp + T')
    Lp = ids.shape[1]
    response = seq[:, Lp:]  # (N, T')
    mask, truncated = response_mask(response, eos)
    T = int(mask.sum(-1).max().item()) if response.shape[1] else 0  # cut unused trailing columns
    T = max(T, 1)
    if response.shape[1] < T:  # pragma: no cover - generate always returns at least one token
        pad = response.new_full((response.shape[0], T - response.shape[1]), tokenizer.pad_token_id)
        response = torch.cat([response, pad], 1)
        mask = torch.cat([mask, mask.new_zeros(pad.shape)], 1)
    response, mask = response[:, :T].contiguous(), mask[:, :T].contiguous()
    input_ids = torch.cat([seq[:, :Lp], response], 1)  # (N, L)
    attention = torch.cat([attn, mask.long()], 1)
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    rows = response.cpu().tolist()
    keep = mask.cpu().tolist()
    completions = tokenizer.batch_decode(
        [[t for t, k in zip(r, m, strict=True) if k] for r, m in zip(rows, keep, strict=True)],
        skip_special_tokens=True,
    )
    P = len(prompts)
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        prompt_len=Lp,
        response=response,
        mask=mask,
        truncated=truncated,
        prompts=[p for p in prompts for _ in range(group_size)],
        completions=completions,
        group=torch.arange(P, device=device).repeat_interleave(group_size),
    )


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]:
    """``(decoder, lm_head weight, lm_head bias)`` of a Hugging Face causal LM."""
    head = model.get_output_embeddings()
    return model.get_decoder(), head.weight, getattr(head, "bias", None)


def forward_hidden(decoder, ro: Rollout, params: dict | None = None) -> torch.Tensor:
    """``(N, T, D)`` final hidden states at the positions that predict the response tokens.

    Row ``t`` is the decoder output at column ``Lp - 1 + t``, which predicts ``response[:, t]``.
    ``params`` runs the decoder functionally with these tensors (``torch.func.functional_call``).
    """
    kwargs = dict(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=ro.position_ids,
                  use_cache=False)  # fmt: skip
    if params is None:
        out = decoder(**kwargs)
    else:
        out = torch.func.functional_call(decoder, params, args=(), kwargs=kwargs)
    h = out.last_hidden_state  # (N, L, D)
    Lp, T = ro.prompt_len, ro.response.shape[1]
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
) -> TokenStats:
    """Per-token statistics of the response tokens under the model's current parameters.

    Differentiable with respect to the parameters when grad mode is on (``logp``, and ``entropy``
    with ``entropy_grad``). See :func:`scale.token_stats.token_stats`.
    """
    decoder, weight, bias = decoder_and_head(model)
    hidden = forward_hidden(decoder, ro)  # (N, T, D)
    return token_stats(
        hidden, weight, ro.response, ro.mask, bias=bias, temperature=temperature, chunk_size=chunk_size,
        entropy=True, entropy_grad=entropy_grad, s_star=s_star, baseline=baseline,
    )  # fmt: skip


@torch.no_grad()
def score_all(model, ro: Rollout, batch: int, **kwargs) -> TokenStats:
    """:func:`score` over all sequences, ``batch`` at a time, without gradient; results concatenated."""
    parts = [score(model, ro.rows(slice(s, s + batch)), **kwargs) for s in range(0, ro.n, batch)]
    cat = {}
    for name in ("logp", "entropy", "s_star", "baseline"):
        vals = [getattr(p, name) for p in parts]
        cat[name] = None if vals[0] is None else torch.cat(vals, 0)
    return TokenStats(**cat)
