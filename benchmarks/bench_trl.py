"""Side by side with TRL's GRPOTrainer: step wall time, CPU time and peak RSS as ratios (issue #5).

Each configuration runs in its own subprocess (``python benchmarks/bench_trl.py --child CONFIG ...``), so
its peak RSS is that process's ``ru_maxrss``. Configurations:

* ``trl_gc``: TRL 1.16 ``GRPOTrainer`` with TRL's defaults (``gradient_checkpointing=True``);
* ``trl_nogc``: the same with ``gradient_checkpointing=False``;
* ``ours``: :func:`scale.train.train` with diagnostics off (``diag_every=0``);
* ``ours_diag``: ours with diagnostics (measured dH, tabular E6, JVP) every step: their cost.

Shared by all: the model from ``scale.models.load_model(NAME)`` (TRL: ``AutoModelForCausalLM`` on the same
cached safetensors dir for SmolLM2, the same ``build_tiny`` object for ``tiny``); the prompts of
``scale.tasks`` arithmetic through :func:`scale.tasks.format_prompt` (chat template); the correctness
reward of :mod:`scale.grading`; 8 prompts x 4 samples, at most 32 new tokens, temperature 1.0, lr 1e-6,
fp32, ``torch.set_num_threads(THREADS)``. Everything else is each trainer's default (TRL: ``loss_type``
dapo, ``beta`` 0, fused AdamW; ours: the reference GRPO loss, AdamW, grad clip 1.0; no tensorboard,
no samples files).

A step is timed from its start to its end (TRL: ``on_step_begin``/``on_step_end`` callbacks; ours: between
consecutive ``MetricsLogger.log`` calls, so the whole loop body, plus ``time/*_s`` phases), in wall time
(``perf_counter``) and CPU time of the process (``process_time``, all threads). The first step is warm-up
and dropped; the tables give medians over the remaining steps of all rounds. Rounds alternate the
configurations (TRL, ours, TRL, ours ...) so slow drifts in machine load hit both.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_trl.py --model tiny --steps 6 --rounds 3        # seconds
    .venv/bin/python benchmarks/bench_trl.py --model smollm2-135m --steps 3 --rounds 2 \
        --json runs/bench_trl_smollm2.json                                          # ~1 min a step
    # options: --configs trl_gc,ours,trl_nogc,ours_diag  --threads 2  --task SPEC  --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

CONFIGS = ("trl_gc", "ours", "trl_nogc", "ours_diag")
TASK = "arithmetic:digits=1,ops=2,n_train=200,n_eval=50"
P, G, MAX_NEW, TEMP, LR = 8, 4, 32, 1.0, 1e-6


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB


# --------------------------------------------------------------------------------------------------
# children


def _child_trl(args, out: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from scale.grading import CorrectnessReward
    from scale.models import ensure_smollm2, load_model, resolve_name
    from scale.tasks import format_prompt, make_task

    model, tok = load_model(args.model, seed=args.seed)  # tiny: this object; smollm2: tokenizer + dir
    if resolve_name(args.model) == "smollm2-135m":
        del model
        model = AutoModelForCausalLM.from_pretrained(ensure_smollm2(), dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
    task = make_task(args.task, args.seed)
    problems = task.train
    ds = Dataset.from_dict(
        {"prompt": [format_prompt(p, tok) for p in problems], "idx": list(range(len(problems)))}
    )
    grade = CorrectnessReward()

    def correct(prompts, completions, idx, **kw):
        return [grade(c if isinstance(c, str) else c[0]["content"], problems[i]) for c, i in zip(completions, idx, strict=True)]  # noqa: E501

    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            steps.append({"wall_s": time.perf_counter() - self.t, "cpu_s": time.process_time() - self.c,
                          "rss_gb": _rss_gb()})  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        kw = {} if args.config == "trl_gc" else {"gradient_checkpointing": False}
        cfg = GRPOConfig(
            output_dir=tmp, use_cpu=True, bf16=False, fp16=False, per_device_train_batch_size=P * G,
            num_generations=G, max_completion_length=MAX_NEW, temperature=TEMP, learning_rate=LR,
            max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
            disable_tqdm=True, seed=args.seed, **kw,
        )  # fmt: skip
        out["gradient_checkpointing"] = bool(cfg.gradient_checkpointing)
        trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[correct], args=cfg,
                              train_dataset=ds, callbacks=[Timer()])  # fmt: skip
        out["rss_before_train_gb"] = _rss_gb()
        trainer.train()
        logs = [h for h in trainer.state.log_history if "entropy" in h]
    out["steps"] = steps
    out["entropy"] = [h.get("entropy") for h in logs]
    out["completion_len"] = [h.get("completions/mean_length") for h in logs]


def _child_ours(args, out: dict) -> None:
    import scale.train as st
    from scale.flags import config_from_dict
    from scale.metrics_log import MetricsLogger

    steps: list[dict] = []
    marks: list[tuple[float, float]] = []
    orig_log = MetricsLogger.log

    def log(self, step, floats):
        marks.append((time.perf_counter(), time.process_time()))
        steps.append({k: v for k, v in floats.items() if k.startswith("time/")} | {"rss_gb": _rss_gb()})
        return orig_log(self, step, floats)

    MetricsLogger.log = log
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict({
            "model": {"name": args.model},
            "task": {"spec": args.task},
            "rollout": {"prompts": P, "group_size": G, "max_new_tokens": MAX_NEW, "temperature": TEMP},
            "optim": {"lr": LR},
            "diag": {"diag_every": 1 if args.config == "ours_diag" else 0, "samples_per_step": 0},
            "run": {"steps": args.steps, "out": tmp + "/run", "seed": args.seed, "threads": args.threads,
                    "progress": "off", "tensorboard": False, "save_every": 0},
        })  # fmt: skip
        t0, c0 = time.perf_counter(), time.process_time()
        summary = st.train(cfg)
    # step k (k >= 2) = log(k) - log(k-1): the whole loop body; step 1 = from train() start (incl. load)
    prev = (t0, c0)
    for s, (w, c) in zip(steps, marks, strict=True):
        s["wall_s"], s["cpu_s"] = w - prev[0], c - prev[1]
        prev = (w, c)
    out["steps"] = steps
    out["entropy"] = [summary["last"].get("entropy")]


def child(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    out: dict = {"config": args.config, "threads": torch.get_num_threads(), "rss_after_import_gb": _rss_gb()}
    t0, c0 = time.perf_counter(), time.process_time()
    (_child_trl if args.config.startswith("trl") else _child_ours)(args, out)
    out["process_wall_s"], out["process_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    out["peak_rss_gb"] = _rss_gb()
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------------
# parent


def _run_child(args, config: str) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--model", args.model, "--steps", str(args.steps),
           "--threads", str(args.threads), "--task", args.task, "--seed", str(args.seed)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")  # fmt: skip  # noqa: E501
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    res = next((json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if res is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise RuntimeError(f"{config}: child failed (rc {proc.returncode})")
    res["load_before"], res["load_after"] = load0, os.getloadavg()
    res["child_wall_s"] = time.perf_counter() - t0
    return res


def _med(xs):
    return statistics.median(xs) if xs else None


def summarise(runs: list[dict]) -> dict:
    """Per configuration: medians over the non-warm-up steps of all rounds, max peak RSS."""
    out = {}
    for cfg in dict.fromkeys(r["config"] for r in runs):
        rs = [r for r in runs if r["config"] == cfg]
        timed = [s for r in rs for s in r["steps"][1:]]
        d = {"n_steps": len(timed), "wall_s": _med([s["wall_s"] for s in timed]),
             "cpu_s": _med([s["cpu_s"] for s in timed]), "peak_rss_gb": max(r["peak_rss_gb"] for r in rs),
             "wall_per_round": [_med([s["wall_s"] for s in r["steps"][1:]]) for r in rs]}  # fmt: skip
        for k in ("time/rollout_s", "time/score_s", "time/train_s", "time/diag_s"):
            if timed and k in timed[0]:
                d[k] = _med([s[k] for s in timed])
        out[cfg] = d
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=3, help="steps per run; the first is warm-up")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of all configurations")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task", default=TASK)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write all runs and the summary here (after every run)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.config = args.child
        child(args)
        return 0
    configs = args.configs.split(",")
    print(f"# bench_trl: model {args.model}, {P}x{G}, <= {MAX_NEW} new tokens, fp32, {args.threads} threads, "
          f"{args.steps} steps x {args.rounds} rounds; CPU {cpu_model()} x{os.cpu_count()}", flush=True)  # fmt: skip  # noqa: E501
    runs: list[dict] = []
    for rnd in range(args.rounds):
        for cfg in configs:
            r = _run_child(args, cfg)
            r["round"] = rnd
            runs.append(r)
            w = [f"{s['wall_s']:.2f}" for s in r["steps"]]
            c = [f"{s['cpu_s']:.2f}" for s in r["steps"]]
            print(f"round {rnd} {cfg:10s} wall/step {w} cpu/step {c} peak RSS {r['peak_rss_gb']:.2f} GiB "
                  f"load {r['load_before'][0]:.2f}->{r['load_after'][0]:.2f} "
                  f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC]", flush=True)  # fmt: skip
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs,
                                                       "summary": summarise(runs)}, indent=1))  # fmt: skip
    summ = summarise(runs)
    print("\n| config | timed steps | wall s/step | CPU s/step | peak RSS GiB | rollout s | score s | train s | diag s |")  # noqa: E501
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cfg, d in summ.items():
        print(f"| {cfg} | {d['n_steps']} | {fmt_s(d['wall_s'])} | {fmt_s(d['cpu_s'])} | {d['peak_rss_gb']:.2f} | "  # noqa: E501
              f"{fmt_s(d.get('time/rollout_s'))} | {fmt_s(d.get('time/score_s'))} | {fmt_s(d.get('time/train_s'))} | "  # noqa: E501
              f"{fmt_s(d.get('time/diag_s'))} |")  # fmt: skip
    print("\n| ours / TRL | wall | CPU | peak RSS |\n|---|---:|---:|---:|")
    for ours in ("ours", "ours_diag"):
        for trl in ("trl_gc", "trl_nogc"):
            if ours in summ and trl in summ:
                a, b = summ[ours], summ[trl]
                print(f"| {ours} / {trl} | {a['wall_s'] / b['wall_s']:.2f} | {a['cpu_s'] / b['cpu_s']:.2f} | "
                      f"{a['peak_rss_gb'] / b['peak_rss_gb']:.2f} |")  # fmt: skip
    if "ours" in summ and "ours_diag" in summ:
        a, b = summ["ours"], summ["ours_diag"]
        print(f"\ndiagnostics cost: ours_diag / ours wall {b['wall_s'] / a['wall_s']:.2f}, CPU "
              f"{b['cpu_s'] / a['cpu_s']:.2f}, peak RSS {b['peak_rss_gb'] / a['peak_rss_gb']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
