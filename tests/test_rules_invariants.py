"""Invariants of the rules (hypothesis), and the link between the rules and the theory (E4, E6).

Properties run on NumPy; ``tests/test_rules_parity.py`` shows torch and array_api_strict give the same
outputs. The gradient tests run on torch.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import theory as T
from tests.conftest import Backend, to_numpy
from tests.rule_strategies import (
    BatchData,
    batches,
    group_advantages,
    make_batch,
    output_to_numpy,
    real_batch,
    rules_for,
    run_rule,
    sample_tokens,
    token_rule_names,
)
from theory import rules as R

NP = Backend("numpy")
ALL = token_rule_names() + ["compose"]
SHAPING = (R.PPLShaping, R.PositionBonus, R.ProbWeighted)
WEIGHTING = (R.EntropyTarget, R.EntropicPI)  # controllers: weights in [w_min, w_max], not only {0, 1}


def _leaves(rule):
    return list(rule.rules) if isinstance(rule, R.Compose) else [rule]


# --- the output contract ---------------------------------------------------------------------------


def _check_contract(rule, d, out):
    """keep is a subset of valid; shapes; fractions in [0, 1]; neutral values on invalid tokens."""
    valid, shape = d.valid, d.shape
    keep = out["keep"]
    assert keep.shape == shape and keep.dtype == np.bool_
    assert not (keep & ~valid).any(), "keep must be a subset of valid"
    assert out["adv"].shape == shape and np.isfinite(out["adv"]).all()
    for k, v in out["metrics"].items():
        assert v.shape == ()
        if k.endswith("_frac"):
            assert 0.0 <= float(v) <= 1.0, (k, float(v))
    leaves = _leaves(rule)
    if out["weight"] is not None:
        ctl = [r for r in leaves if isinstance(r, WEIGHTING)]
        if ctl:
            lo, hi = min(r.w_min for r in ctl), max(r.w_max for r in ctl)
            assert ((out["weight"] >= lo) & (out["weight"] <= hi)).all()
        else:
            assert set(np.unique(out["weight"])) <= {0.0, 1.0}  # Clip-Cov detaches, never rescales
        assert (out["weight"][~valid] == 1.0).all()
    if out["kl_coef"] is not None:
        coefs = {0.0} | {r.coef for r in leaves if isinstance(r, R.KLCov)}
        assert set(np.unique(out["kl_coef"])) <= coefs
        assert (out["kl_coef"][~valid] == 0.0).all()
    if out["entropy_coef"] is not None:
        assert (out["entropy_coef"][~valid] == 0.0).all()
        assert (out["entropy_coef"] >= 0.0).all()
    if not any(isinstance(r, SHAPING) for r in leaves):
        np.testing.assert_array_equal(out["adv"], d.adv)  # selection rules never touch advantages
    else:
        # shaping preserves the sign of every advantage (and zero stays zero)
        assert (np.sign(out["adv"]) == np.sign(d.adv)).all()
    np.testing.assert_array_equal(out["adv"][~valid], d.adv[~valid])  # invalid tokens untouched


def _check_deterministic(a, b):
    for f in ("keep", "adv", "weight", "kl_coef", "entropy_coef"):
        if a[f] is None:
            assert b[f] is None
        else:
            np.testing.assert_array_equal(a[f], b[f])
    for k in a["metrics"]:
        np.testing.assert_array_equal(a["metrics"][k], b["metrics"][k])


def _check_no_leak(rule, d, ref, seed):
    """Changing every input on invalid tokens changes nothing on the valid ones (nor any metric)."""
    rng = np.random.default_rng(seed)
    inv = ~d.valid

    def scramble(a, lo, hi):
        return None if a is None else np.where(inv, rng.uniform(lo, hi, a.shape), a)

    d2 = replace(
        d,
        logp=scramble(d.logp, -30.0, 0.0),
        old_logp=scramble(d.old_logp, -30.0, 0.0),
        entropy=scramble(d.entropy, 0.0, 9.0),
        baseline=scramble(d.baseline, 0.0, 3.0),
        adv=scramble(d.adv, -5.0, 5.0),
        noise=scramble(d.noise, 0.0, 1.0),
        position=scramble(d.position, 0.0, 1.0),
    )
    got = output_to_numpy(run_rule(NP, rule, d2))
    v = d.valid
    np.testing.assert_array_equal(got["keep"], ref["keep"])
    np.testing.assert_allclose(got["adv"][v], ref["adv"][v], rtol=1e-9, atol=1e-12)
    for f in ("weight", "kl_coef", "entropy_coef"):
        if ref[f] is not None:
            np.testing.assert_allclose(got[f][v], ref[f][v], rtol=1e-9, atol=1e-12)
    for k in ref["metrics"]:
        np.testing.assert_allclose(got["metrics"][k], ref["metrics"][k], rtol=1e-9, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("name", ALL)
def test_rule_invariants(name):
    """Per rule: the output contract, determinism given the noise, and no leak from invalid tokens."""

    @given(rule=rules_for(name), d=batches(), seed=st.integers(0, 2**32 - 1))
    def check(rule, d, seed):
        out = output_to_numpy(run_rule(NP, rule, d))
        _check_contract(rule, d, out)
        _check_deterministic(out, output_to_numpy(run_rule(NP, rule, d)))
        if (~d.valid).any():
            _check_no_leak(rule, d, out, seed)

    check()


@given(alpha=st.sampled_from([0.1, 2.0]), d=batches())
def test_ppl_shaping_on_invalid_tokens(alpha, d):
    """PPL shaping scales each response's valid tokens by one factor and leaves invalid tokens unchanged.

    Rows without valid tokens get factor 1; keep is False on invalid tokens.
    """
    rule = R.PPLShaping(alpha=alpha)
    out = output_to_numpy(run_rule(NP, rule, d))
    adv = d.adv
    np.testing.assert_array_equal(out["adv"][~d.valid], adv[~d.valid])
    for i in range(adv.shape[0]):
        nz = (adv[i] != 0) & d.valid[i]
        if not nz.any():
            continue
        ratio = out["adv"][i][nz] / adv[i][nz]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)  # one factor per response
        assert not out["keep"][i][~d.valid[i]].any()


# --- thresholds at infinity, k = max(floor(frac n), 1) ---------------------------------------------


@given(d=batches(), variant=st.sampled_from(["reference", "paper"]), cls=st.sampled_from([R.ClipB, R.ClipV]))
def test_mu_infinite_keeps_all_valid(d, variant, cls):
    kw = {"max_frac": 1.0} if cls is R.ClipV and variant == "reference" else {}
    out = output_to_numpy(run_rule(NP, cls(variant=variant, mu=math.inf, **kw), d))
    np.testing.assert_array_equal(out["keep"], d.valid)
    assert float(out["metrics"]["clip_frac"]) == 0.0


@given(d=batches(), frac=st.sampled_from([0.0, 1e-4, 0.05, 0.2, 0.6, 1.0]))
def test_selection_counts(d, frac):
    """k = max(floor(frac * n_valid), 1): frac = 0 still selects one token (verl's ``max(..., 1)``)."""
    n = int(d.valid.sum())
    k = max(math.floor(frac * n), 1)
    # Clip-Cov with an unbounded band and a PPO clip that never binds: every valid token is a candidate
    wide = R.ClipCov(frac=frac, lb=-1e300, ub=1e300, clip_low=1.0, clip_high=1e300)
    w = output_to_numpy(run_rule(NP, wide, d))["weight"]
    assert int((w == 0).sum()) == min(k, n)
    if n:
        # the chosen ones are the k largest noise values among valid tokens
        chosen_noise = np.sort(d.noise[w == 0])
        rest = d.noise[d.valid & (w == 1)]
        assert rest.size == 0 or chosen_noise[0] > rest.max()
    kl = output_to_numpy(run_rule(NP, R.KLCov(frac=frac, coef=0.5), d))["kl_coef"]
    assert int((kl > 0).sum()) == min(k, n)
    # no candidates (an empty band): nothing is chosen, whatever k
    empty = R.ClipCov(frac=frac, lb=1e299, ub=1e300)
    np.testing.assert_array_equal(output_to_numpy(run_rule(NP, empty, d))["weight"], 1.0)


def test_frac_zero_selects_one_token_like_verl():
    """Documented verl behaviour: ``max(int(ratio * N), 1)``, so frac = 0 is not "off"."""
    d, _, _ = real_batch(0, 3, 5, 6)
    w = output_to_numpy(run_rule(NP, R.ClipCov(frac=0.0, lb=-1e9, ub=1e9), d))["weight"]
    assert int((w == 0).sum()) == 1
    kl = output_to_numpy(run_rule(NP, R.KLCov(frac=0.0), d))["kl_coef"]
    assert int((kl > 0).sum()) == 1


# --- determinism and noise -------------------------------------------------------------------------


@given(d=batches(allow_no_valid=False), frac=st.sampled_from([0.0, 0.1, 0.3]))
def test_clip_cov_choice_follows_noise(d, frac):
    """With more candidates than k, reversing the noise ranking changes the chosen set."""
    rule = R.ClipCov(frac=frac, lb=-1e300, ub=1e300, clip_low=1.0, clip_high=1e300)
    n = int(d.valid.sum())
    k = max(math.floor(frac * n), 1)
    assume(k < n)
    w1 = output_to_numpy(run_rule(NP, rule, d))["weight"]
    d2 = replace(d, noise=1.0 - d.noise)
    w2 = output_to_numpy(run_rule(NP, rule, d2))["weight"]
    assert int((w1 == 0).sum()) == int((w2 == 0).sum()) == k
    assert not np.array_equal(w1, w2)


# --- Compose ---------------------------------------------------------------------------------------


@given(rule=rules_for("compose"), d=batches(max_b=4, max_t=8))
def test_compose_equals_manual_chain(rule, d):
    """Compose: keep AND, adv chained, weight product, coefficients summed, metrics prefixed."""
    a, b = rule.rules
    out = output_to_numpy(run_rule(NP, rule, d))
    oa = run_rule(NP, a, d)
    ob = run_rule(NP, b, d, adv=to_numpy(oa.adv))
    oa, ob = output_to_numpy(oa), output_to_numpy(ob)
    np.testing.assert_array_equal(out["keep"], oa["keep"] & ob["keep"] & d.valid)
    np.testing.assert_allclose(out["adv"], ob["adv"], rtol=1e-15)
    for f in ("weight", "kl_coef", "entropy_coef"):
        parts = [o[f] for o in (oa, ob) if o[f] is not None]
        if not parts:
            assert out[f] is None
        elif f == "weight":
            np.testing.assert_allclose(out[f], np.prod(parts, axis=0))
        else:
            np.testing.assert_allclose(out[f], np.sum(parts, axis=0))
    for r, o in ((a, oa), (b, ob)):  # the strategy composes rules of different names
        for k, v in o["metrics"].items():
            np.testing.assert_array_equal(out["metrics"][f"{r.name}/{k}"], v)


# --- no gradient -----------------------------------------------------------------------------------


def _torch_batch(d, torch):
    def t(a, grad=True):
        if a is None:
            return None
        x = torch.from_numpy(np.array(a, dtype=np.float64))
        return x.requires_grad_(True) if grad else x

    return R.TokenBatch(
        logp=t(d.logp),
        adv=t(d.adv),
        valid=torch.from_numpy(d.valid.copy()),
        old_logp=t(d.old_logp),
        entropy=t(d.entropy),
        baseline=t(d.baseline),
        group=torch.from_numpy(d.group.copy()),
        position=t(d.position),
        step=d.step,
        stage=d.stage,
    ), t(d.noise)


def _assert_no_grad(out):
    for f in ("keep", "adv", "weight", "kl_coef", "entropy_coef"):
        x = getattr(out, f)
        assert x is None or not x.requires_grad, f
    for k, v in out.metrics.items():
        assert not v.requires_grad, k
    states = out.state if isinstance(out.state, tuple) else (out.state,)
    for s in states:
        assert s is None or not s.requires_grad, "state"


@given(rule=st.sampled_from(ALL).flatmap(rules_for), d=batches(max_b=4, max_t=8))
def test_torch_outputs_carry_no_gradient(rule, d):
    """Inputs with requires_grad=True: no output (arrays, metrics, state) is attached to the graph."""
    torch = pytest.importorskip("torch")
    batch, noise = _torch_batch(d, torch)
    out = rule(batch, noise=noise)
    _assert_no_grad(out)
    if isinstance(rule, R.EntropyBonus) and rule.adaptive:  # feed the (detached) state back
        _assert_no_grad(rule(batch, noise=noise, state=out.state))


def test_adaptive_state_with_grad_is_detached():
    torch = pytest.importorskip("torch")
    d, _, _ = real_batch(0, 2, 3, 4)
    batch, _ = _torch_batch(d, torch)
    state = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    _assert_no_grad(R.EntropyBonus(adaptive=True, target=10.0)(batch, state=state))


def test_empty_compose_is_rejected_and_compose_detaches():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="at least one rule"):
        R.Compose(())
    d, _, _ = real_batch(0, 2, 3, 4)
    batch, _ = _torch_batch(d, torch)
    _assert_no_grad(R.Compose((R.ProbWeighted(), R.PositionBonus(gate="always")))(batch))


