"""theory.rowstats: the one-pass row statistics agree with the defining sums, whatever the blocking.

The defining formulas are written out here in float64 (``p log p`` sums over the vocabulary); the fused
path computes them from moments of ``exp(z - max z)`` in blocks of rows, with a NumPy fast path and an
array-API path (torch, array_api_strict).
"""

from __future__ import annotations

import array_api_strict
import numpy as np
import pytest
import torch

import theory
from theory.first_order import _exact_block
from theory.rowstats import row_blocks, row_statistics


def _reference(z: np.ndarray, k: np.ndarray):
    """``(H, E_p[S], log p_k, S*)`` from the definitions, float64, masked entries dropped by hand."""
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        logp = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    p = np.exp(logp)
    lp = np.where(p > 0, logp, 0.0)
    H = -(p * lp).sum(-1)
    base = (p * p * (H[..., None] + lp)).sum(-1)
    lpk = np.take_along_axis(logp, k[..., None], -1)[..., 0]
    return H, base, lpk, np.exp(lpk) * (H + np.where(np.isfinite(lpk), lpk, 0.0))


def _logits(seed: int, shape=(6, 5, 97)):
    rng = np.random.default_rng(seed)
    z = 4.0 * rng.standard_normal(shape)
    z2 = z.reshape(-1, shape[-1])  # a view
    z2[0, :30] = -np.inf  # a row with masked entries
    z2[7, 5] = -np.inf
    k = rng.integers(0, shape[-1], shape[:-1])
    k.reshape(-1)[7] = 5  # a masked sampled token: log p = -inf, S* = 0
    return z, k


@pytest.mark.parametrize("block", [1, 97, 300, 10**6])
@pytest.mark.parametrize("backend", ["numpy", "torch", "torch_grad", "strict"])
def test_row_statistics_match_the_definitions_for_any_blocking(block, backend):
    """``torch`` takes the buffered no-grad loop, ``torch_grad`` (a leaf that requires grad) the kernel."""
    z, k = _logits(0)
    H, base, lpk, S = _reference(z, k)
    conv = {"numpy": np.asarray, "torch": torch.from_numpy, "strict": array_api_strict.asarray,
            "torch_grad": lambda a: torch.tensor(a, requires_grad=a.dtype.kind == "f")}[backend]
    r = row_statistics(conv(z), conv(k), baseline=True, block_elements=block)
    got = {f: np.asarray(getattr(r, f).detach() if backend == "torch_grad" else getattr(r, f))
           for f in ("entropy", "baseline", "logp", "s_star", "deviation")}
    np.testing.assert_allclose(got["entropy"], H, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got["baseline"], base, rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(np.isneginf(got["logp"]), np.isneginf(lpk))
    fin = np.isfinite(lpk)
    np.testing.assert_allclose(got["logp"][fin], lpk[fin], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["s_star"], S, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got["deviation"], S - base, rtol=1e-10, atol=1e-14)
    assert got["s_star"].reshape(-1)[7] == 0.0


def test_undefined_rows_are_nan_on_both_paths():
    z, k = _logits(1, (8, 50))
    z, k = z[[0, 1, 2, 3]], k[[0, 1, 2, 3]]
    z[1] = -np.inf  # no finite entry
    z[2, 7] = np.nan
    z[3, 0] = np.inf
    for conv in (np.asarray, torch.from_numpy):
        r = row_statistics(conv(z), conv(k), baseline=True, block_elements=50)
        for f in ("entropy", "baseline", "s_star"):
            v = np.asarray(getattr(r, f))
            assert np.isfinite(v[0]) and np.isnan(v[1:]).all(), (f, v)


def test_torch_buffered_loop_is_the_kernel_bit_for_bit():
    """The no-grad torch loop (reused buffers, ``out=``) and the differentiable kernel: equal numbers."""
    rng = np.random.default_rng(4)
    z = torch.from_numpy((3.0 * rng.standard_normal((37, 300))).astype(np.float32))
    z[3, :100] = -torch.inf  # masked entries: recomputed by the kernel
    k = torch.from_numpy(rng.integers(0, 300, 37))
    fast = row_statistics(z, k, baseline=True, block_elements=1000)
    with torch.enable_grad():
        slow = row_statistics(z.clone().requires_grad_(True), k, baseline=True, block_elements=1000)
    for f in ("log_z", "entropy", "baseline", "logp", "s_star", "deviation"):
        a, b = getattr(fast, f), getattr(slow, f).detach()
        assert a.dtype == torch.float32 and not a.requires_grad, f
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f)


