"""scale.token_stats (chunked lm_head statistics) and scale.loss (the torch GRPO loss, rules applied once).

Oracles: an unchunked float64 computation written out with plain torch ops (values and autograd
gradients); loss values and gradients computed by hand on a fixed batch; the NumPy backend's update
formulas (toy/grpo.py ``step``) for the rule semantics.
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import scale.loss  # noqa: E402
import scale.token_stats  # noqa: E402
from scale.loss import LossConfig, grpo_loss, loss_normaliser, slice_rule_output  # noqa: E402
from scale.token_stats import token_stats  # noqa: E402
from theory.rules import RULES, RuleOutput, TokenBatch, make_rule  # noqa: E402

F64 = torch.float64


def _inputs(B=3, T=7, D=6, V=19, seed=0, dtype=F64, p_mask=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=F64).to(dtype).requires_grad_()
    W = torch.randn(V, D, generator=g, dtype=F64).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(V, generator=g, dtype=F64)).to(dtype).requires_grad_()
    k = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > p_mask
    mask[0, 0] = True
    k = torch.where(mask, k, -100)  # padding ids are ignored
    return h, W, b, k, mask


def _reference(h, W, b, k, mask, tau):
    """Unchunked statistics with plain torch ops (an independent oracle): (B, T) each, 0 where masked."""
    z = (h.double() @ W.double().T + (0 if b is None else b.double())) / tau  # (B, T, V)
    lp_all = torch.log_softmax(z, -1)
    p = lp_all.exp()
    H = -(p * lp_all).sum(-1)
    lp = lp_all.gather(-1, k.clamp_min(0)[..., None])[..., 0]
    S = lp.exp() * (H + lp)
    base = (p * p * (H[..., None] + lp_all)).sum(-1)
    return [torch.where(mask, x, 0.0) for x in (lp, H, S, base)]


# ------------------------------------------------------------------------------------------------
# token_stats
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 4, 5, 16, 21, 1000])
@pytest.mark.parametrize("skip_masked", [False, True])
def test_chunked_stats_equal_unchunked_values_and_gradients(chunk, skip_masked):
    h, W, b, k, mask = _inputs()
    tau = 0.7
    st = token_stats(h, W, k, mask, bias=b, temperature=tau, chunk_size=chunk, entropy_grad=True,
                     s_star=True, baseline=True, skip_masked=skip_masked)
    ref = _reference(h, W, b, k, mask, tau)
    for got, want in zip((st.logp, st.entropy, st.s_star, st.baseline), ref, strict=True):
        assert got.shape == (3, 7) and got.dtype == F64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.all(st.logp[~mask] == 0) and torch.all(st.entropy[~mask] == 0)
    assert not st.s_star.requires_grad and not st.baseline.requires_grad

    g = torch.Generator().manual_seed(1)
    c1, c2 = torch.randn(3, 7, generator=g, dtype=F64), torch.randn(3, 7, generator=g, dtype=F64)
    got = torch.autograd.grad((c1 * st.logp + c2 * st.entropy).sum(), (h, W, b))
    want = torch.autograd.grad((c1 * ref[0] + c2 * ref[1]).sum(), (h, W, b))
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    assert torch.all(got[0][~mask] == 0)  # masked positions: exactly zero gradient


def test_gradcheck_logp_and_entropy():
    h, W, b, k, mask = _inputs(B=2, T=3, D=3, V=5, seed=4)

    def f(h, W, b):
        st = token_stats(h, W, k, mask, bias=b, temperature=1.3, chunk_size=2, entropy_grad=True)
        return st.logp, st.entropy

    assert torch.autograd.gradcheck(f, (h, W, b))


def test_entropy_without_grad_and_logp_only():
    h, W, b, k, mask = _inputs()
    st = token_stats(h, W, k, mask, chunk_size=4)
    assert st.logp.requires_grad and not st.entropy.requires_grad
    assert st.s_star is None and st.baseline is None
    only = token_stats(h, W, k, mask, chunk_size=4, entropy=False)
    assert only.entropy is None
    torch.testing.assert_close(only.logp, st.logp, rtol=0, atol=0)
    # gradient through logp only equals the reference's
    (gW,) = torch.autograd.grad(only.logp.sum(), W)
    (rW,) = torch.autograd.grad(_reference(h, W, None, k, mask, 1.0)[0].sum(), W)
    torch.testing.assert_close(gW, rW, rtol=0, atol=1e-12)
    # s_star alone still computes (and returns) the entropy it needs
    st2 = token_stats(h, W, k, mask, chunk_size=4, entropy=False, s_star=True)
    assert st2.entropy is not None and st2.s_star is not None


def test_bf16_inputs_give_float32_logits_and_bf16_grads():
    h, W, b, k, mask = _inputs(dtype=torch.bfloat16, V=37)
    st = token_stats(h, W, k, mask, bias=b, chunk_size=4, entropy_grad=True, s_star=True)
    assert st.logp.dtype == torch.float32 and st.entropy.dtype == torch.float32
    # float32 logits of the exactly upcast bf16 values (not bf16 logits upcast afterwards)
    ref = _reference(h.float(), W.float(), b.float(), k, mask, 1.0)
    torch.testing.assert_close(st.logp.double(), ref[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(st.entropy.double(), ref[1], rtol=0, atol=2e-5)
    gh, gW = torch.autograd.grad((st.logp + st.entropy).sum(), (h, W))
    assert gh.dtype == torch.bfloat16 and gW.dtype == torch.bfloat16
    rh, rW = torch.autograd.grad((ref[0] + ref[1]).sum(), (h, W))
    torch.testing.assert_close(gW.double(), rW.double(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gh.double(), rh.double(), rtol=2e-2, atol=2e-2)


def test_logits_stay_float32_under_autocast():
    h, W, b, k, mask = _inputs(dtype=torch.float32, V=37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        st = token_stats(h, W, k, mask, bias=b, chunk_size=4)
        gW = torch.autograd.grad(st.logp.sum(), W)[0]
    ref = _reference(h, W, b, k, mask, 1.0)[0]
    assert st.logp.dtype == torch.float32
    torch.testing.assert_close(st.logp.double(), ref, rtol=0, atol=1e-5)  # bf16 logits would be ~1e-2 off
    torch.testing.assert_close(gW.double(), torch.autograd.grad(ref.sum(), W)[0].double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("skip_masked", [False, True])
def test_fully_masked_batch(skip_masked):
    h, W, b, k, mask = _inputs()
    st = token_stats(h, W, k, torch.zeros_like(mask), chunk_size=4, s_star=True, skip_masked=skip_masked)
    assert torch.all(st.logp == 0) and torch.all(st.s_star == 0)
    (gh,) = torch.autograd.grad(st.logp.sum(), h)
    assert torch.all(gh == 0)


class _ShapeLog(TorchDispatchMode):
    """Records the numel of every tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, tuple | list) else (out,):
            if isinstance(o, torch.Tensor):
                self.sizes.append((str(func), tuple(o.shape)))
        return out


