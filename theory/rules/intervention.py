"""Intervention rules: token masks that test the theory rather than control the entropy.

:class:`QuadrantMask` is the sign-verification experiment of arXiv 2602.03392 (§7.3 item 1 of the digest):
keep the gradient of the tokens of chosen sign quadrants only, and the entropy must move the way
Theorems 3.2/3.3 predict. See :mod:`theory.rules.base` for the interface and ``docs/rules.md`` for the
formula, defaults and what the paper leaves open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..discriminator import QUADRANTS, quadrant, s_star
from ._stats import count, metric, safe_frac
from .base import Rule, RuleOutput, register
from .clipping import _polarity_metrics

__all__ = ["QuadrantMask"]

_BY = ("deviation", "s_star")


@register
@dataclass(frozen=True)
class QuadrantMask(Rule):
    r"""Keep only the tokens of chosen sign quadrants, sign(A) x sign(score) (arXiv 2602.03392 §7.3).

    With ``S*_t = p_t (H_t + log p_t)`` (E2, from the behaviour log-prob ``old_logp`` or ``logp`` and the
    entropy) the score is

    * ``by="deviation"`` (default): ``D_t = S*_t - E_p[S]_t`` (needs ``TokenBatch.baseline``, E7), the
      driver of the GRPO entropy change (E6, Theorem 3.3): the quadrant table of §4.2, so each kept token
      moves the entropy in its quadrant's direction to first order;
    * ``by="s_star"``: ``S*_t`` itself (Theorem 3.2), what the paper's intervention figure splits on
      (``S* > 0`` vs ``S* < 0`` on positive / negative samples). Since ``E_p[S] >= 0``, ``S* < 0``
      implies ``D < 0`` but not conversely.

    ``theory.quadrant(A, score)`` names each token ``pos_high``, ``pos_low``, ``neg_high`` or ``neg_low``
    (``pos``/``neg``: sign of ``A``; ``high``/``low``: sign of the score). A token is selected iff its
    quadrant is in ``keep``. Tokens whose quadrant is undefined (``A = 0`` or score ``= 0``, or NaN) are
    never selected: they have no first-order effect.

    ``in_normaliser=False`` (default): unselected tokens get ``keep = False`` and leave the loss and its
    normaliser. ``True``: they get ``weight = 0`` and stay in the normaliser (as
    :class:`HighEntropyMask`'s default).
    """

    keep: tuple[str, ...] = ("pos_high",)
    by: Literal["deviation", "s_star"] = "deviation"
    in_normaliser: bool = False
    name = "quadrant_mask"
    source = "arXiv 2602.03392 §7.3 (sign verification by intervention), quadrant table of Thm 3.3 (E6)"
    needs = ("entropy",)  # and "baseline" when by="deviation" (checked in apply)

    def __post_init__(self):
        keep = self.keep
        if isinstance(keep, str):  # a single name, e.g. from the spec "quadrant_mask:keep=neg_low"
            keep = (keep,)
        elif isinstance(keep, list):  # e.g. from a JSON config
            keep = tuple(keep)
        if not isinstance(keep, tuple):
            raise ValueError(f"keep must be a tuple of quadrant names from {QUADRANTS}, got {self.keep!r}")
        if not keep:
            raise ValueError(f"keep must name at least one quadrant from {QUADRANTS}, got {self.keep!r}")
        for q in keep:
            if q not in QUADRANTS:
                raise ValueError(f"keep must name quadrants from {QUADRANTS}, got {q!r} in {self.keep!r}")
        if len(set(keep)) != len(keep):
            raise ValueError(f"keep names a quadrant twice: {self.keep!r}")
        object.__setattr__(self, "keep", keep)
        if self.by not in _BY:
            raise ValueError(f"by must be 'deviation' or 's_star', got {self.by!r}")

    def apply(self, batch, *, noise, state):
        xp = batch.xp
        valid, adv, like = batch.valid, batch.adv, batch.logp
        score = s_star(batch.behaviour_logp(), batch.entropy)  # (..., B, T)
        if self.by == "deviation":
            score = score - batch.require("baseline", "QuadrantMask(by='deviation')")
        code = quadrant(adv, score)  # (..., B, T) int64 in {-1, 0, 1, 2, 3}
        selected = xp.zeros_like(valid)
        for q in self.keep:
            selected = selected | (code == QUADRANTS.index(q))
        selected = valid & selected
        drop = valid & ~selected
        n_valid = count(xp, valid, like)
        frac = lambda sel: metric(xp, safe_frac(xp, count(xp, sel, like), n_valid))  # noqa: E731
        metrics = {"kept_frac": frac(selected)}
        metrics.update(_polarity_metrics(xp, drop, batch))
        for i, q in enumerate(QUADRANTS):
            metrics[f"{q}_frac"] = frac(valid & (code == i))
        metrics["undefined_frac"] = frac(valid & (code < 0))
        if self.in_normaliser:
            weight = xp.where(drop, xp.zeros_like(like), xp.ones_like(like))
            return RuleOutput(keep=valid, adv=adv, weight=weight, metrics=metrics)
        return RuleOutput(keep=selected, adv=adv, metrics=metrics)
