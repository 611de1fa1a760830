"""GPU smoke run and throughput of ``scale.train`` (issue #5): one script, one JSON, one Markdown table.

Two parts, each a sequence of :func:`scale.train.train` runs in this process (the model is loaded per run):

* **smoke**: SmolLM2 (or ``--model``) on an arithmetic task, ``--smoke-steps`` steps with the theory
  diagnostics every step, once in float32 and once in bfloat16 mixed precision. Reported: reward, entropy,
  and the measured entropy change against its first-order predictions (JVP, tabular E6) per step.
* **throughput**: a bigger batch (``--prompts`` x ``--group-size`` x ``--max-new-tokens``) without
  diagnostics for float32 / bfloat16, micro-batches of ``--micro`` sequences, with activation
  checkpointing (the default) and, for the largest micro-batch, without; the first step is warm-up;
  medians of the rest: step time and its phases, tokens per second (response tokens / step time), peak
  GPU memory (``torch.cuda.max_memory_allocated``, per step).

Runs on CPU as well (``--device cpu --model tiny``: a functional check of the script, not a benchmark).

Usage (repository root)::

    python benchmarks/bench_gpu.py --device cuda --json runs/bench_gpu.json
    python benchmarks/bench_gpu.py --device cpu --model tiny --smoke-steps 2 --steps 2 \\
        --prompts 4 --group-size 4 --max-new-tokens 8 --micro 4,16           # seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOKE_TASK = "arithmetic:digits=1,ops=1,n_train=200,n_eval=20"
THROUGHPUT_TASK = "arithmetic:digits=2,ops=2,n_train=2000,n_eval=20"


def _run(cfg_dict: dict) -> list[dict]:
    from scale.flags import config_from_dict
    from scale.metrics_log import read_metrics
    from scale.train import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg_dict = json.loads(json.dumps(cfg_dict))
        cfg_dict.setdefault("run", {}).update({"out": tmp + "/run", "progress": "log", "tensorboard": False,
                                               "save_every": 0})  # fmt: skip
        cfg = config_from_dict(cfg_dict)
        train(cfg)
        return read_metrics(Path(tmp) / "run")


def smoke(args, dtype: str) -> dict:
    rows = _run({
        "model": {"name": args.model, "device": args.device, "dtype": dtype},
        "task": {"spec": SMOKE_TASK},
        "rollout": {"prompts": 8, "group_size": 8, "max_new_tokens": 48},
        "optim": {"lr": 1e-5},
        "diag": {"diag_every": 1, "samples_per_step": 0},
        "run": {"steps": args.smoke_steps, "seed": args.seed},
    })  # fmt: skip
    keys = ("reward/mean", "accuracy", "entropy", "theory/dH_measured", "theory/dH_jvp", "theory/dH_tabular",
            "time/step_s", "time/diag_s", "mem/peak_gb", "ratio/mean", "clip/low_frac", "clip/high_frac")
    return {"dtype": dtype, "steps": [{k: r.get(k) for k in ("step", *keys)} for r in rows]}


def throughput(args, dtype: str, micro: int, ckpt: bool) -> dict:
    rows = _run({
        "model": {"name": args.model, "device": args.device, "dtype": dtype},
        "task": {"spec": THROUGHPUT_TASK},
        "rollout": {"prompts": args.prompts, "group_size": args.group_size,
                    "max_new_tokens": args.max_new_tokens},
        "optim": {"lr": 1e-6, "micro_batch": micro, "grad_checkpointing": ckpt},
        "diag": {"diag_every": 0, "samples_per_step": 0},
        "run": {"steps": args.steps, "seed": args.seed},
    })  # fmt: skip
    timed = rows[1:] if len(rows) > 1 else rows

    def med(key):
        vals = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    tokens = med("len/mean") * args.prompts * args.group_size if med("len/mean") else None
    return {
        "dtype": dtype, "micro_batch": micro, "grad_checkpointing": ckpt, "timed_steps": len(timed),
        "step_s": med("time/step_s"), "rollout_s": med("time/rollout_s"), "train_s": med("time/train_s"),
        "score_s": med("time/score_s"), "tokens_per_s": med("tokens_per_s"), "response_tokens": tokens,
        "mean_len": med("len/mean"), "peak_gb": max(r["mem/peak_gb"] for r in timed),
    }  # fmt: skip


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        gib = p.total_memory / 2**30
        return f"{p.name}, {gib:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
    from _common import cpu_model

    return f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke-steps", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="throughput steps per configuration (1 warm-up)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--micro", default="16,256", help="micro-batch sizes of the throughput runs")
    ap.add_argument("--parts", default="smoke,throughput")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (the default, made explicit)
    out: dict = {"device": _device_name(args.device), "args": vars(args), "smoke": [], "throughput": []}
    dtypes = args.dtypes.split(",")
    t0 = time.perf_counter()

    def save():
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=1))

    if "smoke" in args.parts:
        for dt in dtypes:
            out["smoke"].append(smoke(args, dt))
            save()
    if "throughput" in args.parts:
        for dt in dtypes:
            micros = [int(x) for x in args.micro.split(",")]
            for mb, ck in [(mb, True) for mb in micros] + [(max(micros), False)]:
                out["throughput"].append(throughput(args, dt, mb, ck))
                save()
    out["total_s"] = time.perf_counter() - t0
    save()

    print(f"\n# bench_gpu on {out['device']}, {out['total_s']:.0f} s in all")
    for sm in out["smoke"]:
        print(f"\n## smoke, {sm['dtype']}: {args.model}, 8 prompts x 8, <= 48 tokens, lr 1e-5, "
              "diagnostics every step")
        print("| step | reward | entropy | dH measured | dH JVP | JVP / measured | dH tabular | step s "
              "| diag s | peak GB |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in sm["steps"]:
            m, j = r["theory/dH_measured"], r["theory/dH_jvp"]
            ratio = f"{j / m:.3f}" if m else "—"
            print(f"| {r['step']} | {r['reward/mean']:.3f} | {r['entropy']:.4f} | {m:.3e} | {j:.3e} | "
                  f"{ratio} | "
                  f"{r['theory/dH_tabular']:.3e} | {r['time/step_s']:.2f} | {r['time/diag_s']:.2f} | "
                  f"{r['mem/peak_gb']:.2f} |")
    if out["throughput"]:
        print(f"\n## throughput: {args.prompts} prompts x {args.group_size} samples, "
              f"<= {args.max_new_tokens} "
              f"new tokens, no diagnostics, median of {args.steps - 1} steps after 1 warm-up")
        print("| dtype | micro-batch | checkpointing | step s | rollout s | train s | mean length | "
              "response tokens/s "
              "| peak GB |")
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in out["throughput"]:
            ck = "on" if r["grad_checkpointing"] else "off"
            print(f"| {r['dtype']} | {r['micro_batch']} | {ck} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | "
                  f"{r['train_s']:.2f} | {r['mean_len']:.1f} | {r['tokens_per_s']:.0f} | "
                  f"{r['peak_gb']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
