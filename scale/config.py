r"""Configuration of the GRPO trainer (:mod:`scale.train`): typed, documented dataclasses.

One :class:`TrainConfig` holds a section per concern::

    model     ModelConfig        which model, dtype, device, lm_head chunking
    task      TaskConfig         the verifiable task (a scale.tasks spec) and its reward
    rollout   RolloutConfig      P prompts x G samples, sampling parameters, advantages
    rule      RuleConfig         the theory.rules spec applied to every batch, the stage detector
    loss      scale.loss.LossConfig  clipping, dual clip, aggregation, k3 KL (reused as is)
    optim     OptimConfig        AdamW / SGD, lr schedule, PPO epochs, minibatches, micro-batches
    diag      DiagnosticsConfig  theory diagnostics (measured vs predicted entropy change), samples
    eval      EvalConfig         held-out avg@k / pass@k / maj@k
    run       RunConfig          steps, output directory, resume, seed, checkpoints, threads

Every field is documented in its class's ``Attributes:`` section; :func:`build_parser` turns those
texts into ``--help`` (one flag per field, ``--model``, ``--task``, ``--rule``, ``--lr`` ...), so the
documentation has one source.

**Where values come from**, later wins: the dataclass defaults; with ``--resume RUN_DIR`` the run's
saved ``RUN_DIR/config.yaml``; a ``--config FILE`` (YAML or JSON, nested by section, e.g.
``{"rollout": {"prompts": 8, "group_size": 4}, "optim": {"lr": 1e-5}}``); then the flags given on
the command line. The resolved configuration is written to ``RUN_DIR/config.yaml`` (JSON,
``config.json``, when PyYAML is missing) and is what ``--resume`` reads back.

**Validation** (:func:`validate`) runs before anything heavy is loaded and raises
:class:`ConfigError` (a ``ValueError``) whose message starts with the dotted field name, e.g.
``rollout.group_size must be >= 2 ...`` or ``optim.minibatches: 30 sequences per step ... do not split
into 4 minibatches``. Unknown rule, task and model names are reported the same way (``rule.spec: unknown
rule 'foo'; registered: ...``).

This module is cheap to import apart from :class:`scale.loss.LossConfig`, which imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .loss import LossConfig

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
    "build_parser",
    "config_from_dict",
    "config_to_dict",
    "load_config_file",
    "parse_args",
    "save_config",
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
    """An invalid configuration value; ``field`` is the dotted name (``"rollout.group_size"``)."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name} {message}" if not message.startswith(":") else field_name + message)


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
    """

    spec: str = field(default="arithmetic:digits=1,ops=2,n_train=200,n_eval=50", metadata={"flag": "task"})
    reward: Literal["correctness", "pm1"] = "correctness"
    strict_reward: bool = False
    grade_timeout_s: float = 2.0


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
        tensorboard: also write TensorBoard events to RUN_DIR/tb (skipped if tensorboard is missing).
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


# --------------------------------------------------------------------------------------------------
# Field documentation and types


def field_docs(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` section of a dataclass docstring (Google style)."""
    doc = cls.__doc__ or ""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return out
    indent, current = None, None
    for line in lines[start + 1 :]:
        if not line.strip():
            current = None
            continue
        ind = len(line) - len(line.lstrip())
        m = re.match(r"(\w+):\s*(.*)$", line.strip())
        if indent is None and m:
            indent = ind
        if indent is not None and ind < indent:
            break
        if m and ind == indent:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current is not None:
            out[current] += " " + line.strip()
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp, where: str) -> Any:
    """``value`` (from a file, or a CLI string) as type ``tp``; ConfigError naming ``where`` otherwise."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(where, f"must not be none (expected {getattr(base, '__name__', base)})")
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ConfigError(where, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise ConfigError(where, f"expects true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(where, f"expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(where, f"expects an integer, got {value!r}")
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(where, f"expects a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(where, f"expects a number, got {value!r}")
    if base is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(where, f"expects a string, got {value!r}")
    return value  # pragma: no cover - every field type is handled above


# --------------------------------------------------------------------------------------------------
# dict <-> config, files


def config_to_dict(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The configuration as a nested plain dict (section -> field -> value)."""
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def _make_section(cls: type, values: dict[str, Any], where: str):
    try:
        return cls(**values)
    except ValueError as err:  # LossConfig validates in __post_init__
        msg = str(err)
        m = re.match(r"(\w+) (.*)", msg, re.S)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            raise ConfigError(f"{where}.{m.group(1)}", m.group(2)) from None
        raise ConfigError(where, f": {msg}") from None


