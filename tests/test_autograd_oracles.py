"""Closed forms against torch autograd (the independent oracle) and torch.func.jvp.

* grad H = -S (E2/E4) for random logits, including masked ones;
* the Hessian closed form equals ``torch.autograd.functional.hessian``;
* (E4) equals the JVP of H along dz; the second-order term equals the second directional derivative;
* every torch result is differentiable (``gradcheck`` in float64).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import theory as T
from tests.strategies import direction_for, logits

torch = pytest.importorskip("torch")


@given(z=logits())
def test_entropy_gradient_is_minus_discriminator(z):
    zt = torch.from_numpy(z).requires_grad_(True)
    (g,) = torch.autograd.grad(T.entropy(zt).sum(), zt)
    S = T.discriminator(zt.detach())
    assert torch.all(torch.isfinite(g))
    torch.testing.assert_close(g, -S, rtol=1e-10, atol=1e-12)


@given(z=logits(max_batch_dims=0, max_v=10))
def test_hessian_matches_autograd(z):
    zt = torch.from_numpy(z)
    finite = torch.isfinite(zt)
    # autograd cannot differentiate through -inf inputs; compare on the unmasked sub-vocabulary
    sub = zt[finite]
    want = torch.autograd.functional.hessian(lambda x: T.entropy(x), sub)
    got = T.entropy_hessian(zt)[finite][:, finite]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@given(data=st.data(), z=logits(masked=False))
def test_first_and_second_order_are_directional_derivatives(data, z):
    d = torch.from_numpy(direction_for(data.draw, z))
    zt = torch.from_numpy(z)

    def dH(x):
        return torch.func.jvp(T.entropy, (x,), (d,))[1]

    first = torch.func.jvp(T.entropy, (zt,), (d,))[1]
    torch.testing.assert_close(T.entropy_change_first_order(zt, d), first, rtol=1e-10, atol=1e-12)
    second_dir = torch.func.jvp(dH, (zt,), (d,))[1]  # d^T Hess d
    torch.testing.assert_close(
        T.entropy_change_second_order(zt, d), first + 0.5 * second_dir, rtol=1e-9, atol=1e-11
    )


def test_outputs_are_differentiable_gradcheck():
    rng = np.random.default_rng(0)
    z = torch.tensor(rng.normal(size=(2, 5)) * 2, dtype=torch.float64, requires_grad=True)
    dz = torch.tensor(rng.normal(size=(2, 5)) * 0.3, dtype=torch.float64, requires_grad=True)
    k = torch.tensor([1, 4])
    alpha = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    checks = {
        "entropy": (T.entropy, (z,)),
        "softmax": (T.softmax, (z,)),
        "discriminator": (T.discriminator, (z,)),
        "vocab_baseline": (T.vocab_baseline, (z,)),
        "sign_threshold": (T.sign_threshold, (z,)),
        "deviation": (lambda x: T.deviation(x, k), (z,)),
        "entropy_change_grpo": (lambda x, a: T.entropy_change_grpo(x, k, a), (z, alpha)),
        "grpo_logit_update": (lambda x, a: T.grpo_logit_update(x, k, a), (z, alpha)),
        "entropy_change_first_order": (T.entropy_change_first_order, (z, dz)),
        "entropy_change_second_order": (T.entropy_change_second_order, (z, dz)),
        "exact_entropy_change": (T.exact_entropy_change, (z, dz)),
        "entropy_hessian": (T.entropy_hessian, (z,)),
        "s_star": (T.s_star, (z[:, 0] - 2.0, torch.tensor([1.0, 0.5], dtype=torch.float64).requires_grad_())),
    }
    for name, (fn, args) in checks.items():
        assert torch.autograd.gradcheck(fn, args), name


def test_exact_entropy_change_gradient_is_continuous_across_branches():
    """The |dz| <= 1 and |dz| > 1 evaluations agree, so the value is continuous at the switch."""
    z = torch.tensor([[0.3, -1.0, 2.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([[1.0, -0.5, 0.25, 0.0]], dtype=torch.float64)
    below = T.exact_entropy_change(z, d * (1 - 1e-12))
    above = T.exact_entropy_change(z, d * (1 + 1e-12))
    torch.testing.assert_close(below, above, rtol=1e-9, atol=1e-12)
