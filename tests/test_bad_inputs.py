"""Bad inputs (issue 16, "no silent wrong"): NaN and infinities, empty batches, V = 1, huge logits and
rewards, half precision, for the public theory functions and every registered rule.

Each case either gives its documented defined result (finite wherever the inputs are finite) or raises a
clear ``ValueError``. The policies under test:

* vocabulary functions (``theory._xp``): a row of logits with a NaN, a ``+inf`` or only ``-inf`` is NaN in
  that row only; ``-inf`` entries are masked (probability 0); a row of a logit update ``dz`` with a
  non-finite entry is NaN (``theory.first_order``); float16/bfloat16 are computed in float32;
* rules and batch statistics (``docs/rules.md`` "Non-finite inputs", ``theory.rules.base``,
  ``theory.diagnostics``): a token with a non-finite input is left out as if it were not valid, and
  ``nonfinite_frac`` reports the share of the valid tokens left out;
* ``theory.grpo_advantages``: computed on rewards scaled by a power of two, so huge finite rewards give the
  advantages of the formula; a non-finite reward makes its group NaN.

The central property is one hypothesis test (``test_nonfinite_tokens_act_as_invalid_tokens``): for every
registered rule (and a Compose), on numpy and torch, poisoning some tokens with NaN/+-inf gives the same
output at the other tokens as marking those tokens invalid; poisoned tokens are not kept; and
``nonfinite_frac`` is the poisoned share of the valid tokens.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import theory as T
from tests.conftest import Backend, to_numpy
from tests.rule_strategies import batches, output_to_numpy, rules_for, run_rule, token_rule_names
from theory import rules as R
from theory.diagnostics import batch_statistics

NP_TORCH = ["numpy", "torch"]
BAD = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


def _torch():
    return pytest.importorskip("torch")


# ============================================================== vocabulary functions: one bad row


def _k(n):
    return np.arange(n) % 3  # sampled index per row (V >= 3 below)


#: name -> f(logits, k, dz) for every public function of (..., V) logits
ROW_FUNCS = {
    "log_softmax": lambda z, k, dz: T.log_softmax(z),
    "softmax": lambda z, k, dz: T.softmax(z),
    "entropy": lambda z, k, dz: T.entropy(z),
    "entropy_from_logp": lambda z, k, dz: T.entropy_from_logp(T.log_softmax(z)),
    "discriminator": lambda z, k, dz: T.discriminator(z),
    "vocab_baseline": lambda z, k, dz: T.vocab_baseline(z),
    "sign_threshold": lambda z, k, dz: T.sign_threshold(z),
    "deviation": lambda z, k, dz: T.deviation(z, k),
    "prob_change_single_logit": lambda z, k, dz: T.prob_change_single_logit(z, k, 0.1),
    "entropy_change_single_logit": lambda z, k, dz: T.entropy_change_single_logit(z, k, 0.1),
    "entropy_change_first_order": lambda z, k, dz: T.entropy_change_first_order(z, dz),
    "grpo_logit_update": lambda z, k, dz: T.grpo_logit_update(z, k, 0.1),
    "entropy_change_grpo": lambda z, k, dz: T.entropy_change_grpo(z, k, 0.1),
    "entropy_hessian": lambda z, k, dz: T.entropy_hessian(z),
    "entropy_change_second_order": lambda z, k, dz: T.entropy_change_second_order(z, dz),
    "exact_entropy_change": lambda z, k, dz: T.exact_entropy_change(z, dz),
}
DZ_FUNCS = ("entropy_change_first_order", "entropy_change_second_order", "exact_entropy_change")


def _rows(x, n):
    return to_numpy(x).reshape(n, -1)


def _call(be, name, z, dz=None):
    dz = np.full_like(z, 0.05) if dz is None else dz
    return ROW_FUNCS[name](be.asarray(z), be.asarray(_k(z.shape[0])), be.asarray(dz))


@pytest.mark.parametrize("bad", ["nan", "+inf", "all -inf"])
@pytest.mark.parametrize("name", list(ROW_FUNCS))
def test_a_nonfinite_logit_row_is_nan_in_that_row_only(be, name, bad):
    z = np.random.default_rng(0).normal(size=(4, 5))
    poisoned = z.copy()
    if bad == "all -inf":
        poisoned[1] = -np.inf
    else:
        poisoned[1, 2] = BAD[bad]
    got, ref = _rows(_call(be, name, poisoned), 4), _rows(_call(be, name, z), 4)
    assert np.isnan(got[1]).all(), got[1]
    keep = [0, 2, 3]
    assert np.isfinite(got[keep]).all()
    np.testing.assert_allclose(got[keep], ref[keep], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(ROW_FUNCS))
def test_masked_logits_are_legal(be, name):
    """``-inf`` entries (not all of a row) are masked: finite outputs, probability and S exactly 0 there."""
    z = np.random.default_rng(1).normal(size=(3, 5))
    z[0, 1] = z[2, 4] = z[2, 3] = -np.inf
    out = _rows(_call(be, name, z), 3)
    if name == "log_softmax":
        assert out[0, 1] == -np.inf and np.isfinite(np.delete(out[0], 1)).all()
    else:
        assert np.isfinite(out).all(), out
    if name in ("softmax", "discriminator"):
        assert out[0, 1] == 0.0 and out[2, 3] == 0.0 and out[2, 4] == 0.0


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name", DZ_FUNCS)
def test_a_nonfinite_update_row_is_nan_in_that_row_only(be, name, bad):
    z = np.random.default_rng(2).normal(size=(3, 4))
    dz = np.random.default_rng(3).normal(size=(3, 4)) * 0.1
    poisoned = dz.copy()
    poisoned[2, 1] = BAD[bad]
    got, ref = to_numpy(_call(be, name, z, poisoned)), to_numpy(_call(be, name, z, dz))
    assert np.isnan(got[2])
    np.testing.assert_allclose(got[:2], ref[:2], rtol=1e-12, atol=1e-15)


def test_nonfinite_step_sizes_are_nan_where_they_are():
    z = np.random.default_rng(4).normal(size=(3, 4))
    k = _k(3)
    alpha = np.array([0.1, np.nan, 0.2])
    for f in (T.entropy_change_grpo, T.entropy_change_single_logit):
        out = f(z, k, alpha)
        assert np.isnan(out[1]) and np.isfinite(out[[0, 2]]).all()
    A = T.effective_step_size(0.1, np.array([1.0, np.nan, -np.inf, 2.0]))
    np.testing.assert_array_equal(A[[0, 3]], [0.1, 0.2])
    assert np.isnan(A[1]) and A[2] == -np.inf


def test_elementwise_functions_on_nonfinite_entries(be):
    """s_star: NaN stays NaN, ``log p = -inf`` gives 0 (p = 0); quadrant: NaN is undefined (-1); the
    predicted sign of a NaN is 0; pass@k of a NaN count is NaN. Finite entries stay finite and exact."""
    lp = np.array([np.nan, -np.inf, np.log(0.5), np.log(0.5)])
    H = np.array([1.0, 1.0, np.nan, 1.0])
    S = to_numpy(T.s_star(be.asarray(lp), be.asarray(H)))
    assert np.isnan(S[0]) and S[1] == 0.0 and np.isnan(S[2])
    np.testing.assert_allclose(S[3], 0.5 * (1.0 + np.log(0.5)), rtol=1e-15)
    adv, dev = be.asarray(np.array([np.nan, 1.0, -1.0])), be.asarray(np.array([1.0, np.nan, -0.5]))
    np.testing.assert_array_equal(to_numpy(T.quadrant(adv, dev)), [-1, -1, 3])
    np.testing.assert_array_equal(to_numpy(T.entropy_change_sign(adv, dev)), [0.0, 0.0, -1.0])
    p = to_numpy(T.pass_at_k(4, be.asarray(np.array([np.nan, 1.0])), 2))
    assert np.isnan(p[0]) and p[1] == 0.5


def test_entropy_from_logp_of_no_distribution_is_nan():
    """A log-prob row whose maximum is not finite is no distribution: NaN (like such a row of logits)."""
    logp = np.array([[-np.inf, -np.inf], [np.nan, 0.0], [np.inf, 0.0], [0.0, -np.inf]])
    H = T.entropy_from_logp(logp)
    assert np.isnan(H[:3]).all()
    assert H[3] == 0.0


# ------------------------------------------------------------------ V = 1, V = 0, huge logits, half

#: the value of each function for a one-token vocabulary (p = 1, H = 0: every change is 0)
V1_VALUE = {"softmax": 1.0, "sign_threshold": 1.0}


@pytest.mark.parametrize("name", list(ROW_FUNCS))
def test_one_token_vocabulary(be, name):
    z = np.array([[0.3], [-2.0], [7.0]])
    k = np.zeros(3, dtype=np.int64)
    out = to_numpy(ROW_FUNCS[name](be.asarray(z), be.asarray(k), be.asarray(np.full_like(z, 0.5))))
    np.testing.assert_allclose(out, V1_VALUE.get(name, 0.0), atol=1e-15)


@pytest.mark.parametrize("name", list(ROW_FUNCS))
def test_empty_vocabulary_is_a_clear_error(be, name):
    with pytest.raises(ValueError, match="vocabulary"):
        _call(be, name, np.zeros((2, 0)), np.zeros((2, 0)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(ROW_FUNCS))
def test_huge_logits_lose_nothing_to_the_shift(name, dtype):
    """``|z| = 1e4``: the same distribution as the logits shifted to 0, to the dtype's precision."""
    small = np.random.default_rng(5).normal(size=(3, 4)) * 2.0
    small[1, 0] = -2e4  # a vanishing entry (p = 0 in float32 and float64)
    big = (small + 1e4).astype(dtype)
    shifted = (big.astype(np.float64) - 1e4).astype(dtype)  # exact: the same logits, shifted
    k, dz = _k(3), np.full((3, 4), 0.05, dtype=dtype)
    got = ROW_FUNCS[name](big, k, dz)
    want = ROW_FUNCS[name](shifted, k, dz)
    if name == "log_softmax":  # log p of the vanishing entry is about -2e4: compare relatively
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == "float32" else 1e-12)
        return
    assert np.isfinite(got).all()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == "float32" else {"rtol": 1e-12, "atol": 1e-15}
    np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(ROW_FUNCS))
