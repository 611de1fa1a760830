r"""One pass over the logits for the whole per-row family: ``log Z``, ``H``, ``E_p[S]``, and a token's ``S*``.

Every statistic of arXiv 2602.03392 that reduces a ``(..., V)`` row of logits to a number is a function of
a few moments of ``e = exp(s)``, ``s = z - max z`` (``docs/equations.md`` §1-3):

.. math::
    Z = \sum_i e_i,\qquad H = \log Z - \frac{\sum_i e_i s_i}{Z},\qquad
    \mathbb E_p[S] = \sum_i p_i^2 (H + \log p_i) = \frac{1}{Z^2}\sum_i e_i^2\,(s_i + H - \log Z),

and a sampled token's ``log p_k = s_k - log Z``, ``S* = p_k (H + log p_k)`` (E2), its deviation
``S* - E_p[S]`` (E6-E7). So one read of the logits suffices, if the row's intermediates (``s``, ``e``,
``e^2``) stay in cache: the rows are walked in blocks of about :data:`NUMPY_BLOCK_ELEMENTS` elements for
NumPy and :data:`TORCH_CPU_BLOCK_ELEMENTS` for torch on a CPU (each block is read once from memory and
every further pass hits the cache), and of :data:`ACCELERATOR_BLOCK_ELEMENTS` on an accelerator (where a
kernel launch per small block would cost more than the memory traffic it saves). NumPy has its own loop
(reused buffers, ``vecdot`` reductions), and so do torch CPU tensors that carry no derivative (reused
buffers, ``out=`` operations); every other case runs the array-API kernel through :func:`row_blocks`, as
do the changes of :mod:`theory.first_order` (whose first- and second-order changes have a NumPy loop of
the same kind). The exponential alone is 6.4-10.4x one read of the logits on this project's CPUs
(``BENCHMARKS.md``), so it sets the floor here.

Masked (``-inf``) logits: in the array-API kernel ``s`` is clamped to :data:`MASKED_SHIFT` (where ``exp``
is exactly 0 in float32 and float64), so ``e_i s_i = 0`` with no ``0 * inf`` in the value or in the torch
gradient; the NumPy loop recomputes such rows with that kernel. Rows whose maximum is not finite (NaN,
``+inf``, only ``-inf``) give NaN, as everywhere in :mod:`theory._xp`.

All functions take NumPy or torch arrays and return the same namespace; torch results are
differentiable whenever the input carries a derivative (then the kernel runs: its blocks are
concatenated, not written in place).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import array_api_compat

from ._xp import Array, as_float, check_index, check_logits, finite_logp, namespace

__all__ = ["RowStatistics", "row_statistics", "row_blocks", "shifted_moments", "baseline_from_moments"]

#: Elements per row block for NumPy: ``2^16`` float32 values = 256 kB per intermediate, so a block's two
#: intermediates stay in a core's L2 cache (chosen from a sweep of 2^14..2^20 on the project's 2-core CPU;
#: the resulting times are in ``BENCHMARKS.md``, ``benchmarks/bench_theory.py``).
NUMPY_BLOCK_ELEMENTS = 1 << 16
#: Elements per row block for torch on a CPU: ``2^18`` (1 MB of float32), larger because each torch
#: operation starts its thread pool (chosen from the same sweep).
TORCH_CPU_BLOCK_ELEMENTS = 1 << 18
#: Elements per row block on an accelerator (``2^26``: 256 MB of float32 per intermediate).
ACCELERATOR_BLOCK_ELEMENTS = 1 << 26
#: Where ``s = z - max z`` is clamped for masked logits: ``exp`` of it is exactly 0 in float32 and
#: float64, and ``|s| * grad`` cannot overflow.
MASKED_SHIFT = -1.0e4


def _block_elements(x: Array) -> int:
    if array_api_compat.is_numpy_array(x):
        return NUMPY_BLOCK_ELEMENTS
    device = array_api_compat.device(x)
    on_cpu = device == "cpu" or getattr(device, "type", "cpu") == "cpu"
    return TORCH_CPU_BLOCK_ELEMENTS if on_cpu else ACCELERATOR_BLOCK_ELEMENTS


def row_blocks(xp, kernel: Callable[..., tuple], z: Array, *rows: Array | None, full: tuple = (),
               block_elements: int | None = None) -> tuple:
    """Apply ``kernel(z_b, *rows_b, *full_b)`` to blocks of rows and join its ``(n,)`` outputs.

    ``z`` is ``(..., V)``; each of ``rows`` is ``None`` or an array of ``z.shape[:-1]`` (per-row values such
    as a token index or a step size), each of ``full`` an array of ``z``'s shape (e.g. a logit update).
    The kernel returns a tuple of ``(n,)`` arrays for its ``n`` rows; the result is that tuple with
    every entry of shape ``z.shape[:-1]``. ``block_elements`` defaults by device (module docstring).
    """
    lead, V = tuple(z.shape[:-1]), z.shape[-1]
    flat = lambda a: None if a is None else xp.reshape(a, (-1,))  # noqa: E731
    z2 = xp.reshape(z, (-1, V))
    rows2 = [flat(a) for a in rows]
    full2 = [xp.reshape(a, (-1, V)) for a in full]
    N = z2.shape[0]
    step = max(1, (block_elements or _block_elements(z)) // V)
    parts = []
    for i in range(0, max(N, 1), step):  # N == 0: one empty block, so the outputs get their dtypes
        j = min(i + step, N)
        blk = (z2[i:j, ...], *[None if a is None else a[i:j] for a in rows2], *[a[i:j, ...] for a in full2])
        parts.append(kernel(*blk))
    joined = parts[0] if len(parts) == 1 else tuple(
        None if ps[0] is None else xp.concat(ps, axis=0) for ps in zip(*parts, strict=True))
    return tuple(None if a is None else xp.reshape(a, lead) for a in joined)


def shifted_moments(xp, z: Array):
    """``(m, s, e, Z, log Z, H)`` of a block ``z (n, V)``: the row maximum ``m (n, 1)`` (NaN if not finite),
    ``s = z - m`` (clamped, see module doc), ``e = exp(s)``, and the per-row ``(n,)`` sum, its log and the
    entropy ``log Z - sum e s / Z``."""
    m = xp.max(z, axis=-1, keepdims=True)  # (n, 1)
    m = xp.where(xp.isfinite(m), m, float("nan"))  # NaN marks an undefined row
    s = xp.clip(z - m, min=MASKED_SHIFT)  # (n, V); NaN stays NaN
    e = xp.exp(s)  # (n, V)
    Z = xp.sum(e, axis=-1)  # (n,)
    logZ = xp.log(Z)
    H = logZ - xp.sum(e * s, axis=-1) / Z
    return m, s, e, Z, logZ, H


def _take_rows(xp, x: Array, k: Array) -> Array:
    """``x[i, k[i]]`` for a block ``x (n, V)`` and ``k (n,)``."""
    return xp.take_along_axis(x, xp.expand_dims(k, axis=-1), axis=-1)[:, 0]


def baseline_from_moments(xp, s: Array, e: Array, Z: Array, logZ: Array, H: Array) -> Array:
    """``E_p[S] = sum_i e_i^2 (s_i + H - log Z) / Z^2`` (E7) of a block, ``(n,)``: each term formed before the
    sum, as ``p_i (H + log p_i)`` is, so a near-uniform row keeps its small value's digits."""
    c = xp.expand_dims(H - logZ, axis=-1)  # (n, 1)
    return xp.sum((e * e) * (s + c), axis=-1) / (Z * Z)


