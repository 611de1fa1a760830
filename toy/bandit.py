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

import functools
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
        hit = table[np.arange(M)[:, None, None], np.arange(T)[None, None, :], tokens]  # (..., M, G, T)
        need = self.horizon if self.need is None else self.need
        return hit.sum(axis=-1) >= need

    def rewards(self, correct: np.ndarray, u: np.ndarray | None = None) -> np.ndarray:
        """Rewards of responses from their correctness ``(...)`` (float64).

        ``"bernoulli"`` needs uniforms ``u`` in [0, 1) of the same shape, drawn by the caller (no hidden
        randomness); the other reward types ignore ``u``.
        """
        if self.reward == "deterministic":
            return correct.astype(np.float64)
        if self.reward == "pm1":
            return np.where(correct, 1.0, -1.0)
        if u is None or np.shape(u) != np.shape(correct):
            raise ValueError(f"bernoulli rewards need uniforms u of shape {np.shape(correct)}")
        p = np.where(correct, self.p_correct, 1.0 - self.p_correct)
        return (u < p).astype(np.float64)


@functools.lru_cache(maxsize=256)
def _block_size(V: int) -> int:
    """The divisor of ``V`` closest to ``sqrt(V)`` (the smaller one on a tie; 1 for a prime ``V``): it
    balances the two searches of :func:`sample_tokens`, over ``V / b`` blocks and over ``b`` tokens."""
    root = np.sqrt(V)
    return min((b for b in range(1, V + 1) if V % b == 0), key=lambda b: (abs(b - root), b))


def sample_tokens(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF samples: ``weights (..., V)`` (probabilities, or any non-negative unnormalised
    weights) and uniforms ``u (..., n)`` in [0, 1) -> int64 ``(..., n)``.

    Token ``k`` of a row is drawn with probability ``weights[k] / sum(weights)``; a token of weight 0
    is never drawn. Each row is sampled from its own partial sums, so a row's tokens depend on that row
    alone (the same bits in any batch, any blocking of rows). Vectorised over all rows without a full
    cumulative sum: the vocabulary is cut into blocks of ``b`` tokens (``b`` the divisor of ``V`` closest
    to ``sqrt V``); the float64 cumulative sum of a row's block masses locates each sample's block (a
    comparison with the ``V / b`` partial sums) and the float64 partial sums of that block's ``b``
    weights (a product with a triangular matrix of ones) locate the token. The cost is one pass over
    ``weights`` plus ``O(n (V / b + b))`` per row. The block masses are summed in the weights' dtype, so
    float32 weights are sampled to float32 precision (a sample whose ``u`` lies within that rounding of a
    block's end may take the block's last positive token). The caller draws ``u`` from its own generator
    (no hidden randomness).

    Raises:
        ValueError: if ``u`` has the wrong shape, or a row's weights do not have a finite positive sum.
    """
    lead, V = weights.shape[:-1], weights.shape[-1]
    if u.shape[:-1] != lead:
        raise ValueError(f"u must have shape {lead} + (n,), got {u.shape}")
    n = u.shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    b = _block_size(V)
    nb = V // b
    blocks = weights.reshape(rows, nb, b)
    mass = np.einsum("rjb->rj", blocks)  # (rows, nb) block masses, in the weights' dtype
    cdf = np.cumsum(mass, axis=-1, dtype=np.float64)  # (rows, nb), row-local
    total = cdf[:, -1:]
    ok = (total[:, 0] > 0) & np.isfinite(total[:, 0])
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"row {bad} of weights has sum {float(total[bad, 0])!r}: sampling needs a finite "
                         f"positive sum")
    q = u.reshape(rows, n) * total  # (rows, n) in [0, total]
    blk = _count_le(cdf[:, None, :], q[:, :, None])  # the first block whose partial sum exceeds q
    blk = _last_positive(mass, np.broadcast_to(np.arange(rows)[:, None], blk.shape), blk)
    excl = np.take_along_axis(cdf, np.maximum(blk - 1, 0), axis=-1)
    rest = (q - np.where(blk > 0, excl, 0.0)).reshape(-1)  # (rows n,) mass still to walk in the block
    w = np.take(blocks.reshape(rows * nb, b), (np.arange(rows)[:, None] * nb + blk).reshape(-1), axis=0)
    w = w.astype(np.float64, copy=False)  # (rows n, b)
    j = _count_le(w @ _upper_ones(b), rest[:, None])  # partial sums w_0 + ... + w_t: exact 0/1 weights
    j = _last_positive(w, np.arange(rows * n), j)
    return (blk * b + j.reshape(rows, n)).reshape(lead + (n,))


@functools.lru_cache(maxsize=64)
def _upper_ones(b: int) -> np.ndarray:
    """``(b, b)`` float64 upper-triangular ones (read-only): ``w @ U`` is the partial sums of ``w``."""
    U = np.triu(np.ones((b, b)))
    U.setflags(write=False)
    return U


def _count_le(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``sum(a <= x, axis=-1)`` as int64 (through a uint8 product: NumPy's bool sum is slow)."""
    le = a <= x
    width = le.shape[-1]
    if width >= 256:
        return le.sum(axis=-1)
    return (le.view(np.uint8) @ np.ones(width, np.uint8)).astype(np.int64)


def _last_positive(w: np.ndarray, row: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``j`` where it is a valid index into the rows of ``w (N, width)``, else (``j == width``: the sample's
    ``q`` rounded onto the row's total) the last index of positive weight in row ``row``, so a weight-0
    entry is never returned. ``row`` and ``j`` have the same shape."""
    width = w.shape[-1]
    over = j >= width
    if not over.any():
        return j
    j = j.copy()
    j[over] = width - 1 - np.argmax(w[row[over]][:, ::-1] > 0, axis=-1)
    return j
