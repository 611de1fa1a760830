"""Hypothesis strategies shared by every property test (one module, all backends).

Data is generated as NumPy float64 and converted to each backend by ``conftest.Backend.asarray``, so
the same example runs on numpy, torch and array_api_strict.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

unit = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False)


@st.composite
def logits(draw, *, min_v=2, max_v=24, max_batch_dims=2, max_scale=8.0, masked=True):
    """``(..., V)`` float64 logits of scale up to ``max_scale``; optionally some ``-inf`` entries.

    Every row keeps at least one finite logit. Returns the array.
    """
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=max_batch_dims)))
    V = draw(st.integers(min_v, max_v))
    scale = draw(st.floats(0.05, max_scale))
    z = draw(arrays(np.float64, batch + (V,), elements=unit)) * scale
    if masked and draw(st.booleans()):
        mask = draw(arrays(np.bool_, batch + (V,)))
        keep = np.argmax(z, axis=-1)[..., None]  # never mask a row's largest logit
        np.put_along_axis(mask, keep, False, axis=-1)
        z = np.where(mask, -np.inf, z)
    return z


@st.composite
def index_for(draw, z: np.ndarray):
    """A token index per leading position of ``z``, chosen among its finite (unmasked) logits."""
    flat = z.reshape(-1, z.shape[-1])
    ks = []
    for row in flat:
        choices = np.flatnonzero(np.isfinite(row))
        ks.append(int(choices[draw(st.integers(0, len(choices) - 1))]))
    return np.asarray(ks, dtype=np.int64).reshape(z.shape[:-1])


def direction_for(draw, z: np.ndarray) -> np.ndarray:
    """A logit direction of the shape of ``z`` with max-norm 1 per row (0 rows replaced by e_0)."""
    d = draw(arrays(np.float64, z.shape, elements=unit))
    norm = np.max(np.abs(d), axis=-1, keepdims=True)
    d = np.where(norm > 0, d / np.where(norm > 0, norm, 1.0), 0.0)
    d[..., 0] = np.where(norm[..., 0] > 0, d[..., 0], 1.0)
    return d


def softmax64(z: np.ndarray) -> np.ndarray:
    """Independent float64 softmax reference (max-shifted), for oracles."""
    m = np.max(z, axis=-1, keepdims=True)
    e = np.exp(z - m)
    return e / e.sum(axis=-1, keepdims=True)


def entropy64(z: np.ndarray) -> np.ndarray:
    """Independent float64 entropy reference: ``-sum p log p`` with ``0 log 0 = 0``."""
    p = softmax64(z)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -plogp.sum(axis=-1)