@dataclass(frozen=True)
class RowStatistics:
    """Per-row statistics of ``(..., V)`` logits, each of shape ``(...)``; ``None`` where not asked for.

    Attributes:
        log_z: ``log sum_i exp(z_i - max z)`` (add ``max z`` for the log-partition function).
        entropy: ``H = -sum_i p_i log p_i`` (nats).
        baseline: ``E_{i~p}[S_i]`` (E7), with ``baseline=True``.
        logp: ``log p_k`` of the given token ``k``.
        s_star: ``S* = p_k (H + log p_k)`` (E2) of ``k``.
        deviation: ``S* - E_p[S]`` (the driver of E6), with ``k`` and ``baseline=True``.
    """

    log_z: Array
    entropy: Array
    baseline: Array | None = None
    logp: Array | None = None
    s_star: Array | None = None
    deviation: Array | None = None


def row_statistics(logits: Array, k: Array | None = None, *, baseline: bool = False,
                   block_elements: int | None = None, check_k: bool = True) -> RowStatistics:
    r"""``H``, ``E_p[S]`` and the token ``k``'s ``log p_k``, ``S*`` and deviation in one pass over the logits.

    .. math:: H = \log Z - \tfrac{1}{Z}\textstyle\sum_i e_i s_i, \quad
              \mathbb E_p[S] = \tfrac{1}{Z^2}\sum_i e_i^2 (s_i + H - \log Z), \quad
              S_* = p_k (H + \log p_k)

    (E2), (E7) of arXiv 2602.03392 from the moments of ``e = exp(z - max z)`` (module docstring). The same
    numbers as :func:`theory.entropy`, :func:`theory.vocab_baseline`, :func:`theory.deviation` and
    :func:`theory.s_star`, which call it; what a trainer computes for every response token.

    Args:
        logits: ``(..., V)`` logits, e.g. ``(B, T, V)``.
        k: optional ``(...)`` integer token index per row, in ``[0, V)`` (validated: one host sync on an
            accelerator).
        baseline: also compute ``E_p[S]`` (and, with ``k``, the deviation).
        block_elements: elements per row block (default by device); any value gives the same numbers.
        check_k: validate ``k`` (one host sync); a trainer whose indices are in range by construction
            passes False, so a decode step on an accelerator does not wait for the host.

    Returns:
        :class:`RowStatistics`, each field ``(...)``.

    Example:
        >>> import numpy as np
        >>> from theory import row_statistics
        >>> r = row_statistics(np.log(np.array([[0.7, 0.2, 0.1]])), np.array([0]), baseline=True)
        >>> np.round([r.entropy[0], r.baseline[0], r.s_star[0], r.deviation[0]], 4)
        array([0.8018, 0.1708, 0.3116, 0.1408])
    """
    xp = namespace(logits, *([] if k is None else [k]))
    check_logits(logits)
    z = as_float(xp, logits, "logits")
    if k is not None:
        k = check_index(xp, k, logits) if check_k else k
        if tuple(k.shape) != tuple(z.shape[:-1]):
            k = xp.broadcast_to(k, z.shape[:-1])

    if array_api_compat.is_numpy_namespace(xp):
        return _numpy_row_statistics(z, k, baseline, block_elements or NUMPY_BLOCK_ELEMENTS)
    if _torch_buffered(z):
        return _torch_row_statistics(xp, z, k, baseline, block_elements or TORCH_CPU_BLOCK_ELEMENTS)

    def kernel(zb, kb):
        m, s, e, Z, logZ, H = shifted_moments(xp, zb)
        base = baseline_from_moments(xp, s, e, Z, logZ, H) if baseline else None
        if kb is None:
            return logZ, H, base, None, None, None
        lp = _take_rows(xp, zb, kb) - m[:, 0] - logZ  # (n,); -inf for a masked token
        S = _s_star(xp, lp, H)
        return logZ, H, base, lp, S, None if base is None else S - base

    return RowStatistics(*row_blocks(xp, kernel, z, k, block_elements=block_elements))


