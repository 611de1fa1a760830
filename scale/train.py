r"""GRPO fine-tuning with entropy-dynamics diagnostics: ``entdyn train`` / ``python -m scale.train``.

One step, top to bottom (the numbered sections of :func:`train`):

1. **rollout**: ``P`` training prompts (a seeded permutation per data epoch) x ``G`` samples each, one
   batched KV-cache decode loop that prefills each prompt once and records the behaviour statistics
   while it samples (:mod:`scale.rollout`);
2. **rewards and advantages**: :class:`scale.grading.SafeReward` (a raising reward function gives 0 and
   is counted; ``task.strict_reward`` makes it fatal), then :func:`theory.grpo_advantages` per group;
3. **behaviour statistics**: per response token ``log pi_old``, the entropy ``H``, ``S*`` and
   ``E_p[S]`` of the sampling distribution, from the sampler's logits (``rollout.rescore``: from a
   no-grad forward instead, :mod:`scale.token_stats`, chunked over the vocabulary); with
   ``kl_beta > 0`` also the frozen reference's log-probs;
4. **rule**: a :class:`theory.rules.TokenBatch` of the whole batch goes through the configured rule once;
5. **update**: ``ppo_epochs`` passes over ``minibatches`` minibatches (one AdamW/SGD update each;
   micro-batches accumulate gradients with the minibatch's normaliser; each forward runs a prompt once
   for all its samples, :func:`scale.rollout.forward_hidden`, with activation checkpointing),
   :func:`scale.loss.grpo_loss`
   being the one place the rule output meets the loss; global grad-norm clipping; lr schedule with
   warmup. A non-finite loss or gradient norm stops the run before the update is applied;
6. **diagnostics** (every ``diag_every`` steps): the measured entropy change of the update on the same
   tokens (a float32 no-grad forward before and after it), its tabular (E6) and network-level (JVP)
   first-order predictions;
7. **stage detector**, **eval** (every ``eval_every`` steps), **logging**, **samples**, **checkpoint**
   (:mod:`scale.checkpoint`).

Logged metrics: ``RUN_DIR/metrics.jsonl`` (one JSON object per step), TensorBoard events in
``RUN_DIR/tb`` and ``RUN_DIR/samples/step_XXXXXX.jsonl``; the "Logged metrics" table of
:mod:`scale.metrics_log` defines every key and the samples' schema. Configuration and flags:
:mod:`scale.config` (``entdyn train --help``).

Usage::

    entdyn train --model tiny --steps 2 --out runs/tiny                       # seconds
    entdyn train --model smollm2 --task 'arithmetic:digits=2,ops=2' --rule clip_v \
        --prompts 8 --group-size 4 --max-new-tokens 64 --lr 1e-6 --steps 200 --out runs/smol
    entdyn train --resume runs/smol --steps 300                               # continue, extend
    python -m scale.train --config run.yaml --seed 1                          # file + overrides

What is simplified, and why:

* The rule sees the batch once per step, with the behaviour statistics (``logp = old_logp``); with
  ``ppo_epochs > 1`` verl recomputes e.g. Clip-Cov's selection per micro-batch with the current
  log-probs. One selection per step keeps the rule a pure function of the rollout (what the theory
  and the toy use).
* Minibatches are contiguous slices of the batch (whole prompt groups when the size allows), not
  reshuffled per epoch.
* The model stays in ``eval()`` mode (dropout off). ``log pi_old`` is what the sampler computed, so
  before the first update the ratio is 1 up to the rounding difference between the decode loop and the
  training forward (about 1e-6 in float32, 1e-2 under bfloat16; ``rollout.rescore`` makes it 1 to the
  last bit at the price of one more forward).
* Mixed precision (``model.dtype = bfloat16``) keeps float32 parameters, gradients and AdamW state and
  runs rollout, scoring and training forwards under ``torch.autocast(bfloat16)``; the lm_head statistics
  stay float32 (:mod:`scale.token_stats`), and the diagnostics run in float32.
* No vLLM, no sequence packing: this is a reference trainer for CPUs and GPUs. Several
  processes (``torchrun --nproc_per_node N -m scale.train ...``) train data-parallel
  (:mod:`scale.distributed`): every process samples the whole step's rollout (replicated, so the batch
  is the 1-process batch, with its behaviour statistics), so the rule runs once on the global batch;
  each trains on its ``1/N`` of every minibatch (with ``rollout.rescore`` or the diagnostics it also
  scores its rows and all-gathers them), and gradients are summed over processes with the global
  normaliser; the result equals the 1-process run to rounding (``tests/test_scale_distributed.py``).
  Rank 0 alone writes the run directory. ``model.fsdp`` (or ``accelerate launch --use_fsdp``) shards
  parameters, gradients and optimizer state with FSDP2 instead of replicating them (same results).

Reproducibility: sampling is seeded per step from ``(seed, step)``, the rule's noise and the eval
samples from their own per-step streams (so eval does not move the training stream), and the data
order from ``(seed, data epoch)``; a checkpoint stores the data position and every RNG state. A run
stopped after step ``k`` (``--stop-after k``) and resumed with ``--resume RUN_DIR`` gives the same
parameters and metrics (timings aside) as an uninterrupted run, bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import theory
from theory.rules import TokenBatch

from .checkpoint import (
    capture_rng,
    clean_temp,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .config import (
    ConfigError,
    TrainConfig,
    make_rule_from_config,
    make_stage_detector,
    save_config,
    validate,
    validate_distributed,
)
from .distributed import (
    FSDP_ENV,
    Dist,
    all_reduce_grads,
    all_reduce_sum,
    barrier,
    broadcast_params,
    check_replicated,
    full_model_state,
    full_optimizer_state,
    full_tensor,
    gather_rows,
    gathered,
    is_fsdp,
    run_as_forward,
    setup,
    shard,
)
from .distributed import owned_slices as _owned_slices
from .grading import CorrectnessReward, SafeReward, evaluate_samples
from .loss import grpo_loss, loss_normaliser, slice_rule_output
from .metrics_log import MetricsLogger, truncate_metrics, write_samples
from .rollout import Rollout, decoder_and_head, forward_hidden, sample, score, score_all
from .tasks import format_prompt, make_task
from .token_stats import TokenStats

__all__ = ["RewardFunctionError", "TrainingDiverged", "main", "train"]


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the update was not applied and no checkpoint written."""


