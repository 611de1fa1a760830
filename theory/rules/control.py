"""Entropy controllers that set per-token loss weights from a target entropy schedule.

* :class:`EntropyTarget` (``entropy_target``, this project): a *predictive* controller. Before the update
  is applied it predicts each token's first-order entropy change from (E6) (arXiv 2602.03392, Theorem 3.3),
  sums it per sign quadrant (``theory.QUADRANTS``, signs ``theory.QUADRANT_DH_SIGN``) and sets its actuator
  (an entropy bonus whose first-order effect it also predicts, or bounded quadrant weights) so that the
  predicted change of the coming update closes a chosen fraction of the error to the target, plus an
  integral term for what the prediction misses; a calibration (measured / predicted, fed back by
  :meth:`EntropyTarget.feedback` on the backends' diagnostic steps) converts the prediction to nats.
* :class:`EntropicPI` (``entropic_pi``): the reactive baseline after EntroPIC (arXiv 2511.15248): a PI
  controller on the entropy error sets the loss weights of positive vs negative samples. Our code, written
  from the paper's description; the details of the reference implementation are not reproduced.

Both share the target schedules (``constant``, ``linear``, ``cosine``, and ``hold``: the batch entropy of
step ``hold_step``) and carry their state as a plain tuple of arrays, one value per leading batch, passed
back in with ``state=out.state`` (no host synchronisation; a plain tuple so a checkpoint loaded with
``torch.load(weights_only=True)`` reads it back). The adaptive ``entropy_bonus`` is the third controller
(TRL's adaptive entropy coefficient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import array_api_compat

from .._xp import namespace
from ..discriminator import QUADRANTS, quadrant, s_star
from ._stats import count, masked_mean, metric
from .base import Rule, RuleOutput, register
from .entropy_control import scheduled

__all__ = ["EntropyTarget", "EntropicPI", "EntropyTargetState", "EntropicPIState", "entropy_target_feedback"]

_SCHEDULES = ("constant", "linear", "cosine", "hold")
#: quadrants whose tokens raise (``up``) or lower (``down``) the entropy to first order (QUADRANT_DH_SIGN)
_UP, _DOWN = ("pos_low", "neg_high"), ("pos_high", "neg_low")


class EntropyTargetState(NamedTuple):
    """Named view of :class:`EntropyTarget`'s state tuple (``EntropyTargetState(*out.state)``).

    ``integral``: the integral term (nats); ``cal_num``, ``cal_den``: exponential sums of
    ``measured · predicted`` and ``predicted²`` (the calibration is their ratio); ``h_ref``,
    ``has_ref``: the held entropy of ``schedule="hold"`` and 1.0 once it is recorded; ``predicted``:
    the predicted ``ΔH`` (proxy units) of the update the last call weighted.
    """

    integral: Any
    cal_num: Any
    cal_den: Any
    h_ref: Any
    has_ref: Any
    predicted: Any


class EntropicPIState(NamedTuple):
    """Named view of :class:`EntropicPI`'s state tuple: ``integral``, ``h_ref``, ``has_ref``."""

    integral: Any
    h_ref: Any
    has_ref: Any


def _state_arrays(xp, state, n: int, like, init: tuple[float, ...]) -> list:
    """The state's ``n`` entries as arrays of shape ``(...)`` (the leading axes), dtype of ``like``."""
    lead = tuple(like.shape[:-2])
    dev = array_api_compat.device(like)
    if state is None:
        return [xp.full(lead, v, dtype=like.dtype, device=dev) for v in init]
    if len(state) != n:
        raise ValueError(f"state must be a tuple of {n} arrays, got {len(state)} entries")
    out = []
    for s in state:
        a = xp.asarray(s, dtype=like.dtype, device=dev)
        out.append(xp.broadcast_to(a, lead) if a.ndim == 0 else a)
    return out


