"""The entropy controllers ``entropy_target`` (predictive, E6) and ``entropic_pi`` (EntroPIC-style PI).

Semantics on fixed batches (the weights move the predicted and the actual first-order entropy change toward
the target, bounds, integral, schedules, 'hold step k', calibration feedback, state round trips) and
backend parity of multi-step state chains (numpy, torch, array_api_strict). The shared rule suites
(parity, invariants, bad inputs, batched, compile) cover both rules through their case tables.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import theory as T
from tests.conftest import Backend, to_numpy
from tests.rule_strategies import make_batch, real_batch
from theory import rules as R

NP = Backend("numpy")
BACKENDS = [Backend("numpy"), Backend("torch"), Backend("array_api_strict")]
UP, DOWN = ("pos_low", "neg_high"), ("pos_high", "neg_low")


def _batch(seed=0, B=8, Tn=6, V=5, **kw):
    d, z, tok = real_batch(seed, B, Tn, V, **kw)
    return d, z, tok


def _weights(**kw):
    """The quadrant-weight actuator with its raw law (no brake)."""
    return R.EntropyTarget(actuator="weights", accelerate=True, **kw)


def _m(out, k):
    return float(to_numpy(out.metrics[k]))


def _quadrant_sums(d):
    """``P_q`` by hand: (1/N) sum over the valid tokens of quadrant q of ``-A D``."""
    D = np.exp(d.logp) * (d.entropy + d.logp) - d.baseline
    code = T.quadrant(d.adv, D)
    n = max(d.valid.sum(), 1)
    dh = np.where(d.valid, -d.adv * D, 0.0) / n
    return {q: float(dh[d.valid & (code == i)].sum()) for i, q in enumerate(T.QUADRANTS)}, code


def _entropy_after(z, tok, w_adv, eta):
    """Entropy at every position after the tabular GRPO step ``δz = η w A (e_k − p)`` (E5)."""
    p = np.exp(T.log_softmax(z))
    onehot = np.eye(z.shape[-1])[tok]
    z2 = z + eta * w_adv[..., None] * (onehot - p)
    return T.entropy(z2)


# --- entropy_target, actuator="weights": the prediction and the weights -----------------------------


@pytest.mark.parametrize("target", [3.0, 0.05])
def test_weights_move_the_predicted_change_toward_the_target(target):
    d, _, _ = _batch()
    out = _weights(schedule="constant", target=target)(make_batch(NP, d))
    raise_h = target > _m(out, "entropy_mean")
    p, p0 = _m(out, "predicted_dh"), _m(out, "predicted_dh_unweighted")
    assert (p > p0) if raise_h else (p < p0)
    for q in UP:
        assert (_m(out, f"w_{q}") >= 1.0) if raise_h else (_m(out, f"w_{q}") <= 1.0)
    for q in DOWN:
        assert (_m(out, f"w_{q}") <= 1.0) if raise_h else (_m(out, f"w_{q}") >= 1.0)


def test_unclipped_weights_close_the_wanted_fraction_exactly():
    """A large calibration keeps ``s`` inside its bounds: predicted = (gain e + I)/c (``I`` = 0 on the
    first call), weights by hand."""
    d, _, _ = _batch(seed=1)
    rule = _weights(schedule="constant", target=1.5, calibration=50.0, gain=0.3, ki=0.1)
    out = rule(make_batch(NP, d))
    P, code = _quadrant_sums(d)
    e = 1.5 - d.entropy[d.valid].mean()
    want = 0.3 * e / 50.0
    up, down = P["pos_low"] + P["neg_high"], P["pos_high"] + P["neg_low"]
    s = (want - up - down) / (up - down)
    assert abs(s) < 1.0
    np.testing.assert_allclose(_m(out, "predicted_dh"), want, rtol=1e-12)
    np.testing.assert_allclose(_m(out, "predicted_dh_unweighted"), up + down, rtol=1e-12)
    np.testing.assert_allclose(_m(out, "error"), e, rtol=1e-12)
    w = to_numpy(out.weight)
    for i, q in enumerate(T.QUADRANTS):
        cells = d.valid & (code == i)
        np.testing.assert_allclose(w[cells], 1.0 + s if q in UP else 1.0 - s, rtol=1e-12)
        np.testing.assert_allclose(_m(out, f"w_{q}"), 1.0 + s if q in UP else 1.0 - s, rtol=1e-12)
    assert (w[~d.valid] == 1.0).all()


@pytest.mark.parametrize("target", [3.0, 0.05])
def test_the_actual_first_order_change_follows_the_prediction(target):
    """On a tabular softmax batch the weighted step changes the mean entropy by about η · predicted_dh,
    and in the direction of the target (relative to the unweighted step)."""
    d, z, tok = _batch(seed=2, B=10, Tn=8, V=6)
    out = _weights(schedule="constant", target=target)(make_batch(NP, d))
    eta, w = 1e-3, to_numpy(out.weight)
    H0 = d.entropy[d.valid].mean()
    adv = np.where(d.valid, d.adv, 0.0)  # α_t = η w_t A_t; the token-mean ΔH is then η · predicted_dh
    dH_w = _entropy_after(z, tok, w * adv, eta)[d.valid].mean() - H0
    dH_1 = _entropy_after(z, tok, adv, eta)[d.valid].mean() - H0
    np.testing.assert_allclose(dH_w, eta * _m(out, "predicted_dh"), rtol=0.05, atol=1e-9)
    np.testing.assert_allclose(dH_1, eta * _m(out, "predicted_dh_unweighted"), rtol=0.05, atol=1e-9)
    assert (dH_w > dH_1) if target > H0 else (dH_w < dH_1)


@pytest.mark.parametrize("w_min,w_max", [(0.0, 2.0), (0.5, 3.0), (0.9, 1.05), (1.0, 1.0)])
def test_weights_stay_in_the_shared_factor_range(w_min, w_max):
    d, _, _ = _batch(seed=3)
    s_lo, s_hi = max(w_min - 1, 1 - w_max), min(w_max - 1, 1 - w_min)
    for target in (10.0, 0.0):  # saturate both ways
        out = _weights(schedule="constant", target=target, w_min=w_min, w_max=w_max)(make_batch(NP, d))
        w = to_numpy(out.weight)[d.valid]
        assert (w >= 1 + s_lo - 1e-15).all() and (w <= 1 + s_hi + 1e-15).all()
        assert (w >= w_min).all() and (w <= w_max).all()
        s = _m(out, "w_pos_low") - 1.0
        assert s == pytest.approx(s_hi if target > 1 else s_lo)


def test_the_integral_accumulates_and_is_bounded():
    """While the actuator is inside its bounds (a large calibration: a small wanted change)."""
    d, _, _ = _batch(seed=4)
    rule = _weights(schedule="constant", target=2.5, ki=0.1, integral_max=0.35, calibration=1e4)
    tb, state = make_batch(NP, d), None
    e = 2.5 - d.entropy[d.valid].mean()
    got = []
    for _ in range(6):
        out = rule(tb, state=state)
        state = out.state
        got.append(_m(out, "integral"))
    want = [min((k + 1) * 0.1 * e, 0.35) for k in range(6)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert float(R.EntropyTargetState(*state).integral) == got[-1]


@pytest.mark.parametrize("actuator", ["weights", "bonus"])
def test_no_wind_up_at_a_bound_or_while_coasting(actuator):
    """Conditional integration: a saturated actuator (an unreachable target) or a drift that already
    moves toward the target (the brake leaves it alone) does not integrate."""
    d, _, _ = _batch(seed=4)
    tb = make_batch(NP, d)
    for target in (50.0, 0.0):
        out = R.EntropyTarget(schedule="constant", target=target, actuator=actuator, ki=0.1)(tb)
        assert _m(out, "integral") == 0.0
    p0 = _m(R.EntropyTarget(schedule="constant", target=0.0)(tb), "predicted_dh_unweighted")
    H = d.entropy[d.valid].mean()
    coast_target = H - 0.1 if p0 < 0 else H + 0.1  # the drift moves toward it, slower than wanted
    rule = R.EntropyTarget(schedule="constant", target=coast_target, actuator=actuator, ki=0.1,
                           calibration=5.0, coef_min=-1.0)  # fmt: skip
    out = rule(tb)
    assert _m(out, "integral") == 0.0
    assert _m(out, "predicted_dh") == pytest.approx(p0, rel=1e-12)  # the brake: nothing changed
    pushed = R.EntropyTarget(**{**rule.__dict__, "accelerate": True})(tb)
    assert abs(_m(pushed, "predicted_dh")) > abs(p0) and _m(pushed, "integral") != 0.0


def test_an_empty_batch_changes_no_state():
    d, _, _ = _batch(seed=5)
    rule = R.EntropyTarget(schedule="constant", target=2.5)
    state = rule(make_batch(NP, d)).state
    out = rule(make_batch(NP, d, valid=np.zeros_like(d.valid)), state=state)
    for a, b in zip(out.state, state, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (to_numpy(out.entropy_coef) == 0.0).all() and _m(out, "error") == 0.0


# --- entropy_target, actuator="bonus" --------------------------------------------------------------


def _bonus_gain_exact(z, valid):
    """``(1/N) Σ_t ‖S_t‖²`` over the valid positions: the bonus's exact first-order gain per unit."""
    S = T.discriminator(z)
    return float((S * S).sum(axis=-1)[valid].sum() / max(valid.sum(), 1))


