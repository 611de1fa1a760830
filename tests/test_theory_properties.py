"""Property tests for every identity of docs/equations.md §9 ("Property tests"), on each backend.

Each test draws float64 logits (with optional ``-inf`` masks) from ``tests/strategies.py`` and runs the
same assertions on numpy, torch and array_api_strict (the ``be`` fixture). Independent float64 NumPy
references (``softmax64``, ``entropy64``) serve as oracles where a closed form is checked.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

import theory as T
from tests.conftest import to_numpy
from tests.strategies import direction_for, entropy64, index_for, logits, softmax64

step = st.floats(1e-4, 1e-2)


def _onehot(k: np.ndarray, V: int) -> np.ndarray:
    return (k[..., None] == np.arange(V)).astype(np.float64)


def _n_finite(z: np.ndarray) -> np.ndarray:
    return np.isfinite(z).sum(axis=-1)


# --- entropy, softmax ------------------------------------------------------------------------------


@given(z=logits())
def test_entropy_matches_reference_and_bounds(be, z):
    """0 <= H <= log(#unmasked), and H equals an independent float64 computation."""
    H = to_numpy(T.entropy(be.asarray(z)))
    assert H.shape == z.shape[:-1]
    np.testing.assert_allclose(H, entropy64(z), rtol=1e-10, atol=1e-12)
    assert np.all(H >= -1e-12)
    assert np.all(H <= np.log(_n_finite(z)) + 1e-12)


@given(z=logits())
def test_softmax_and_log_softmax(be, z):
    p = to_numpy(T.softmax(be.asarray(z)))
    logp = to_numpy(T.log_softmax(be.asarray(z)))
    np.testing.assert_allclose(p, softmax64(z), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-12)
    assert np.all(np.isneginf(logp) == ~np.isfinite(z))
    np.testing.assert_allclose(np.exp(logp), p, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(to_numpy(T.entropy_from_logp(be.asarray(logp))), entropy64(z), atol=1e-12)


@given(z=logits(), c=st.floats(-50.0, 50.0))
def test_shift_invariance(be, z, c):
    """H, S, E_p[S] and exp(-H) do not change when a constant is added to every logit."""
    a, b = be.asarray(z), be.asarray(z + c)
    for fn in (T.entropy, T.discriminator, T.vocab_baseline, T.sign_threshold):
        np.testing.assert_allclose(to_numpy(fn(b)), to_numpy(fn(a)), rtol=1e-9, atol=1e-9)


# --- the discriminator (E2) ------------------------------------------------------------------------


@given(z=logits())
def test_discriminator_definition_sum_zero_and_lower_bound(be, z):
    """S_i = p_i (H + log p_i); sum_i S_i = 0; S_i >= -exp(-H-1); S_i <= p_i H."""
    S = to_numpy(T.discriminator(be.asarray(z)))
    p, H = softmax64(z), entropy64(z)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = np.where(p > 0, p * (H + np.log(p)), 0.0)
    np.testing.assert_allclose(S, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(S.sum(axis=-1), 0.0, atol=1e-12)
    assert np.all(S >= -np.exp(-H - 1.0) - 1e-12)
    assert np.all(S <= p * H + 1e-12)
    assert np.all(S[~np.isfinite(z)] == 0.0)


@given(data=st.data(), z=logits())
def test_sign_condition(be, data, z):
    """sign(S_k) = sign(p_k - exp(-H)) (Theorem 3.2 / §2.4), away from the threshold itself."""
    k = data.draw(index_for(z))
    zb = be.asarray(z)
    S = to_numpy(T.discriminator(zb))
    thr = to_numpy(T.sign_threshold(zb))
    np.testing.assert_allclose(thr, np.exp(-entropy64(z)), rtol=1e-10)
    p_k = np.take_along_axis(softmax64(z), k[..., None], -1)[..., 0]
    S_k = np.take_along_axis(S, k[..., None], -1)[..., 0]
    clear = np.abs(p_k - thr) > 1e-9
    assert np.all(np.sign(S_k[clear]) == np.sign(p_k - thr)[clear])


@given(data=st.data(), z=logits())
def test_s_star_from_logp_and_entropy(be, data, z):
    """s_star(log p_k, H) equals S_k of the full discriminator."""
    k = data.draw(index_for(z))
    zb = be.asarray(z)
    logp = np.take_along_axis(to_numpy(T.log_softmax(zb)), k[..., None], -1)[..., 0]
    H = to_numpy(T.entropy(zb))
    got = to_numpy(T.s_star(be.asarray(logp), be.asarray(H)))
    want = np.take_along_axis(to_numpy(T.discriminator(zb)), k[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


# --- the GRPO baseline (E7) and Corollary 3.4 ------------------------------------------------------


@given(z=logits())
def test_vocab_baseline_is_a_nonnegative_covariance(be, z):
    """E_p[S] = sum p_i S_i = Cov_p(p, log p) >= 0."""
    zb = be.asarray(z)
    base = to_numpy(T.vocab_baseline(zb))
    S = to_numpy(T.discriminator(zb))
    p = softmax64(z)
    np.testing.assert_allclose(base, (p * S).sum(-1), rtol=1e-9, atol=1e-13)
    with np.errstate(divide="ignore"):
        logp = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    cov = (p * p * logp).sum(-1) - (p * p).sum(-1) * (p * logp).sum(-1)
    np.testing.assert_allclose(base, cov, rtol=1e-8, atol=1e-12)
    assert np.all(base >= -1e-12)


@given(z=logits(max_batch_dims=1))
def test_corollary_3_4_on_policy_mean_deviation_is_zero(be, z):
    """sum_k p_k (S_k - E_p[S]) = 0 exactly (E8), evaluating ``deviation`` at every k."""
    V = z.shape[-1]
    zz = np.broadcast_to(z[..., None, :], z.shape[:-1] + (V, V)).copy()  # (..., V, V): one row per k
    k = np.broadcast_to(np.arange(V), z.shape[:-1] + (V,)).copy()
    D = to_numpy(T.deviation(be.asarray(zz), be.asarray(k)))  # (..., V)
    p = softmax64(z)
    np.testing.assert_allclose((p * D).sum(-1), 0.0, atol=1e-12)


def test_corollary_3_5_monte_carlo(be):
    """The batch mean of D over on-policy samples -> 0, while the mean of S* does not (Cor 3.5)."""
    rng = np.random.default_rng(0)
    n, V = 20000, 32
    z = rng.normal(size=(n, V)) * rng.uniform(0.5, 4.0, size=(n, 1))
    p = softmax64(z)
    k = (rng.random((n, 1)) < np.cumsum(p, -1)).argmax(-1)
    D = to_numpy(T.deviation(be.asarray(z), be.asarray(k)))
    logp = np.log(np.take_along_axis(p, k[:, None], -1)[:, 0])
    S_star = to_numpy(T.s_star(be.asarray(logp), be.asarray(entropy64(z))))
    assert abs(D.mean()) < 4 * D.std() / np.sqrt(n)
    assert abs(S_star.mean()) > 10 * abs(D.mean())


# --- first order: Lemma 3.1, Theorem 3.2, (E4), Theorem 3.3 ----------------------------------------


@given(data=st.data(), z=logits(), eps=step, sign=st.sampled_from([-1.0, 1.0]))
def test_lemma_3_1_residual_is_second_order(be, data, z, eps, sign):
    """softmax(z + eps e_k) - p - dp_first = O(eps^2) (E1); dp sums to 0."""
    k = data.draw(index_for(z))
    eps = sign * eps
    dp = to_numpy(T.prob_change_single_logit(be.asarray(z), be.asarray(k), eps))
    np.testing.assert_allclose(dp.sum(-1), 0.0, atol=1e-15)
    exact = softmax64(z + eps * _onehot(k, z.shape[-1])) - softmax64(z)
    assert np.all(np.abs(exact - dp) <= eps**2)


@given(data=st.data(), z=logits(), eps=step, sign=st.sampled_from([-1.0, 1.0]))
def test_theorem_3_2_residual_is_second_order(be, data, z, eps, sign):
    """H(z + eps e_k) - H(z) = -eps S_k + O(eps^2) (E3); the eps^2 coefficient is the Hessian diagonal."""
    k = data.draw(index_for(z))
    eps = sign * eps
    V = z.shape[-1]
    zb, kb = be.asarray(z), be.asarray(k)
    first = to_numpy(T.entropy_change_single_logit(zb, kb, eps))
    dz = eps * _onehot(k, V)
    exact = to_numpy(T.exact_entropy_change(zb, be.asarray(dz)))
    np.testing.assert_allclose(exact, entropy64(z + dz) - entropy64(z), atol=1e-12)
    C = 2.0 + 2.0 * np.log(V)  # bound on |d^2H/deps^2| / 2 along one logit
    assert np.all(np.abs(exact - first) <= C * eps**2)
    # the paper-independent second-order coefficient for one logit (docs/equations.md §2.5)
    p, H = softmax64(z), entropy64(z)
    p_k = np.take_along_axis(p, k[..., None], -1)[..., 0]
    L_k = np.log(p_k) + H
    hess = to_numpy(T.entropy_hessian(zb))
    rows = np.take_along_axis(hess, k[..., None, None], -2)[..., 0, :]  # (..., V): row k
    h_kk = np.take_along_axis(rows, k[..., None], -1)[..., 0]
    np.testing.assert_allclose(h_kk, -p_k * (L_k + 1) + p_k**2 * (2 * L_k + 1), atol=1e-12)


@given(data=st.data(), z=logits(), c=st.floats(-5.0, 5.0))
def test_general_first_order_is_covariance_and_shift_invariant(be, data, z, c):
    """(E4): -sum S_i dz_i = -Cov_p(log p, dz), unchanged by dz + c; contains (E3) and (E6)."""
    d = direction_for(data.draw, z)
    k = data.draw(index_for(z))
    zb = be.asarray(z)
    got = to_numpy(T.entropy_change_first_order(zb, be.asarray(d)))
    p = softmax64(z)
    with np.errstate(divide="ignore"):
        logp = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    cov = (p * logp * d).sum(-1) - (p * logp).sum(-1) * (p * d).sum(-1)
    np.testing.assert_allclose(got, -cov, atol=1e-12)
    shifted = to_numpy(T.entropy_change_first_order(zb, be.asarray(d + c)))
    np.testing.assert_allclose(shifted, got, atol=1e-11)
    V = z.shape[-1]
    e3 = to_numpy(T.entropy_change_single_logit(zb, be.asarray(k), 0.3))
    np.testing.assert_allclose(
        to_numpy(T.entropy_change_first_order(zb, be.asarray(0.3 * _onehot(k, V)))), e3, atol=1e-14
    )
    upd = T.grpo_logit_update(zb, be.asarray(k), -0.2)
    np.testing.assert_allclose(
        to_numpy(T.entropy_change_first_order(zb, upd)),
        to_numpy(T.entropy_change_grpo(zb, be.asarray(k), -0.2)),
        atol=1e-14,
    )


@given(data=st.data(), z=logits(max_scale=4.0), alpha=step, sign=st.sampled_from([-1.0, 1.0]))
def test_theorem_3_3_residual_is_second_order(be, data, z, alpha, sign):
    """H(z + alpha (e_k - p)) - H(z) = -alpha (S_k - E_p[S]) + O(alpha^2) (E5, E6)."""
    k = data.draw(index_for(z))
    alpha = sign * alpha
    zb, kb = be.asarray(z), be.asarray(k)
    dz = to_numpy(T.grpo_logit_update(zb, kb, alpha))
    np.testing.assert_allclose(dz, alpha * (_onehot(k, z.shape[-1]) - softmax64(z)), atol=1e-15)
    pred = to_numpy(T.entropy_change_grpo(zb, kb, alpha))
    D = to_numpy(T.deviation(zb, kb))
    np.testing.assert_allclose(pred, -alpha * D, rtol=1e-12, atol=1e-16)
    exact = to_numpy(T.exact_entropy_change(zb, be.asarray(dz)))
    # docs/equations.md §9: residual <= 0.25 alpha^2 for logits of scale <= 4
    assert np.all(np.abs(exact - pred) <= 0.25 * alpha**2)


@given(data=st.data(), z=logits(max_scale=4.0), sign=st.sampled_from([-1.0, 1.0]))
def test_small_grpo_step_sign_is_predicted_by_the_quadrant(be, data, z, sign):
    """For a small step the sign of the exact dH is -sign(A) sign(S* - E_p[S]) (quadrant table)."""
    k = data.draw(index_for(z))
    alpha = sign * 1e-4
    zb, kb = be.asarray(z), be.asarray(k)
    D = to_numpy(T.deviation(zb, kb))
    adv = np.full(D.shape, sign)
    exact = to_numpy(T.exact_entropy_change(zb, T.grpo_logit_update(zb, kb, alpha)))
    predicted = to_numpy(T.entropy_change_sign(be.asarray(adv), be.asarray(D)))
    clear = np.abs(D) > 1e-2  # first-order term dominates the O(alpha^2) remainder
    assume(np.any(clear))
    assert np.all(np.sign(exact[clear]) == predicted[clear])
    q = to_numpy(T.quadrant(be.asarray(adv), be.asarray(D)))
    expected_q = np.where(sign > 0, 0, 2) + (D < 0)
    assert np.all(q[D != 0] == expected_q[D != 0])
    assert np.all(q[D == 0] == -1)


# --- second order and the Hessian --------------------------------------------------------------------


@given(data=st.data(), z=logits(max_scale=4.0), eps=st.floats(1e-3, 3e-2))
def test_second_order_matches_exact_to_third_order(be, data, z, eps):
    """|exact - second order| = O(eps^3) and |exact - first order| = O(eps^2) along a direction."""
    d = direction_for(data.draw, z)
    zb = be.asarray(z)
    dz = be.asarray(eps * d)
    exact = to_numpy(T.exact_entropy_change(zb, dz))
    np.testing.assert_allclose(exact, entropy64(z + eps * d) - entropy64(z), atol=1e-12)
    second = to_numpy(T.entropy_change_second_order(zb, dz))
    first = to_numpy(T.entropy_change_first_order(zb, dz))
    V = z.shape[-1]
    assert np.all(np.abs(exact - second) <= 2.0 * V * eps**3)
    assert np.all(np.abs(exact - first) <= 2.0 * V * eps**2)
    # the quadratic form without the matrix equals the one through the Hessian
    hess = to_numpy(T.entropy_hessian(zb))
    quad = 0.5 * np.einsum("...i,...ij,...j->...", eps * d, hess, eps * d)
    np.testing.assert_allclose(second, first + quad, atol=1e-13)


@given(z=logits(max_batch_dims=1))
def test_hessian_symmetric_rows_sum_to_zero_and_negative_on_uniform(be, z):
    hess = to_numpy(T.entropy_hessian(be.asarray(z)))
    V = z.shape[-1]
    assert hess.shape == z.shape + (V,)
    np.testing.assert_allclose(hess, np.swapaxes(hess, -1, -2), atol=1e-14)
    np.testing.assert_allclose(hess.sum(-1), 0.0, atol=1e-12)


def test_hessian_finite_differences_of_gradient(be):
    """dS/dz by central differences equals -Hessian (the gradient of H is -S)."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, 7)) * 2.0
    h = 1e-5
    hess = to_numpy(T.entropy_hessian(be.asarray(z)))
    for j in range(7):
        e = np.zeros(7)
        e[j] = h
        up, down = T.discriminator(be.asarray(z + e)), T.discriminator(be.asarray(z - e))
        dS = (to_numpy(up) - to_numpy(down)) / (2 * h)
        np.testing.assert_allclose(-dS, hess[..., j], atol=1e-8)


# --- exact entropy change ----------------------------------------------------------------------------


@given(data=st.data(), z=logits(), size=st.floats(1e-6, 30.0))
def test_exact_entropy_change_matches_reference_at_all_step_sizes(be, data, z, size):
    d = direction_for(data.draw, z)
    got = to_numpy(T.exact_entropy_change(be.asarray(z), be.asarray(size * d)))
    want = entropy64(z + size * d) - entropy64(z)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-12)


def test_exact_entropy_change_is_accurate_for_tiny_float32_steps(be):
    """In float32 a naive H(z+dz) - H(z) loses every digit at |dz| ~ 1e-6; ours keeps ~1e-4 relative."""
    rng = np.random.default_rng(2)
    z = (rng.normal(size=(64, 100)) * 3).astype(np.float32)
    dz = (rng.normal(size=(64, 100)) * 1e-6).astype(np.float32)
    got = to_numpy(T.exact_entropy_change(be.asarray(z), be.asarray(dz)))
    assert got.dtype == np.float32
    z64, dz64 = z.astype(np.float64), dz.astype(np.float64)
    want = to_numpy(T.entropy_change_second_order(z64, dz64))  # exact to O(1e-18) at this step size
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-11)
    naive = to_numpy(T.entropy(be.asarray(z + dz))) - to_numpy(T.entropy(be.asarray(z)))
    assert np.median(np.abs(naive - want)) > 10 * np.median(np.abs(got - want))


# --- GRPO advantages ----------------------------------------------------------------------------------


@given(
    r=st.integers(1, 4).flatmap(
        lambda P: st.integers(2, 8).flatmap(
            lambda G: st.lists(st.floats(-5, 5), min_size=P * G, max_size=P * G).map(
                lambda v: np.asarray(v).reshape(P, G)
            )
        )
    ),
    correction=st.sampled_from([0, 1]),
)
def test_grpo_advantages_group_normalised(be, r, correction):
    A = to_numpy(T.grpo_advantages(be.asarray(r), correction=correction, eps=1e-6))
    const = np.ptp(r, axis=-1, keepdims=True) == 0
    centred = np.where(const, 0.0, r - r.mean(-1, keepdims=True))  # a tied group is exactly 0
    std = r.std(-1, ddof=correction, keepdims=True)
    # the mean's rounding (~1e-16 |r|) is amplified by 1 / (std + eps) when a group is nearly tied
    atol = 1e-14 * (1.0 + np.abs(r).max()) / (std.min() + 1e-6)
    np.testing.assert_allclose(A, centred / (std + 1e-6), rtol=1e-9, atol=atol)
    np.testing.assert_allclose(A.sum(-1), 0.0, atol=1e-6)
    assert np.all(A[np.broadcast_to(const, A.shape)] == 0)
    none = to_numpy(T.grpo_advantages(be.asarray(r), scale="none"))
    np.testing.assert_allclose(none, centred, atol=1e-12)
    batch = to_numpy(T.grpo_advantages(be.asarray(r), scale="batch", correction=correction, eps=1e-4))
    atol_b = 1e-14 * (1.0 + np.abs(r).max()) / (r.std(ddof=correction) + 1e-4)
    np.testing.assert_allclose(batch, centred / (r.std(ddof=correction) + 1e-4), rtol=1e-9, atol=atol_b)


def test_grpo_advantages_presets_and_singletons(be):
    r = np.array([[1.0, 0.0, 0.0, 0.0]])
    for name, kw in T.ADVANTAGE_PRESETS.items():
        A = to_numpy(T.grpo_advantages(be.asarray(r), **kw))
        assert A[0, 0] > 0 > A[0, 1], name
    trl = to_numpy(T.grpo_advantages(be.asarray(r), **T.ADVANTAGE_PRESETS["trl"]))
    np.testing.assert_allclose(trl[0, 0], 0.75 / (0.5 + 1e-4))  # unbiased std of (1,0,0,0) = 0.5
    single = to_numpy(T.grpo_advantages(be.asarray(np.array([[2.0], [-1.0]]))))
    np.testing.assert_allclose(single, np.array([[2.0], [-1.0]]) / (1 + 1e-6))


def test_effective_step_size(be):
    adv = be.asarray(np.array([1.0, -2.0, 0.5]))
    ratio = be.asarray(np.array([1.0, 0.8, 1.2]))
    got = to_numpy(T.effective_step_size(1e-3, adv, ratio=ratio, normaliser=10.0))
    np.testing.assert_allclose(got, 1e-3 * np.array([1.0, -1.6, 0.6]) / 10.0)
