"""toy.fused (the numba backend of the toy's dense passes) against NumPy and against itself."""

from __future__ import annotations

import numpy as np
import pytest

import toy.kernels as kernels
from toy.bandit import Bandit
from toy.grpo import GRPOConfig, init_state, step

fused = pytest.importorskip("toy.fused", reason="numba is not installed (the 'fast' extra)")
numba = pytest.importorskip("numba")

FLOOR = {np.float32: -87.33, np.float64: -708.39}


@numba.njit
def _map(f, x, out):
    for i in range(x.size):
        out[i] = f(x[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_is_within_an_ulp_or_two_and_zero_below_its_floor(dtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([-np.abs(rng.standard_normal(200_000) * 30), -rng.random(100_000) * 720,
                        [0.0, -0.5, FLOOR[dtype], np.nextafter(FLOOR[dtype], 0)]]).astype(dtype)
    z = x[:64].reshape(2, 32)
    fused.softmax_rows(z, np.empty_like(z), np.empty((2, 0)))  # compiled inside the kernels first: the
    got = np.empty_like(x)  # exp must not inherit their fast-math flags (reassociation breaks it)
    _map(fused.exp_f32 if dtype == np.float32 else fused.exp_f64, x, got)
    ok = x >= FLOOR[dtype]
    if dtype == np.float32:  # within 1 ulp of the float64 value (NumPy's own float32 exp: 2.4 ulp)
        want = np.exp(x[ok].astype(np.float64))
        assert (np.abs(got[ok] - want) <= np.spacing(want.astype(np.float32))).all()
    else:
        want = np.exp(x[ok])
        assert (np.abs(got[ok] - want) <= 2 * np.spacing(want)).all()
    assert (got[~ok] == 0).all() and ok.sum() > 100_000
    assert got[x == 0][0] == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("V", [3, 32, 33, 1000])
def test_softmax_rows_agree_with_the_numpy_backend(dtype, V):
    rng = np.random.default_rng(V)
    z = (3 * rng.standard_normal((2, 3, 4, V))).astype(dtype)
    u = rng.random((2, 3, 4, 16))
    work = {k: np.empty_like(z) for k in "seg"}
    m0, e0, Z0, logZ0, H0, tok0 = (x.copy() for x in kernels.softmax_parts(z, work, u, backend="numpy"))
    m1, e1, Z1, logZ1, H1, tok1 = kernels.softmax_parts(z, work, u, backend="numba")
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_array_equal(m1, m0)
    for a, b in ((e1, e0), (Z1, Z0), (logZ1, logZ0), (H1, H0)):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    assert (tok1 == tok0).mean() > 0.99


def test_sampling_matches_the_probabilities_and_never_draws_a_zero_weight_token():
    rng = np.random.default_rng(1)
    z = np.log(np.array([[0.5, 0.0, 0.2, 0.3] + [0.0] * 36]) + 1e-300)  # exp underflows to 0 at ~-690
    z = np.repeat(z, 4, axis=0)
    u = rng.random((4, 50_000))
    u[:, :3] = np.nextafter(1.0, 0.0)  # rounds onto the total: the last token of positive weight
    e = np.empty_like(z)
    _, Z, _, _, tok = fused.softmax_rows(z, e, u)
    assert set(np.unique(tok)) == {0, 2, 3} and (tok[:, :3] == 3).all()
    freq = np.bincount(tok.ravel(), minlength=4)[[0, 2, 3]] / tok.size
    np.testing.assert_allclose(freq, [0.5, 0.2, 0.3], atol=0.005)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_give_the_same_bits_alone_in_any_batch_and_on_any_number_of_threads(dtype):
    rng = np.random.default_rng(2)
    z = (2 * rng.standard_normal((130, 257))).astype(dtype)
    u = rng.random((130, 8))
    e = np.empty_like(z)
    full = [x.copy() for x in fused.softmax_rows(z, e, u)]
    e_full = e.copy()
    for i in (0, 64, 129):
        e1 = np.empty_like(z[i : i + 1])
        one = fused.softmax_rows(z[i : i + 1], e1, u[i : i + 1])
        for a, b in zip(one, full, strict=True):
            np.testing.assert_array_equal(a[0], b[i])
        np.testing.assert_array_equal(e1[0], e_full[i])
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = fused.softmax_rows(z, e, u)
    finally:
        numba.set_num_threads(before)
    for a, b in zip(single, full, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sgd", [False, True])
def test_logit_gradient_is_bit_identical_on_both_backends(dtype, sgd):
    rng = np.random.default_rng(3)
    R, M, G, T, V = 3, 2, 5, 2, 50
    z = rng.standard_normal((R, M, T, V)).astype(dtype)
    e = np.exp(z - z.max(-1, keepdims=True))
    Z = e.sum(-1)
    tokens = rng.integers(0, 4, (R, M, G, T))  # repeated tokens: the scatter order matters
    r, m, t = np.ogrid[:R, :M, :T]
    flat = ((r[..., None] * M + m[..., None]) * T + t[:, :, None, :]) * V + tokens
    coef = rng.standard_normal((R, M, G, T))
    got = {}
    for backend in ("numpy", "numba"):
        params = z.copy()
        out = np.full_like(z, np.nan)
        res = kernels.logit_gradient(coef, flat, e, Z, out, sgd_params=params if sgd else None, lr=0.3,
                                     backend=backend)
        assert res is (params if sgd else out)
        got[backend] = res.copy()
    np.testing.assert_array_equal(got["numba"], got["numpy"])


def test_toy_runs_on_both_backends_agree_and_a_run_is_the_same_alone():
    b = Bandit(n_prompts=2, horizon=2, vocab=40, n_correct=4, need=1)
    hist = {}
    for backend in ("numpy", "numba"):
        cfg = GRPOConfig(group_size=4, lr=0.1, init_scale=1.0, kernels=backend)
        st = init_state(b, cfg, runs=4, seed=7)
        hist[backend] = [step(b, cfg, st, diagnostics=False)["entropy"] for _ in range(5)]
        if backend == "numba":
            alone = init_state(b, cfg, runs=4, seed=7)
            alone.params, alone.rngs = alone.params[2:3].copy(), alone.rngs[2:3]
            for h in hist[backend]:
                np.testing.assert_array_equal(step(b, cfg, alone, diagnostics=False)["entropy"], h[2:3])
    np.testing.assert_allclose(np.array(hist["numba"]), np.array(hist["numpy"]), rtol=1e-9)


def test_bad_backend_names_and_a_missing_numba_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="kernels must be one of"):
        GRPOConfig(kernels="cuda")
    monkeypatch.setattr(kernels, "fused", None)
    assert kernels.resolve_backend("auto") == "numpy"
    with pytest.raises(ImportError, match="needs numba"):
        kernels.resolve_backend("numba")