class _Scheduled:
    """The target schedule shared by the controllers (reads ``schedule``, ``target``, ``final_target``,
    ``total_steps``, ``hold_step`` of the dataclass)."""

    def _check_schedule(self):
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.schedule in ("linear", "cosine") and not (self.total_steps and self.total_steps > 0):
            raise ValueError(f"schedule {self.schedule!r} needs total_steps > 0, got {self.total_steps!r}")
        if self.hold_step < 0:
            raise ValueError(f"hold_step must be >= 0, got {self.hold_step!r}")

    def target_at(self, step: int) -> float | None:
        """The scheduled target (nats) at ``step``; None for ``schedule="hold"`` (it lives in the state)."""
        if self.schedule == "hold":
            return None
        final = self.target if self.final_target is None else self.final_target
        return scheduled(self.schedule, self.target, final, step, self.total_steps)

    def _target(self, xp, h_mean, has, h_ref, has_ref, step: int):
        """``(target, active, h_ref, has_ref)``; ``active``: a valid token and a defined target."""
        t = self.target_at(step)
        if t is not None:
            return xp.zeros_like(h_mean) + t, has, h_ref, has_ref
        record = has & (has_ref < 0.5) & (step >= self.hold_step)
        h_ref = xp.where(record, h_mean, h_ref)
        has_ref = xp.where(record, xp.ones_like(has_ref), has_ref)
        held = has_ref > 0.5
        return xp.where(held, h_ref, h_mean), has & held, h_ref, has_ref

    def _error(self, xp, h_mean, has, st, step: int):
        """``(target, active, e, I, h_ref, has_ref)``: the error ``e = H* - H`` (0 where not active) and
        the integral ``I ← clip(I + ki·e, ±integral_max)`` (unchanged where not active)."""
        target, active, h_ref, has_ref = self._target(xp, h_mean, has, st.h_ref, st.has_ref, step)
        err = xp.where(active, target - h_mean, xp.zeros_like(h_mean))
        moved = xp.clip(st.integral + self.ki * err, -self.integral_max, self.integral_max)
        return target, active, err, xp.where(active, moved, st.integral), h_ref, has_ref


def _per_token(xp, valid, t, value_where: list[tuple[Any, Any]]):
    """A ``(..., B, T)`` weight: 1 by default, ``value`` (shape ``(...)``) where each mask holds."""
    w = xp.ones_like(t)
    for mask, value in value_where:
        v = xp.expand_dims(xp.expand_dims(value, axis=-1), axis=-1)
        w = xp.where(valid & mask, xp.zeros_like(t) + v, w)
    return w


