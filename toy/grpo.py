"""Vectorised GRPO and REINFORCE on softmax bandits, with the theory's predictions beside every update.

``R`` independent runs advance together in one array program. Each run has its own random stream
(``numpy.random.SeedSequence(seed).spawn(R)``), so run ``r`` of a batch gives exactly what it gives
alone. One :func:`step`:

1. samples ``G`` responses per prompt from ``p = softmax(z)``, ``z`` of shape ``(R, M, T, V)``;
2. scores them and computes advantages: group-normalised (GRPO, :func:`theory.grpo_advantages`) or
   reward minus a running per-prompt baseline (REINFORCE);
3. builds a :class:`theory.rules.TokenBatch` of shape ``(R, M*G, T)`` and applies the configured rule —
   **the one place where a rule's output meets the update** (``_apply_rule``; the PPO epochs apply it);
4. runs ``epochs`` PPO epochs on the same samples (ratio clipping with ``clip_low``/``clip_high``,
   token-mean / seq-mean / constant aggregation), each a gradient ascent step (SGD or Adam) on the
   policy's parameters;
5. records diagnostics. Cheap ones every step (reward, accuracy, pass@k, entropy overall / by polarity /
   by position); with ``diagnostics=True`` also the realised entropy change of every state
   (:func:`theory.exact_entropy_change`) beside the first- (E4) and second-order predictions for the
   *actual* update, the per-token (E6) prediction summed over tokens ("tabular prediction"), the quadrant
   breakdown (``sign(A) x sign(S* - E_p[S])``) with each quadrant's share, Cor 3.5's batch means (all
   computed by :mod:`theory.diagnostics`, the statistics every backend logs), and the rule's metrics.

Policies (:class:`GRPOConfig` ``policy``):

* ``"tabular"``: the logits are the parameters, ``z`` of shape ``(R, M, T, V)``. This is the setting of
  arXiv 2602.03392 §3-4, where (E6) summed over a batch's tokens *is* the first-order change (E4).
* ``"linear"``: a shared-feature linear softmax ``z[m, t] = Phi[m, t] @ w`` with fixed random features
  ``Phi`` of shape ``(M, T, V, d)`` and one parameter vector ``w`` of shape ``(R, d)``; one update moves
  every logit of every state. Because ``z`` is linear in ``w``, ``dz = Phi @ dw`` exactly, so (E4)
  applied to that ``dz`` is the exact parameter-space first-order prediction ``grad_w H . dw``; the
  per-token (E6) sum is then only the tabular approximation (see the ``coupling`` experiment).

NumPy only (never torch); every formula comes from :mod:`theory`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

import theory
from theory.diagnostics import batch_statistics, masked_mean, tabular_entropy_change
from theory.rules import Rule, TokenBatch, make_rule

from . import kernels
from .bandit import Bandit

__all__ = ["GRPOConfig", "ToyState", "init_state", "step", "policy_features", "is_diagnostic"]

#: keys :func:`step` returns only with ``diagnostics=True`` (prefixes; every other key comes every step)
DIAGNOSTIC_KEYS = ("dH_", "quad_", "rule/", "s_star_mean", "dev_mean", "param_step_norm")


def is_diagnostic(key: str) -> bool:
    """Whether :func:`step` returns ``key`` only with ``diagnostics=True``."""
    return key.startswith(DIAGNOSTIC_KEYS)


@dataclass(frozen=True)
class GRPOConfig:
    """Hyperparameters of toy GRPO / REINFORCE (names follow TRL/verl where they exist).

    Attributes:
        algorithm: ``"grpo"`` (group-normalised advantages) or ``"reinforce"`` (advantage = reward minus
            a running per-prompt mean reward with decay ``baseline_decay``; ``group_size`` may be 1).
        group_size: ``G`` responses per prompt (>= 2 for GRPO).
        lr: learning rate (> 0).
        optimizer: ``"sgd"`` or ``"adam"`` (betas 0.9/0.999, eps 1e-8).
        epochs: ``μ`` PPO epochs over the same samples (> 1 makes ratios differ from 1).
        clip_low / clip_high: ratio clip ``[1 - clip_low, 1 + clip_high]``; a larger ``clip_high`` is
            DAPO's clip-higher.
        aggregation: ``"token_mean"`` (DAPO), ``"seq_mean"`` (GRPO) or ``"constant"`` (Dr. GRPO:
            divide by ``M * G * T``).
        adv_scale / adv_eps: :func:`theory.grpo_advantages` options.
        rule: a rule, a spec string for :func:`theory.rules.make_rule`, or None.
        init_scale: initial parameters are ``init_scale * N(0, 1)`` (0: uniform policy).
        baseline_decay: REINFORCE's baseline EMA weight of the old value, in [0, 1).
        policy: ``"tabular"`` or ``"linear"`` (see the module docstring).
        n_features: ``d`` of the linear policy.
        feature_seed: seed of the linear policy's fixed features (shared by all runs).
        dtype: the parameters' and the rollout's float type. ``"float32"`` is faster (1.4x on the
            project's 2-core Xeon, ``BENCHMARKS.md``: half the bytes per pass); the theory diagnostics
            are always computed in float64.
        kernels: the backend of the dense passes over the logits (:mod:`toy.kernels`): ``"numba"``
            (compiled per-row loops, :mod:`toy.fused`; 2.5-3.2x faster a step), ``"numpy"``, or ``"auto"``
            (numba when installed). They agree to rounding, not bit for bit.
    """

    algorithm: Literal["grpo", "reinforce"] = "grpo"
    group_size: int = 8
    lr: float = 0.1
    optimizer: Literal["sgd", "adam"] = "sgd"
    epochs: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: Literal["token_mean", "seq_mean", "constant"] = "token_mean"
    adv_scale: Literal["group", "batch", "none"] = "group"
    adv_eps: float = 1e-6
    rule: Any = None
    init_scale: float = 0.0
    baseline_decay: float = 0.9
    policy: Literal["tabular", "linear"] = "tabular"
    n_features: int = 16
    feature_seed: int = 0
    dtype: Literal["float64", "float32"] = "float64"
    kernels: Literal["auto", "numba", "numpy"] = "auto"

    def __post_init__(self):
        if self.algorithm not in ("grpo", "reinforce"):
            raise ValueError(f"algorithm must be 'grpo' or 'reinforce', got {self.algorithm!r}")
        min_g = 2 if self.algorithm == "grpo" else 1
        if not isinstance(self.group_size, int | np.integer) or self.group_size < min_g:
            raise ValueError(f"group_size (G) must be an integer >= {min_g} for {self.algorithm}, "
                             f"got {self.group_size!r}")
        if not (isinstance(self.lr, int | float) and np.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs!r}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(f"clip_low/clip_high must be >= 0, got {self.clip_low!r}/{self.clip_high!r}")
        if self.aggregation not in ("token_mean", "seq_mean", "constant"):
            raise ValueError(f"aggregation must be token_mean/seq_mean/constant, got {self.aggregation!r}")
        if self.init_scale < 0:
            raise ValueError(f"init_scale must be >= 0, got {self.init_scale!r}")
        if not (0.0 <= self.baseline_decay < 1.0):
            raise ValueError(f"baseline_decay must lie in [0, 1), got {self.baseline_decay!r}")
        if self.policy not in ("tabular", "linear"):
            raise ValueError(f"policy must be 'tabular' or 'linear', got {self.policy!r}")
        if self.n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {self.n_features!r}")
        if self.dtype not in ("float64", "float32"):
            raise ValueError(f"dtype must be 'float64' or 'float32', got {self.dtype!r}")
        if self.kernels not in kernels.BACKENDS:
            raise ValueError(f"kernels must be one of {kernels.BACKENDS}, got {self.kernels!r}")
        if self.rule is not None and not isinstance(self.rule, Rule):
            object.__setattr__(self, "rule", make_rule(self.rule))


@dataclass
class ToyState:
    """Everything that changes during training (``R`` runs).

    ``params`` are the logits ``(R, M, T, V)`` (tabular policy) or ``w`` ``(R, d)`` (linear policy);
    ``features`` is ``Phi (M, T, V, d)`` for the linear policy, else None.
    """

    params: np.ndarray
    rngs: list[np.random.Generator]
    features: np.ndarray | None = None
    streams: kernels.RunStreams | None = None  # ``rngs`` drawn ahead (created by the first step)
    step: int = 0
    adam_m: np.ndarray | None = None
    adam_v: np.ndarray | None = None
    adam_t: int = 0
    baseline: np.ndarray | None = None  # REINFORCE: (R, M) running mean reward
    rule_state: Any = None
    stage: str | None = None
    extras: dict = field(default_factory=dict)

    @property
    def logits(self) -> np.ndarray:
        """The policy's logits ``(R, M, T, V)``."""
        if self.features is None:
            return self.params
        return np.einsum("mtvd,rd->rmtv", self.features, self.params, optimize=True)

    @property
    def runs(self) -> int:
        return self.params.shape[0]


def policy_features(bandit: Bandit, n_features: int, seed: int) -> np.ndarray:
    """Fixed random features ``Phi (M, T, V, d)`` of the linear policy, entries ``N(0, 1/d)``."""
    M, T, V = bandit.shape
    rng = np.random.default_rng(seed)
    return rng.standard_normal((M, T, V, n_features)) / np.sqrt(n_features)


def init_state(bandit: Bandit, cfg: GRPOConfig, *, runs: int = 1, seed: int = 0) -> ToyState:
    """``runs`` independent runs, run ``r`` seeded by ``SeedSequence(seed).spawn(runs)[r]``."""
    if not isinstance(runs, int | np.integer) or runs < 1:
        raise ValueError(f"runs must be an integer >= 1, got {runs!r}")
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(runs)]
    M, T, V = bandit.shape
    features = None
    if cfg.policy == "tabular":
        shape = (M, T, V)
    else:
        features = policy_features(bandit, cfg.n_features, cfg.feature_seed).astype(cfg.dtype)
        shape = (cfg.n_features,)
    if cfg.init_scale > 0:
        params = np.stack([cfg.init_scale * g.standard_normal(shape) for g in rngs]).astype(cfg.dtype)
    else:
        params = np.zeros((runs,) + shape, dtype=cfg.dtype)
    state = ToyState(params=params, rngs=rngs, features=features)
    if cfg.optimizer == "adam":
        state.adam_m, state.adam_v = np.zeros_like(params), np.zeros_like(params)
    if cfg.algorithm == "reinforce":
        state.baseline = np.zeros((runs, M))
    return state