def test_the_sampled_bonus_gain_is_an_unbiased_estimate_of_the_squared_norm():
    """``E_{k∼p}[p_k (log p_k + H)²] = Σ_i S_i²``: the one-sample estimate the bonus actuator uses."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 11)) * 2.0
    logp = T.log_softmax(z)
    p, H = np.exp(logp), T.entropy(z)
    per_token = p * (logp + H[:, None]) ** 2  # the estimate if token k were sampled
    np.testing.assert_allclose((p * per_token).sum(-1), (T.discriminator(z) ** 2).sum(-1), rtol=1e-12)


def test_the_bonus_coefficient_closes_the_wanted_change():
    d, _, _ = _batch(seed=1)
    rule = R.EntropyTarget(schedule="constant", target=2.5, calibration=20.0, gain=0.4, accelerate=True)
    out = rule(make_batch(NP, d))
    P, _ = _quadrant_sums(d)
    p0 = sum(P.values())
    e = 2.5 - d.entropy[d.valid].mean()
    q = float(np.where(d.valid, np.exp(d.logp) * (d.logp + d.entropy) ** 2, 0.0).sum() / d.valid.sum())
    k = (0.4 * e / 20.0 - p0) / q
    assert 0.0 < k < 1.0
    np.testing.assert_allclose([_m(out, "coef"), _m(out, "bonus_gain")], [k, q], rtol=1e-12)
    np.testing.assert_allclose(_m(out, "predicted_dh"), 0.4 * e / 20.0, rtol=1e-12)
    c = to_numpy(out.entropy_coef)
    np.testing.assert_allclose(c[d.valid], k, rtol=1e-12)
    assert (c[~d.valid] == 0.0).all() and out.weight is None
    np.testing.assert_array_equal(to_numpy(out.adv), d.adv)
    above = R.EntropyTarget(schedule="constant", target=0.0)(make_batch(NP, d))  # above target: off
    assert _m(above, "coef") == 0.0


def test_the_bonus_moves_the_actual_entropy_by_its_exact_gain():
    """On a tabular softmax batch the step ``δz = η (A (e_k − p) − k S)`` changes the token-mean entropy
    by ``η (P₀ + k ‖S‖²)`` to first order; the rule's coefficient raises it toward a higher target."""
    d, z, tok = _batch(seed=2, B=10, Tn=8, V=6)
    out = R.EntropyTarget(schedule="constant", target=3.0, calibration=50.0)(make_batch(NP, d))
    k, eta = _m(out, "coef"), 1e-3
    assert k > 0
    p = np.exp(T.log_softmax(z))
    adv = np.where(d.valid, d.adv, 0.0)
    bonus = k * d.valid[..., None] * T.discriminator(z)  # the logit step of k H: -η k S
    z2 = z + eta * (adv[..., None] * (np.eye(z.shape[-1])[tok] - p) - bonus)
    dH = (T.entropy(z2) - d.entropy)[d.valid].mean()
    want = eta * (_m(out, "predicted_dh_unweighted") + k * _bonus_gain_exact(z, d.valid))
    np.testing.assert_allclose(dH, want, rtol=0.05)
    dH_plain = _entropy_after(z, tok, adv, eta)[d.valid].mean() - d.entropy[d.valid].mean()
    assert dH > dH_plain


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_adaptive_bonus_follows_a_target_schedule(kind):
    rule = R.EntropyBonus(adaptive=True, coef=0.1, target=2.0, final_target=0.5, target_schedule=kind,
                          total_steps=10)  # fmt: skip
    assert rule.target_at(0) == pytest.approx(2.0) and rule.target_at(10) == pytest.approx(0.5)
    assert rule.target_at(5) == pytest.approx(1.25)
    d, _, _ = _batch(seed=3)
    H = d.entropy[d.valid].mean()
    assert 0.5 < H < 2.0
    for step, on in ((0, True), (10, False)):  # below the target at step 0, above it at step 10
        d.step = step
        assert (_m(rule(make_batch(NP, d)), "coef") > 0) == on
    d.step = 0


