"""Replicated vs FSDP2-sharded training over W processes: step time and per-process peak memory, side by side.

Both configurations run ``torchrun --nproc_per_node W -m scale.train`` on the same flags, the second with
``--fsdp`` (:mod:`scale.distributed`): parameters, gradients and AdamW state sharded over the processes,
the weights gathered once per no-grad pass (rollout, scoring). Rounds alternate the configurations, so
slow drifts in machine load hit both. Read from rank 0's ``metrics.jsonl``: ``time/step_s`` (median over
the steps after the first, which is warm-up) and ``mem/peak_gb`` (rank 0's peak RSS on CPU, its peak CUDA
memory on a GPU; the ranks are symmetric). The two runs' final parameters are compared too.

On CPU, glibc keeps freed heap memory that ``malloc_trim`` cannot return when it is fragmented, and the
weights FSDP gathers for each no-grad pass are freed into that heap; ``--mmap-threshold BYTES`` sets
``MALLOC_MMAP_THRESHOLD_`` for both configurations, so every larger allocation is its own mapping, returned
to the system when freed, and peak RSS follows the live tensors.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_fsdp.py --model tiny --steps 3                    # seconds
    .venv/bin/python benchmarks/bench_fsdp.py --model smollm2-135m --steps 3 --rounds 1 \
        --json runs/bench_fsdp_smollm2.json                                             # minutes on CPU
    # GPUs: add --device cuda (one GPU per process, nccl)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_model, fmt_s  # noqa: E402

CONFIGS = {"replicated": [], "fsdp": ["--fsdp"]}


def _run(config: str, args, out: Path) -> dict:
    flags = ["--model", args.model, "--task", args.task, "--prompts", str(args.prompts),
             "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens),
             "--lr", "1e-6", "--steps", str(args.steps), "--diag-every", "0", "--threads", str(args.threads),
             "--device", args.device, "--no-tensorboard", "--samples-per-step", "0", "--save-every", "0",
             "--progress", "log", "--out", str(out), *CONFIGS[config]]  # fmt: skip
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", str(args.world), "-m", "scale.train", *flags]
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    from scale.metrics_log import read_metrics

    rows = read_metrics(out)
    return {
        "wall_s": time.perf_counter() - t0,
        "step_s": [r["time/step_s"] for r in rows],
        "peak_gb": max(r["mem/peak_gb"] for r in rows),
        "run_dir": str(out),
    }


def _max_param_diff(a: str, b: str) -> float:
    from safetensors.torch import load_file

    from scale.checkpoint import list_checkpoints

    pa, pb = (load_file(str(list_checkpoints(d)[-1] / "model.safetensors")) for d in (a, b))
    return max(((pa[k] - pb[k]).abs().max() / pa[k].abs().max().clamp_min(1e-30)).item() for k in pa)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--task", default="arithmetic:digits=1,ops=2,n_train=200,n_eval=50")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mmap-threshold", type=int, default=0, help="MALLOC_MMAP_THRESHOLD_ (0: default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is warm-up)")

    results: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="bench_fsdp_") as tmp:
        for rnd in range(args.rounds):
            for config in CONFIGS:
                r = _run(config, args, Path(tmp) / f"{config}_{rnd}")
                results[config].append(r)
                print(f"round {rnd + 1} {config}: steps {[f'{s:.2f}' for s in r['step_s']]} s, "
                      f"peak {r['peak_gb']:.2f} GB", file=sys.stderr, flush=True)  # fmt: skip
        diff = _max_param_diff(results["replicated"][0]["run_dir"], results["fsdp"][0]["run_dir"])
    summary = {}
    for config, rs in results.items():
        steps = [s for r in rs for s in r["step_s"][1:]]
        summary[config] = {"step_s": statistics.median(steps), "peak_gb": max(r["peak_gb"] for r in rs)}
    rep, fs = summary["replicated"], summary["fsdp"]
    mmap = args.mmap_threshold or "default"
    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} cores; device {args.device}; {args.world} processes x "
          f"{args.threads} threads; MALLOC_MMAP_THRESHOLD_ {mmap}; model {args.model}; "
          f"{args.prompts} prompts x {args.group_size} samples, <= {args.max_new_tokens} new tokens; "
          f"{args.steps} steps x {args.rounds} rounds "
          "(median of steps 2+)")  # fmt: skip
    print("\n| | replicated | FSDP2 | FSDP / replicated |\n|---|---|---|---|")
    ratio = fs["step_s"] / rep["step_s"]
    print(f"| step time (s) | {fmt_s(rep['step_s'])} | {fmt_s(fs['step_s'])} | {ratio:.2f} |")
    print(f"| peak memory per process (GB) | {rep['peak_gb']:.2f} | {fs['peak_gb']:.2f} | "
          f"{fs['peak_gb'] / rep['peak_gb']:.2f} |")  # fmt: skip
    print(f"\nfinal parameters, max relative difference FSDP vs replicated: {diff:.2e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "param_diff": diff,
                                               "runs": results}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
