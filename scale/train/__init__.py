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

Where each phase lives: :mod:`scale.train.loop` (:func:`train`, :func:`~scale.train.loop.train_step`
and phases 1-4 and 8-10, each one function), :mod:`scale.train.update` (5), :mod:`scale.train.diagnostics`
(6-7, on :mod:`theory.diagnostics`), :mod:`scale.train.setup` (the run's pieces, resume, checkpoints) and
:mod:`scale.train.runtime` (errors, seeds, precision, memory).

Logged metrics: ``RUN_DIR/metrics.jsonl`` (one JSON object per step), TensorBoard events in
``RUN_DIR/tb`` and ``RUN_DIR/samples/step_XXXXXX.jsonl``; the "Logged metrics" table of
:mod:`scale.metrics_log` defines every key and the samples' schema. Configuration and flags:
:mod:`scale.config` and :mod:`scale.flags` (``entdyn train --help``).

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

from .loop import StepBatch, main, run_cli, train, train_step
from .runtime import RewardFunctionError, TrainingDiverged

__all__ = ["RewardFunctionError", "StepBatch", "TrainingDiverged", "main", "run_cli", "train", "train_step"]