def _largest(log: _ShapeLog, exclude: set[tuple[int, ...]]) -> int:
    return max(int(np.prod(s)) for _, s in log.sizes if s not in exclude)


def test_no_full_logits_tensor_in_forward_or_backward():
    """Every intermediate is at most chunk x V (besides the (V, D) weight and its gradient)."""
    B, T, D, V, chunk = 4, 10, 6, 50, 7  # N = 40 tokens, N*V = 2000 > chunk*V = 350 > V*D = 300
    h, W, b, k, mask = _inputs(B=B, T=T, D=D, V=V, p_mask=0.0)
    with _ShapeLog() as log:
        st = token_stats(h, W, k, mask, bias=b, chunk_size=chunk, entropy_grad=True, s_star=True,
                         baseline=True)
        (st.logp.sum() + st.entropy.sum()).backward()
    n_fwd_bwd = len(log.sizes)
    assert n_fwd_bwd > 50  # the mode did see the chunk loops of forward and backward
    assert any(s == (chunk, V) for _, s in log.sizes)
    assert _largest(log, {(V, D)}) <= chunk * V

    # the same check catches the unchunked computation
    with _ShapeLog() as log_full:
        ref = _reference(h, W, b, k, mask, 1.0)
        (ref[0].sum() + ref[1].sum()).backward()
    assert _largest(log_full, {(V, D)}) >= B * T * V


