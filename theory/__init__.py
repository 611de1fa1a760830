"""theory: the entropy-dynamics formulas as pure, array-agnostic functions.

Every function takes NumPy arrays or torch tensors (any array-API array; last axis = vocabulary, any
leading batch shape such as ``(B, T)``) and returns the same kind of array; torch results are
differentiable. Equation labels (E1)...(E10) refer to ``docs/equations.md``; the papers are
arXiv 2602.03392 (entropy dynamics) and arXiv 2508.02260 (entropy-performance exchange).

This package imports only ``array_api_compat`` (never torch).
"""

from . import diagnostics, rules, spec  # noqa: F401  (batch statistics, the rule interface, spec parser)
from .discriminator import (
    QUADRANT_DH_SIGN,
    QUADRANTS,
    deviation,
    discriminator,
    entropy_change_sign,
    quadrant,
    s_star,
    sign_threshold,
    vocab_baseline,
)
from .entropy import entropy, entropy_from_logp, log_softmax, softmax
from .first_order import (
    entropy_change_first_order,
    entropy_change_grpo,
    entropy_change_second_order,
    entropy_change_single_logit,
    entropy_hessian,
    exact_entropy_change,
    grpo_logit_update,
    prob_change_single_logit,
)
from .grpo import ADVANTAGE_PRESETS, effective_step_size, grpo_advantages
from .metrics import pass_at_k
from .rowstats import row_statistics

__all__ = [
    "ADVANTAGE_PRESETS",
    "QUADRANT_DH_SIGN",
    "QUADRANTS",
    "deviation",
    "discriminator",
    "effective_step_size",
    "entropy",
    "entropy_change_first_order",
    "entropy_change_grpo",
    "entropy_change_second_order",
    "entropy_change_sign",
    "entropy_change_single_logit",
    "entropy_from_logp",
    "entropy_hessian",
    "exact_entropy_change",
    "grpo_advantages",
    "grpo_logit_update",
    "log_softmax",
    "pass_at_k",
    "prob_change_single_logit",
    "quadrant",
    "row_statistics",
    "s_star",
    "sign_threshold",
    "softmax",
    "vocab_baseline",
]
