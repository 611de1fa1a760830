r"""What the trainer writes per step: ``metrics.jsonl``, the trackers, ``samples/step_XXXXXX.jsonl``.

Files in ``RUN_DIR`` (``entdyn plot`` reads exactly these; key names are stable):

* ``metrics.jsonl`` (always written): one JSON object per training step, ``{"step": s, "<key>": float |
  null, ...}``, keys flat and slash-grouped; ``null`` means not measured that step (e.g. ``eval/*``
  between evaluations, ``stage/plateau_step`` before the plateau) or not finite. A mean over an empty
  set of tokens is 0 (:mod:`theory.diagnostics`, as the rules and the toy report it): ``entropy/neg``
  is 0 when no sample had a negative advantage, which ``adv/neg_frac = 0`` tells apart (``entdyn plot``
  leaves such steps out). Steps count from 1; step ``s`` is the ``s``-th update.
* ``tb/``: the same scalars as TensorBoard events, with ``run.report_to`` containing ``tensorboard``
  (the default).
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

The TRL adapter (:mod:`scale.adapters.trl`) logs a subset of these keys under the same names
(``entropy/pos``, ``s_star/mean``, ``quad/<q>_frac``, ``loss/kept_frac``, ``rule/<name>``,
``theory/dH_tabular`` ...; not ``theory/dH_measured`` or ``theory/dH_jvp``), next to TRL's own keys
(``reward``, ``entropy``, ``kl``, ``clip_ratio/*`` ...), which keep TRL's definitions.

Trackers (``run.report_to``, ``--report-to``): a comma list of ``tensorboard``, ``wandb``, ``mlflow``
(:data:`TRACKERS`; the names TRL's ``report_to`` takes too), or ``none``. Each is accelerate's tracker
class (``accelerate.tracking``), started on the main process only, and receives every finite value of
the step's record, never a ``null`` (a key missing from a step is simply not logged there). TensorBoard
events go to ``RUN_DIR/tb``; on ``--resume`` its writer drops the events at and after the resumed step
(``purge_step``: what the interrupted run wrote past its last checkpoint). wandb (project
``$WANDB_PROJECT``, else ``entropy-dynamics``; files under ``RUN_DIR/wandb``) and mlflow (experiment
``$MLFLOW_EXPERIMENT_NAME``, else ``entropy-dynamics``; ``$MLFLOW_TRACKING_URI``) get the run
directory's name as the run name and the resolved configuration as parameters; a resumed run is a new
run there, its steps continuing the old numbering.

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

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["TIMING_PREFIXES", "TRACKERS", "MetricsLogger", "parse_report_to", "read_metrics", "trackers",
           "truncate_metrics", "write_samples"]  # fmt: skip

#: metric key prefixes that measure time or memory (not reproducible between runs)
TIMING_PREFIXES = ("time/", "tokens_per_s", "mem/")
#: the tracker names of ``run.report_to`` -> the package each needs (the validation checks it is there)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
#: the wandb project and mlflow experiment when the environment names none
PROJECT = "entropy-dynamics"


def parse_report_to(text: str) -> list[str]:
    """The tracker names of a ``run.report_to`` value (``"tensorboard,wandb"``; ``"none"``: ``[]``).

    >>> parse_report_to(" TensorBoard , wandb,tensorboard"), parse_report_to("none")
    (['tensorboard', 'wandb'], [])

    Raises ``ValueError`` for an unknown name, an empty value, or ``none`` next to a tracker.
    """
    names = [n.strip().lower() for n in str(text).split(",")]
    choices = ", ".join(TRACKERS)
    if not any(names):
        raise ValueError(f"names no tracker; give a comma list of {choices}, or none")
    for n in names:
        if n not in TRACKERS and n != "none":
            raise ValueError(f"unknown tracker {n!r}; choose from {choices} (a comma list), or none")
    if "none" in names:
        if len(set(names)) > 1:
            raise ValueError(f"'none' cannot be combined with trackers, got {text!r}; drop none or the rest")
        return []
    return list(dict.fromkeys(n for n in names if n))


def trackers(report_to: str, tensorboard: bool = True) -> list[str]:
    """The trackers a run starts: :func:`parse_report_to` of ``run.report_to``, less ``tensorboard`` when
    ``run.tensorboard`` is false (``--no-tensorboard``)."""
    return [n for n in parse_report_to(report_to) if tensorboard or n != "tensorboard"]


def _clean(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` as ``{"optim.lr": 1e-3}`` (the trackers' parameter tables)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if v is None or isinstance(v, bool | int | float | str) else str(v)
    return out


@contextlib.contextmanager
def _accelerate_logging() -> Iterator[None]:
    """Around every call into an accelerate tracker: its module logger, a ``MultiProcessAdapter``, raises
    unless an accelerate ``PartialState`` exists, and creating one would initialise ``torch.distributed``,
    set ``RANK``/``WORLD_SIZE``/... in ``os.environ`` and the thread count: the trainer does its own
    process-group handling (:mod:`scale.distributed`) and only its main process logs. So for the call
    the module's logger is the plain ``logging.Logger`` under the adapter (same name, same messages)."""
    from accelerate import tracking

    adapter = getattr(tracking, "logger", None)
    tracking.logger = getattr(adapter, "logger", adapter)
    try:
        yield
    finally:
        tracking.logger = adapter


