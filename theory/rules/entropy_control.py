"""Entropy bonus (with schedules and the adaptive target-entropy controller) and the stage detector.

Sources: entropy regularisation as in TRL (``entropy_coef``; adaptive mode after Skywork-OR1:
``use_adaptive_entropy``, ``entropy_target=0.2``, ``entropy_coef_delta=0.005``, bounds [0, 1]) and verl
(``entropy_coeff``); the rising/plateau stages of arXiv 2508.02260 §2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import array_api_compat

from ._stats import count, masked_mean, metric, scalar
from .base import Rule, RuleOutput, register


def _device(x):
    return array_api_compat.device(x)

__all__ = ["EntropyBonus", "StageDetector", "StageState"]


def scheduled(kind: str, start: float, end: float, step: int, total_steps: int | None) -> float:
    """A schedule from ``start`` to ``end`` at ``step`` (python floats): ``"constant"`` stays at ``start``;
    with ``s = clip(step, 0, total_steps) / total_steps``, ``"linear"`` is ``start + (end - start) s`` and
    ``"cosine"`` is ``end + (start - end)(1 + cos(π s)) / 2``. Shared by the entropy bonus and the
    entropy controllers (:mod:`theory.rules.control`)."""
    if kind == "constant":
        return start
    s = min(max(step, 0), total_steps) / total_steps
    if kind == "linear":
        return start + (end - start) * s
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * s))


@register
@dataclass(frozen=True)
class EntropyBonus(Rule):
    r"""Entropy bonus: the backend adds ``-c · H_t`` to every valid token's loss (maximising entropy).

    In logit space the bonus moves the logits along ``∇H = -S``, so its first-order entropy change is
    ``c Σ_i S_i² >= 0`` (docs/equations.md §2.5). The coefficient ``c`` at ``step``:

    * ``schedule="constant"``: ``coef``;
    * ``"linear"``: from ``coef`` to ``final_coef`` over ``total_steps``;
    * ``"cosine"``: ``final + (coef - final)(1 + cos(π s / total_steps)) / 2``;
    * ``adaptive=True`` (target-entropy controller, TRL/Skywork-OR1): the state ``c`` starts at ``coef``;
      the bonus applies only while the batch's mean entropy is ``<= target``; after each call
      ``c ← clip(c + delta, coef_min, coef_max)`` if the mean entropy is ``<= target``, else ``c - delta``.
      The state is a 0-d array passed back in (``state=``), so no host sync. The target may follow a
      schedule of its own (``target_schedule``: ``"linear"`` / ``"cosine"`` from ``target`` to
      ``final_target`` over ``total_steps``, the shapes above); TRL's is constant. Known difference: TRL
      gates with the *previous* step's entropy (it learns the current one inside the loss); here the
      batch's own entropy, known before the loss, gates and updates.

    ``coef = 1e-3`` is verl's former GRPO default (later set to 0 after entropy explosions); TRL's
    default is 0 (off). Output: ``entropy_coef`` on valid tokens.
    """

    coef: float = 1e-3
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    final_coef: float = 0.0
    total_steps: int | None = None
    adaptive: bool = False
    target: float = 0.2
    target_schedule: Literal["constant", "linear", "cosine"] = "constant"
    final_target: float | None = None
    delta: float = 0.005
    coef_min: float = 0.0
    coef_max: float = 1.0
    name = "entropy_bonus"
    source = "TRL entropy_coef / adaptive entropy (target 0.2, delta 0.005); verl entropy_coeff"

    def __post_init__(self):
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule must be 'constant', 'linear' or 'cosine', got {self.schedule!r}")
        if self.schedule != "constant" and not (self.total_steps and self.total_steps > 0):
            raise ValueError(f"schedule {self.schedule!r} needs total_steps > 0, got {self.total_steps!r}")
        if self.adaptive and self.schedule != "constant":
            raise ValueError("adaptive=True replaces the schedule; use schedule='constant'")
        if self.target_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"target_schedule must be 'constant', 'linear' or 'cosine', "
                             f"got {self.target_schedule!r}")  # fmt: skip
        if self.target_schedule != "constant" and not (self.total_steps and self.total_steps > 0):
            raise ValueError(f"target_schedule {self.target_schedule!r} needs total_steps > 0, "
                             f"got {self.total_steps!r}")  # fmt: skip
        if not self.coef_min <= self.coef_max:
            raise ValueError(f"coef_min must be <= coef_max, got {self.coef_min!r} > {self.coef_max!r}")

    def coef_at(self, step: int) -> float:
        """The scheduled coefficient at ``step`` (a python float; the adaptive state is separate)."""
        return scheduled(self.schedule, self.coef, self.final_coef, step, self.total_steps)

    def target_at(self, step: int) -> float:
        """The adaptive controller's target entropy at ``step`` (``target_schedule``)."""
        final = self.target if self.final_target is None else self.final_target
        return scheduled(self.target_schedule, self.target, final, step, self.total_steps)

    def apply(self, batch, *, noise, state):
        xp = batch.xp
        valid = batch.valid
        zeros = xp.zeros_like(batch.logp)
        if not self.adaptive:
            c = self.coef_at(batch.step)
            return RuleOutput(
                keep=valid,
                adv=batch.adv,
                entropy_coef=xp.where(valid, zeros + c, zeros),
                metrics={"coef": scalar(xp, zeros, c)},
            )
        H = batch.require("entropy", "EntropyBonus(adaptive=True)")
        lead = tuple(zeros.shape[:-2])
        if state is None:
            c = xp.full(lead, self.coef, dtype=zeros.dtype, device=_device(zeros))
        else:
            c = xp.asarray(state, dtype=zeros.dtype, device=_device(zeros))
            c = xp.broadcast_to(c, lead) if c.ndim == 0 else c
        h_mean = metric(xp, masked_mean(xp, H, valid))  # (...)
        has = metric(xp, count(xp, valid, zeros)) > 0  # an empty batch neither applies nor updates
        low = (h_mean <= self.target_at(batch.step)) & has
        applied = xp.where(low, c, xp.zeros_like(c))
        step = xp.where(low, xp.zeros_like(c) + self.delta, xp.zeros_like(c) - self.delta)
        new_c = xp.where(has, xp.clip(c + step, self.coef_min, self.coef_max), c)
        applied_t = xp.expand_dims(xp.expand_dims(applied, axis=-1), axis=-1)  # (..., 1, 1)
        return RuleOutput(
            keep=valid,
            adv=batch.adv,
            entropy_coef=xp.where(valid, zeros + applied_t, zeros),
            metrics={"coef": applied, "entropy_mean": h_mean, "next_coef": new_c},
            state=new_c,
        )