def _numpy_row_statistics(z, k, baseline: bool, block_elements: int) -> RowStatistics:
    """:func:`row_statistics` for NumPy with the fewest passes per block: the intermediates ``s``, ``e`` in
    two reused buffers, each reduction a ``vecdot`` (no product array), results written into the outputs.

    No clamp of ``s``: a row with masked (``-inf``) logits gets ``e_i s_i = 0 * -inf = NaN`` here and is
    recomputed afterwards by the array-API kernel (which clamps); rows whose maximum is not finite are NaN
    either way and are left so.
    """
    import numpy as np

    lead, V = z.shape[:-1], z.shape[-1]
    z2 = z.reshape(-1, V)
    N, step = z2.shape[0], max(1, block_elements // V)
    m, logZ, H = (np.empty(N, z.dtype) for _ in range(3))
    base = np.empty(N, z.dtype) if baseline else None
    s_buf, e_buf = np.empty((min(step, N), V), z.dtype), np.empty((min(step, N), V), z.dtype)
    with np.errstate(invalid="ignore"):  # inf - inf, 0 * -inf: the rows recomputed below
        for i in range(0, N, step):
            zb = z2[i : i + step]
            n = zb.shape[0]
            s, e = s_buf[:n], e_buf[:n]
            m[i : i + n], Z, logZ[i : i + n], H[i : i + n] = numpy_block_moments(zb, s, e)
            if baseline:
                np.multiply(e, e, out=e)  # e^2
                np.add(s, (H[i : i + n] - logZ[i : i + n])[:, None], out=s)  # s + H - log Z
                base[i : i + n] = np.vecdot(e, s) / (Z * Z)
    redo = np.flatnonzero(np.isnan(H) & np.isfinite(m))  # rows with masked logits
    if redo.size:
        rows = z2[redo]
        _, s, e, Z, lz, h = shifted_moments(np, rows)
        logZ[redo], H[redo] = lz, h
        if baseline:
            base[redo] = baseline_from_moments(np, s, e, Z, lz, h)
    m[~np.isfinite(m)] = np.nan
    out = {"log_z": logZ, "entropy": H, "baseline": base}
    if k is not None:
        lp = np.take_along_axis(z2, k.reshape(-1, 1), axis=-1)[:, 0] - m - logZ  # -inf for a masked token
        out.update(logp=lp, s_star=_s_star(np, lp, H))
        if baseline:
            out["deviation"] = out["s_star"] - base
    return RowStatistics(**{f: None if v is None else v.reshape(lead) for f, v in out.items()})


def _torch_buffered(z) -> bool:
    """Whether a torch ``z`` takes :func:`_torch_row_statistics`: a plain CPU tensor with no derivative to
    keep (no autograd graph, no forward-mode tangent, no functorch wrapper), not under ``torch.compile``."""
    if not array_api_compat.is_torch_array(z) or z.device.type != "cpu":
        return False
    import torch

    if (z.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(z):
        return False
    return torch.autograd.forward_ad.unpack_dual(z).tangent is None


def _torch_row_statistics(xp, z, k, baseline: bool, block_elements: int) -> RowStatistics:
    """:func:`row_statistics` for a torch CPU tensor without autograd: the loop of
    :func:`_numpy_row_statistics` with three reused block buffers and ``out=`` operations.

    The array-API kernel allocates each block's intermediates afresh; at 1 MB each the allocator hands
    them back to the system and every block page-faults its memory in again (about 190k faults per
    ``(4096, 49152)`` float32 array, half the kernel's time in ``BENCHMARKS.md``). Same numbers as the
    kernel: the same operations in the same order, with the masked rows recomputed by it.
    """
    import torch

    lead, V = tuple(z.shape[:-1]), z.shape[-1]
    z2 = z.reshape(-1, V)
    N, step = z2.shape[0], max(1, block_elements // V)
    m, logZ, H = (z2.new_empty(N) for _ in range(3))
    base = z2.new_empty(N) if baseline else None
    s_buf, e_buf, g_buf = (z2.new_empty((min(step, N), V)) for _ in range(3))
    for i in range(0, N, step):
        zb = z2[i : i + step]
        n = zb.shape[0]
        s, e, g = s_buf[:n], e_buf[:n], g_buf[:n]
        torch.amax(zb, dim=-1, out=m[i : i + n])
        torch.sub(zb, m[i : i + n, None], out=s)
        torch.exp(s, out=e)
        Z = e.sum(dim=-1)
        torch.log(Z, out=logZ[i : i + n])
        H[i : i + n] = logZ[i : i + n] - torch.mul(e, s, out=g).sum(dim=-1) / Z
        if baseline:
            torch.mul(e, e, out=g)  # e^2
            s.add_((H[i : i + n] - logZ[i : i + n])[:, None])  # s + H - log Z
            base[i : i + n] = g.mul_(s).sum(dim=-1) / (Z * Z)
    redo = torch.nonzero(torch.isnan(H) & torch.isfinite(m))[:, 0]  # rows with masked logits
    if redo.numel():
        _, s, e, Z, lz, h = shifted_moments(xp, z2[redo])
        logZ[redo], H[redo] = lz, h
        if baseline:
            base[redo] = baseline_from_moments(xp, s, e, Z, lz, h)
    m[~torch.isfinite(m)] = float("nan")
    out = {"log_z": logZ, "entropy": H, "baseline": base}
    if k is not None:
        lp = _take_rows(xp, z2, k.reshape(-1)) - m - logZ  # -inf for a masked token
        out.update(logp=lp, s_star=_s_star(xp, lp, H))
        if baseline:
            out["deviation"] = out["s_star"] - base
    return RowStatistics(**{f: None if v is None else v.reshape(lead) for f, v in out.items()})


def numpy_block_moments(zb, s, e):
    """The NumPy loops' shared start of a block ``zb (n, V)``: ``s = zb - max zb`` and ``e = exp(s)`` written
    into the buffers ``s``, ``e``; returns ``(max, Z, log Z, H)``, each ``(n,)`` (``H`` by ``vecdot``: no
    product array). Unclamped: masked entries give NaN, which the callers recompute with the kernel."""
    import numpy as np

    m = zb.max(axis=-1)
    np.subtract(zb, m[:, None], out=s)
    np.exp(s, out=e)
    Z = e.sum(axis=-1)
    logZ = np.log(Z)
    return m, Z, logZ, logZ - np.vecdot(e, s) / Z


def _s_star(xp, lp: Array, H: Array) -> Array:
    """``p_k (H + log p_k)``, 0 for ``log p_k = -inf``."""
    return xp.exp(lp) * (H + finite_logp(xp, lp))
