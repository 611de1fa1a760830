"""The per-section checks of :func:`scale.config.validate` (rollout, optim, diag/eval/run, report_to).

They live here so that :mod:`scale.config` stays a readable list of the fields; each raises
:class:`scale.config.ConfigError` naming the first bad field, before anything is loaded or written.
No torch import.
"""

from __future__ import annotations

import importlib.util
import math

from .config import (
    ConfigError,
    DiagnosticsConfig,
    EvalConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
    _positive,
)
from .metrics_log import TRACKERS, parse_report_to, trackers

__all__ = ["check_optim", "check_report_to", "check_rest", "check_rollout"]


def check_rollout(r: RolloutConfig) -> None:
    from theory import ADVANTAGE_PRESETS

    _positive(r.prompts >= 1, "rollout.prompts", "must be >= 1", r.prompts)
    _positive(
        r.group_size >= 2,
        "rollout.group_size",
        "must be >= 2 (a GRPO advantage compares samples of one prompt; G = 1 gives no signal)",
        r.group_size,
    )
    _positive(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1", r.max_new_tokens)
    _positive(
        0 <= r.min_new_tokens <= r.max_new_tokens,
        "rollout.min_new_tokens",
        "must lie in [0, max_new_tokens]",
        r.min_new_tokens,
    )
    _positive(
        math.isfinite(r.temperature) and r.temperature > 0,
        "rollout.temperature",
        "must be > 0",
        r.temperature,
    )
    _positive(0 < r.top_p <= 1, "rollout.top_p", "must lie in (0, 1]", r.top_p)
    _positive(r.top_k >= 0, "rollout.top_k", "must be >= 0", r.top_k)
    _positive(
        r.advantages in ADVANTAGE_PRESETS,
        "rollout.advantages",
        f"must be one of {', '.join(ADVANTAGE_PRESETS)}",
        r.advantages,
    )
    _positive(r.score_batch >= 1, "rollout.score_batch", "must be >= 1", r.score_batch)


def check_optim(cfg: TrainConfig) -> None:
    o, r = cfg.optim, cfg.rollout
    _positive(math.isfinite(o.lr) and o.lr > 0, "optim.lr", "must be a finite number > 0", o.lr)
    _positive(0 <= o.beta1 < 1, "optim.beta1", "must lie in [0, 1)", o.beta1)
    _positive(0 <= o.beta2 < 1, "optim.beta2", "must lie in [0, 1)", o.beta2)
    _positive(o.eps > 0, "optim.eps", "must be > 0", o.eps)
    _positive(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _positive(
        o.max_grad_norm is None or o.max_grad_norm > 0,
        "optim.max_grad_norm",
        "must be > 0 or none",
        o.max_grad_norm,
    )
    _positive(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", o.warmup_steps)
    _positive(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]", o.min_lr_ratio)
    _positive(o.ppo_epochs >= 1, "optim.ppo_epochs", "must be >= 1", o.ppo_epochs)
    _positive(o.minibatches >= 1, "optim.minibatches", "must be >= 1", o.minibatches)
    n = cfg.n_seqs
    if n % o.minibatches:
        raise ConfigError(
            "optim.minibatches",
            f": {n} sequences per step (rollout.prompts {r.prompts} x rollout.group_size {r.group_size}) "
            f"do not split into {o.minibatches} equal minibatches",
        )
    _positive(o.micro_batch >= 0, "optim.micro_batch", "must be >= 0", o.micro_batch)
    if o.micro_batch and cfg.minibatch_size % o.micro_batch:
        raise ConfigError(
            "optim.micro_batch",
            f": a minibatch of {cfg.minibatch_size} sequences does not split into micro-batches of "
            f"{o.micro_batch}",
        )


def check_rest(d: DiagnosticsConfig, e: EvalConfig, run: RunConfig) -> None:
    _positive(d.diag_every >= 0, "diag.diag_every", "must be >= 0", d.diag_every)
    _positive(d.samples_per_step >= 0, "diag.samples_per_step", "must be >= 0", d.samples_per_step)
    _positive(d.pos_buckets >= 1, "diag.pos_buckets", "must be >= 1", d.pos_buckets)
    _positive(e.eval_every >= 0, "eval.eval_every", "must be >= 0", e.eval_every)
    _positive(e.eval_problems >= 1, "eval.eval_problems", "must be >= 1", e.eval_problems)
    _positive(e.eval_k >= 1, "eval.eval_k", "must be >= 1", e.eval_k)
    _positive(
        math.isfinite(e.eval_temperature) and e.eval_temperature > 0,
        "eval.eval_temperature",
        "must be > 0",
        e.eval_temperature,
    )
    # run
    _positive(run.steps >= 1, "run.steps", "must be >= 1", run.steps)
    _positive(0 <= run.seed < 2**63, "run.seed", "must lie in [0, 2**63)", run.seed)
    _positive(run.save_every >= 0, "run.save_every", "must be >= 0", run.save_every)
    _positive(run.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1", run.keep_checkpoints)
    _positive(
        run.stop_after is None or 1 <= run.stop_after <= run.steps,
        "run.stop_after",
        "must lie in [1, steps] or be none",
        run.stop_after,
    )
    _positive(run.threads is None or run.threads >= 1, "run.threads", "must be >= 1 or none", run.threads)
    _positive(bool(str(run.out).strip()), "run.out", "must be a directory path", run.out)
    check_report_to(run)


def check_report_to(run: RunConfig) -> None:
    """``run.report_to``: known tracker names, ``none`` alone, and each tracker's package importable (a
    missing one is reported here, before the run directory is touched, not when the logger starts)."""
    try:
        parse_report_to(run.report_to)
    except ValueError as err:
        raise ConfigError("run.report_to", f": {err}") from None
    for name in trackers(run.report_to, run.tensorboard):
        package = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                "run.report_to",
                f": {name} needs the {package} package, which is not installed: pip install {package} (or "
                f"leave {name} out of --report-to)",
            )
