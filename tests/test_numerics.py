"""Numerical extremes of the theory functions (issue: foundation, item 6).

* finite and accurate for |logit| up to 1e4 and vocabularies up to 2^17, in float32;
* ``-inf`` is a legal masked logit and contributes exactly 0;
* float16 / bfloat16 inputs are computed (and returned) in float32;
* a NaN (or +inf, or an all-masked row) yields NaN in that row only, with no exception or warning;
* shape, dtype and index errors raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import numpy as np
import pytest

import theory as T
from tests.conftest import to_numpy
from tests.strategies import entropy64, softmax64

# functions of logits alone, (..., V) -> (...) or (..., V)
LOGIT_FNS = [
    T.entropy,
    T.softmax,
    T.log_softmax,
    T.discriminator,
    T.vocab_baseline,
    T.sign_threshold,
    T.entropy_hessian,
]


def _all_outputs(be, z: np.ndarray, k: np.ndarray, dz: np.ndarray) -> dict[str, np.ndarray]:
    zb, kb, dzb = be.asarray(z), be.asarray(k), be.asarray(dz)
    out = {fn.__name__: to_numpy(fn(zb)) for fn in LOGIT_FNS}
    out["deviation"] = to_numpy(T.deviation(zb, kb))
    out["entropy_change_grpo"] = to_numpy(T.entropy_change_grpo(zb, kb, 0.1))
    out["entropy_change_single_logit"] = to_numpy(T.entropy_change_single_logit(zb, kb, 0.1))
    out["prob_change_single_logit"] = to_numpy(T.prob_change_single_logit(zb, kb, 0.1))
    out["grpo_logit_update"] = to_numpy(T.grpo_logit_update(zb, kb, 0.1))
    out["entropy_change_first_order"] = to_numpy(T.entropy_change_first_order(zb, dzb))
    out["entropy_change_second_order"] = to_numpy(T.entropy_change_second_order(zb, dzb))
    out["exact_entropy_change"] = to_numpy(T.exact_entropy_change(zb, dzb))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_are_finite_and_accurate(be, dtype):
    """|z| up to 1e4: results finite and equal to a float64 reference of the same inputs."""
    rng = np.random.default_rng(0)
    z = rng.uniform(-1e4, 1e4, size=(8, 1000)).astype(dtype)
    z[0, :3] = [1e4, 1e4 - 0.5, 1e4 - 3.0]  # a row with a few competitive logits at the extreme
    z[1] = -1e4 + rng.normal(size=1000).astype(dtype)  # every logit near -1e4
    z64 = z.astype(np.float64)
    k = np.argmax(z, axis=-1)
    dz = (rng.normal(size=z.shape) * 0.1).astype(dtype)
    outs = _all_outputs(be, z, k, dz)
    for name, v in outs.items():
        if name == "log_softmax":
            assert np.all(np.isfinite(v) | np.isneginf(v)), name
        else:
            assert np.all(np.isfinite(v)), name
    tol = 2e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(outs["entropy"], entropy64(z64), rtol=tol, atol=tol)
    np.testing.assert_allclose(outs["softmax"], softmax64(z64), rtol=tol, atol=tol)
    np.testing.assert_allclose(outs["discriminator"], to_numpy(T.discriminator(z64)), atol=tol)
    np.testing.assert_allclose(outs["vocab_baseline"], to_numpy(T.vocab_baseline(z64)), atol=tol)
    np.testing.assert_allclose(
        outs["exact_entropy_change"], entropy64(z64 + dz.astype(np.float64)) - entropy64(z64), atol=10 * tol
    )


@pytest.mark.slow
def test_vocabulary_of_2_to_the_17_in_float32(be):
    """V = 131072: uniform logits give H = 17 log 2; random logits match the float64 reference."""
    V = 2**17
    rng = np.random.default_rng(1)
    z = np.zeros((2, V), dtype=np.float32)
    z[1] = (rng.normal(size=V) * 4).astype(np.float32)
    zb = be.asarray(z)
    H = to_numpy(T.entropy(zb))
    assert H.dtype == np.float32
    np.testing.assert_allclose(H[0], 17 * np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(H, entropy64(z.astype(np.float64)), rtol=1e-5)
    S = to_numpy(T.discriminator(zb))
    assert abs(S.sum(-1)).max() < 1e-4
    base = to_numpy(T.vocab_baseline(zb))
    np.testing.assert_allclose(base, to_numpy(T.vocab_baseline(z.astype(np.float64))), rtol=1e-4, atol=1e-9)
    k = rng.integers(0, V, size=2)
    D = to_numpy(T.deviation(zb, be.asarray(k)))
    np.testing.assert_allclose(D, to_numpy(T.deviation(z.astype(np.float64), k)), rtol=1e-4, atol=1e-9)


def test_masked_logits_contribute_exactly_zero(be):
    """Appending -inf logits changes no result; masked entries of S, p and dp are exactly 0."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(4, 6)) * 3
    zm = np.concatenate([z, np.full((4, 5), -np.inf)], axis=-1)
    k = rng.integers(0, 6, size=4)
    dz = rng.normal(size=(4, 6)) * 0.3
    dzm = np.concatenate([dz, rng.normal(size=(4, 5)) * 50.0], axis=-1)  # arbitrary finite dz on masked
    plain, masked = _all_outputs(be, z, k, dz), _all_outputs(be, zm, k, dzm)
    for name in plain:
        a, b = plain[name], masked[name]
        if b.shape != a.shape:  # per-vocabulary outputs: compare the unmasked part, check the rest
            if name == "entropy_hessian":
                np.testing.assert_allclose(b[..., :6, :6], a, rtol=1e-12, atol=1e-15)
                assert np.all(b[..., 6:, :] == 0) and np.all(b[..., :, 6:] == 0)
                continue
            np.testing.assert_allclose(b[..., :6], a, rtol=1e-12, atol=1e-15, err_msg=name)
            tail = b[..., 6:]
            if name == "log_softmax":
                assert np.all(np.isneginf(tail))
            elif name == "grpo_logit_update":
                assert np.all(tail == 0), name  # -0.1 * p_i with p_i = 0
            else:
                assert np.all(tail == 0), name
        else:
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-15, err_msg=name)