# --- schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [R.EntropyTarget, R.EntropicPI])
@pytest.mark.parametrize(
    "kw,step,want",
    [
        ({"schedule": "constant", "target": 0.7}, 123, 0.7),
        ({"schedule": "linear", "target": 2.0, "final_target": 1.0, "total_steps": 100}, 25, 1.75),
        ({"schedule": "linear", "target": 2.0, "final_target": 1.0, "total_steps": 100}, 500, 1.0),
        ({"schedule": "linear", "target": 2.0, "total_steps": 100}, 50, 2.0),  # final_target None = target
        ({"schedule": "cosine", "target": 2.0, "final_target": 1.0, "total_steps": 100}, 50, 1.5),
        ({"schedule": "cosine", "target": 2.0, "final_target": 1.0, "total_steps": 100}, 0, 2.0),
        ({"schedule": "cosine", "target": 2.0, "final_target": 1.0, "total_steps": 100}, 100, 1.0),
    ],
)
def test_schedules_give_the_right_targets(cls, kw, step, want):
    rule = cls(**kw)
    assert rule.target_at(step) == pytest.approx(want, abs=1e-12)
    d, _, _ = _batch(seed=6)
    d.step = step
    out = rule(make_batch(NP, d))
    assert _m(out, "target") == pytest.approx(want, abs=1e-12)
    assert _m(out, "error") == pytest.approx(want - d.entropy[d.valid].mean(), abs=1e-12)


