"""Time every token rule of ``theory.rules`` on a large batch (NumPy, torch eager, torch.compile) beside a
floor.

The *floor* of a column is the measured time of one masked mean over the batch in that column's own
namespace and mode (``masked_mean(xp, logp, valid)``, the reduction every rule does at least once; for the
compiled column the floor is compiled too). Each rule is reported as seconds and as a ratio to its column's
floor, all measured in one run: performance statements are ratios from one run, never absolute times.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_rules.py                    # 2**20 tokens: (1024, 1024) float32
    .venv/bin/python benchmarks/bench_rules.py --tokens 65536 --repeat 3 --no-compile --json out.json

Inputs (one seeded ``numpy.random.Generator``; torch gets ``torch.from_numpy`` of the same bytes):
``logp = -Exponential(1.5)``, ``old_logp = logp + 0.05 N(0, 1)``, ``entropy ~ U(0, 3)``,
``baseline ~ U(0, 0.2)``, ``noise ~ U(0, 1)``, all ``(B, T)`` float32; GRPO advantages of binary rewards in
groups of 8 (``theory.grpo_advantages``) broadcast over each sequence; ``valid`` a prefix of uniform
length in ``[T/4, T]``; ``group = arange(B) // 8``; ``step = 0``.

Each call builds the ``TokenBatch`` from the arrays and calls the rule (what a trainer would compile).
It is warmed up once (for torch.compile: compiled, timed separately as "compile s"), then timed ``--repeat``
times; the median (and minimum) is reported. torch runs on CPU with ``--threads`` intra-op threads
(default 2). ``torch.compile`` uses the default (inductor) backend, compiling in-process
(``compile_threads = 1``: no worker pool competing for the cores while anything is timed);
``torch._dynamo.reset()`` runs before each rule so no rule hits the recompile limit of another; the
number of graphs dynamo hands to inductor and of graph breaks is reported, and a failure to compile is
reported, not hidden.

OpenMP wait policy: on the project's 2-vCPU VMs, libgomp's default spin-then-sleep wait makes many
2-thread torch ops stall for a fixed ~8 ms (a 1M-element ``a & b`` takes 8 ms instead of 0.1 ms), which
turns a 1M-token benchmark into a measurement of that stall. The script therefore sets
``OMP_WAIT_POLICY=PASSIVE`` before importing torch unless the variable is already set (``--omp-wait-policy
inherit`` keeps the environment's), and prints a probe: the median time of one 1M-element ``a & b`` at the
chosen thread count.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import cpu_model, fmt_r, fmt_s  # benchmarks/_common.py (script dir on sys.path)

import theory  # noqa: E402
from theory._xp import namespace  # noqa: E402
from theory.rules import (  # noqa: E402
    ClipB,
    ClipCov,
    ClipV,
    Compose,
    EntropyBonus,
    HighEntropyMask,
    KLCov,
    PositionBonus,
    PPLShaping,
    ProbWeighted,
    QuadrantMask,
    TokenBatch,
)
from theory.rules._stats import masked_mean  # noqa: E402

SEED = 20260222
GROUP = 8

#: (label, rule, needs a state). Defaults except where a rule would otherwise be a no-op (position gate).
CASES = [
    ("clip_b", ClipB(), False),
    ("clip_v", ClipV(), False),
    ("clip_cov", ClipCov(), False),
    ("kl_cov", KLCov(), False),
    ("high_entropy_mask", HighEntropyMask(), False),
    ("entropy_bonus", EntropyBonus(), False),
    ("entropy_bonus adaptive", EntropyBonus(adaptive=True), True),
    ("ppl_shaping", PPLShaping(), False),
    ("position_bonus gate=always", PositionBonus(gate="always"), False),
    ("prob_weighted", ProbWeighted(), False),
    ("quadrant_mask", QuadrantMask(), False),
    ("Compose(clip_b, position_bonus)", Compose((ClipB(), PositionBonus(gate="always"))), False),
]
MODES = ("numpy", "torch", "compile")


# ----------------------------------------------------------------------------------------- machine




def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "numpy": np.__version__,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    for var in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if var in os.environ:
            info[var] = os.environ[var]
    return info


# ------------------------------------------------------------------------------------------ timing


def time_call(fn: Callable[[], object], repeat: int, *, warm: bool = True) -> list[float]:
    """Optionally warm up once, then time ``fn`` ``repeat`` times (outputs dropped between calls)."""
    if warm:
        out = fn()
        del out
    gc.collect()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    gc.collect()
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


# ------------------------------------------------------------------------------------------ inputs


def make_inputs(batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (batch, length)
    logp = -rng.exponential(1.5, size=shape).astype(np.float32)
    old_logp = (logp + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    n_groups = -(-batch // GROUP)
    rewards = rng.integers(0, 2, size=(n_groups, GROUP)).astype(np.float32)
    seq_adv = np.asarray(theory.grpo_advantages(rewards), dtype=np.float32).reshape(-1)[:batch]
    lengths = rng.integers(max(length // 4, 1), length + 1, size=batch)
    return {
        "logp": logp,
        "old_logp": old_logp,
        "entropy": rng.uniform(0.0, 3.0, size=shape).astype(np.float32),
        "baseline": rng.uniform(0.0, 0.2, size=shape).astype(np.float32),
        "adv": np.ascontiguousarray(np.broadcast_to(seq_adv[:, None], shape)),
        "valid": np.arange(length)[None, :] < lengths[:, None],
        "group": (np.arange(batch) // GROUP).astype(np.int64),
        "noise": rng.uniform(size=shape).astype(np.float32),
    }


def to_backend(arrays: dict[str, np.ndarray], backend: str) -> dict:
    if backend == "numpy":
        return dict(arrays)
    import torch

    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def make_fn(rule) -> Callable:
    """``fn(arrays, state)``: build the TokenBatch and call the rule (the unit that is timed and compiled)."""

    def fn(logp, old_logp, entropy, baseline, adv, valid, group, noise, state):
        batch = TokenBatch(
            logp=logp,
            adv=adv,
            valid=valid,
            old_logp=old_logp,
            entropy=entropy,
            baseline=baseline,
            group=group,
        )
        out = rule(batch, noise=noise, state=state)
        return out.keep, out.adv, out.weight, out.kl_coef, out.entropy_coef, out.metrics, out.state

    return fn


def parallel_probe(torch) -> float:
    """Median seconds of one ``a & b`` on two 1M-element bool tensors (a parallel-region latency probe)."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2**20, generator=g) < 0.5
    b = torch.rand(2**20, generator=g) < 0.5
    return statistics.median(time_call(lambda: a & b, 21))