def test_saved_tensors_hold_no_vocabulary_sized_activation():
    B, T, D, V = 4, 10, 6, 50
    h, W, b, k, mask = _inputs(B=B, T=T, D=D, V=V)
    saved: list[int] = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        st = token_stats(h, W, k, mask, bias=b, chunk_size=3, entropy_grad=True)
    assert saved and max(saved) <= max(V * D, B * T * D)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        _reference(h, W, b, k, mask, 1.0)
    assert max(saved) >= B * T * V  # what autograd would keep without the custom function
    assert st.logp.requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"bias": torch.zeros(3, dtype=F64)}, "bias"),
    ],
)
def test_token_stats_rejects_bad_arguments(kwargs, match):
    h, W, b, k, mask = _inputs()
    with pytest.raises(ValueError, match=match):
        token_stats(h, W, k, mask, **kwargs)


def test_token_stats_rejects_bad_shapes():
    h, W, b, k, mask = _inputs()
    with pytest.raises(ValueError, match="hidden"):
        token_stats(h[0], W, k, mask)
    with pytest.raises(ValueError, match="weight"):
        token_stats(h, W[:, :2], k, mask)
    with pytest.raises(ValueError, match="target"):
        token_stats(h, W, k[:, :2], mask)
    with pytest.raises(ValueError, match="target"):
        token_stats(h, W, k.double(), mask)
    with pytest.raises(ValueError, match="mask"):
        token_stats(h, W, k, mask.long())


# ------------------------------------------------------------------------------------------------
# grpo_loss: hand-computed values
# ------------------------------------------------------------------------------------------------

# A fixed batch, B = 3 sequences, T = 4. Ratios r = exp(logp - old_logp); clip [0.8, 1.2], dual c = 3.
RATIO = np.array([[1.1, 1.5, 0.7, 1.0], [0.9, 0.5, 4.0, 1.3], [1.0, 1.0, 1.0, 1.0]])
ADV = np.array([1.0, -1.0, 0.6])
MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=bool)
# per-token loss, by hand:
#   row 0 (A = +1): -min(r, 1.2):            -1.1, -1.2 (clipped high), -0.7 (A > 0, no low clip)
#   row 1 (A = -1): min(max(r, 0.8), 3):      0.9,  0.8 (clipped low),  3.0 (dual clip), 1.3 (no high clip)
#   row 2 (A = 0.6): -0.6 r:                 -0.6
ELL = {(0, 0): -1.1, (0, 1): -1.2, (0, 2): -0.7, (1, 0): 0.9, (1, 1): 0.8, (1, 2): 3.0, (1, 3): 1.3,
       (2, 0): -0.6}
# d ell / d log p = -A r where the unclipped arm is active, 0 where a clip is active
DELL = {(0, 0): -1.1, (0, 2): -0.7, (1, 0): 0.9, (1, 3): 1.3, (2, 0): -0.6}


def _fixed(dtype=F64):
    g = torch.Generator().manual_seed(7)
    old = torch.log(torch.rand(3, 4, generator=g, dtype=F64) * 0.5 + 0.1)
    logp = (old + torch.log(torch.tensor(RATIO))).to(dtype)
    logp = torch.where(torch.tensor(MASK), logp, torch.nan)  # garbage on padding must not leak
    return logp.requires_grad_(), old.to(dtype), torch.tensor(ADV, dtype=dtype), torch.tensor(MASK)