def test_half_precision_logits_are_computed_in_float32(name, half):
    torch = _torch()
    z = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(getattr(torch, half))
    k, dz = torch.as_tensor(_k(3)), torch.full((3, 5), 0.05, dtype=z.dtype)
    got = ROW_FUNCS[name](z, k, dz)
    want = ROW_FUNCS[name](z.float(), k, dz.float())
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


# ================================================================================ GRPO advantages


@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_huge_rewards_give_the_advantages_of_small_ones(be, scale, correction):
    """(r - m)/(s + eps) = ((r - m)/c)/(s/c + eps/c): 1e200 rewards are 2-rewards scaled, up to eps."""
    big = T.grpo_advantages(be.asarray(np.array([1e200, 0.0, 0.0, 0.0])), scale=scale, correction=correction)
    small = T.grpo_advantages(be.asarray(np.array([2.0, 0.0, 0.0, 0.0])), scale=scale, correction=correction,
                              eps=0.0)  # fmt: skip
    # mean 0.5, centred (1.5, -0.5, -0.5, -0.5); std 1 (n - 1) or sqrt(3)/2 (n)
    want = np.array([1.5, -0.5, -0.5, -0.5]) / (1.0 if correction else math.sqrt(3.0) / 2.0)
    np.testing.assert_allclose(to_numpy(big), want, rtol=1e-14)
    np.testing.assert_allclose(to_numpy(small), want, rtol=1e-14)
    with_eps = to_numpy(T.grpo_advantages(be.asarray(np.array([2.0, 0.0, 0.0, 0.0])), scale=scale,
                                          correction=correction))  # fmt: skip
    np.testing.assert_allclose(with_eps, want, rtol=2e-6)  # eps = 1e-6 against std ~ 1


