"""The backends feed the measured entropy change back into the controllers (``Rule.feedback``).

The toy passes the exact change of every diagnosed update, the trainer ``theory/dH_measured`` of its
diagnostic steps; on other steps nothing is fed (no extra forward). Compose routes each member its own state.
"""

from __future__ import annotations

import numpy as np
import pytest

from theory import rules as R
from toy.bandit import Bandit
from toy.grpo import GRPOConfig, init_state, step

BANDIT = Bandit(n_prompts=4, horizon=2, vocab=6, n_correct=2, need=1)


def _toy_state_after(rule, diagnostics: bool, steps: int = 3):
    cfg = GRPOConfig(group_size=4, lr=8.0, init_scale=1.0, rule=rule)
    state = init_state(BANDIT, cfg, runs=3, seed=0)
    diags = [step(BANDIT, cfg, state, diagnostics=diagnostics) for _ in range(steps)]
    return state, diags


def test_the_toy_feeds_the_exact_change_on_diagnosed_steps_only():
    rule = R.EntropyTarget(schedule="constant", target=3.0, calibration_ema=0.0)
    state, diags = _toy_state_after(rule, diagnostics=True)
    st = R.EntropyTargetState(*state.rule_state)
    assert st.cal_den.shape == (3,) and (st.cal_den > 0).all()
    # ema = 0: the calibration is the last update's measured / predicted ratio, measured = the exact change
    last = diags[-1]
    ratio = last["dH_exact"] / last["rule/predicted_dh"]
    np.testing.assert_allclose(st.cal_num / st.cal_den, ratio, rtol=1e-9)
    quiet, _ = _toy_state_after(rule, diagnostics=False)
    assert (R.EntropyTargetState(*quiet.rule_state).cal_den == 0).all()


def test_feedback_leaves_other_rules_and_compose_members_alone():
    d = np.float64(0.01)
    assert R.ClipB().feedback(None, d) is None
    bonus = R.EntropyBonus(adaptive=True)
    assert bonus.feedback(np.float64(0.3), d) == np.float64(0.3)
    target = R.EntropyTarget(schedule="constant", target=3.0)
    assert target.feedback(None, d) is None
    comp = R.Compose((R.ClipB(), target))
    assert comp.feedback(None, d) is None
    state, _ = _toy_state_after(comp, diagnostics=True)
    clip_state, target_state = state.rule_state
    assert clip_state is None and (R.EntropyTargetState(*target_state).cal_den > 0).all()


def test_the_toy_with_the_predictive_bonus_is_reproducible_and_differs_from_plain_grpo():
    rule = R.EntropyTarget(schedule="constant", target=3.0)
    a, da = _toy_state_after(rule, diagnostics=True)
    b, db = _toy_state_after(rule, diagnostics=True)
    np.testing.assert_array_equal(a.params, b.params)
    plain, _ = _toy_state_after(None, diagnostics=True)
    assert not np.allclose(a.params, plain.params)
    assert all(float(np.min(d["rule/coef"])) >= 0.0 for d in da)


@pytest.mark.slow
def test_the_trainer_feeds_dh_measured_on_diagnostic_steps_only(tmp_path):
    pytest.importorskip("torch")
    from scale.flags import config_from_dict
    from scale.train.loop import compute_step
    from scale.train.setup import build_run

    def cfg(diag_every):
        return config_from_dict({
            "task": {"spec": "arithmetic:digits=1,ops=1,n_train=20,n_eval=5"},
            "rollout": {"prompts": 2, "group_size": 4, "max_new_tokens": 6},
            "optim": {"lr": 1e-3},
            "rule": {"spec": "entropy_target:schedule=constant,target=20.0,calibration_ema=0.0"},
            "diag": {"diag_every": diag_every, "samples_per_step": 0},
            "run": {"steps": 2, "out": str(tmp_path / f"d{diag_every}"), "save_every": 0, "progress": "off",
                    "tensorboard": False, "threads": 1},
        })  # fmt: skip

    def digits(completion, problem):
        return sum(c.isdigit() for c in completion) / max(len(completion), 1)

    run = build_run(cfg(diag_every=2), reward_fn=digits)
    compute_step(run)  # step 1: not a diagnostic step
    assert float(R.EntropyTargetState(*run.state.rule_state).cal_den) == 0.0
    _, floats = compute_step(run)  # step 2: diagnosed
    st = R.EntropyTargetState(*run.state.rule_state)
    assert float(st.cal_den) > 0
    assert float(st.cal_num / st.cal_den) == pytest.approx(
        floats["theory/dH_measured"] / floats["rule/predicted_dh"], rel=1e-4)