class RewardFunctionError(RuntimeError):
    """The reward function raised with ``task.strict_reward`` set."""


# --------------------------------------------------------------------------------------------------
# small helpers


def _seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for ``(run seed, step, stream)``: 0 sampling, 1 rule noise, 2 eval."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> 1)


def _next_prompts(n_train: int, count: int, seed: int, epoch: int, pos: int) -> tuple[list[int], int, int]:
    """The next ``count`` train indices in a seeded permutation per data epoch; new ``(epoch, pos)``."""
    out: list[int] = []
    while len(out) < count:
        perm = np.random.default_rng([seed, epoch]).permutation(n_train)
        take = perm[pos : pos + count - len(out)].tolist()
        out += take
        pos += len(take)
        if pos >= n_train:
            epoch, pos = epoch + 1, 0
    return out, epoch, pos


def _mmean(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``sel`` (NaN when empty); 0-d, no host sync."""
    sel = sel.to(x.dtype)
    return (x * sel).sum() / sel.sum()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kilobytes


def _malloc_trim():
    """glibc's ``malloc_trim(0)`` as a callable, or None (another C library, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def _release_host_memory(device: torch.device) -> None:
    """Hand the heap memory that freed CPU tensors left behind back to the OS (CPU runs, glibc only).

    glibc keeps freed blocks for reuse, so after the rollout and each backward the process holds
    hundreds of MB it no longer uses, and the next phase's peak lands on top of them (BENCHMARKS.md:
    peak RSS of the SmolLM2 step 3.0-3.2 GiB without, 2.9 GiB with). About 3 ms per call.
    """
    if _TRIM is not None and device.type == "cpu":
        _TRIM(0)


def _to_floats(metrics: dict[str, Any]) -> dict[str, float | None]:
    """Tensor values to python floats with one host transfer per device; order kept."""
    values = dict(metrics)
    by_device: dict[torch.device, list[str]] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(k)
    for keys in by_device.values():  # one transfer per device
        stacked = torch.stack([metrics[k].detach().reshape(()).double() for k in keys]).cpu().tolist()
        values.update(zip(keys, stacked, strict=True))
    return {k: (None if v is None else float(v)) for k, v in values.items()}


def _load_model(cfg: TrainConfig):
    from .models import load_model

    m = cfg.model
    if m.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("model.device", f": {m.device!r} requested but CUDA is not available")
    # always float32 parameters: float64 converts below, bfloat16 keeps float32 master weights (_autocast)
    model, tok = load_model(
        m.name, dtype="float32", device=m.device, seed=cfg.run.seed, cache_dir=m.cache_dir
    )
    if m.dtype == "float64":
        model = model.to(torch.float64)
    model.eval()  # dropout off throughout (see the module docstring)
    return model, tok


def _autocast(cfg: TrainConfig, device: torch.device):
    """The forwards' precision context: ``torch.autocast(bfloat16)`` for ``model.dtype = bfloat16`` (the
    parameters, gradients and optimizer state stay float32), else a no-op."""
    if cfg.model.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
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


def _make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
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


def _prepare_run_dir(cfg: TrainConfig, modify: bool = True) -> Path:
    """The run directory, checked; ``modify=False`` (the processes other than rank 0) only checks."""
    run_dir = Path(cfg.run.out)
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
    import shutil

    for p in ("metrics.jsonl", "checkpoints", "samples", "tb"):
        target = run_dir / p
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# --------------------------------------------------------------------------------------------------
# diagnostics: the network-level first-order prediction


def _entropy_sum(ro: Rollout, hidden: torch.Tensor, weight, bias, temperature: float, chunk: int):
    """Sum of ``H`` over the response tokens, chunked over tokens; plain torch ops (forward-mode AD)."""
    cdt = torch.promote_types(hidden.dtype, torch.float32)  # logits in float32 at least, as token_stats
    h, W = hidden[ro.mask].to(cdt), weight.to(cdt)  # (n, D), (V, D)
    total = h.new_zeros(())
    for s in range(0, h.shape[0], chunk):
        z = h[s : s + chunk] @ W.T  # (c, V)
        if bias is not None:
            z = z + bias.to(cdt)
        z = z / temperature
        total = total + theory.entropy_from_logp(theory.log_softmax(z)).sum()
    return total


def _chunks(parts: Sequence[slice], size: int) -> list[slice]:
    """``parts`` cut into consecutive slices of at most ``size`` rows."""
    return [slice(s, min(s + size, p.stop)) for p in parts for s in range(p.start, p.stop, size)]


def _score_rows(model, ro: Rollout, parts: Sequence[slice] | None, dd: Dist, cfg: TrainConfig, **kw):
    """No-grad token statistics of the global batch: :func:`score_all` on one process; with several,
    each scores its ``parts`` and the rows are all-gathered (:func:`scale.distributed.gather_rows`)."""
    batch = cfg.rollout.score_batch
    if not dd.enabled:
        return score_all(model, ro, batch, **kw)
    local = TokenStats.cat([score_all(model, ro.rows(p), batch, **kw) for p in parts])
    return local.map(lambda x: gather_rows(x, dd, ro.n, cfg.optim.minibatches))


#: grpo_loss metrics that are means over the call's kept tokens
_KEPT_MEANS = (
    "clip_frac_low",
    "clip_frac_high",
    "clip_frac_dual",
    "approx_kl",
    "ratio_mean",
    "entropy",
    "ref_kl",
)


def _metric_parts(
    lm: dict[str, torch.Tensor], mask: torch.Tensor, rule_out, r: slice
) -> dict[str, torch.Tensor]:
    """A call's :func:`grpo_loss` metrics as sums: token means times their token counts (kept tokens;
    ``kept_frac``: response tokens); ``policy_loss`` (already over the global normaliser) as is."""
    keep = mask if rule_out is None else mask & rule_out.keep[r]
    n_keep, n_mask = keep.sum(), mask.sum()
    out = {}
    for key, v in lm.items():
        w = n_keep if key in _KEPT_MEANS else n_mask if key == "kept_frac" else None
        out[key] = v if w is None else v * w.to(v.dtype)
    return out


def _reduce_metric_parts(part: dict[str, torch.Tensor], mask: torch.Tensor, mb_out, dd: Dist) -> dict:
    """The minibatch's metrics from every process's :func:`_metric_parts` sums (one all-reduce): token
    means over the minibatch's kept tokens, as one process computes them without micro-batches."""
    keys = sorted(part)
    total = all_reduce_sum(torch.stack([part[k].reshape(()) for k in keys]), dd)
    keep = mask if mb_out is None else mask & mb_out.keep
    n_keep, n_mask = keep.sum().clamp_min(1), mask.sum().clamp_min(1)
    out = {}
    for i, key in enumerate(keys):
        n = n_keep if key in _KEPT_MEANS else n_mask if key == "kept_frac" else None
        out[key] = total[i] if n is None else total[i] / n.to(total.dtype)
    return out


def _entropy_jvp(
    model,
    ro: Rollout,
    theta0: dict[str, torch.Tensor],
    cfg: TrainConfig,
    parts: Sequence[slice] | None = None,
) -> torch.Tensor:
    """``d/de sum_t H_t(theta0 + e * dtheta)`` at ``e = 0`` with ``dtheta = theta - theta0`` (all tokens).

    Runs the decoder functionally (``torch.func.functional_call``) under ``torch.func.jvp``; attention
    uses sdpa's math kernel (the fused CPU kernel has no forward-mode derivative). Batched like the
    scoring passes; the derivative is linear, so the chunks' results add up. ``parts``: only these rows
    (a process's share; the caller sums over processes).
    """
    from torch.func import jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    decoder, weight, bias = decoder_and_head(model)
    names = {id(p): n for n, p in model.named_parameters()}
    prefix = next(n for n, mod in model.named_modules() if mod is decoder) + "."
    w_name, b_name = names[id(weight)], (names.get(id(bias)) if bias is not None else None)
    tangents = {n: (p.detach() - theta0[n]) for n, p in model.named_parameters()}
    tau, chunk = cfg.rollout.temperature, cfg.model.chunk_size

    def f(ps, part: Rollout):
        dec = {k[len(prefix) :]: v for k, v in ps.items() if k.startswith(prefix)}
        hidden = forward_hidden(decoder, part, dec)
        b = ps[b_name] if b_name is not None else bias
        return _entropy_sum(part, hidden, ps[w_name], b, tau, chunk)

    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):  # e.g. flash attention: no forward-mode AD
        model.set_attn_implementation("eager")
    try:
        total = None
        with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            for sl in _chunks(parts if parts is not None else [slice(0, ro.n)], cfg.rollout.score_batch):
                part = ro.rows(sl)
                _, d = jvp(lambda ps, part=part: f(ps, part), (theta0,), (tangents,))
                total = d if total is None else total + d
    finally:
        if impl not in ("sdpa", "eager"):
            model.set_attn_implementation(impl)
    return total