@pytest.mark.parametrize(
    "aggregation, max_length, expected",
    [
        ("token_mean", None, (-1.1 - 1.2 - 0.7 + 0.9 + 0.8 + 3.0 + 1.3 - 0.6) / 8),  # = 0.3
        ("seq_mean", None, ((-1.1 - 1.2 - 0.7) / 3 + (0.9 + 0.8 + 3.0 + 1.3) / 4 + (-0.6) / 1) / 3),
        ("constant", None, 2.4 / (3 * 4)),
        ("constant", 10, 2.4 / (3 * 10)),
    ],
)
def test_loss_matches_hand_computation(aggregation, max_length, expected):
    logp, old, adv, mask = _fixed()
    cfg = LossConfig(aggregation=aggregation, max_length=max_length)
    loss, m = grpo_loss(logp, old, adv, mask, config=cfg)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    if aggregation != "seq_mean":
        assert sum(ELL.values()) == pytest.approx(2.4, abs=1e-12)  # the per-token values above
    loss.backward()
    grad = logp.grad.numpy()
    for (i, t), d in DELL.items():
        if aggregation == "token_mean":
            scale = 1 / 8
        elif aggregation == "seq_mean":
            scale = 1 / (MASK[i].sum() * 3)
        else:
            scale = 1 / (3 * (max_length or 4))
        assert grad[i, t] == pytest.approx(d * scale, abs=1e-12), (i, t)
    clipped = [(i, t) for (i, t) in ELL if (i, t) not in DELL]
    assert all(grad[i, t] == 0.0 for i, t in clipped)  # clipped and dual-clipped: exactly 0
    assert np.all(grad[~MASK] == 0.0)  # masked (NaN logp): exactly 0
    # metrics: one token in each clip region out of 8 kept; all metrics detached 0-d tensors
    assert m["clip_frac_low"].item() == pytest.approx(1 / 8)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 8)
    assert m["clip_frac_dual"].item() == pytest.approx(1 / 8)
    assert m["kept_frac"].item() == 1.0
    ratios = RATIO[MASK]
    assert m["approx_kl"].item() == pytest.approx(np.mean(ratios - 1 - np.log(ratios)), abs=1e-12)
    assert m["ratio_mean"].item() == pytest.approx(ratios.mean(), abs=1e-12)
    assert m["policy_loss"].item() == pytest.approx(expected, abs=1e-12)
    for v in m.values():
        assert isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad


def test_dual_clip_off_and_clip_higher():
    logp, old, adv, mask = _fixed()
    loss, m = grpo_loss(logp, old, adv, mask, config=LossConfig(dual_clip=None, clip_high=0.28))
    # without dual clip the r = 4 token costs 4.0; with clip-higher 1.28 the r = 1.3 token (A < 0) is
    # unchanged and the r = 1.5 token (A > 0) costs -1.28
    assert loss.item() == pytest.approx((-1.1 - 1.28 - 0.7 + 0.9 + 0.8 + 4.0 + 1.3 - 0.6) / 8, abs=1e-12)
    assert m["clip_frac_dual"].item() == 0.0


def test_on_policy_ratio_is_one_and_gradient_is_minus_adv():
    logp, old, adv, mask = _fixed()
    loss, m = grpo_loss(logp, None, adv, mask)
    n = MASK.sum()
    assert loss.item() == pytest.approx(-(np.broadcast_to(ADV[:, None], (3, 4))[MASK]).sum() / n, abs=1e-12)
    loss.backward()
    want = np.where(MASK, -ADV[:, None] / n, 0.0)
    np.testing.assert_allclose(logp.grad.numpy(), want, rtol=0, atol=1e-15)
    assert m["approx_kl"].item() == 0.0