def test_masked_logits_have_finite_zero_gradients():
    """The torch graph through a -inf logit carries no NaN: its gradient is exactly 0."""
    torch = pytest.importorskip("torch")
    z = torch.tensor([[1.0, -float("inf"), 0.5, -2.0], [-float("inf"), 3.0, 0.0, 0.0]], dtype=torch.float64)
    z.requires_grad_(True)
    k = torch.tensor([0, 1])
    dz = torch.full((2, 4), 0.1, dtype=torch.float64)
    total = (
        T.entropy(z).sum()
        + T.vocab_baseline(z).sum()
        + T.deviation(z, k).sum()
        + T.discriminator(z).sum()
        + T.exact_entropy_change(z, dz).sum()
        + T.entropy_change_second_order(z, dz).sum()
        + T.entropy_hessian(z).sum()
    )
    (g,) = torch.autograd.grad(total, z)
    assert torch.all(torch.isfinite(g))
    assert g[0, 1] == 0 and g[1, 0] == 0


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_is_computed_in_float32(be, half):
    if be.name == "numpy" and half == "bfloat16":
        pytest.skip("numpy has no bfloat16")
    if be.name == "array_api_strict":
        pytest.skip("array_api_strict has no float16/bfloat16")
    rng = np.random.default_rng(3)
    z32 = (rng.normal(size=(5, 300)) * 6).astype(np.float32)
    if be.name == "torch":
        torch = be.xp
        zh = torch.from_numpy(z32).to(getattr(torch, half))
        z_used = zh.to(torch.float64).numpy()
    else:
        zh = z32.astype(np.float16)
        z_used = zh.astype(np.float64)
    H = T.entropy(zh)
    assert str(H.dtype).endswith("float32")
    np.testing.assert_allclose(to_numpy(H), entropy64(z_used), rtol=1e-5, atol=1e-6)
    k = np.argmax(z_used, axis=-1)
    D = T.deviation(zh, be.asarray(k))
    assert str(D.dtype).endswith("float32")
    np.testing.assert_allclose(to_numpy(D), to_numpy(T.deviation(z_used, k)), atol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, "all_masked"])
def test_a_bad_row_is_nan_and_the_others_are_untouched(be, bad):
    rng = np.random.default_rng(4)
    z = rng.normal(size=(3, 5))
    k = np.array([0, 1, 2])
    dz = rng.normal(size=(3, 5)) * 0.1
    clean = _all_outputs(be, z, k, dz)
    zb = z.copy()
    if bad == "all_masked":
        zb[1] = -np.inf
    else:
        zb[1, 3] = bad
    dirty = _all_outputs(be, zb, k, dz)  # warnings are errors in this suite: none may be raised
    for name in clean:
        rows_ok = np.delete(dirty[name], 1, axis=0)
        np.testing.assert_array_equal(rows_ok, np.delete(clean[name], 1, axis=0), err_msg=name)
        assert np.all(np.isnan(dirty[name][1])), name


