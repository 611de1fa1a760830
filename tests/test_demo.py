"""The `entdyn demo` main job: runs, writes its files, and its numbers agree with the theory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from toy.demo import FIGURE_FILE, SUMMARY_FILE, run_demo


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, seed=0, quick=True)


def test_demo_writes_summary_and_figure(quick):
    out, summary = quick
    on_disk = json.loads((out / SUMMARY_FILE).read_text())
    assert on_disk["n"] == summary["n"] > 0
    png = (out / FIGURE_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_demo_numbers_match_the_theory(quick):
    _, s = quick
    assert s["r2_first_order"] > 0.99  # (E6) predicts the exact one-step change
    assert s["r2_second_order"] > s["r2_first_order"]
    assert 1.9 < s["residual_slope_first"] < 2.1  # first-order residual O(alpha^2)
    assert 2.9 < s["residual_slope_second"] < 3.1  # second-order residual O(alpha^3)
    assert s["cor34_exact_max_abs"] < 1e-12  # Cor 3.4 holds exactly per state
    assert abs(s["mean_deviation_z"]) < 4  # Cor 3.5: the on-policy mean deviation is ~0
    assert s["consistency_max_abs"] < 1e-12
    for name, q in s["quadrants"].items():
        assert q["count"] > 0, name
        assert q["sign_agreement"] > 0.9, name


def test_demo_is_reproducible(tmp_path):
    a = run_demo(tmp_path / "a", seed=3, n=200, quick=True)
    b = run_demo(tmp_path / "b", seed=3, n=200, quick=True)
    assert (tmp_path / "a" / SUMMARY_FILE).read_text() == (tmp_path / "b" / SUMMARY_FILE).read_text()
    assert a["r2_first_order"] == b["r2_first_order"]


def test_cli_demo_subcommand(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "entdyn", "demo", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"MPLBACKEND": "Agg", "PATH": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert "R^2 first order" in proc.stdout
    assert (tmp_path / SUMMARY_FILE).exists()
