"""Hypothesis strategies and helpers for the tests of :mod:`theory.rules`.

Batches are generated as NumPy float64 and converted to each backend with ``conftest.Backend.asarray``.
Hypothesis draws the *structure* of a batch (shape, valid pattern, groups, reward pattern, how the
per-token statistics are produced, degenerate modes); the continuous values come from a NumPy generator
seeded by hypothesis. Continuous values make exact threshold ties (which float summation order could
break differently on numpy and torch) events of probability zero, so keep-masks can be compared exactly
across backends. The degenerate modes use dyadic constants whose sums and means are exact in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

import theory as T
from theory import rules as R

__all__ = [
    "BatchData",
    "batches",
    "real_batch",
    "rule_params",
    "rules_for",
    "token_rule_names",
    "make_batch",
    "run_rule",
    "output_to_numpy",
    "group_advantages",
    "initial_state_np",
    "sample_tokens",
]


@dataclass
class BatchData:
    """NumPy float64 arrays of one :class:`theory.rules.TokenBatch` plus the caller's noise."""

    logp: np.ndarray
    adv: np.ndarray
    valid: np.ndarray
    old_logp: np.ndarray | None
    entropy: np.ndarray
    baseline: np.ndarray
    group: np.ndarray
    noise: np.ndarray
    position: np.ndarray | None = None
    step: int = 0
    stage: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.logp.shape


def group_advantages(rewards: np.ndarray, group: np.ndarray, *, unbiased: bool = True) -> np.ndarray:
    """GRPO advantages per sequence: ``(r - mean_g) / (std_g + 1e-6)``; singleton groups get 0."""
    adv = np.zeros_like(rewards)
    for g in np.unique(group):
        idx = np.flatnonzero(group == g)
        r = rewards[idx]
        if len(idx) < 2:
            continue
        sd = r.std(ddof=1 if unbiased else 0)
        adv[idx] = (r - r.mean()) / (sd + 1e-6)
    return adv


def _stats_from_logits(z: np.ndarray, tok: np.ndarray):
    """``(logp of tok, H, E_p[S])`` per position from ``(B, T, V)`` logits via the theory functions."""
    logp_all = T.log_softmax(z)
    logp = np.take_along_axis(logp_all, tok[..., None], axis=-1)[..., 0]
    return logp, T.entropy(z), T.vocab_baseline(z)


def sample_tokens(rng: np.random.Generator, z: np.ndarray) -> np.ndarray:
    """Sample one token per position on-policy from softmax(z) (z: (B, T, V))."""
    p = np.exp(T.log_softmax(z))
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(z.shape[:-1])[..., None] * cdf[..., -1:]
    tok = np.sum(cdf < u, axis=-1)
    return np.minimum(tok, z.shape[-1] - 1)


