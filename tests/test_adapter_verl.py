"""scale.adapters.verl: the rules as verl policy losses, on random tensors (CPU, milliseconds).

verl is optional. When ``verl.trainer.ppo.core_algos`` imports, the registry is verl's own and verl's
``compute_policy_loss_vanilla`` is a second reference. Otherwise the registry is ``_StubRegistry``: a copy
of verl's registry *interface* (not its code) from verl-project/verl tag ``v0.9.0``, commit
``483b8a009ba3a97563edee3a19887e4862b8094a`` (identical in the PyPI wheel ``verl==0.9.1``):

* ``verl/trainer/ppo/core_algos.py``: ``POLICY_LOSS_REGISTRY: dict[str, PolicyLossFn]``;
  ``register_policy_loss(name)`` returns a decorator that stores the function under ``name`` and returns
  it unchanged; ``get_policy_loss_fn(name)`` returns it or raises ``ValueError`` for an unknown name; the
  signature of ``compute_policy_loss_vanilla`` (``_vanilla_signature`` below: names, order, defaults);
* ``verl/workers/utils/losses.py::ppo_loss``: the keyword call (``_call_like_ppo_loss``), with
  ``config.global_batch_info`` = ``{dp_size, batch_num_tokens, global_batch_size, loss_scale_factor}``.

The reference loss ``_reference_vanilla`` is written here from the documented formula (dual-clip PPO,
verl's ``agg_loss`` modes), independently of both verl's code and scale.loss.

verl 0.9.1 pins ``transformers<5.11``, below the project's, so it lives in its own venv: ``make test-verl``
(run by CI after ``make test``) builds ``.venv-verl`` with verl and runs this file there with
``ENTDYN_REQUIRE_VERL=1``, which turns a failed verl import into an error instead of the stub.
"""

from __future__ import annotations

import inspect
import os

import pytest

torch = pytest.importorskip("torch")

from scale.adapters.verl import (  # noqa: E402
    ENV_VAR,
    make_policy_loss,
    register_from_env,
    register_rule_loss,
    rule_batch_fields,
)
from scale.loss import LossConfig, grpo_loss  # noqa: E402
from theory.rules import RuleOutput, TokenBatch, make_rule  # noqa: E402

try:
    from verl.trainer.ppo import core_algos as verl_core
except Exception as err:  # noqa: BLE001 - any import failure means "no usable verl here"
    if os.environ.get("ENTDYN_REQUIRE_VERL"):  # `make test-verl` (CI): the real registry or nothing
        raise ImportError(f"ENTDYN_REQUIRE_VERL is set but verl does not import: {err!r}") from err
    verl_core = None


class _StubRegistry:
    """verl's policy-loss registry interface (see the module docstring for the source)."""

    def __init__(self):
        self.POLICY_LOSS_REGISTRY = {}

    def register_policy_loss(self, name):
        def decorator(fn):
            self.POLICY_LOSS_REGISTRY[name] = fn
            return fn

        return decorator

    def get_policy_loss_fn(self, name):
        if name not in self.POLICY_LOSS_REGISTRY:
            raise ValueError(f"Unsupported loss mode: {name}")
        return self.POLICY_LOSS_REGISTRY[name]


def _vanilla_signature(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                       config=None, rollout_is_weights=None):
    """The parameters of verl's ``compute_policy_loss_vanilla`` (v0.9.0); the body is not needed."""


REGISTRY = verl_core if verl_core is not None else _StubRegistry()
VANILLA = verl_core.compute_policy_loss_vanilla if verl_core is not None else _vanilla_signature
VANILLA_SIGNATURE = inspect.signature(VANILLA)


class _ActorConfig:
    """The fields of verl's ``ActorConfig`` a policy loss reads (attributes and ``get``)."""

    def __init__(self, clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, **info):
        self.clip_ratio, self.clip_ratio_low = clip_ratio, clip_ratio_low
        self.clip_ratio_high = clip_ratio_high
        self.clip_ratio_c = clip_ratio_c
        self.global_batch_info = {k: info.get(k) for k in ("dp_size", "batch_num_tokens", "global_batch_size",
                                                           "loss_scale_factor")}
        if not info:
            self.global_batch_info = {}

    def get(self, key, default=None):
        return getattr(self, key, default)


