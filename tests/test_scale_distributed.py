"""Multi-process training (:mod:`scale.distributed`): 2 gloo processes equal 1 process on the same batch.

Two CPU processes (``torch.multiprocessing``, gloo) train the ``tiny`` model in float64 for 2 steps with
a rule whose statistics are batch statistics (Clip_B's mean/std, Clip-Cov's centring and top-k, the
entropy quantile); a 1-process run of the same configuration must give the same parameters and the same
logged metrics (rule metrics included) to floating-point tolerance; a 2-process run stopped after step 1
and resumed equals the uninterrupted one bit for bit. The same holds with the parameters sharded by FSDP2
(``model.fsdp``), whose checkpoints a 1-process run resumes. Each process owns half of every
minibatch (2 minibatches, so the split and the global normaliser are both exercised), and the theory
diagnostics (gathered after-update entropies, the summed JVP) run on every step.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from scale.checkpoint import list_checkpoints  # noqa: E402
from scale.config import ConfigError, validate_distributed  # noqa: E402
from scale.distributed import owned_slices  # noqa: E402
from scale.flags import config_from_dict  # noqa: E402
from scale.metrics_log import TIMING_PREFIXES, read_metrics  # noqa: E402

TASK = "arithmetic:digits=1,ops=1,n_train=40,n_eval=8"
RULES = {
    "clip_b": "clip_b:mu=0.5",
    "clip_cov": "clip_cov:frac=0.2,lb=-1000,ub=1000",
    "entropy_mask": "high_entropy_mask:rho=0.5",
}
# metrics that are not functions of the batch and the parameters
LOCAL_KEYS = ("mem/", "tokens_per_s")


def text_reward(completion: str, problem) -> float:
    """A deterministic, varied reward: digits and letters count differently."""
    return float(sum(c.isdigit() for c in completion) - 0.5 * sum(c.isalpha() for c in completion)) / 8.0


def make_cfg(out: Path, rule: str, fsdp: bool = False, dtype: str = "float64"):
    return config_from_dict(
        {
            "model": {"dtype": dtype, "fsdp": fsdp},
            "loss": {"kl_beta": 0.01},  # a reference model too (replicated, or sharded with FSDP)
            "task": {"spec": TASK},
            "rule": {"spec": rule},
            "rollout": {"prompts": 2, "group_size": 4, "max_new_tokens": 8},
            # micro-batches of 2 = one process's share: both runs push the same rows through each forward
            # (a prompt's prefix gradient sums its rows inside transformers' float32 RMSNorm backward, so
            # other groupings agree only to ~1e-7 in the gradient, ~1e-6 in the parameters after 3 steps;
            # tests/test_scale_rollout.py, docs/scaling.md)
            "optim": {"lr": 1e-3, "minibatches": 2, "micro_batch": 2},
            "diag": {"diag_every": 1, "samples_per_step": 2},
            "eval": {"eval_every": 2, "eval_problems": 2},  # rank 0 evaluates (with FSDP: every process)
            "run": {"steps": 2, "out": str(out), "save_every": 0, "progress": "off", "tensorboard": False,
                    "threads": 1},
        }
    )  # fmt: skip


def _worker(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist

    from scale.train import train

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _check_grad_reduction(rank, world)
        _check_replicated(rank, world)
        for name, spec in RULES.items():
            train(make_cfg(Path(root) / f"dist_{name}", spec), reward_fn=text_reward)
        # stopped after step 1, then resumed from rank 0's checkpoint by both processes
        out = Path(root) / "dist_resumed"
        cfg = make_cfg(out, RULES["clip_b"])
        cfg.run.stop_after = 1
        train(cfg, reward_fn=text_reward)
        cfg = make_cfg(out, RULES["clip_b"])
        cfg.run.resume = str(out)
        train(cfg, reward_fn=text_reward)
        # FSDP2: the same runs with parameters, gradients and optimizer state sharded
        for name, spec in RULES.items():
            train(make_cfg(Path(root) / f"fsdp_{name}", spec, fsdp=True), reward_fn=text_reward)
        out = Path(root) / "fsdp_resumed"
        cfg = make_cfg(out, RULES["clip_b"], fsdp=True)
        cfg.run.stop_after = 1
        train(cfg, reward_fn=text_reward)
        if rank == 0:  # its step-1 checkpoint, resumed by one process in the test
            shutil.copytree(out, Path(root) / "fsdp_then_single")
        dist.barrier()
        cfg = make_cfg(out, RULES["clip_b"], fsdp=True)
        cfg.run.resume = str(out)
        train(cfg, reward_fn=text_reward)
        # float32 (FSDP picks its reduce-scatter op by dtype; gloo has no PREMUL_SUM for float32)
        cfg = make_cfg(Path(root) / "fsdp_f32", RULES["clip_b"], fsdp=True, dtype="float32")
        train(cfg, reward_fn=text_reward)
    finally:
        dist.destroy_process_group()


def _check_grad_reduction(rank: int, world: int) -> None:
    """Gradients are summed; a gradient on one process only counts as zeros on the others; a parameter
    with no gradient anywhere keeps ``None`` (the optimizer skips it, as with one process)."""
    from scale.distributed import Dist, all_reduce_grads

    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), float(rank + 1))
    if rank == 1:
        b.grad = torch.ones(3)
    all_reduce_grads([a, b, c], Dist(rank, world))
    assert a.grad.tolist() == [world * (world + 1) / 2] * 3
    assert b.grad.tolist() == [1.0] * 3 and c.grad is None


def _check_replicated(rank: int, world: int) -> None:
    """Equal tensors pass; a batch that differs on one process raises on every process."""
    from scale.distributed import Dist, check_replicated

    d = Dist(rank, world)
    check_replicated(torch.arange(12).view(3, 4), d, "same")
    x = torch.arange(12).view(3, 4)
    if rank == 1:
        x[2, 1], x[2, 2] = x[2, 2], x[2, 1]  # same sum, other order
    with pytest.raises(RuntimeError, match=r"the batch differs between processes: rank\(s\) \[1\]"):
        check_replicated(x, d, "the batch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES) and not k.startswith(LOCAL_KEYS)}
        for r in read_metrics(run_dir)
    ]


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1] / "model.safetensors"))


def test_owned_slices_cover_every_minibatch_once():
    rows = sorted(i for r in range(4) for s in owned_slices(24, 3, 4, r) for i in range(s.start, s.stop))
    assert rows == list(range(24))
    assert owned_slices(8, 1, 1, 0) == [slice(0, 8)]


def test_distributed_constraints_name_the_field(tmp_path):
    cfg = make_cfg(tmp_path, "none")  # minibatches of 4 sequences
    validate_distributed(cfg, 2)
    with pytest.raises(ConfigError, match="optim.minibatches"):
        validate_distributed(cfg, 3)
    cfg.optim.micro_batch = 4  # valid alone (a minibatch of 4), not for a share of 2
    with pytest.raises(ConfigError, match="optim.micro_batch"):
        validate_distributed(cfg, 2)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    from scale.train import train

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    n = torch.get_num_threads()
    try:
        for name, spec in RULES.items():
            train(make_cfg(tmp_path / f"single_{name}", spec), reward_fn=text_reward)
    finally:
        torch.set_num_threads(n)
    # one process resumes the FSDP run's step-1 checkpoint (full tensors, the 1-process layout)
    cfg = make_cfg(tmp_path / "fsdp_then_single", RULES["clip_b"])
    cfg.run.resume = str(tmp_path / "fsdp_then_single")
    try:
        train(cfg, reward_fn=text_reward)
        train(make_cfg(tmp_path / "single_f32", RULES["clip_b"], dtype="float32"), reward_fn=text_reward)
    finally:
        torch.set_num_threads(n)
    p1, p2 = _params(tmp_path / "single_f32"), _params(tmp_path / "fsdp_f32")
    for key in p1:
        torch.testing.assert_close(p2[key], p1[key], rtol=1e-5, atol=1e-6, msg=f"float32: {key}")
    runs = [(name, f"{mode}_{name}") for mode in ("dist", "fsdp") for name in RULES]
    for name, other in [*runs, ("clip_b", "fsdp_then_single")]:
        single, dist_ = tmp_path / f"single_{name}", tmp_path / other
        # rank 0 alone wrote the run directory
        n_ckpt = 2 if other == "fsdp_then_single" else 1  # (save_every 0: the last step; + the resumed one)
        assert len(list_checkpoints(dist_)) == n_ckpt and (dist_ / "metrics.jsonl").is_file()
        p1, p2 = _params(single), _params(dist_)
        assert p1.keys() == p2.keys()
        for key in p1:
            torch.testing.assert_close(p2[key], p1[key], rtol=1e-9, atol=1e-12, msg=f"{name}: {key}")
        r1, r2 = _rows(single), _rows(dist_)
        assert len(r1) == len(r2) == 2
        for a, b in zip(r1, r2, strict=True):
            assert a.keys() == b.keys()
            rule_keys = [k for k in a if k.startswith("rule/")]
            assert rule_keys, f"{name}: no rule metrics"
            for k in a:
                if a[k] is None or b[k] is None or (isinstance(a[k], float) and math.isnan(a[k])):
                    assert a[k] == b[k] or (a[k] is not None and b[k] is not None and math.isnan(b[k])), k
                    continue
                assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), f"{name} step {a['step']}: {k}"
        # the rule did something on the global batch (not a vacuous comparison)
        assert any(v for r in r1 for k, v in r.items() if k.startswith("rule/") and isinstance(v, float))
    # a 2-process resume equals the uninterrupted 2-process run bit for bit, with or without FSDP
    for mode in ("dist", "fsdp"):
        resumed, full = tmp_path / f"{mode}_resumed", tmp_path / f"{mode}_clip_b"
        p_res, p_full = _params(resumed), _params(full)
        assert all(torch.equal(p_res[k], p_full[k]) for k in p_full), mode
        assert _rows(resumed) == _rows(full), mode
    # FSDP checkpoints hold the 1-process optimizer state (full tensors, parameters numbered alike)
    o1, o2 = (torch.load(list_checkpoints(tmp_path / r)[-1] / "state.pt", weights_only=True)["optimizer"]
              for r in ("single_clip_b", "fsdp_clip_b"))  # fmt: skip
    assert o1["state"].keys() == o2["state"].keys()
    for i, st in o1["state"].items():
        for key, v in st.items():
            torch.testing.assert_close(o2["state"][i][key], v, rtol=1e-9, atol=1e-15, msg=f"{i} {key}")


LAUNCHED = """
import sys