@st.composite
def batches(draw, *, min_b=1, max_b=6, min_t=1, max_t=12, allow_degenerate=True, allow_no_valid=True):
    """A random :class:`BatchData` with B in [min_b, max_b], T in [min_t, max_t]."""
    B = draw(st.integers(min_b, max_b))
    Tn = draw(st.integers(min_t, max_t))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    # --- valid pattern: random, left-padded responses, all valid, or none valid
    vmode = draw(st.sampled_from(["random", "prefix", "all"] + (["none"] if allow_no_valid else [])))
    if vmode == "random":
        valid = rng.random((B, Tn)) < draw(st.floats(0.2, 1.0))
        if draw(st.booleans()):  # some rows with no valid token
            valid[rng.random(B) < 0.3] = False
    elif vmode == "prefix":
        start = rng.integers(0, Tn + 1, size=B)  # prompt tokens first, then the response
        valid = np.arange(Tn)[None, :] >= start[:, None]
    elif vmode == "all":
        valid = np.ones((B, Tn), dtype=bool)
    else:
        valid = np.zeros((B, Tn), dtype=bool)

    # --- groups and advantages
    gsize = draw(st.integers(1, B))
    group = (np.arange(B) // gsize).astype(np.int64)
    if draw(st.booleans()):
        group = rng.permutation(group)
    amode = draw(st.sampled_from(["binary", "continuous", "random", "const_neg", "const_pos", "zero"]))
    if amode == "binary":
        adv_seq = group_advantages(rng.integers(0, 2, size=B).astype(np.float64), group)
    elif amode == "continuous":
        adv_seq = group_advantages(rng.random(B), group, unbiased=draw(st.booleans()))
    elif amode == "random":
        adv_seq = rng.normal(size=B) * draw(st.sampled_from([0.5, 1.0, 3.0]))
        adv_seq[rng.random(B) < 0.25] = 0.0
    elif amode == "const_neg":
        adv_seq = -rng.uniform(0.2, 2.0, size=B)
    elif amode == "const_pos":
        adv_seq = rng.uniform(0.2, 2.0, size=B)
    else:
        adv_seq = np.zeros(B)
    # Advantages on a 2^-10 grid: their sums are exact in float64, so the batch mean of a constant
    # advantage is that constant on every backend and Clip-Cov/KL-Cov's centred covariance is exactly 0
    # (not +-1 ulp, whose sign depends on the summation order) when all valid tokens share one advantage.
    adv_seq = np.round(adv_seq * 1024.0) / 1024.0
    adv = np.broadcast_to(adv_seq[:, None], (B, Tn)).copy()

    # --- per-token statistics: from real softmax distributions, random, or degenerate constants
    smode = draw(st.sampled_from(["real", "real", "random"] + (["degenerate"] if allow_degenerate else [])))
    if smode == "real":
        V = draw(st.integers(2, 10))
        scale = draw(st.sampled_from([0.3, 1.0, 3.0, 8.0]))
        z = rng.normal(size=(B, Tn, V)) * scale
        tok = sample_tokens(rng, z)
        logp, entropy, baseline = _stats_from_logits(z, tok)
    elif smode == "random":
        logp = -rng.exponential(draw(st.sampled_from([0.1, 1.0, 5.0])), size=(B, Tn))
        entropy = rng.uniform(0.0, 3.0, size=(B, Tn))
        baseline = rng.uniform(0.0, 0.5, size=(B, Tn))
    else:
        c_lp = draw(st.sampled_from([0.0, -0.5, -1.0, -2.0]))
        c_h = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
        logp = np.full((B, Tn), c_lp)
        entropy = np.full((B, Tn), c_h)
        baseline = np.full((B, Tn), draw(st.sampled_from([0.0, 0.25])))

    omode = draw(st.sampled_from(["near", "near", "none", "equal"]))
    if omode == "near":
        old_logp = np.minimum(logp + rng.normal(size=(B, Tn)) * draw(st.sampled_from([0.05, 0.3])), 0.0)
    elif omode == "equal":
        old_logp = logp.copy()
    else:
        old_logp = None

    noise = rng.random((B, Tn))
    position = None
    if draw(st.integers(0, 4)) == 0:
        position = np.where(valid, rng.random((B, Tn)), 0.0)
    step = draw(st.sampled_from([0, 150, 200, 201, 250, 299, 300, 400]))
    stage = draw(st.sampled_from([None, "rising", "plateau"]))
    return BatchData(
        logp=logp,
        adv=adv,
        valid=valid,
        old_logp=old_logp,
        entropy=entropy,
        baseline=baseline,
        group=group,
        noise=noise,
        position=position,
        step=step,
        stage=stage,
    )


def real_batch(
    seed: int, B: int, Tn: int, V: int, *, scale: float = 2.0, neg_frac: float = 0.5, valid_p: float = 1.0
):
    """A batch from known softmax distributions, on-policy; returns ``(BatchData, logits, tokens)``.

    Sequences get ``A = -1`` (a fraction ``neg_frac``) or ``A = +1``: constant per sign.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(B, Tn, V)) * scale
    tok = sample_tokens(rng, z)
    logp, entropy, baseline = _stats_from_logits(z, tok)
    n_neg = max(1, int(round(neg_frac * B)))
    adv_seq = np.where(np.arange(B) < n_neg, -1.0, 1.0)
    adv = np.broadcast_to(adv_seq[:, None], (B, Tn)).copy()
    valid = rng.random((B, Tn)) < valid_p
    data = BatchData(
        logp=logp,
        adv=adv,
        valid=valid,
        old_logp=None,
        entropy=entropy,
        baseline=baseline,
        group=(np.arange(B) // 2).astype(np.int64),
        noise=rng.random((B, Tn)),
    )
    return data, z, tok


# --- rules -----------------------------------------------------------------------------------------


def token_rule_names() -> list[str]:
    """Registered rules of kind "token" (everything but the stage detector)."""
    return sorted(n for n, cls in R.RULES.items() if getattr(cls, "kind", "token") == "token")


_MU = [0.3, 0.7, 1.3, 1.9, 2.5]  # "irrational" multiples: no exact ties on simple degenerate data


def rule_params(name: str) -> st.SearchStrategy:
    """Keyword arguments for the rule ``name``: several settings each, small mu so things get clipped."""
    s = st.sampled_from
    if name == "clip_b":
        return st.one_of(
            st.fixed_dictionaries(
                {"variant": st.just("reference"), "mu": s(_MU), "logp_source": s(["old", "current"])}
            ),
            st.fixed_dictionaries(
                {
                    "variant": st.just("paper"),
                    "mu": s(_MU),
                    "mu_high": s([None, 0.9, 1.7, math.inf]),
                    "logp_source": s(["old", "current"]),
                }
            ),
        )
    if name == "clip_v":
        return st.one_of(
            st.fixed_dictionaries(
                {
                    "variant": st.just("reference"),
                    "mu": s(_MU + [8.5]),
                    "max_frac": s([1e-4, 0.05, 0.3, 1.0]),
                    "logp_source": s(["old", "current"]),
                }
            ),
            st.fixed_dictionaries(
                {
                    "variant": st.just("paper"),
                    "mu": s(_MU),
                    "mu_high": s([None, 0.9, math.inf]),
                    "center": st.booleans(),
                    "logp_source": s(["old", "current"]),
                }
            ),
        )
    if name == "clip_cov":
        return st.fixed_dictionaries(
            {
                "frac": s([0.0, 2e-4, 0.1, 0.3, 1.0]),
                "lb": s([-1e9, -0.3, 0.0, 1.0]),
                "ub": s([1e9, 0.7, 5.0]),
                "clip_low": s([0.05, 0.2, 1.0]),
                "clip_high": s([0.05, 0.2, 1.0]),
            }
        ).filter(lambda kw: kw["lb"] < kw["ub"])
    if name == "kl_cov":
        return st.fixed_dictionaries({"frac": s([0.0, 2e-4, 0.1, 0.5, 1.0]), "coef": s([1.0, 0.1, 0.0])})
    if name == "high_entropy_mask":
        return st.fixed_dictionaries({"rho": s([0.05, 0.2, 0.5, 0.8, 1.0])})
    if name == "entropy_bonus":
        return st.one_of(
            st.fixed_dictionaries({"coef": s([1e-3, 0.05]), "schedule": st.just("constant")}),
            st.fixed_dictionaries(
                {
                    "coef": s([1e-3, 0.05]),
                    "schedule": s(["linear", "cosine"]),
                    "final_coef": s([0.0, 0.01]),
                    "total_steps": s([100, 300, 1000]),
                }
            ),
            st.fixed_dictionaries(
                {
                    "coef": s([0.0, 1e-3, 0.5]),
                    "adaptive": st.just(True),
                    "target": s([0.2, 0.7, 1.5]),
                    "delta": s([0.005, 0.3]),
                    "coef_max": s([1.0, 0.6]),
                }
            ),
        )
    if name == "ppl_shaping":
        return st.fixed_dictionaries(
            {
                "alpha": s([0.01, 0.3, 2.0]),
                "direction": s(["low", "high"]),
                "clamp": s([(0.8, 1.2), (0.5, 2.0), (1.0, 1.0)]),
                "robust": st.booleans(),
                "fence": s([1.5, 0.1]),
            }
        )
    if name == "position_bonus":
        return st.fixed_dictionaries(
            {
                "alpha": s([0.1, 1.0]),
                "k": s([15.0, 3.0]),
                "cap": s([0.5, 0.1]),
                "gate": s(["always", "always", "window", "stage"]),
            }
        )
    if name == "prob_weighted":
        return st.fixed_dictionaries({"alpha": s([0.0, 0.2, 1.0]), "prob_source": s(["old", "current"])})
    if name == "quadrant_mask":
        Q = T.QUADRANTS  # all four: only the undefined tokens are masked
        return st.fixed_dictionaries(
            {
                "keep": s([("pos_high",), ("neg_low",), ("pos_low", "neg_high"), ("pos_high", "neg_low"), Q]),
                "by": s(["deviation", "s_star"]),
                "in_normaliser": st.booleans(),
            }
        )
    if name == "entropy_target":
        common = {
            "gain": s([0.5, 0.1]),
            "ki": s([0.05, 0.3]),
            "w_min": s([0.0, 0.5]),
            "w_max": s([2.0, 1.5, 3.0]),
            "calibration": s([1.0, 0.05]),
            "by": s(["deviation", "s_star"]),
            "actuator": s(["bonus", "weights"]),
            "accelerate": st.booleans(),
            "coef_max": s([1.0, 0.1]),
        }
        return _with_schedules(common)
    if name == "entropic_pi":
        common = {"kp": s([1.0, 0.2]), "ki": s([0.1, 0.5]), "w_min": s([0.0, 0.5]), "w_max": s([2.0, 1.2])}
        return _with_schedules(common)
    raise KeyError(name)  # pragma: no cover


def _with_schedules(common: dict) -> st.SearchStrategy:
    """``common`` (a controller's parameters) with each target schedule."""
    s = st.sampled_from
    return st.one_of(
        st.fixed_dictionaries({**common, "schedule": st.just("hold"), "hold_step": s([0, 200, 1000])}),
        st.fixed_dictionaries({**common, "schedule": st.just("constant"), "target": s([0.2, 1.0, 2.5])}),
        st.fixed_dictionaries(
            {
                **common,
                "schedule": s(["linear", "cosine"]),
                "target": s([0.5, 2.0]),
                "final_target": s([None, 0.1]),
                "total_steps": s([100, 300]),
            }
        ),
    )


_RULE_STRATEGIES: dict[str, st.SearchStrategy] = {}


def rules_for(name: str) -> st.SearchStrategy:
    """A rule instance: ``name`` from :data:`RULES`, or ``"compose"`` (two rules in sequence)."""
    if name not in _RULE_STRATEGIES:  # built once: strategy construction is slow compared to drawing
        if name == "compose":
            first = st.sampled_from(
                ["clip_b", "clip_v", "clip_cov", "high_entropy_mask", "ppl_shaping", "quadrant_mask"]
            )
            second = st.sampled_from(["position_bonus", "entropy_bonus", "kl_cov", "prob_weighted"])
            strat = st.tuples(first.flatmap(rules_for), second.flatmap(rules_for)).map(R.Compose)
        else:
            strat = rule_params(name).map(lambda kw, cls=R.RULES[name]: cls(**kw))
        _RULE_STRATEGIES[name] = strat
    return _RULE_STRATEGIES[name]


def make_batch(be, d: BatchData, **override) -> R.TokenBatch:
    """The :class:`TokenBatch` of ``d`` on backend ``be`` (``override`` replaces numpy fields first)."""
    vals = {
        "logp": d.logp,
        "adv": d.adv,
        "valid": d.valid,
        "old_logp": d.old_logp,
        "entropy": d.entropy,
        "baseline": d.baseline,
        "group": d.group,
        "position": d.position,
    }
    vals.update(override)
    arrays = {k: (None if v is None else be.asarray(v)) for k, v in vals.items()}
    return R.TokenBatch(**arrays, step=d.step, stage=d.stage)


def _state_to_backend(be, state):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(_state_to_backend(be, s) for s in state)
    return be.asarray(np.asarray(state, dtype=np.float64))


def run_rule(be, rule, d: BatchData, *, state=None, **override):
    """Apply ``rule`` to ``d`` on backend ``be`` with the batch's noise; ``state`` given as numpy."""
    batch = make_batch(be, d, **override)
    return rule(batch, noise=be.asarray(d.noise), state=_state_to_backend(be, state))


def output_to_numpy(out) -> dict:
    """A :class:`RuleOutput` as a dict of numpy arrays / None (metrics and state converted too)."""
    from tests.conftest import to_numpy

    def conv(x):
        if x is None:
            return None
        if isinstance(x, tuple):
            return tuple(conv(v) for v in x)
        return to_numpy(x)

    return {
        "keep": conv(out.keep),
        "adv": conv(out.adv),
        "weight": conv(out.weight),
        "kl_coef": conv(out.kl_coef),
        "entropy_coef": conv(out.entropy_coef),
        "metrics": {k: conv(v) for k, v in out.metrics.items()},
        "state": conv(out.state),
    }


def initial_state_np(rule, rng_value: float | None = None):
    """A numpy state for ``rule`` (adaptive entropy bonus: ``rng_value`` or its init), else None."""
    if isinstance(rule, R.Compose):
        return tuple(initial_state_np(r, rng_value) for r in rule.rules)
    if isinstance(rule, R.EntropyBonus) and rule.adaptive and rng_value is not None:
        return np.float64(rng_value)
    held = 1.0 if (rng_value or 0.0) > 0.5 else 0.0  # the controllers: a held reference when c0 > 0.5
    if isinstance(rule, R.EntropyTarget) and rng_value is not None:
        c = float(rng_value)
        return tuple(np.float64(v) for v in (0.2 * c, 0.1 * c, 0.5 * c, 1.0 + c, held, 0.01 * c))
    if isinstance(rule, R.EntropicPI) and rng_value is not None:
        c = float(rng_value)
        return tuple(np.float64(v) for v in (0.5 * c, 1.0 + c, held))
    return None