def _start_tracker(name: str, run_dir: Path, purge_step: int | None, config: dict[str, Any] | None):
    """Accelerate's tracker ``name``, started, with the configuration as its parameters (not TensorBoard's:
    ``config.yaml`` is next to its events, and ``add_hparams`` would add a second event folder)."""
    from accelerate import tracking

    if name == "tensorboard":  # events in run_dir / "tb"; kwargs go to SummaryWriter
        tracker = tracking.TensorBoardTracker("tb", str(run_dir), purge_step=purge_step)
    elif name == "wandb":
        project = os.environ.get("WANDB_PROJECT", PROJECT)
        tracker = tracking.WandBTracker(project, name=run_dir.name, dir=str(run_dir))
    elif name == "mlflow":
        tracker = tracking.MLflowTracker(experiment_name=PROJECT, run_name=run_dir.name)
    else:
        raise ValueError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
    # the caller is the main process: no PartialState().on_main_process (see _accelerate_logging)
    tracker.main_process_only = False
    with _accelerate_logging():
        tracker.start()
        if config and name != "tensorboard":
            tracker.store_init_configuration(_flat(config))
    return tracker


class MetricsLogger:
    """Appends one JSON line per step to ``RUN_DIR/metrics.jsonl`` and sends the finite values to the
    trackers ``report_to`` (:func:`trackers`; the module docstring says where each writes).

    ``purge_step``: on resume, TensorBoard drops events at and after this step (written by the
    interrupted run past its last checkpoint). ``config``: the resolved configuration, nested by section
    (wandb's and mlflow's run parameters). Only the main process creates one.
    """

    def __init__(self, run_dir: str | Path, *, report_to: Sequence[str] = ("tensorboard",),
                 purge_step: int | None = None, config: dict[str, Any] | None = None):  # fmt: skip
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        self.trackers: list = []
        try:
            for name in report_to:
                self.trackers.append(_start_tracker(name, self.run_dir, purge_step, config))
        except BaseException:
            self.close()
            raise

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float | None]:
        """Write one step; values become floats (non-finite ones ``null``); the trackers get the non-null
        ones. Returns the written record."""
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        values = {k: v for k, v in record.items() if k != "step" and v is not None}
        if self.trackers and values:
            with _accelerate_logging():
                for tracker in self.trackers:
                    tracker.log(values, step=int(step))
        return record

    def close(self) -> None:
        """Finish every tracker (TensorBoard: flush and close its event file) and close the JSON log; the
        first tracker error is raised after all of them were tried."""
        started, self.trackers = self.trackers, []
        error = None
        with _accelerate_logging() if started else contextlib.nullcontext():
            for tracker in started:
                try:
                    tracker.finish()
                except Exception as err:  # the others and the JSON log are still closed
                    error = error or err
        self._file.close()
        if error is not None:
            raise error


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
