"""``entdyn``: the project's command-line interface.

Usage::

    entdyn demo [--out runs/demo] [--seed 0] [--n 4000] [--quick]
    python -m scale.cli demo ...

Subcommands:

``demo``
    Theory vs exact simulation on single softmax states (a one-step softmax bandit): checks the
    first-order GRPO entropy change of arXiv 2602.03392 (Theorem 3.3) against the exact change, per
    quadrant, and the residual scaling; writes ``summary.json`` and ``theory_demo.png`` (see
    :mod:`toy.demo`). This is what ``make demo`` runs.

The CLI will grow with later work: ``toy`` (the NumPy bandit lab), ``train`` (the torch GRPO trainer),
``plot`` (figures from run directories) and ``rules`` (entropy-control rules such as Clip_B / Clip_V).

Each subcommand imports its implementation lazily inside its handler, so ``import scale.cli`` stays
light and never imports torch; only subcommands that need torch (``train``) will import it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from toy.demo import main as demo_main  # lazy: NumPy + matplotlib only

    return demo_main(args.out, seed=args.seed, n=args.n, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    """The ``entdyn`` argument parser (one sub-parser per subcommand)."""
    parser = argparse.ArgumentParser(
        prog="entdyn",
        description="Entropy dynamics in RL fine-tuning of LLMs (arXiv 2602.03392): theory checks and tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="theory vs exact entropy change on random softmax states (writes summary.json + figure)",
        description=(
            "One-step softmax bandit: sample random states and on-policy tokens, apply one GRPO logit "
            "update, and compare the first/second-order entropy change with the exact one."
        ),
    )
    demo.add_argument(
        "--out", default="runs/demo", metavar="DIR", help="output directory (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument(
        "--n",
        type=int,
        default=None,
        metavar="N",
        help="number of sampled states (default: 4000, or 500 with --quick)",
    )
    demo.add_argument("--quick", action="store_true", help="small, fast run (a couple of seconds)")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``entdyn`` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "n", None) is not None and args.n < 1:
        parser.error("--n must be a positive integer")
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
