"""The training loop, top to bottom: :func:`train` runs :func:`train_step` per step, one call a phase.

See :mod:`scale.train` for what each numbered phase does and what is simplified; the pieces live in
:mod:`.setup` (run construction, resume, checkpoints), :mod:`.update` (phase 5) and
:mod:`.diagnostics` (phases 6-7).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import theory
from theory.rules import RuleOutput, TokenBatch

from ..config import ConfigError, TrainConfig
from ..distributed import barrier, check_replicated, full_model_state, full_optimizer_state, gathered
from ..grading import evaluate_samples
from ..metrics_log import MetricsLogger, trackers, write_samples
from ..rollout import Rollout, sample
from ..tasks import format_prompt
from ..token_stats import TokenStats
from .diagnostics import Probe, batch_metrics, probe_after, probe_before, sample_records, score_rows
from .runtime import (
    RewardFunctionError,
    TrainingDiverged,
    autocast,
    peak_memory_gb,
    release_host_memory,
    stream_seed,
    sync,
    to_floats,
)
from .setup import Run, build_run, checkpoint, restore_replaced, resume
from .update import ppo_update

__all__ = ["StepBatch", "compute_step", "main", "run_cli", "train", "train_step"]


@dataclass
class StepBatch:
    """One step's data, filled phase by phase (``(N, T)`` = sequences x response tokens)."""

    problems: list  # the P problems of the step
    ro: Rollout  # N = P x G sampled sequences
    rewards: list[float] = field(default_factory=list)  # (N,)
    adv_seq: torch.Tensor | None = None  # (N,) group advantages
    adv: torch.Tensor | None = None  # (N, T) broadcast over the response tokens
    old: TokenStats | None = None  # behaviour statistics: log pi_old, H, S*, E_p[S]
    ref_logp: torch.Tensor | None = None  # (N, T) under the frozen reference (kl_beta > 0)
    rule_out: RuleOutput | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # tensors until the one host transfer
    times: dict[str, float] = field(default_factory=dict)  # phase -> end time (perf_counter)

    @property
    def adv_eff(self) -> torch.Tensor:
        """The advantages the update uses: the rule's, else the group advantages."""
        return self.rule_out.adv if self.rule_out is not None else self.adv

    def mark(self, phase: str, device: torch.device) -> None:
        sync(device)
        self.times[phase] = time.perf_counter()


# --------------------------------------------------------------------------------------------------
# the phases of a step


def rollout(run: Run) -> StepBatch:
    """1. P training prompts (a seeded permutation per data epoch) x G samples, one KV-cache decode loop."""
    cfg, s = run.cfg, run.state
    idx = s.next_prompts(len(run.task.train), cfg.rollout.prompts, cfg.run.seed)
    problems = [run.task.train[i] for i in idx]
    torch.manual_seed(stream_seed(cfg.run.seed, s.step, 0))
    r = cfg.rollout
    with autocast(cfg, run.device), gathered(run.model):
        ro = sample(
            run.model, run.tok, [format_prompt(p, run.tok) for p in problems], group_size=r.group_size,
            max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens, temperature=r.temperature,
            top_p=r.top_p, top_k=r.top_k, stats=not r.rescore,
        )  # fmt: skip
    release_host_memory(run.device)
    return StepBatch(problems, ro)


