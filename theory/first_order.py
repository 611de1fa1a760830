"""Entropy change under a logit update: first order, second order, and exact.

Sources: arXiv 2602.03392 (Wang et al., 2026) Lemma 3.1 (E1), Theorem 3.2 (E3), Theorem 3.3 (E5, E6);
the general first-order form (E4) is the covariance lemma of Cui et al. (arXiv 2505.22617); the Hessian
and second-order term are derived in ``docs/equations.md`` §2.5 (checked against autograd in tests).

Setting (tabular softmax, one state per position): logits ``z`` of shape ``(..., V)`` are moved by
``dz`` and the entropy of ``softmax(z)`` changes by ``dH = H(z + dz) - H(z)``.
"""

from __future__ import annotations

import array_api_compat

from ._xp import (
    Array,
    as_float,
    broadcast_shape,
    check_index,
    check_logits,
    finite_logp,
    log_softmax_parts,
    namespace,
    take_last,
)
from .rowstats import NUMPY_BLOCK_ELEMENTS, numpy_block_moments, row_blocks, row_statistics, shifted_moments

__all__ = [
    "prob_change_single_logit",
    "entropy_change_single_logit",
    "entropy_change_first_order",
    "grpo_logit_update",
    "entropy_change_grpo",
    "entropy_hessian",
    "entropy_change_second_order",
    "exact_entropy_change",
]


