"""toy/ core: bandits, sampling, and vectorised GRPO checked against the theory."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest

import theory
from theory import pass_at_k
from theory.rules import ClipB, EntropyBonus, HighEntropyMask
from toy.bandit import Bandit, sample_tokens
from toy.grpo import GRPOConfig, _flat_index, init_state, step
from toy.kernels import logit_gradient


def test_sample_tokens_matches_probabilities_and_skips_zero():
    rng = np.random.default_rng(0)
    p = np.array([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0]])
    tok = sample_tokens(p, rng.random((2, 40000)))
    assert tok.shape == (2, 40000)
    freq = np.stack([np.bincount(t, minlength=4) for t in tok]) / 40000
    np.testing.assert_allclose(freq[0], p[0], atol=0.01)
    assert freq[0, 1] == 0 and np.all(tok[1] == 3)


def test_pass_at_k_matches_brute_force_enumeration():
    n = 6
    for c in range(n + 1):
        correct = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(correct, k))
            brute = sum(any(s) for s in subsets) / comb(n, k)
            assert pass_at_k(n, np.array(c), k) == pytest.approx(brute, abs=1e-12), (c, k)


def _logit_gradient(coef: np.ndarray, tokens: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Oracle: sum over tokens of ``coef * (e_k - p)`` at each state, ``(R, M, G, T)`` -> ``(R, M, T, V)``.

    ``d log p_k / dz = e_k - p`` (E5), so this is the logit gradient of ``sum coef * log p_k``.
    """
    V = p.shape[-1]
    grad = -coef.sum(axis=2)[..., None] * p  # (R, M, T, V)
    np.add.at(grad.reshape(-1), _flat_index(tokens, V).ravel(), coef.ravel())
    return grad


def test_logit_gradient_equals_explicit_sum():
    """The update's logit gradient (unnormalised ``e`` and ``Z``, into a workspace) == the oracle ==
    the explicit sum over tokens."""
    rng = np.random.default_rng(1)
    R, M, G, T, V = 2, 3, 4, 2, 5
    tokens = rng.integers(0, V, size=(R, M, G, T))
    coef = rng.normal(size=(R, M, G, T))
    z = rng.normal(size=(R, M, T, V))
    p = theory.softmax(z)
    want = np.zeros((R, M, T, V))
    for r, m, g, t in itertools.product(range(R), range(M), range(G), range(T)):
        e = np.zeros(V)
        e[tokens[r, m, g, t]] = 1.0
        want[r, m, t] += coef[r, m, g, t] * (e - p[r, m, t])
    np.testing.assert_allclose(_logit_gradient(coef, tokens, p), want, atol=1e-12)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    out = np.full_like(z, np.nan)
    got = logit_gradient(coef, _flat_index(tokens, V), e, e.sum(axis=-1), out)
    assert got is out
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_first_order_prediction_matches_the_realised_change():
    """Small SGD steps: (E4) of the actual update ~ exact dH, and the sum of (E6) token terms == (E4)."""
    b = Bandit(n_prompts=3, horizon=2, vocab=8, n_correct=2, need=1)
    cfg = GRPOConfig(group_size=8, lr=0.02, init_scale=1.5)
    st = init_state(b, cfg, runs=6, seed=3)
    exact, first = [], []
    for _ in range(15):
        d = step(b, cfg, st)
        np.testing.assert_allclose(d["dH_tokens_first"], d["dH_first"], rtol=1e-9, atol=1e-15)
        exact.append(d["dH_exact"])
        first.append(d["dH_first"])
    exact, first = np.concatenate(exact), np.concatenate(first)
    r2 = 1 - np.sum((exact - first) ** 2) / np.sum((exact - exact.mean()) ** 2)
    assert r2 > 0.99, r2


def test_runs_are_independent_of_the_batch_they_run_in():
    b = Bandit(n_prompts=2, horizon=3, vocab=5, n_correct=2, need=2, reward="bernoulli")
    cfg = GRPOConfig(group_size=4, lr=0.3, epochs=2, rule=ClipB(mu=1.0), init_scale=1.0)
    together = init_state(b, cfg, runs=4, seed=11)
    alone = init_state(b, cfg, runs=4, seed=11)
    alone.params, alone.rngs = alone.params[2:3].copy(), alone.rngs[2:3]
    for _ in range(8):
        d_all = step(b, cfg, together)
        d_one = step(b, cfg, alone)
        assert d_all["reward"][2] == d_one["reward"][0]
    np.testing.assert_array_equal(together.logits[2], alone.logits[0])


def test_plain_grpo_collapses_entropy_on_a_k_armed_bandit():
    b = Bandit(vocab=20, n_correct=3)
    cfg = GRPOConfig(group_size=8, lr=0.5)
    st = init_state(b, cfg, runs=8, seed=0)
    hist = [step(b, cfg, st) for _ in range(60)]
    assert hist[-1]["entropy"].mean() < 0.5 * hist[0]["entropy"].mean()
    assert hist[-1]["reward"].mean() > hist[0]["reward"].mean()


def test_rules_act_in_one_place():
    """A mask that keeps only the top-20% entropy tokens changes the update; an entropy bonus raises H."""
    b = Bandit(n_prompts=4, horizon=3, vocab=6, n_correct=2, need=2)
    base = GRPOConfig(group_size=8, lr=0.5, init_scale=1.0)
    masked = GRPOConfig(group_size=8, lr=0.5, init_scale=1.0, rule=HighEntropyMask(rho=0.2))
    bonus = GRPOConfig(group_size=8, lr=0.5, init_scale=1.0, rule=EntropyBonus(coef=5.0))
    states = {name: init_state(b, c, runs=3, seed=5) for name, c in [("base", base), ("mask", masked),
                                                                     ("bonus", bonus)]}
    d_base = step(b, base, states["base"])
    d_mask = step(b, masked, states["mask"])
    d_bonus = step(b, bonus, states["bonus"])
    assert np.all(d_mask["rule/clip_frac"] > 0.5)  # ~80% of the tokens get weight 0
    assert np.all(d_mask["keep_frac"] == 1.0) and np.all(d_base["keep_frac"] == 1.0)
    assert not np.allclose(states["mask"].logits, states["base"].logits)
    assert np.all(d_bonus["dH_exact"] > d_base["dH_exact"])


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Bandit(vocab=1), "vocab"),
        (lambda: Bandit(n_prompts=0), "n_prompts"),
        (lambda: Bandit(vocab=4, n_correct=4), "n_correct"),
        (lambda: Bandit(horizon=2, need=3), "need"),
        (lambda: Bandit(reward="gaussian"), "reward"),
        (lambda: GRPOConfig(group_size=1), "group_size"),
        (lambda: GRPOConfig(lr=-0.1), "lr"),
        (lambda: GRPOConfig(optimizer="rmsprop"), "optimizer"),
        (lambda: GRPOConfig(rule="no_such_rule"), "no_such_rule"),
        (lambda: GRPOConfig(aggregation="sum"), "aggregation"),
    ],
)
def test_bad_configs_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_adam_and_seq_mean_run():
    b = Bandit(n_prompts=2, horizon=2, vocab=5, reward="pm1")
    cfg = GRPOConfig(group_size=4, lr=0.05, optimizer="adam", aggregation="seq_mean", epochs=3)
    st = init_state(b, cfg, runs=2, seed=0)
    for _ in range(5):
        d = step(b, cfg, st)
    assert np.all(np.isfinite(st.logits)) and set(d) >= {"reward", "dH_exact", "quad_pos_high_dH"}
