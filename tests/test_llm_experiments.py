"""``entdyn llm``: the real-model experiments on the tiny random model (``--quick``), through the CLI.

What is asserted beyond "it ran": the files and summary keys each experiment promises; that every update
of ``quadrants`` saw the identical batch (same sampled tokens); the sign bookkeeping (an update that keeps
one quadrant by the deviation has a tabular (E6) prediction of exactly the quadrant table's sign; the
agreement fractions are recomputed from the stored updates); that under plain SGD with a fixed normaliser
the four quadrants' JVPs sum to the full update's JVP (to float32 rounding) while under AdamW they do
not; and that on the tiny model at lr 1e-5 the JVP explains the measured change and the residual is
second order in the learning rate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from entdyn.cli import main  # noqa: E402
from theory import QUADRANT_DH_SIGN, QUADRANTS  # noqa: E402

TINY = ["--model", "tiny", "--quick", "--threads", "1", "--no-progress"]


def run(tmp_path, name: str, *extra: str) -> tuple[dict, dict]:
    out = tmp_path / name
    assert main(["llm", name, *TINY, "--out", str(out), *extra]) == 0
    summary = json.loads((out / "summary.json").read_text())
    curves = json.loads((out / "curves.json").read_text())
    assert (out / "table.md").read_text().startswith(f"## llm experiment `{name}` (tiny)")
    for fig in summary["figures"]:
        assert (out / fig).stat().st_size > 10_000, fig
    assert summary["experiment"] == name and summary["model"] == "tiny" and summary["quick"] is True
    cmd = summary["command"]
    assert cmd.startswith(f"entdyn llm {name} --model tiny") and cmd.endswith("--quick"), cmd
    return summary, curves


@pytest.fixture(scope="module")
def quadrants(tmp_path_factory):
    return run(tmp_path_factory.mktemp("llm"), "quadrants")


def test_quadrants_summary_and_identical_batches(quadrants):
    summary, curves = quadrants
    rows = curves["updates"]
    assert len(rows) == summary["updates"] == summary["seeds"] * 2 * len(QUADRANTS)
    assert summary["identical_batches"] is True and all(r["same_batch"] for r in rows)
    for key in ("quadrant_sign_agreement", "quadrant_sign_agreement_s_star", "tabular_sign_agreement"):
        assert 0.0 <= summary[key] <= 1.0, key
    med, (lo, hi) = summary["jvp_over_measured"]["median"], summary["jvp_over_measured"]["iqr"]
    assert lo <= med <= hi
    used = [r for r in rows if r["kept_adv_nonzero"] > 0]
    assert len(used) == summary["updates_with_tokens"] > 0
    assert all(0 < r["kept"] <= r["tokens"] for r in used)


def test_quadrants_sign_bookkeeping(quadrants):
    summary, curves = quadrants
    used = [r for r in curves["updates"] if r["kept_adv_nonzero"] > 0]
    for r in used:  # alpha_t has the sign of A_t, so -alpha_t (S* - E_p[S]) has the table's sign
        if r["by"] == "deviation":
            assert np.sign(r["theory/dH_tabular"]) == QUADRANT_DH_SIGN[r["quadrant"]], r
    dev = [r for r in used if r["by"] == "deviation"]
    agree = np.mean([np.sign(r["theory/dH_measured"]) == QUADRANT_DH_SIGN[r["quadrant"]] for r in dev])
    assert summary["quadrant_sign_agreement"] == pytest.approx(agree)
    tab = np.mean([np.sign(r["theory/dH_tabular"]) == np.sign(r["theory/dH_measured"]) for r in used])
    assert summary["tabular_sign_agreement"] == pytest.approx(tab)


def test_attribution_sums_to_the_jvp_under_sgd_only(tmp_path):
    summary, curves = run(tmp_path, "attribution")
    assert summary["sum_gap_sgd"] < 5e-6  # float32 rounding of the parameter change (8.5e-7 measured)
    assert summary["sum_gap_adamw"] > 1e-2  # AdamW's first step is about lr * sign(g): not additive
    for r in curves["updates"]:
        assert r["sum_of_parts"] == pytest.approx(sum(r["parts"].values()))
    shares = summary["quadrant_share_of_dH"]
    assert set(shares) == set(QUADRANTS)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)  # pooled shares of an additive update
    rows = [r for r in curves["updates"] if r["optimizer"] == "sgd"]
    for q in QUADRANTS:
        want = sum(r["parts"][q] for r in rows) / sum(r["full_jvp"] for r in rows)
        assert shares[q] == pytest.approx(want)


def test_first_order_on_the_tiny_model(tmp_path):
    summary, curves = run(tmp_path, "first-order")
    assert summary["steps"] == len(curves["measured"]) == 4
    assert len(summary["lr_sweep"]) == 6 and len(summary["residual_local_slopes"]) == 5
    assert summary["r2_jvp"] > 0.9 and summary["jvp_sign_agreement"] == 1.0
    assert 1.5 < summary["residual_lr_slope"] < 2.5  # the JVP is exact to first order (above the floor)


def test_rules_keys(tmp_path):
    summary, curves = run(tmp_path, "rules", "--steps", "2")
    assert summary["steps"] == 2 and summary["seeds"] == 2
    for name in ("grpo", "clip_b", "clip_v", "clip_cov", "kl_cov", "entropy_bonus", "clip_higher"):
        res = summary["results"][name]
        for key in ("entropy", "reward", "pass_at_4", "reward_auc", "clip_frac"):
            assert len(res[key]) == 2, (name, key)
        assert res["entropy"][0] > 0
        assert len(curves[name]["entropy"]) == 2  # (steps, seeds)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["llm", "nope", *TINY, "--out", str(tmp_path)]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert main(["llm", "quadrants", *TINY, "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


def test_seeds_without_signal_are_replaced():
    """``_seeds`` goes on until ``n`` seeds carried a signal, trying at most ``3 n``."""
    from scale.llm import Options, _seeds

    skipped: list[int] = []
    got = []
    for seed in _seeds(Options(seed=10), 2, skipped):
        got.append(seed)
        if seed in (11, 12):  # these batches had no advantage
            skipped.append(seed)
    assert got == [10, 11, 12, 13] and skipped == [11, 12]
    skipped = []
    assert list(_seeds(Options(), 2, skipped)) == [0, 1]
    always: list[int] = []
    tried = [s for s in _seeds(Options(), 2, always) if always.append(s) is None]
    assert tried == list(range(6))  # 3 n tries, then it stops with fewer than n


def test_control_keys_and_the_calibration_feedback(tmp_path):
    from scale.metrics_log import read_metrics

    summary, curves = run(tmp_path, "control", "--steps", "3")
    assert summary["steps"] == 3 and summary["seeds"] == 1 and summary["target_fraction"] == 0.8
    for name in ("none", "adaptive_bonus", "pi_weights", "predictive"):
        for key in ("tracking_error", "overshoot", "reward", "pass_at_4", "final_entropy"):
            assert len(summary["results"][name][key]) == 2, (name, key)
        assert len(curves[name]["entropy"]) == 3
    h1 = curves["none"]["entropy"][0][0]
    assert summary["targets"] == [pytest.approx(0.8 * h1, rel=1e-5)]
    rows = read_metrics(tmp_path / "control" / "runs" / "predictive-seed0")
    cal = [r["rule/calibration"] for r in rows]
    assert cal[0] == 1.0 and cal[-1] != 1.0  # the diagnosed steps fed the measured change back
    pi = read_metrics(tmp_path / "control" / "runs" / "pi_weights-seed0")
    assert all(r["rule/w_pos"] > 1.0 for r in pi)  # above the target: the positive samples weigh more
