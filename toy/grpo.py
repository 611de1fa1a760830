"""Vectorised GRPO on tabular softmax bandits, with the theory's predictions beside every update.

``R`` independent runs advance together in one array program. Each run has its own random stream
(``numpy.random.SeedSequence(seed).spawn(R)``), so run ``r`` of a batch gives exactly what it gives
alone. One :func:`step`:

1. samples ``G`` responses per prompt from ``p = softmax(z)``, ``z`` of shape ``(R, M, T, V)``;
2. scores them, computes group advantages (:func:`theory.grpo_advantages`);
3. builds a :class:`theory.rules.TokenBatch` of shape ``(R, M*G, T)`` and applies the configured rule —
   **the one place where a rule's output meets the update** (:func:`_logit_gradient`);
4. runs ``epochs`` PPO epochs on the same samples (ratio clipping with ``clip_low``/``clip_high``,
   token-mean / seq-mean / constant aggregation), each a logit-space gradient ascent step (SGD or Adam);
5. records diagnostics: the realised entropy change of every state (:func:`theory.exact_entropy_change`)
   beside the first- (E4) and second-order predictions for the *actual* update, the quadrant breakdown
   (``sign(A) x sign(S* - E_p[S])``) with each quadrant's share of the first-order change, Cor 3.5's
   batch means, reward, pass@k and the rule's metrics.

NumPy only (never torch); every formula comes from :mod:`theory`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

import theory
from theory.rules import Rule, TokenBatch, make_rule

from .bandit import Bandit, sample_tokens

__all__ = ["GRPOConfig", "ToyState", "init_state", "step"]


@dataclass(frozen=True)
class GRPOConfig:
    """Hyperparameters of toy GRPO (names follow TRL/verl where they exist).

    Attributes:
        group_size: ``G`` responses per prompt (>= 2).
        lr: learning rate of the logit update (> 0).
        optimizer: ``"sgd"`` or ``"adam"`` (betas 0.9/0.999, eps 1e-8).
        epochs: ``μ`` PPO epochs over the same samples (> 1 makes ratios differ from 1).
        clip_low / clip_high: ratio clip ``[1 - clip_low, 1 + clip_high]``; a larger ``clip_high`` is
            DAPO's clip-higher.
        aggregation: ``"token_mean"`` (DAPO), ``"seq_mean"`` (GRPO) or ``"constant"`` (Dr. GRPO:
            divide by ``M * G * T``).
        adv_scale / adv_eps: :func:`theory.grpo_advantages` options.
        rule: a rule, a spec string for :func:`theory.rules.make_rule`, or None.
        init_scale: the initial logits are ``init_scale * N(0, 1)`` (0: uniform policy).
    """

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

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size (G) must be >= 2, got {self.group_size!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
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
        if self.rule is not None and not isinstance(self.rule, Rule):
            object.__setattr__(self, "rule", make_rule(self.rule))


@dataclass
class ToyState:
    """Everything that changes during training (``R`` runs)."""

    logits: np.ndarray  # (R, M, T, V)
    rngs: list[np.random.Generator]
    step: int = 0
    adam_m: np.ndarray | None = None
    adam_v: np.ndarray | None = None
    rule_state: Any = None
    stage: str | None = None
    extras: dict = field(default_factory=dict)


def init_state(bandit: Bandit, cfg: GRPOConfig, *, runs: int = 1, seed: int = 0) -> ToyState:
    """``runs`` independent runs, run ``r`` seeded by ``SeedSequence(seed).spawn(runs)[r]``."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs!r}")
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(runs)]
    M, T, V = bandit.shape
    logits = np.stack([cfg.init_scale * g.standard_normal((M, T, V)) for g in rngs])  # (R, M, T, V)
    state = ToyState(logits=logits, rngs=rngs)
    if cfg.optimizer == "adam":
        state.adam_m, state.adam_v = np.zeros_like(logits), np.zeros_like(logits)
    return state


def _flat_index(tokens: np.ndarray, V: int) -> np.ndarray:
    """Flat index into an ``(R, M, T, V)`` array of each token of ``tokens (R, M, G, T)``."""
    R, M, G, T = tokens.shape
    r = np.arange(R)[:, None, None, None]
    m = np.arange(M)[None, :, None, None]
    t = np.arange(T)[None, None, None, :]
    return ((r * M + m) * T + t) * V + tokens