def config_from_dict(data: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a nested dict, on top of ``base`` (default: the defaults).

    Unknown sections or fields raise :class:`ConfigError` naming them; values are converted to each
    field's type (``"1e-5"`` -> float, ``"none"`` -> None for optional fields).
    """
    if not isinstance(data, dict):
        raise ConfigError("config", f": expected a mapping of sections, got {type(data).__name__}")
    base = TrainConfig() if base is None else base
    out = {}
    for name, cls in SECTIONS.items():
        current = dataclasses.asdict(getattr(base, name))
        given = data.get(name) or {}
        if not isinstance(given, dict):
            raise ConfigError(name, f"must be a mapping of fields, got {given!r}")
        hints = _hints(cls)
        for key, value in given.items():
            if key not in current:
                raise ConfigError(f"{name}.{key}", f"is not a field of {name}; fields: {', '.join(current)}")
            current[key] = _coerce(value, hints[key], f"{name}.{key}")
        out[name] = _make_section(cls, current, name)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(unknown[0], f"is not a config section; sections: {', '.join(SECTIONS)}")
    return TrainConfig(**out)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", f": file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    return data or {}


def save_config(cfg: TrainConfig, run_dir: str | Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (``config.json`` without PyYAML)."""
    run_dir = Path(run_dir)
    data = config_to_dict(cfg)
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with transformers
        path = run_dir / "config.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def saved_config_path(run_dir: str | Path) -> Path:
    """``run_dir/config.yaml`` or ``run_dir/config.json``, whichever exists."""
    for name in ("config.yaml", "config.json"):
        p = Path(run_dir) / name
        if p.is_file():
            return p
    raise ConfigError(
        "run.resume", f": {str(run_dir)!r} has no config.yaml or config.json (not a run directory)"
    )


# --------------------------------------------------------------------------------------------------
# Validation


def _positive(cond: bool, where: str, message: str, value: Any) -> None:
    if not cond:
        raise ConfigError(where, f"{message}, got {value!r}")


def parse_spec_params(spec: str, where: str) -> tuple[str, dict[str, str]]:
    """``"name:key=value,key=value"`` -> ``(name, {key: value})`` (the scale.tasks / rules format)."""
    name, _, rest = spec.strip().partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (t.strip() for t in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(where, f": expected key=value, got {item!r}")
        params[key.strip()] = value.strip()
    return name.strip().lower().replace("-", "_"), params


def make_stage_detector(spec: str):
    """A :class:`theory.rules.StageDetector` from ``"stage_detector:window=20,ema=0.9"``; None for 'none'."""
    from theory.rules import StageDetector

    where = "rule.stage_detector"
    if spec is None or spec.strip().lower() in ("", "none", "off"):
        return None
    name, params = parse_spec_params(spec, where)
    if name != "stage_detector":
        raise ConfigError(where, f"must be 'stage_detector[:key=value,...]' or 'none', got {spec!r}")
    fields_ = {f.name: f for f in dataclasses.fields(StageDetector)}
    hints = _hints(StageDetector)
    kwargs = {}
    for key, value in params.items():
        if key not in fields_:
            raise ConfigError(where, f": unknown parameter {key!r}; parameters: {', '.join(fields_)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return StageDetector(**kwargs)
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
    them. Returns ``cfg``.
    """
    from theory import ADVANTAGE_PRESETS

    from .models import resolve_name
    from .tasks import TASKS

    m, t, r, o, d, e, run = cfg.model, cfg.task, cfg.rollout, cfg.optim, cfg.diag, cfg.eval, cfg.run
    # model
    m.dtype = DTYPE_ALIASES.get(m.dtype, m.dtype)  # bf16 -> bfloat16 ...
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
    task_name = t.spec.strip().partition(":")[0].strip().lower().replace("-", "_")
    if task_name not in TASKS:
        raise ConfigError("task.spec", f": unknown task {task_name!r}; known tasks: {', '.join(TASKS)}")
    _positive(t.grade_timeout_s > 0, "task.grade_timeout_s", "must be > 0", t.grade_timeout_s)
    # rollout
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
    # rule
    make_rule_from_config(cfg.rule.spec)
    make_stage_detector(cfg.rule.stage_detector)
    # optim
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
    # diagnostics, eval
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


# --------------------------------------------------------------------------------------------------
# Command line


def _flag(section: str, f: dataclasses.Field) -> str:
    return f.metadata.get("flag", f.name).replace("_", "-")


def _iter_fields():
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            yield section, cls, f, hints[f.name], docs.get(f.name, "")


def _fmt_default(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def build_parser(prog: str = "entdyn train") -> argparse.ArgumentParser:
    """The ``entdyn train`` parser: ``--config``, and one flag per config field (help = its docs).

    Flags not given on the command line are absent from the parsed namespace (``SUPPRESS``), so a
    config file or a resumed run's saved config is only overridden by what the user typed.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "GRPO fine-tuning of a causal LM on a verifiable task with a theory.rules entropy-control rule, "
            "logging the entropy dynamics (measured vs predicted entropy change per update). "
            "Precedence: defaults < --resume RUN_DIR's saved config < --config FILE < flags."
        ),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON config file, nested by section")
    seen: dict[str, str] = {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = TrainConfig()
    for section, cls, f, tp, doc in _iter_fields():
        flag = _flag(section, f)
        if flag in seen:  # pragma: no cover - guarded by a test
            raise RuntimeError(f"flag --{flag} of {section}.{f.name} clashes with {seen[flag]}")
        seen[flag] = f"{section}.{f.name}"
        group = groups.get(section)
        if group is None:
            group = groups[section] = parser.add_argument_group(
                section, (cls.__doc__ or "").strip().splitlines()[0]
            )
        default = getattr(getattr(defaults, section), f.name)
        base, optional = _unwrap_optional(tp)
        where = f"{section}.{f.name}"
        help_text = f"{doc} [{where}; default: {_fmt_default(default)}]".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": where, "help": help_text}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is Literal:
            kwargs["choices"] = list(typing.get_args(base))
        else:
            kwargs["type"] = _cli_type(tp, where)
            kwargs["metavar"] = {int: "N", float: "X"}.get(base, "TEXT")
        group.add_argument(f"--{flag}", **kwargs)
    return parser


def _cli_type(tp, where: str):
    def convert(text: str):
        try:
            return _coerce(text, tp, where)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(_unwrap_optional(tp)[0], "__name__", "value")
    return convert


def parse_args(argv: Sequence[str] | None = None, *, validate_config: bool = True) -> TrainConfig:
    """Resolve a :class:`TrainConfig` from command-line arguments (see the module docstring).

    ``--resume RUN_DIR`` loads ``RUN_DIR/config.yaml`` as the base and sets ``run.out`` to ``RUN_DIR``
    (a different ``--out`` is an error).
    """
    args = vars(build_parser().parse_args(argv))
    return resolve(args, validate_config=validate_config)


def resolve(args: dict[str, Any], *, validate_config: bool = True) -> TrainConfig:
    """Merge ``{"section.field": value}`` overrides (and ``config``: a file) as :func:`parse_args` does."""
    args = dict(args)
    config_file = args.pop("config", None)
    base = TrainConfig()
    resume = args.get("run.resume")
    if resume:
        base = config_from_dict(load_config_file(saved_config_path(resume)))
    if config_file:
        base = config_from_dict(load_config_file(config_file), base)
    nested: dict[str, dict[str, Any]] = {}
    for key, value in args.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    cfg = config_from_dict(nested, base)
    if resume:
        out = args.get("run.out")
        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise ConfigError("run.out", f": --resume continues the run in {resume!r}; --out {out!r} differs")
        cfg.run.out = str(resume)
        cfg.run.resume = str(resume)
        if "run.stop_after" not in args:  # the interrupted run's stop point does not carry over
            cfg.run.stop_after = None
    return validate(cfg) if validate_config else cfg
