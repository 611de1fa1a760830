r"""What the trainer writes per step: ``metrics.jsonl``, TensorBoard events, ``samples/step_XXXXXX.jsonl``.

Files in ``RUN_DIR`` (``entdyn plot`` reads exactly these; key names are stable):

* ``metrics.jsonl``: one JSON object per training step, ``{"step": s, "<key>": float | null, ...}``,
  keys flat and slash-grouped; ``null`` means not computed that step (e.g. ``eval/*`` between
  evaluations). A mean over an empty set of tokens is 0 (:mod:`theory.diagnostics`, as the rules and
  the toy report it): ``entropy/neg`` is 0 when no sample had a negative advantage, which
  ``adv/neg_frac = 0`` tells apart (``entdyn plot`` leaves such steps out). Steps count from 1; step
  ``s`` is the ``s``-th update.
* ``tb/``: the same scalars as TensorBoard events (skipped when tensorboard cannot be imported).
* ``samples/step_XXXXXX.jsonl``: a few completions of the step, one JSON object per line (below).
* ``config.yaml``: the resolved configuration (:mod:`scale.config`); ``checkpoints/``
  (:mod:`scale.checkpoint`).

Logged metrics
--------------

Notation: ``N = P x G`` sequences; "tokens" are the response tokens that count (up to and including
the first eos); token means are over all of them in the step's batch. Statistics marked *before* are
taken under the behaviour policy (the parameters before this step's update) at the sampling
temperature; ``A`` is the sequence's GRPO advantage (:func:`theory.grpo_advantages`, preset
``rollout.advantages``); ``A_eff`` is the advantage the loss used (the rule's, else ``A``).

=================================  ======================================================================
key                                meaning
=================================  ======================================================================
``reward/mean``, ``reward/std``    mean and population std of the ``N`` rewards
``accuracy``                       fraction of samples graded correct (reward == the reward's
                                   ``correct`` value; custom reward functions: reward > 0)
``reward/zero_std_frac``           fraction of prompts whose ``G`` rewards are all equal (``A = 0``)
``reward/errors``                  reward-function errors this step (each became reward 0)
``reward/errors_total``            reward-function errors since the run started
``adv/abs_mean``                   mean ``|A|`` over sequences
``entropy``                        *before*: mean token entropy ``H`` of the full next-token distribution
``entropy/pos``, ``entropy/neg``   the same over tokens of samples with ``A > 0`` / ``A < 0`` (0 if none)
``adv/pos_frac``, ``adv/neg_frac`` fraction of tokens of samples with ``A > 0`` / ``A < 0``
``entropy/pos_bucket_<i>``         the same over tokens at relative position ``t/|o| in [i/K, (i+1)/K)``
                                   (``K = diag.pos_buckets``, ``t`` from 0; 0 if no token)
``logp/mean``                      *before*: mean log-prob of the sampled tokens
``s_star/mean``, ``s_star/std``    *before*: token mean and std of ``S* = p_k (H + log p_k)`` (E2)
``baseline/mean``                  *before*: token mean of ``E_p[S]`` (E7)
``deviation/mean``                 *before*: token mean of ``S* - E_p[S]`` (Cor 3.4: ~0 on-policy at T=1)
``nonfinite_frac``                 *before*: fraction of response tokens with a non-finite input (left out)
``theory/cor35_ratio``             ``|mean S*| / |mean (S* - E_p[S])|`` (Cor 3.5; large = S* alone is a
                                   biased predictor of the entropy change)
``quad/<q>_frac``                  fraction of tokens in quadrant ``q`` of sign(``A_eff``) x
                                   sign(``S* - E_p[S]``): ``pos_high``, ``pos_low``, ``neg_high``,
                                   ``neg_low`` (the rest have ``A_eff = 0``)
``rule/<name>``                    the rule's metrics (fractions in [0, 1]; composed rules are
                                   ``rule/<rule>/<name>``)
``loss/total``                     the loss, mean over the step's optimizer updates
``loss/policy``                    its clipped-surrogate part (the minibatch's, over all its
                                   micro-batches and processes; mean over updates)
``loss/kept_frac``                 tokens the rule kept / tokens (per minibatch; mean over updates)
``clip/low_frac``, ``clip/high_frac``, ``clip/dual_frac``
                                   fraction of kept tokens whose PPO ratio was clipped (A < 0 below
                                   ``1 - clip_low``; A > 0 above ``1 + clip_high``; dual clip), per
                                   minibatch, mean over updates; ~0 with one epoch and one minibatch
                                   (ratio 1 up to the sampler-vs-training-forward rounding, exactly 1
                                   with ``rollout.rescore``)
``ratio/mean``                     mean ratio ``pi / pi_old`` over kept tokens (per minibatch; mean
                                   over updates)
``kl/approx``                      mean k3 estimate of ``KL(pi_old || pi)`` over kept tokens
``kl/ref``                         mean k3 estimate of ``KL(pi || pi_ref)`` (only when ``kl_beta > 0``)
``grad_norm``, ``grad_norm/max``   global gradient norm before clipping: mean and max over updates
``lr``                             learning rate of the step's last update
``len/mean``, ``len/min``, ``len/max``
                                   response lengths in tokens (including the eos)
``len/truncated_frac``             fraction of responses that hit ``max_new_tokens`` without an eos
``stage/plateau``                  1 once the stage detector has declared the plateau, else 0
``stage/plateau_step``             the step it did so (null before)
``theory/dH_measured``             (diagnostic steps) mean over tokens of ``H_after - H_before``, both
                                   from a float32 no-grad forward of the same prompts and sampled
                                   positions, before and after the step's updates (summed per token,
                                   so no cancellation of two large sums)
``theory/dH_tabular``              mean over tokens of the (E6) prediction ``-alpha_t (S*_t - E_p[S]_t)``
                                   with ``alpha_t = -lr c dL/dlog p_t`` summed over the step's updates
                                   (``c`` = the grad-clip factor); for an unclipped token this is
                                   ``lr A_eff r w / normaliser``, and 0 for a ratio-clipped one. It is
                                   the tabular (one-logit-vector-per-state, plain SGD) model: with a
                                   shared network or Adam it is not expected to match in size
``theory/dH_tabular/<q>``          its part from quadrant ``q`` tokens (tokens with ``A_eff = 0``, moved
                                   only by KL terms, count in the total and in no quadrant)
``theory/dH_jvp``                  the network-level first-order prediction: the directional derivative
                                   of the batch mean entropy along the actual parameter update
                                   ``theta_after - theta_before`` (``torch.func.jvp``)
``eval/avg@k``, ``eval/pass@1``, ``eval/pass@k``, ``eval/maj@1``, ``eval/maj@k``
                                   held-out metrics (:func:`scale.grading.evaluate_samples`), on eval steps
``time/step_s``, ``time/rollout_s``, ``time/score_s``, ``time/train_s``, ``time/diag_s``,
``time/eval_s``                    wall time of the step and its phases (diag = the diagnostics' cost;
                                   score = the behaviour-statistics forward, ~0 unless
                                   ``rollout.rescore``, or the reference model's)
``tokens_per_s``                   response tokens / step time
``mem/peak_gb``                    peak RSS of the process (CPU) or peak CUDA memory allocated this step
=================================  ======================================================================

Keys starting with ``time/``, ``tokens_per_s`` and ``mem/`` (:data:`TIMING_PREFIXES`) vary between
identical runs; everything else is reproducible bit for bit on CPU, also across ``--resume``.

Samples (``samples/step_XXXXXX.jsonl``), one completion per line::

    {"step": int, "prompt": str, "completion": str,
     "tokens": [str],          # each response token decoded on its own (eos included)
     "entropy": [float],       # H at each token, before the update
     "s_star": [float],        # S* of each sampled token
     "deviation": [float],     # S* - E_p[S]
     "quadrant": [int],        # theory.quadrant(A_eff, deviation): 0 pos_high, 1 pos_low,
                               # 2 neg_high, 3 neg_low, -1 none
     "advantage": float,       # the sequence's GRPO advantage A
     "reward": float,
     "logp": [float], "answer": str, "truncated": bool}   # extras
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["TIMING_PREFIXES", "MetricsLogger", "read_metrics", "truncate_metrics", "write_samples"]

#: metric key prefixes that measure time or memory (not reproducible between runs)
TIMING_PREFIXES = ("time/", "tokens_per_s", "mem/")


def _clean(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsLogger:
    """Appends one JSON line per step to ``RUN_DIR/metrics.jsonl`` and mirrors it to TensorBoard.

    ``purge_step``: on resume, TensorBoard drops events at and after this step (written by the
    interrupted run past its last checkpoint).
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed: the JSON log is enough
                self.writer = None
            else:
                self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float | None]:
        """Write one step; values become floats (non-finite ones ``null``). Returns the written record."""
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self.writer.add_scalar(k, v, step)
        return record

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``RUN_DIR/metrics.jsonl`` (``[]`` if there is none).

    A last line cut short (what a kill in the middle of a write leaves) is left out; any other line that
    is not a JSON object with a ``"step"`` raises ``ValueError`` naming the file and the line.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last and not path.read_bytes().endswith(b"\n"):
                break  # torn by a kill: that step lies after the last checkpoint anyway
            raise ValueError(f"{path}: line {i + 1}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}: line {i + 1}: expected an object with a 'step' key")
        rows.append(row)
    return rows


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drop metric lines (and a torn last line) and sample files of steps after ``last_step`` (before a
    resume)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        kept = [json.dumps(r, allow_nan=False) for r in read_metrics(run_dir) if r["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))
    samples = run_dir / "samples"
    if samples.is_dir():
        for p in samples.glob("step_*.jsonl"):
            if p.stem[5:].isdigit() and int(p.stem[5:]) > last_step:
                p.unlink()


def write_samples(run_dir: str | Path, step: int, records: list[dict[str, Any]]) -> Path:
    """Write ``RUN_DIR/samples/step_XXXXXX.jsonl`` (one record per line)."""
    folder = Path(run_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
