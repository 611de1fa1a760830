"""Vectorised GRPO and REINFORCE on softmax bandits, with the theory's predictions beside every update.

``R`` independent runs advance together in one array program. Each run has its own random stream
(``numpy.random.SeedSequence(seed).spawn(R)``), so run ``r`` of a batch gives exactly what it gives
alone. One :func:`step`:

1. samples ``G`` responses per prompt from ``p = softmax(z)``, ``z`` of shape ``(R, M, T, V)``;
2. scores them and computes advantages: group-normalised (GRPO, :func:`theory.grpo_advantages`) or
   reward minus a running per-prompt baseline (REINFORCE);
3. builds a :class:`theory.rules.TokenBatch` of shape ``(R, M*G, T)`` and applies the configured rule —
   **the one place where a rule's output meets the update** (the PPO-epoch loop of :func:`step`);
4. runs ``epochs`` PPO epochs on the same samples (ratio clipping with ``clip_low``/``clip_high``,
   token-mean / seq-mean / constant aggregation), each a gradient ascent step (SGD or Adam) on the
   policy's parameters;
5. records diagnostics. Cheap ones every step (reward, accuracy, pass@k, entropy overall / by polarity /
   by position); with ``diagnostics=True`` also the realised entropy change of every state
   (:func:`theory.exact_entropy_change`) beside the first- (E4) and second-order predictions for the
   *actual* update, the per-token (E6) prediction summed over tokens ("tabular prediction"), the quadrant
   breakdown (``sign(A) x sign(S* - E_p[S])``) with each quadrant's share, Cor 3.5's batch means, and
   the rule's metrics.

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
from theory.rules import Rule, TokenBatch, make_rule

from .bandit import Bandit, sample_tokens

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
        dtype: the parameters' and the rollout's float type. ``"float32"`` is ~3x faster here (NumPy's
            float64 ``exp`` is not vectorised); the theory diagnostics are always computed in float64.
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


def _logit_gradient(coef: np.ndarray, tokens: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Sum over tokens of ``coef * (e_k - p)`` at each state: ``(R, M, G, T)`` -> ``(R, M, T, V)``.

    ``d log p_k / dz = e_k - p`` (E5), so this is the logit gradient of ``sum coef * log p_k``.
    """
    V = p.shape[-1]
    grad = -coef.sum(axis=2)[..., None] * p  # (R, M, T, V)
    np.add.at(grad.reshape(-1), _flat_index(tokens, V).ravel(), coef.ravel())
    return grad


def _workspace(state: ToyState, z: np.ndarray) -> dict[str, np.ndarray]:
    """Three ``(R, M, T, V)`` scratch arrays kept in the state: a step allocates no large array.

    Fresh multi-MB arrays cost page faults on every step (about as much as the arithmetic here).
    """
    work = state.extras.get("work")
    if work is None or work["s"].shape != z.shape or work["s"].dtype != z.dtype:
        work = {k: np.empty_like(z) for k in ("s", "e", "g")}
        state.extras["work"] = work
    return work


def _softmax_parts(z: np.ndarray, work: dict[str, np.ndarray]):
    """``s = z - max z``, ``e = exp(s)`` (into ``work``), ``Z = sum e`` and ``log Z`` (``(R, M, T)``).

    The shared first half of every softmax computation (as ``theory._xp.shifted_exp``): ``p = e / Z``,
    ``log p = s - log Z``, ``H = log Z - sum(e s) / Z``. Toy logits are always finite.
    """
    s, e = work["s"], work["e"]
    np.subtract(z, z.max(axis=-1, keepdims=True), out=s)
    np.exp(s, out=e)
    Z = e.sum(axis=-1)
    return s, e, Z, np.log(Z)


# --------------------------------------------------------------------------------------------------