def test_rewards_near_the_float_range_do_not_overflow(be):
    big = np.finfo(float).max
    r = np.array([[1e308, -1e308, 0.5e308, 0.0], [1.7e308, 1.7e308, 1.7e308, 1.7e308], [big, 0.0, 0.0, 0.0]])
    for scale in ("group", "batch"):
        A = to_numpy(T.grpo_advantages(be.asarray(r), scale=scale, eps=0.0))
        ref = to_numpy(T.grpo_advantages(be.asarray(r / 1e300), scale=scale, eps=0.0))  # scale invariant
        np.testing.assert_allclose(A, ref, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(A[1], 0.0)  # a tied group is exactly 0
    none = to_numpy(T.grpo_advantages(be.asarray(r), scale="none"))
    want = np.array([0.875, -1.125, 0.375, -0.125]) * 1e308  # mean 0.125e308
    np.testing.assert_allclose(none[0], want, rtol=1e-12)
    np.testing.assert_array_equal(none[1], 0.0)


def test_float32_rewards_near_the_float32_range():
    torch = _torch()
    r = torch.tensor([3e38, 0.0, 0.0, 0.0])
    A = T.grpo_advantages(r)
    assert A.dtype == torch.float32 and torch.isfinite(A).all()
    torch.testing.assert_close(A, torch.tensor([1.5, -0.5, -0.5, -0.5]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", NP_TORCH)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_ordinary_rewards_give_the_direct_formula_bit_for_bit(backend, dtype, scale):
    """Dividing by a power of two is exact: for rewards that do not overflow, nothing changes."""
    rng = np.random.default_rng(6)
    r = np.concatenate([rng.normal(size=(20, 8)) * 3.7, rng.integers(0, 2, size=(20, 8))]).astype(dtype)
    be = Backend(backend)
    got = to_numpy(T.grpo_advantages(be.asarray(r), scale=scale))
    x = be.asarray(r)
    xp = np if backend == "numpy" else _torch()
    mean = xp.mean(x, -1, keepdims=True) if backend == "numpy" else x.mean(-1, keepdim=True)
    centred = x - mean
    tied = r.max(-1, keepdims=True) == r.min(-1, keepdims=True)
    if scale == "group":
        std = np.std(r, -1, ddof=1, keepdims=True) if backend == "numpy" else x.std(-1, keepdim=True)
    else:
        std = np.std(r, ddof=1) if backend == "numpy" else x.std()
    want = to_numpy(centred) if scale == "none" else to_numpy(centred / (std + 1e-6))
    want = np.where(tied, 0.0, want)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad", list(BAD))
def test_a_nonfinite_reward_makes_its_group_nan(be, bad):
    r = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0], [0.0, 2.0, 1.0, 0.0]])
    poisoned = r.copy()
    poisoned[1, 2] = BAD[bad]
    for scale in ("group", "none"):
        got = to_numpy(T.grpo_advantages(be.asarray(poisoned), scale=scale))
        assert np.isnan(got[1]).all()
        clean = to_numpy(T.grpo_advantages(be.asarray(r), scale=scale))
        np.testing.assert_array_equal(got[[0, 2]], clean[[0, 2]])
    assert np.isnan(to_numpy(T.grpo_advantages(be.asarray(poisoned), scale="batch"))).all()  # its std is NaN