def test_float32_fast_path_keeps_float32_and_its_precision():
    rng = np.random.default_rng(2)
    z = (3.0 * rng.standard_normal((8, 4096))).astype(np.float32)
    k = rng.integers(0, 4096, 8)
    H, base, _, _ = _reference(z, k)
    r = row_statistics(z, k, baseline=True)
    assert r.entropy.dtype == np.float32 and r.baseline.dtype == np.float32
    np.testing.assert_allclose(r.entropy, H, rtol=2e-6)
    np.testing.assert_allclose(r.baseline, base, rtol=2e-5)


def test_torch_gradient_of_the_blocked_entropy_is_minus_s_and_finite_with_masks():
    """``dH/dz_i = -S_i`` (docs/equations.md §2.5), through the blocks and the masked clamp."""
    z, _ = _logits(3, (3, 4, 40))
    t = torch.tensor(z, requires_grad=True)
    row_statistics(t, block_elements=80).entropy.sum().backward()
    S = theory.discriminator(z)
    assert torch.isfinite(t.grad).all()
    np.testing.assert_allclose(t.grad.numpy(), -S, rtol=1e-10, atol=1e-14)


def test_row_blocks_joins_blocks_in_order_and_handles_empty_input():
    z = np.arange(24.0).reshape(2, 3, 4)
    (out,) = row_blocks(np, lambda zb: (zb[:, 0] * 10,), z, block_elements=4)
    np.testing.assert_array_equal(out, z[..., 0] * 10)
    (empty,) = row_blocks(np, lambda zb: (zb.sum(-1),), np.zeros((0, 5)))
    assert empty.shape == (0,)


def test_exact_change_picks_one_branch_per_block_and_mixed_blocks_agree():
    """A block of small-``dz`` rows, one of large-``dz`` rows and one that mixes them give the same rows."""
    rng = np.random.default_rng(4)
    z = 2.0 * rng.standard_normal((4, 30))
    dz = 1e-3 * rng.standard_normal((4, 30))
    dz[1] *= 3000.0  # |dz| up to ~10: the log-sum-exp branch
    dz[3] *= 3000.0
    per_row = np.concatenate([_exact_block(np, z[i : i + 1], dz[i : i + 1]) for i in range(4)])
    mixed = _exact_block(np, z, dz)
    np.testing.assert_allclose(mixed, per_row, rtol=1e-13)
    q = theory.entropy(z + dz) - theory.entropy(z)
    np.testing.assert_allclose(per_row[[1, 3]], q[[1, 3]], rtol=1e-9)
    np.testing.assert_allclose(theory.exact_entropy_change(z, dz), per_row, rtol=1e-13)


def test_scale_logit_stats_is_the_row_statistics():
    from scale.token_stats import logit_stats

    z, k = _logits(5, (12, 33))
    zt, kt = torch.from_numpy(z), torch.from_numpy(k)
    lp, H, S, base = logit_stats(zt, kt, s_star=True, baseline=True)
    ref = _reference(z, k)
    for got, want in zip((H, base, S), (ref[0], ref[1], ref[3]), strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-14)
    assert logit_stats(zt, kt, entropy=False)[1] is None


@pytest.mark.parametrize("block", [1, 300, 10**6])
@pytest.mark.parametrize("fn", ["entropy_change_first_order", "entropy_change_second_order"])
def test_numpy_update_loop_matches_the_array_api_kernel(monkeypatch, block, fn):
    """The NumPy loop of the first/second-order changes (reused buffers, vecdot) against the generic
    kernel (array_api_strict), with masked logits and non-finite ``dz`` rows recomputed by the kernel."""
    import theory.first_order as fo

    monkeypatch.setattr(fo, "NUMPY_BLOCK_ELEMENTS", block)
    z, _ = _logits(5, (7, 3, 60))
    dz = 0.05 * np.random.default_rng(6).standard_normal(z.shape)
    dz.reshape(-1, 60)[4, 2] = np.inf
    dz.reshape(-1, 60)[9, 0] = np.nan
    want = np.asarray(getattr(theory, fn)(array_api_strict.asarray(z), array_api_strict.asarray(dz)))
    got = getattr(theory, fn)(z, dz)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got.reshape(-1)[[4, 9]]).all() and np.isfinite(got.reshape(-1)[0])
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-15)
    got32 = getattr(theory, fn)(z.astype(np.float32), dz.astype(np.float32))
    assert got32.dtype == np.float32
    fin = np.isfinite(want)
    np.testing.assert_allclose(got32[fin], want[fin], rtol=2e-3, atol=1e-6)
