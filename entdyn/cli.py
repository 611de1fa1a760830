"""``entdyn``: the project's command-line interface.

Usage::

    entdyn demo [--out runs/demo] [--seed 0] [--n 4000] [--quick]
    entdyn rules [NAME ...] [--json]
    entdyn toy NAME [NAME ...] [--out DIR] [--quick] [--seed S] [--runs R] [--steps N]
    entdyn plot RUN_DIR [--out DIR]
    entdyn train [--model tiny] [--task SPEC] [--rule SPEC] [--steps N] [--out DIR] [--resume DIR] ...
    entdyn export RUN_DIR OUT [--step N] [--overwrite]
    entdyn llm NAME [NAME ...] [--model smollm2-135m] [--quick] [--out DIR] [--seeds S] [--steps N] ...
    python -m entdyn demo ...

Subcommands:

``demo``
    Theory vs exact simulation on single softmax states (a one-step softmax bandit): checks the
    first-order GRPO entropy change of arXiv 2602.03392 (Theorem 3.3) against the exact change, per
    quadrant, and the residual scaling; writes ``summary.json`` and ``theory_demo.png`` (see
    :mod:`toy.demo`). This is what ``make demo`` runs.

``rules``
    Lists every registered entropy-control rule of :mod:`theory.rules` (Clip_B, Clip_V, Clip-Cov, KL-Cov,
    the high-entropy mask, the entropy bonus, PPL / position shaping, probability weighting, and the
    stage detector) with its kind, default parameters and source; ``--json`` prints
    :func:`theory.rules.describe_rules` as JSON. The names and ``key=value`` parameters shown are what
    :func:`theory.rules.make_rule` spec strings take; ``docs/rules.md`` has the formulas.

``toy``
    Named softmax-bandit experiments (:mod:`toy.experiments`): ``first-order``, ``quadrants``,
    ``collapse``, ``rules``, ``stages``, ``shaping``, ``coupling``; ``all`` runs every one and ``list``
    lists them. Each writes ``summary.json``, ``curves.json``, PNG figures and ``table.md``.

``train``
    GRPO fine-tuning of a causal LM (``tiny``, ``smollm2-135m`` or a local Hugging Face directory) on a
    verifiable task with a :mod:`theory.rules` rule, logging the entropy dynamics: measured vs predicted
    entropy change per update, quadrant shares, samples with per-token entropy and ``S*``; checkpoints
    and exact ``--resume``. ``entdyn train --help`` lists every flag (one per field of
    :mod:`scale.config`, :mod:`scale.flags`); the same as ``python -m scale.train``. Running it imports
    torch (only this subcommand and ``export`` do; their ``--help`` does not).

``export``
    A Hugging Face model directory from a ``train`` run (:mod:`scale.export`): ``config.json``,
    ``generation_config.json``, ``model.safetensors`` and the tokenizer's files of the newest intact
    checkpoint (a damaged one is skipped with a message) or of ``--step N``, without the optimizer state;
    ``AutoModelForCausalLM.from_pretrained(OUT)`` loads it. A bad ``RUN_DIR``, ``OUT`` or step exits 2
    with one line. Like ``train``, running it imports torch.

``llm``
    Paper 1's checks on a real model through the trainer (:mod:`scale.llm`): ``quadrants``,
    ``first-order``, ``attribution``, ``rules``; ``all`` runs every one and ``list`` lists them. The
    same files as ``toy``; results on SmolLM2 in ``docs/llm.md``. Running it imports torch.

``plot``
    Figures from a run directory of ``train`` (:mod:`scale.plot`): reward, entropy by polarity, the
    measured vs predicted entropy change, the position profile, and ``tokens.html`` / ``tokens.png``
    with every sampled token coloured by its entropy and by its quadrant.

The CLI sits above the packages: it is the one place that imports both :mod:`toy` and :mod:`scale`
(``toy -> theory <- scale``, ``entdyn -> all three``). Each subcommand imports its implementation lazily
inside its handler, so ``import entdyn.cli`` stays light and never imports torch; only running ``train`` or
``export`` does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from theory._name_guard import foreign_scale

__all__ = ["build_parser", "format_rules", "main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from toy.demo import main as demo_main  # lazy: NumPy + matplotlib only

    return demo_main(args.out, seed=args.seed, n=args.n, quick=args.quick)


def _list(experiments: dict) -> int:
    """Print each experiment's name and the first line of its docstring (``entdyn toy|llm list``)."""
    for name, fn in experiments.items():
        print(f"{name:12s} {(fn.__doc__ or '').strip().splitlines()[0]}")
    return 0


def _cmd_toy(args: argparse.Namespace) -> int:
    from toy.experiments import EXPERIMENTS  # lazy: NumPy + matplotlib only
    from toy.experiments import main as toy_main

    if args.names == ["list"]:
        return _list(EXPERIMENTS)
    try:
        return toy_main(args.names, args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress,
                        runs=args.runs, steps=args.steps)
    except ValueError as err:
        print(f"entdyn toy: {err}", file=sys.stderr)
        return 2


