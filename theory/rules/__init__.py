"""theory.rules: every entropy-control rule, one implementation for NumPy and torch.

A rule reads per-token statistics of a batch (:class:`TokenBatch`, all ``(B, T)``) and returns what it
does to the loss (:class:`RuleOutput`: keep-mask, reshaped advantages, loss weights, penalty
coefficients, metrics). It never computes a loss. Rules are frozen dataclasses registered by name in
:data:`RULES`; :func:`make_rule` builds one (or a :class:`Compose` of several) from a spec string such as
``"clip_b:mu=2.0+position_bonus:gate=always"``. ``docs/rules.md`` lists each with formula, defaults,
source and known differences from the reference code.
"""

from .base import RULES, Compose, Rule, RuleOutput, TokenBatch, describe_rules, make_rule, register
from .clipping import ClipB, ClipCov, ClipV, HighEntropyMask, KLCov
from .control import EntropicPI, EntropicPIState, EntropyTarget, EntropyTargetState, entropy_target_feedback
from .entropy_control import EntropyBonus, StageDetector, StageState
from .intervention import QuadrantMask
from .shaping import PositionBonus, PPLShaping, ProbWeighted

__all__ = [
    "RULES",
    "ClipB",
    "ClipCov",
    "ClipV",
    "Compose",
    "EntropicPI",
    "EntropicPIState",
    "EntropyBonus",
    "EntropyTarget",
    "EntropyTargetState",
    "HighEntropyMask",
    "KLCov",
    "PPLShaping",
    "PositionBonus",
    "ProbWeighted",
    "QuadrantMask",
    "Rule",
    "RuleOutput",
    "StageDetector",
    "StageState",
    "TokenBatch",
    "describe_rules",
    "entropy_target_feedback",
    "make_rule",
    "register",
]