def _call_like_ppo_loss(fn, *, old, logp, adv, mask, mode, config, weights):
    return fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=mode,
              config=config, rollout_is_weights=weights)


def _reference_vanilla(old, logp, adv, mask, mode, cfg, weights):
    """Dual-clip PPO token loss aggregated like verl's agg_loss; written from the formula."""
    r = torch.exp((logp - old).clamp(-20, 20))
    lo = cfg.clip_ratio_low
    hi = cfg.clip_ratio_high
    loss = torch.maximum(-adv * r, -adv * r.clamp(1 - lo, 1 + hi))
    loss = torch.where(adv < 0, torch.minimum(loss, -adv * cfg.clip_ratio_c), loss)
    if weights is not None:
        loss = loss * weights
    m = mask.float()
    info = cfg.global_batch_info
    dp = info.get("dp_size") or 1
    nonempty = (m.sum(-1) > 0).float()
    n_seq = info.get("global_batch_size") or nonempty.sum()
    if mode == "token-mean":
        return (loss * m).sum() / (info.get("batch_num_tokens") or m.sum()) * dp
    if mode == "token-sum":
        return (loss * m).sum() * dp
    if mode == "seq-mean-token-mean":
        per_seq = (loss * m).sum(-1) / m.sum(-1).clamp_min(1)
        return (per_seq * nonempty).sum() / n_seq * dp
    total = (loss * m).sum(-1).sum() / n_seq * dp
    if mode == "seq-mean-token-sum-norm":
        total = total / (info.get("loss_scale_factor") or m.shape[-1])
    return total


