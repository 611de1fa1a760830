"""The rollout's own decode loop and shared-prefix forward against transformers and the plain forward.

* :func:`scale.rollout.filter_logits` keeps exactly the tokens ``TopKLogitsWarper`` / ``TopPLogitsWarper``
  keep;
* greedy sampling (``top_k = 1``) gives ``generate``'s greedy tokens, ``min_new_tokens`` bans eos;
* the behaviour statistics recorded while sampling equal a scoring forward's (float64: to 1e-10);
* the shared-prefix forward gives the plain forward's hidden states and parameter gradients (to the
  float32 rounding of transformers' RMSNorm, which upcasts to float32 even in a float64 model).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from scale.models import load_model  # noqa: E402
from scale.rollout import (  # noqa: E402
    _tokenize_prompts,
    decoder_and_head,
    filter_logits,
    forward_hidden,
    sample,
    score,
    score_all,
)

PROMPTS = ["What is 2 + 3?", "Sort 5, 1", "hi"]


@pytest.fixture(scope="module")
def tiny64():
    model, tok = load_model("tiny", seed=5)
    return model.to(torch.float64), tok


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.9), (5, 1.0), (7, 0.5), (0, 0.01), (1, 1.0), (0, 1.0)])
def test_filter_logits_matches_transformers_warpers(top_k, top_p):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 100))
    z = torch.randn(16, 40, generator=g) * 3
    z[0, :4] = 2.0  # ties at the top
    ref = z.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    got = filter_logits(z, top_k=top_k, top_p=top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.equal(got[~torch.isinf(got)], z[~torch.isinf(got)])
    assert (~torch.isinf(got)).any(-1).all()  # at least one token survives


def test_greedy_sampling_equals_generate_greedy(tiny64):
    model, tok = tiny64
    ro = sample(model, tok, PROMPTS, group_size=2, max_new_tokens=7, top_k=1)
    ids, attn = _tokenize_prompts(tok, PROMPTS, "cpu")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=7,
                             pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id])  # fmt: skip
    T = ro.response.shape[1]
    ref = out[:, ro.prompt_len : ro.prompt_len + T].repeat_interleave(2, 0)
    assert torch.equal(torch.where(ro.mask, ro.response, -1), torch.where(ro.mask, ref, -1))
    assert torch.equal(ro.group, torch.tensor([0, 0, 1, 1, 2, 2]))


def test_min_new_tokens_bans_eos(tiny64):
    model, tok = tiny64
    torch.manual_seed(0)
    ro = sample(model, tok, PROMPTS, group_size=4, max_new_tokens=6, min_new_tokens=4, temperature=3.0)
    assert (ro.response[:, :4] != tok.eos_token_id).all()


@pytest.mark.parametrize(("top_p", "top_k"), [(1.0, 0), (0.8, 20)])
def test_behaviour_statistics_equal_a_scoring_forward(tiny64, top_p, top_k):
    model, tok = tiny64
    torch.manual_seed(1)
    ro = sample(model, tok, PROMPTS, group_size=3, max_new_tokens=8, temperature=0.7, top_p=top_p,
                top_k=top_k)  # fmt: skip
    beh = ro.behaviour
    st = score_all(model, ro, 4, temperature=0.7, s_star=True, baseline=True)
    for name in ("logp", "entropy", "s_star", "baseline"):
        a, b = getattr(beh, name), getattr(st, name)
        assert a.dtype == torch.float64 and a.shape == ro.mask.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        assert torch.all(a[~ro.mask] == 0)
    half = ro.rows(slice(3, 6))  # rows() slices the behaviour statistics too
    assert torch.equal(half.behaviour.logp, beh.logp[3:6])
    assert sample(model, tok, PROMPTS, group_size=2, max_new_tokens=3, stats=False).behaviour is None


def test_shared_prefix_forward_equals_the_plain_forward(tiny64):
    model, tok = tiny64
    torch.manual_seed(2)
    ro = sample(model, tok, PROMPTS, group_size=4, max_new_tokens=6, temperature=1.5)
    decoder, _, _ = decoder_and_head(model)
    for rows in (slice(0, 12), slice(2, 9), slice(5, 6)):  # whole groups, partial groups, one row
        part = ro.rows(rows)
        with torch.no_grad():
            a = forward_hidden(decoder, part)
            b = forward_hidden(decoder, part, share_prefix=False)
        m = part.mask  # only the positions that predict response tokens matter
        torch.testing.assert_close(a[m], b[m], rtol=0, atol=1e-10)

    grads = []
    for share in (True, False):
        model.zero_grad(set_to_none=True)
        st = score(model, ro, temperature=0.9, entropy_grad=True, share_prefix=share)
        (st.logp.sum() + 0.3 * st.entropy.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    # float32 noise floor: transformers' LlamaRMSNorm computes in float32 even for a float64 model, and the
    # two paths sum the prompt's gradient in different orders (forward values agree to the last bit here)
    for n in grads[0]:
        scale = grads[1][n].abs().max().item()
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6 * max(scale, 1.0))


@pytest.mark.parametrize("share_prefix", [True, False])
def test_activation_checkpointing_gives_the_same_gradients(tiny64, share_prefix):
    model, tok = tiny64
    torch.manual_seed(3)
    ro = sample(model, tok, PROMPTS, group_size=3, max_new_tokens=5, temperature=1.2)
    res = []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        st = score(model, ro, temperature=0.8, entropy_grad=True, share_prefix=share_prefix, checkpoint=ckpt)
        (st.logp.sum() - 0.2 * st.entropy.sum()).backward()
        res.append((st.logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    model.zero_grad(set_to_none=True)
    assert torch.equal(res[0][0], res[1][0])
    for n in res[0][1]:  # the replayed layers compute the same numbers in the same order
        torch.testing.assert_close(res[1][1][n], res[0][1][n], rtol=1e-12, atol=1e-14)
    assert "forward" not in vars(decoder_and_head(model)[0].layers[0])  # checkpointed_layers restored it


def test_rollout_and_scoring_use_no_deprecated_transformers_api(tiny64, caplog):
    """Sampling and every scoring path (shared prefix, checkpointed, plain) on the current cache API:
    no FutureWarning or DeprecationWarning (transformers 5.25 deprecates ``past_key_values`` for
    ``cache``, removed in 5.40) and no deprecation message on transformers' logger."""
    import logging
    import warnings

    model, tok = tiny64
    torch.manual_seed(4)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        ro = sample(model, tok, PROMPTS, group_size=3, max_new_tokens=4)
        for share, ckpt in ((True, False), (True, True), (False, False)):
            st = score(model, ro, entropy_grad=True, share_prefix=share, checkpoint=ckpt)
            st.logp.sum().backward()
    model.zero_grad(set_to_none=True)
    bad = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not bad, [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in bad]
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()], caplog.text