def test_advantage_edge_shapes_and_values(be):
    # a tied group is 0, also with eps = 0 (no 0/0)
    tied = to_numpy(T.grpo_advantages(be.asarray(np.array([[2.0, 2.0, 2.0], [1.0, 0.0, 2.0]])), eps=0.0))
    np.testing.assert_array_equal(tied[0], 0.0)
    np.testing.assert_allclose(tied[1], [0.0, -1.0, 1.0], rtol=1e-15)
    # a singleton group: R / (1 + eps), also for a reward near the float range
    single = to_numpy(T.grpo_advantages(be.asarray(np.array([[1e308], [-3.0]]))))
    np.testing.assert_allclose(single[:, 0], [1e308 / (1 + 1e-6), -3.0 / (1 + 1e-6)], rtol=1e-15)
    # no prompts: an empty result of the same shape
    for scale in ("group", "batch", "none"):
        assert to_numpy(T.grpo_advantages(be.asarray(np.zeros((0, 4))), scale=scale)).shape == (0, 4)
    for bad in (np.zeros((2, 0)), np.zeros(())):
        with pytest.raises(ValueError, match="G >= 1"):
            T.grpo_advantages(be.asarray(bad))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_rewards(half):
    torch = _torch()
    r = torch.tensor([[1.0, 0.0, 0.5, 0.25], [3.0, 3.0, 3.0, 3.0]], dtype=getattr(torch, half))
    A = T.grpo_advantages(r)
    assert A.dtype == torch.float32 and torch.equal(A, T.grpo_advantages(r.float()))