def _batch(seed=0, B=6, T=7, off_policy=True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logp = torch.log(torch.rand(B, T, generator=g) * 0.9 + 0.05).requires_grad_()
    old = (logp.detach() + (0.4 * torch.randn(B, T, generator=g) if off_policy else 0.0))
    adv = (torch.randn(B, 1, generator=g).expand(B, T) * mask).contiguous()
    H = torch.rand(B, T, generator=g) * 3
    w = torch.rand(B, T, generator=g) + 0.5
    return logp, old, adv, mask, H, w


INFOS = [
    {},
    dict(dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None),
    dict(dp_size=2, batch_num_tokens=50, global_batch_size=12, loss_scale_factor=5),
]
MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def test_registered_loss_is_found_by_name_and_has_verls_signature():
    fn = register_rule_loss("entdyn_test_kl_cov", "kl_cov:frac=0.1", register=REGISTRY.register_policy_loss)
    assert REGISTRY.get_policy_loss_fn("entdyn_test_kl_cov") is fn
    ours = list(inspect.signature(fn).parameters.values())[: len(VANILLA_SIGNATURE.parameters)]
    theirs = list(VANILLA_SIGNATURE.parameters.values())
    assert [(p.name, p.default) for p in ours] == [(p.name, p.default) for p in theirs]
    with pytest.raises(ValueError):
        REGISTRY.get_policy_loss_fn("entdyn_test_not_registered")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("info", range(len(INFOS)))
@pytest.mark.parametrize("rule", [None, "position_bonus"])  # position_bonus is inactive before step 201
def test_noop_rule_equals_vanilla(mode, info, rule):
    fn = make_policy_loss(rule)
    for seed, with_weights in ((0, False), (1, True)):
        logp, old, adv, mask, _, w = _batch(seed)
        cfg = _ActorConfig(**INFOS[info])
        weights = w if with_weights else None
        loss, metrics = _call_like_ppo_loss(fn, old=old, logp=logp, adv=adv, mask=mask, mode=mode, config=cfg,
                                            weights=weights)
        ref = _reference_vanilla(old, logp, adv, mask, mode, cfg, weights)
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
        g = _grad(loss, logp)
        torch.testing.assert_close(g, _grad(ref, logp), rtol=1e-6, atol=1e-7)
        assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(metrics)
        assert all(isinstance(v, float) for v in metrics.values())
        if verl_core is not None:  # the real thing
            v_loss, v_metrics = _call_like_ppo_loss(VANILLA, old=old, logp=logp, adv=adv, mask=mask,
                                                    mode=mode, config=cfg, weights=weights)
            torch.testing.assert_close(loss, v_loss, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(g, _grad(v_loss, logp), rtol=1e-6, atol=1e-7)
            for k, v in v_metrics.items():
                assert metrics[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k


@pytest.mark.parametrize(("spec", "needs_entropy", "field"), [
    ("clip_cov:frac=0.3,lb=-100,ub=100", False, "weight"),  # weight 0: gradient detached, token counted
    ("high_entropy_mask:rho=0.5,in_normaliser=false", True, "keep"),
    ("clip_b:mu=0.3,variant=paper", True, "keep"),
])
def test_masked_tokens_get_zero_gradient(spec, needs_entropy, field):
    logp, old, adv, mask, H, _ = _batch(3, B=8, T=9, off_policy=False)  # on-policy: no ratio clipping
    fn = register_rule_loss(f"entdyn_test_{spec.split(':')[0]}", spec, register=REGISTRY.register_policy_loss)
    extra = {"entropy": H} if needs_entropy else {}
    loss, metrics = fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                       loss_agg_mode="token-mean", config=_ActorConfig(), rollout_is_weights=None, **extra)
    g = _grad(loss, logp)
    out = fn.rule(_make_batch(logp, old, adv, mask, H if needs_entropy else None),
                  noise=_noise_of_first_call(mask, logp))
    masked = mask & ~out.keep if field == "keep" else mask & (out.weight == 0)
    assert masked.any() and (mask & ~masked).any()
    assert (g[masked] == 0).all()
    assert (g[~mask] == 0).all()
    live = mask & ~masked & (adv != 0)
    assert (g[live] != 0).all()
    if field == "keep":  # kept tokens only, in the loss and its normaliser (no batch info: exact)
        keep = mask & out.keep
        ref = (-adv * torch.exp(logp - old))[keep].sum() / keep.sum()
        torch.testing.assert_close(loss, ref)
        assert metrics["actor/entdyn/kept_frac"] == pytest.approx(float(keep.sum() / mask.sum()))


def _make_batch(logp, old, adv, mask, H):
    return TokenBatch(logp=logp.detach(), adv=adv, valid=mask, old_logp=old, entropy=H)


def _noise_of_first_call(mask, logp):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(tuple(mask.shape), generator=gen, dtype=torch.float64).to(logp)


def test_entropy_rules_need_entropy_from_verls_call():
    fn = register_rule_loss("entdyn_test_clip_b_plain", "clip_b", register=REGISTRY.register_policy_loss)
    logp, old, adv, mask, _, _ = _batch(4)
    with pytest.raises(ValueError, match="entropy"):
        _call_like_ppo_loss(fn, old=old, logp=logp, adv=adv, mask=mask, mode="token-mean",
                            config=_ActorConfig(), weights=None)


def test_rule_batch_fields_make_vanilla_apply_the_rule_on_the_global_batch():
    logp, old, adv, mask, H, w = _batch(5, B=8, T=9)
    fields = rule_batch_fields("clip_b:mu=0.3,variant=paper", log_prob=old, advantages=adv,
                               response_mask=mask, entropy=H, rollout_is_weights=w)
    keep = fields.response_mask.bool()
    assert keep.sum() < mask.sum() and 0 < fields.metrics["kept_frac"] < 1
    # verl splits the batch into micro-batches; batch_num_tokens is counted over the new response_mask
    cfg = _ActorConfig(dp_size=1, batch_num_tokens=int(keep.sum()), global_batch_size=8,
                       loss_scale_factor=None)
    vanilla = VANILLA if verl_core is not None else make_policy_loss(None)
    total = 0.0
    for rows in (slice(0, 3), slice(3, 8)):
        loss, _ = _call_like_ppo_loss(vanilla, old=old[rows], logp=logp[rows], adv=fields.advantages[rows],
                                      mask=fields.response_mask[rows], mode="token-mean", config=cfg,
                                      weights=fields.rollout_is_weights[rows])
        total = total + loss
    out = fields.output
    whole, _ = grpo_loss(logp, old, adv, mask, config=LossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
                         rule_output=RuleOutput(keep=out.keep, adv=out.adv, weight=w))
    torch.testing.assert_close(total, whole, rtol=1e-6, atol=1e-7)
    g = _grad(total, logp)
    assert (g[mask & ~keep] == 0).all() and (g[keep & (adv != 0)] != 0).any()


def test_rule_batch_fields_refuse_coefficients_verl_cannot_carry():
    logp, old, adv, mask, _, _ = _batch(6)
    with pytest.raises(ValueError, match="kl_coef"):
        rule_batch_fields("kl_cov:frac=0.5", log_prob=logp, old_log_prob=old, advantages=adv,
                          response_mask=mask)


def test_register_from_env(monkeypatch):
    reg = _StubRegistry()
    monkeypatch.setenv(ENV_VAR, "entdyn_a=clip_cov:frac=0.01; entdyn_b=kl_cov+position_bonus")
    assert register_from_env(register=reg.register_policy_loss) == ["entdyn_a", "entdyn_b"]
    assert reg.get_policy_loss_fn("entdyn_b").rule == make_rule("kl_cov+position_bonus")
    monkeypatch.setenv(ENV_VAR, "no_spec_here")
    with pytest.raises(ValueError, match=ENV_VAR):
        register_from_env(register=reg.register_policy_loss)
    monkeypatch.delenv(ENV_VAR)
    assert register_from_env(register=reg.register_policy_loss) == []


@pytest.mark.skipif(verl_core is None, reason="verl is not installed: the stub cannot run verl's ppo_loss")
def test_verls_own_ppo_loss_calls_the_registered_rule():
    """verl's actor loss (``verl/workers/utils/losses.py::ppo_loss``) with a real ``ActorConfig``."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import ActorConfig, PolicyLossConfig
    from verl.workers.utils.losses import ppo_loss

    register_rule_loss("entdyn_test_noop", None, register=verl_core.register_policy_loss)
    register_rule_loss("entdyn_test_clip_cov", "clip_cov:frac=0.3,lb=-100,ub=100",
                       register=verl_core.register_policy_loss)
    B, P, R = 4, 3, 5
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 3, 4, 2])
    responses = (torch.arange(R)[None] < lengths[:, None]).long()
    attention = torch.cat([torch.ones(B, P, dtype=torch.long), responses], 1)
    response_mask = attention[:, P:].clone()
    flat_logp = torch.log(torch.rand(int(attention.sum()), generator=g) * 0.9 + 0.05).requires_grad_()
    old = torch.log(torch.rand(B, R, generator=g) * 0.9 + 0.05)
    adv = torch.randn(B, 1, generator=g).expand(B, R) * response_mask
    results = {}
    for mode in ("vanilla", "entdyn_test_noop", "entdyn_test_clip_cov"):
        data = TensorDict({"prompts": torch.ones(B, P, dtype=torch.long),
                           "responses": torch.ones(B, R, dtype=torch.long), "attention_mask": attention,
                           "response_mask": response_mask, "old_log_probs": old, "advantages": adv},
                          batch_size=[B])
        tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(response_mask.sum()), global_batch_size=B)
        cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio_high=0.28,
                          policy_loss=PolicyLossConfig(loss_mode=mode))
        loss, metrics = ppo_loss(cfg, {"log_probs": flat_logp}, data)
        results[mode] = (loss.detach(), _grad(loss, flat_logp), metrics)
    torch.testing.assert_close(results["entdyn_test_noop"][0], results["vanilla"][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results["entdyn_test_noop"][1], results["vanilla"][1], rtol=1e-6, atol=1e-7)
    clip_cov = results["entdyn_test_clip_cov"]
    assert "actor/entdyn/clip_frac" in clip_cov[2]  # verl wraps each value in its Metric class
    assert (clip_cov[1] == 0).sum() > (results["vanilla"][1] == 0).sum()  # detached tokens: zero gradient
