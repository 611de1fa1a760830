"""toy.kernels and the row-local sampler: blocking, batching and buffering change no bit of a run."""

from __future__ import annotations

import numpy as np
import pytest

import toy.kernels as kernels
from toy.bandit import Bandit, sample_tokens
from toy.grpo import GRPOConfig, init_state, step


def test_run_streams_give_the_per_step_draws_and_select_keeps_pending_ones(monkeypatch):
    seeds = np.random.SeedSequence(5).spawn(3)
    plain = [np.random.default_rng(s) for s in seeds]
    streams = kernels.RunStreams([np.random.default_rng(s) for s in seeds])
    monkeypatch.setattr(kernels, "STREAM_BUFFER_VALUES", 100)  # refills mid-way, with pending draws
    for n in (11, 11, 11, 40, 3, 11, 200, 11):
        want = np.stack([g.random(n) for g in plain])
        np.testing.assert_array_equal(streams.take(n), want)
    assert streams.pending > 0  # the generators ran ahead
    one = streams.select(slice(1, 2))
    for n in (11, 50, 11):
        np.testing.assert_array_equal(one.take(n)[0], plain[1].random(n))


def test_replacing_rngs_with_draws_pending_is_an_error_not_a_silent_shift():
    b = Bandit(vocab=6, n_correct=2)
    cfg = GRPOConfig(group_size=4)
    st = init_state(b, cfg, runs=3, seed=0)
    step(b, cfg, st, diagnostics=False)
    st.rngs = st.rngs[:1]
    st.params = st.params[:1].copy()
    with pytest.raises(ValueError, match="pending"):
        step(b, cfg, st, diagnostics=False)


def test_sample_tokens_rows_do_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    w = np.exp(3.0 * rng.standard_normal((50, 1000)))
    u = rng.random((50, 16))
    u[7, 0] = np.nextafter(1.0, 0.0)  # rounds onto the row's total
    batch = sample_tokens(w, u)
    for i in (0, 7, 49):
        np.testing.assert_array_equal(sample_tokens(w[i : i + 1], u[i : i + 1])[0], batch[i])
    # the inverse CDF in token order, as a full cumulative sum gives it
    cdf = np.cumsum(w, axis=-1)
    want = (cdf[:, None, :] <= (u * cdf[:, -1:])[:, :, None]).sum(-1)
    assert (batch == np.minimum(want, 999)).mean() > 0.999


@pytest.mark.parametrize("V", [2, 7, 12, 97])
def test_sample_tokens_never_draws_a_zero_weight_token_even_at_u_near_one(V):
    rng = np.random.default_rng(V)
    w = rng.random((20, V)) * (rng.random((20, V)) < 0.5)
    w[:, 0] = 1.0  # every row has a positive token ...
    w[:, -1] = 0.0  # ... and its last token has weight 0
    u = np.concatenate([rng.random((20, 200)), np.full((20, 4), np.nextafter(1.0, 0.0))], axis=1)
    tok = sample_tokens(w, u)
    assert (np.take_along_axis(w, tok, -1) > 0).all()


def test_sample_tokens_rejects_rows_without_a_positive_finite_sum():
    w = np.ones((3, 4))
    w[1] = 0.0
    with pytest.raises(ValueError, match="row 1 .* sum 0.0"):
        sample_tokens(w, np.zeros((3, 2)))
    w[1, 2] = np.inf
    with pytest.raises(ValueError, match="row 1"):
        sample_tokens(w, np.zeros((3, 2)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_steps_are_the_same_bits_for_any_row_blocking(monkeypatch, dtype):
    b = Bandit(n_prompts=3, horizon=2, vocab=40, n_correct=4, need=1)
    cfg = GRPOConfig(group_size=4, lr=0.4, init_scale=1.0, dtype=dtype)
    out = []
    for block in (1, 100, 1 << 20):  # one run per block, a few runs, all runs in one block
        monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", block)
        st = init_state(b, cfg, runs=9, seed=2)
        hist = [step(b, cfg, st, diagnostics=False) for _ in range(6)]
        out.append((st.params.copy(), np.stack([h["entropy"] for h in hist])))
    for params, ent in out[1:]:
        np.testing.assert_array_equal(params, out[0][0])
        np.testing.assert_array_equal(ent, out[0][1])


def test_sgd_step_in_blocks_equals_the_gradient_then_the_step():
    rng = np.random.default_rng(1)
    R, M, G, T, V = 4, 2, 3, 2, 9
    z = rng.standard_normal((R, M, T, V))
    e = np.exp(z - z.max(-1, keepdims=True))
    Z = e.sum(-1)
    tokens = rng.integers(0, V, (R, M, G, T))
    flat = ((np.arange(R)[:, None, None, None] * M + np.arange(M)[None, :, None, None]) * T
            + np.arange(T)[None, None, None, :]) * V + tokens
    coef = rng.standard_normal((R, M, G, T))
    grad = kernels.logit_gradient(coef, flat, e, Z, np.empty_like(z)).copy()
    params = z.copy()
    kernels.logit_gradient(coef, flat, e, Z, np.empty_like(z), sgd_params=params, lr=0.3)
    np.testing.assert_allclose(params, z + 0.3 * grad, rtol=1e-14, atol=1e-15)
