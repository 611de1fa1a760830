# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4 · Entropy-control rules side by side — one implementation for NumPy and torch
#
# *Tutorial 4 of 5. Uses notebook 2's (E6) and quadrant table and notebook 3's bandit. Every rule is
# documented with its formula, defaults, source and known differences from the reference code in
# [`docs/rules.md`](../docs/rules.md); the full-size comparison is `docs/toy.md`, section `rules`.*
#
# Several methods try to stop entropy collapse by changing *which tokens* update or *how much*:
#
# | rule | source | what it changes |
# |---|---|---|
# | Clip_B (`clip_b`) | arXiv 2602.03392 (E10) | drops tokens whose $S_*$ is a batch outlier |
# | Clip_V (`clip_v`) | arXiv 2602.03392 (E6, E7) | drops tokens whose $D = S_* - E_p[S]$ is an outlier |
# | Clip-Cov (`clip_cov`) | Cui et al., arXiv 2505.22617 | detaches a few high-covariance tokens |
# | KL-Cov (`kl_cov`) | Cui et al. | a KL penalty on the top-covariance tokens |
# | 80/20 (`high_entropy_mask`) | arXiv 2506.01939 | updates only the top-20% entropy tokens |
# | entropy bonus (`entropy_bonus`) | TRL, verl | adds $-c\,H$ to each token's loss |
# | clip-higher (`clip_high=0.28`) | DAPO | a wider upper PPO ratio clip (an optimiser setting, not a rule) |
#
# In this library each is a **rule**: a frozen dataclass that reads per-token statistics of a batch
# (`TokenBatch`, arrays of shape $(B, T)$) and returns what to do to the loss (`RuleOutput`: `keep`,
# `adv`, `weight`, `kl_coef`, `entropy_coef`, `metrics`). It never computes a loss. This notebook:
#
# 1. applies every rule to one batch and shows **which tokens** each touches, in the quadrant picture;
# 2. applies the **same rule objects** to torch tensors and gets the same outputs;
# 3. trains the toy bandit with each rule and compares entropy and reward.
# 4. holds a target entropy with a reactive and a predictive controller.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

import theory as T
from theory.rules import TokenBatch, describe_rules, make_rule
from toy.bandit import Bandit, sample_tokens
from toy.control import target_curve
from toy.experiments import RULE_CONFIGS
from toy.grpo import GRPOConfig
from toy.plotting import band as plot_band
from toy.run import mean_ci, train

