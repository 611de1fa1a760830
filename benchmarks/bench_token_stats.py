"""The trainer's per-row token statistics: ``scale.token_stats.logit_stats`` beside the unfused chain.

``logit_stats(z, k, s_star=True, baseline=True)`` is what the sampler computes at every decode step (and the
chunked training forward per chunk): ``log p_k``, ``H``, ``S*`` and ``E_p[S]`` of each row of float32 logits.
It calls :func:`theory.row_statistics` (one pass per row block). The unfused chain here is the textbook
formulation built from the same library's full-array functions: ``theory.log_softmax`` (a ``(n, V)``
array), the target's log-prob, ``theory.entropy_from_logp``, ``theory.s_star``, then ``E_p[S]`` from a
second softmax of the whole array (``sum p^2 (H + log p)``) — what ``logit_stats`` did before issue 18.
Both run in one process, alternated, no grad, torch CPU with ``--threads`` threads; the table gives the
median of ``--repeat`` calls and the ratio fused / unfused. The results are checked equal (float32
tolerance) before timing.

Usage::

    .venv/bin/python benchmarks/bench_token_stats.py            # --rows 32,256 --vocab 49152 --repeat 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_model  # noqa: E402


def unfused(theory, torch, z, k):
    """``(log p_k, H, S*, E_p[S])`` through full ``(n, V)`` arrays."""
    logp = theory.log_softmax(z)  # (n, V)
    lp = logp.gather(-1, k[:, None])[:, 0]
    H = theory.entropy_from_logp(logp)
    S = theory.s_star(lp, H)
    p = logp.exp()
    lpf = torch.where(logp == -torch.inf, 0.0, logp)
    base = (p * p * (H[:, None] + lpf)).sum(-1)
    return lp, H, S, base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="32,256", help="comma-separated row counts (default 32,256)")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    import theory
    from scale.token_stats import logit_stats

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"# bench_token_stats: CPU {cpu_model()}, torch {torch.__version__}, {args.threads} threads, "
          f"V = {args.vocab}, float32, median of {args.repeat}")
    print("\n| rows | unfused ms | logit_stats ms | fused / unfused |\n|---:|---:|---:|---:|")
    for n in (int(r) for r in args.rows.split(",")):
        z = 3.0 * torch.randn(n, args.vocab, generator=gen)
        k = torch.randint(0, args.vocab, (n,), generator=gen)
        with torch.no_grad():
            fused = lambda z=z, k=k: logit_stats(z, k, s_star=True, baseline=True)  # noqa: E731
            plain = lambda z=z, k=k: unfused(theory, torch, z, k)  # noqa: E731
            for a, b in zip(fused(), plain(), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
            times: dict[str, list[float]] = {"fused": [], "plain": []}
            for _ in range(args.repeat):
                for name, fn in (("fused", fused), ("plain", plain)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        f, p = statistics.median(times["fused"]), statistics.median(times["plain"])
        print(f"| {n} | {1e3 * p:.2f} | {1e3 * f:.2f} | {f / p:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