@pytest.mark.parametrize("cls", [R.EntropyTarget, R.EntropicPI])
def test_hold_step_k_holds_the_entropy_of_step_k(cls):
    d, _, _ = _batch(seed=7)
    rule = cls(hold_step=10)
    state = None
    for step in (0, 5):  # before k: inactive, nothing recorded, weights 1
        d.step = step
        out = rule(make_batch(NP, d), state=state)
        state = out.state
        assert _m(out, "error") == 0.0 and _m(out, "integral") == 0.0
        assert float(state[-2 if cls is R.EntropicPI else 4]) == 0.0  # has_ref
        if cls is R.EntropicPI:
            assert (to_numpy(out.weight) == 1.0).all()
        else:
            assert _m(out, "coef") == 0.0 and (to_numpy(out.entropy_coef) == 0.0).all()
    d.step = 10
    out = rule(make_batch(NP, d), state=state)
    state = out.state
    h_k = d.entropy[d.valid].mean()
    assert _m(out, "target") == pytest.approx(h_k) and _m(out, "error") == 0.0
    d2, _, _ = _batch(seed=8, scale=0.5)  # a flatter batch: higher entropy, above the held value
    d2.step = 11
    out = rule(make_batch(NP, d2), state=state)
    h2 = d2.entropy[d2.valid].mean()
    assert h2 > h_k
    assert _m(out, "target") == pytest.approx(h_k)
    assert _m(out, "error") == pytest.approx(h_k - h2)
    d2.step = 50  # the reference never moves once recorded
    assert _m(rule(make_batch(NP, d2), state=out.state), "target") == pytest.approx(h_k)


