r"""Configuration of the GRPO trainer (:mod:`scale.train`): typed, documented dataclasses.

One :class:`TrainConfig` holds a section per concern::

    model     ModelConfig        which model, dtype, device, lm_head chunking
    task      TaskConfig         the verifiable task (a scale.tasks spec) and its reward
    rollout   RolloutConfig      P prompts x G samples, sampling parameters, advantages
    rule      RuleConfig         the theory.rules spec applied to every batch, the stage detector
    loss      LossConfig         clipping, dual clip, aggregation, k3 KL (also scale.loss.LossConfig)
    optim     OptimConfig        AdamW / SGD, lr schedule, PPO epochs, minibatches, micro-batches
    diag      DiagnosticsConfig  theory diagnostics (measured vs predicted entropy change), samples
    eval      EvalConfig         held-out avg@k / pass@k / maj@k
    run       RunConfig          steps, output directory, resume, seed, checkpoints, threads

Every field is documented in its class's ``Attributes:`` section; :func:`scale.flags.build_parser` turns
those texts into ``--help`` (one flag per field, ``--model``, ``--task``, ``--rule``, ``--lr`` ...), so the
documentation has one source.

**Where values come from**, later wins: the dataclass defaults; with ``--resume RUN_DIR`` the run's
saved ``RUN_DIR/config.yaml``; a ``--config FILE`` (YAML or JSON, nested by section, e.g.
``{"rollout": {"prompts": 8, "group_size": 4}, "optim": {"lr": 1e-5}}``); then the flags given on
the command line. The resolved configuration is written to ``RUN_DIR/config.yaml`` (JSON,
``config.json``, when PyYAML is missing) and is what ``--resume`` reads back.

**Validation** (:func:`validate`; the per-section checks are :mod:`scale._validate`) runs before
anything heavy is loaded and raises :class:`ConfigError` (a ``ValueError``) whose message starts with the
dotted field name, e.g. ``rollout.group_size must be >= 2 ...`` or ``optim.minibatches: 30 sequences per
step ... do not split into 4 minibatches``. Unknown rule, task, model and tracker names are reported the
same way (``rule.spec: unknown rule 'foo'; registered: ...``).

This module imports neither torch nor transformers (``entdyn train --help`` needs none); values are
converted by :func:`theory.spec.coerce`, the one parser of the project's spec strings, and files and
flags are :mod:`scale.flags`. :func:`validate` never changes its argument: it returns the checked
configuration, with short dtype names (``bf16``) replaced by a new object.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from theory.spec import SpecError, build, coerce, parse_spec

__all__ = [
    "ConfigError",
    "DiagnosticsConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RolloutConfig",
    "RuleConfig",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "coerce_field",
    "make_rule_from_config",
    "make_stage_detector",
    "validate",
    "validate_distributed",
]

#: dtypes the trainer accepts: float32; bfloat16 = mixed precision (float32 master weights, the forwards
#: under ``torch.autocast(bfloat16)``, as TRL's ``bf16=True``); float64 (loaded in float32, then
#: converted; for precise theory checks on CPU). float16 is not offered: it needs loss scaling.
TRAIN_DTYPES = ("float32", "float64", "bfloat16")
#: short names accepted for ``model.dtype`` (validate() replaces them by the full name)
DTYPE_ALIASES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16"}

#: sequences per forward/backward on a CPU when ``optim.micro_batch`` is 0 (auto): bounds the activation
#: memory (BENCHMARKS.md: the 8 x 4 x 32 SmolLM2 step peaks at 2.9 GiB RSS). On a GPU auto is the whole
#: minibatch share (with activation checkpointing it fits; small micro-batches waste the GPU).
AUTO_MICRO_BATCH = 8


class ConfigError(ValueError):
    """An invalid configuration value; ``field`` is the dotted name (``"rollout.group_size"``), ``detail``
    the rest of the message."""

    def __init__(self, field_name: str, message: str):
        self.field, self.detail = field_name, message
        super().__init__(f"{field_name} {message}" if not message.startswith(":") else field_name + message)

    def within(self, section: str) -> ConfigError:
        """The same error with ``section.`` in front of its field (a section's own check, reported
        under the configuration's dotted name)."""
        return ConfigError(f"{section}.{self.field}", self.detail)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


#: the aggregation modes of :class:`LossConfig`
AGGREGATIONS = ("token_mean", "seq_mean", "constant")


# --------------------------------------------------------------------------------------------------
# Sections


@dataclass
class ModelConfig:
    """The policy model.

    Attributes:
        name: a scale.models name ('tiny', 'smollm2-135m') or a local Hugging Face causal-LM directory.
        dtype: float32 (CPU default); bfloat16 or bf16 (GPUs): mixed precision, float32 master weights and
            optimizer state, forwards under torch.autocast(bfloat16), diagnostics in float32; or
            float64 (loaded in float32 and converted; for exact theory checks on CPU).
        device: torch device: cpu, cuda, cuda:1, ...
        cache_dir: folder of converted models (scale.models; default: $ENTDYN_CACHE/models).
        chunk_size: tokens per lm_head chunk in the token statistics (memory: a few chunk_size x V floats;
            256 x 49152 float32 = 50 MB each).
        fsdp: with several processes, shard parameters, gradients and optimizer state over them with
            FSDP2 (scale.distributed; docs/scaling.md); also switched on by accelerate launch --use_fsdp.
            Ignored with one process.
    """

    name: str = field(default="tiny", metadata={"flag": "model"})
    dtype: str = "float32"
    device: str = "cpu"
    cache_dir: str | None = None
    chunk_size: int = 256
    fsdp: bool = False


@dataclass
class TaskConfig:
    """The verifiable task and its reward.

    Attributes:
        spec: a scale.tasks spec, e.g. 'arithmetic:digits=2,ops=2' or 'jsonl:path=train.jsonl'.
        reward: 'correctness' (1 correct / 0 wrong) or 'pm1' (+1 / -1, arXiv 2508.02260).
        strict_reward: a reward function that raises stops the run (default: reward 0, counted, logged).
        grade_timeout_s: bound in seconds on one math-verify comparison.
        reward_timeout_s: bound in seconds on one reward call (a custom reward_fn too); an overrun is a
            reward error (0, counted), fatal under strict_reward; 'none': unbounded.
    """

    spec: str = field(default="arithmetic:digits=1,ops=2,n_train=200,n_eval=50", metadata={"flag": "task"})
    reward: Literal["correctness", "pm1"] = "correctness"
    strict_reward: bool = False
    grade_timeout_s: float = 2.0
    reward_timeout_s: float | None = 30.0


@dataclass
class RolloutConfig:
    """Sampling: P prompts per step, G completions each.

    Attributes:
        prompts: P, prompts per training step.
        group_size: G, completions per prompt (the GRPO group; >= 2).
        max_new_tokens: longest completion, in tokens.
        min_new_tokens: eos is forbidden before this many tokens (changes the behaviour distribution).
        temperature: sampling temperature; log-probs and entropies are scored at the same temperature.
        top_p: nucleus sampling (1 = off). Scores use the untruncated softmax, as TRL and verl do.
        top_k: top-k sampling (0 = off).
        advantages: a theory.ADVANTAGE_PRESETS name: reference, verl, trl or dr_grpo.
        score_batch: sequences per no-grad forward (diagnostics, rescore, reference model, eval).
        rescore: take log pi_old, H, S* and E_p[S] from a separate no-grad forward of the sampled
            sequences (the training forward's code) instead of the sampler's own logits (default:
            the sampler's, no extra forward; they differ by rounding, more so under bfloat16).
    """

    prompts: int = 8
    group_size: int = 4
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    advantages: str = "reference"
    score_batch: int = 64
    rescore: bool = False


@dataclass
class RuleConfig:
    """The entropy-control rule (theory.rules) and the rising/plateau stage detector.

    Attributes:
        spec: a theory.rules.make_rule spec ('clip_b:mu=2.0+position_bonus:gate=stage'), or 'none'.
        stage_detector: 'stage_detector' with optional parameters ('stage_detector:window=20'), or 'none'.
    """

    spec: str = field(default="none", metadata={"flag": "rule"})
    stage_detector: str = "stage_detector"


@dataclass(frozen=True)
class LossConfig:
    """Hyperparameters of the clipped GRPO surrogate (names follow TRL/verl where they exist).

    Attributes:
        clip_low: ``ε_low``; ratios below ``1 − ε_low`` are clipped for negative advantages; in [0, 1).
        clip_high: ``ε_high``; ratios above ``1 + ε_high`` are clipped for positive advantages; >= 0.
            A value above ``clip_low`` is DAPO's clip-higher (DAPO uses 0.28).
        dual_clip: verl's ``clip_ratio_c``: for ``A < 0`` the per-token loss is at most ``−A · c``
            (the gradient vanishes once ``r > c``); None disables it; must be > 1.
        aggregation: ``"token_mean"`` (DAPO), ``"seq_mean"`` (GRPO) or ``"constant"`` (Dr. GRPO).
        max_length: ``L`` of ``"constant"`` (divide by ``B · L``); None = the padded length ``T``.
        kl_beta: ``β`` of the k3 penalty to a reference policy (needs ``ref_logp``); >= 0, 0 = off.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    aggregation: Literal["token_mean", "seq_mean", "constant"] = "token_mean"
    max_length: int | None = None
    kl_beta: float = 0.0

    def __post_init__(self):
        if not (_is_number(self.clip_low) and 0.0 <= self.clip_low < 1.0):
            raise ConfigError("clip_low", f"must be a number in [0, 1), got {self.clip_low!r}")
        if not (_is_number(self.clip_high) and self.clip_high >= 0.0):
            raise ConfigError("clip_high", f"must be a finite number >= 0, got {self.clip_high!r}")
        if self.dual_clip is not None and not (_is_number(self.dual_clip) and self.dual_clip > 1.0):
            raise ConfigError("dual_clip", f"must be None or a finite number > 1, got {self.dual_clip!r}")
        if self.aggregation not in AGGREGATIONS:
            choices = ", ".join(AGGREGATIONS)
            raise ConfigError("aggregation", f"must be one of {choices}, got {self.aggregation!r}")
        L = self.max_length
        if L is not None and not (isinstance(L, int) and not isinstance(L, bool) and L >= 1):
            raise ConfigError("max_length", f"must be None or an integer >= 1, got {self.max_length!r}")
        if not (_is_number(self.kl_beta) and self.kl_beta >= 0.0):
            raise ConfigError("kl_beta", f"must be a finite number >= 0, got {self.kl_beta!r}")


@dataclass
class OptimConfig:
    """Optimiser, learning-rate schedule and the PPO update structure.

    Attributes:
        optimizer: 'adamw' or 'sgd' (plain SGD makes the tabular prediction's step size literal).
        lr: peak learning rate (> 0).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        eps: AdamW epsilon.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        max_grad_norm: clip the global gradient norm to this (none = no clipping).
        schedule: lr after warmup: constant, linear or cosine decay to min_lr_ratio x lr.
        warmup_steps: linear warmup from 0, in training steps.
        min_lr_ratio: final lr / peak lr of the linear and cosine schedules.
        ppo_epochs: mu, passes over each step's batch (ratios differ from 1 after the first update).
        minibatches: optimizer updates per epoch; P x G sequences must split evenly.
        micro_batch: sequences per forward/backward inside a minibatch; with several processes, per
            process. 0 = auto: on a CPU 8, or the whole minibatch (the process's 1/W share) if smaller,
            the last micro-batch taking the remainder; on a GPU the whole share. Gradients accumulate
            with the minibatch's global normaliser, so the update does not depend on it.
        grad_checkpointing: activation checkpointing of the decoder layers in the training forward
            (one more forward per update, far less memory; TRL's default too). Same gradients.
    """

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-6
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    ppo_epochs: int = 1
    minibatches: int = 1
    micro_batch: int = 0
    grad_checkpointing: bool = True


@dataclass
class DiagnosticsConfig:
    """Theory diagnostics and logged samples.

    Attributes:
        diag_every: every this many steps, measure the entropy change of the update and its
            tabular (E6) and network (JVP) first-order predictions (0 = off).
        jvp: include the network-level prediction (a forward-mode JVP, about 2-3 forwards).
        samples_per_step: completions per step written to samples/step_XXXXXX.jsonl (0 = none).
        pos_buckets: relative-position buckets of the entropy/pos_bucket_<i> metrics.
    """

    diag_every: int = 5
    jvp: bool = True
    samples_per_step: int = 4
    pos_buckets: int = 4


@dataclass
class EvalConfig:
    """Held-out evaluation (avg@k, pass@k, maj@k on the task's eval split).

    Attributes:
        eval_every: evaluate every this many steps and after the last one (0 = never).
        eval_problems: eval problems used (the first ones of the eval split).
        eval_k: samples per eval problem (k of pass@k and maj@k).
        eval_temperature: sampling temperature of the eval samples.
    """

    eval_every: int = 0
    eval_problems: int = 32
    eval_k: int = 4
    eval_temperature: float = 1.0


@dataclass
class RunConfig:
    """The run: length, output directory, resume, seed, checkpoints, progress.

    Attributes:
        steps: training steps (each: rollout, rule, PPO epochs, logging).
        out: run directory (metrics.jsonl, samples/, tb/, checkpoints/, config.yaml).
        resume: continue the run in this directory from its last checkpoint (out becomes it).
        seed: seeds data order, sampling, rule noise and the tiny model's weights.
        save_every: checkpoint every this many steps and after the last one (0 = only after the last).
        keep_checkpoints: keep the newest this many checkpoints.
        stop_after: stop after this step as if interrupted (the lr schedule still spans steps).
        threads: torch.set_num_threads (none = leave torch's setting alone).
        progress: auto (a bar on a terminal, log lines otherwise), bar, log or off.
        report_to: where the metrics go besides RUN_DIR/metrics.jsonl (always written): a comma list of
            tensorboard (events in RUN_DIR/tb), wandb, mlflow (accelerate's trackers; the names of TRL's
            report_to), or none. The tracker's package must be installed (pip install wandb).
        tensorboard: false leaves tensorboard out of report_to (--no-tensorboard; older configs).
        overwrite: allow out to be a directory that already holds a run (its files are replaced).
    """

    steps: int = 100
    out: str = "runs/train"
    resume: str | None = None
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    stop_after: int | None = None
    threads: int | None = None
    progress: Literal["auto", "bar", "log", "off"] = "auto"
    report_to: str = "tensorboard"
    tensorboard: bool = True
    overwrite: bool = False


@dataclass
class TrainConfig:
    """Every setting of a training run (see the module docstring)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diag: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def replace(self, **sections: dict[str, Any]) -> TrainConfig:
        """A copy with some fields of some sections changed; ``self`` is unchanged.

        >>> cfg = TrainConfig().replace(optim={"lr": 1e-3}, run={"steps": 2})
        >>> cfg.optim.lr, cfg.run.steps, TrainConfig().run.steps
        (0.001, 2, 100)
        """
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise ConfigError(unknown[0], f"is not a config section; sections: {', '.join(SECTIONS)}")
        new = {name: dataclasses.replace(getattr(self, name), **fields) for name, fields in sections.items()}
        return dataclasses.replace(self, **new)

    @property
    def n_seqs(self) -> int:
        """Sequences per step, P x G."""
        return self.rollout.prompts * self.rollout.group_size

    @property
    def minibatch_size(self) -> int:
        """Sequences per optimizer update."""
        return self.n_seqs // self.optim.minibatches

    def micro_batch_size(self, world: int = 1) -> int:
        """Sequences per forward/backward on one of ``world`` processes (``optim.micro_batch``, 0 = auto)."""
        share = self.minibatch_size // world
        if self.optim.micro_batch:
            return self.optim.micro_batch
        return share if self.model.device.startswith("cuda") else min(AUTO_MICRO_BATCH, share)

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per training step, ppo_epochs x minibatches."""
        return self.optim.ppo_epochs * self.optim.minibatches


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}


def coerce_field(value: Any, tp: Any, where: str) -> Any:
    """``value`` (a file's value, or flag text) as the field type ``tp`` (:func:`theory.spec.coerce`);
    a :class:`ConfigError` naming ``where`` otherwise."""
    try:
        return coerce(value, tp, where)
    except SpecError as err:
        raise ConfigError(err.where, err.message) from None


# --------------------------------------------------------------------------------------------------
# Validation


def _positive(cond: bool, where: str, message: str, value: Any) -> None:
    if not cond:
        raise ConfigError(where, f"{message}, got {value!r}")


def make_stage_detector(spec: str):
    """A :class:`theory.rules.StageDetector` from ``"stage_detector:window=20,ema=0.9"``; None for 'none'."""
    from theory.rules import StageDetector

    where = "rule.stage_detector"
    if spec is None or spec.strip().lower() in ("", "none", "off"):
        return None
    try:
        name, params = parse_spec(spec, where)
        if name != "stage_detector":
            raise ConfigError(where, f"must be 'stage_detector[:key=value,...]' or 'none', got {spec!r}")
        return build(StageDetector, "stage_detector", params)  # the parser make_rule and make_task use
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(where, f": {err}") from None


def make_rule_from_config(spec: str):
    """The configured :mod:`theory.rules` rule, or None for 'none'."""
    from theory.rules import make_rule

    if spec is None or spec.strip().lower() in ("", "none", "off"):
        return None
    try:
        return make_rule(spec)
    except (ValueError, TypeError) as err:
        raise ConfigError("rule.spec", f": {err}") from None


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every cross-field constraint; raise :class:`ConfigError` naming the first bad field.

    Builds (and discards) the rule and stage detector; checks the model and task names without loading
    them. Returns the checked configuration: ``cfg`` itself, or a copy with the short dtype name
    (``bf16``) replaced by the full one; ``cfg`` is never modified.
    """
    from ._validate import check_optim, check_rest, check_rollout
    from .models import resolve_name  # (no torch import)
    from .tasks import TASKS

    if cfg.model.dtype in DTYPE_ALIASES:  # bf16 -> bfloat16 ..., in a copy
        model = dataclasses.replace(cfg.model, dtype=DTYPE_ALIASES[cfg.model.dtype])
        cfg = dataclasses.replace(cfg, model=model)
    m, t = cfg.model, cfg.task
    # model
    try:
        resolve_name(m.name)
    except ValueError as err:
        raise ConfigError("model.name", f": {err}") from None
    _positive(m.dtype in TRAIN_DTYPES, "model.dtype", f"must be one of {', '.join(TRAIN_DTYPES)}", m.dtype)
    _positive(
        bool(re.fullmatch(r"(cpu|cuda|mps)(:\d+)?", m.device)),
        "model.device",
        "must be cpu, cuda, cuda:N or mps",
        m.device,
    )
    _positive(m.chunk_size >= 1, "model.chunk_size", "must be >= 1", m.chunk_size)
    # task
    try:
        task_name = parse_spec(t.spec, "task.spec")[0]
    except SpecError as err:
        raise ConfigError("task.spec", f": {err}") from None
    if task_name not in TASKS:
        raise ConfigError("task.spec", f": unknown task {task_name!r}; known tasks: {', '.join(TASKS)}")
    _positive(_is_number(t.grade_timeout_s) and t.grade_timeout_s > 0, "task.grade_timeout_s",
              "must be a finite number > 0", t.grade_timeout_s)  # fmt: skip
    _positive(t.reward_timeout_s is None or (_is_number(t.reward_timeout_s) and t.reward_timeout_s > 0),
              "task.reward_timeout_s", "must be a finite number > 0 or none", t.reward_timeout_s)  # fmt: skip
    check_rollout(cfg.rollout)
    make_rule_from_config(cfg.rule.spec)
    make_stage_detector(cfg.rule.stage_detector)
    check_optim(cfg)
    check_rest(cfg.diag, cfg.eval, cfg.run)
    return cfg


def validate_distributed(cfg: TrainConfig, world: int) -> TrainConfig:
    """The constraints of a run over ``world`` processes (:mod:`scale.distributed`): every minibatch
    splits into ``world`` equal shares, and each share into micro-batches."""
    mb = cfg.minibatch_size
    if mb % world:
        raise ConfigError(
            "optim.minibatches",
            f": a minibatch of {mb} sequences (rollout.prompts x rollout.group_size / optim.minibatches) "
            f"does not split over {world} processes",
        )
    micro = cfg.optim.micro_batch
    if micro and (mb // world) % micro:
        raise ConfigError(
            "optim.micro_batch",
            f": a process's share of {mb // world} sequences per minibatch does not split into micro-batches "
            f"of {micro}",
        )
    return cfg