def _train_forward(model, ro: Rollout, **kwargs) -> TokenStats:
    """:func:`score` with gradient, run as the root's forward (FSDP's hooks gather and reduce-scatter
    around it: :func:`scale.distributed.run_as_forward`; a plain call without FSDP)."""
    fn = functools.partial(_score_fields, model, ro, **kwargs)
    return TokenStats(*run_as_forward(model, fn))


def _score_fields(model, ro: Rollout, **kwargs) -> tuple:
    st = score(model, ro, **kwargs)
    if is_fsdp(model):  # FSDP hooks the outputs for its backward: no views (an in-place op drops the hook)
        st = st.map(torch.clone)
    return st.astuple()


# --------------------------------------------------------------------------------------------------
# the training loop


def train(cfg: TrainConfig, *, reward_fn: Callable[[str, Any], float] | None = None) -> dict[str, Any]:
    """Run (or resume) GRPO training as configured; return a summary dict.

    ``reward_fn(completion, problem) -> float`` replaces the configured correctness reward (it is
    wrapped in :class:`scale.grading.SafeReward`). Raises :class:`ConfigError` for a bad
    configuration (before loading the model), :class:`TrainingDiverged` on a non-finite loss or
    gradient norm, :class:`RewardFunctionError` when a strict reward function raises.
    """
    validate(cfg)
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
    run_dir = _prepare_run_dir(cfg, modify=dd.is_main)
    barrier(dd)
    seed, ro_cfg, opt = cfg.run.seed, cfg.rollout, cfg.optim
    P, G, N = ro_cfg.prompts, ro_cfg.group_size, cfg.n_seqs
    tau, chunk = ro_cfg.temperature, cfg.model.chunk_size
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)

    # ---- task, reward, rule ----------------------------------------------------------------------
    try:
        task = make_task(cfg.task.spec, seed)
    except ValueError as err:
        raise ConfigError("task.spec", f": {err}") from None
    if not task.train:
        raise ConfigError("task.spec", f": task {cfg.task.spec!r} has no train problems")
    if cfg.eval.eval_every and not task.eval:
        raise ConfigError("eval.eval_every", f": task {cfg.task.spec!r} has no eval problems (use 0)")
    if reward_fn is None:
        base = CorrectnessReward.pm1 if cfg.task.reward == "pm1" else CorrectnessReward
        reward_fn = base(timeout_s=cfg.task.grade_timeout_s)
    reward = SafeReward(reward_fn, strict=cfg.task.strict_reward)
    correct_value = getattr(reward_fn, "correct", None)
    rule = make_rule_from_config(cfg.rule.spec)
    detector = make_stage_detector(cfg.rule.stage_detector)
    preset = theory.ADVANTAGE_PRESETS[ro_cfg.advantages]

    # ---- model, reference, optimizer, schedule ---------------------------------------------------
    model, tok = _load_model(cfg)
    device = next(model.parameters()).device
    ref = _load_model(cfg)[0].requires_grad_(False) if cfg.loss.kl_beta > 0 else None
    broadcast_params(model, dd)  # replicas start equal (a no-op with one process)
    if ref is not None:
        broadcast_params(ref, dd)
    fsdp = dd.enabled and cfg.model.fsdp
    if fsdp:  # parameters, gradients and optimizer state sharded over the processes (FSDP2)
        shard(model, dd)
        if ref is not None:
            shard(ref, dd)
    # the rows this process scores and trains on: 1/W of every minibatch (all rows with one process)
    own = _owned_slices(N, opt.minibatches, dd.world, dd.rank) if dd.enabled else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    max_norm = opt.max_grad_norm if opt.max_grad_norm is not None else float("inf")

    # ---- state, resume ---------------------------------------------------------------------------
    step, data_epoch, data_pos, errors_total = 0, 0, 0, 0
    stage = detector.init() if detector is not None else None
    rule_state = rule.init_state() if rule is not None else None
    if cfg.run.resume:
        ckpt = latest_checkpoint(run_dir)
        js, ts = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        step, data_epoch, data_pos = js["step"], js["data"]["epoch"], js["data"]["pos"]
        errors_total = js["reward_errors_total"]
        if detector is not None and js.get("stage") is not None:
            st = dict(js["stage"])
            st["history"] = tuple(tuple(h) for h in st["history"])
            stage = type(stage)(**st)
        rule_state = ts.get("rule_state", rule_state)
        restore_rng(js["rng"], ts["rng"])
        if dd.is_main:
            truncate_metrics(run_dir, step)
    last = cfg.run.stop_after or cfg.run.steps
    logger = None
    if dd.is_main:  # rank 0 writes the run directory: config, metrics, samples, checkpoints
        save_config(saved_cfg, run_dir)
        purge = step + 1 if step else None
        logger = MetricsLogger(run_dir, tensorboard=cfg.run.tensorboard, purge_step=purge)
    mode = cfg.run.progress if dd.is_main else "off"
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "log"
    bar = None
    if mode == "bar":
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.run.steps, initial=step, desc="train", file=sys.stderr, dynamic_ncols=True)
    record: dict[str, Any] = {}
    t_run = time.perf_counter()

    try:
        while step < last:
            step += 1
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            m: dict[str, Any] = {}

            # ---- 1. rollout: P prompts x G samples ----------------------------------------------
            idx, data_epoch, data_pos = _next_prompts(len(task.train), P, seed, data_epoch, data_pos)
            problems = [task.train[i] for i in idx]
            torch.manual_seed(_seed(seed, step, 0))
            with _autocast(cfg, device), gathered(model):
                ro = sample(
                    model, tok, [format_prompt(p, tok) for p in problems], group_size=G,
                    max_new_tokens=ro_cfg.max_new_tokens, min_new_tokens=ro_cfg.min_new_tokens,
                    temperature=tau, top_p=ro_cfg.top_p, top_k=ro_cfg.top_k, stats=not ro_cfg.rescore,
                )  # fmt: skip
            mask, T = ro.mask, ro.response.shape[1]  # (N, T)
            _release_host_memory(device)
            _sync(device)
            t_rollout = time.perf_counter()

            # ---- 2. rewards and group advantages -------------------------------------------------
            n_err = reward.n_errors
            try:
                rewards_list = [reward(c, problems[i // G]) for i, c in enumerate(ro.completions)]
            except Exception as err:  # only with strict_reward
                raise RewardFunctionError(f"step {step}: the reward function raised {err!r}") from err
            errors_total += reward.n_errors - n_err
            rewards = torch.tensor(rewards_list, dtype=torch.float32)  # (N,)
            check_replicated(ro.response, dd, f"step {step}: the sampled batch")  # (several processes)
            check_replicated(rewards, dd, f"step {step}: the rewards")
            adv_seq = theory.grpo_advantages(rewards.view(P, G), **preset).reshape(N).to(device)  # (N,)
            adv = torch.where(mask, adv_seq[:, None], 0.0)  # (N, T)
            if correct_value is not None:
                correct = (rewards == float(correct_value)).float()
            else:
                correct = (rewards > 0).float()
            rg = rewards.view(P, G)
            m["reward/mean"], m["reward/std"] = rewards.mean(), rewards.std(correction=0)
            m["accuracy"] = correct.mean()
            m["reward/zero_std_frac"] = (rg.max(1).values == rg.min(1).values).float().mean()
            m["reward/errors"], m["reward/errors_total"] = reward.n_errors - n_err, errors_total
            m["adv/abs_mean"] = adv_seq.abs().mean()

            # ---- 3. behaviour statistics: log pi_old, H, S*, E_p[S] ----------------------------------
            # the sampler's own (every process sampled the whole batch), or with rollout.rescore a no-grad
            # forward (several processes: each scores its rows, then the rows are all-gathered)
            if ro.behaviour is not None:
                old = ro.behaviour
            else:
                with _autocast(cfg, device), gathered(model):
                    old = _score_rows(model, ro, own, dd, cfg, temperature=tau, chunk_size=chunk, s_star=True,
                                      baseline=True)  # fmt: skip
            ref_logp = None
            if ref is not None:
                with _autocast(cfg, device), gathered(ref):
                    ref_logp = _score_rows(ref, ro, own, dd, cfg, temperature=tau, chunk_size=chunk).logp
            dev = old.s_star - old.baseline  # (N, T) S* - E_p[S]
            _sync(device)
            t_score = time.perf_counter()

            # ---- 4. the rule, once on the whole (global) batch; every process runs it identically ----
            rule_out = None
            if rule is not None:
                batch = TokenBatch(
                    logp=old.logp, adv=adv, valid=mask, old_logp=old.logp, entropy=old.entropy,
                    baseline=old.baseline, group=ro.group, step=step,
                    stage=stage.stage if stage is not None else None,
                )  # fmt: skip
                gen = torch.Generator().manual_seed(_seed(seed, step, 1))
                noise = torch.rand((N, T), generator=gen, dtype=old.logp.dtype).to(device)
                rule_out = rule(batch, noise=noise, state=rule_state)
                rule_state = rule_out.state
            adv_eff = rule_out.adv if rule_out is not None else adv
            entropy_grad = rule_out is not None and rule_out.entropy_coef is not None

            # ---- 5. PPO epochs over minibatches ---------------------------------------------------
            diag = cfg.diag.diag_every > 0 and step % cfg.diag.diag_every == 0
            t_diag = 0.0
            if diag:  # the statistics before the update, in float32, by the same forward as after it
                td = time.perf_counter()
                with gathered(model):  # (under FSDP the parameters are the full tensors in here)
                    before = _score_rows(model, ro, own, dd, cfg, temperature=tau, chunk_size=chunk,
                                         s_star=True, baseline=True)  # fmt: skip
                    if cfg.diag.jvp:
                        theta0 = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}
                alpha = torch.zeros_like(old.logp)  # (N, T) summed SGD-equivalent logit step sizes
                t_diag += time.perf_counter() - td
            mb = cfg.minibatch_size
            micro = cfg.micro_batch_size(dd.world)  # sequences per forward on this process
            sums: dict[str, torch.Tensor] = {}
            n_updates, losses, norms = 0, [], []
            for epoch in range(opt.ppo_epochs):
                for k in range(opt.minibatches):
                    rows = slice(k * mb, (k + 1) * mb)
                    mb_out = slice_rule_output(rule_out, rows) if rule_out is not None else None
                    norm = loss_normaliser(mask[rows], cfg.loss, mb_out)  # global: micro-batches, processes
                    loss_sum, grads, part = torch.zeros((), device=device), [], {}
                    mine = own[k] if own is not None else rows
                    for s in range(mine.start, mine.stop, micro):
                        r = slice(s, min(s + micro, mine.stop))
                        with _autocast(cfg, device):  # FSDP: as the root's forward (its hooks gather)
                            st = _train_forward(model, ro.rows(r), temperature=tau, chunk_size=chunk,
                                                entropy_grad=entropy_grad,
                                                checkpoint=opt.grad_checkpointing)  # fmt: skip
                        if diag:
                            st.logp.retain_grad()
                        loss, lm = grpo_loss(
                            st.logp, old.logp[r], adv[r], mask[r], config=cfg.loss,
                            ref_logp=None if ref_logp is None else ref_logp[r], entropy=st.entropy,
                            rule_output=None if rule_out is None else slice_rule_output(rule_out, r),
                            normaliser=norm,
                        )  # fmt: skip
                        loss.backward()
                        _release_host_memory(device)
                        if diag:
                            grads.append((r, st.logp.grad.detach()))
                        loss_sum = loss_sum + loss.detach()
                        # token-weighted partial sums, reduced per minibatch below
                        for key, v in _metric_parts(lm, mask[r], rule_out, r).items():
                            part[key] = part[key] + v if key in part else v
                    # the minibatch's metrics over all its tokens (every process's, every micro-batch's)
                    for key, v in _reduce_metric_parts(part, mask[rows], mb_out, dd).items():
                        sums[key] = sums[key] + v if key in sums else v
                    n_updates += 1
                    if not fsdp:  # (FSDP's reduce-scatter has summed the gradient shards in the backward)
                        all_reduce_grads(params, dd)  # sum over processes = the 1-process gradient
                    loss_sum = all_reduce_sum(loss_sum, dd)
                    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
                    if not bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm)):  # one sync per update
                        good = latest_checkpoint(run_dir)
                        raise TrainingDiverged(
                            f"step {step}: non-finite loss ({loss_sum.item()}) or gradient norm "
                            f"({grad_norm.item()}) in PPO epoch {epoch + 1}, minibatch {k + 1}; stopped "
                            f"before applying it, no checkpoint written (last good checkpoint: "
                            f"{good if good is not None else 'none'})"
                        )
                    lr_now = optimizer.param_groups[0]["lr"]
                    if diag:  # alpha_t = -lr * clip factor * dL/dlog p_t (plain-SGD logit step, E5)
                        clip = (max_norm / (grad_norm + 1e-6)).clamp(max=1.0)
                        for r, g in grads:
                            alpha[r] -= lr_now * clip * g
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    _release_host_memory(device)
                    losses.append(loss_sum)
                    norms.append(grad_norm)
            if dd.enabled and diag:
                alpha = all_reduce_sum(alpha, dd)  # each process filled its own rows, zeros elsewhere
            norms_t = torch.stack(norms)
            m["loss/total"] = torch.stack(losses).mean()
            m["loss/policy"] = sums["policy_loss"] / n_updates
            m["loss/kept_frac"] = sums["kept_frac"] / n_updates
            m["clip/low_frac"] = sums["clip_frac_low"] / n_updates
            m["clip/high_frac"] = sums["clip_frac_high"] / n_updates
            m["clip/dual_frac"] = sums["clip_frac_dual"] / n_updates
            m["ratio/mean"] = sums["ratio_mean"] / n_updates
            m["kl/approx"] = sums["approx_kl"] / n_updates
            if "ref_kl" in sums:
                m["kl/ref"] = sums["ref_kl"] / n_updates
            m["grad_norm"], m["grad_norm/max"] = norms_t.mean(), norms_t.max()
            m["lr"] = lr_now
            _sync(device)
            t_train = time.perf_counter()

            # ---- 6. theory diagnostics: measured vs predicted entropy change -----------------------
            n_tok = mask.sum().to(old.entropy.dtype)
            if diag:
                td = time.perf_counter()
                with gathered(model):  # one gather for the after-update scoring and the JVP
                    after = _score_rows(model, ro, own, dd, cfg, temperature=tau, chunk_size=chunk)
                    d_jvp = _entropy_jvp(model, ro, theta0, cfg, own) if cfg.diag.jvp else None
                # per-token differences summed (not a difference of two sums: no cancellation)
                m["theory/dH_measured"] = (after.entropy - before.entropy).sum() / n_tok
                dev0 = before.s_star - before.baseline
                dh_tab = torch.where(mask, -alpha * dev0, 0.0)  # (N, T) (E6) per token
                m["theory/dH_tabular"] = dh_tab.sum() / n_tok
                quad = theory.quadrant(adv_eff, dev0)
                for q, name in enumerate(theory.QUADRANTS):
                    m[f"theory/dH_tabular/{name}"] = torch.where(quad == q, dh_tab, 0.0).sum() / n_tok
                if cfg.diag.jvp:
                    m["theory/dH_jvp"] = all_reduce_sum(d_jvp, dd) / n_tok
                    del theta0
                del before, after
                _sync(device)
                t_diag += time.perf_counter() - td

            # ---- 7. entropy statistics of the batch (before the update) ----------------------------
            H = old.entropy
            m["entropy"] = H.sum() / n_tok
            m["entropy/pos"] = _mmean(H, mask & (adv_seq[:, None] > 0))
            m["entropy/neg"] = _mmean(H, mask & (adv_seq[:, None] < 0))
            lengths = mask.sum(-1, keepdim=True)  # (N, 1)
            K = cfg.diag.pos_buckets
            rel = torch.arange(T, device=device)[None, :] / lengths.clamp_min(1)  # (N, T) in [0, 1)
            bucket = (rel * K).floor().long().clamp(max=K - 1)
            for i in range(K):
                m[f"entropy/pos_bucket_{i}"] = _mmean(H, mask & (bucket == i))
            m["logp/mean"] = old.logp.sum() / n_tok
            s_mean = old.s_star.sum() / n_tok
            m["s_star/mean"] = s_mean
            m["s_star/std"] = (_mmean((old.s_star - s_mean) ** 2, mask)).sqrt()
            m["baseline/mean"] = old.baseline.sum() / n_tok
            dev_mean = dev.sum() / n_tok
            m["deviation/mean"] = dev_mean
            m["theory/cor35_ratio"] = s_mean.abs() / dev_mean.abs()
            quad = theory.quadrant(adv_eff, dev)  # (N, T) codes, -1 = no first-order effect
            for q, name in enumerate(theory.QUADRANTS):
                m[f"quad/{name}_frac"] = _mmean((quad == q).to(H.dtype), mask)
            if rule_out is not None:
                for key, v in rule_out.metrics.items():
                    m[f"rule/{key}"] = v
            len_f = lengths[:, 0].float()
            m["len/mean"], m["len/min"], m["len/max"] = len_f.mean(), len_f.min(), len_f.max()
            m["len/truncated_frac"] = ro.truncated.float().mean()

            # ---- 8. stage detector -----------------------------------------------------------------
            floats = _to_floats(m)  # the one host transfer of the step's metrics
            if detector is not None:
                stage = detector.update(stage, floats["entropy"], floats["accuracy"])
                floats["stage/plateau"] = float(stage.stage == "plateau")
                floats["stage/plateau_step"] = stage.plateau_step

            # ---- 9. held-out evaluation ------------------------------------------------------------
            t_eval = time.perf_counter()
            ev = cfg.eval
            # rank 0 evaluates; with FSDP every process runs the (collective) gathered forwards
            evaluate = ev.eval_every and (step % ev.eval_every == 0 or step == cfg.run.steps)
            if evaluate and (dd.is_main or fsdp):
                with gathered(model):
                    res = _evaluate(model, tok, task.eval[: ev.eval_problems], cfg, step)
                if dd.is_main:
                    floats.update(res)
            t_end = time.perf_counter()

            # ---- 10. log, samples, checkpoint ------------------------------------------------------
            step_s = t_end - t0
            floats["time/step_s"] = step_s
            floats["time/rollout_s"] = t_rollout - t0
            floats["time/score_s"] = t_score - t_rollout
            floats["time/train_s"] = t_train - t_score
            floats["time/diag_s"] = t_diag
            floats["time/eval_s"] = t_end - t_eval
            floats["tokens_per_s"] = float(n_tok) / step_s
            floats["mem/peak_gb"] = _peak_memory_gb(device)
            save = (cfg.run.save_every and step % cfg.run.save_every == 0) or step == last
            full_states = {}
            if save and fsdp:  # full tensors gathered by every process, written by rank 0
                full_states = {"model_state": full_model_state(model),
                               "optimizer_state": full_optimizer_state(model, optimizer)}  # fmt: skip
            if not dd.is_main:  # the other processes write nothing
                record = floats
                continue
            record = logger.log(step, floats)
            if cfg.diag.samples_per_step:
                write_samples(run_dir, step, _sample_records(ro, tok, old, dev, quad, adv_seq, rewards_list,
                                                             problems, step, cfg))  # fmt: skip
            if save:
                rng_json, rng_tensors = capture_rng()
                save_checkpoint(
                    run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                    keep=cfg.run.keep_checkpoints,
                    trainer_state={
                        "data": {"epoch": data_epoch, "pos": data_pos},
                        "reward_errors_total": errors_total,
                        "stage": None if stage is None else dataclasses.asdict(stage),
                        "rng": rng_json,
                    },
                    tensor_state={"rng": rng_tensors, "rule_state": rule_state}, **full_states,
                )  # fmt: skip
            _progress(bar, mode, step, cfg.run.steps, record)
    finally:
        if logger is not None:
            logger.close()
        if bar is not None:
            bar.close()
    barrier(dd)  # rank 0's last checkpoint is complete when any process returns
    return {"run_dir": str(run_dir), "step": step, "wall_s": time.perf_counter() - t_run, "last": record}


