"""Backend parity of every token rule: numpy, torch and array_api_strict give the same outputs.

For each registered token rule (and a :class:`~theory.rules.Compose` of two), hypothesis draws several
parameter settings and random float64 batches (``tests/rule_strategies.py``); the same inputs and the
same caller noise go to all three backends. Keep-masks must be exactly equal; floats (advantages,
weights, penalty coefficients, metrics, state) agree to 1e-6.
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import Backend, to_numpy
from tests.rule_strategies import (
    batches,
    initial_state_np,
    make_batch,
    output_to_numpy,
    rules_for,
    run_rule,
    token_rule_names,
)
from theory import rules as R

BACKENDS = [Backend("numpy"), Backend("torch"), Backend("array_api_strict")]
TOL = {"rtol": 1e-6, "atol": 1e-6}


def _assert_same(ref, got, where: str):
    if ref is None or got is None:
        assert ref is None and got is None, f"{where}: one backend returned None"
        return
    if isinstance(ref, tuple):
        assert isinstance(got, tuple) and len(ref) == len(got), where
        for i, (a, b) in enumerate(zip(ref, got, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
        return
    assert ref.shape == got.shape, f"{where}: shape {ref.shape} vs {got.shape}"
    if ref.dtype == np.bool_:
        assert got.dtype == np.bool_, f"{where}: dtype {got.dtype}"
        np.testing.assert_array_equal(got, ref, err_msg=where)
    else:
        np.testing.assert_allclose(got, ref, equal_nan=True, err_msg=where, **TOL)


def _check_namespace(out, be: Backend):
    """Every output array lives in the input's namespace (no silent conversion to numpy)."""
    want = array_api_compat.array_namespace(be.asarray(np.zeros(1)))
    for name in ("keep", "adv", "weight", "kl_coef", "entropy_coef"):
        x = getattr(out, name)
        if x is not None:
            assert array_api_compat.array_namespace(x) is want, f"{be}: {name} in the wrong namespace"
    for k, v in out.metrics.items():
        assert array_api_compat.array_namespace(v) is want, f"{be}: metric {k} in the wrong namespace"
        assert tuple(v.shape) == (), f"{be}: metric {k} is not 0-d"


def _check_parity(rule, data, state):
    outs = {}
    for be in BACKENDS:
        out = run_rule(be, rule, data, state=state)
        _check_namespace(out, be)
        outs[be.name] = output_to_numpy(out)
    ref = outs["numpy"]
    assert ref["keep"].dtype == np.bool_
    assert ref["adv"].dtype == np.float64
    for name in ("torch", "array_api_strict"):
        got = outs[name]
        for field in ("keep", "adv", "weight", "kl_coef", "entropy_coef", "state"):
            _assert_same(ref[field], got[field], f"{rule!r} {name} {field}")
        assert set(got["metrics"]) == set(ref["metrics"]), f"{name}: metric names differ"
        for k in ref["metrics"]:
            _assert_same(ref["metrics"][k], got["metrics"][k], f"{rule!r} {name} metric {k}")


@pytest.mark.parametrize("name", token_rule_names() + ["compose"])
def test_backend_parity(name):
    """Same inputs and noise on numpy, torch and array_api_strict: same outputs (several settings)."""

    # the inner @given draws the rule directly (cheaper than st.data) with the profile's settings
    @given(rule=rules_for(name), batch=batches(), c0=st.sampled_from([None, 0.0, 0.3, 0.999]))
    def check(rule, batch, c0):
        _check_parity(rule, batch, initial_state_np(rule, c0))

    check()


def test_token_rules_are_the_twelve_registered():
    """The parity test covers every registered token rule (the stage detector is kind "detector")."""
    assert token_rule_names() == sorted(
        [
            "clip_b",
            "clip_v",
            "clip_cov",
            "kl_cov",
            "high_entropy_mask",
            "entropy_bonus",
            "ppl_shaping",
            "position_bonus",
            "prob_weighted",
            "quadrant_mask",
            "entropy_target",
            "entropic_pi",
        ]
    )
    assert R.RULES["stage_detector"].kind == "detector"


@given(batch=batches(max_b=4, max_t=6))
def test_parity_adaptive_state_chain(batch):
    """Four steps of the adaptive entropy controller, its state fed back, agree on every backend."""
    rule = R.EntropyBonus(coef=0.1, adaptive=True, target=1.0, delta=0.2)
    trails = {}
    for be in BACKENDS:
        tb = make_batch(be, batch)
        state, trail = None, []
        for _ in range(4):
            out = rule(tb, state=state)
            state = out.state
            trail.append([float(to_numpy(out.metrics["coef"])), float(to_numpy(state))])
        trails[be.name] = np.array(trail)
    for name in ("torch", "array_api_strict"):
        np.testing.assert_allclose(trails[name], trails["numpy"], **TOL)
