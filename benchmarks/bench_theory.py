"""Time the ``theory`` functions on a large logits array, for NumPy and torch (CPU), beside a floor.

The *floor* of a backend is the measured time of one read of the logits array in that backend's own
namespace (``np.sum(x)`` / ``torch.sum(x)``). Every function is reported as seconds and as a ratio to
that floor, all measured in the same run: performance targets are ratios from one run, never absolute
times and never timed unit tests.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_theory.py                  # full size: (4096, 49152) float32
    .venv/bin/python benchmarks/bench_theory.py --rows 256 --vocab 4096 --repeat 2 --json out.json
    make bench                                                   # runs the first line

Inputs (all from one seeded ``numpy.random.Generator``; torch gets ``torch.from_numpy`` of the same
data, so both backends see identical bytes):

* ``logits``: ``(rows, vocab)`` float32, ``3 * normal``;
* ``k``: ``(rows,)`` int64, a random index per row;
* ``dz``: ``(rows, vocab)`` float32, ``1e-3 * normal``;
* ``eps`` / ``alpha``: the scalar ``0.01``;
* ``s_star``: ``(rows,)`` float32 ``logp`` and ``entropy`` (no vocabulary axis: small section);
* ``grpo_advantages``: ``(512, 8)`` float32 rewards (small section);
* ``entropy_hessian``: ``(64, 512)`` float32 logits only; its output is ``(64, 512, 512)`` (V^2 memory).

Each function is warmed up once on the first ``--warmup-rows`` rows (default 64: the same code path,
dtypes, vocabulary and thread pool, without a fourth full-size call; ``--warmup-rows 0`` warms up on the
full array), then timed ``--repeat`` times with ``time.perf_counter``; the median (and the minimum) is
reported, with the minor page faults of each call (``getrusage``): a freshly allocated full-size
temporary shows up there, e.g. 196 609 faults per ``(4096, 49152)`` float32 array for torch's 4 KiB
pages. Outputs and temporaries are dropped and ``gc.collect()`` runs between calls, so at most one
function's working set is alive at a time (peak RSS about 10 GiB at full size). The floor is measured
first and again at the end as a drift check. The load average at start and end is recorded, since
other work on the machine shows up in every number.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import cpu_model, fmt_r, fmt_s  # benchmarks/_common.py (script dir on sys.path)

import theory  # noqa: E402

SEED = 20260222
LOGIT_SCALE = 3.0
DZ_SCALE = 1e-3
STEP = 0.01  # eps / alpha
HESSIAN_SHAPE = (64, 512)
REWARD_SHAPE = (512, 8)

# (name, argument kinds). "z" logits, "k" index per row, "dz" logit update, "eps" scalar step.
LARGE: list[tuple[str, tuple[str, ...]]] = [
    ("entropy", ("z",)),
    ("softmax", ("z",)),
    ("log_softmax", ("z",)),
    ("discriminator", ("z",)),
    ("vocab_baseline", ("z",)),
    ("deviation", ("z", "k")),
    ("sign_threshold", ("z",)),
    ("entropy_change_first_order", ("z", "dz")),
    ("entropy_change_single_logit", ("z", "k", "eps")),
    ("entropy_change_grpo", ("z", "k", "eps")),
    ("grpo_logit_update", ("z", "k", "eps")),
    ("entropy_change_second_order", ("z", "dz")),
    ("exact_entropy_change", ("z", "dz")),
]


# ----------------------------------------------------------------------------------------- machine




def read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def machine_info(backends: list[str]) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": None,
        "numpy": np.__version__,
        "transparent_hugepage": read_text("/sys/kernel/mm/transparent_hugepage/enabled"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],  # other work on the machine
    }
    meminfo = read_text("/proc/meminfo")
    if meminfo:
        for line in meminfo.splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    for var in (
        "OPENBLAS_CORETYPE",
        "OPENBLAS_NUM_THREADS",
        "OMP_NUM_THREADS",
        "OMP_WAIT_POLICY",
        "MKL_NUM_THREADS",
    ):
        if var in os.environ:
            info[var] = os.environ[var]
    if "torch" in backends:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    return info


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------------------ timing


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_call(
    fn: Callable[[], object], repeat: int, warm: Callable[[], object] | None = None
) -> tuple[list[float], list[int]]:
    """Warm up once (``warm``, default ``fn``), then time ``fn`` ``repeat`` times.

    Returns the wall times and the minor page faults of each timed call (a fresh, first-touched
    allocation shows up there). The output is dropped and ``gc.collect()`` runs after every call.
    """
    out = (warm or fn)()
    del out
    gc.collect()
    times, faults = [], []
    for _ in range(repeat):
        f0 = minor_faults()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        faults.append(minor_faults() - f0)
        del out
        gc.collect()
    return times, faults


def summary(times: list[float], faults: list[int] | None = None) -> dict:
    s = {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}
    if faults is not None:
        s["minor_faults_median"] = int(statistics.median(faults))
    return s


# ------------------------------------------------------------------------------------------ inputs


def make_inputs(rows: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, vocab), dtype=np.float32)
    z *= LOGIT_SCALE
    dz = rng.standard_normal((rows, vocab), dtype=np.float32)
    dz *= DZ_SCALE
    k = rng.integers(0, vocab, size=rows, dtype=np.int64)
    return {"z": z, "dz": dz, "k": k}


def make_small_inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return {
        "logp": (-rng.exponential(3.0, size=rows)).astype(np.float32),
        "entropy": rng.uniform(0.0, 5.0, size=rows).astype(np.float32),
        "rewards": rng.integers(0, 2, size=REWARD_SHAPE).astype(np.float32),
        "hessian_z": (LOGIT_SCALE * rng.standard_normal(HESSIAN_SHAPE)).astype(np.float32),
    }


def convert(arrays: dict[str, np.ndarray], backend: str) -> dict:
    if backend == "numpy":
        return dict(arrays)
    import torch

    return {name: torch.from_numpy(a) for name, a in arrays.items()}  # shares memory, no copy


def floor_fn(backend: str, z) -> Callable[[], object]:
    if backend == "numpy":
        return lambda: np.sum(z)
    import torch

    return lambda: torch.sum(z)


def write_ref_fn(backend: str, z) -> Callable[[], object]:
    """One read plus one write of a freshly allocated array of the same size (``exp(x)``)."""
    if backend == "numpy":
        return lambda: np.exp(z)
    import torch

    return lambda: torch.exp(z)


# -------------------------------------------------------------------------------------------- main






def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096, help="rows of the logits array (default 4096)")
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary size (default 49152)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions after one warm-up (default 3)")
    ap.add_argument("--backends", default="numpy,torch", help="comma-separated: numpy,torch (default both)")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write results as JSON")
    ap.add_argument("--seed", type=int, default=SEED, help=f"generator seed (default {SEED})")
    ap.add_argument(
        "--warmup-rows",
        type=int,
        default=64,
        metavar="N",
        help="warm each function up on the first N rows (same code path, dtype and vocabulary); "
        "0 = warm up on the full array, which costs one more full call per function (default 64)",
    )
    args = ap.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in args.backends if b not in ("numpy", "torch")]
    if bad or not args.backends:
        ap.error(f"--backends must be a comma-separated subset of numpy,torch; got {bad or 'nothing'}")
    if args.repeat < 1 or args.rows < 1 or args.vocab < 1 or args.warmup_rows < 0:
        ap.error("--rows, --vocab and --repeat must be >= 1, --warmup-rows >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends: list[str] = args.backends
    t_start = time.perf_counter()

    info = machine_info(backends)
    print("# theory benchmark")
    for key, value in info.items():
        print(f"  {key}: {value}")
    nbytes = args.rows * args.vocab * 4
    warm_rows = args.warmup_rows if 0 < args.warmup_rows < args.rows else args.rows
    print(
        f"  logits: ({args.rows}, {args.vocab}) float32 = {nbytes / 2**20:.0f} MiB; "
        f"repeat={args.repeat} after 1 warm-up on {warm_rows} rows; seed={args.seed}"
    )
    sys.stdout.flush()

    host = make_inputs(args.rows, args.vocab, args.seed)
    small_host = make_small_inputs(args.rows, args.seed)
    data = {b: convert(host, b) for b in backends}
    warm = {b: convert({n: a[:warm_rows] for n, a in host.items()}, b) for b in backends}  # views
    small = {b: convert(small_host, b) for b in backends}
    print(f"  inputs ready, peak RSS so far {peak_rss_gib():.2f} GiB\n")

    results: dict[str, dict[str, dict]] = {}  # name -> backend -> summary

    def record(name: str, backend: str, timed: tuple[list[float], list[int]], floor: float) -> None:
        s = summary(*timed)
        s["ratio_to_floor"] = s["median_s"] / floor
        results.setdefault(name, {})[backend] = s
        print(
            f"  {name:<30} {backend:<6} median {s['median_s']:8.4f} s  min {s['min_s']:8.4f} s"
            f"  {s['ratio_to_floor']:7.1f}x floor  {s['minor_faults_median']:>8} faults/call"
            f"  (peak RSS {peak_rss_gib():.2f} GiB)",
            flush=True,
        )

    # Floors first (and again at the end, as a drift check).
    floor_times: dict[str, list[float]] = {}
    print("## floor: one read of the logits array")
    for b in backends:
        floor_times[b], _ = time_call(floor_fn(b, data[b]["z"]), max(args.repeat, 5))
        print(f"  floor {b:<6} median {statistics.median(floor_times[b]):.4f} s", flush=True)
    floor = {b: statistics.median(floor_times[b]) for b in backends}

    print("\n## functions on the full array")
    for b in backends:
        ref = write_ref_fn(b, data[b]["z"])
        record(
            "ref: exp(x) (read + new write)",
            b,
            time_call(ref, args.repeat, write_ref_fn(b, warm[b]["z"])),
            floor[b],
        )
    for name, kinds in LARGE:
        fn = getattr(theory, name)
        for b in backends:
            call_args = [STEP if kind == "eps" else data[b][kind] for kind in kinds]
            warm_args = [STEP if kind == "eps" else warm[b][kind] for kind in kinds]
            timed = time_call(
                lambda fn=fn, a=call_args: fn(*a), args.repeat, lambda fn=fn, a=warm_args: fn(*a)
            )
            record(name, b, timed, floor[b])
            del call_args, warm_args, timed
            gc.collect()

    print("\n## floor again (drift check)")
    floor_end: dict[str, float] = {}
    for b in backends:
        t, _ = time_call(floor_fn(b, data[b]["z"]), max(args.repeat, 5))
        floor_end[b] = statistics.median(t)
        print(f"  floor {b:<6} median {floor_end[b]:.4f} s (start {floor[b]:.4f} s)", flush=True)

    # Free the big arrays before the small section.
    del data, warm
    host.clear()
    gc.collect()

    print("\n## small inputs (times only, no floor; warm-up and timing on the same small input)")
    small_results: dict[str, dict[str, dict]] = {}
    small_cases = [
        ("s_star", f"logp, entropy ({args.rows},)", lambda s: theory.s_star(s["logp"], s["entropy"])),
        ("grpo_advantages", f"rewards {REWARD_SHAPE}", lambda s: theory.grpo_advantages(s["rewards"])),
        (
            "entropy_hessian",
            f"logits {HESSIAN_SHAPE} -> ({HESSIAN_SHAPE[0]}, {HESSIAN_SHAPE[1]}, {HESSIAN_SHAPE[1]})",
            lambda s: theory.entropy_hessian(s["hessian_z"]),
        ),
    ]
    for name, shape, call in small_cases:
        for b in backends:
            t, _ = time_call(lambda call=call, s=small[b]: call(s), max(args.repeat, 10))
            small_results.setdefault(name, {"shape": shape})[b] = summary(t)
            print(f"  {name:<30} {b:<6} median {statistics.median(t):10.6f} s  [{shape}]", flush=True)

    total = time.perf_counter() - t_start
    peak = peak_rss_gib()

    # ---------------------------------------------------------------------------------- tables
    print("\n## Results (median of repeats; ×floor = median / median floor of the same backend)\n")
    cols = []
    for b in ("numpy", "torch"):
        cols += [f"{b} s", f"{b} ×floor"]
    print("| function | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))

    def row_cells(per_backend: dict[str, dict]) -> list[str]:
        cells = []
        for b in ("numpy", "torch"):
            s = per_backend.get(b)
            cells += [fmt_s(s["median_s"]) if s else "—", fmt_r(s["ratio_to_floor"]) if s else "—"]
        return cells

    floor_row = {b: {"median_s": floor[b], "ratio_to_floor": 1.0} for b in backends}
    print("| **floor: sum(x)** | " + " | ".join(row_cells(floor_row)) + " |")
    for name, per_backend in results.items():
        print(f"| {name} | " + " | ".join(row_cells(per_backend)) + " |")

    print("\n| function | numpy min s | numpy faults/call | torch min s | torch faults/call |")
    print("|---|---:|---:|---:|---:|")
    for name, per_backend in results.items():
        cells = []
        for b in ("numpy", "torch"):
            s = per_backend.get(b)
            cells += [fmt_s(s["min_s"]), str(s["minor_faults_median"])] if s else ["—", "—"]
        print(f"| {name} | " + " | ".join(cells) + " |")

    print("\n| small-input function | shape | numpy s | torch s |")
    print("|---|---|---:|---:|")
    for name, per_backend in small_results.items():
        cells = [fmt_s(per_backend[b]["median_s"]) if b in per_backend else "—" for b in ("numpy", "torch")]
        print(f"| {name} | {per_backend['shape']} | " + " | ".join(cells) + " |")

    load_end = [round(x, 2) for x in os.getloadavg()]
    print(f"\npeak RSS {peak:.2f} GiB, total wall time {total:.0f} s, load average at end {load_end}")

    if args.json is not None:
        payload = {
            "machine": info,
            "config": {
                "rows": args.rows,
                "vocab": args.vocab,
                "repeat": args.repeat,
                "warmup_rows": warm_rows,
                "backends": backends,
                "seed": args.seed,
                "logit_scale": LOGIT_SCALE,
                "dz_scale": DZ_SCALE,
                "step": STEP,
                "argv": sys.argv,
            },
            "floor": {
                b: {"median_s": floor[b], "times_s": floor_times[b], "end_median_s": floor_end[b]}
                for b in backends
            },
            "large": results,
            "small": small_results,
            "peak_rss_gib": peak,
            "total_s": total,
            "loadavg_at_end": load_end,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