def _progress(bar, mode: str, step: int, steps: int, rec: dict[str, Any]) -> None:
    def f(key: str, fmt: str = ".3f") -> str:
        v = rec.get(key)
        return "-" if v is None else format(v, fmt)

    if bar is not None:
        bar.set_postfix_str(
            f"reward {f('reward/mean')} acc {f('accuracy')} H {f('entropy')} loss {f('loss/total', '.4f')} "
            f"{f('time/step_s', '.2f')}s",
            refresh=False,
        )
        bar.update(1)
    elif mode == "log":
        dh = f" dH {f('theory/dH_measured', '.2e')}" if rec.get("theory/dH_measured") is not None else ""
        print(
            f"step {step}/{steps} reward {f('reward/mean')} acc {f('accuracy')} entropy {f('entropy')} "
            f"loss {f('loss/total', '.4f')} grad_norm {f('grad_norm')}{dh} {f('time/step_s', '.2f')}s",
            file=sys.stderr,
            flush=True,
        )


def _evaluate(model, tok, problems: Sequence, cfg: TrainConfig, step: int) -> dict[str, float]:
    """avg@k / pass@k / maj@k on ``problems`` (k = ``eval.eval_k``), sampled on a private RNG stream."""
    ev, ro_cfg = cfg.eval, cfg.rollout
    device = next(model.parameters()).device
    k = ev.eval_k
    per_call = max(1, ro_cfg.score_batch // k)
    completions: list[list[str]] = []
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_seed(cfg.run.seed, step, 2))
        for s in range(0, len(problems), per_call):
            chunk = problems[s : s + per_call]
            with _autocast(cfg, device):
                ro = sample(
                    model, tok, [format_prompt(p, tok) for p in chunk], group_size=k,
                    max_new_tokens=ro_cfg.max_new_tokens, temperature=ev.eval_temperature,
                    top_p=ro_cfg.top_p, top_k=ro_cfg.top_k, stats=False,
                )  # fmt: skip
            completions += [ro.completions[i * k : (i + 1) * k] for i in range(len(chunk))]
    res = evaluate_samples(problems, completions, ks=sorted({1, k}), timeout_s=cfg.task.grade_timeout_s)
    return {f"eval/{key}": value for key, value in res.as_dict().items()}


