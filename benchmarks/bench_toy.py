"""Toy GRPO throughput: the vectorised simulator (:mod:`toy.grpo`) against a straightforward per-run loop.

Target (issue #4): 1,000 runs x 1,000 steps of GRPO on a K = 1,000-armed bandit with G = 8 samples per
step in at most 30 s on 2 cores. The script measures, in one process and one run:

* ``vectorised``: :func:`toy.grpo.step` on all ``R`` runs at once, theory diagnostics off (they are an
  opt-in, measured separately as ``vectorised + diagnostics``), for float64 and float32 parameters, with
  the default kernels (``GRPOConfig.kernels="auto"``: numba's :mod:`toy.fused` when installed) and with
  the NumPy kernels (``kernels="numpy"``); ``--steps`` steps are timed in full (default 1,000: the
  target's exact workload);
* ``NumPy floor``: only the NumPy passes over the logits that every softmax GRPO step makes (max, exp,
  sum, one dense ``z += c e``), for float32 and float64: the speed-up no step built from NumPy calls can
  exceed on this machine (the compiled kernels make one trip through a row per pass and can beat it);
* ``per-run loop``: the same algorithm written the obvious way — a Python loop over runs, each with its
  own generator, ``softmax``, ``Generator.choice`` sampling, group advantages and a NumPy logit update —
  timed on ``--loop-steps`` steps (default 20) of all ``R`` runs and extrapolated linearly to ``--steps``
  (every step costs the same: fixed shapes, no data-dependent work).

The speed-up is the ratio of the per-step times from the same run. Usage::

    .venv/bin/python benchmarks/bench_toy.py                  # R=1000, K=1000, G=8, 1000 steps
    .venv/bin/python benchmarks/bench_toy.py --steps 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks._common import cpu_model  # noqa: E402
from toy.bandit import Bandit  # noqa: E402
from toy.grpo import GRPOConfig, init_state, step  # noqa: E402
from toy.kernels import resolve_backend  # noqa: E402


def per_run_loop(bandit: Bandit, lr: float, G: int, runs: int, steps: int, seed: int) -> float:
    """The straightforward implementation: one run at a time. Returns seconds for ``steps`` steps."""
    K = bandit.vocab
    correct = bandit.correct_table()[0, 0]  # (K,)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(runs)]
    logits = [np.zeros(K) for _ in range(runs)]
    t0 = time.perf_counter()
    for _ in range(steps):
        for r in range(runs):
            z = logits[r]
            p = np.exp(z - z.max())
            p /= p.sum()
            arms = rngs[r].choice(K, size=G, p=p)
            rew = correct[arms].astype(np.float64)
            adv = (rew - rew.mean()) / (rew.std(ddof=1) + 1e-6)
            grad = -adv.sum() * p
            np.add.at(grad, arms, adv)
            logits[r] = z + lr * grad / G  # token mean over G one-token responses
    return time.perf_counter() - t0


def dense_floor(runs: int, K: int, dtype: str, steps: int) -> float:
    """The passes over the ``(R, K)`` logits that any GRPO step on a softmax makes, and nothing else:
    ``max``, ``z - max``, ``exp``, ``sum`` (the normaliser) and a dense ``z += c * e`` (the gradient's
    ``-sum(coef) p`` term). No sampling, no scoring. Returns seconds for ``steps`` steps."""
    z = np.random.default_rng(0).standard_normal((runs, K)).astype(dtype)
    s, e, g = np.empty_like(z), np.empty_like(z), np.empty_like(z)
    c = np.full((runs, 1), 1e-6, dtype=dtype)
    t0 = time.perf_counter()
    for _ in range(steps):
        np.subtract(z, z.max(axis=-1, keepdims=True), out=s)
        np.exp(s, out=e)
        e.sum(axis=-1)
        np.multiply(e, c, out=g)
        z += g
    return time.perf_counter() - t0


def vectorised(bandit: Bandit, cfg: GRPOConfig, runs: int, steps: int, seed: int, diagnostics: bool) -> float:
    state = init_state(bandit, cfg, runs=runs, seed=seed)
    table = bandit.correct_table()
    step(bandit, cfg, state, table=table, diagnostics=diagnostics)  # warm-up (allocations, compilation)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(bandit, cfg, state, table=table, diagnostics=diagnostics)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--arms", type=int, default=1000)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--loop-steps", type=int, default=20)
    ap.add_argument("--diag-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    b = Bandit(vocab=args.arms, n_correct=max(1, args.arms // 100))
    lr = 0.5
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"NumPy {np.__version__}")
    print(f"workload: R={args.runs} runs x K={args.arms} arms x G={args.group}, SGD lr={lr}, token mean")
    print(f"kernels: auto = {resolve_backend('auto')}")
    rows = []
    for kernels in ("auto", "numpy"):
        for dtype in ("float32", "float64"):
            cfg = GRPOConfig(group_size=args.group, lr=lr, dtype=dtype, kernels=kernels)
            name = f"vectorised {dtype}" + (", NumPy kernels" if kernels == "numpy" else "")
            t = vectorised(b, cfg, args.runs, args.steps, args.seed, diagnostics=False)
            rows.append((name, args.steps, t / args.steps))
            print(f"  {name}: {t:.2f} s for {args.steps} steps ({1e3 * t / args.steps:.2f} ms/step)",
                  flush=True)
    for dtype in ("float32", "float64"):
        t = dense_floor(args.runs, args.arms, dtype, args.steps)
        rows.append((f"NumPy floor: softmax + dense update only, {dtype}", args.steps, t / args.steps))
        print(f"  floor {dtype}: {1e3 * t / args.steps:.2f} ms/step", flush=True)
    cfg = GRPOConfig(group_size=args.group, lr=lr)
    t = vectorised(b, cfg, args.runs, args.diag_steps, args.seed, diagnostics=True)
    rows.append(("vectorised float64 + diagnostics", args.diag_steps, t / args.diag_steps))
    print(f"  vectorised float64 + diagnostics: {1e3 * t / args.diag_steps:.2f} ms/step", flush=True)
    t = per_run_loop(b, lr, args.group, args.runs, args.loop_steps, args.seed)
    rows.append(("per-run Python loop (float64)", args.loop_steps, t / args.loop_steps))
    print(f"  per-run loop: {1e3 * t / args.loop_steps:.2f} ms/step", flush=True)

    loop = rows[-1][2]
    print(f"\n| implementation | steps timed | ms / step | time for {args.steps} steps (s) | "
          f"speed-up vs loop |")
    print("|---|---|---|---|---|")
    for name, n, per in rows:
        print(f"| {name} | {n} | {1e3 * per:.2f} | {per * args.steps:.1f} | {loop / per:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "rows": [dict(name=n, steps=s, s_per_step=p) for n, s, p in rows]},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