# --- calibration feedback and state round trips ----------------------------------------------------


def test_feedback_sets_the_calibration_to_the_measured_ratio():
    d, _, _ = _batch(seed=9)
    rule = R.EntropyTarget(schedule="constant", target=2.0, calibration_ema=0.5)
    tb = make_batch(NP, d)
    out = rule(tb)
    assert _m(out, "calibration") == 1.0  # the default until a first feedback
    p = _m(out, "predicted_dh")
    st = rule.feedback(out.state, 0.02 * p)
    out2 = rule(tb, state=st)
    assert _m(out2, "calibration") == pytest.approx(0.02, rel=1e-12)
    # p^2-weighted average of ratios: (0.5 (0.02 p) p + 0.5 (0.1 p2) p2) / (0.5 p^2 + 0.5 p2^2) (β = 0.5)
    p2 = _m(out2, "predicted_dh")
    st2 = R.entropy_target_feedback(out2.state, 0.1 * p2, ema=0.5)
    num, den = 0.25 * 0.02 * p * p + 0.5 * 0.1 * p2 * p2, 0.25 * p * p + 0.5 * p2 * p2
    assert _m(rule(tb, state=st2), "calibration") == pytest.approx(num / den, rel=1e-10)
    # an explicit prediction, a non-finite measurement (no change), a negative ratio (clipped)
    st3 = R.entropy_target_feedback(out.state, 1.0, predicted_dh=0.5, ema=0.0)
    assert _m(rule(tb, state=st3), "calibration") == pytest.approx(2.0)
    for bad in (math.nan, math.inf):
        same = R.entropy_target_feedback(st3, bad)
        for a, b in zip(same, st3, strict=True):
            np.testing.assert_array_equal(a, b)
    neg = R.entropy_target_feedback(out.state, -p, ema=0.0)
    assert _m(rule(tb, state=neg), "calibration") == rule.calibration_min


@pytest.mark.parametrize("be", BACKENDS[1:], ids=lambda b: b.name)
def test_state_round_trips_through_numpy_and_tuples(be):
    """The state is a plain tuple of arrays: to numpy and back (another backend) gives the same outputs."""
    d, _, _ = _batch(seed=10)
    for rule in (R.EntropyTarget(hold_step=0), R.EntropicPI(hold_step=0)):
        out = rule(make_batch(NP, d))
        assert type(out.state) is tuple
        if isinstance(rule, R.EntropyTarget):
            state = rule.feedback(out.state, 0.5 * _m(out, "predicted_dh"))
        else:
            state = out.state
        d.step = 1
        ref = rule(make_batch(NP, d), state=state)
        moved = tuple(be.asarray(np.asarray(s)) for s in state)
        got = rule(make_batch(be, d), state=moved)
        for k in ref.metrics:
            g, r = to_numpy(got.metrics[k]), to_numpy(ref.metrics[k])
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-14, err_msg=k)
        for name in ("weight", "entropy_coef"):
            if getattr(ref, name) is not None:
                np.testing.assert_allclose(to_numpy(getattr(got, name)), to_numpy(getattr(ref, name)),
                                           rtol=1e-12, atol=1e-14)  # fmt: skip
        for a, b in zip(got.state, ref.state, strict=True):
            np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-12, atol=1e-14)
        d.step = 0


