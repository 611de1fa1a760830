"""Array-API plumbing shared by every theory function (private).

Everything in :mod:`theory` is written once against the array API standard: a function receives NumPy
arrays, torch tensors (CPU or GPU) or any other array-API array, asks :func:`namespace` for the
matching namespace ``xp`` and calls only standard functions on it. The few operations the standard
lacks (log-softmax, a masked ``p * f(log p)`` product, index validation) live here, once.

Conventions used by every public function:

* the last axis is the vocabulary axis ``V``; any leading batch shape ``(...)`` such as ``(B, T)``;
* real floating inputs of less than 32 bits (float16, bfloat16) are computed and returned in
  float32; integer and boolean inputs are converted to the namespace's default floating dtype;
* ``-inf`` is a legal (masked) logit: its probability is exactly 0 and it contributes exactly 0 to
  every sum; its own entries in per-token outputs (``S_i``, ``p_i``) are 0 and its ``log p_i`` is ``-inf``;
* a row whose logits contain NaN, ``+inf``, or only ``-inf`` yields NaN in that row only, never an
  exception and never a finite wrong number;
* per-token *batch* statistics (the rules of :mod:`theory.rules`, :func:`theory.diagnostics.batch_statistics`)
  instead leave out every token with a non-finite input and report the fraction they left out
  (:func:`exclude_nonfinite`, ``docs/rules.md`` "Non-finite inputs"): one NaN must not switch a rule
  off for the whole batch;
* no host synchronisation, except where a function validates integer indices (documented there).
"""

from __future__ import annotations

from typing import Any

import array_api_compat

Array = Any  # any array-API array: numpy.ndarray, torch.Tensor, array_api_strict.Array, ...

__all__ = [
    "last_axis_extreme",
    "Array",
    "namespace",
    "as_float",
    "check_logits",
    "check_same_shape",
    "check_index",
    "log_softmax_parts",
    "finite_logp",
    "take_last",
    "broadcast_shape",
    "exclude_nonfinite",
]


def last_axis_extreme(xp, x: Array, largest: bool) -> Array:
    """``max`` (``largest``) or ``min`` of ``x (..., G)`` over its last axis, keepdims: ``(..., 1)``.

    The same values as ``xp.max`` / ``xp.min`` (NaN propagates). For a short last axis on NumPy (``G <=
    16``, at least 64 rows) it folds ``G`` elementwise ``maximum`` / ``minimum`` of the columns instead:
    NumPy's reduction over a short contiguous axis costs ~60 us for ``(1000, 8)``, the fold ~10 us.
    """
    G = x.shape[-1]
    if not (xp.__name__.endswith("numpy") and 2 <= G <= 16 and x.size >= 64 * G):
        return (xp.max if largest else xp.min)(x, axis=-1, keepdims=True)
    op = xp.maximum if largest else xp.minimum
    out = op(x[..., 0:1], x[..., 1:2])
    for g in range(2, G):
        out = op(out, x[..., g : g + 1])
    return out


def namespace(*arrays: Array):
    """Return the array-API namespace shared by ``arrays`` (compat-wrapped for numpy and torch)."""
    return array_api_compat.array_namespace(*arrays)


def as_float(xp, x: Array, name: str) -> Array:
    """Return ``x`` as a floating array of at least 32 bits.

    float16/bfloat16 are promoted to float32 (the vocabulary reductions are never done in half
    precision); integer and boolean arrays become the namespace's default floating dtype; complex
    input raises ``ValueError`` naming ``name``.
    """
    dtype = x.dtype
    if xp.isdtype(dtype, "real floating"):
        if dtype == xp.float32 or dtype == xp.float64:
            return x
        return xp.astype(x, xp.float32)
    if xp.isdtype(dtype, ("integral", "bool")):
        return xp.astype(x, _default_float(xp, x))
    raise ValueError(f"{name} must be a real floating array, got dtype {dtype}")


def _default_float(xp, x: Array):
    info = getattr(xp, "__array_namespace_info__", None)
    if info is not None:
        try:
            return info().default_dtypes(device=array_api_compat.device(x))["real floating"]
        except (TypeError, KeyError, AttributeError):  # pragma: no cover - old namespaces
            pass
    return xp.float64  # pragma: no cover


def check_logits(x: Array, name: str = "logits") -> None:
    """Raise ``ValueError`` unless ``x`` has at least one axis and a non-empty last (vocabulary) axis."""
    if x.ndim == 0:
        raise ValueError(f"{name} must have a vocabulary axis (shape (..., V)); got a 0-d array")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary axis: shape {tuple(x.shape)}")


def check_same_shape(a: Array, b: Array, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless ``b`` has exactly the shape of ``a``."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}"
        )