@register
@dataclass(frozen=True)
class EntropyTarget(_Scheduled, Rule):
    r"""Predictive entropy controller: the predicted ``ΔH`` of the coming update is made to close the error.

    Prediction (E6, Theorem 3.3 of arXiv 2602.03392): a GRPO step on token ``t`` changes its entropy by
    ``-α_t D_t`` with ``D_t = S*_t - E_p[S]_t`` and ``α_t = η r_t A_t``. The coming update's step sizes are
    not known before it is applied, so ``A_t`` is the step proxy (``η`` and ``r_t ≈ 1`` are one common
    factor, absorbed by the calibration). Per quadrant ``q`` (sign(A) x sign(D)) and in all,

    .. math:: P_q = \frac{1}{N}\sum_{t\in q,\ valid} -A_t D_t ,\qquad P_0 = \sum_q P_q ,\qquad
              P_\uparrow = P_{pos\_low} + P_{neg\_high} \ge 0,\qquad
              P_\downarrow = P_{pos\_high} + P_{neg\_low} \le 0

    With ``H`` the batch's token-mean entropy, ``H*`` the scheduled target, ``e = H* - H``, the integral
    ``I`` and the calibration ``c`` (measured ΔH per predicted unit), the wanted predicted change is
    ``u = (gain·e + I) / c``. Unless ``accelerate``, a drift that already moves toward the target no faster
    than wanted (``u P₀ > 0`` and ``|P₀| <= |u|``) is left alone (``u = P₀``: the controller brakes, it does
    not push; pushing a falling entropy down faster starves the learning signal). Two actuators:

    * ``actuator="bonus"`` (default): an entropy bonus with a predicted effect. A bonus ``k·H`` in the
      objective moves the logits by ``-η k S`` (``S_i = p_i(log p_i + H)``, E2), so its first-order
      entropy change is ``η k ‖S‖²`` (docs/equations.md §2.5). ``‖S‖² = E_{i∼p}[S_i² / p_i]`` has the
      one-sample estimate ``S*_t (log p_t + H_t) = p_t (log p_t + H_t)² >= 0`` at each sampled token, so
      with ``Q = (1/N) Σ_t S*_t (log p_t + H_t)``,

      .. math:: k = \mathrm{clip}\big((u - P_0)/Q,\ k_{min},\ k_{max}\big),\qquad \hat P = P_0 + k Q

      (``k = 0`` if ``Q = 0``); output ``entropy_coef = k`` on valid tokens, advantages untouched. With
      ``coef_min = 0`` the bonus only raises the entropy: above the target it is off.
    * ``actuator="weights"``: bounded quadrant weights. One shared factor ``s`` scales the quadrants that
      raise the entropy by ``1 + s`` and those that lower it by ``1 - s``, so ``P̂(s) = P₀ + s (P↑ - P↓)``
      and

      .. math:: s = \mathrm{clip}\Big(\frac{u - P_0}{P_\uparrow - P_\downarrow},\ s_{lo},\ s_{hi}\Big),\quad
                s_{lo} = \max(w_{min}-1, 1-w_{max}),\ s_{hi} = \min(w_{max}-1, 1-w_{min})

      (``s = 0`` if no token has a first-order effect), every weight in ``[w_min, w_max]``; tokens with
      ``A = 0`` or ``D = 0`` keep weight 1. It holds a target as tightly, but it does so by taking the
      learning signal out of the quadrants that lower the entropy (on the toy, ``docs/toy.md``
      "control", it costs reward that the bonus actuator does not).

    Integral: ``I ← clip(I + ki·e, ±integral_max)`` after the call, only while the actuator is neither
    at a bound nor left off by the brake (conditional integration: no wind-up during a long approach).
    ``c = cal_num / cal_den`` (the ``predicted²``-weighted exponential average of ``measured /
    predicted``, :meth:`feedback` / :func:`entropy_target_feedback`, fed by the backends on diagnostic
    steps), clipped to ``[calibration_min, calibration_max]``; ``calibration`` until a first feedback.

    ``schedule``: ``"hold"`` (default) holds the batch entropy of the first call with ``step >=
    hold_step`` (before that the rule is off and nothing integrates); ``"constant"``: ``target``;
    ``"linear"`` / ``"cosine"``: from ``target`` to ``final_target`` over ``total_steps``, as
    :class:`EntropyBonus`. ``by="s_star"`` uses ``S*_t`` instead of ``D_t`` (no ``baseline`` needed;
    Theorem 3.2). A batch without valid tokens changes no state.
    """

    schedule: Literal["constant", "linear", "cosine", "hold"] = "hold"
    target: float = 0.2
    final_target: float | None = None
    total_steps: int | None = None
    hold_step: int = 0
    actuator: Literal["bonus", "weights"] = "bonus"
    gain: float = 0.5
    ki: float = 0.05
    integral_max: float = 0.5
    accelerate: bool = False
    coef_min: float = 0.0
    coef_max: float = 1.0
    w_min: float = 0.0
    w_max: float = 2.0
    calibration: float = 1.0
    calibration_ema: float = 0.9
    calibration_min: float = 1e-4
    calibration_max: float = 1e4
    by: Literal["deviation", "s_star"] = "deviation"
    name = "entropy_target"
    source = "this project: first-order prediction (E6) of arXiv 2602.03392, Theorem 3.3, per quadrant"
    needs = ("entropy",)  # and "baseline" when by="deviation" (checked in apply)

    def __post_init__(self):
        self._check_schedule()
        if self.actuator not in ("bonus", "weights"):
            raise ValueError(f"actuator must be 'bonus' or 'weights', got {self.actuator!r}")
        if not (0.0 <= self.w_min <= 1.0 <= self.w_max):
            raise ValueError(f"need 0 <= w_min <= 1 <= w_max, got {self.w_min!r}, {self.w_max!r}")
        if not self.coef_min <= 0.0 <= self.coef_max:
            raise ValueError(f"need coef_min <= 0 <= coef_max, got {self.coef_min!r}, {self.coef_max!r}")
        if self.gain < 0 or self.ki < 0 or self.integral_max < 0:
            raise ValueError("gain, ki and integral_max must be >= 0")
        if not (0.0 < self.calibration_min <= self.calibration <= self.calibration_max):
            raise ValueError("need 0 < calibration_min <= calibration <= calibration_max")
        if not (0.0 <= self.calibration_ema < 1.0):
            raise ValueError(f"calibration_ema must lie in [0, 1), got {self.calibration_ema!r}")
        if self.by not in ("deviation", "s_star"):
            raise ValueError(f"by must be 'deviation' or 's_star', got {self.by!r}")

    def calibration_of(self, xp, num, den):
        """The calibration ``c`` from the state's sums (``calibration`` while ``den == 0``), clipped."""
        ratio = num / xp.where(den > 0, den, xp.ones_like(den))
        c = xp.where(den > 0, ratio, xp.zeros_like(den) + self.calibration)
        return xp.clip(c, self.calibration_min, self.calibration_max)

    def feedback(self, state, measured_dh, predicted_dh=None):
        """:func:`entropy_target_feedback` with this rule's ``calibration_ema`` (None before a first
        call: nothing was predicted yet)."""
        if state is None:
            return None
        return entropy_target_feedback(state, measured_dh, predicted_dh, ema=self.calibration_ema)

    def apply(self, batch, *, noise, state):
        xp = batch.xp
        valid, adv, t = batch.valid, batch.adv, batch.logp
        st = EntropyTargetState(*_state_arrays(xp, state, 6, t, (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)))
        logp = batch.behaviour_logp()
        ss = s_star(logp, batch.entropy)
        score = ss if self.by == "s_star" else ss - batch.require("baseline", "EntropyTarget(by='deviation')")
        n = count(xp, valid, t)
        per_tok = lambda x: xp.where(valid, x, xp.zeros_like(t)) / xp.maximum(n, xp.ones_like(n))  # noqa: E731
        total = lambda x: metric(xp, xp.sum(x, axis=(-2, -1), keepdims=True))  # noqa: E731
        dh = per_tok(-adv * score)  # (..., B, T)
        code = quadrant(adv, score)
        in_q = {q: valid & (code == i) for i, q in enumerate(QUADRANTS)}
        P = {q: total(xp.where(m, dh, xp.zeros_like(dh))) for q, m in in_q.items()}
        p_up, p_down = P["pos_low"] + P["neg_high"], P["pos_high"] + P["neg_low"]
        p0 = p_up + p_down
        h_mean = metric(xp, masked_mean(xp, batch.entropy, valid))
        has = metric(xp, n) > 0
        target, active, err, moved, h_ref, has_ref = self._error(xp, h_mean, has, st, batch.step)
        c = self.calibration_of(xp, st.cal_num, st.cal_den)
        want = (self.gain * err + st.integral) / c
        coast = (want * p0 > 0) & (xp.abs(p0) <= xp.abs(want))
        if not self.accelerate:
            want = xp.where(coast, p0, want)
        metrics = {"target": target, "entropy_mean": h_mean, "error": err, "calibration": c,
                   "predicted_dh_unweighted": p0}  # fmt: skip
        if self.actuator == "bonus":
            q = total(per_tok(ss * (logp + batch.entropy)))
            pos = q > 0
            k = xp.clip((want - p0) / xp.where(pos, q, xp.ones_like(q)), self.coef_min, self.coef_max)
            k = xp.where(active & pos, k, xp.zeros_like(k))
            stuck = (k <= self.coef_min) | (k >= self.coef_max) | ~pos
            predicted = p0 + k * q
            k_tok = xp.expand_dims(xp.expand_dims(k, axis=-1), axis=-1)
            out = {"keep": valid, "adv": adv, "entropy_coef": xp.where(valid, xp.zeros_like(t) + k_tok,
                                                                       xp.zeros_like(t))}  # fmt: skip
            metrics |= {"coef": k, "bonus_gain": q}
        else:
            s_lo, s_hi = max(self.w_min - 1.0, 1.0 - self.w_max), min(self.w_max - 1.0, 1.0 - self.w_min)
            spread = p_up - p_down
            pos = spread > 0
            s = xp.clip((want - p0) / xp.where(pos, spread, xp.ones_like(spread)), s_lo, s_hi)
            s = xp.where(active & pos, s, xp.zeros_like(s))
            stuck = (s <= s_lo) | (s >= s_hi) | ~pos
            w_up, w_down = 1.0 + s, 1.0 - s
            predicted = w_up * p_up + w_down * p_down
            up = in_q["pos_low"] | in_q["neg_high"]
            down = in_q["pos_high"] | in_q["neg_low"]
            weight = _per_token(xp, valid, t, [(up, w_up), (down, w_down)])
            out = {"keep": valid, "adv": adv, "weight": weight}
            metrics |= {f"w_{q}": (w_up if q in _UP else w_down) for q in QUADRANTS}
        if not self.accelerate:
            stuck = stuck | coast
        integral = xp.where(active & ~stuck, moved, st.integral)
        metrics |= {"integral": integral, "predicted_dh": predicted}
        new = (integral, st.cal_num, st.cal_den, h_ref, has_ref, xp.where(has, predicted, st.predicted))
        return RuleOutput(**out, metrics=metrics, state=new)