def rewards_and_advantages(run: Run, b: StepBatch) -> None:
    """2. Rewards (a raising reward function gives 0 and is counted, or stops a strict run), then
    :func:`theory.grpo_advantages` per group."""
    P, G, N = run.cfg.rollout.prompts, run.cfg.rollout.group_size, run.cfg.n_seqs
    reward, step = run.reward, run.state.step
    n_err = reward.n_errors
    try:
        b.rewards = [reward(c, b.problems[i // G]) for i, c in enumerate(b.ro.completions)]
    except Exception as err:  # only with strict_reward
        raise RewardFunctionError(f"step {step}: the reward function raised {err!r}") from err
    run.state.reward_errors_total += reward.n_errors - n_err
    rewards = torch.tensor(b.rewards, dtype=torch.float64)  # (N,) float64: any finite float reward fits
    check_replicated(b.ro.response, run.dd, f"step {step}: the sampled batch")  # (several processes)
    check_replicated(rewards, run.dd, f"step {step}: the rewards")
    adv = theory.grpo_advantages(rewards.view(P, G), **run.preset)  # scale-safe for huge rewards
    b.adv_seq = adv.reshape(N).to(device=run.device, dtype=torch.float32)
    b.adv = torch.where(b.ro.mask, b.adv_seq[:, None], 0.0)
    correct = rewards == float(run.correct_value) if run.correct_value is not None else rewards > 0
    rg = rewards.view(P, G)
    m = b.metrics
    scale = rewards.abs().max().clamp(min=1.0)  # mean and std of rewards near the float64 limit stay finite
    m["reward/mean"], m["reward/std"] = (
        (rewards / scale).mean() * scale,
        (rewards / scale).std(correction=0) * scale,
    )
    m["accuracy"] = correct.float().mean()
    m["reward/zero_std_frac"] = (rg.max(1).values == rg.min(1).values).float().mean()
    m["reward/errors"], m["reward/errors_total"] = reward.n_errors - n_err, run.state.reward_errors_total
    m["adv/abs_mean"] = b.adv_seq.abs().mean()


def behaviour_statistics(run: Run, b: StepBatch) -> None:
    """3. Per response token ``log pi_old``, ``H``, ``S*``, ``E_p[S]``: the sampler's own (every process
    sampled the whole batch), or with ``rollout.rescore`` a no-grad forward (several processes: each
    scores its rows, then the rows are all-gathered); the reference's log-probs with ``kl_beta > 0``."""
    cfg = run.cfg
    kw = {"temperature": cfg.rollout.temperature, "chunk_size": cfg.model.chunk_size}
    if b.ro.behaviour is not None:
        b.old = b.ro.behaviour
    else:
        with autocast(cfg, run.device), gathered(run.model):
            b.old = score_rows(run.model, b.ro, run.own, run.dd, cfg, s_star=True, baseline=True, **kw)
    if run.ref is not None:
        with autocast(cfg, run.device), gathered(run.ref):
            b.ref_logp = score_rows(run.ref, b.ro, run.own, run.dd, cfg, **kw).logp


def apply_rule(run: Run, b: StepBatch) -> None:
    """4. The rule, once on the whole (global) batch; every process runs it identically."""
    if run.rule is None:
        return
    s, old, (N, T) = run.state, b.old, b.ro.mask.shape
    stage = s.stage.stage if s.stage is not None else None
    batch = TokenBatch(
        logp=old.logp, adv=b.adv, valid=b.ro.mask, old_logp=old.logp, entropy=old.entropy,
        baseline=old.baseline, group=b.ro.group, step=s.step, stage=stage,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(stream_seed(run.cfg.run.seed, s.step, 1))
    noise = torch.rand((N, T), generator=gen, dtype=old.logp.dtype).to(run.device)
    b.rule_out = run.rule(batch, noise=noise, state=s.rule_state)
    s.rule_state = b.rule_out.state


def update_stage(run: Run, floats: dict[str, Any]) -> None:
    """8. The stage detector on the step's mean entropy and accuracy (python floats)."""
    if run.detector is None:
        return
    s = run.state
    s.stage = run.detector.update(s.stage, floats["entropy"], floats["accuracy"])
    floats["stage/plateau"] = float(s.stage.stage == "plateau")
    floats["stage/plateau_step"] = s.stage.plateau_step


def evaluate(run: Run) -> dict[str, float]:
    """9. avg@k / pass@k / maj@k on ``eval.eval_problems`` held-out problems (k = ``eval.eval_k``),
    sampled on a private RNG stream (the training stream does not move); every ``eval.eval_every``."""
    cfg, ev, step = run.cfg, run.cfg.eval, run.state.step
    if not (ev.eval_every and (step % ev.eval_every == 0 or step == cfg.run.steps)):
        return {}
    if not (run.dd.is_main or run.fsdp):  # rank 0 evaluates; with FSDP every process runs the forwards
        return {}
    problems, k = run.task.eval[: ev.eval_problems], ev.eval_k
    per_call = max(1, cfg.rollout.score_batch // k)
    completions: list[list[str]] = []
    devices = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), gathered(run.model):
        torch.manual_seed(stream_seed(cfg.run.seed, step, 2))
        for s in range(0, len(problems), per_call):
            chunk = problems[s : s + per_call]
            with autocast(cfg, run.device):
                ro = sample(
                    run.model, run.tok, [format_prompt(p, run.tok) for p in chunk], group_size=k,
                    max_new_tokens=cfg.rollout.max_new_tokens, temperature=ev.eval_temperature,
                    top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stats=False,
                )  # fmt: skip
            completions += [ro.completions[i * k : (i + 1) * k] for i in range(len(chunk))]
    res = evaluate_samples(problems, completions, ks=sorted({1, k}), timeout_s=cfg.task.grade_timeout_s)
    return {f"eval/{key}": value for key, value in res.as_dict().items()} if run.dd.is_main else {}


def _timings(b: StepBatch, floats: dict[str, Any], probe: Probe | None, device: torch.device) -> None:
    t = b.times
    step_s = t["end"] - t["start"]
    floats["time/step_s"] = step_s
    floats["time/rollout_s"] = t["rollout"] - t["start"]
    floats["time/score_s"] = t["score"] - t["rollout"]
    floats["time/train_s"] = t["train"] - t["score"]
    floats["time/diag_s"] = probe.seconds if probe is not None else 0.0
    floats["time/eval_s"] = t["end"] - t["eval"]
    floats["tokens_per_s"] = float(b.ro.mask.sum()) / step_s
    floats["mem/peak_gb"] = peak_memory_gb(device)


def log_and_save(run: Run, b: StepBatch, floats: dict[str, Any], logger: MetricsLogger | None) -> dict:
    """10. Log the step, write its samples and (every ``run.save_every`` and at the end) a checkpoint;
    rank 0 writes, the other processes only join the FSDP gathers. Returns the logged record."""
    cfg, step = run.cfg, run.state.step
    last = cfg.run.stop_after or cfg.run.steps
    save = (cfg.run.save_every and step % cfg.run.save_every == 0) or step == last
    full_states = {}
    if save and run.fsdp:  # full tensors gathered by every process, written by rank 0
        full_states = {"model_state": full_model_state(run.model),
                       "optimizer_state": full_optimizer_state(run.model, run.optimizer)}  # fmt: skip
    if not run.dd.is_main:
        return floats
    record = logger.log(step, floats)
    if cfg.diag.samples_per_step:
        old = b.old
        dev = old.s_star - old.baseline
        quad = theory.quadrant(b.adv_eff, dev)  # (N, T) codes, -1 = no first-order effect
        write_samples(run.run_dir, step, sample_records(b.ro, run.tok, old, dev, quad, b.adv_seq, b.rewards,
                                                        b.problems, step, cfg))  # fmt: skip
    if save:
        checkpoint(run, full_states)
    return record


def train_step(run: Run, logger: MetricsLogger | None) -> dict[str, Any]:
    """One GRPO step (phases 1-10 of :mod:`scale.train`); returns the logged record."""
    b, floats = compute_step(run)  # 1-9
    return log_and_save(run, b, floats, logger)  # 10


def compute_step(run: Run) -> tuple[StepBatch, dict[str, Any]]:
    """Phases 1-9 of one GRPO step: the update is applied, nothing is written (the experiments of
    :mod:`scale.llm` call this directly); returns the step's batch and its metrics as python floats."""
    cfg, device = run.cfg, run.device
    run.state.step += 1
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    b = rollout(run)  # 1
    b.times["start"] = t_start
    b.mark("rollout", device)
    rewards_and_advantages(run, b)  # 2
    behaviour_statistics(run, b)  # 3
    b.mark("score", device)
    apply_rule(run, b)  # 4
    diag = cfg.diag.diag_every > 0 and run.state.step % cfg.diag.diag_every == 0
    probe = probe_before(run, b.ro, b.old.logp) if diag else None  # 6 (before the update, float32)
    b.metrics.update(ppo_update(run, b, probe))  # 5
    b.mark("train", device)
    if probe is not None:
        b.metrics.update(probe_after(run, b.ro, probe, b.adv_eff))  # 6 (after)
        if run.rule is not None:  # the measured change, for rules that learn from it (a tensor: no sync)
            run.state.rule_state = run.rule.feedback(run.state.rule_state, b.metrics["theory/dH_measured"])
    b.metrics.update(batch_metrics(cfg, b.ro, b.old, b.adv, b.adv_eff, b.rule_out))  # 7
    floats = to_floats(b.metrics)  # the one host transfer of the step's metrics
    update_stage(run, floats)  # 8
    b.times["eval"] = time.perf_counter()
    floats.update(evaluate(run))  # 9
    b.times["end"] = time.perf_counter()
    _timings(b, floats, probe, device)
    return b, floats


# --------------------------------------------------------------------------------------------------
# the run


def train(cfg: TrainConfig, *, reward_fn: Callable[[str, Any], float] | None = None) -> dict[str, Any]:
    """Run (or resume) GRPO training as configured; return a summary dict.

    ``reward_fn(completion, problem) -> float`` replaces the configured correctness reward (it is
    wrapped in :class:`scale.grading.SafeReward`). Raises :class:`ConfigError` for a bad
    configuration (before loading the model), :class:`TrainingDiverged` on a non-finite loss or
    gradient norm, :class:`RewardFunctionError` when a strict reward function raises.
    """
    run = build_run(cfg, reward_fn)
    logger = progress = None
    record: dict[str, Any] = {}
    t_run = time.perf_counter()
    last = run.cfg.run.stop_after or run.cfg.run.steps
    try:
        if run.cfg.run.resume:
            resume(run)
        if run.dd.is_main and run.state.step < last:  # rank 0 writes the run directory (nothing if done)
            from ..flags import config_to_dict, save_config

            save_config(run.saved_cfg, run.run_dir)
            purge = run.state.step + 1 if run.state.step else None
            report_to = trackers(run.cfg.run.report_to, run.cfg.run.tensorboard)
            logger = MetricsLogger(run.run_dir, report_to=report_to, purge_step=purge,
                                   config=config_to_dict(run.saved_cfg))  # fmt: skip
        progress = Progress(run)
        while run.state.step < last:
            record = train_step(run, logger)
            progress.update(run.state.step, record)
    except BaseException:
        if logger is not None:
            logger.close()
            logger = None
        if run.dd.is_main and restore_replaced(run.run_dir):  # an --overwrite failed before a checkpoint
            print(f"{run.run_dir}: the new run failed before its first checkpoint; the run it was "
                  "replacing is restored", file=sys.stderr, flush=True)  # fmt: skip
        raise
    finally:
        if logger is not None:
            logger.close()
        if progress is not None:
            progress.close()
    barrier(run.dd)  # rank 0's last checkpoint is complete when any process returns
    return {"run_dir": str(run.run_dir), "step": run.state.step, "wall_s": time.perf_counter() - t_run,
            "last": record}  # fmt: skip


class Progress:
    """``run.progress``: a tqdm bar (``bar``), one line per step on stderr (``log``) or nothing (``off``);
    ``auto`` is a bar on a terminal, else log lines. Only rank 0 reports."""

    def __init__(self, run: Run):
        mode = run.cfg.run.progress if run.dd.is_main else "off"
        self.mode = ("bar" if sys.stderr.isatty() else "log") if mode == "auto" else mode
        self.steps, self.bar = run.cfg.run.steps, None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.steps, initial=run.state.step, desc="train", file=sys.stderr,
                            dynamic_ncols=True)  # fmt: skip

    def update(self, step: int, rec: dict[str, Any]) -> None:
        def f(key: str, fmt: str = ".3f") -> str:
            v = rec.get(key)
            return "-" if v is None else format(v, fmt)

        if self.bar is not None:
            self.bar.set_postfix_str(
                f"reward {f('reward/mean')} acc {f('accuracy')} H {f('entropy')} "
                f"loss {f('loss/total', '.4f')} {f('time/step_s', '.2f')}s",
                refresh=False,
            )
            self.bar.update(1)
        elif self.mode == "log":
            dh = f" dH {f('theory/dH_measured', '.2e')}" if rec.get("theory/dH_measured") is not None else ""
            print(
                f"step {step}/{self.steps} reward {f('reward/mean')} acc {f('accuracy')} "
                f"entropy {f('entropy')} loss {f('loss/total', '.4f')} grad_norm {f('grad_norm')}{dh} "
                f"{f('time/step_s', '.2f')}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scale.train [flags]`` (the flags of ``entdyn train``); returns the exit status."""
    from ..flags import parse_args

    return run_cli(lambda: parse_args(argv))


def run_cli(make_config: Callable[[], TrainConfig]) -> int:
    """Build the configuration and train, as a command: 2 for a bad configuration (its message on
    stderr), 1 when the run failed (diverged, strict reward raised), 0 done (a summary line)."""
    import torch.distributed as dist

    try:
        summary = train(make_config())
    except ConfigError as err:
        print(f"entdyn train: error: {err}", file=sys.stderr)
        return 2
    except (TrainingDiverged, RewardFunctionError) as err:
        print(f"entdyn train: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "entdyn train: interrupted; continue from the last checkpoint with --resume RUN_DIR",
            file=sys.stderr,
        )
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():  # started by train() from torchrun's environment
            dist.destroy_process_group()
    if dist.is_available() and int(os.environ.get("RANK", "0")) != 0:
        return 0  # the other processes print nothing
    rec = summary["last"]
    if not rec:
        print(f"done: the run in {summary['run_dir']} is already at step {summary['step']}: nothing to do "
              f"(pass --steps {summary['step'] + 1} or more to continue it)", file=sys.stderr)  # fmt: skip
        return 0
    print(
        f"done: {summary['step']} steps in {summary['wall_s']:.1f} s, run directory {summary['run_dir']} "
        f"(last reward {rec.get('reward/mean')}, entropy {rec.get('entropy')})",
        file=sys.stderr,
    )
    return 0