def test_rule_output_applied_like_the_numpy_backend_by_hand():
    """keep / adv / weight / kl_coef / entropy_coef on the fixed batch, every number by hand."""
    logp, old, adv, mask = _fixed()
    H = torch.tensor([[1.0, 2.0, 0.5, np.nan], [0.3, 0.4, 0.6, 0.7], [1.5, np.nan, np.nan, np.nan]],
                     dtype=F64, requires_grad=True)
    keep = torch.tensor(MASK)
    keep[0, 0] = False  # removed by the rule
    keep[1, 2] = False  # the dual-clipped token, removed
    weight = torch.ones(3, 4, dtype=F64)
    weight[0, 2] = 0.5
    weight[1, 3] = 0.0  # gradient detached, still counted
    kl = torch.zeros(3, 4, dtype=F64)
    kl[1, 0] = 0.3  # + 0.3 |log 0.9|
    ent = torch.where(keep, torch.tensor(0.1, dtype=F64), torch.tensor(0.0, dtype=F64))
    rule_adv = torch.tensor(np.broadcast_to(ADV[:, None], (3, 4)).copy())
    rule_adv[2, 0] = 2.0  # replaced advantage: -2.0 * 1.0
    out = RuleOutput(keep=keep, adv=rule_adv, weight=weight, kl_coef=kl, entropy_coef=ent)
    loss, m = grpo_loss(logp, old, adv, mask, entropy=H, rule_output=out)
    # kept: (0,1) (0,2) (1,0) (1,1) (1,3) (2,0) -> 6 tokens (token_mean over kept only)
    terms = [
        -1.2 - 0.1 * 2.0,  # (0,1)
        0.5 * -0.7 - 0.1 * 0.5,  # (0,2)
        0.9 + 0.3 * abs(np.log(0.9)) - 0.1 * 0.3,  # (1,0)
        0.8 - 0.1 * 0.4,  # (1,1)
        0.0 * 1.3 - 0.1 * 0.7,  # (1,3)
        -2.0 - 0.1 * 1.5,  # (2,0)
    ]
    assert loss.item() == pytest.approx(sum(terms) / 6, abs=1e-12)
    assert m["kept_frac"].item() == pytest.approx(6 / 8)
    assert m["entropy"].item() == pytest.approx((2.0 + 0.5 + 0.3 + 0.4 + 0.7 + 1.5) / 6)
    loss.backward()
    g = logp.grad.numpy()
    assert g[0, 0] == 0.0 and g[1, 2] == 0.0 and g[1, 3] == 0.0  # removed, removed, weight 0
    assert np.all(g[~MASK] == 0.0) and np.all(H.grad.numpy()[~keep.numpy()] == 0.0)
    assert g[0, 2] == pytest.approx(0.5 * -0.7 / 6, abs=1e-12)
    assert g[1, 0] == pytest.approx((0.9 - 0.3) / 6, abs=1e-12)  # d|log r|/dlog p = sign(log 0.9) = -1
    assert g[2, 0] == pytest.approx(-2.0 / 6, abs=1e-12)
    np.testing.assert_allclose(H.grad.numpy()[keep.numpy()], -0.1 / 6, rtol=0, atol=1e-15)