def entropy_target_feedback(state, measured_dh, predicted_dh=None, *, ema: float = 0.9):
    r"""Feed the measured entropy change of the last weighted update into :class:`EntropyTarget`'s state.

    ``measured_dh``: the change of the batch's token-mean entropy that the update produced (e.g. the
    entropy recomputed on the same tokens after the optimizer step minus ``metrics["entropy_mean"]``), a
    python number or an array of shape ``(...)``. ``predicted_dh`` defaults to the prediction stored in
    the state (``metrics["predicted_dh"]`` of the call that weighted the update). The calibration sums
    become

    .. math:: n \leftarrow \beta n + (1-\beta)\, m\, p,\qquad d \leftarrow \beta d + (1-\beta)\, p^2 ,

    so ``c = n / d`` is the ``p²``-weighted exponential average of ``m / p`` (a least-squares slope of
    measured on predicted with forgetting ``β = ema``): a near-zero prediction moves it little. A
    non-finite ``m`` or ``p`` changes nothing. Pure: returns a new state tuple in the state's namespace.
    """
    st = EntropyTargetState(*state)
    xp = namespace(st.cal_num)
    dev = array_api_compat.device(st.cal_num)
    m = xp.asarray(measured_dh, dtype=st.cal_num.dtype, device=dev)
    p = st.predicted if predicted_dh is None else xp.asarray(predicted_dh, dtype=st.cal_num.dtype, device=dev)
    ok = xp.isfinite(m) & xp.isfinite(p)
    m, p = xp.where(ok, m, xp.zeros_like(m)), xp.where(ok, p, xp.zeros_like(p))
    num = xp.where(ok, ema * st.cal_num + (1.0 - ema) * m * p, st.cal_num)
    den = xp.where(ok, ema * st.cal_den + (1.0 - ema) * p * p, st.cal_den)
    return tuple(st._replace(cal_num=num, cal_den=den))