# =============================================================================== batch statistics

STAT_FIELDS = ("entropy", "logp", "s_star", "baseline", "adv", "adv_eff")


def _stat_arrays(shape, seed=0):
    rng = np.random.default_rng(seed)
    a = {k: rng.normal(size=shape) for k in STAT_FIELDS}
    a["valid"] = rng.random(shape) < 0.7
    return a


def _stats(be, arrays):
    st = batch_statistics(**{k: be.asarray(v) for k, v in arrays.items()})
    return {k: to_numpy(v) for k, v in st.items()}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("field", STAT_FIELDS)
@pytest.mark.parametrize("backend", NP_TORCH)
def test_batch_statistics_leave_nonfinite_tokens_out(backend, field, bad):
    be = Backend(backend)
    a = _stat_arrays((2, 5, 6))
    a["valid"][0, 1, :3] = True
    poison = np.zeros((2, 5, 6), dtype=bool)
    poison[0, 1, :2] = True  # two valid tokens of the first batch...
    poison[0, 1, 4] = True  # ... and possibly an invalid one; the second batch is clean
    poisoned = {**a, field: np.where(poison, BAD[bad], a[field])}
    got = _stats(be, poisoned)
    ref = _stats(be, {**a, "valid": a["valid"] & ~poison})
    for k in ref:
        if k != "nonfinite_frac":
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-12, atol=1e-15, err_msg=k)
            assert np.isfinite(got[k]).all(), k
    n_bad, n_valid = (a["valid"] & poison)[0].sum(), a["valid"][0].sum()
    np.testing.assert_allclose(got["nonfinite_frac"], [n_bad / n_valid, 0.0], rtol=1e-15)
    assert ref["nonfinite_frac"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("shape", [(3, 0), (0, 4), (2, 0, 5), (3, 4)])
@pytest.mark.parametrize("backend", NP_TORCH)
def test_batch_statistics_of_empty_batches_are_zero(backend, shape):
    """No token (B = 0, T = 0, or valid all False) and no finite token: every statistic is 0, the
    non-finite share 0 and 1."""
    be = Backend(backend)
    a = _stat_arrays(shape)
    a["valid"] = np.zeros(shape, dtype=bool)
    st = _stats(be, a)
    assert all(v.shape == shape[:-2] for v in st.values())
    assert {k: v.tolist() for k, v in st.items()} == {k: np.zeros(shape[:-2]).tolist() for k in st}
    if np.prod(shape) == 0:
        return
    a["valid"][:] = True
    a["logp"][:] = np.nan  # every token non-finite
    st = _stats(be, a)
    assert float(st.pop("nonfinite_frac")) == 1.0
    assert {k: float(v) for k, v in st.items()} == dict.fromkeys(st, 0.0)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_batch_statistics_of_half_precision_inputs(half):
    torch = _torch()
    a = {k: torch.as_tensor(v) for k, v in _stat_arrays((4, 6), seed=1).items()}
    low = {k: (v.to(getattr(torch, half)) if v.dtype != torch.bool else v) for k, v in a.items()}
    got = batch_statistics(**low)
    want = batch_statistics(**{k: (v.float() if v.dtype != torch.bool else v) for k, v in low.items()})
    for k, v in want.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k


# ============================================================================================ rules

#: one instance of every registered token rule that does real work on small batches
RULE_CASES = {
    "clip_b": R.ClipB(mu=0.5),
    "clip_b_paper": R.ClipB(variant="paper", mu=0.5, logp_source="current"),
    "clip_v": R.ClipV(mu=0.3, max_frac=0.2),
    "clip_v_paper": R.ClipV(variant="paper", mu=0.5, center=True),
    "clip_cov": R.ClipCov(frac=0.2, lb=-1e9, ub=1e9),
    "kl_cov": R.KLCov(frac=0.2),
    "high_entropy_mask": R.HighEntropyMask(),
    "high_entropy_mask_keep": R.HighEntropyMask(in_normaliser=False),
    "entropy_bonus": R.EntropyBonus(coef=0.01),
    "entropy_bonus_adaptive": R.EntropyBonus(adaptive=True, coef=0.3, target=5.0),
    "ppl_shaping": R.PPLShaping(alpha=0.5),
    "position_bonus": R.PositionBonus(gate="always"),
    "prob_weighted": R.ProbWeighted(),
    "quadrant_mask": R.QuadrantMask(),
    "entropy_target": R.EntropyTarget(schedule="constant", target=2.0),
    "entropy_target_hold": R.EntropyTarget(by="s_star"),
    "entropy_target_weights": R.EntropyTarget(schedule="constant", target=2.0, actuator="weights"),
    "entropic_pi": R.EntropicPI(schedule="cosine", target=2.0, final_target=0.5, total_steps=10),
    "compose": R.make_rule("clip_b:mu=0.5+position_bonus:gate=always+kl_cov:frac=0.2"),
}


def test_the_cases_cover_every_registered_rule():
    assert {r.name for r in RULE_CASES.values()} >= set(token_rule_names())


def _fields(shape, seed=0):
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.5, size=shape)
    adv_seq = rng.choice([-1.5, -0.5, 0.0, 0.5, 1.5], size=shape[:-1])
    return {
        "logp": lp,
        "old_logp": lp + 0.3 * rng.normal(size=shape),
        "adv": np.broadcast_to(adv_seq[..., None], shape).copy(),
        "valid": rng.random(shape) < 0.8,
        "entropy": rng.uniform(0.0, 3.0, size=shape),
        "baseline": rng.uniform(0.0, 0.2, size=shape),
        "group": np.broadcast_to(np.arange(shape[-2]) // 2, shape[:-1]).copy(),
        "noise": rng.random(shape),
    }


def _apply(be, rule, f, **dtype):
    conv = (lambda a: be.asarray(a)) if not dtype else dtype["conv"]
    noise = f.get("noise")
    arrays = {k: be.asarray(v) if k in ("valid", "group") else conv(v) for k, v in f.items() if k != "noise"}
    return rule(R.TokenBatch(**arrays), noise=None if noise is None else conv(noise))


def _fracs(out):
    return {k: to_numpy(v) for k, v in out.metrics.items() if k.endswith("_frac")}


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 0), (2, 0, 4), (0, 3, 4), (3, 4)])
@pytest.mark.parametrize("case", list(RULE_CASES))
@pytest.mark.parametrize("backend", NP_TORCH)
def test_rules_on_empty_batches(backend, case, shape):
    """B = 0, T = 0, no leading batch, or valid all False: nothing kept, neutral outputs, fractions 0."""
    be, rule = Backend(backend), RULE_CASES[case]
    f = _fields(shape)
    f["valid"] = np.zeros(shape, dtype=bool)
    out = _apply(be, rule, f)
    keep = to_numpy(out.keep)
    assert keep.shape == shape and not keep.any()
    np.testing.assert_array_equal(to_numpy(out.adv), f["adv"])
    for name, neutral in (("weight", 1.0), ("kl_coef", 0.0), ("entropy_coef", 0.0)):
        if getattr(out, name) is not None:
            np.testing.assert_array_equal(to_numpy(getattr(out, name)), neutral)
    for k, v in out.metrics.items():  # (a constant such as entropy_bonus/coef may stay 0-d)
        assert tuple(v.shape) in (shape[:-2], ()), k
    fracs = _fracs(out)
    assert "nonfinite_frac" in fracs
    assert all((v == 0.0).all() for v in fracs.values()), fracs