from scale.flags import parse_args
from scale.train import train
from test_scale_distributed import text_reward

train(parse_args(sys.argv[1:]), reward_fn=text_reward)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "launch",
    [["--multi_gpu"], ["--use_fsdp", "--fsdp_version", "2"]],
    ids=["replicated", "fsdp"],
)
def test_accelerate_launch_two_processes_equal_one_process(tmp_path, launch):
    """``accelerate launch --multi_gpu --num_processes 2`` (accelerate's torchrun launcher; on a machine
    without GPUs the trainer picks gloo) and ``accelerate launch --use_fsdp --fsdp_version 2`` (the
    trainer shards with FSDP2) give the 1-process run's parameters and metrics."""
    import subprocess
    import sys

    from scale.flags import parse_args
    from scale.train import train

    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate is not installed")
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    flags = ["--model", "tiny", "--task", TASK, "--prompts", "2", "--group-size", "4",
             "--max-new-tokens", "8", "--lr", "1e-3", "--minibatches", "2", "--micro-batch", "2",
             "--rule", RULES["clip_cov"], "--steps", "2", "--diag-every", "1", "--threads", "1",
             "--no-tensorboard", "--dtype", "float64", "--samples-per-step", "0",
             "--save-every", "0", "--progress", "log"]  # fmt: skip
    cmd = [str(accelerate), "launch", *launch, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(script), *flags, "--out", str(tmp_path / "acc")]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    how = "FSDP2, sharded" if "--use_fsdp" in launch else "replicated"
    assert f"2 processes (gloo), parameters {how}" in proc.stderr

    n = torch.get_num_threads()
    try:
        one = parse_args([*flags, "--out", str(tmp_path / "one"), "--progress", "off"])
        train(one, reward_fn=text_reward)
    finally:
        torch.set_num_threads(n)
    from scale.models import load_model

    p0 = load_model("tiny", seed=0)[0].double().state_dict()  # the runs' initial weights (run.seed 0)
    p1, p2 = _params(tmp_path / "one"), _params(tmp_path / "acc")
    assert max((p1[k] - p0[k]).abs().max().item() for k in p1) > 1e-4  # the updates did something
    for key in p1:
        torch.testing.assert_close(p2[key], p1[key], rtol=1e-9, atol=1e-12, msg=key)
    r1, r2 = _rows(tmp_path / "one"), _rows(tmp_path / "acc")
    assert [r["step"] for r in r2] == [1, 2]
    for a, b in zip(r1, r2, strict=True):
        keys = [k for k in a if k.startswith("rule/")] + ["loss/policy", "theory/dH_measured", "entropy"]
        assert len(keys) > 3
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), k