@pytest.mark.parametrize("actuator", ["bonus", "weights"])
def test_state_chains_with_feedback_agree_on_every_backend(actuator):
    d, _, _ = _batch(seed=11, B=6, Tn=5)
    trails = {}
    for be in BACKENDS:
        rule = R.EntropyTarget(schedule="linear", target=2.5, final_target=1.0, total_steps=4, w_max=3.0,
                               actuator=actuator, calibration=30.0)  # fmt: skip
        pi = R.EntropicPI(schedule="constant", target=2.5)
        st_t = st_p = None
        trail = []
        for step in range(4):
            d.step = step
            tb = make_batch(be, d)
            out = rule(tb, state=st_t)
            st_t = rule.feedback(out.state, 0.3 * out.metrics["predicted_dh"] + 1e-3)
            op = pi(tb, state=st_p)
            st_p = op.state
            values = (*out.metrics.values(), *op.metrics.values(), *st_t, *st_p)
            trail.append([float(to_numpy(v)) for v in values])
        trails[be.name] = np.array(trail)
    d.step = 0
    for name in ("torch", "array_api_strict"):
        np.testing.assert_allclose(trails[name], trails["numpy"], rtol=1e-9, atol=1e-12)


def test_leading_axes_state_is_per_batch():
    d, _, _ = _batch(seed=12)
    d2, _, _ = _batch(seed=13, scale=0.5)
    rule = R.EntropyTarget(schedule="constant", target=2.0)
    names = ("logp", "adv", "valid", "entropy", "baseline")
    stack = {k: np.stack([getattr(d, k), getattr(d2, k)]) for k in names}
    out = rule(R.TokenBatch(**stack))
    assert all(tuple(s.shape) == (2,) for s in out.state)
    alone = rule(make_batch(NP, d2))
    np.testing.assert_allclose(out.metrics["predicted_dh"][1], to_numpy(alone.metrics["predicted_dh"]))


# --- entropic_pi ----------------------------------------------------------------------------------


def test_entropic_pi_weights_follow_the_pi_law():
    d, _, _ = _batch(seed=14)
    rule = R.EntropicPI(schedule="constant", target=1.5, kp=0.5, ki=0.2, integral_max=0.05)
    tb, state = make_batch(NP, d), None
    e = 1.5 - d.entropy[d.valid].mean()
    integral = 0.0
    for _ in range(3):
        out = rule(tb, state=state)
        state = out.state
        integral = float(np.clip(integral + 0.2 * e, -0.05, 0.05))
        u = 0.5 * e + integral
        assert _m(out, "control") == pytest.approx(u)
        w = to_numpy(out.weight)
        np.testing.assert_allclose(w[d.valid & (d.adv > 0)], np.clip(1 - u, 0, 2))
        np.testing.assert_allclose(w[d.valid & (d.adv < 0)], np.clip(1 + u, 0, 2))
        assert (w[~d.valid] == 1.0).all()
    assert (e > 0) == (_m(out, "w_pos") < 1.0 < _m(out, "w_neg"))


def test_entropic_pi_is_bounded():
    d, _, _ = _batch(seed=15)
    for target, w_pos, w_neg in ((50.0, 0.25, 1.5), (0.0, 1.5, 0.25)):
        out = R.EntropicPI(schedule="constant", target=target, w_min=0.25, w_max=1.5)(make_batch(NP, d))
        assert (_m(out, "w_pos"), _m(out, "w_neg")) == (w_pos, w_neg)


# --- specs, validation, compile -------------------------------------------------------------------