# --- theory link: Clip_V / Clip_B remove the most entropy-decreasing negative tokens (E6) ------------

ETA = 1e-2
SEEDS = [0, 1, 2, 3, 4]


def _predicted_dH(z, tok, adv):
    """Per-token first-order entropy change (E6), ``-alpha (S* - E_p[S])`` with ``alpha = eta * A``."""
    dH = T.entropy_change_grpo(z, tok, ETA * adv)
    np.testing.assert_allclose(dH, -ETA * adv * T.deviation(z, tok), rtol=1e-12, atol=1e-15)
    return dH


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("max_frac", [1.0, 0.02])
def test_clip_v_removes_most_entropy_decreasing_negatives(seed, max_frac):
    d, z, tok = real_batch(seed, 8, 16, 12, valid_p=0.9)
    dH = _predicted_dH(z, tok, d.adv)
    out = output_to_numpy(run_rule(NP, R.ClipV(mu=1.0, max_frac=max_frac), d))
    removed = d.valid & ~out["keep"]
    kept_neg = d.valid & out["keep"] & (d.adv < 0)
    n_removed = int(removed.sum())
    if max_frac == 1.0:
        assert n_removed >= 3, "fixture must clip several tokens"
    else:
        assert n_removed == max(math.floor(0.02 * d.valid.sum()), 1)  # the cap binds
    assert (d.adv[removed] < 0).all()  # only negative-advantage tokens (no A = 0 here)
    assert (dH[removed] < 0).all()  # each one would have lowered the entropy
    assert dH[removed].max() <= dH[kept_neg].min()  # ... more than any kept negative token