def check_index(xp, k: Array, logits: Array, name: str = "k") -> Array:
    """Validate a sampled-index array against ``logits`` of shape ``(..., V)``; return it as an array.

    ``k`` must be integral with shape ``logits.shape[:-1]`` and values in ``[0, V)``. The range check
    reads the data: on an accelerator it is one host synchronisation.
    """
    if not hasattr(k, "shape"):
        k = xp.asarray(k, device=array_api_compat.device(logits))
    if not xp.isdtype(k.dtype, "integral"):
        raise ValueError(f"{name} must be an integer index array, got dtype {k.dtype}")
    want = tuple(logits.shape[:-1])
    if tuple(k.shape) != want:
        raise ValueError(f"{name} must have shape logits.shape[:-1] = {want}, got {tuple(k.shape)}")
    V = logits.shape[-1]
    if k.ndim == 0 or array_api_compat.size(k) > 0:
        bad = xp.any((k < 0) | (k >= V))
        if bool(bad):
            lo, hi = int(xp.min(k)), int(xp.max(k))
            raise ValueError(f"{name} must lie in [0, V) = [0, {V}); got values in [{lo}, {hi}]")
    return k


def log_softmax_parts(xp, z: Array) -> Array:
    """Numerically stable ``log softmax`` over the last axis.

    Computed as ``(z - m) - log(sum(exp(z - m)))`` with ``m`` the row maximum, so logits of any
    magnitude (``|z|`` up to the float range) lose no precision to the shift. Rows whose maximum is
    not finite (NaN, ``+inf``, or all entries ``-inf``) become NaN without raising floating-point
    warnings.
    """
    m = xp.max(z, axis=-1, keepdims=True)
    nan = xp.asarray(float("nan"), dtype=z.dtype, device=array_api_compat.device(z))
    m = xp.where(xp.isfinite(m), m, nan)  # (..., 1); NaN marks an undefined row
    shifted = z - m  # (..., V); <= 0, -inf for masked logits
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def finite_logp(xp, logp: Array) -> Array:
    """``log p`` with ``-inf`` (masked entries, ``p = 0``) replaced by 0; NaN is kept.

    Used to form products ``p * f(log p)`` whose limit at ``p -> 0`` is 0 without creating
    ``0 * inf = NaN`` in the value or in the torch autograd graph.
    """
    return xp.where(logp == -xp.inf, 0.0, logp)


def take_last(xp, x: Array, k: Array) -> Array:
    """``x[..., k]`` per leading position: ``x`` is ``(..., V)``, ``k`` is ``(...)`` -> ``(...)``."""
    idx = xp.expand_dims(k, axis=-1)
    return xp.squeeze(xp.take_along_axis(x, idx, axis=-1), axis=-1)


def broadcast_shape(*named: tuple[str, Array]) -> tuple[int, ...]:
    """Broadcast the shapes of ``(name, array)`` pairs; ``ValueError`` naming the offender if impossible."""
    out: list[int] = []
    for name, a in named:
        shape = tuple(a.shape)
        n = max(len(out), len(shape))
        left = [1] * (n - len(out)) + out
        right = [1] * (n - len(shape)) + list(shape)
        merged = []
        for x, y in zip(left, right, strict=True):
            if x != y and 1 not in (x, y):
                others = ", ".join(f"{m} {tuple(b.shape)}" for m, b in named if m != name)
                raise ValueError(f"{name} with shape {shape} does not broadcast against {others}")
            merged.append(y if x == 1 else x)
        out = merged
    return tuple(out)


def exclude_nonfinite(xp, fields: dict[str, Array | None]) -> tuple[Array, dict[str, Array | None]]:
    """The non-finite policy of the batch statistics, in one place: ``(finite, cleaned)``.

    ``fields`` are per-token arrays of one shape (``None`` entries are skipped). ``finite`` is True at a
    token where *every* given field is finite (NaN, ``+inf`` and ``-inf`` all count as non-finite);
    ``cleaned`` holds each field as a floating array of at least 32 bits (:func:`as_float`) with every
    non-finite entry replaced by 0, so a later sort, quantile, top-k or sum over *all* tokens sees no NaN.
    The caller ANDs ``finite`` into its token mask (``valid``) and reports the fraction it removed; the
    zeros are placeholders that a masked statistic never reads. No host synchronisation.
    """
    finite = None
    cleaned: dict[str, Array | None] = {}
    for name, a in fields.items():
        if a is None:
            cleaned[name] = None
            continue
        a = as_float(xp, a, name)
        ok = xp.isfinite(a)
        cleaned[name] = xp.where(ok, a, xp.zeros_like(a))
        finite = ok if finite is None else finite & ok
    if finite is None:
        raise ValueError("exclude_nonfinite needs at least one array")
    return finite, cleaned