def test_specs_build_the_controllers():
    r = R.make_rule("entropy_target:schedule=cosine,target=1.0,final_target=0.3,total_steps=50,by=s_star")
    assert isinstance(r, R.EntropyTarget) and r.by == "s_star" and r.total_steps == 50
    c = R.make_rule("entropic_pi:kp=0.5+entropy_target:hold_step=3")
    assert isinstance(c, R.Compose) and c.rules[1].hold_step == 3


@pytest.mark.parametrize(
    "cls,kw,word",
    [
        (R.EntropyTarget, {"schedule": "exp"}, "schedule"),
        (R.EntropyTarget, {"schedule": "linear"}, "total_steps"),
        (R.EntropyTarget, {"w_min": 1.2}, "w_min"),
        (R.EntropyTarget, {"w_max": 0.5}, "w_max"),
        (R.EntropyTarget, {"gain": -1.0}, "gain"),
        (R.EntropyTarget, {"calibration": 0.0}, "calibration"),
        (R.EntropyTarget, {"calibration_ema": 1.0}, "calibration_ema"),
        (R.EntropyTarget, {"by": "x"}, "by"),
        (R.EntropyTarget, {"hold_step": -1}, "hold_step"),
        (R.EntropyTarget, {"actuator": "kl"}, "actuator"),
        (R.EntropyTarget, {"coef_min": 0.1}, "coef_min"),
        (R.EntropyBonus, {"adaptive": True, "target_schedule": "exp"}, "target_schedule"),
        (R.EntropyBonus, {"adaptive": True, "target_schedule": "linear"}, "total_steps"),
        (R.EntropicPI, {"kp": -0.1}, "kp"),
        (R.EntropicPI, {"w_min": -0.1}, "w_min"),
        (R.EntropicPI, {"schedule": "cosine"}, "total_steps"),
    ],
)
def test_validation(cls, kw, word):
    with pytest.raises(ValueError, match=word):
        cls(**kw)


def test_needs_entropy_and_baseline():
    d, _, _ = _batch(seed=16)
    with pytest.raises(ValueError, match="entropy"):
        R.EntropyTarget()(make_batch(NP, d, entropy=None))
    with pytest.raises(ValueError, match="baseline"):
        R.EntropyTarget()(make_batch(NP, d, baseline=None))
    R.EntropyTarget(by="s_star")(make_batch(NP, d, baseline=None))  # S* alone needs no baseline
    with pytest.raises(ValueError, match="3 arrays"):
        R.EntropicPI()(make_batch(NP, d), state=(0.0, 0.0))


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`:UserWarning")
def test_traces_with_a_state_without_graph_break():
    """The state path (a tuple passed back in, feedback in between) compiles as one graph (eager backend)."""
    torch = pytest.importorskip("torch")
    d, _, _ = _batch(seed=17)
    for actuator in ("bonus", "weights"):
        _compiles_as_one_graph(torch, d, R.EntropyTarget(schedule="constant", target=2.0, actuator=actuator))


def _compiles_as_one_graph(torch, d, rule):
    def fn(logp, adv, valid, entropy, baseline, state):
        batch = R.TokenBatch(logp=logp, adv=adv, valid=valid, entropy=entropy, baseline=baseline)
        out = rule(batch, state=state)
        act = out.weight if out.weight is not None else out.entropy_coef
        return act, rule.feedback(out.state, 0.5 * out.metrics["predicted_dh"])

    names = ("logp", "adv", "valid", "entropy", "baseline")
    args = [torch.from_numpy(np.asarray(getattr(d, k))) for k in names]
    state = tuple(torch.tensor(v, dtype=torch.float64) for v in (0.1, 0.2, 0.4, 0.0, 0.0, 0.3))
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    w, st = compiled(*args, state)
    w0, st0 = fn(*args, state)
    assert torch.equal(w, w0) and all(torch.equal(a, b) for a, b in zip(st, st0, strict=True))