@register
@dataclass(frozen=True)
class EntropicPI(_Scheduled, Rule):
    r"""PI control of the loss weights of positive vs negative samples, after EntroPIC (arXiv 2511.15248).

    EntroPIC's idea: positive and negative samples move the entropy in opposite directions on the whole
    (reinforcing likely sampled tokens lowers it, penalising them raises it; §4.2 quadrant table), so a
    proportional-integral controller on the entropy error can stabilise the entropy by tuning their loss
    coefficients. Here, with ``e = H* - H`` (target minus the batch's token-mean entropy, same schedules
    as :class:`EntropyTarget`),

    .. math:: I \leftarrow \mathrm{clip}(I + k_i e,\ \pm I_{max}),\qquad u = k_p e + I,\qquad
              w_\pm = \mathrm{clip}(1 \mp u,\ w_{min}, w_{max})

    ``w_+`` weights every valid token with ``A > 0``, ``w_-`` those with ``A < 0`` (``A = 0``: 1). Entropy
    below target (``e > 0``) weakens the positive samples and strengthens the negative ones. Written from
    the paper's description (not its code); the gains and bounds are this project's defaults.
    """

    schedule: Literal["constant", "linear", "cosine", "hold"] = "hold"
    target: float = 0.2
    final_target: float | None = None
    total_steps: int | None = None
    hold_step: int = 0
    kp: float = 1.0
    ki: float = 0.1
    integral_max: float = 1.0
    w_min: float = 0.0
    w_max: float = 2.0
    name = "entropic_pi"
    source = "EntroPIC, arXiv 2511.15248 (PI control of positive/negative sample loss weights); our code"
    needs = ("entropy",)

    def __post_init__(self):
        self._check_schedule()
        if not (0.0 <= self.w_min <= 1.0 <= self.w_max):
            raise ValueError(f"need 0 <= w_min <= 1 <= w_max, got {self.w_min!r}, {self.w_max!r}")
        if self.kp < 0 or self.ki < 0 or self.integral_max < 0:
            raise ValueError("kp, ki and integral_max must be >= 0")

    def apply(self, batch, *, noise, state):
        xp = batch.xp
        valid, adv, t = batch.valid, batch.adv, batch.logp
        st = EntropicPIState(*_state_arrays(xp, state, 3, t, (0.0, 0.0, 0.0)))
        h_mean = metric(xp, masked_mean(xp, batch.entropy, valid))
        has = metric(xp, count(xp, valid, t)) > 0
        target, active, err, integral, h_ref, has_ref = self._error(xp, h_mean, has, st, batch.step)
        u = xp.where(active, self.kp * err + integral, xp.zeros_like(err))
        w_pos = xp.clip(1.0 - u, self.w_min, self.w_max)
        w_neg = xp.clip(1.0 + u, self.w_min, self.w_max)
        weight = _per_token(xp, valid, t, [(adv > 0, w_pos), (adv < 0, w_neg)])
        metrics = {"target": target, "entropy_mean": h_mean, "error": err, "integral": integral,
                   "control": u, "w_pos": w_pos, "w_neg": w_neg}  # fmt: skip
        new = (integral, h_ref, has_ref)
        return RuleOutput(keep=valid, adv=adv, weight=weight, metrics=metrics, state=new)