def _sample_records(ro, tok, old, dev, quad, adv_seq, rewards, problems, step, cfg) -> list[dict[str, Any]]:
    """The logged completions of a step (schema in :mod:`scale.metrics_log`): the first sample of the
    first prompts, then second samples, ..."""
    G, P = cfg.rollout.group_size, cfg.rollout.prompts
    count = min(cfg.diag.samples_per_step, ro.n)
    rows = [(i % P) * G + i // P for i in range(count)]
    sel = torch.tensor(rows, device=ro.mask.device)
    mask = ro.mask[sel].cpu()
    cols = {
        "response": ro.response[sel].cpu(), "entropy": old.entropy[sel].cpu(),
        "s_star": old.s_star[sel].cpu(), "deviation": dev[sel].cpu(), "quadrant": quad[sel].cpu(),
        "logp": old.logp[sel].cpu(),
    }  # fmt: skip
    adv = adv_seq[sel].cpu().tolist()
    out = []
    for j, row in enumerate(rows):
        keep = mask[j]
        ids = cols["response"][j][keep].tolist()
        out.append(
            {
                "step": step,
                "prompt": ro.prompts[row],
                "completion": ro.completions[row],
                "tokens": [tok.decode([i]) for i in ids],
                "entropy": cols["entropy"][j][keep].tolist(),
                "s_star": cols["s_star"][j][keep].tolist(),
                "deviation": cols["deviation"][j][keep].tolist(),
                "quadrant": cols["quadrant"][j][keep].tolist(),
                "advantage": adv[j],
                "reward": rewards[row],
                "logp": cols["logp"][j][keep].tolist(),
                "answer": problems[row // G].answer,
                "truncated": bool(ro.truncated[row]),
            }
        )
    return out


# --------------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    """``entdyn train [flags]``; returns the exit status (2: bad configuration, 1: the run failed)."""
    import torch.distributed as dist

    from .config import parse_args

    try:
        cfg = parse_args(argv)
        summary = train(cfg)
    except ConfigError as err:
        print(f"entdyn train: error: {err}", file=sys.stderr)
        return 2
    except (TrainingDiverged, RewardFunctionError) as err:
        print(f"entdyn train: {err}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():  # started by train() from torchrun's environment
            dist.destroy_process_group()
    if dist.is_available() and int(os.environ.get("RANK", "0")) != 0:
        return 0  # the other processes print nothing
    rec = summary["last"]
    print(
        f"done: {summary['step']} steps in {summary['wall_s']:.1f} s, run directory {summary['run_dir']} "
        f"(last reward {rec.get('reward/mean')}, entropy {rec.get('entropy')})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