@pytest.mark.parametrize("case", list(RULE_CASES))
@pytest.mark.parametrize("backend", NP_TORCH)
def test_rules_on_a_batch_without_a_finite_token(backend, case):
    """Every token has a NaN log-prob, an infinite entropy or a -inf advantage: nothing is kept, every
    output is finite, ``nonfinite_frac`` is 1 and every other fraction 0."""
    be, rule = Backend(backend), RULE_CASES[case]
    f = _fields((3, 5))
    f["valid"][0, 0] = True
    which = np.arange(15).reshape(3, 5) % 3
    f["logp"] = np.where(which == 0, np.nan, f["logp"])
    f["entropy"] = np.where(which == 1, np.inf, f["entropy"])
    f["adv"] = np.where(which == 2, -np.inf, f["adv"])
    out = _apply(be, rule, f)
    assert not to_numpy(out.keep).any()
    for name in ("adv", "weight", "kl_coef", "entropy_coef"):
        if getattr(out, name) is not None:
            assert np.isfinite(to_numpy(getattr(out, name))).all(), name
    fracs = _fracs(out)
    shares = {k: float(fracs.pop(k)) for k in list(fracs) if k.endswith("nonfinite_frac")}
    assert "nonfinite_frac" in shares and set(shares.values()) == {1.0}, shares
    assert all(float(v) == 0.0 for v in fracs.values()), fracs


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(RULE_CASES))
def test_rules_compute_half_precision_inputs_in_float32(case, half):
    """float16/bfloat16 batches are computed in float32: the float32 outputs of the same (rounded) values."""
    torch = _torch()
    be, rule = Backend("torch"), RULE_CASES[case]
    f = _fields((6, 8), seed=2)
    low = lambda a: torch.from_numpy(a).to(getattr(torch, half))  # noqa: E731
    got = _apply(be, rule, f, conv=low)
    want = _apply(be, rule, f, conv=lambda a: low(a).float())
    assert torch.equal(got.keep, want.keep)
    assert got.adv.dtype == torch.float32
    for name in ("adv", "weight", "kl_coef", "entropy_coef"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None) and (g is None or torch.equal(g, w)), name
    for k, w in want.metrics.items():
        g = got.metrics[k]
        assert torch.equal(g, w) or (torch.isnan(w).all() and torch.isnan(g).all()), k


