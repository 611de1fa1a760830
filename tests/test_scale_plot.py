"""``entdyn plot``: figures and the token-level view from a run directory (synthetic run, no torch)."""

from __future__ import annotations

import json

import pytest

from scale.plot import load_metrics, plot_run, render_tokens_html


def _fake_run(tmp_path, *, diagnostics=True):
    rows = []
    for s in range(12):
        row = {"step": s, "reward": 0.2 + 0.05 * s, "accuracy": 0.1 + 0.05 * s, "entropy": 2.0 - 0.1 * s,
               "entropy/pos": 1.8 - 0.1 * s, "entropy/neg": 2.2 - 0.1 * s}
        row.update({f"entropy/pos_bucket_{b}": 2.0 - 0.1 * s + 0.1 * abs(b - 1.5) for b in range(4)})
        if diagnostics and s % 2 == 0:
            row.update({"theory/dH_measured": -0.1 + 0.001 * s, "theory/dH_tabular": -0.05,
                        "theory/dH_jvp": -0.1 + 0.0011 * s})
        if s % 6 == 0:
            row["eval/avg@4"] = 0.1 * s / 6
        rows.append(row)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "samples").mkdir()
    recs = [{"step": 10, "prompt": "What is 2+3?", "completion": "It is <5>",
             "tokens": ["It", " is", " <", "5", ">"], "entropy": [0.1, 0.5, 2.0, 1.0, 0.0],
             "s_star": [0.01, -0.02, 0.03, 0.0, 0.0], "deviation": [0.01, -0.03, 0.02, 0.0, 0.0],
             "quadrant": [0, 1, 0, -1, -1], "advantage": 1.2, "reward": 1.0},
            {"step": 10, "prompt": "p", "completion": "x", "tokens": ["x"], "entropy": [1.0],
             "s_star": [0.1], "deviation": [0.1], "quadrant": [2], "advantage": -0.5, "reward": 0.0}]
    (tmp_path / "samples" / "step_000010.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return rows


def test_plot_run_writes_every_figure(tmp_path):
    _fake_run(tmp_path)
    written = plot_run(tmp_path)
    names = {p.name for p in written}
    assert names == {"reward.png", "entropy.png", "delta_h.png", "position.png", "tokens.html", "tokens.png"}
    for p in written:
        assert p.stat().st_size > 500, p


def test_plot_run_without_diagnostics_or_samples(tmp_path):
    _fake_run(tmp_path, diagnostics=False)
    for f in (tmp_path / "samples").iterdir():
        f.unlink()
    names = {p.name for p in plot_run(tmp_path, tmp_path / "figs")}
    assert "delta_h.png" in names and "tokens.html" not in names


def test_token_html_escapes_and_colours(tmp_path):
    rows = _fake_run(tmp_path)
    assert len(rows) == 12
    recs = [json.loads(x) for x in (tmp_path / "samples" / "step_000010.jsonl").read_text().splitlines()]
    page = render_tokens_html(recs, step=10)
    assert "&lt;" in page and "<5>" not in page  # model text is escaped
    assert page.count("class='t' title=") == 2 * 6  # every token twice (entropy row, quadrant row)
    assert "step 10" in page and "pos_high" in page


def test_malformed_metrics_line_names_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        load_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="run directory"):
        load_metrics(tmp_path / "nope")


def test_cli_plot(tmp_path, capsys):
    from entdyn.cli import main

    _fake_run(tmp_path)
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "p")]) == 0
    assert "tokens.html" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "run directory" in capsys.readouterr().err


def test_delta_h_table_lists_diagnosed_steps(tmp_path):
    from scale.plot import delta_h_table

    rows = _fake_run(tmp_path)
    table = delta_h_table(rows).splitlines()
    assert table[0].startswith("| step | measured ΔH")
    assert len(table) == 2 + 6  # steps 0, 2, ..., 10 were diagnosed
    assert table[2].startswith("| 0 | -1.000e-01 | -5.000e-02 | -1.000e-01 | 1.000 |")
    assert "no theory diagnostics" in delta_h_table([{"step": 1, "reward/mean": 0.5}])