def _cmd_train(args: argparse.Namespace) -> int:
    from scale.flags import resolve
    from scale.train import run_cli  # lazy: imports torch and transformers

    overrides = {k: v for k, v in vars(args).items() if k == "config" or "." in k}  # the flags typed
    return run_cli(lambda: resolve(overrides))


def _cmd_llm(args: argparse.Namespace) -> int:
    from scale.llm import EXPERIMENTS, Options  # light: torch is imported when an experiment runs
    from scale.llm import main as llm_main

    if args.names == ["list"]:
        return _list(EXPERIMENTS)
    opts = Options(model=args.model, quick=args.quick, seeds=args.seeds, steps=args.steps, lr=args.lr,
                   device=args.device, threads=args.threads, seed=args.seed, progress=not args.no_progress,
                   reward=args.reward, **({"task": args.task} if args.task else {}))  # fmt: skip
    several = len(args.names) > 1 or args.names == ["all"]
    out = args.out or ("runs/llm" if several else f"runs/llm/{args.names[0]}")
    try:
        return llm_main(args.names, out, opts)
    except ValueError as err:  # a bad name or size, or the trainer's ConfigError
        print(f"entdyn llm: error: {err}", file=sys.stderr)
        return 2


def _cmd_export(args: argparse.Namespace) -> int:
    from scale.export import ExportError, export  # lazy: imports torch (and transformers for old checkpoints)

    def say(message: str) -> None:
        print(f"entdyn export: {message}", file=sys.stderr, flush=True)

    try:
        out, src = export(args.run_dir, args.out, step=args.step, overwrite=args.overwrite, report=say)
    except ExportError as err:
        say(str(err))
        return 2
    print(f"exported {src} to {out} (load it with AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def _format_default(value) -> str:
    """A default as a spec-string value would write it: ``None`` -> ``none``, tuples with ``/``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "/".join(_format_default(v) for v in value)
    return str(value)


def format_rules(records: list[dict], *, width: int = 100) -> str:
    """Human-readable listing of :func:`theory.rules.describe_rules` records (one block per rule)."""
    import textwrap

    lines = [
        f"{len(records)} rule(s) from theory.rules (kind 'token': a per-token rule; 'detector': a per-step",
        'stage detector). Build one with make_rule(), e.g. "clip_b:mu=2.0+position_bonus:gate=always".',
        "Formulas, outputs and differences from the reference code: docs/rules.md",
    ]
    for rec in records:
        lines += ["", f"{rec['name']}  [{rec['kind']}]  ({rec['class']})"]
        lines += textwrap.wrap(rec["summary"], width, initial_indent="  ", subsequent_indent="  ")
        lines += textwrap.wrap(
            rec["source"], width, initial_indent="  source: ", subsequent_indent="          "
        )
        defaults = rec["defaults"]
        if defaults:
            lines.append("  defaults:")
            pad = max(len(k) for k in defaults)
            lines += [f"    {k:<{pad}} = {_format_default(v)}" for k, v in defaults.items()]
    return "\n".join(lines)


def _cmd_plot(args: argparse.Namespace) -> int:
    from scale.plot import main as plot_main  # lazy: matplotlib only, never torch

    try:
        return plot_main(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"entdyn plot: {err}", file=sys.stderr)
        return 2


def _cmd_rules(args: argparse.Namespace) -> int:
    import json

    from theory.rules import describe_rules  # lazy; theory.rules itself never imports torch

    records = describe_rules()
    if args.names:
        known = {r["name"] for r in records}
        wanted = [n.replace("-", "_") for n in args.names]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            print(
                f"entdyn rules: unknown rule(s) {', '.join(unknown)}; registered: {', '.join(sorted(known))}",
                file=sys.stderr,
            )
            return 2
        records = [r for r in records if r["name"] in wanted]
    if args.json:
        print(json.dumps(records, indent=2, default=repr))
    else:
        print(format_rules(records))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``entdyn`` argument parser (one sub-parser per subcommand)."""
    from scale import flags  # torch-free: dataclasses and argparse (after main's check of the name)

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

    rules = sub.add_parser(
        "rules",
        help="list the registered entropy-control rules with their defaults and sources",
        description=(
            "List every rule registered in theory.rules (kind, class, default parameters, source). The "
            "names and parameters are those of make_rule spec strings such as "
            "'clip_b:mu=2.0+position_bonus:gate=always'; docs/rules.md gives the formulas."
        ),
    )
    rules.add_argument("names", nargs="*", metavar="NAME", help="only these rules (default: all)")
    rules.add_argument("--json", action="store_true", help="print describe_rules() as JSON")
    rules.set_defaults(handler=_cmd_rules)

    toy = sub.add_parser(
        "toy",
        help="named softmax-bandit experiments (first-order, quadrants, collapse, rules, stages, ...)",
        description=(
            "Run named toy experiments (NumPy, many seeds at once): first-order, quadrants, collapse, "
            "rules, stages, shaping, coupling; 'all' runs every one (into DIR/<name>), 'list' lists them. "
            "Each writes summary.json, curves.json, PNG figures and table.md into DIR."
        ),
    )
    toy.add_argument("names", nargs="+", metavar="NAME", help="experiment name(s), 'all' or 'list'")
    toy.add_argument("--out", default=None, metavar="DIR",
                     help="output directory (default: runs/toy/<name>, or runs/toy for several)")
    toy.add_argument("--quick", action="store_true",
                     help="small version (seconds; still meets the thresholds)")
    toy.add_argument("--seed", type=int, default=0, help="base seed (default: %(default)s)")
    toy.add_argument("--runs", type=_positive_int, default=None, help="seeds per configuration (override)")
    toy.add_argument("--steps", type=_positive_int, default=None, help="training steps (override)")
    toy.add_argument("--no-progress", action="store_true", help="no progress bar")
    toy.set_defaults(handler=_cmd_toy)

    train = sub.add_parser(
        "train",
        help="GRPO training with entropy-dynamics diagnostics (entdyn train --help for the flags)",
        description=flags.TRAIN_DESCRIPTION,
        argument_default=argparse.SUPPRESS,  # only the flags typed override the config file / saved run
    )
    flags.add_train_arguments(train)  # one flag per scale.config field (torch-free)
    train.set_defaults(handler=_cmd_train)

    _add_export(sub)

    _add_llm(sub)

    plot = sub.add_parser(
        "plot",
        help="figures and a token-level view (HTML + PNG) from a training run directory",
        description=(
            "Read RUN_DIR/metrics.jsonl and RUN_DIR/samples/ written by 'entdyn train' and write reward, "
            "entropy-by-polarity, predicted-vs-measured dH and position-profile PNGs, plus tokens.html / "
            "tokens.png (sampled completions coloured by entropy and by quadrant)."
        ),
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of entdyn train")
    plot.add_argument("--out", default=None, metavar="DIR", help="output directory (default: RUN_DIR/plots)")
    plot.set_defaults(handler=_cmd_plot)
    return parser


def _add_export(sub) -> None:
    """The ``export`` sub-parser."""
    export = sub.add_parser(
        "export",
        help="a Hugging Face model directory (config, safetensors, tokenizer) from a run's checkpoint",
        description=(
            "Write the model files of RUN_DIR's newest intact checkpoint (or of --step N) into OUT: "
            "config.json, generation_config.json, model.safetensors and the tokenizer's files, without "
            "the optimizer state. AutoModelForCausalLM.from_pretrained(OUT) and "
            "AutoTokenizer.from_pretrained(OUT) load it."
        ),
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of entdyn train")
    export.add_argument("out", metavar="OUT", help="the directory to write (must not exist or be empty)")
    export.add_argument("--step", type=_non_negative_int, default=None, metavar="N",
                        help="export this step's checkpoint (default: the newest intact one)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    export.set_defaults(handler=_cmd_export)


def _add_llm(sub) -> None:
    """The ``llm`` sub-parser."""
    llm = sub.add_parser(
        "llm",
        help="paper 1's checks on a real model through the trainer (quadrants, first-order, ...)",
        description=(
            "Run named real-model experiments through the GRPO trainer: quadrants, first-order, "
            "attribution, rules, control; 'all' runs every one (into DIR/<name>), 'list' lists them. "
            "Each writes summary.json, curves.json, PNG figures and table.md into DIR (scale/llm.py, "
            "docs/llm.md)."
        ),
    )
    llm.add_argument("names", nargs="+", metavar="NAME", help="experiment name(s), 'all' or 'list'")
    llm.add_argument("--model", default="smollm2-135m",
                     help="smollm2-135m (default), tiny (a random model, for tests) or a local HF directory")
    llm.add_argument("--out", default=None, metavar="DIR",
                     help="output directory (default: runs/llm/<name>, or runs/llm for several)")
    llm.add_argument("--quick", action="store_true", help="small sizes (seconds with --model tiny)")
    llm.add_argument("--seeds", type=int, default=None, help="seeds (batches) per configuration (override)")
    llm.add_argument("--steps", type=int, default=None, help="training steps (override)")
    llm.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-5)")
    llm.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    llm.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    llm.add_argument("--threads", type=int, default=None, help="torch threads")
    llm.add_argument("--task", default=None, help="task spec (default: scale.llm.TASK, one-digit additions)")
    llm.add_argument("--reward", default="auto", choices=("auto", "task", "digits"),
                     help="task: the task's correctness; digits: share of digits in the completion (any "
                          "model gets a spread); auto (default): digits for tiny, else task")  # fmt: skip
    llm.add_argument("--no-progress", action="store_true", help="no progress lines")
    llm.set_defaults(handler=_cmd_llm)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a step number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a step number (0 or more), got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``entdyn`` console script; returns the process exit status."""
    problem = foreign_scale()  # before anything from scale is imported: its __init__ may not be ours
    if problem is not None:
        print(f"entdyn: error: {problem}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "n", None) is not None and args.n < 1:
        parser.error("--n must be a positive integer")
    if args.command == "toy" and args.out is None:
        single = len(args.names) == 1 and args.names != ["all"]
        args.out = f"runs/toy/{args.names[0]}" if single else "runs/toy"
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
