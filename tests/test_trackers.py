"""``run.report_to`` (``--report-to``): the metrics trackers through accelerate's tracker classes.

* the value is validated before anything is written: unknown names, ``none`` next to a tracker and a
  tracker whose package is missing are one-line ``ConfigError`` s naming ``run.report_to`` (exit 2);
* a TensorBoard run writes ``RUN_DIR/tb`` whose scalars are exactly the non-null values of
  ``metrics.jsonl``, every one finite (no None or NaN reaches a tracker);
* starting a tracker leaves ``os.environ``, ``torch.distributed`` and accelerate's state alone;
* ``purge_step`` (resume) drops the events the interrupted run wrote past its checkpoint;
* wandb and mlflow (not installed here) get the run name, the flattened configuration and the finite
  values, checked against stand-ins of their modules.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from scale.config import ConfigError, validate  # noqa: E402
from scale.metrics_log import MetricsLogger, parse_report_to, read_metrics, trackers  # noqa: E402
from scale.train import main, train  # noqa: E402
from tests.test_scale_train import make_cfg, text_reward  # noqa: E402


def tb_scalars(folder: Path) -> dict[int, dict[str, float]]:
    """``{step: {tag: value}}`` of the TensorBoard events under ``folder`` (as TensorBoard reads them)."""
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for ev in acc.Scalars(tag):
            out.setdefault(ev.step, {})[tag] = ev.value
    return out


# --------------------------------------------------------------------------------------------------
# validation


def test_report_to_values():
    assert parse_report_to("tensorboard") == ["tensorboard"]
    assert parse_report_to(" WandB, tensorboard ,wandb") == ["wandb", "tensorboard"]
    assert parse_report_to("none") == [] and trackers("none") == []
    assert trackers("tensorboard,mlflow", tensorboard=False) == ["mlflow"]  # --no-tensorboard
    for bad, words in (("tensorbord", "unknown tracker 'tensorbord'"), ("none,wandb", "'none' cannot"),
                       ("", "names no tracker"), ("all", "unknown tracker 'all'")):  # fmt: skip
        with pytest.raises(ValueError, match=words):
            parse_report_to(bad)


@pytest.mark.parametrize("value, words", [
    ("tensorboard,comet", "unknown tracker 'comet'"),
    ("none,tensorboard", "'none' cannot be combined"),
    ("tensorboard,wandb", "pip install wandb"),
    ("mlflow", "pip install mlflow"),
])  # fmt: skip
def test_bad_report_to_is_a_config_error_before_any_disk_change(tmp_path, capsys, monkeypatch, value, words):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # wandb / mlflow absent, even where they are installed
                        lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a))  # fmt: skip
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(tmp_path, run={"report_to": value}))
    assert err.value.field == "run.report_to" and words in str(err.value)
    out = tmp_path / "cli"
    rc = main(["--model", "tiny", "--report-to", value, "--out", str(out), "--progress", "off"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("entdyn train: error: run.report_to"), lines
    assert words in lines[0] and not out.exists()


def test_no_tensorboard_needs_no_tensorboard_package(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else
                        real(name, *a))  # fmt: skip
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        validate(make_cfg(tmp_path, run={"tensorboard": True}))
    assert validate(make_cfg(tmp_path, run={"tensorboard": False})).run.report_to == "tensorboard"


# --------------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_events_are_the_finite_values_of_metrics_jsonl(tmp_path):
    cfg = make_cfg(tmp_path, rule={"spec": "clip_b"}, diag={"diag_every": 1}, run={"tensorboard": True})
    train(cfg, reward_fn=text_reward)
    run = Path(cfg.run.out)
    rows = read_metrics(run)
    events = tb_scalars(run / "tb")
    assert sorted(events) == [1, 2] == [r["step"] for r in rows]
    for r in rows:
        logged = events[r["step"]]
        assert all(isinstance(v, float) and math.isfinite(v) for v in logged.values()), logged
        expected = {k: v for k, v in r.items() if k != "step" and v is not None}
        assert set(logged) == set(expected)  # every measured key, and no null one
        for k, v in expected.items():
            assert logged[k] == pytest.approx(v, rel=1e-6, abs=1e-30), k  # (events hold float32)
        for key in ("reward/mean", "entropy", "loss/total", "rule/clip_frac", "theory/dH_measured",
                    "theory/dH_tabular", "theory/dH_tabular/pos_high", "theory/dH_jvp", "time/step_s"):
            assert key in logged, key
    assert "stage/plateau_step" not in events[1]  # null before the plateau: in the JSONL only
    assert rows[0]["stage/plateau_step"] is None


def test_logger_leaves_environment_and_process_group_alone_and_purges_on_resume(tmp_path):
    from accelerate.state import PartialState

    env, state = dict(os.environ), dict(PartialState._shared_state)  # (an earlier TRL test may have made one)
    log = MetricsLogger(tmp_path, report_to=["tensorboard"])
    for step in (1, 2, 3):  # steps 2 and 3: past the checkpoint at 1, as a killed run leaves them
        log.log(step, {"a": float(step), "nan": float("nan"), "inf": math.inf, "none": None})
    log.close()
    assert dict(os.environ) == env and not torch.distributed.is_initialized()
    assert PartialState._shared_state == state  # no accelerate state was created (no process group, no env)
    log = MetricsLogger(tmp_path, report_to=["tensorboard"], purge_step=2)  # --resume from step 1
    log.log(2, {"a": 20.0})
    log.close()
    events = tb_scalars(tmp_path / "tb")
    assert events == {1: {"a": 1.0}, 2: {"a": 20.0}}  # 2 and 3 of the first writer purged; never NaN/None
    assert [r["nan"] for r in read_metrics(tmp_path)[:3]] == [None] * 3  # the JSONL keeps null


# --------------------------------------------------------------------------------------------------
# wandb and mlflow, against stand-ins of their modules


class _Calls(list):
    def __call__(self, name):
        return lambda *a, **kw: self.append((name, a, kw))


def _fake_wandb(calls: _Calls) -> types.ModuleType:
    mod = types.ModuleType("wandb")
    run = types.SimpleNamespace(log=calls("log"), finish=calls("finish"))

    def init(**kw):
        calls.append(("init", (), kw))
        return run

    mod.init, mod.config = init, types.SimpleNamespace(update=calls("config"))
    return mod


def _fake_mlflow(calls: _Calls) -> types.ModuleType:
    mod = types.ModuleType("mlflow")
    mod.utils = types.SimpleNamespace(validation=types.SimpleNamespace(MAX_PARAM_VAL_LENGTH=6000,
                                                                       MAX_PARAMS_TAGS_PER_BATCH=100))
    mod.search_experiments = lambda **kw: []
    mod.create_experiment = lambda **kw: calls.append(("experiment", (), kw)) or "1"
    mod.start_run = lambda **kw: calls.append(("init", (), kw)) or object()
    mod.log_params, mod.log_metrics, mod.end_run = calls("config"), calls("log"), calls("finish")
    return mod


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_wandb_and_mlflow_get_the_run_the_config_and_finite_values(tmp_path, monkeypatch, name):
    calls = _Calls()
    monkeypatch.setitem(sys.modules, name, (_fake_wandb if name == "wandb" else _fake_mlflow)(calls))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run_dir = tmp_path / "my_run"
    run_dir.mkdir()
    log = MetricsLogger(run_dir, report_to=[name], config={"optim": {"lr": 1e-3}, "run": {"resume": None}})
    log.log(1, {"a": 1.5, "b": float("nan"), "c": None})
    log.close()
    init = next(kw for what, _, kw in calls if what == "init")
    if name == "wandb":
        assert init == {"project": "entropy-dynamics", "name": "my_run", "dir": str(run_dir)}
        assert ("log", ({"a": 1.5},), {"step": 1}) in calls
        config = next(a[0] for what, a, _ in calls if what == "config")
    else:
        assert init["run_name"] == "my_run" and calls[0][2]["name"] == "entropy-dynamics"
        assert ("log", ({"a": 1.5},), {"step": 1}) in calls
        config = next(a[0] for what, a, _ in calls if what == "config")
    assert config == {"optim.lr": 1e-3, "run.resume": None}
    assert [what for what, _, _ in calls][-1] == "finish" and log.trackers == []