def _toy_objective_gradient(ratio, adv, keep, weight, kl, ent, aggregation, cl, ch):
    """The NumPy backend's (toy/grpo.py step) d objective / d log p and d objective / d H per token."""
    B, T = ratio.shape
    keep_f = keep.astype(np.float64)
    if aggregation == "token_mean":
        scale = keep_f / max(keep_f.sum(), 1.0)
    elif aggregation == "seq_mean":
        scale = keep_f / (np.maximum(keep_f.sum(-1, keepdims=True), 1.0) * B)
    else:
        scale = keep_f / (B * T)
    clipped = ((adv > 0) & (ratio > 1 + ch)) | ((adv < 0) & (ratio < 1 - cl))
    coef = np.where(clipped, 0.0, weight * adv * ratio) * scale
    coef = coef - kl * np.sign(np.log(ratio)) * scale
    return coef, ent * scale


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
@pytest.mark.parametrize("seed", range(4))
def test_gradient_parity_with_the_numpy_backend(aggregation, seed):
    rng = np.random.default_rng(seed)
    B, T = 5, 6
    ratio = np.exp(rng.normal(scale=0.3, size=(B, T)))
    adv = rng.normal(size=(B, T))
    valid = rng.random((B, T)) > 0.2
    keep = valid & (rng.random((B, T)) > 0.2)
    weight = rng.choice([0.0, 0.5, 1.0], size=(B, T))
    kl = rng.choice([0.0, 0.7], size=(B, T))
    ent = rng.choice([0.0, 0.05], size=(B, T))
    old = np.log(rng.uniform(0.05, 0.9, size=(B, T)))
    logp = torch.tensor(old + np.log(ratio), requires_grad=True)
    H = torch.tensor(rng.uniform(0.1, 3.0, size=(B, T)), requires_grad=True)
    out = RuleOutput(keep=torch.tensor(keep), adv=torch.tensor(adv), weight=torch.tensor(weight),
                     kl_coef=torch.tensor(kl), entropy_coef=torch.tensor(ent))
    cfg = LossConfig(aggregation=aggregation, clip_low=0.2, clip_high=0.28, dual_clip=None)
    loss, _ = grpo_loss(logp, torch.tensor(old), torch.tensor(adv), torch.tensor(valid), config=cfg,
                        entropy=H, rule_output=out)
    loss.backward()
    want_lp, want_H = _toy_objective_gradient(ratio, adv, keep, weight, kl, ent, aggregation, 0.2, 0.28)
    np.testing.assert_allclose(-logp.grad.numpy(), want_lp, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(-H.grad.numpy(), want_H, rtol=1e-12, atol=1e-15)


def test_k3_kl_to_reference_by_hand():
    logp, old, adv, mask = _fixed()
    g = torch.Generator().manual_seed(3)
    ref = torch.log(torch.rand(3, 4, generator=g, dtype=F64) * 0.8 + 0.1)
    ref[0, 3] = torch.nan  # masked position
    zero_adv = torch.zeros(3, dtype=F64)
    cfg = LossConfig(kl_beta=0.5)
    loss, m = grpo_loss(logp, old, zero_adv, mask, config=cfg, ref_logp=ref)
    lp, r = logp.detach().numpy(), ref.numpy()
    d = (r - lp)[MASK]
    k3 = np.exp(d) - d - 1
    assert np.all(k3 > 0)
    assert loss.item() == pytest.approx(0.5 * k3.mean(), abs=1e-12)
    assert m["ref_kl"].item() == pytest.approx(k3.mean(), abs=1e-12)
    loss.backward()
    want = np.zeros((3, 4))
    want[MASK] = 0.5 * (1 - np.exp(d)) / MASK.sum()  # d k3 / d log p = 1 - e^d
    np.testing.assert_allclose(logp.grad.numpy(), want, rtol=1e-12, atol=1e-15)
    # beta = 0 with a reference: logged, not in the loss
    loss0, m0 = grpo_loss(logp, old, zero_adv, mask, ref_logp=ref)
    assert loss0.item() == 0.0 and m0["ref_kl"].item() == pytest.approx(k3.mean(), abs=1e-12)


# ------------------------------------------------------------------------------------------------
# microbatches, rules, errors
# ------------------------------------------------------------------------------------------------


def _random_batch(B=6, T=5, V=11, D=4, seed=0):
    h, W, b, k, mask = _inputs(B=B, T=T, D=D, V=V, seed=seed, p_mask=0.25)
    st = token_stats(h, W, k, mask, bias=b, chunk_size=4, entropy_grad=True, s_star=True, baseline=True)
    g = torch.Generator().manual_seed(seed + 100)
    old = (st.logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).detach()
    rewards = torch.randint(0, 2, (B // 2, 2), generator=g).to(F64)
    adv_seq = (rewards - rewards.mean(-1, keepdim=True)).reshape(B)
    adv = adv_seq[:, None].expand(B, T).clone()
    group = torch.arange(B // 2).repeat_interleave(2)
    noise = torch.rand(B, T, generator=g, dtype=F64)
    batch = TokenBatch(logp=st.logp, adv=adv, valid=mask, old_logp=old, entropy=st.entropy,
                       baseline=st.baseline, group=group, step=3)
    return (h, W, b), st, old, adv, mask, batch, noise


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
def test_microbatch_accumulation_equals_full_batch(aggregation):
    params, st, old, adv, mask, batch, noise = _random_batch()
    rule = make_rule("clip_b:variant=paper,mu=0.8+kl_cov:frac=0.2"
                     "+high_entropy_mask:rho=0.7,in_normaliser=false+entropy_bonus:coef=0.05")
    out = rule(batch, noise=noise)
    assert (out.keep != mask).any()  # the rules did remove tokens
    cfg = LossConfig(aggregation=aggregation, kl_beta=0.1)
    ref_logp = (old - 0.2).detach()

    full, _ = grpo_loss(st.logp, old, adv, mask, config=cfg, ref_logp=ref_logp, entropy=st.entropy,
                        rule_output=out)
    g_full = torch.autograd.grad(full, params, retain_graph=True)

    norm = loss_normaliser(mask, cfg, out)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        part, _ = grpo_loss(st.logp[rows], old[rows], adv[rows], mask[rows], config=cfg,
                            ref_logp=ref_logp[rows], entropy=st.entropy[rows],
                            rule_output=slice_rule_output(out, rows), normaliser=norm)
        total = total + part
    g_parts = torch.autograd.grad(total, params)
    assert total.item() == pytest.approx(full.item(), abs=1e-13)
    for x, y in zip(g_parts, g_full, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_default_normaliser_is_the_batch_normaliser():
    _, st, old, adv, mask, batch, noise = _random_batch()
    out = make_rule("clip_b:variant=paper,mu=0.8")(batch, noise=noise)
    for agg in ("token_mean", "seq_mean", "constant"):
        cfg = LossConfig(aggregation=agg)
        a, _ = grpo_loss(st.logp, old, adv, mask, config=cfg, rule_output=out)
        b, _ = grpo_loss(st.logp, old, adv, mask, config=cfg, rule_output=out,
                         normaliser=loss_normaliser(mask, cfg, out))
        assert a.item() == b.item()
    n = loss_normaliser(mask, LossConfig(), out)
    assert n.item() == (mask & out.keep).sum().item()
    assert loss_normaliser(mask, LossConfig(aggregation="seq_mean")).item() == 6
    assert loss_normaliser(mask, LossConfig(aggregation="constant", max_length=9)).item() == 6 * 9


TOKEN_RULES = sorted(n for n, c in RULES.items() if getattr(c, "kind", "token") != "detector")


@pytest.mark.parametrize("name", TOKEN_RULES)
def test_every_registered_rule_runs_through_the_loss(name):
    assert len(TOKEN_RULES) >= 9
    params, st, old, adv, mask, batch, noise = _random_batch(seed=5)
    rule = make_rule(name)
    out = rule(batch, noise=noise, state=rule.init_state())
    for agg in ("token_mean", "seq_mean", "constant"):
        loss, metrics = grpo_loss(st.logp, old, adv, mask, config=LossConfig(aggregation=agg),
                                  entropy=st.entropy, rule_output=out)
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        assert torch.isfinite(loss)
        assert all(torch.isfinite(g).all() for g in grads)
        assert all(torch.isfinite(v) for v in metrics.values())
    assert torch.all(grads[0][~mask] == 0)  # masked positions: no gradient into hidden


def test_entropy_bonus_rule_changes_the_loss_by_minus_coef_mean_entropy():
    params, st, old, adv, mask, batch, noise = _random_batch(seed=2)
    base, _ = grpo_loss(st.logp, old, adv, mask, entropy=st.entropy)
    out = make_rule("entropy_bonus:coef=0.25")(batch)
    bonus, m = grpo_loss(st.logp, old, adv, mask, entropy=st.entropy, rule_output=out)
    assert (bonus - base).item() == pytest.approx(-0.25 * m["entropy"].item(), abs=1e-12)
    gb = torch.autograd.grad(bonus, params[1], retain_graph=True)[0]
    g0 = torch.autograd.grad(base, params[1])[0]
    assert not torch.allclose(gb, g0)  # the bonus reaches the lm_head through H's gradient


@pytest.mark.parametrize(
    "field, value",
    [
        ("clip_low", -0.1),
        ("clip_low", 1.0),
        ("clip_low", float("nan")),
        ("clip_high", -0.2),
        ("clip_high", float("inf")),
        ("dual_clip", 1.0),
        ("dual_clip", 0.5),
        ("aggregation", "mean"),
        ("max_length", 0),
        ("max_length", 2.5),
        ("kl_beta", -0.01),
        ("kl_beta", True),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})


def test_loss_rejects_missing_or_misshaped_inputs():
    logp, old, adv, mask = _fixed()
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, adv, mask, config=LossConfig(kl_beta=0.1))
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(logp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logp, old, adv, mask.double())
    with pytest.raises(ValueError, match="adv"):
        grpo_loss(logp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="normaliser"):
        grpo_loss(logp, old, adv, mask, normaliser=0)
    out = RuleOutput(keep=torch.tensor(MASK), adv=torch.zeros(3, 4, dtype=F64),
                     entropy_coef=torch.zeros(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(logp, old, adv, mask, rule_output=out)
    bad = RuleOutput(keep=torch.tensor(MASK)[:2], adv=torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="rule_output.keep"):
        grpo_loss(logp, old, adv, mask, rule_output=bad)


def test_float32_loss_and_extreme_ratios_stay_finite():
    logp, old, adv, mask = _fixed(torch.float32)
    with torch.no_grad():
        logp[1, 2] = old[1, 2] + 80.0  # ratio e^80: clamped log-ratio, dual-clipped
        logp[0, 1] = old[0, 1] - 80.0
    loss, m = grpo_loss(logp, old, adv, mask)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(logp.grad).all() and all(torch.isfinite(v) for v in m.values())


@pytest.mark.parametrize("module", [scale.loss, scale.token_stats])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