# --------------------------------------------------------------------------------------------------
# array helpers (flat indices into (R, M, T, V) arrays)


def _flat_index(tokens: np.ndarray, V: int) -> np.ndarray:
    """Flat index into an ``(R, M, T, V)`` array of each token of ``tokens (R, M, G, T)``."""
    R, M, G, T = tokens.shape
    r = np.arange(R)[:, None, None, None]
    m = np.arange(M)[None, :, None, None]
    t = np.arange(T)[None, None, None, :]
    return ((r * M + m) * T + t) * V + tokens


def _gather(x: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """``x (R, M, T, V)`` at flat token indices ``(R, M, G, T)`` -> ``(R, M, G, T)``."""
    return x.reshape(-1)[flat]


def _batch_layout(x: np.ndarray) -> np.ndarray:
    """Per-token ``(R, M, G, T)`` -> ``(R, M*G, T)``: the layout of :class:`theory.rules.TokenBatch` and
    of :mod:`theory.diagnostics` (one row per response). A view unless ``x`` is a broadcast."""
    R, M, G, T = x.shape
    return np.ascontiguousarray(x).reshape(R, M * G, T)


def _all_valid(shape: tuple[int, ...]) -> np.ndarray:
    """Every token of an ``(R, M, G, T)`` batch is a response token: the ``valid`` mask ``(R, M*G, T)``."""
    R, M, G, T = shape
    return np.ones((R, M * G, T), dtype=bool)


def _token_logp(z: np.ndarray, m: np.ndarray, logZ: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """``log p = (z - m) - log Z`` of each sampled token ``(R, M, G, T)`` from the logits ``z`` and the
    softmax parts ``m`` (each state's maximum logit) and ``log Z``."""
    state = flat // z.shape[-1]
    return (_gather(z, flat) - m.reshape(-1)[state]) - logZ.reshape(-1)[state]


# --------------------------------------------------------------------------------------------------
# the phases of one step


def _draw(state: ToyState, M: int, T: int, G: int):
    """Every uniform a step needs, from each run's own stream (drawn ahead in blocks of steps by
    :class:`toy.kernels.RunStreams`, the same numbers as one call per run and step): tokens
    ``(R, M, T, G)``, rewards ``(R, M, G)`` and rule noise ``(R, M*G, T)``. The noise is drawn even
    without a rule: every configuration sees the same samples (common random numbers), so a rule that
    changes nothing reproduces plain GRPO exactly."""
    n_tok, n_rew = M * T * G, M * G
    if state.streams is None or state.streams.rngs is not state.rngs:
        if state.streams is not None and state.streams.pending:
            raise ValueError("state.rngs was replaced while its generators had run ahead of the steps "
                             f"({state.streams.pending} uniforms per run pending): slice state.streams "
                             "with .select() as well")
        state.streams = kernels.RunStreams(state.rngs)
    u = state.streams.take(n_tok + n_rew + M * G * T)  # (R, n), one row per run's own stream
    R = u.shape[0]
    u_tok = u[:, :n_tok].reshape(R, M, T, G)
    u_rew = u[:, n_tok : n_tok + n_rew].reshape(R, M, G)
    noise = u[:, n_tok + n_rew :].reshape(R, M * G, T)
    return u_tok, u_rew, noise


def _advantages(bandit: Bandit, cfg: GRPOConfig, state: ToyState, rewards: np.ndarray) -> np.ndarray:
    """Sequence advantages ``(R, M, G)``."""
    if cfg.algorithm == "grpo":
        return theory.grpo_advantages(rewards, scale=cfg.adv_scale, eps=cfg.adv_eps)
    adv = rewards - state.baseline[..., None]
    d = cfg.baseline_decay
    state.baseline = d * state.baseline + (1 - d) * rewards.mean(axis=-1)
    return adv


@dataclass
class _Rollout:
    """One step's samples under the behaviour policy ``z0`` (token arrays ``(R, M, G, T)``)."""

    tokens: np.ndarray  # sampled token ids
    flat: np.ndarray  # their flat indices into (R, M, T, V) arrays
    correct: np.ndarray  # (R, M, G) bool: the response is correct
    rewards: np.ndarray  # (R, M, G)
    adv: np.ndarray  # each token's sequence advantage (a broadcast view of (R, M, G))
    noise: np.ndarray  # (R, M*G, T) the rule's uniforms
    z: np.ndarray  # the behaviour logits z0 (tabular: the parameters, which the update changes in place)
    m: np.ndarray  # the softmax parts of z0 (:func:`toy.kernels.softmax_parts`; e in the workspace)
    e: np.ndarray
    Z: np.ndarray
    logZ: np.ndarray
    H: np.ndarray  # (R, M, T) the entropy of every state


def _rollout(bandit: Bandit, cfg: GRPOConfig, state: ToyState, table: np.ndarray, z0: np.ndarray,
             work: dict[str, np.ndarray]) -> _Rollout:
    """Sample ``G`` responses per prompt from ``softmax(z0)``, score them, compute their advantages.

    Per-run random streams, so a run does not depend on the others.
    """
    M, T, V = bandit.shape
    u_tok, u_rew, noise = _draw(state, M, T, cfg.group_size)
    # z - max z, exp of it (unnormalised p), sum, log sum, entropy, and the samples: one dense pass
    m0, e0, Z0, logZ0, H0, tok = kernels.softmax_parts(z0, work, u_tok,
                                                       backend=kernels.resolve_backend(cfg.kernels))
    tokens = np.moveaxis(tok, -1, 2)  # (R, M, G, T)
    correct = bandit.score(tokens, table)  # (R, M, G)
    rewards = bandit.rewards(correct, u_rew)
    adv = np.broadcast_to(_advantages(bandit, cfg, state, rewards)[..., None], tokens.shape)
    return _Rollout(tokens, _flat_index(tokens, V), correct, rewards, adv, noise, z0, m0, e0, Z0, logZ0, H0)


@dataclass
class _Behaviour:
    """Token statistics under the behaviour policy (theory functions); ``(R, M, G, T)`` per token."""

    H: np.ndarray  # (R, M, T) entropy of every state
    logp: np.ndarray  # float64 log p of each sampled token
    H_tok: np.ndarray  # the entropy at each token's state (a broadcast view)
    baseline: np.ndarray | None = None  # E_p[S] (E7) at each token's state; with the theory statistics
    s_star: np.ndarray | None = None  # S* (E1)
    dev: np.ndarray | None = None  # S* - E_p[S]


def _behaviour_stats(z0: np.ndarray, ro: _Rollout, *, theory_stats: bool, float64: bool) -> _Behaviour:
    """Entropy and ``log p`` of the sampled tokens (from the sampling pass); with ``theory_stats`` also
    ``S*``, ``E_p[S]`` and the deviation, in float64 when ``float64`` (whenever the theory is checked)."""
    H0 = ro.H  # log Z - sum_i e_i s_i / Z: the computation of theory.entropy
    beh = _Behaviour(H0, _token_logp(ro.z, ro.m, ro.logZ, ro.flat).astype(np.float64),
                     np.broadcast_to(H0[:, :, None], ro.tokens.shape))
    if theory_stats:
        f = np.float64 if float64 else z0.dtype
        base0 = theory.vocab_baseline(z0.astype(f, copy=False))  # (R, M, T)  E_p[S] (E7)
        beh.baseline = np.broadcast_to(base0[:, :, None], ro.tokens.shape)
        beh.s_star = theory.s_star(beh.logp.astype(f, copy=False), beh.H_tok.astype(f, copy=False))
        beh.dev = beh.s_star - beh.baseline
    return beh


@dataclass
class _Update:
    """What the update applies to each token ``(R, M, G, T)``: the rule's output, or plain GRPO's."""

    adv: np.ndarray
    keep: np.ndarray | None = None
    weight: np.ndarray | None = None
    kl_coef: np.ndarray | None = None
    entropy_coef: np.ndarray | None = None
    metrics: dict = field(default_factory=dict)  # the rule's, reported as ``rule/<name>``


def _apply_rule(cfg: GRPOConfig, state: ToyState, ro: _Rollout, beh: _Behaviour) -> _Update:
    """Apply ``cfg.rule`` to the batch: **the one place where a rule's output meets the update** (what
    :func:`_ppo_epochs` then applies). Without a rule, the plain advantages."""
    if cfg.rule is None:
        return _Update(adv=ro.adv)
    R, M, G, T = ro.tokens.shape
    batch = TokenBatch(
        logp=_batch_layout(beh.logp),
        adv=_batch_layout(ro.adv),
        valid=_all_valid(ro.tokens.shape),
        entropy=_batch_layout(beh.H_tok),
        baseline=_batch_layout(beh.baseline),
        group=np.broadcast_to(np.repeat(np.arange(M), G)[None], (R, M * G)),
        step=state.step,
        stage=state.stage,
    )
    out = cfg.rule(batch, noise=ro.noise, state=state.rule_state)
    state.rule_state = out.state
    unflat = lambda x: None if x is None else x.reshape(R, M, G, T)  # noqa: E731
    return _Update(adv=unflat(out.adv), keep=unflat(out.keep), weight=unflat(out.weight),
                   kl_coef=unflat(out.kl_coef), entropy_coef=unflat(out.entropy_coef), metrics=out.metrics)


def _normaliser(cfg: GRPOConfig, keep: np.ndarray | None, shape: tuple[int, ...]):
    """``(keep_f, scale)``: the kept tokens as floats and each token's loss weight (the aggregation)."""
    R, M, G, T = shape
    keep_f = np.ones(shape) if keep is None else keep.astype(np.float64)
    if keep is None and cfg.aggregation != "constant":  # every token kept: the counts are known (exactly)
        scale = keep_f / (M * G * T)
    elif cfg.aggregation == "token_mean":
        scale = keep_f / np.maximum(keep_f.sum(axis=(1, 2, 3), keepdims=True), 1.0)
    elif cfg.aggregation == "seq_mean":
        scale = keep_f / (np.maximum(keep_f.sum(axis=-1, keepdims=True), 1.0) * (M * G))
    else:
        scale = keep_f / (M * G * T)
    return keep_f, scale


def _ppo_epochs(cfg: GRPOConfig, state: ToyState, ro: _Rollout, beh: _Behaviour, upd: _Update,
                scale: np.ndarray, z0: np.ndarray, work: dict[str, np.ndarray]):
    """``cfg.epochs`` gradient-ascent steps on the clipped surrogate, in place on ``state.params``.

    Returns ``(first_coef, ratio_clipped)``: the first epoch's ``d objective / d log p_k`` per token and
    the tokens any epoch's ratio clip zeroed. ``z0`` are the behaviour logits (not updated in place).
    """
    flat, adv, logp_old = ro.flat, upd.adv, beh.logp
    ratio_clipped = np.zeros(ro.tokens.shape, dtype=bool)
    first_coef = None
    z, e, Z = z0, ro.e, ro.Z
    backend = kernels.resolve_backend(cfg.kernels)
    for epoch in range(cfg.epochs):
        if epoch > 0:
            z = state.logits
            m, e, Z, logZ, _, _ = kernels.softmax_parts(z, work, entropy=False, backend=backend)
            logp = _token_logp(z, m, logZ, flat)
        else:
            logp = logp_old
        ratio = np.exp(logp - logp_old)
        clipped = ((adv > 0) & (ratio > 1 + cfg.clip_high)) | ((adv < 0) & (ratio < 1 - cfg.clip_low))
        ratio_clipped |= clipped
        w_adv = adv if upd.weight is None else upd.weight * adv
        coef = np.where(clipped, 0.0, w_adv * ratio) * scale  # d objective / d log p_k
        if upd.kl_coef is not None:  # loss += kl |logp - logp_old|  ->  objective gradient -kl sign(.)
            coef = coef - upd.kl_coef * np.sign(logp - logp_old) * scale
        if epoch == 0:
            first_coef = coef
        if state.features is None and cfg.optimizer == "sgd" and upd.entropy_coef is None:
            # sum_k coef_k (e_k - p) (E5) and the SGD step on the logits, block by block in cache
            kernels.logit_gradient(coef, flat, e, Z, work["g"], sgd_params=state.params, lr=cfg.lr,
                                   backend=backend)
            continue
        grad_z = kernels.logit_gradient(coef, flat, e, Z, work["g"], backend=backend)  # (E5)
        if upd.entropy_coef is not None:  # objective += c H  ->  logit gradient -c S (E2) at the state
            c_state = (upd.entropy_coef * scale).sum(axis=2)  # (R, M, T)
            grad_z -= c_state[..., None] * theory.discriminator(z)
        if state.features is None:
            grad = grad_z
        else:  # chain rule through z = Phi @ w
            grad = np.einsum("mtvd,rmtv->rd", state.features, grad_z, optimize=True)
        state.params += _optimizer_update(cfg, state, grad)  # in place: ``grad`` is ours to reuse
    return first_coef, ratio_clipped


def _cheap_diagnostics(cfg: GRPOConfig, ro: _Rollout, beh: _Behaviour, keep_f: np.ndarray,
                       ratio_clipped: np.ndarray) -> dict[str, np.ndarray]:
    """The keys of every step: reward, accuracy, pass@k, entropy (overall, by advantage sign, by position)."""
    G = cfg.group_size
    n_corr = ro.correct.sum(axis=-1)
    H_tok, adv = _batch_layout(beh.H_tok).astype(np.float64, copy=False), _batch_layout(ro.adv)
    return {
        "reward": ro.rewards.mean(axis=(1, 2)),
        "accuracy": ro.correct.mean(axis=(1, 2)),
        "pass_at_1": theory.pass_at_k(G, n_corr, 1).mean(axis=-1),
        f"pass_at_{G}": theory.pass_at_k(G, n_corr, G).mean(axis=-1),
        "entropy": beh.H.mean(axis=(1, 2)),
        "entropy_pos": masked_mean(H_tok, adv > 0),  # 0 for a run without a positive token
        "entropy_neg": masked_mean(H_tok, adv < 0),
        "entropy_by_pos": beh.H.mean(axis=1),  # (R, T)
        "keep_frac": keep_f.mean(axis=(1, 2, 3)),
        "ratio_clip_frac": ratio_clipped.mean(axis=(1, 2, 3)),
    }


def _theory_diagnostics(cfg: GRPOConfig, state: ToyState, ro: _Rollout, beh: _Behaviour, upd: _Update,
                        z0: np.ndarray, params0: np.ndarray, first_coef: np.ndarray) -> dict[str, np.ndarray]:
    """The theory-vs-exact keys (``diagnostics=True``; :data:`DIAGNOSTIC_KEYS`), after the update.

    The realised entropy change of every state beside (E4) and the second order on the actual update
    ``dz``; the batch statistics of :mod:`theory.diagnostics` (``S*`` and deviation means, quadrant
    shares by the update's advantages); the tabular prediction: each token's own (E6) term with
    ``alpha = lr * coef`` of the first epoch (E5), summed over tokens and divided by the ``M * T`` states
    (exactly (E4) for a tabular SGD step with ``mu = 1``), by quadrant and by the sign of ``A``.
    """
    R, M, G, T = ro.tokens.shape
    dz = state.logits.astype(np.float64) - z0  # the realised update, exactly
    tok = _batch_layout  # (R, M, G, T) -> (R, M*G, T), the layout of theory.diagnostics
    valid, adv = _all_valid(ro.tokens.shape), tok(upd.adv)
    stats = batch_statistics(
        entropy=tok(beh.H_tok).astype(np.float64, copy=False), logp=tok(beh.logp), s_star=tok(beh.s_star),
        baseline=tok(beh.baseline), adv=tok(ro.adv), valid=valid, adv_eff=adv,
    )
    alpha = theory.effective_step_size(cfg.lr, tok(first_coef))  # lr * coef of each token (E5)
    dev = tok(beh.dev)
    dH_tokens, by_quad = tabular_entropy_change(alpha, dev, adv, valid, per=M * T)
    if upd.adv is ro.adv:  # the dH by the sign of A: two quadrants each (tokens with A = 0 add nothing)
        by_sign = by_quad
    else:  # a rule changed the advantages: the quadrants of the sampled ones
        by_sign = tabular_entropy_change(alpha, dev, tok(ro.adv), valid, per=M * T)[1]
    out = {
        "dH_exact": theory.exact_entropy_change(z0, dz).mean(axis=(1, 2)),
        "dH_first": theory.entropy_change_first_order(z0, dz).mean(axis=(1, 2)),
        "dH_second": theory.entropy_change_second_order(z0, dz).mean(axis=(1, 2)),
        "dH_tokens_first": dH_tokens,
        "s_star_mean": stats["s_star/mean"],
        "dev_mean": stats["deviation/mean"],
        "param_step_norm": np.sqrt(((state.params - params0) ** 2).reshape(R, -1).sum(axis=1)),
    }
    for name in theory.QUADRANTS:
        out[f"quad_{name}_frac"] = stats[f"quad/{name}_frac"]
        out[f"quad_{name}_dH"] = by_quad[name]
    out["dH_neg_first"] = by_sign["neg_high"] + by_sign["neg_low"]
    out["dH_pos_first"] = by_sign["pos_high"] + by_sign["pos_low"]
    for k, v in upd.metrics.items():
        out[f"rule/{k}"] = np.broadcast_to(np.asarray(v, dtype=np.float64), (R,)).copy()
    return out


def step(
    bandit: Bandit,
    cfg: GRPOConfig,
    state: ToyState,
    *,
    table: np.ndarray | None = None,
    diagnostics: bool = True,
) -> dict:
    """One GRPO/REINFORCE step for every run (updates ``state`` in place).

    Returns per-run diagnostics: arrays of shape ``(R,)`` (``entropy_by_pos`` is ``(R, T)``). The cheap
    keys (reward, accuracy, pass@k, entropies, ``keep_frac``, ``ratio_clip_frac``) are always present;
    ``diagnostics=True`` adds the theory-vs-exact keys documented in the README and the rule's metrics
    (``rule/<name>``) — the keys :func:`is_diagnostic` names.
    """
    table = bandit.correct_table() if table is None else table
    z0 = state.logits  # (R, M, T, V)
    if z0.shape[1:] != bandit.shape:
        M, T, V = bandit.shape
        raise ValueError(f"state logits have shape {z0.shape}, the bandit needs (R, {M}, {T}, {V})")
    work = kernels.workspace(state.extras, z0)
    ro = _rollout(bandit, cfg, state, table, z0, work)  # 1. samples, rewards, advantages
    beh = _behaviour_stats(z0, ro, theory_stats=diagnostics or cfg.rule is not None,
                           float64=diagnostics)  # 2. H, log p, S*, E_p[S] under the behaviour policy
    upd = _apply_rule(cfg, state, ro, beh)  # 3. the rule's output (or the plain advantages)
    keep_f, scale = _normaliser(cfg, upd.keep, ro.tokens.shape)  # 4. the loss aggregation
    params0 = state.params.copy() if diagnostics else None
    if diagnostics:  # the behaviour logits in float64; the update is in place
        z0 = (params0 if state.features is None else z0).astype(np.float64)
    first_coef, ratio_clipped = _ppo_epochs(cfg, state, ro, beh, upd, scale, z0, work)  # 5. the update
    diag = _cheap_diagnostics(cfg, ro, beh, keep_f, ratio_clipped)  # 6. diagnostics
    if diagnostics:
        diag.update(_theory_diagnostics(cfg, state, ro, beh, upd, z0, params0, first_coef))
        if cfg.rule is not None:  # 7. what the update did to the batch's entropy, for the rule's state
            state.rule_state = cfg.rule.feedback(state.rule_state, diag["dH_exact"])
    state.step += 1
    return diag


def _optimizer_update(cfg: GRPOConfig, state: ToyState, grad: np.ndarray) -> np.ndarray:
    """The parameter change for ascent direction ``grad`` (SGD or Adam, bias-corrected)."""
    if cfg.optimizer == "sgd":
        grad *= cfg.lr
        return grad
    b1, b2, eps = 0.9, 0.999, 1e-8
    state.adam_t += 1
    t = state.adam_t
    state.adam_m = b1 * state.adam_m + (1 - b1) * grad
    state.adam_v = b2 * state.adam_v + (1 - b2) * grad * grad
    m_hat = state.adam_m / (1 - b1**t)
    v_hat = state.adam_v / (1 - b2**t)
    return cfg.lr * m_hat / (np.sqrt(v_hat) + eps)