@pytest.mark.parametrize("seed", SEEDS)
def test_clip_b_removes_lowest_s_star_negatives(seed):
    d, z, tok = real_batch(seed, 8, 16, 12, valid_p=0.9)
    dH = _predicted_dH(z, tok, d.adv)
    S = T.s_star(d.logp, d.entropy)
    np.testing.assert_allclose(S, np.take_along_axis(T.discriminator(z), tok[..., None], -1)[..., 0])
    out = output_to_numpy(run_rule(NP, R.ClipB(mu=1.0), d))
    removed = d.valid & ~out["keep"]
    kept_neg = d.valid & out["keep"] & (d.adv < 0)
    assert int(removed.sum()) >= 3, "fixture must clip several tokens"
    assert (d.adv[removed] < 0).all()
    assert S[removed].max() <= S[kept_neg].min()  # the lowest S* among negative-advantage tokens
    assert dH[removed].mean() < 0  # their (E6) contribution is strongly entropy-decreasing
    assert dH[removed].mean() < dH[kept_neg].mean()


def test_theory_link_batch_is_on_policy():
    """The fixture's per-token statistics are those of the softmax distributions it sampled from."""
    d, z, tok = real_batch(0, 3, 4, 5)
    np.testing.assert_allclose(d.entropy, T.entropy(z))
    np.testing.assert_allclose(d.baseline, T.vocab_baseline(z))
    np.testing.assert_allclose(d.logp, np.take_along_axis(T.log_softmax(z), tok[..., None], -1)[..., 0])
    batch = make_batch(NP, d)
    assert batch.old_logp is None


