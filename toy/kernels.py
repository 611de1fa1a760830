"""The toy's dense passes over the logits, per block of runs, and the runs' buffered random streams.

A toy step touches every logit of every run a few times: the softmax parts ``s = z - max z``,
``e = exp(s)``, ``Z``, ``log Z``, ``H`` and the samples (:func:`softmax_parts`), then the logit gradient
``sum coef (e_k - p)`` and, for SGD, the parameter update (:func:`logit_gradient`). Everything else in a
step is ``O(R M G T)``. These passes walk blocks of whole runs, each of about :data:`BLOCK_ELEMENTS`
logits, so a block's intermediates stay in a core's cache between the passes. Each run's numbers depend
on that run's logits alone (row-local reductions and sampling), so any blocking gives the same bits, and
a run gives the same result alone or in a batch (``tests/test_toy_kernels.py``, ``tests/test_toy_grpo.py``).

Two backends compute these passes (``GRPOConfig.kernels``): ``"numpy"``, NumPy calls on the blocks
(threads on top were tried and gave nothing dependable on 2 cores: the calls are too short for the GIL
hand-off), and ``"numba"``, :mod:`toy.fused`, each row's passes in one compiled loop nest on numba's
threads (2.5-3.2x faster; the ``fast`` extra). ``"auto"`` takes numba when it is installed. The two agree
to rounding (their ``exp`` and summation orders differ, so a sample whose uniform lies within rounding of
a token boundary can differ); each is row-local, so either gives a run the same bits alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .bandit import sample_tokens

try:
    from . import fused
except ImportError:  # numba is not installed: the NumPy backend only
    fused = None

__all__ = ["BLOCK_ELEMENTS", "BACKENDS", "RunStreams", "for_run_blocks", "logit_gradient", "resolve_backend",
           "softmax_parts", "workspace"]

#: The names ``GRPOConfig.kernels`` takes.
BACKENDS = ("auto", "numba", "numpy")

#: Logits per block of runs: ``2^18`` (1 MB of float32 per intermediate; 2 MB L2 per core on the
#: project's CPUs). On the 2-core Xeon, blocks of 100-200 runs of K = 1,000 were best (0.88x the
#: unblocked passes; 25 runs 0.94x).
BLOCK_ELEMENTS = 1 << 18
#: Uniforms buffered per run stream: at most this many float64 values for all runs together (16 MB; a
#: refill costs one generator call per run, ~2 us each).
STREAM_BUFFER_VALUES = 1 << 21


def for_run_blocks(fn: Callable[[int, int], None], runs: int, per_run: int) -> None:
    """Call ``fn(r0, r1)`` on consecutive blocks ``[r0, r1)`` covering ``range(runs)``; ``per_run`` is the
    number of logits of one run (``M T V``): a block holds about :data:`BLOCK_ELEMENTS` of them (at least
    one run)."""
    step = max(1, BLOCK_ELEMENTS // max(per_run, 1))
    for r0 in range(0, runs, step):
        fn(r0, min(r0 + step, runs))


def resolve_backend(name: str) -> str:
    """``"numba"`` or ``"numpy"`` for a :data:`BACKENDS` name (``"auto"``: numba when it is installed).

    Raises:
        ValueError: for an unknown name. ImportError: for ``"numba"`` without numba installed.
    """
    if name not in BACKENDS:
        raise ValueError(f"kernels must be one of {BACKENDS}, got {name!r}")
    if name == "numba" and fused is None:
        raise ImportError("kernels='numba' needs numba: pip install 'entropy-dynamics[fast]' "
                          "(or kernels='numpy')")
    if name == "auto":
        return "numpy" if fused is None else "numba"
    return name


def workspace(extras: dict, z: np.ndarray) -> dict[str, np.ndarray]:
    """Three ``(R, M, T, V)`` scratch arrays ``s``, ``e``, ``g`` kept in ``extras``: a step allocates no
    large array (fresh multi-MB arrays cost page faults on every step, about as much as the arithmetic)."""
    work = extras.get("work")
    if work is None or work["s"].shape != z.shape or work["s"].dtype != z.dtype:
        work = {k: np.empty_like(z) for k in ("s", "e", "g")}
        extras["work"] = work
    return work


def softmax_parts(z: np.ndarray, work: dict[str, np.ndarray], u: np.ndarray | None = None, *,
                  entropy: bool = True, backend: str = "numpy"):
    """The softmax parts of ``z (R, M, T, V)`` and, given uniforms ``u (R, M, T, n)``, ``n`` samples a state.

    Returns ``(m, e, Z, log Z, H, tokens)``: the ``(R, M, T)`` maximum ``m`` of each state's logits,
    ``e = exp(z - m)`` (in ``work``), the ``(R, M, T)`` arrays ``Z = sum e``, ``log Z`` and ``H = log Z -
    sum(e s) / Z`` with ``s = z - m`` (None without ``entropy``), and ``tokens (R, M, T, n)`` drawn by
    inverse CDF from ``e`` (None without ``u``). So ``p = e / Z`` and ``log p = (z - m) - log Z``. Toy
    logits are always finite. ``backend`` is ``"numpy"`` (blocks of runs; the samples from
    :func:`toy.bandit.sample_tokens` in one call after the blocks: its ~20 small operations cost more per
    block than the cache saves) or ``"numba"`` (:func:`toy.fused.softmax_rows`).
    """
    lead = z.shape[:-1]
    if backend == "numba":
        V = z.shape[-1]
        n = 0 if u is None else u.shape[-1]
        u2 = np.empty((int(np.prod(lead)), 0)) if u is None else u.reshape(-1, n)
        m, Z, logZ, H, tok = fused.softmax_rows(np.ascontiguousarray(z).reshape(-1, V),
                                                work["e"].reshape(-1, V), u2, entropy=entropy)
        return (m.reshape(lead), work["e"], Z.reshape(lead), logZ.reshape(lead),
                None if H is None else H.reshape(lead), None if u is None else tok.reshape(lead + (n,)))
    s, e = work["s"], work["e"]
    m, Z, logZ = np.empty(lead, z.dtype), np.empty(lead, z.dtype), np.empty(lead, z.dtype)
    H = np.empty(lead, z.dtype) if entropy else None

    def block(r0: int, r1: int) -> None:
        zb, sb, eb = z[r0:r1], s[r0:r1], e[r0:r1]
        mb = np.max(zb, axis=-1, out=m[r0:r1])
        np.subtract(zb, mb[..., None], out=sb)
        np.exp(sb, out=eb)
        Zb = np.sum(eb, axis=-1, out=Z[r0:r1])
        np.log(Zb, out=logZ[r0:r1])
        if entropy:
            np.subtract(logZ[r0:r1], np.vecdot(eb, sb) / Zb, out=H[r0:r1])

    for_run_blocks(block, z.shape[0], int(np.prod(z.shape[1:])))
    return m, e, Z, logZ, H, None if u is None else sample_tokens(e, u)


def logit_gradient(coef: np.ndarray, flat: np.ndarray, e: np.ndarray, Z: np.ndarray, out: np.ndarray, *,
                   sgd_params: np.ndarray | None = None, lr: float = 1.0,
                   backend: str = "numpy") -> np.ndarray:
    """``out = sum`` over each state's tokens of ``coef * (e_k - p)``, ``p = e / Z``: ``(R, M, T, V)``.

    ``d log p_k / dz = e_k - p`` (E5 of arXiv 2602.03392), so this is the logit gradient of
    ``sum coef * log p_k``; ``coef`` and ``flat`` (flat indices into ``(R, M, T, V)``) are ``(R, M, G, T)``.
    ``out`` (a workspace array of ``e``'s shape and dtype) is overwritten and returned. With
    ``sgd_params`` (the tabular logits) it is the SGD step instead: ``sgd_params += lr * gradient``, block
    by block while the block is in cache (``lr`` folded into the per-state factor and the token
    coefficients: one pass fewer); ``out`` is then scratch. Both backends give the same bits
    (:func:`toy.fused.update_rows`).
    """
    R = e.shape[0]
    per_run = int(np.prod(e.shape[1:]))
    c = 1.0 if sgd_params is None else lr
    factor = (-c * coef.sum(axis=2) / Z).astype(e.dtype)[..., None]  # (R, M, T, 1), the policy's dtype
    coef = c * coef if sgd_params is not None else coef
    target = out if sgd_params is None else sgd_params
    if backend == "numba":
        V, G = e.shape[-1], coef.shape[2]
        rows = lambda x: np.moveaxis(x, 2, -1).reshape(-1, G)  # noqa: E731  (R, M, G, T) -> (R M T, G)
        fused.update_rows(target.reshape(-1, V), e.reshape(-1, V), factor.reshape(-1), rows(flat) % V,
                          rows(coef), accumulate=sgd_params is not None)
        return target

    def block(r0: int, r1: int) -> None:
        gb = np.multiply(e[r0:r1], factor[r0:r1], out=out[r0:r1])
        if sgd_params is not None:
            gb = np.add(sgd_params[r0:r1], gb, out=sgd_params[r0:r1])
        np.add.at(gb.reshape(-1), flat[r0:r1].ravel() - r0 * per_run, coef[r0:r1].ravel())

    for_run_blocks(block, R, per_run)
    return target


class RunStreams:
    """One ``numpy.random.Generator`` per run, drawn ahead in blocks of steps.

    ``take(n)`` returns the next ``n`` uniforms of every run, ``(R, n)`` float64 — exactly what
    ``np.stack([g.random(n) for g in rngs])`` returns, because a generator's ``random(a + b)`` is its
    ``random(a)`` followed by ``random(b)``. The draws are made many steps at a time (as many as fit
    :data:`STREAM_BUFFER_VALUES`), so a step costs no per-run Python call (1,000 runs: 0.8 ms a step
    before); the generators themselves run ahead of what was taken. ``select(idx)`` keeps some runs with
    their pending draws.
    """

    def __init__(self, rngs: list[np.random.Generator]):
        self.rngs = rngs
        self._buf: np.ndarray | None = None
        self._pos = 0

    @property
    def pending(self) -> int:
        """Uniforms per run drawn from the generators and not yet taken."""
        return 0 if self._buf is None else self._buf.shape[1] - self._pos

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` uniforms of every run's stream, ``(R, n)`` (a view, valid until the next call)."""
        if self._buf is None or self._pos + n > self._buf.shape[1]:
            rest = np.empty((len(self.rngs), 0)) if self._buf is None else self._buf[:, self._pos :]
            steps = max(1, STREAM_BUFFER_VALUES // max(n * len(self.rngs), 1))
            buf = np.empty((len(self.rngs), rest.shape[1] + steps * n))
            buf[:, : rest.shape[1]] = rest
            for row, g in zip(buf[:, rest.shape[1] :], self.rngs, strict=True):
                g.random(out=row)
            self._buf, self._pos = buf, 0
        u = self._buf[:, self._pos : self._pos + n]
        self._pos += n
        return u

    def select(self, idx) -> RunStreams:
        """The streams of runs ``idx`` (a slice or index array), with their pending draws."""
        rows = np.arange(len(self.rngs))[idx]
        out = RunStreams([self.rngs[i] for i in np.atleast_1d(rows)])
        if self.pending:
            out._buf, out._pos = self._buf[np.atleast_1d(rows)].copy(), self._pos
        return out