SMALL = os.environ.get("ENTDYN_NB_SMALL") == "1"  # CI: fewer seeds and steps, same code and checks
RUNS = 8 if SMALL else 32
rng = np.random.default_rng(0)
plt.rcParams.update({"figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})
QUAD_COLORS = dict(zip(T.QUADRANTS, ["C3", "C1", "C0", "C2"], strict=True))


# %% [markdown]
# ## 1. The registry
#
# `describe_rules()` lists every registered rule with its defaults and source; `make_rule(spec)` builds
# one from a spec string (`"clip_b:mu=2.0"`; `+` composes rules). The toy comparison below uses the
# toy-scale parameters of `toy.experiments.RULE_CONFIGS`: LLM batches have ~$10^6$ tokens, so the
# fraction-based rules' defaults (~$2\cdot 10^{-4}$) would select nothing in a toy batch of a few hundred,
# and Clip_B/Clip_V use $\mu = 1$ (at the paper's 2.5 / 8.5 they clip nothing here).

# %%
for r in describe_rules():
    print(f"{r['name']:<18} {r['summary']}")
specs = {name: kw["rule"] for name, kw in RULE_CONFIGS.items() if "rule" in kw}
rules = {name: make_rule(spec) for name, spec in specs.items()}
rules["clip_b (paper variant)"] = make_rule("clip_b:mu=1.0,variant=paper")
for name, rule in rules.items():
    print(f"{name:<24} {rule}")

# %% [markdown]
# ## 2. One batch, every rule
#
# A batch of $P = 4$ prompts × $G = 8$ responses × $T = 6$ positions over $V = 20$ tokens: random logits,
# tokens sampled on-policy, binary rewards, GRPO advantages broadcast over each response's tokens. The
# per-token statistics come from `theory`: $\log p_k$, $H$ (`T.entropy`) and $\mathbb E_p[S]$
# (`T.vocab_baseline`, Clip_V needs it).

# %%
P, G, Tn, V = 4, 8, 6, 20
B = P * G
logits = 1.5 * rng.standard_normal((B, Tn, V))  # (B, T, V)
tokens = sample_tokens(T.softmax(logits), rng.random((B, Tn, 1)))[..., 0]  # (B, T) on-policy
logp = np.take_along_axis(T.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]  # (B, T)
rewards = (rng.random((P, G)) < 0.5).astype(float)  # (P, G)
adv = np.repeat(T.grpo_advantages(rewards).reshape(B, 1), Tn, axis=1)  # (B, T)
batch = TokenBatch(logp=logp, adv=adv, valid=np.ones((B, Tn), dtype=bool), entropy=T.entropy(logits),
                   baseline=T.vocab_baseline(logits), group=np.repeat(np.arange(P), G))
noise = rng.random((B, Tn))  # Clip-Cov's random subset comes from the caller's noise
outputs = {name: rule(batch, noise=noise) for name, rule in rules.items()}

dev = T.deviation(logits, tokens)  # D = S* - E_p[S] per token (B, T)
quad = T.quadrant(adv, dev)
print(f"{'rule':<24}{'touched':>8}   quadrants of the touched tokens")
touched = {}
for name, out in outputs.items():
    if out.entropy_coef is not None:
        c_max = out.entropy_coef.max()
        print(f"{name:<24}{'all':>8}   no token removed; every token's loss gets -c·H, c = {c_max}")
        continue
    t = ~out.keep
    if out.weight is not None:
        t = t | (out.weight == 0)
    if out.kl_coef is not None:
        t = t | (out.kl_coef > 0)
    touched[name] = t
    counts = {q: int(np.sum(t & (quad == code))) for code, q in enumerate(T.QUADRANTS)}
    print(f"{name:<24}{t.mean():>8.3f}   {counts}")

# %% [markdown]
# In the quadrant plane ($x$: the deviation $D$, $y$: the advantage), each panel circles the tokens a rule
# removes (or, for KL-Cov, penalises). Read them against notebook 2's table — the entropy change of a
# token's update is $-\alpha D$ with $\alpha \propto A$:
#
# * **Clip_B and Clip_V (reference variant)** drop the lower tail of negative-advantage tokens: $A < 0$
#   and very negative $S_*$ or $D$, i.e. `neg_low`, whose updates lower the entropy. Removing them keeps
#   entropy up. The paper variant of Clip_B is two-sided and also drops the high-$S_*$ tail.
# * **Clip-Cov and KL-Cov** pick tokens with a large covariance term
#   $(A - \bar A)(\log p - \overline{\log p})$: likely tokens with positive advantage and unlikely ones
#   with negative advantage — mostly the two collapse quadrants `pos_high` and `neg_low`. (KL-Cov's
#   penalty $|\log p - \log p_{old}|$ is zero on-policy; it acts from the second PPO epoch on.)
# * **80/20** keeps only the highest-entropy positions, whatever the quadrant.
# * The **entropy bonus** touches every token: its logit gradient is $-c\,S$, so its first-order effect is
#   $c\sum_i S_i^2 \ge 0$ (equations §2.5).

# %%
panels = ["clip_b", "clip_b (paper variant)", "clip_v", "clip_cov", "kl_cov", "80/20 mask"]
jitter = 0.06 * rng.standard_normal(adv.shape)
fig, axes = plt.subplots(2, 3, figsize=(15, 8.4), sharex=True, sharey=True)
for ax, name in zip(axes.ravel(), panels, strict=True):
    for code, q in enumerate(T.QUADRANTS):
        m = quad == code
        ax.scatter(dev[m], adv[m] + jitter[m], s=9, color=QUAD_COLORS[q], alpha=0.6, label=q)
    t = touched[name]
    ax.scatter(dev[t], adv[t] + jitter[t], s=60, facecolors="none", edgecolors="k", lw=1.2,
               label="touched by the rule")
    ax.axvline(0, color="0.4", lw=0.8)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set(title=f"{name}: {t.sum()} of {t.size} tokens", xlabel="D = S* − E_p[S]",
           ylabel="advantage A (jittered)")
axes[0, 0].legend(fontsize=7, loc="upper left")
fig.tight_layout()

# %% [markdown]
# **Check yourself.** Clip_V (reference) only ever drops tokens with $A \le 0$ and $D < 0$; the entropy
# bonus's first-order effect is non-negative in every state; the quadrant mask keeps exactly one quadrant.

# %%
assert np.all((adv[touched["clip_v"]] <= 0) & (dev[touched["clip_v"]] < 0))
c = 0.01
bonus_dH = T.entropy_change_first_order(logits, -c * T.discriminator(logits))  # dz = c ∇H = -c S
assert np.all(bonus_dH >= 0)
keep_q = make_rule("quadrant_mask:keep=neg_low")(batch).keep
assert np.array_equal(keep_q, quad == T.QUADRANTS.index("neg_low"))

# %% [markdown]
# ## 3. The same rule objects on torch tensors
#
# A trainer holds torch tensors. Nothing changes: build the `TokenBatch` from tensors and call the **same
# rule objects**. Every rule is written once against the array API (`array-api-compat`), so NumPy, torch
# (CPU or GPU) and any array-API library run the same code. Outputs carry no gradient even when the
# inputs do (rules see a detached batch).

# %%
fields = ("logp", "adv", "valid", "entropy", "baseline", "group")
tb = TokenBatch(**{f: torch.from_numpy(getattr(batch, f)) for f in fields})
tb = tb.replace(logp=tb.logp.clone().requires_grad_(True))  # as in a trainer: log-probs carry a gradient
noise_t = torch.from_numpy(noise)
for name, rule in rules.items():
    out_np, out_t = outputs[name], rule(tb, noise=noise_t)
    for field in ("keep", "adv", "weight", "kl_coef", "entropy_coef"):
        a, b = getattr(out_np, field), getattr(out_t, field)
        assert (a is None) == (b is None), (name, field)
        if a is not None:
            assert not b.requires_grad, (name, field)
            np.testing.assert_allclose(b.numpy(), a, rtol=1e-12, atol=1e-12, err_msg=f"{name}.{field}")
print(f"{len(rules)} rules: identical outputs on numpy and torch, none carries a gradient")

# %% [markdown]
# ## 4. The rules in training
#
# The toy applies a rule inside `toy.grpo.step` — the one place where a `RuleOutput` meets the logit
# update, exactly as a trainer applies it to its loss (`docs/rules.md`, "How a backend applies it").
# Setting (as `entdyn toy rules`): a sequence bandit with $M = 16$ prompts, $T = 4$, $V = 10$, 2 correct
# tokens per position, reward when at least 3 of 4 positions are correct; $\mu = 4$ PPO epochs per batch
# (so ratios differ from 1 and ratio clipping matters), $\eta = 1$; every configuration sees the same
# samples until the policies differ (common random numbers).

# %%
rb = Bandit(n_prompts=16, horizon=4, vocab=10, n_correct=2, need=3)
base = GRPOConfig(group_size=8, lr=1.0 * 16 * 4, epochs=4, init_scale=1.0)
steps = 60 if SMALL else 200
hist = {}
for name, kw in RULE_CONFIGS.items():
    cfg = GRPOConfig(**{**base.__dict__, **kw})  # the base config with this rule (or clip_high)
    hist[name] = train(rb, cfg, runs=RUNS, steps=steps, seed=0, diag_every=0)

fig, ax = plt.subplots(1, 3, figsize=(17, 4.6))
for i, (name, h) in enumerate(hist.items()):
    plot_band(ax[0], h.steps, h.curves["entropy"], name, f"C{i}")
    plot_band(ax[1], h.steps, h.curves["reward"], name, f"C{i}")
    plot_band(ax[2], h.steps, h.curves["pass_at_8"], name, f"C{i}")
ax[0].set(xlabel="step", ylabel="mean entropy (nats)", title="entropy")
ax[1].set(xlabel="step", ylabel="mean reward (accuracy)", title="reward")
ax[2].set(xlabel="step", ylabel="pass@8 (unbiased, T.pass_at_k)", title="pass@8", ylim=(0.0, 1.02))
ax[0].legend(fontsize=8)
fig.suptitle(f"rules on a sequence bandit, {RUNS} seeds, mean ± 95% CI")
fig.tight_layout()

final = {name: mean_ci(h.curves["entropy"][-10:].mean(axis=0), axis=0) for name, h in hist.items()}
final_r = {name: mean_ci(h.curves["reward"][-10:].mean(axis=0), axis=0) for name, h in hist.items()}
print(f"{'rule':<15}{'final entropy':>18}{'final reward':>18}")
for name in hist:
    (m, h), (mr, hr) = final[name], final_r[name]
    print(f"{name:<15}{m:>10.3f} ± {h:.3f}{mr:>10.3f} ± {hr:.3f}")

# %% [markdown]
# What to read from it (the full-size table in `docs/toy.md` has the confidence intervals at 32 seeds ×
# 200 steps): of the rules that keep learning, Clip_B keeps the most entropy and pays some reward; Clip_V
# keeps less and costs little; Clip-Cov and KL-Cov change little at 2% of tokens; the entropy bonus keeps
# entropy without slowing learning. The 80/20 mask keeps even more entropy but hurts learning here: in a
# tabular bandit a token's entropy is its state's entropy, so masking all but the top-20% stops learning
# in every state that has begun to converge (in an LLM the forking tokens are spread over all responses).
# Clip-higher changes little because few ratios reach the clip range at this step size. None of them
# improves pass@8 here: this bandit has no exploration problem that more entropy would solve.
#
# **Check yourself.** Clip_B, Clip_V and the entropy bonus end with more entropy than plain GRPO.

# %%
for name in ("clip_b", "clip_v", "entropy_bonus"):
    assert final[name][0] > final["grpo"][0], (name, final[name], final["grpo"])
assert final_r["grpo"][0] > 0.7

# %% [markdown]
# ## 5. Holding a target entropy: a predictive controller
#
# The rules above push the entropy in one direction; a **controller** holds it at a target $H^*$. The
# common ones are *reactive*: they measure the entropy error $e = H^* - H$ and react to it after the fact.
# TRL's adaptive entropy bonus (`entropy_bonus:adaptive=true`, after Skywork-OR1) raises its coefficient
# by `delta` every step the batch entropy is at or below the target and lowers it otherwise;
# EntroPIC-style PI control (`entropic_pi`) sets the positive / negative sample weights from $e$ and its
# integral.
#
# The project's `entropy_target` rule **predicts** the coming update's entropy change before it is
# applied, from the same per-token statistics (notebook 2's (E6): a token's entropy change is $-\alpha D$
# with $\alpha \propto A$, $D = S_* - \mathbb E_p[S]$). Over the $N$ valid tokens of the batch,
#
# * the drift of the plain update: $P_0 = \frac1N \sum_t -A_t D_t$;
# * the first-order gain of an entropy bonus $k\,H$: $Q = \frac1N \sum_t S_{*t}(\log p_t + H_t)$, a
#   one-sample estimate of $\|S\|^2 \ge 0$ (the bonus moves the logits by $-k S$, §2);
#
# and it sets the bonus coefficient so that the predicted change $P_0 + kQ$ closes part of the error:
#
# $$k = \mathrm{clip}\Big(\frac{u - P_0}{Q},\ 0,\ 1\Big),\qquad u = \frac{\mathrm{gain}\cdot e + I}{c},$$
#
# with $I$ a small integral term and $c$ a calibration (measured $\Delta H$ per predicted unit: the step
# size $\eta$ and the ratios are one common factor the prediction cannot know). The toy learns $c$ from the
# exact entropy change of each update on diagnosed steps: `toy.grpo.step` hands it back to the rule
# (`Rule.feedback`), so train with `diag_every=1`. Below both bonus controllers hold $H^* = 0.8\,H_0$ on
# the bandit of `entdyn toy control` (as §4's, but one epoch per batch); $H_0$ is plain GRPO's mean initial
# entropy, and the adaptive bonus uses the fastest `delta` of that experiment's grid.

# %%
cb = GRPOConfig(group_size=8, lr=1.0 * 16 * 4, init_scale=1.0)  # the `control` setting: 1 epoch per batch
c_steps = 120 if SMALL else 200
hc = {"grpo": train(rb, cb, runs=RUNS, steps=c_steps, seed=0, diag_every=1)}
h0 = float(hc["grpo"].curves["entropy"][0].mean())
target = target_curve("80%", h0, c_steps)  # H*_t at every step (constant here), as the rules compute it
controllers = {"adaptive bonus": f"entropy_bonus:adaptive=true,coef=0.0,delta=0.05,target={target[0]:.6f}",
               "predictive": f"entropy_target:schedule=constant,target={target[0]:.6f}"}
for name, spec in controllers.items():
    hc[name] = train(rb, GRPOConfig(**{**cb.__dict__, "rule": make_rule(spec)}), runs=RUNS,
                     steps=c_steps, seed=0, diag_every=1)

fig, ax = plt.subplots(1, 3, figsize=(17, 4.6))
for i, (name, h) in enumerate(hc.items()):
    plot_band(ax[0], h.steps, h.curves["entropy"], name, f"C{i}")
    plot_band(ax[1], h.steps, h.curves["reward"], name, f"C{i}")
    if "rule/coef" in h.diag:
        m, ci = mean_ci(h.diag["rule/coef"], axis=1)
        ax[2].plot(h.diag_steps, m, color=f"C{i}", label=name)
        ax[2].fill_between(h.diag_steps, m - ci, m + ci, color=f"C{i}", alpha=0.18, lw=0)
ax[0].plot(np.arange(c_steps), target, "k--", lw=1.2, label="target H*")
ax[0].set(xlabel="step", ylabel="mean entropy (nats)", title="entropy")
ax[1].set(xlabel="step", ylabel="mean reward (accuracy)", title="reward")
ax[2].set(xlabel="step", ylabel="bonus coefficient (rule/coef)", title="what the controllers set")
ax[0].legend(fontsize=8)
ax[2].legend(fontsize=8)
fig.suptitle(f"holding H* = 0.8 H0 = {target[0]:.3f} nats, {RUNS} seeds, mean ± 95% CI")
fig.tight_layout()

warm = c_steps // 5  # score after a warm-up (the first fifth), as `entdyn toy control`
err = {name: mean_ci(np.abs(h.curves["entropy"][warm:] - target[warm:, None]).mean(axis=0), axis=0)
       for name, h in hc.items()}
rew = {name: mean_ci(h.curves["reward"][-warm:].mean(axis=0), axis=0) for name, h in hc.items()}
print(f"{'method':<16}{'tracking error |H − H*|':>26}{'final reward':>18}")
for name in hc:
    (m, h), (mr, hr) = err[name], rew[name]
    print(f"{name:<16}{m:>18.4f} ± {h:.4f}{mr:>10.3f} ± {hr:.3f}")

# %% [markdown]
# The adaptive bonus only learns that its coefficient is wrong once the entropy has crossed the target, so
# it undershoots (by about 0.05 nats) and then chatters around $H^*$ in steps of `delta`; the predictive
# controller turns its bonus on as the predicted drift $P_0$ is about to carry the entropy below the target
# (undershoot under 0.01 nats) and holds it there several times more tightly, about ten times at full size
# (`docs/toy.md`, "control", has a 50% target, a decaying one and the PI baseline, which tracks far worse
# here). Both pay the same reward for it: an entropy held at 80% of
# $H_0$ keeps the policy from converging — that is the target's cost, not the controller's. The other
# actuator, `entropy_target:actuator=weights`, scales the quadrant weights instead of adding a bonus; it
# holds the target as tightly but takes learning signal out of the entropy-lowering quadrants and costs
# reward on the toy (`docs/rules.md`, `entropy_target`; `docs/toy.md`, "control").
#
# **Check yourself.** After the warm-up the predictive controller's tracking error is below half the
# adaptive bonus's, both are far below plain GRPO's, and the prediction costs no reward against the
# reactive bonus.

# %%
assert err["predictive"][0] < 0.5 * err["adaptive bonus"][0], err
assert err["adaptive bonus"][0] < 0.1 * err["grpo"][0], err
assert rew["predictive"][0] > rew["adaptive bonus"][0] - 0.05, rew

# %% [markdown]
# ## Summary
#
# * A rule maps per-token statistics to what happens to the loss; it never computes the loss. The toy's
#   logit update and a trainer's surrogate apply `RuleOutput` the same way.
# * In the quadrant picture: Clip_B/Clip_V (reference) remove entropy-lowering `neg_low` updates;
#   Clip-Cov/KL-Cov target the high-covariance tokens, mostly the collapse quadrants; 80/20 selects by
#   entropy; the entropy bonus adds $c\sum_i S_i^2 \ge 0$ to every state's change.
# * The same objects run on NumPy and torch with identical outputs and no gradient.
# * A controller holds a target entropy. Reactive ones (the adaptive bonus, PI weights) react to the
#   measured error; `entropy_target` predicts the coming update's change — the drift $P_0 = \frac1N\sum -AD$
#   and a bonus's gain $Q \approx \|S\|^2$ — sets $k = \mathrm{clip}((u - P_0)/Q, 0, 1)$, and calibrates
#   the prediction with the measured change (`Rule.feedback`); on the toy it tracks ~10× more tightly.
#
# ## Exercises
#
# 1. **μ sweep.** Train with `clip_b:mu=0.5`, `1.0`, `2.0`. Paper 1 reports that a smaller μ means more
#    clipping and higher entropy. Do you see it? *Hint:* `GRPOConfig(**{**base.__dict__, "rule": spec})`.
# 2. **Paper vs reference.** Compare `clip_b:mu=1.0` with `clip_b:mu=1.0,variant=paper` in training. The
#    paper variant also drops the top tail. Which quadrant is that, and what does it do to entropy?
#    *Hint:* `docs/rules.md`, `clip_b`.
# 3. **Composition.** Build `make_rule("clip_v:mu=1.0,max_frac=0.02+entropy_bonus:coef=0.01")` and
#    check on the batch of §2 that its `keep` is Clip_V's and its `entropy_coef` the bonus's.
# 4. **An adaptive bonus.** `entropy_bonus:adaptive=true,target=0.5` turns the bonus on only below a
#    target entropy. Train with it; where does the entropy settle? *Hint:* the rule carries a state;
#    `toy.grpo.step` passes it back each step.
# 5. **Probability weighting.** `prob_weighted:alpha=0.5` damps low-probability tokens' advantages. By
#    notebook 2's table, should it raise or lower the entropy? Train and check. *Hint:* low-probability
#    positive tokens are `pos_low`.
# 6. **torch.compile.** Wrap a rule call in `torch.compile` and check the outputs match (the test suite
#    checks there are no graph breaks: `tests/test_rules_compile.py`).
# 7. **A moving target.** Give §5's controllers `target_curve("decay 90%→40%", h0, c_steps)`: a cosine
#    decay (`schedule=cosine,target=...,final_target=...,total_steps=...` for `entropy_target`,
#    `target_schedule=cosine` for the adaptive bonus). Which one lags the falling target, and why?
#    *Hint:* `toy.control.CONTROL_METHODS` has the specs.
