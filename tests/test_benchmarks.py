"""The benchmark scripts still run on the current code (smoke runs on tiny inputs, no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_token_stats_checks_equality_and_prints_a_ratio():
    out = _run("benchmarks/bench_token_stats.py", "--rows", "3,5", "--vocab", "97", "--repeat", "2")
    rows = [line for line in out.splitlines() if line.startswith("| 3 ") or line.startswith("| 5 ")]
    assert len(rows) == 2
    assert all(float(r.strip("|").split("|")[-1]) > 0 for r in rows)


@pytest.mark.slow
def test_bench_trl_runs_our_trainer_on_the_tiny_model(tmp_path):
    """bench_trl patches scale.metrics_log.MetricsLogger to time steps: a layout change must not break it."""
    pytest.importorskip("trl")
    js = tmp_path / "b.json"
    _run("benchmarks/bench_trl.py", "--model", "tiny", "--steps", "2", "--rounds", "1", "--configs", "ours",
         "--json", str(js))
    runs = json.loads(js.read_text())["runs"]
    assert [r["config"] for r in runs] == ["ours"]
    assert len(runs[0]["steps"]) == 2 and all(s["wall_s"] > 0 for s in runs[0]["steps"])


def test_bench_toy_reports_every_implementation_beside_the_loop(tmp_path):
    js = tmp_path / "toy.json"
    _run("benchmarks/bench_toy.py", "--runs", "4", "--arms", "20", "--steps", "3", "--loop-steps", "2",
         "--diag-steps", "2", "--json", str(js))
    rows = json.loads(js.read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names[-1] == "per-run Python loop (float64)"
    want = {"vectorised float32", "vectorised float64", "vectorised float32, NumPy kernels",
            "vectorised float64, NumPy kernels", "NumPy floor: softmax + dense update only, float32"}
    assert want <= set(names)
    assert all(r["s_per_step"] > 0 for r in rows)