def test_nan_in_dz_only_affects_its_row(be):
    z = np.zeros((2, 4))
    dz = np.array([[0.1, np.nan, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]])
    for fn in (T.exact_entropy_change, T.entropy_change_first_order, T.entropy_change_second_order):
        out = to_numpy(fn(be.asarray(z), be.asarray(dz)))
        assert np.isnan(out[0]) and np.isfinite(out[1]), fn.__name__


def test_integer_logits_are_promoted(be):
    z = np.array([[1, 2, 3], [0, 0, 0]])
    H = to_numpy(T.entropy(be.asarray(z)))
    np.testing.assert_allclose(H, entropy64(z.astype(np.float64)), rtol=1e-6)


def test_negative_zero_entropy_is_not_produced():
    H = T.entropy(np.array([[1e4, -1e4, 0.0]], dtype=np.float32))
    assert not np.signbit(H[0])


# --- clear errors ----------------------------------------------------------------------------------


def _raises(match: str):
    return pytest.raises(ValueError, match=match)


def test_shape_and_index_errors_name_the_argument(be):
    z = be.asarray(np.zeros((2, 3)))
    good_k = be.asarray(np.array([0, 2]))
    with _raises("logits"):
        T.entropy(be.asarray(np.float64(1.0)))
    with _raises("logits has an empty vocabulary"):
        T.entropy(be.asarray(np.zeros((2, 0))))
    with _raises("k must have shape"):
        T.deviation(z, be.asarray(np.array([0, 1, 2])))
    with _raises(r"k must lie in \[0, V\)"):
        T.deviation(z, be.asarray(np.array([0, 3])))
    with _raises(r"k must lie in \[0, V\)"):
        T.entropy_change_grpo(z, be.asarray(np.array([-1, 0])), 0.1)
    with _raises("k must be an integer"):
        T.entropy_change_single_logit(z, be.asarray(np.array([0.0, 1.0])), 0.1)
    with _raises("dz"):
        T.entropy_change_first_order(z, be.asarray(np.zeros((2, 4))))
    with _raises("dz"):
        T.exact_entropy_change(z, be.asarray(np.zeros((3, 3))))
    with _raises("alpha"):
        T.entropy_change_grpo(z, good_k, be.asarray(np.ones(3)))
    with _raises("eps"):
        T.prob_change_single_logit(z, good_k, be.asarray(np.ones((2, 2))))
    with _raises("entropy"):
        T.s_star(be.asarray(np.zeros(3)), be.asarray(np.zeros(4)))
    with _raises("dev"):
        T.quadrant(be.asarray(np.zeros(3)), be.asarray(np.zeros(2)))
    with _raises("scale"):
        T.grpo_advantages(be.asarray(np.zeros((2, 2))), scale="groups")
    with _raises("rewards"):
        T.grpo_advantages(be.asarray(np.zeros((2, 0))))
    with _raises("eps"):
        T.grpo_advantages(be.asarray(np.zeros((2, 2))), eps=-1.0)


def test_complex_logits_are_rejected():
    with _raises("logits must be a real floating array"):
        T.entropy(np.zeros(3, dtype=np.complex128))


def test_s_star_accepts_a_python_scalar_entropy():
    import torch

    logp = np.log(np.array([0.5, 0.1]))
    want = T.s_star(logp, np.full(2, 1.5))
    np.testing.assert_allclose(T.s_star(logp, 1.5), want)
    got = T.s_star(torch.from_numpy(logp), 1.5)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), want)


@pytest.mark.parametrize("G", [2, 3, 8, 16, 17])
def test_last_axis_extreme_is_max_and_min_including_nan(G):
    """The folded short-axis max/min (NumPy fast path of grpo_advantages) is exactly xp.max / xp.min."""
    import array_api_compat.numpy as xp_np

    from theory._xp import last_axis_extreme

    rng = np.random.default_rng(G)
    x = rng.standard_normal((100, 3, G))
    x[5, 1, G // 2] = np.nan
    x[7, 0] = 0.0
    x[8, 0, 0] = -0.0
    for largest, ref in ((True, np.max), (False, np.min)):
        got = last_axis_extreme(xp_np, x, largest)
        np.testing.assert_array_equal(got, ref(x, axis=-1, keepdims=True))
        assert got.shape == (100, 3, 1)