def _gather(x: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``x (R, M, T, V)`` at ``tokens (R, M, G, T)`` -> ``(R, M, G, T)``."""
    return x.reshape(-1)[_flat_index(tokens, x.shape[-1])]


def _logit_gradient(coef: np.ndarray, tokens: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Sum over tokens of ``coef * (e_k - p)`` at each state: ``(R, M, G, T)`` -> ``(R, M, T, V)``."""
    R, M, G, T = tokens.shape
    V = p.shape[-1]
    flat = _flat_index(tokens, V)  # (R, M, G, T)
    onehot_sum = np.bincount(flat.ravel(), weights=coef.ravel(), minlength=R * M * T * V)
    onehot_sum = onehot_sum.reshape(R, M, T, V)
    return onehot_sum - coef.sum(axis=2)[..., None] * p


def step(bandit: Bandit, cfg: GRPOConfig, state: ToyState, *, table: np.ndarray | None = None) -> dict:
    """One GRPO step for every run (updates ``state`` in place); returns per-run diagnostics ``(R,)``."""
    table = bandit.correct_table() if table is None else table
    z0 = state.logits  # (R, M, T, V)
    R, M, T, V = z0.shape
    G = cfg.group_size
    logp0 = theory.log_softmax(z0)
    p0 = np.exp(logp0)

    # --- rollout: per-run streams, so a run does not depend on the others ----------------------------
    u_tok = np.stack([g.random((M, T, G)) for g in state.rngs])  # (R, M, T, G)
    u_rew = np.stack([g.random((M, G)) for g in state.rngs])  # (R, M, G)
    noise = np.stack([g.random((M * G, T)) for g in state.rngs])  # (R, M*G, T) for random rules
    tokens = np.moveaxis(sample_tokens(p0, u_tok), -1, 2)  # (R, M, G, T)
    correct = bandit.score(tokens, table)  # (R, M, G)
    if bandit.reward == "bernoulli":
        p_succ = np.where(correct, bandit.p_correct, 1.0 - bandit.p_correct)
        rewards = (u_rew < p_succ).astype(np.float64)
    else:
        rewards = bandit.rewards(correct, state.rngs[0])  # deterministic: no randomness used
    adv_seq = theory.grpo_advantages(rewards, scale=cfg.adv_scale, eps=cfg.adv_eps)  # (R, M, G)

    # --- token statistics under the behaviour policy (theory functions) ------------------------------
    H0 = theory.entropy_from_logp(logp0)  # (R, M, T)
    base0 = theory.vocab_baseline(z0)  # (R, M, T)
    logp_old = _gather(logp0, tokens)  # (R, M, G, T)
    H_tok = np.broadcast_to(H0[:, :, None], tokens.shape)
    base_tok = np.broadcast_to(base0[:, :, None], tokens.shape)
    adv_tok = np.broadcast_to(adv_seq[..., None], tokens.shape)
    s_star = theory.s_star(logp_old, H_tok)  # (R, M, G, T)
    dev = s_star - base_tok  # S* - E_p[S]

    flat = lambda x: np.ascontiguousarray(x).reshape(R, M * G, T)  # noqa: E731
    group = np.broadcast_to(np.repeat(np.arange(M), G)[None], (R, M * G))
    valid = np.ones((R, M * G, T), dtype=bool)
    out = None
    if cfg.rule is not None:
        batch = TokenBatch(
            logp=flat(logp_old),
            adv=flat(adv_tok),
            valid=valid,
            entropy=flat(H_tok),
            baseline=flat(base_tok),
            group=group,
            step=state.step,
            stage=state.stage,
        )
        out = cfg.rule(batch, noise=noise, state=state.rule_state)
        state.rule_state = out.state
    unflat = lambda x: x.reshape(R, M, G, T)  # noqa: E731
    keep = unflat(out.keep) if out is not None else np.ones(tokens.shape, dtype=bool)
    adv = unflat(out.adv) if out is not None else adv_tok
    weight = unflat(out.weight) if out is not None and out.weight is not None else 1.0
    kl_coef = unflat(out.kl_coef) if out is not None and out.kl_coef is not None else None
    ent_coef = unflat(out.entropy_coef) if out is not None and out.entropy_coef is not None else None

    # --- loss normaliser per token (aggregation) -----------------------------------------------------
    keep_f = keep.astype(np.float64)
    if cfg.aggregation == "token_mean":
        norm = np.maximum(keep_f.sum(axis=(1, 2, 3), keepdims=True), 1.0)  # (R, 1, 1, 1)
        scale = keep_f / norm
    elif cfg.aggregation == "seq_mean":
        seq_len = np.maximum(keep_f.sum(axis=-1, keepdims=True), 1.0)  # (R, M, G, 1)
        scale = keep_f / (seq_len * (M * G))
    else:
        scale = keep_f / (M * G * T)

    # --- PPO epochs: logit-space ascent on the clipped surrogate -------------------------------------
    z = z0.copy()
    ratio_clipped = np.zeros(tokens.shape, dtype=bool)
    first_coef = None
    for epoch in range(cfg.epochs):
        logp = theory.log_softmax(z)
        p = np.exp(logp)
        ratio = np.exp(_gather(logp, tokens) - logp_old)
        clipped = ((adv > 0) & (ratio > 1 + cfg.clip_high)) | ((adv < 0) & (ratio < 1 - cfg.clip_low))
        ratio_clipped |= clipped
        coef = np.where(clipped, 0.0, weight * adv * ratio) * scale  # d objective / d log p_k
        if kl_coef is not None:  # loss += kl |logp - logp_old|  ->  objective gradient -kl sign(.)
            coef = coef - kl_coef * np.sign(_gather(logp, tokens) - logp_old) * scale
        grad = _logit_gradient(coef, tokens, p)  # (R, M, T, V)
        if ent_coef is not None:  # objective += c H  ->  gradient -c S at the token's state
            c_state = (ent_coef * scale).sum(axis=2)  # (R, M, T)
            grad = grad - c_state[..., None] * theory.discriminator(z)
        if epoch == 0:
            first_coef = coef
        z = z + _optimizer_update(cfg, state, grad)

    # --- diagnostics: realised vs predicted entropy change of every state ----------------------------
    dz = z - z0
    dH_exact = theory.exact_entropy_change(z0, dz)  # (R, M, T)
    dH_first = theory.entropy_change_first_order(z0, dz)
    dH_second = theory.entropy_change_second_order(z0, dz)
    # each token's own (E6) term for the first epoch's SGD step (exact attribution for SGD, mu = 1)
    contrib = -cfg.lr * first_coef * dev  # (R, M, G, T)
    quad = theory.quadrant(adv, dev)  # (R, M, G, T)
    total = contrib.sum(axis=(1, 2, 3)) / (M * T)  # per state, like dH_first
    diag: dict[str, np.ndarray] = {
        "reward": rewards.mean(axis=(1, 2)),
        "accuracy": correct.mean(axis=(1, 2)),
        "pass_at_1": theory.pass_at_k(G, correct.sum(axis=-1), 1).mean(axis=-1),
        f"pass_at_{G}": theory.pass_at_k(G, correct.sum(axis=-1), G).mean(axis=-1),
        "entropy": H0.mean(axis=(1, 2)),
        "entropy_pos": _masked_mean(H_tok, adv_tok > 0),
        "entropy_neg": _masked_mean(H_tok, adv_tok < 0),
        "dH_exact": dH_exact.mean(axis=(1, 2)),
        "dH_first": dH_first.mean(axis=(1, 2)),
        "dH_second": dH_second.mean(axis=(1, 2)),
        "s_star_mean": s_star.mean(axis=(1, 2, 3)),
        "dev_mean": dev.mean(axis=(1, 2, 3)),
        "keep_frac": keep_f.mean(axis=(1, 2, 3)),
        "ratio_clip_frac": ratio_clipped.mean(axis=(1, 2, 3)),
        "dH_tokens_first": total,  # == dH_first for SGD, epochs=1, no entropy bonus (E4 = sum of E6)
    }
    for code, name in enumerate(theory.QUADRANTS):
        sel = quad == code
        diag[f"quad_{name}_frac"] = sel.mean(axis=(1, 2, 3))
        diag[f"quad_{name}_dH"] = np.where(sel, contrib, 0.0).sum(axis=(1, 2, 3)) / (M * T)
    if out is not None:
        for k, v in out.metrics.items():
            diag[f"rule/{k}"] = np.broadcast_to(np.asarray(v, dtype=np.float64), (R,)).copy()
    state.logits = z
    state.step += 1
    return diag


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n = mask.sum(axis=(1, 2, 3))
    return np.where(mask, x, 0.0).sum(axis=(1, 2, 3)) / np.maximum(n, 1)


def _optimizer_update(cfg: GRPOConfig, state: ToyState, grad: np.ndarray) -> np.ndarray:
    """The logit change for ascent direction ``grad`` (SGD or Adam, bias-corrected)."""
    if cfg.optimizer == "sgd":
        return cfg.lr * grad
    b1, b2, eps = 0.9, 0.999, 1e-8
    state.extras["adam_t"] = state.extras.get("adam_t", 0) + 1
    t = state.extras["adam_t"]
    state.adam_m = b1 * state.adam_m + (1 - b1) * grad
    state.adam_v = b2 * state.adam_v + (1 - b2) * grad * grad
    m_hat = state.adam_m / (1 - b1**t)
    v_hat = state.adam_v / (1 - b2**t)
    return cfg.lr * m_hat / (np.sqrt(v_hat) + eps)