@pytest.mark.parametrize("backend", NP_TORCH)
def test_clip_b_one_nan_logp_clips_the_same_tokens(backend):
    """The bug of issue 16: one NaN log-prob among 256 tokens made Clip_B's mean and std NaN and kept
    every token. Now that token is left out and the rest are clipped as if it were not valid."""
    be, rule = Backend(backend), R.make_rule("clip_b:mu=0.5")
    f = _fields((16, 16), seed=3)
    f["valid"][:] = True
    f["adv"][:8] = -1.0  # half the sequences negative: Clip_B (reference) drops only those
    clean = _apply(be, rule, f)
    poisoned = _apply(be, rule, {**f, "old_logp": np.where(np.arange(256).reshape(16, 16) == 37, np.nan,
                                                            f["old_logp"])})  # fmt: skip
    invalid = _apply(be, rule, {**f, "valid": np.arange(256).reshape(16, 16) != 37})
    keep = to_numpy(poisoned.keep)
    np.testing.assert_array_equal(keep, to_numpy(invalid.keep))
    assert not keep.flat[37]
    assert 150 < keep.sum() < 250, keep.sum()  # the rule is on (before the fix: 256 kept)
    assert abs(int(keep.sum()) - int(to_numpy(clean.keep).sum())) <= 3
    frac = lambda out: to_numpy(out.metrics["clip_frac"])  # noqa: E731
    np.testing.assert_allclose(frac(poisoned), frac(invalid))
    assert float(to_numpy(poisoned.metrics["clip_frac"])) > 0.1
    assert float(to_numpy(poisoned.metrics["nonfinite_frac"])) == 1 / 256


