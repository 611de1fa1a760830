"""The toy's dense passes as compiled per-row loops (numba): one trip through each row's logits per pass.

:mod:`toy.kernels` runs a step's passes over the ``(rows, V)`` logits as NumPy calls on blocks of runs;
each call is one more trip through the block (max, subtract, exp, sum, entropy, block masses, then the
update). Here each row is done by compiled loops while it sits in L1: the row maximum, ``e = exp(z -
max)``, then ``Z``, ``sum e s`` and the sampling's chunk masses, the inverse-CDF samples, and later the
update ``z += factor e`` plus the sampled tokens' coefficients. Blocks of rows are split over numba's
threads; every number of a row depends on that row alone, so a run gives the same bits
alone, in any batch and on any number of threads.

``exp`` is computed here, not by NumPy's (a compiled loop calling libm's scalar ``exp`` would take ~3 ns a
logit): Cody-Waite range reduction ``x = n ln 2 + f``, ``|f| <= ln 2 / 2``, with Cephes' minimax polynomial
for ``exp(f)`` (float32: degree 7, ``expf.c``; float64: the (2, 3) Padé form of ``exp.c``; S. L. Moshier,
*Methods and Programs for Mathematical Functions*, 1989) and ``2^n`` put into the exponent bits. Float32:
within 1 ulp of the exact value (numba carries the reduction in float64); float64: within 2 ulp of NumPy's
``exp`` (``tests/test_toy_fused.py``); arguments below the smallest normal's logarithm (-87.33 in
float32, -708.39 in float64) give 0, a weight no sample can take anyway beside a maximum of weight 1.

The sampling follows :func:`toy.bandit.sample_tokens` (the first token whose partial sum exceeds
``u Z``, a weight-0 token never drawn) with chunks of :data:`CHUNK` tokens and float64 partial sums.
Imported by :mod:`toy.kernels` when numba is installed (the ``fast`` extra). The loops compile at their
first call in a process (about 2 s per float type) and are not cached on disk: numba's file cache served
stale machine code after edits of this module during development, and a wrong ``exp`` is silent.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

__all__ = ["CHUNK", "exp_f32", "exp_f64", "softmax_rows", "update_rows"]

#: Tokens per sampling chunk: a sample finds its chunk among ``V / CHUNK`` partial sums, then its token
#: among at most ``CHUNK`` weights.
CHUNK = 32
_MAX_CHUNKS = 1 << 16  # V <= 2^21 tokens


@intrinsic
def _f32_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.int32), codegen


@intrinsic
def _f64_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return types.float64(types.int64), codegen


@intrinsic
def _bits_from_f64(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int64))

    return types.int64(types.float64), codegen


_SHIFT64 = 6755399441055744.0  # 1.5 * 2^52: adding it rounds a float64 below 2^51 to an integer


@njit(error_model="numpy")
def exp_f32(x):
    """``exp(x)`` for float32 ``x <= 0`` (0 below -87.33): Cephes ``expf`` after Cody-Waite reduction."""
    xc = max(x, np.float32(-87.33))
    n = np.floor(xc * np.float32(1.44269504088896341) + np.float32(0.5))
    f = xc - n * np.float32(0.693359375)
    f = f - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * f + np.float32(1.3981999507e-3)
    p = p * f + np.float32(8.3334519073e-3)
    p = p * f + np.float32(4.1665795894e-2)
    p = p * f + np.float32(1.6666665459e-1)
    p = p * f + np.float32(5.0000001201e-1)
    p = p * (f * f) + f + np.float32(1.0)
    y = p * _f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
    return y if x >= np.float32(-87.33) else np.float32(0.0)


@njit(error_model="numpy")
def exp_f64(x):
    """``exp(x)`` for float64 ``x <= 0`` (0 below -708.39): Cephes ``exp`` (Padé), Cody-Waite reduction."""
    xc = max(x, -708.39)
    big = xc * 1.4426950408889634073599 + _SHIFT64  # n = round(x / ln 2) in big's low mantissa bits
    n = big - _SHIFT64
    f = xc - n * 6.93145751953125e-1
    f = f - n * 1.42860682030941723212e-6
    ff = f * f
    px = f * ((1.26177193074810590878e-4 * ff + 3.02994407707441961300e-2) * ff + 9.99999999999999999910e-1)
    qx = ((3.00198505138664455042e-6 * ff + 2.52448340349684104192e-3) * ff
          + 2.27265548208155028766e-1) * ff + 2.00000000000000000009e0
    two_n = _f64_from_bits((_bits_from_f64(big) - _bits_from_f64(_SHIFT64) + np.int64(1023)) << np.int64(52))
    y = (1.0 + 2.0 * px / (qx - px)) * two_n
    return y if x >= -708.39 else 0.0


@njit(error_model="numpy", fastmath={"reassoc", "nsz"})
def _row_max(zr, acc):
    """``max(zr)`` with ``acc.size`` independent lanes (a single running maximum does not vectorise)."""
    V, L = zr.size, acc.size
    for j in range(L):
        acc[j] = zr[0]
    n = V // L * L
    for k in range(0, n, L):
        for j in range(L):
            v = zr[k + j]
            acc[j] = v if v > acc[j] else acc[j]
    m = acc[0]
    for j in range(L):
        m = acc[j] if acc[j] > m else m
    for k in range(n, V):
        m = zr[k] if zr[k] > m else m
    return m


@njit(error_model="numpy")
def _row_exp(expfn, zr, er, mr):
    """``er = exp(zr - mr)``. No fast-math flags here: numba compiles a callee with its caller's flags, and
    reassociation would undo the range reduction of :func:`exp_f64` (``(x c + 2^52 1.5) - 2^52 1.5``)."""
    for k in range(zr.size):
        er[k] = expfn(zr[k] - mr)


@njit(error_model="numpy", fastmath={"reassoc", "nsz"})
def _row_sums(zr, er, mr, cdf):
    """``cdf`` gets the float64 partial sums of ``er`` at each chunk's end. Returns ``(sum e, sum e s)``,
    ``s = zr - mr``: the first in float64 (the sum of the chunk masses), the second in ``zr``'s dtype.
    Reassociated (summed in vector lanes); one loop doing all of it with the exp does not vectorise."""
    V = zr.size
    es = zr[0] - zr[0]  # 0 in zr's dtype
    for k in range(V):
        es += er[k] * (zr[k] - mr)
    nfull = V // CHUNK
    tot = 0.0
    for c in range(nfull):
        cs = es - es
        for j in range(CHUNK):
            cs += er[c * CHUNK + j]
        tot += cs
        cdf[c] = tot
    if nfull * CHUNK < V:
        cs = es - es
        for k in range(nfull * CHUNK, V):
            cs += er[k]
        tot += cs
        cdf[nfull] = tot
    return tot, es


@njit(error_model="numpy")
def _last_positive(er, k0, k1):
    """The last index in ``[k0, k1)`` of positive weight (-1 if none)."""
    for k in range(k1 - 1, k0 - 1, -1):
        if er[k] > 0:
            return k
    return -1


@njit(error_model="numpy")
def _row_sample(er, cdf, tot, ur, tokr):
    """Inverse-CDF samples of ``er`` (partial sums ``cdf`` per chunk, total ``tot``) at uniforms ``ur``."""
    V = er.size
    nch = (V + CHUNK - 1) // CHUNK
    for i in range(ur.size):
        q = ur[i] * tot
        c = 0
        while c < nch and cdf[c] <= q:
            c += 1
        if c == nch:  # q rounded onto the total: the row's last token of positive weight
            tokr[i] = _last_positive(er, 0, V)
            continue
        acc = cdf[c - 1] if c > 0 else 0.0
        k0 = c * CHUNK
        k1 = min(V, k0 + CHUNK)
        t = -1
        for k in range(k0, k1):
            acc += er[k]
            if acc > q:
                t = k
                break
        tokr[i] = t if t >= 0 else _last_positive(er, k0, k1)


@njit(error_model="numpy", parallel=True)
def _softmax_rows(expfn, z, e, u, m, Z, logZ, H, tok, want_h):
    N, V = z.shape
    nblocks = 64  # blocks of rows, shared out over the threads
    per = (N + nblocks - 1) // nblocks
    for b in prange(nblocks):
        acc = np.empty(16, z.dtype)
        cdf = np.empty((V + CHUNK - 1) // CHUNK, np.float64)
        for r in range(b * per, min(N, (b + 1) * per)):
            zr, er = z[r], e[r]
            mr = _row_max(zr, acc)
            _row_exp(expfn, zr, er, mr)
            tot, es = _row_sums(zr, er, mr, cdf)
            m[r] = mr
            Z[r] = tot
            logZ[r] = np.log(tot)
            if want_h:
                H[r] = np.log(tot) - es / tot
            if u.shape[1]:
                _row_sample(er, cdf, tot, u[r], tok[r])


def softmax_rows(z: np.ndarray, e: np.ndarray, u: np.ndarray, *, entropy: bool = True):
    """The softmax parts of finite logits ``z (N, V)`` (float32 or float64, C-contiguous) in one pass per row.

    Writes ``e = exp(z - max z)`` into ``e`` (same shape and dtype) and returns ``(m, Z, log Z, H, tokens)``:
    the ``(N,)`` row maximum, ``Z = sum e``, ``log Z``, ``H = log Z - sum(e s) / Z`` (None without
    ``entropy``; ``Z`` and ``sum e s`` accumulated in float64, the results in ``z``'s dtype) and int64
    ``tokens (N, n)``, the inverse-CDF samples at the float64 uniforms ``u (N, n)`` (``n`` may be 0).
    """
    N, V = z.shape
    if V > CHUNK * _MAX_CHUNKS:
        raise ValueError(f"V = {V} logits per row: the fused kernels take at most {CHUNK * _MAX_CHUNKS}")
    expfn = exp_f32 if z.dtype == np.float32 else exp_f64
    m, Z, logZ, H = (np.empty(N, z.dtype) for _ in range(4))
    tok = np.empty((N, u.shape[1]), np.int64)
    _softmax_rows(expfn, z, e, np.ascontiguousarray(u, dtype=np.float64), m, Z, logZ, H, tok, entropy)
    return m, Z, logZ, (H if entropy else None), tok


@njit(error_model="numpy", parallel=True)
def _update_rows(target, e, factor, tok, coef, accumulate):  # blocks of rows on the threads
    N = e.shape[0]
    nblocks = 64
    per = (N + nblocks - 1) // nblocks
    for b in prange(nblocks):
        for r in range(b * per, min(N, (b + 1) * per)):
            _update_row(target[r], e[r], factor[r], tok[r], coef[r], accumulate)


@njit(error_model="numpy")
def _update_row(tr, er, f, tokr, coefr, accumulate):
    if accumulate:
        for k in range(er.size):
            tr[k] = tr[k] + er[k] * f
    else:
        for k in range(er.size):
            tr[k] = er[k] * f
    for g in range(tokr.size):
        tr[tokr[g]] += coefr[g]


def update_rows(target: np.ndarray, e: np.ndarray, factor: np.ndarray, tok: np.ndarray, coef: np.ndarray, *,
                accumulate: bool) -> None:
    """Per row ``r`` of ``e (N, V)``: ``target[r] (+)= factor[r] * e[r]``, then ``target[r, tok[r, g]] +=
    coef[r, g]`` for ``g`` in order (``tok``, ``coef`` ``(N, n)``); ``+=`` with ``accumulate``, else ``=``.

    The same roundings as NumPy's ``target + e * factor`` followed by ``np.add.at`` (``coef`` added in
    float64 and rounded to ``target``'s dtype), so it gives :func:`toy.kernels.logit_gradient`'s bits.
    """
    _update_rows(target, e, factor.astype(e.dtype, copy=False), np.ascontiguousarray(tok, dtype=np.int64),
                 np.ascontiguousarray(coef, dtype=np.float64), accumulate)