def _draw(state: ToyState, M: int, T: int, G: int):
    """Every uniform a step needs, one call per run: tokens ``(R, M, T, G)``, rewards ``(R, M, G)`` and
    rule noise ``(R, M*G, T)``. The noise is drawn even without a rule: every configuration sees the same
    samples (common random numbers), so a rule that changes nothing reproduces plain GRPO exactly."""
    n_tok, n_rew = M * T * G, M * G
    u = np.stack([g.random(n_tok + n_rew + M * G * T) for g in state.rngs])  # (R, n)
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
    M, T, V = bandit.shape
    G = cfg.group_size
    z0 = state.logits  # (R, M, T, V)
    if z0.shape[1:] != (M, T, V):
        raise ValueError(f"state logits have shape {z0.shape}, the bandit needs (R, {M}, {T}, {V})")
    R = z0.shape[0]
    rule = cfg.rule
    need_stats = diagnostics or rule is not None

    # --- rollout: per-run streams, so a run does not depend on the others ----------------------------
    u_tok, u_rew, noise = _draw(state, M, T, G)
    work = _workspace(state, z0)
    s0, e0, Z0, logZ0 = _softmax_parts(z0, work)  # z - max z, exp of it (unnormalised p), sum, log sum
    tokens = np.moveaxis(sample_tokens(e0, u_tok), -1, 2)  # (R, M, G, T)
    flat = _flat_index(tokens, V)
    correct = bandit.score(tokens, table)  # (R, M, G)
    rewards = bandit.rewards(correct, u_rew)
    adv_seq = _advantages(bandit, cfg, state, rewards)  # (R, M, G)

    # --- token statistics under the behaviour policy (theory functions) ------------------------------
    # H = log Z - sum_i e_i s_i / Z: the computation of theory.entropy, reusing the sampling pass
    H0 = logZ0 - np.multiply(e0, s0, out=work["g"]).sum(axis=-1) / Z0  # (R, M, T)
    logp_old = (_gather(s0, flat) - logZ0.reshape(-1)[flat // V]).astype(np.float64)  # (R, M, G, T)
    adv_tok = np.broadcast_to(adv_seq[..., None], tokens.shape)
    H_tok = np.broadcast_to(H0[:, :, None], tokens.shape)
    if need_stats:  # in float64 whenever the theory is checked
        f = np.float64 if diagnostics else z0.dtype
        base0 = theory.vocab_baseline(z0.astype(f, copy=False))  # (R, M, T)  E_p[S] (E7)
        base_tok = np.broadcast_to(base0[:, :, None], tokens.shape)
        s_star = theory.s_star(logp_old.astype(f, copy=False), H_tok.astype(f, copy=False))  # (R, M, G, T)
        dev = s_star - base_tok  # S* - E_p[S]

    out = None
    if rule is not None:
        fl = lambda x: np.ascontiguousarray(x).reshape(R, M * G, T)  # noqa: E731
        batch = TokenBatch(
            logp=fl(logp_old),
            adv=fl(adv_tok),
            valid=np.ones((R, M * G, T), dtype=bool),
            entropy=fl(H_tok),
            baseline=fl(base_tok),
            group=np.broadcast_to(np.repeat(np.arange(M), G)[None], (R, M * G)),
            step=state.step,
            stage=state.stage,
        )
        out = rule(batch, noise=noise, state=state.rule_state)
        state.rule_state = out.state
    unflat = lambda x: x.reshape(R, M, G, T)  # noqa: E731
    keep = unflat(out.keep) if out is not None else None
    adv = unflat(out.adv) if out is not None else adv_tok
    weight = unflat(out.weight) if out is not None and out.weight is not None else None
    kl_coef = unflat(out.kl_coef) if out is not None and out.kl_coef is not None else None
    ent_coef = unflat(out.entropy_coef) if out is not None and out.entropy_coef is not None else None

    # --- loss normaliser per token (aggregation) -----------------------------------------------------
    keep_f = np.ones(tokens.shape) if keep is None else keep.astype(np.float64)
    if cfg.aggregation == "token_mean":
        scale = keep_f / np.maximum(keep_f.sum(axis=(1, 2, 3), keepdims=True), 1.0)
    elif cfg.aggregation == "seq_mean":
        scale = keep_f / (np.maximum(keep_f.sum(axis=-1, keepdims=True), 1.0) * (M * G))
    else:
        scale = keep_f / (M * G * T)

    # --- PPO epochs: gradient ascent on the clipped surrogate; THE place rule output is applied -----
    params0 = state.params.copy() if diagnostics else None
    if diagnostics:
        z0 = (params0 if state.features is None else z0).astype(np.float64)  # the update is in place
    ratio_clipped = np.zeros(tokens.shape, dtype=bool)
    first_coef = None
    z, e, Z = z0, e0, Z0
    for epoch in range(cfg.epochs):
        if epoch > 0:
            z = state.logits
            s, e, Z, logZ = _softmax_parts(z, work)
            logp = _gather(s, flat) - logZ.reshape(-1)[flat // V]
        else:
            logp = logp_old
        ratio = np.exp(logp - logp_old)
        clipped = ((adv > 0) & (ratio > 1 + cfg.clip_high)) | ((adv < 0) & (ratio < 1 - cfg.clip_low))
        ratio_clipped |= clipped
        w_adv = adv if weight is None else weight * adv
        coef = np.where(clipped, 0.0, w_adv * ratio) * scale  # d objective / d log p_k
        if kl_coef is not None:  # loss += kl |logp - logp_old|  ->  objective gradient -kl sign(.)
            coef = coef - kl_coef * np.sign(logp - logp_old) * scale
        if epoch == 0:
            first_coef = coef
        # logit gradient sum_k coef_k (e_k - p) (E5), with p = e / Z
        factor = (-coef.sum(axis=2) / Z).astype(e.dtype)[..., None]  # (R, M, T, 1), policy's dtype
        grad_z = np.multiply(e, factor, out=work["g"])  # reuses the workspace: no page faults
        np.add.at(grad_z.reshape(-1), flat.ravel(), coef.ravel())
        if ent_coef is not None:  # objective += c H  ->  logit gradient -c S (E2) at the token's state
            c_state = (ent_coef * scale).sum(axis=2)  # (R, M, T)
            grad_z -= c_state[..., None] * theory.discriminator(z)
        if state.features is None:
            grad = grad_z
        else:  # chain rule through z = Phi @ w
            grad = np.einsum("mtvd,rmtv->rd", state.features, grad_z, optimize=True)
        state.params += _optimizer_update(cfg, state, grad)  # in place: ``grad`` is ours to reuse

    # --- diagnostics ---------------------------------------------------------------------------------
    n_corr = correct.sum(axis=-1)
    pos, neg = adv_tok > 0, adv_tok < 0
    diag: dict[str, np.ndarray] = {
        "reward": rewards.mean(axis=(1, 2)),
        "accuracy": correct.mean(axis=(1, 2)),
        "pass_at_1": theory.pass_at_k(G, n_corr, 1).mean(axis=-1),
        f"pass_at_{G}": theory.pass_at_k(G, n_corr, G).mean(axis=-1),
        "entropy": H0.mean(axis=(1, 2)),
        "entropy_pos": _masked_mean(H_tok, pos),
        "entropy_neg": _masked_mean(H_tok, neg),
        "entropy_by_pos": H0.mean(axis=1),  # (R, T)
        "keep_frac": keep_f.mean(axis=(1, 2, 3)),
        "ratio_clip_frac": ratio_clipped.mean(axis=(1, 2, 3)),
    }
    if diagnostics:
        dz = state.logits.astype(np.float64) - z0  # the realised update, exactly
        dH_exact = theory.exact_entropy_change(z0, dz)  # (R, M, T)
        # each token's own (E6) term -alpha (S* - E_p[S]) with alpha = lr * coef of the first epoch:
        # the tabular first-order prediction (exactly E4 for a tabular SGD step with mu = 1)
        contrib = -cfg.lr * first_coef * dev  # (R, M, G, T)
        quad = theory.quadrant(adv, dev)
        MT = M * T
        diag.update({
            "dH_exact": dH_exact.mean(axis=(1, 2)),
            "dH_first": theory.entropy_change_first_order(z0, dz).mean(axis=(1, 2)),
            "dH_second": theory.entropy_change_second_order(z0, dz).mean(axis=(1, 2)),
            "dH_tokens_first": contrib.sum(axis=(1, 2, 3)) / MT,
            "s_star_mean": s_star.mean(axis=(1, 2, 3)),
            "dev_mean": dev.mean(axis=(1, 2, 3)),
            "param_step_norm": np.sqrt(((state.params - params0) ** 2).reshape(R, -1).sum(axis=1)),
        })
        for code, name in enumerate(theory.QUADRANTS):
            sel = quad == code
            diag[f"quad_{name}_frac"] = sel.mean(axis=(1, 2, 3))
            diag[f"quad_{name}_dH"] = np.where(sel, contrib, 0.0).sum(axis=(1, 2, 3)) / MT
        diag["dH_neg_first"] = np.where(neg, contrib, 0.0).sum(axis=(1, 2, 3)) / MT
        diag["dH_pos_first"] = np.where(pos, contrib, 0.0).sum(axis=(1, 2, 3)) / MT
    if out is not None and diagnostics:
        for k, v in out.metrics.items():
            diag[f"rule/{k}"] = np.broadcast_to(np.asarray(v, dtype=np.float64), (R,)).copy()
    state.step += 1
    return diag


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-run mean of ``x (R, ...)`` over ``mask``; 0 where a run has no masked entry."""
    axes = tuple(range(1, x.ndim))
    n = mask.sum(axis=axes)
    return np.where(mask, x, 0.0).sum(axis=axes) / np.maximum(n, 1)


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