class _Shape:
    """Stand-in carrying only a ``.shape``, for broadcast checks against a leading batch shape."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _prepare(logits: Array, *others: Array):
    xp = namespace(logits, *[o for o in others if hasattr(o, "shape")])
    check_logits(logits)
    z = as_float(xp, logits, "logits")
    logp = log_softmax_parts(xp, z)  # (..., V)
    p = xp.exp(logp)  # (..., V)
    lp = finite_logp(xp, logp)  # (..., V)
    H = -xp.sum(p * lp, axis=-1, keepdims=True)  # (..., 1)
    return xp, z, logp, p, lp, H


def _leading(xp, value: Array | float, logits: Array, dtype, name: str) -> Array:
    """Return ``value`` (scalar or array broadcastable to ``logits.shape[:-1]``) as an array of ``dtype``."""
    if not hasattr(value, "shape"):
        value = xp.asarray(value, dtype=dtype, device=array_api_compat.device(logits))
    else:
        value = as_float(xp, value, name)
        value = xp.astype(value, dtype) if value.dtype != dtype else value
    lead = _Shape(logits.shape[:-1])
    out = broadcast_shape(("logits.shape[:-1]", lead), (name, value))
    if out != lead.shape:
        raise ValueError(
            f"{name} with shape {tuple(value.shape)} must broadcast to logits.shape[:-1] = {lead.shape}"
        )
    return value


def _nan_where(xp, bad: Array, x: Array) -> Array:
    """``x`` with NaN where ``bad`` (the rows of a non-finite ``dz``)."""
    return xp.where(bad, xp.full_like(x, float("nan")), x)


def _logits_and_update(logits: Array, dz: Array):
    """``(xp, z, dz)``: float logits and a validated update of exactly their shape (broadcast if needed)."""
    xp = namespace(logits, *([dz] if hasattr(dz, "shape") else []))
    check_logits(logits)
    z = as_float(xp, logits, "logits")
    if not hasattr(dz, "shape"):
        raise ValueError("dz must be an array of shape (..., V) like logits")
    dz = as_float(xp, dz, "dz")
    out = broadcast_shape(("logits", logits), ("dz", dz))
    if out != tuple(logits.shape):
        raise ValueError(
            f"dz with shape {tuple(dz.shape)} must broadcast to logits' shape {tuple(logits.shape)}"
        )
    if dz.dtype != z.dtype:  # the logits' precision, as for every other argument
        dz = xp.astype(dz, z.dtype)
    if tuple(dz.shape) != tuple(z.shape):
        dz = dz + xp.zeros_like(z)  # materialise the broadcast: (..., V)
    return xp, z, dz


def _block_parts(xp, zb: Array, dzb: Array):
    """Per block ``(n, V)``: ``(p, log p (0 where p = 0), H (n, 1), dz (0 in bad rows), bad (n,))``."""
    m, s, e, Z, logZ, H = shifted_moments(xp, zb)
    finite = xp.isfinite(dzb)
    bad = ~xp.all(finite, axis=-1)
    dzb = xp.where(finite, dzb, xp.zeros_like(dzb))
    p = e / xp.expand_dims(Z, axis=-1)
    lp = xp.where(p > 0, s - xp.expand_dims(logZ, axis=-1), xp.zeros_like(s))
    return p, lp, xp.expand_dims(H, axis=-1), dzb, bad


def prob_change_single_logit(logits: Array, k: Array, eps: Array | float) -> Array:
    r"""First-order change of ``p`` when logit ``k`` moves by ``eps`` (Lemma 3.1, E1).

    .. math:: \delta p_i = \varepsilon\, p_i\,(\mathbb 1[i=k] - p_k) + O(\varepsilon^2)

    Args:
        logits: ``(..., V)`` logits.
        k: ``(...)`` integer index of the moved logit at each position.
        eps: scalar or array broadcastable to ``(...)``.

    Returns:
        ``(..., V)`` first-order probability changes; they sum to 0 along the last axis.

    Example:
        >>> import numpy as np
        >>> from theory import prob_change_single_logit
        >>> np.round(prob_change_single_logit(np.log(np.array([0.5, 0.3, 0.2])), np.array(0), 0.1), 4)
        array([ 0.025, -0.015, -0.01 ])
    """
    xp, z, logp, p, lp, H = _prepare(logits, k, eps)
    k = check_index(xp, k, logits)
    eps = _leading(xp, eps, logits, p.dtype, "eps")
    V = p.shape[-1]
    onehot = xp.astype(
        xp.expand_dims(k, axis=-1) == xp.arange(V, device=array_api_compat.device(p)), p.dtype
    )  # (..., V)
    pk = xp.expand_dims(take_last(xp, p, k), axis=-1)  # (..., 1)
    return xp.expand_dims(eps, axis=-1) * p * (onehot - pk)


def entropy_change_single_logit(logits: Array, k: Array, eps: Array | float) -> Array:
    r"""First-order entropy change when only logit ``k`` moves by ``eps`` (Theorem 3.2, E3).

    .. math:: \Delta H = -\varepsilon\, S_* + O(\varepsilon^2), \qquad S_* = p_k (H + \log p_k)

    Rewarding (``eps > 0``) a token with ``p_k > exp(-H)`` lowers the entropy.

    Args:
        logits: ``(..., V)`` logits.
        k: ``(...)`` integer index of the updated token (validated, one host sync on an accelerator).
        eps: scalar or array broadcastable to ``(...)``.

    Returns:
        ``(...)`` predicted entropy changes.

    Example:
        >>> import numpy as np
        >>> from theory import entropy_change_single_logit
        >>> round(float(entropy_change_single_logit(np.log(np.array([0.7, 0.2, 0.1])), np.array(0), 0.01)), 6)
        -0.003116
    """
    r = row_statistics(logits, k)
    xp = namespace(r.s_star)
    return -_leading(xp, eps, logits, r.s_star.dtype, "eps") * r.s_star


def entropy_change_first_order(logits: Array, dz: Array) -> Array:
    r"""First-order entropy change for an arbitrary logit update ``dz`` (E4).

    .. math:: \Delta H \approx \nabla_z H \cdot \delta z = -\sum_i S_i\, \delta z_i
              = -\operatorname{Cov}_{a\sim p}(\log p_a,\ \delta z_a)

    Contains (E3) (``dz = eps e_k``) and (E6) (``dz = alpha (e_k - p)``) as special cases; invariant
    to adding a constant to ``dz`` because ``sum_i S_i = 0``. Derived in ``docs/equations.md`` §3; the
    covariance form is Cui et al.'s (arXiv 2505.22617).

    Args:
        logits: ``(..., V)`` logits.
        dz: ``(..., V)`` logit update (broadcastable to ``logits``' shape); a row with a NaN or infinite
            entry gives NaN.

    Returns:
        ``(...)`` predicted entropy changes.

    Example:
        >>> import numpy as np
        >>> from theory import entropy_change_first_order
        >>> z = np.log(np.array([0.7, 0.2, 0.1]))
        >>> round(float(entropy_change_first_order(z, np.array([0.01, 0.0, 0.0]))), 6)
        -0.003116
    """
    xp, z, dz = _logits_and_update(logits, dz)

    def kernel(zb, dzb):
        p, lp, H, dzb, bad = _block_parts(xp, zb, dzb)
        return (_nan_where(xp, bad, -xp.sum(p * (H + lp) * dzb, axis=-1)),)

    if array_api_compat.is_numpy_namespace(xp):
        return _numpy_first_order(z, dz, kernel)
    return row_blocks(xp, kernel, z, full=(dz,))[0]


def _numpy_first_order(z, dz, kernel):
    """(E4) for NumPy: ``-sum_i e_i dz_i (log p_i + H) / Z`` on :func:`_numpy_update_rows`' parts."""
    import numpy as np

    return _numpy_update_rows(z, dz, kernel, lambda L, e, Z, db: -np.vecdot(np.multiply(e, db, out=e), L) / Z)


def _numpy_update_rows(z, dz, kernel, finish):
    """A per-row function of ``(z, dz)`` for NumPy with the fewest passes per block, as
    :func:`theory.rowstats._numpy_row_statistics`: per block of rows, ``e = exp(z - max z)`` and
    ``L = log p + H`` in two reused buffers (``vecdot`` reductions), then ``finish(L, e, Z, dz)`` (which may
    overwrite ``L`` and ``e``) gives the block's ``(n,)`` values; each term ``p_i (H + log p_i) ...`` is
    formed before its sum, as in the array-API ``kernel``. A row whose value is not finite (masked logits:
    ``0 * -inf``; a non-finite ``dz``) is recomputed by ``kernel``."""
    import numpy as np

    lead, V = z.shape[:-1], z.shape[-1]
    z2, d2 = z.reshape(-1, V), dz.reshape(-1, V)
    N, step = z2.shape[0], max(1, NUMPY_BLOCK_ELEMENTS // V)
    out = np.empty(N, z.dtype)
    s_buf, e_buf = np.empty((min(step, N), V), z.dtype), np.empty((min(step, N), V), z.dtype)
    with np.errstate(invalid="ignore", over="ignore"):  # the rows recomputed below
        for i in range(0, N, step):
            zb, db = z2[i : i + step], d2[i : i + step]
            n = zb.shape[0]
            s, e = s_buf[:n], e_buf[:n]
            _, Z, logZ, H = numpy_block_moments(zb, s, e)
            np.add(s, (H - logZ)[:, None], out=s)  # L = log p + H
            out[i : i + n] = finish(s, e, Z, db)
    redo = np.flatnonzero(~np.isfinite(out))
    if redo.size:
        out[redo] = kernel(z2[redo], d2[redo])[0]
    return out.reshape(lead)


def grpo_logit_update(logits: Array, k: Array, alpha: Array | float) -> Array:
    r"""The logit update of one GRPO token step in the tabular softmax model (E5).

    .. math:: \delta z = \eta\, r\, A\, \nabla_z \log p_k = \alpha\,(e_k - p), \qquad \alpha = \eta r A

    Args:
        logits: ``(..., V)`` logits.
        k: ``(...)`` sampled token index (validated, one host sync on an accelerator).
        alpha: effective step size, scalar or broadcastable to ``(...)``
            (see :func:`theory.effective_step_size`).

    Returns:
        ``(..., V)`` logit update.

    Example:
        >>> import numpy as np
        >>> from theory import grpo_logit_update
        >>> np.round(grpo_logit_update(np.log(np.array([0.5, 0.3, 0.2])), np.array(1), 0.1), 4)
        array([-0.05,  0.07, -0.02])
    """
    xp, z, logp, p, lp, H = _prepare(logits, k, alpha)
    k = check_index(xp, k, logits)
    alpha = _leading(xp, alpha, logits, p.dtype, "alpha")
    V = p.shape[-1]
    onehot = xp.astype(
        xp.expand_dims(k, axis=-1) == xp.arange(V, device=array_api_compat.device(p)), p.dtype
    )  # (..., V)
    return xp.expand_dims(alpha, axis=-1) * (onehot - p)


def entropy_change_grpo(logits: Array, k: Array, alpha: Array | float) -> Array:
    r"""First-order entropy change of one GRPO token update (Theorem 3.3, E6).

    .. math:: \Delta H = -\alpha\,\bigl(S_* - \mathbb E_{i\sim p}[S_i]\bigr) + O(\alpha^2)

    The driver is the deviation of ``S*`` from the baseline ``E_p[S]`` (E7), not ``S*`` itself.

    Args:
        logits: ``(..., V)`` logits.
        k: ``(...)`` sampled token index (validated, one host sync on an accelerator).
        alpha: ``eta * r * A``, scalar or broadcastable to ``(...)``.

    Returns:
        ``(...)`` predicted entropy changes.

    Example:
        >>> import numpy as np
        >>> from theory import entropy_change_grpo
        >>> z = np.log(np.array([0.7, 0.2, 0.1]))
        >>> np.round(entropy_change_grpo(np.stack([z, z]), np.array([0, 2]), 0.01), 6)
        array([-0.001408,  0.003209])
    """
    r = row_statistics(logits, k, baseline=True)
    xp = namespace(r.deviation)
    return -_leading(xp, alpha, logits, r.deviation.dtype, "alpha") * r.deviation


def entropy_hessian(logits: Array) -> Array:
    r"""Hessian of the entropy with respect to the logits, ``(..., V) -> (..., V, V)``.

    .. math:: \frac{\partial^2 H}{\partial z_j \partial z_l}
              = -\mathbb 1[j=l]\, p_j (L_j + 1) + p_j p_l (L_j + L_l + 1), \qquad L_j = \log p_j + H

    Derived in ``docs/equations.md`` §2.5 (not a result stated in arXiv 2602.03392); symmetric, and its
    rows sum to 0 (shift invariance). Memory is ``V^2`` per position: meant for small vocabularies;
    use :func:`entropy_change_second_order` for the quadratic form without building the matrix.

    Example:
        >>> import numpy as np
        >>> from theory import entropy_hessian
        >>> np.round(entropy_hessian(np.zeros(2)), 4)
        array([[-0.25,  0.25],
               [ 0.25, -0.25]])
    """
    xp, z, logp, p, lp, H = _prepare(logits)
    L = lp + H  # (..., V)
    pL = p * L  # (..., V)
    V = p.shape[-1]
    eye = xp.eye(V, dtype=p.dtype, device=array_api_compat.device(p))  # (V, V)
    col = lambda a: xp.expand_dims(a, axis=-1)  # noqa: E731  (..., V, 1)
    row = lambda a: xp.expand_dims(a, axis=-2)  # noqa: E731  (..., 1, V)
    outer = col(pL) * row(p) + col(p) * row(pL) + col(p) * row(p)  # (..., V, V)
    return outer - eye * row(p * (L + 1.0))


def entropy_change_second_order(logits: Array, dz: Array) -> Array:
    r"""Entropy change to second order in ``dz``: ``-S.dz + 1/2 dz^T (d^2H/dz^2) dz``.

    With ``L_j = log p_j + H``, ``a = sum_j p_j L_j dz_j`` and ``b = sum_j p_j dz_j`` the quadratic form of
    :func:`entropy_hessian` is ``-sum_j p_j (L_j + 1) dz_j^2 + 2ab + b^2``, so no ``(V, V)`` matrix is built.
    The error is ``O(|dz|^3)``. Derived in ``docs/equations.md`` §2.5.

    Args:
        logits: ``(..., V)`` logits.
        dz: ``(..., V)`` logit update; a row with a NaN or infinite entry gives NaN.

    Returns:
        ``(...)`` second-order prediction of ``H(z + dz) - H(z)`` (first-order term included).

    Example:
        >>> import numpy as np
        >>> from theory import entropy_change_second_order, exact_entropy_change
        >>> z, dz = np.log(np.array([0.7, 0.2, 0.1])), np.array([0.1, 0.0, 0.0])
        >>> round(float(entropy_change_second_order(z, dz)), 5), round(float(exact_entropy_change(z, dz)), 5)
        (-0.03159, -0.03155)
    """
    xp, z, dz = _logits_and_update(logits, dz)

    def kernel(zb, dzb):
        p, lp, H, dzb, bad = _block_parts(xp, zb, dzb)
        L = lp + H  # (n, V)
        pdz = p * dzb  # (n, V)
        a = xp.sum(pdz * L, axis=-1)  # (n,): sum_j p_j L_j dz_j = S . dz
        b = xp.sum(pdz, axis=-1)  # (n,)
        quad = -xp.sum(pdz * dzb * (L + 1.0), axis=-1) + 2.0 * a * b + b * b
        return (_nan_where(xp, bad, -a + 0.5 * quad),)

    if array_api_compat.is_numpy_namespace(xp):
        return _numpy_update_rows(z, dz, kernel, _second_order_finish)
    return row_blocks(xp, kernel, z, full=(dz,))[0]


def _second_order_finish(L, e, Z, dz):
    """The second-order block value from :func:`_numpy_update_rows`' ``L = log p + H``, ``e``, ``Z``."""
    import numpy as np

    np.multiply(e, dz, out=e)  # Z p dz
    a = np.vecdot(e, L) / Z  # S . dz
    b = e.sum(axis=-1) / Z
    np.multiply(e, dz, out=e)  # Z p dz^2
    L += 1.0
    return -a + 0.5 * (-np.vecdot(e, L) / Z + 2.0 * a * b + b * b)


def exact_entropy_change(logits: Array, dz: Array) -> Array:
    r"""Exact ``H(softmax(z + dz)) - H(softmax(z))``, computed without cancellation.

    Subtracting two entropies loses all digits when ``dz`` is small. Instead, with ``q = softmax(z+dz)``
    and ``d_i = log q_i - log p_i = dz_i - log sum_j p_j e^{dz_j}``,

    .. math:: H(q) - H(p) = -\sum_i (q_i - p_i) \log p_i \;-\; \sum_i q_i\, d_i ,

    where ``log sum_j p_j e^{dz_j}`` is ``log1p(sum_j p_j expm1(dz_j))`` for ``|dz| <= 1`` and a shifted
    log-sum-exp otherwise, and ``q_i - p_i = p_i expm1(d_i)``: each term keeps full relative precision,
    so the result is accurate even when ``|dz| ~ 1e-6`` in float32. Derived in ``docs/equations.md`` §2.5;
    the test oracle for (E3), (E4) and (E6).

    Args:
        logits: ``(..., V)`` logits.
        dz: ``(..., V)`` finite logit update (non-finite entries make that row NaN).

    Returns:
        ``(...)`` exact entropy changes.

    Example:
        >>> import numpy as np
        >>> from theory import exact_entropy_change, entropy
        >>> z, dz = np.log(np.array([0.7, 0.2, 0.1])), np.array([0.5, -0.2, 0.0])
        >>> round(float(exact_entropy_change(z, dz)), 8) == round(float(entropy(z + dz) - entropy(z)), 8)
        True
    """
    xp, z, dz = _logits_and_update(logits, dz)
    return row_blocks(xp, lambda zb, dzb: (_exact_block(xp, zb, dzb),), z, full=(dz,))[0]


def _exact_block(xp, zb: Array, dzb: Array) -> Array:
    """:func:`exact_entropy_change` of a block ``(n, V)``. ``c = log sum_j p_j e^{dz_j}`` by the branch its
    rows need: ``log1p`` for a block whose ``|dz| <= 1`` everywhere, the log-sum-exp for a block with no such
    row, both (picked per row) only for a block that mixes the two (one host read of the block's flag)."""
    p, lp, H, dzb, bad = _block_parts(xp, zb, dzb)
    one = 1.0
    w = xp.where(p > 0, lp + dzb, xp.full_like(lp, -float("inf")))  # (n, V): log p + dz, -inf off support
    small_row = xp.max(xp.abs(dzb), axis=-1, keepdims=True) <= one  # (n, 1)
    n_small = int(xp.sum(xp.astype(small_row, xp.int64)))

    def c_small():
        return xp.log1p(xp.sum(p * xp.expm1(xp.clip(dzb, min=-one, max=one)), axis=-1, keepdims=True))

    def c_large():
        m = xp.max(w, axis=-1, keepdims=True)  # (n, 1)
        m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
        return m + xp.log(xp.sum(xp.exp(w - m), axis=-1, keepdims=True))

    if n_small == small_row.shape[0]:
        c = c_small()
    elif n_small == 0:
        c = c_large()
    else:
        c = xp.where(small_row, c_small(), c_large())
    d = dzb - c  # (n, V): log q - log p on the support
    q = xp.exp(w - c)  # (n, V)
    dq = xp.where(xp.abs(d) <= one, p * xp.expm1(xp.clip(d, min=-one, max=one)), q - p)  # q - p
    return _nan_where(xp, bad[:, None], -xp.sum(dq * lp, axis=-1, keepdims=True)
                      - xp.sum(q * d, axis=-1, keepdims=True))[:, 0]