def counting_inductor(calls: list):
    """The default inductor backend, recording one entry per FX graph dynamo hands it."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return compile_fx(gm, example_inputs)

    return backend


def floor_fn(logp, valid):
    return masked_mean(namespace(logp), logp, valid)


def initial_state(backend: str):
    if backend == "numpy":
        return np.asarray(EntropyBonus().coef, dtype=np.float32)
    import torch

    return torch.tensor(EntropyBonus().coef, dtype=torch.float32)


# -------------------------------------------------------------------------------------------- main






def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2**20, help="tokens B*T (default 2**20 = 1048576)")
    ap.add_argument("--batch", type=int, default=1024, help="sequences B; T = tokens // B (default 1024)")
    ap.add_argument("--repeat", type=int, default=7, help="timed repetitions after one warm-up (default 7)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY to set before importing torch if unset; 'inherit' = leave it (default PASSIVE)",
    )
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write results as JSON")
    ap.add_argument("--seed", type=int, default=SEED, help=f"generator seed (default {SEED})")
    args = ap.parse_args(argv)
    if min(args.tokens, args.batch, args.repeat, args.threads) < 1 or args.tokens < args.batch:
        ap.error("--tokens, --batch, --repeat and --threads must be >= 1, and --tokens >= --batch")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.omp_wait_policy.lower() != "inherit" and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    import torch
    import torch._inductor.config

    torch.set_num_threads(args.threads)
    torch._inductor.config.compile_threads = 1
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    t_start = time.perf_counter()
    B, T = args.batch, args.tokens // args.batch
    modes = [m for m in MODES if not (m == "compile" and args.no_compile)]

    info = machine_info()
    info.update({"torch": torch.__version__, "torch_threads": torch.get_num_threads()})
    info["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    info["probe_and_1M_ms"] = round(1e3 * parallel_probe(torch), 3)
    print("# rules benchmark")
    for key, value in info.items():
        print(f"  {key}: {value}")
    print(
        f"  batch: ({B}, {T}) = {B * T} tokens float32, repeat={args.repeat} (+1 warm-up), seed={args.seed}"
    )
    sys.stdout.flush()

    host = make_inputs(B, T, args.seed)
    data = {"numpy": to_backend(host, "numpy"), "torch": to_backend(host, "torch")}
    print(f"  valid tokens: {int(host['valid'].sum())} ({host['valid'].mean():.2f} of the batch)\n")

    # Floors (again at the end, as a drift check).
    floors: dict[str, dict] = {}
    print("## floor: one masked mean over the batch")
    for mode in modes:
        d = data["numpy" if mode == "numpy" else "torch"]
        fn = floor_fn
        if mode == "compile":
            torch._dynamo.reset()
            fn = torch.compile(floor_fn)
        floors[mode] = summary(time_call(lambda fn=fn, d=d: fn(d["logp"], d["valid"]), max(args.repeat, 10)))
        print(f"  floor {mode:<8} median {floors[mode]['median_s']:.3g} s", flush=True)

    results: dict[str, dict[str, dict]] = {}
    failures: dict[str, str] = {}
    print("\n## rules")
    for label, rule, stateful in CASES:
        for mode in modes:
            backend = "numpy" if mode == "numpy" else "torch"
            d = data[backend]
            state = initial_state(backend) if stateful else None
            fn = make_fn(rule)
            rec: dict = {}
            if mode == "compile":
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                backend_calls = []
                compiled = torch.compile(fn, backend=counting_inductor(backend_calls))
                t0 = time.perf_counter()
                try:
                    compiled(**d, state=state)
                except Exception as exc:  # report, don't hide
                    failures[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    traceback.print_exc(limit=3)
                    print(f"  {label:<34} compile  FAILED: {failures[label]}", flush=True)
                    continue
                rec["compile_s"] = time.perf_counter() - t0
                rec["graphs"] = len(backend_calls)
                rec["graph_breaks"] = int(sum(torch._dynamo.utils.counters["graph_break"].values()))
                fn = compiled
            call = lambda fn=fn, d=d, s=state: fn(**d, state=s)  # noqa: E731
            rec.update(summary(time_call(call, args.repeat, warm=mode != "compile")))
            rec["ratio_to_floor"] = rec["median_s"] / floors[mode]["median_s"]
            results.setdefault(label, {})[mode] = rec
            extra = ""
            if mode == "compile":
                extra = f"  (compile {rec['compile_s']:.1f} s, {rec['graphs']} graphs, "
                extra += f"{rec['graph_breaks']} graph breaks)"
            print(
                f"  {label:<34} {mode:<8} median {rec['median_s']:9.4g} s  "
                f"{rec['ratio_to_floor']:7.1f}x floor{extra}",
                flush=True,
            )

    print("\n## floor again (drift check)")
    floors_end = {}
    for mode in modes:
        d = data["numpy" if mode == "numpy" else "torch"]
        fn = floor_fn if mode != "compile" else torch.compile(floor_fn)
        floors_end[mode] = statistics.median(time_call(lambda fn=fn, d=d: fn(d["logp"], d["valid"]), 10))
        print(f"  floor {mode:<8} median {floors_end[mode]:.3g} s (start {floors[mode]['median_s']:.3g} s)")

    total = time.perf_counter() - t_start
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    # ------------------------------------------------------------------------------------- table
    print(
        "\n## Results (median of repeats; ×floor = median / median floor of the same column: one masked mean "
        "in numpy, torch eager, or torch.compile)\n"
    )
    heads = ["numpy s", "numpy ×floor", "torch s", "torch ×floor"]
    if "compile" in modes:
        heads += ["compiled s", "compiled ×floor", "compile time s", "graphs / breaks"]
    print("| rule | " + " | ".join(heads) + " |")
    print("|---|" + "---:|" * len(heads))

    def cells(per_mode: dict[str, dict], label: str) -> list[str]:
        out = []
        for mode in modes:
            rec = per_mode.get(mode)
            out += [fmt_s(rec["median_s"]) if rec else "—", fmt_r(rec["ratio_to_floor"]) if rec else "—"]
            if mode == "compile":
                if rec and "compile_s" in rec:
                    out += [f"{rec['compile_s']:.1f}", f"{rec['graphs']} / {rec['graph_breaks']}"]
                else:
                    out += ["FAILED" if label in failures else "—", "—"]
        return out

    floor_row = {m: {"median_s": floors[m]["median_s"], "ratio_to_floor": 1.0} for m in modes}
    print("| **floor: masked mean** | " + " | ".join(cells(floor_row, "floor")) + " |")
    for label, _, _ in CASES:
        print(f"| {label} | " + " | ".join(cells(results.get(label, {}), label)) + " |")
    if failures:
        print("\ntorch.compile failures:")
        for label, msg in failures.items():
            print(f"  {label}: {msg}")
    print(f"\ntotal wall time {total:.0f} s")
    print(f"load average (1, 5, 15 min): start {info['loadavg_start']}, end {info['loadavg_end']}")

    if args.json is not None:
        payload = {
            "machine": info,
            "config": {
                "batch": B,
                "length": T,
                "tokens": B * T,
                "repeat": args.repeat,
                "threads": args.threads,
                "seed": args.seed,
                "modes": modes,
                "argv": sys.argv,
            },
            "floor": {m: {**floors[m], "end_median_s": floors_end[m]} for m in modes},
            "rules": results,
            "compile_failures": failures,
            "total_s": total,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