@dataclass(frozen=True)
class StageState:
    """State of :class:`StageDetector`: EMA values, the recent EMA history, and the current stage."""

    step: int = 0
    ema_entropy: float | None = None
    ema_accuracy: float | None = None
    history: tuple[tuple[float, float | None], ...] = field(default_factory=tuple)
    stage: Literal["rising", "plateau"] = "rising"
    plateau_step: int | None = None


@register
@dataclass(frozen=True)
class StageDetector:
    r"""Online rising/plateau detector over a per-step entropy (and accuracy) series (arXiv 2508.02260 §2).

    The paper splits training into a *rising* stage (accuracy up fast, entropy down sharply) and a
    *plateau* (both nearly flat) but gives no numeric rule. This detector is ours: it smooths each series
    with an EMA (``ema`` = weight of the old value) and declares the plateau at the first step ``s`` where,
    over the last ``window`` steps,

    * the relative entropy change ``|H̄_s - H̄_{s-W}| / H̄_{s-W} < tau_entropy`` (a rising entropy is not a
      plateau either), and
    * the accuracy gain ``ā_s - ā_{s-W} < tau_accuracy`` (skipped if no accuracy is given).

    Checking starts after ``window + ceil(ema / (1 - ema))`` steps: an EMA started at the first value lags
    a trend by about ``ema / (1 - ema)`` steps, so an earlier window would under-measure the drop. The
    plateau is absorbing. ``override_step`` replaces the criterion: the plateau starts exactly at that
    step (the paper's runs switch at about step 200-250). Pure python on scalars: call :meth:`update`
    once per step with the step's mean entropy and accuracy (as python floats), and pass ``state.stage`` to
    ``TokenBatch(stage=...)`` to gate :class:`~theory.rules.PositionBonus`.
    """

    window: int = 50
    ema: float = 0.9
    tau_entropy: float = 0.1
    tau_accuracy: float = 0.01
    override_step: int | None = None
    name = "stage_detector"
    kind = "detector"
    source = "arXiv 2508.02260 §2 (stages); criterion: this project (EMA + window thresholds)"

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window!r}")
        if not (0.0 <= self.ema < 1.0):
            raise ValueError(f"ema must lie in [0, 1), got {self.ema!r}")

    @property
    def warmup_steps(self) -> int:
        """Steps before the criterion is first checked: ``window + ceil(ema / (1 - ema))``."""
        return self.window + math.ceil(self.ema / (1.0 - self.ema) - 1e-9)

    def init(self) -> StageState:
        return StageState()

    def update(self, state: StageState, entropy: float, accuracy: float | None = None) -> StageState:
        """Consume one step's mean entropy (and accuracy); return the new state."""
        entropy = float(entropy)
        if not math.isfinite(entropy):
            raise ValueError(f"entropy must be finite, got {entropy!r}")
        acc = None if accuracy is None else float(accuracy)
        step = state.step + 1
        prev_h = state.ema_entropy
        ema_h = entropy if prev_h is None else self.ema * prev_h + (1 - self.ema) * entropy
        if acc is None:
            ema_a = state.ema_accuracy
        else:
            prev = state.ema_accuracy
            ema_a = acc if prev is None else self.ema * prev + (1 - self.ema) * acc
        history = (state.history + ((ema_h, ema_a),))[-(self.window + 1) :]
        stage, plateau_step = state.stage, state.plateau_step
        if self.override_step is not None:
            if step >= self.override_step and stage == "rising":
                stage, plateau_step = "plateau", step
        elif stage == "rising" and len(history) == self.window + 1 and step > self.warmup_steps:
            h_old, a_old = history[0]
            rel_drop = abs(h_old - ema_h) / max(abs(h_old), 1e-12)
            flat_acc = True if (ema_a is None or a_old is None) else (ema_a - a_old) < self.tau_accuracy
            if rel_drop < self.tau_entropy and flat_acc:
                stage, plateau_step = "plateau", step
        return StageState(step, ema_h, ema_a, history, stage, plateau_step)
