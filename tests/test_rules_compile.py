"""Every token rule of ``theory.rules`` traces under ``torch.compile`` as one graph and compiles to the same
numbers as eager.

For each case (a rule with parameters that make it do real work, checked by
``test_cases_do_real_work``), ``make_fn`` builds the function a trainer would compile: tensors in,
``TokenBatch`` built inside, the rule called, its outputs returned as a dict of tensors. Then:

* ``test_traces_without_graph_break``: ``torch._dynamo.explain`` reports one graph and no graph break,
  **and** ``torch.compile(fn, fullgraph=True)`` succeeds. The second check is the authority: on torch 2.13
  ``explain`` does not count a graph break inside a nested call that dynamo resumes from (it reports
  1 graph / 0 breaks for a single rule whose ``stop_gradient`` breaks the graph), while ``fullgraph=True``
  raises on any break.
* ``test_traces_without_graph_break_across_shapes``: the same with a second, differently shaped batch
  (automatic dynamic shapes: the recompile traces with symbolic sizes, as in a trainer whose ``T`` varies).
* ``test_compiled_matches_eager``: inductor-compiled output equals eager output on one input (bool
  outputs exactly, floats to 1e-5).

Two graph breaks found while writing these tests are fixed in ``theory/rules`` (comments there say
why): ``stop_gradient`` no longer calls the builtin ``callable`` on a tensor's bound method, and
``topk_mask`` no longer uses array_api_compat's ``clip`` with a python bound (it calls ``math.isnan`` on
the symbolic size under dynamic shapes).
"""

from __future__ import annotations

import numpy as np
import pytest

from theory.rules import (
    ClipB,
    ClipCov,
    ClipV,
    EntropicPI,
    EntropyBonus,
    EntropyTarget,
    HighEntropyMask,
    KLCov,
    PositionBonus,
    PPLShaping,
    ProbWeighted,
    QuadrantMask,
    TokenBatch,
    make_rule,
)

torch = pytest.importorskip("torch")
import torch._dynamo as dynamo  # noqa: E402

