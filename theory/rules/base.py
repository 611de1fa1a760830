"""The rule interface: per-token batch statistics in, what to do to the loss out.

A *rule* is a frozen dataclass of hyperparameters. Calling it on a :class:`TokenBatch` returns a
:class:`RuleOutput`: which tokens stay in the loss (``keep``), reshaped advantages (``adv``), per-token
loss weights (``weight``), coefficients of two additive per-token penalty terms (``kl_coef`` for
``|log p - log p_old|`` as in KL-Cov, ``entropy_coef`` for ``-H`` as in an entropy bonus), metrics, and an
explicit ``state`` for the few rules that carry one (the adaptive entropy controller).

A rule never computes a loss. The backend (the toy's logit update, the trainer's surrogate) applies a
:class:`RuleOutput` in one place::

    per_token = weight * surrogate(adv) + kl_coef * |logp - old_logp| - entropy_coef * H
    loss      = aggregate(per_token over keep)

Design constraints (tested): the same code runs on NumPy and torch (array API); randomness only from
the caller's ``noise`` array; no host synchronisation (counts stay 0-d arrays); outputs carry no
gradient; every ratio is a fraction in [0, 1].

Non-finite inputs (``docs/rules.md`` "Non-finite inputs"), applied once, here, before any rule sees the
batch: a token where any given float field (``logp``, ``adv``, ``old_logp``, ``entropy``, ``baseline``,
``position``) is NaN or infinite is treated as not valid (``valid & finite``), its non-finite values are
replaced by 0 so that no statistic over the batch is contaminated, and the rule then runs as usual, so
``keep`` is False there. Float fields of less than 32 bits are computed in float32. Every output
carries the metric ``nonfinite_frac``: the fraction of the valid tokens that were left out this way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._xp import Array, exclude_nonfinite, namespace
from ..spec import build, normalise_name, parse_spec, split_composite
from ._stats import count, metric, safe_frac

__all__ = [
    "TokenBatch",
    "RuleOutput",
    "Rule",
    "Compose",
    "RULES",
    "register",
    "make_rule",
    "describe_rules",
]


def stop_gradient(x: Any) -> Any:
    """Detach torch tensors (also inside tuples) from the autograd graph; anything else is unchanged."""
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(stop_gradient(v) for v in x)
    detach = getattr(x, "detach", None)  # (no callable(): torch.compile cannot trace it on a method)
    return x if detach is None else detach()


@dataclass(frozen=True)
class TokenBatch:
    """Per-token statistics of one training batch, every array ``(B, T)`` in one namespace.

    Leading axes are allowed, ``(..., B, T)``: each leading index is an independent batch with its own
    statistics (the toy runs many seeds at once this way); ``group`` is then ``(..., B)`` and every
    metric has shape ``(...)``.

    Attributes:
        logp: log-prob of each sampled token under the current policy.
        adv: advantage of each token (a sequence's advantage broadcast over its tokens).
        valid: bool, True on response tokens that enter the loss (False on prompt and padding).
        old_logp: log-prob under the behaviour (rollout) policy; ``None`` means equal to ``logp``.
        entropy: entropy ``H`` of the next-token distribution at each position.
        baseline: ``E_p[S]`` at each position (E7), from ``theory.vocab_baseline``; Clip_V needs it.
        group: ``(B,)`` integer prompt id of each sequence (the GRPO group).
        position: relative position ``r`` in ``[0, 1)``; ``None`` means ``(t - 1) / |o_i|`` computed from
            ``valid`` (``t`` counts valid tokens from 1).
        step: the training step (python int), for schedules and step windows.
        stage: ``"rising"``, ``"plateau"`` or ``None`` (from :class:`theory.rules.StageDetector`).
    """

    logp: Array
    adv: Array
    valid: Array
    old_logp: Array | None = None
    entropy: Array | None = None
    baseline: Array | None = None
    group: Array | None = None
    position: Array | None = None
    step: int = 0
    stage: str | None = None

    def __post_init__(self):
        shape = tuple(self.logp.shape)
        if len(shape) < 2:
            raise ValueError(f"logp must have shape (B, T) or (..., B, T), got {shape}")
        for name in ("adv", "valid", "old_logp", "entropy", "baseline", "position"):
            a = getattr(self, name)
            if a is not None and tuple(a.shape) != shape:
                raise ValueError(f"{name} must have the shape of logp {shape}, got {tuple(a.shape)}")
        if self.group is not None and tuple(self.group.shape) != shape[:-1]:
            raise ValueError(f"group must have shape (..., B) = {shape[:-1]}, got {tuple(self.group.shape)}")
        if self.stage not in (None, "rising", "plateau"):
            raise ValueError(f"stage must be 'rising', 'plateau' or None, got {self.stage!r}")
        xp = namespace(self.logp)
        if self.valid.dtype != xp.bool:
            raise ValueError(f"valid must be a bool array, got dtype {self.valid.dtype}")

    @property
    def xp(self):
        return namespace(self.logp)

    def require(self, name: str, rule: str) -> Array:
        """Return the field ``name``, raising ``ValueError`` if the rule ``rule`` needs it but it is None."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{rule} needs TokenBatch.{name}, which is None")
        return value

    def behaviour_logp(self) -> Array:
        return self.logp if self.old_logp is None else self.old_logp

    def detached(self) -> TokenBatch:
        """The same batch with every array cut from the autograd graph (rules see only this)."""
        arrays = {
            f.name: stop_gradient(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in ("step", "stage")
        }
        return dataclasses.replace(self, **arrays)

    def replace(self, **changes) -> TokenBatch:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RuleOutput:
    """What a rule does to the loss; ``None`` fields mean "no change".

    Attributes:
        keep: ``(B, T)`` bool, tokens that stay in the loss *and* its normaliser (a subset of ``valid``).
        adv: ``(B, T)`` advantages to use in the surrogate.
        weight: ``(B, T)`` multiplier of each token's surrogate (0 = gradient detached, token still
            counted in the normaliser), or None.
        kl_coef: ``(B, T)`` coefficient of ``|logp - old_logp|`` added to each token's loss, or None.
        entropy_coef: ``(B, T)`` coefficient of ``-H`` added to each token's loss, or None.
        metrics: name -> 0-d array (fractions in [0, 1]); never converted to python numbers here.
        state: the rule's new state (rules with ``init_state``), else None.
    """

    keep: Array
    adv: Array
    weight: Array | None = None
    kl_coef: Array | None = None
    entropy_coef: Array | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    state: Any = None


#: the float fields of a TokenBatch that the non-finite policy checks (``None`` ones are skipped)
FLOAT_FIELDS = ("logp", "adv", "old_logp", "entropy", "baseline", "position")


def without_nonfinite(batch: TokenBatch) -> tuple[TokenBatch, Array]:
    """``(clean batch, nonfinite_frac)``: the non-finite policy of every rule (module docstring).

    A token whose :data:`FLOAT_FIELDS` that are not ``None`` are not all finite leaves ``valid``; every
    non-finite value (on any token, valid or not) becomes 0, and fields of less than 32 bits become
    float32 (:func:`theory._xp.exclude_nonfinite`). ``nonfinite_frac`` = (valid tokens that were
    non-finite) / (valid tokens), 0 for a batch without valid tokens, shape ``(...)`` for a ``(..., B, T)``
    batch; it stays an array (no host synchronisation).
    """
    xp = batch.xp
    finite, clean = exclude_nonfinite(xp, {name: getattr(batch, name) for name in FLOAT_FIELDS})
    like = clean["logp"]
    valid = batch.valid
    frac = metric(xp, safe_frac(xp, count(xp, valid & ~finite, like), count(xp, valid, like)))
    return batch.replace(valid=valid & finite, **clean), frac


class Rule:
    """Base class of every token rule: a frozen dataclass with ``name``, ``source`` and ``__call__``.

    Subclasses implement :meth:`apply`; ``__call__`` detaches the inputs first so no output can carry
    a gradient, applies the non-finite policy (:func:`without_nonfinite`: ``apply`` never sees a NaN or
    an infinity, and a token that had one is not valid) and adds the metric ``nonfinite_frac``.
    ``needs`` lists the optional :class:`TokenBatch` fields the rule reads.
    """

    name: ClassVar[str] = ""
    source: ClassVar[str] = ""
    kind: ClassVar[str] = "token"
    needs: ClassVar[tuple[str, ...]] = ()

    def init_state(self) -> Any:
        """Initial state for stateful rules; None for stateless ones."""
        return None

    def feedback(self, state: Any, measured_dh: Any) -> Any:
        """The state after the backend measured ``measured_dh``, the change of the batch's token-mean
        entropy that the last update (weighted by this rule, with this ``state`` out of it) produced.

        Backends call it on the steps where they measure that change (the diagnostic steps); rules that
        learn from the measurement (:class:`~theory.rules.EntropyTarget`'s calibration) override it, every
        other rule returns ``state`` unchanged. ``measured_dh``: a number or an array of the state's
        leading shape; no host synchronisation."""
        return state

    def __call__(self, batch: TokenBatch, *, noise: Array | None = None, state: Any = None) -> RuleOutput:
        clean, nonfinite_frac = without_nonfinite(batch.detached())
        return self._run(clean, stop_gradient(noise), stop_gradient(state), nonfinite_frac)

    def _run(self, batch: TokenBatch, noise: Array | None, state: Any, nonfinite_frac: Array) -> RuleOutput:
        """Apply the rule to a batch that is already detached and cleaned (:func:`without_nonfinite`)."""
        for name in self.needs:
            batch.require(name, type(self).__name__)
        out = self.apply(batch, noise=noise, state=state)
        metrics = {**out.metrics, "nonfinite_frac": nonfinite_frac}
        return RuleOutput(out.keep, out.adv, out.weight, out.kl_coef, out.entropy_coef, metrics, out.state)

    def apply(self, batch: TokenBatch, *, noise: Array | None, state: Any) -> RuleOutput:  # pragma: no cover
        raise NotImplementedError


def _combine(a, b, op):
    if a is None:
        return b
    if b is None:
        return a
    return op(a, b)


@dataclass(frozen=True)
class Compose(Rule):
    """Apply rules in the declared order, e.g. ``Compose((ClipB(), PositionBonus()))``.

    Rule ``i + 1`` sees the advantages produced by rule ``i``; every rule computes its batch statistics
    over the original ``valid`` tokens. Outputs combine as: ``keep`` AND, ``weight`` product,
    ``kl_coef`` and ``entropy_coef`` sum; metrics are prefixed with each rule's name; the state is a
    tuple of the members' states. ``noise`` is passed to every member.

    The non-finite policy is applied once, to the Compose's input: the members all see the same cleaned
    batch, the unprefixed ``nonfinite_frac`` is the Compose's, and each member's ``<name>/nonfinite_frac``
    is that same value (what the member would report if called alone on the input). An advantage that a
    member itself makes non-finite (an overflow) is passed on unchecked: it makes the loss non-finite,
    which the trainer refuses (``docs/rules.md`` "Non-finite inputs").
    """

    rules: tuple[Rule, ...] = ()
    name: ClassVar[str] = "compose"
    source: ClassVar[str] = "this project"

    def __post_init__(self):
        if not self.rules:
            raise ValueError("Compose needs at least one rule")
        for r in self.rules:
            if not isinstance(r, Rule):
                raise ValueError(f"Compose takes token rules, got {type(r).__name__}")

    def init_state(self):
        return tuple(r.init_state() for r in self.rules)

    def feedback(self, state: Any, measured_dh: Any) -> Any:
        """Each member's :meth:`Rule.feedback` on its own entry of the state (None: nothing applied yet)."""
        if state is None:
            return None
        return tuple(r.feedback(st, measured_dh) for r, st in zip(self.rules, state, strict=True))

    def _run(self, batch: TokenBatch, noise: Array | None, state: Any, nonfinite_frac: Array) -> RuleOutput:
        # ``batch`` is already detached and cleaned once, by Rule.__call__; the members run on it directly
        states = state if state is not None else self.init_state()
        if len(states) != len(self.rules):
            raise ValueError(f"state must hold one entry per rule ({len(self.rules)}), got {len(states)}")
        keep, adv = batch.valid, batch.adv
        weight = kl = ent = None
        metrics: dict[str, Any] = {}
        new_states = []
        names = [r.name for r in self.rules]
        for i, (rule, st) in enumerate(zip(self.rules, states, strict=True)):
            out = rule._run(batch.replace(adv=adv), noise, st, nonfinite_frac)
            repeat = names[: i + 1].count(rule.name)
            prefix = rule.name if names.count(rule.name) == 1 else f"{rule.name}#{repeat}"
            keep = keep & out.keep
            adv = out.adv
            weight = _combine(weight, out.weight, lambda x, y: x * y)
            kl = _combine(kl, out.kl_coef, lambda x, y: x + y)
            ent = _combine(ent, out.entropy_coef, lambda x, y: x + y)
            for k, v in out.metrics.items():
                metrics[f"{prefix}/{k}"] = v
            new_states.append(out.state)
        metrics["nonfinite_frac"] = nonfinite_frac
        return RuleOutput(keep, adv, weight, kl, ent, metrics, tuple(new_states))


#: name -> rule (or detector) class; filled by :func:`register`.
RULES: dict[str, type] = {}


def register(cls):
    """Class decorator: add a rule class to :data:`RULES` under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in RULES and RULES[cls.name] is not cls:
        raise ValueError(f"rule name {cls.name!r} is already registered by {RULES[cls.name].__name__}")
    RULES[cls.name] = cls
    return cls


def _token_rule_class(name: str):
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; registered: {', '.join(sorted(RULES))}")
    cls = RULES[name]
    if not (isinstance(cls, type) and issubclass(cls, Rule)):
        raise ValueError(f"{name!r} is a {getattr(cls, 'kind', 'helper')}, not a token rule")
    return cls


def make_rule(spec: str | dict | Rule) -> Rule:
    """Build a rule from a spec string, a dict, or return a rule unchanged.

    Spec strings name rules from :data:`RULES` with optional ``key=value`` parameters, composed with
    ``+`` in the order of application, e.g. ``"clip_b:mu=2.0,variant=paper+position_bonus:alpha=0.05"``.
    Tuple values use ``/``: ``"ppl_shaping:clamp=0.9/1.1"``. Dicts are ``{"name": ..., **params}``.
    Values are converted by :mod:`theory.spec` (the parser tasks and the stage detector share).
    """
    if isinstance(spec, Rule):
        return spec
    if isinstance(spec, dict):
        params = dict(spec)
        name = normalise_name(str(params.pop("name", None)))
        return build(_token_rule_class(name), name, params)
    parts = split_composite(spec)
    if not parts:
        raise ValueError("empty rule spec")
    rules = []
    for part in parts:
        name, params = parse_spec(part, "rule spec")
        rules.append(build(_token_rule_class(name), name, params))
    return rules[0] if len(rules) == 1 else Compose(tuple(rules))


def describe_rules() -> list[dict[str, Any]]:
    """One record per registered rule: name, class, kind, defaults, source and summary line."""
    out = []
    for name in sorted(RULES):
        cls = RULES[name]
        out.append(
            {
                "name": name,
                "class": cls.__name__,
                "kind": cls.kind,
                "defaults": {f.name: f.default for f in dataclasses.fields(cls)},
                "source": cls.source,
                "summary": (cls.__doc__ or "").strip().splitlines()[0],
            }
        )
    return out