def test_a_nonfinite_position_leaves_its_token_out():
    f = _fields((3, 6), seed=4)
    f["valid"][:] = True
    f["adv"][:] = 1.0
    pos = np.tile(np.linspace(0.0, 0.9, 6), (3, 1))
    rule = R.PositionBonus(gate="always")
    got = _apply(Backend("numpy"), rule, {**f, "position": np.where(pos > 0.8, np.nan, pos)})
    ref = _apply(Backend("numpy"), rule, {**f, "position": pos, "valid": pos <= 0.8})
    np.testing.assert_array_equal(got.keep, pos <= 0.8)
    np.testing.assert_array_equal(got.adv, ref.adv)
    assert float(got.metrics["nonfinite_frac"]) == 3 / 18


# ----------------------------------------------------------------------------- the central property

FLOAT_FIELDS = R.base.FLOAT_FIELDS
NAMES = [*token_rule_names(), "compose"]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), name=st.sampled_from(NAMES), backend=st.sampled_from(NP_TORCH))
def test_nonfinite_tokens_act_as_invalid_tokens(data, name, backend):
    """Poisoning tokens with NaN/+-inf (in one or more fields) = marking them invalid, everywhere else.

    Compared with the batch whose poisoned tokens are simply marked invalid (their original values kept):
    the same keep-mask (poisoned tokens never kept), advantages, weights, penalty coefficients, state and
    metrics; the advantage of a poisoned token is its input if finite, else 0; ``nonfinite_frac`` (every
    ``.../nonfinite_frac`` of a Compose) is the poisoned share of the valid tokens.
    """
    rule = data.draw(rules_for(name), label="rule")
    d = data.draw(batches(max_b=5, max_t=10), label="batch")
    rate = data.draw(st.sampled_from([0.0, 0.1, 0.4, 1.0]), label="rate")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    poison = rng.random(d.shape) < rate
    fields = [f for f in FLOAT_FIELDS if getattr(d, f) is not None]
    first = rng.integers(0, len(fields), size=d.shape)  # every poisoned token gets >= 1 bad field
    bad = {}
    for i, f in enumerate(fields):
        hit = poison & ((first == i) | (rng.random(d.shape) < 0.25))
        bad[f] = np.where(hit, rng.choice([np.nan, np.inf, -np.inf], size=d.shape), getattr(d, f))
    be = Backend(backend)
    got = output_to_numpy(run_rule(be, rule, d, **bad))
    ref = output_to_numpy(run_rule(be, rule, d, valid=d.valid & ~poison))

    np.testing.assert_array_equal(got["keep"], ref["keep"])
    assert not got["keep"][poison].any()
    adv_in = bad.get("adv", d.adv)
    want_adv = np.where(poison, np.where(np.isfinite(adv_in), adv_in, 0.0), ref["adv"])
    np.testing.assert_allclose(got["adv"], want_adv, rtol=1e-12, atol=1e-15)
    for f in ("weight", "kl_coef", "entropy_coef"):
        assert (got[f] is None) == (ref[f] is None), f
        if ref[f] is not None:
            np.testing.assert_allclose(got[f], ref[f], rtol=1e-12, atol=1e-15, err_msg=f)
    states = [(got["state"], ref["state"])]
    while states:
        a, b = states.pop()
        if isinstance(b, tuple):
            states.extend(zip(a, b, strict=True))
        elif b is not None:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    assert set(got["metrics"]) == set(ref["metrics"])
    n_valid = d.valid.sum()
    share = (d.valid & poison).sum() / max(n_valid, 1)
    for k, v in got["metrics"].items():
        if k.endswith("nonfinite_frac"):
            np.testing.assert_allclose(v, share, rtol=1e-12, err_msg=k)
            assert float(ref["metrics"][k]) == 0.0
        else:
            np.testing.assert_allclose(v, ref["metrics"][k], rtol=1e-12, atol=1e-15, equal_nan=True,
                                       err_msg=k)  # fmt: skip