pytestmark = [
    pytest.mark.slow,  # about 2 minutes on 2 CPU cores (inductor compiles)
    # array_api_compat's namespace lookup calls lru_cache-wrapped helpers; dynamo traces through them
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`:UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

# ----------------------------------------------------------------------------------------- cases

B, T, G = 8, 16, 4  # 8 sequences in groups of 4, 16 positions


def make_inputs(b: int = B, t: int = T, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch with ragged valid masks, old != current log-probs, and +, - and 0 advantages."""
    rng = np.random.default_rng(seed)
    logp = -rng.exponential(1.5, size=(b, t))
    old_logp = logp + 0.3 * rng.standard_normal((b, t))
    entropy = rng.uniform(0.0, 3.0, size=(b, t))
    baseline = rng.uniform(0.0, 0.2, size=(b, t))
    seq_adv = rng.choice([-1.5, -0.5, 0.0, 0.5, 1.5], size=b)
    seq_adv[:2] = (-1.0, 1.0)
    adv = np.repeat(seq_adv[:, None], t, axis=1)
    lengths = rng.integers(t // 2, t + 1, size=b)
    valid = np.arange(t)[None, :] < lengths[:, None]
    arrays = {
        "logp": logp,
        "old_logp": old_logp,
        "entropy": entropy,
        "baseline": baseline,
        "adv": adv,
        "noise": rng.uniform(size=(b, t)),
    }
    out = {k: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()}
    out["valid"] = torch.from_numpy(valid)
    out["group"] = torch.arange(b) // G
    return out


# name -> (rule, TokenBatch.step, TokenBatch.stage); the adaptive entropy bonus also gets a state (call_args)
CASES = {
    "clip_b": (ClipB(mu=0.5), 0, None),
    "clip_b_paper": (ClipB(variant="paper", mu=1.5, mu_high=2.0, logp_source="current"), 0, None),
    "clip_v": (ClipV(mu=0.3, max_frac=0.02), 0, None),
    "clip_v_paper": (ClipV(variant="paper", mu=1.0, center=True), 0, None),
    "clip_cov": (ClipCov(frac=0.05, lb=0.0, ub=5.0), 0, None),
    "kl_cov": (KLCov(frac=0.05), 0, None),
    "high_entropy_mask": (HighEntropyMask(rho=0.2), 0, None),
    "entropy_bonus": (EntropyBonus(coef=0.01, schedule="cosine", total_steps=100), 30, None),
    "entropy_bonus_adaptive": (EntropyBonus(coef=0.01, adaptive=True, target=2.0), 0, None),
    "ppl_shaping": (PPLShaping(alpha=0.2), 0, None),
    "position_bonus": (PositionBonus(), 250, None),
    "position_bonus_stage": (PositionBonus(gate="stage", alpha=0.3), 0, "plateau"),
    "prob_weighted": (ProbWeighted(alpha=0.5), 0, None),
    "quadrant_mask": (QuadrantMask(), 0, None),
    "quadrant_mask_s_star_weight": (
        QuadrantMask(keep=("pos_low", "neg_high"), by="s_star", in_normaliser=True),
        0,
        None,
    ),
    # accelerate: act even where this input's drift already moves toward the target (the brake would idle)
    "entropy_target": (EntropyTarget(schedule="constant", target=10.0, accelerate=True), 0, None),
    "entropy_target_weights": (EntropyTarget(schedule="constant", target=2.0, actuator="weights"), 0, None),
    "entropy_target_linear_s_star": (
        EntropyTarget(schedule="linear", target=10.0, final_target=2.0, total_steps=100, by="s_star",
                      accelerate=True),
        30,
        None,
    ),
    "entropic_pi": (EntropicPI(schedule="constant", target=2.0), 0, None),
    "compose_clip_b_position": (make_rule("clip_b:mu=0.5+position_bonus:gate=always"), 0, None),
}
IDS = list(CASES)


def make_fn(case: str):
    """``fn(**tensors) -> dict of tensors``: builds the TokenBatch from tensors and calls the rule."""
    rule, step, stage = CASES[case]

    def fn(logp, old_logp, entropy, baseline, adv, valid, group, noise, state):
        batch = TokenBatch(
            logp=logp,
            adv=adv,
            valid=valid,
            old_logp=old_logp,
            entropy=entropy,
            baseline=baseline,
            group=group,
            step=step,
            stage=stage,
        )
        out = rule(batch, noise=noise, state=state)
        result = {"keep": out.keep, "adv": out.adv}
        for name in ("weight", "kl_coef", "entropy_coef"):
            if getattr(out, name) is not None:
                result[name] = getattr(out, name)
        for name, value in out.metrics.items():
            result["metric:" + name] = value
        if isinstance(out.state, torch.Tensor):
            result["state"] = out.state
        return result

    return fn


def call_args(case: str, inputs: dict[str, torch.Tensor]) -> dict:
    state = torch.tensor(0.01) if case == "entropy_bonus_adaptive" else None
    return {**inputs, "state": state}


def assert_outputs_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        assert g.dtype == w.dtype and g.shape == w.shape, key
        if w.dtype == torch.bool:
            assert torch.equal(g, w), key
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=key)


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", IDS)
def test_cases_do_real_work(case):
    """Eager sanity: each case changes the loss on this input (otherwise compiling it proves little)."""
    inputs = make_inputs()
    out = make_fn(case)(**call_args(case, inputs))
    valid, adv = inputs["valid"], inputs["adv"]
    changed = [
        bool((out["keep"] != valid).any()),
        not torch.equal(out["adv"], adv),
        "weight" in out and bool((out["weight"] != 1).any()),
        "kl_coef" in out and bool((out["kl_coef"] != 0).any()),
        "entropy_coef" in out and bool((out["entropy_coef"] != 0).any()),
    ]
    assert any(changed), f"{case} leaves the loss unchanged on the test input"
    assert not bool((out["keep"] & ~valid).any())


@pytest.mark.parametrize("case", IDS)
def test_traces_without_graph_break(case):
    fn = make_fn(case)
    args = call_args(case, make_inputs())
    dynamo.reset()
    explanation = dynamo.explain(fn)(**args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    assert_outputs_equal(compiled(**args), fn(**args))


@pytest.mark.parametrize("case", IDS)
def test_traces_without_graph_break_across_shapes(case):
    fn = make_fn(case)
    dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    for b, t, seed in ((B, T, 0), (B + 4, T + 5, 1), (B + 8, T + 9, 2)):
        args = call_args(case, make_inputs(b, t, seed))
        assert_outputs_equal(compiled(**args), fn(**args))


@pytest.mark.parametrize("case", IDS)
def test_compiled_matches_eager(case):
    """Inductor (the default backend) on one input; graph breaks allowed here, numbers must agree."""
    fn = make_fn(case)
    args = call_args(case, make_inputs(seed=3))
    dynamo.reset()
    compiled = torch.compile(fn)
    assert_outputs_equal(compiled(**args), fn(**args))