# --- theory link: one kept quadrant fixes the sign of the first-order entropy change (E4, E6) --------

#: the quadrant table of Theorem 3.3: sign of the first-order entropy change of a step on each quadrant
QUADRANT_DH_SIGN = {"pos_high": -1.0, "pos_low": 1.0, "neg_high": 1.0, "neg_low": -1.0}


def _shared_state_batch(seed, B, Tn, V, scale, valid_p):
    """``Tn`` random softmax states ``z`` (Tn, V), each visited by all ``B`` sequences (one GRPO group).

    Tokens are sampled on-policy; advantages are GRPO advantages of random binary rewards (or continuous
    ones when every reward would be equal). Returns ``(BatchData, z, tokens)``.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(Tn, V)) * scale
    zb = np.broadcast_to(z, (B, Tn, V))
    tok = sample_tokens(rng, zb)
    rewards = rng.integers(0, 2, size=B).astype(np.float64)
    if rewards.min() == rewards.max():
        rewards = rng.random(B)
    adv = np.broadcast_to(group_advantages(rewards, np.zeros(B, np.int64))[:, None], (B, Tn)).copy()
    logp = np.take_along_axis(T.log_softmax(zb), tok[..., None], axis=-1)[..., 0]
    d = BatchData(
        logp=logp,
        adv=adv,
        valid=rng.random((B, Tn)) < valid_p,
        old_logp=None,
        entropy=np.broadcast_to(T.entropy(z), (B, Tn)).copy(),
        baseline=np.broadcast_to(T.vocab_baseline(z), (B, Tn)).copy(),
        group=np.zeros(B, np.int64),
        noise=rng.random((B, Tn)),
    )
    return d, z, tok


def _sgd_step_dH(z, tok, d, out, eta):
    """Per-state first-order entropy change (E4) of one exact SGD step on the masked surrogate.

    The backend's loss is ``J = sum_{t in keep} w_t A_t log p_{k_t} / |keep|`` (a token mean over ``keep``);
    its exact gradient with respect to the logits of state ``s`` is ``sum_b w A (e_k - p_s) / |keep|``
    over the tokens at ``s`` (E5), so one SGD ascent step of size ``eta`` moves the logits by the sum of
    ``grpo_logit_update`` over those tokens. Returns ``(dH per state (Tn,), alpha per token (B, Tn))``.
    """
    keep = out["keep"]
    w = np.ones_like(d.adv) if out["weight"] is None else out["weight"]
    alpha = np.where(keep, eta * w * d.adv, 0.0) / max(int(keep.sum()), 1)  # (B, Tn)
    zb = np.broadcast_to(z, tok.shape + z.shape[-1:])
    dz = T.grpo_logit_update(zb, tok, alpha).sum(axis=0)  # (Tn, V): all tokens at a state add up
    return T.entropy_change_first_order(z, dz), alpha


def _check_quadrant_step(d, z, tok, q, in_normaliser, eta=ETA):
    out = output_to_numpy(run_rule(NP, R.QuadrantMask(keep=(q,), in_normaliser=in_normaliser), d))
    selected = out["keep"] if out["weight"] is None else out["keep"] & (out["weight"] == 1.0)
    dH, alpha = _sgd_step_dH(z, tok, d, out, eta)
    sign = QUADRANT_DH_SIGN[q]
    # each selected token's (E6) term -alpha (S* - E_p[S]) has the quadrant's sign ...
    terms = -alpha * T.deviation(np.broadcast_to(z, tok.shape + z.shape[-1:]), tok)  # (B, Tn)
    tol = 1e-12 * eta
    assert (sign * terms[selected] >= -tol).all()
    # ... and the state's first-order change is their sum (E4 is linear in dz), a sum of same-sign terms
    np.testing.assert_allclose(dH, terms.sum(axis=0), rtol=1e-9, atol=tol)
    assert (sign * dH >= -tol).all(), (q, dH)
    return dH, selected


@pytest.mark.parametrize("in_normaliser", [False, True])
@pytest.mark.parametrize("q", list(QUADRANT_DH_SIGN))
def test_quadrant_mask_step_has_the_sign_of_the_quadrant_table(q, in_normaliser):
    """Hypothesis: random states, one kept quadrant (by the deviation): sign(dH) per state as in §4.2."""

    @given(
        seed=st.integers(0, 2**32 - 1),
        B=st.integers(2, 8),
        Tn=st.integers(1, 6),
        V=st.integers(2, 12),
        scale=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
        valid_p=st.sampled_from([0.6, 1.0]),
    )
    def check(seed, B, Tn, V, scale, valid_p):
        d, z, tok = _shared_state_batch(seed, B, Tn, V, scale, valid_p)
        _check_quadrant_step(d, z, tok, q, in_normaliser)

    check()


@pytest.mark.parametrize("seed", SEEDS)
def test_quadrant_mask_steps_are_strictly_signed_and_partition_the_grpo_step(seed):
    """Fixed states where every quadrant has tokens: the sign is strict on every state a kept token visits,
    and with the normaliser unchanged the four one-quadrant steps add up to the plain GRPO step."""
    d, z, tok = _shared_state_batch(seed, 8, 6, 10, 2.0, 0.9)
    assert len(np.unique(np.sign(d.adv))) == 2, "fixture needs both advantage signs"
    total = np.zeros(z.shape[0])
    for q, sign in QUADRANT_DH_SIGN.items():
        dH, selected = _check_quadrant_step(d, z, tok, q, in_normaliser=True)
        assert selected.any(), f"seed {seed}: no {q} token"
        visited = selected.any(axis=0)  # states with at least one kept token
        assert (sign * dH[visited] > 0).all() and (dH[~visited] == 0).all()
        total += dH
    grpo = R.QuadrantMask(keep=T.QUADRANTS, in_normaliser=True)
    full = output_to_numpy(run_rule(NP, grpo, d))
    assert (full["weight"][d.valid] == 1.0).all()  # A != 0 and D != 0 everywhere: nothing undefined here
    dH_full, _ = _sgd_step_dH(z, tok, d, full, ETA)
    np.testing.assert_allclose(total, dH_full, rtol=1e-9, atol=1e-15)
