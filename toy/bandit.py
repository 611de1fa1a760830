"""Softmax bandits: K-armed, contextual (M prompts) and sequence (T positions) — one tabular family.

A bandit here has ``M`` prompts, ``T`` positions and a vocabulary of ``V`` tokens. The policy's
parameters are the logits ``z`` of shape ``(R, M, T, V)`` for ``R`` independent runs: every
(prompt, position) pair is its own softmax state, exactly the tabular setting of arXiv 2602.03392
(``docs/equations.md`` §1), so the theory's first-order predictions are exact to first order.

* K-armed bandit: ``M = 1, T = 1, V = K``;
* contextual bandit: ``M`` prompts, ``T = 1``, each prompt with its own correct arms;
* sequence bandit: ``T > 1``; a response is a sequence of ``T`` tokens and its reward is a verifiable
  predicate of the whole sequence (at least ``need`` positions match the prompt's target tokens), so
  samples have positions, polarity and perplexity like LLM responses.

Rewards: ``"deterministic"`` (1 if correct else 0), ``"bernoulli"`` (1 with a probability that grows
with correctness) or ``"pm1"`` (+1 / -1). NumPy only; randomness only from the caller's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Bandit", "sample_tokens"]


@dataclass(frozen=True)
class Bandit:
    """A tabular softmax bandit with a fixed, seeded reward table.

    Attributes:
        n_prompts: ``M``, the number of prompts (contexts).
        horizon: ``T``, tokens per response (1 for a K-armed or contextual bandit).
        vocab: ``V``, the number of tokens (arms ``K`` when ``T = 1``).
        n_correct: correct tokens per prompt (``T = 1``) or per (prompt, position) (``T > 1``).
        need: positions that must hold a correct token for a sequence to be correct (default ``T``).
        reward: ``"deterministic"``, ``"bernoulli"`` or ``"pm1"``.
        p_correct: for ``"bernoulli"``, the success probability of a correct response (a wrong one
            succeeds with ``1 - p_correct``).
        seed: seed of the reward table (which tokens are correct).
    """

    n_prompts: int = 1
    horizon: int = 1
    vocab: int = 10
    n_correct: int = 1
    need: int | None = None
    reward: Literal["deterministic", "bernoulli", "pm1"] = "deterministic"
    p_correct: float = 0.9
    seed: int = 0

    def __post_init__(self):
        for name in ("n_prompts", "horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.vocab < 2:
            raise ValueError(f"vocab (K) must be >= 2, got {self.vocab!r}")
        if not (1 <= self.n_correct < self.vocab):
            raise ValueError(f"n_correct must lie in [1, vocab), got {self.n_correct!r}")
        if self.need is not None and not (1 <= self.need <= self.horizon):
            raise ValueError(f"need must lie in [1, horizon], got {self.need!r}")
        if self.reward not in ("deterministic", "bernoulli", "pm1"):
            raise ValueError(f"reward must be 'deterministic', 'bernoulli' or 'pm1', got {self.reward!r}")
        if not (0.0 <= self.p_correct <= 1.0):
            raise ValueError(f"p_correct must lie in [0, 1], got {self.p_correct!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(M, T, V)``: prompts, positions, vocabulary."""
        return (self.n_prompts, self.horizon, self.vocab)

    def correct_table(self) -> np.ndarray:
        """``(M, T, V)`` bool: which tokens are correct at each (prompt, position); seeded by ``seed``."""
        rng = np.random.default_rng(self.seed)
        M, T, V = self.shape
        order = np.argsort(rng.random((M, T, V)), axis=-1)  # a random permutation per state
        return order < self.n_correct

    def score(self, tokens: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
        """Correctness of ``tokens (..., M, G, T)`` (G responses per prompt) -> bool ``(..., M, G)``."""
        table = self.correct_table() if table is None else table
        M, T, V = self.shape
        if tokens.shape[-3] != M or tokens.shape[-1] != T:
            raise ValueError(f"tokens must have shape (..., M={M}, G, T={T}), got {tokens.shape}")
        hit = np.take_along_axis(
            np.broadcast_to(table[:, None], tokens.shape[:-3] + (M, tokens.shape[-2], T, V)),
            tokens[..., None],
            axis=-1,
        )[..., 0]  # (..., M, G, T)
        need = self.horizon if self.need is None else self.need
        return hit.sum(axis=-1) >= need

    def rewards(self, correct: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Rewards of responses from their correctness ``(...)`` (float64)."""
        if self.reward == "deterministic":
            return correct.astype(np.float64)
        if self.reward == "pm1":
            return np.where(correct, 1.0, -1.0)
        p = np.where(correct, self.p_correct, 1.0 - self.p_correct)
        return (rng.random(correct.shape) < p).astype(np.float64)


def sample_tokens(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF samples: ``probs (..., V)`` and uniforms ``u (..., n)`` in [0, 1) -> int64 ``(..., n)``.

    Vectorised over all rows with one ``searchsorted``: row ``i``'s CDF is shifted by ``i`` so the
    concatenation stays sorted. A token with probability 0 is never drawn. The caller draws ``u`` from
    its own generator (no hidden randomness).
    """
    lead, V = probs.shape[:-1], probs.shape[-1]
    if u.shape[:-1] != lead:
        raise ValueError(f"u must have shape {lead} + (n,), got {u.shape}")
    n = u.shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    cdf = np.cumsum(probs.reshape(rows, V), axis=-1)
    cdf /= cdf[:, -1:]  # exactly 1 at the end of every row
    offset = np.arange(rows, dtype=np.float64)[:, None]
    # side="right": the first index whose CDF is strictly above u (skips zero-probability tokens)
    idx = np.searchsorted((cdf + offset).ravel(), (u.reshape(rows, n) + offset).ravel(), side="right")
    tok = idx.reshape(rows, n) - np.arange(rows)[:, None] * V
    return np.minimum(tok, V - 1).reshape(lead + (n,)).astype(np.int64)
