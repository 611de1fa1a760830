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
# # 5 · Stages and advantage shaping (paper 2)
#
# *Tutorial 5 of 5. Paper: Deng, Chen et al., "Decomposing the Entropy-Performance Exchange", arXiv
# 2508.02260 (its §2 stages, §3.1 negative samples, §4.1 PPL shaping, §4.2 position shaping). The rules are
# documented in [`docs/rules.md`](../docs/rules.md) (`stage_detector`, `ppl_shaping`, `position_bonus`);
# full-size toy runs in [`docs/toy.md`](../docs/toy.md) (`stages`, `shaping`).*
#
# Paper 1 (notebooks 1–4) explains *how* one update moves the entropy. Paper 2 asks *when* and *where*
# spending entropy buys accuracy, at three granularities:
#
# * **stage** — a GRPO run has a *rising* stage (accuracy up fast, entropy down sharply) and a *plateau*
#   (both nearly flat); in the rising stage most of the entropy drop comes from **negative samples**;
# * **instance** — responses with low perplexity (PPL) carry the useful updates;
# * **token** — late positions matter in the plateau.
#
# From this it proposes two advantage-shaping methods: **PPL shaping** (emphasise low-PPL responses) and a
# **position bonus** (emphasise late tokens, in the plateau). This notebook reproduces the stage analysis
# in a sequence bandit, shows what the two shaping rules do to a batch, and runs them — with an honest
# result: in this toy they change little.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from theory.rules import StageDetector, TokenBatch, make_rule
from toy.bandit import Bandit
from toy.experiments import SHAPING_CONFIGS
from toy.grpo import GRPOConfig
from toy.plotting import band as plot_band
from toy.run import mean_ci, train

SMALL = os.environ.get("ENTDYN_NB_SMALL") == "1"  # CI: fewer seeds and steps, same code and checks
RUNS = 8 if SMALL else 32
rng = np.random.default_rng(0)
plt.rcParams.update({"figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})


# %% [markdown]
# ## 1. Rising vs plateau
#
# Paper 2's setting, in miniature: a sequence bandit whose "responses" are $T = 4$ tokens over $V = 10$,
# with 2 correct tokens per position; a response is correct when at least 3 positions are, and rewarded
# $+1$ if correct and $-1$ otherwise (paper 2's convention). GRPO, $G = 8$, logits start at
# $\mathcal N(0, 1)$.
#
# Paper 2 marks the rising → plateau transition by eye; it gives **no numeric rule**. `StageDetector` is
# this project's criterion (`docs/rules.md`): smooth entropy and accuracy with an EMA and declare the
# plateau at the first step where, over a window $W$, the relative entropy change is below $\tau_H$ and
# the accuracy gain below $\tau_a$. `toy.run.train` runs it on the mean over seeds.
#
# Beside the curves, `train` records each step's first-order entropy change split by polarity:
# `dH_neg_first` and `dH_pos_first`, the sums of the (E6) terms of negative- and positive-sample tokens
# (notebook 3).

# %%
sb = Bandit(n_prompts=32, horizon=4, vocab=10, n_correct=2, need=3, reward="pm1")
M, Tn, _ = sb.shape
grpo = GRPOConfig(group_size=8, lr=1.0 * M * Tn, init_scale=1.0)
steps = 300 if SMALL else 600
detector = StageDetector(window=max(10, steps // 15), tau_entropy=0.15, tau_accuracy=0.02)
h = train(sb, grpo, runs=RUNS, steps=steps, seed=0, detector=detector)
split = h.plateau_step
rising = h.diag_steps < split
dn, dp = h.diag["dH_neg_first"], h.diag["dH_pos_first"]
neg_share_rising = dn[rising].sum() / (dn[rising] + dp[rising]).sum()
neg_share_plateau = dn[~rising].sum() / (dn[~rising] + dp[~rising]).sum()
ent, acc = h.curves["entropy"].mean(axis=1), h.curves["accuracy"].mean(axis=1)
print(f"plateau detected at step {split} of {steps}")
print(f"entropy drop   rising {ent[0] - ent[split - 1]:.3f}   plateau {ent[split] - ent[-1]:.3f}")
print(f"accuracy gain  rising {acc[split - 1] - acc[0]:.3f}   plateau {acc[-1] - acc[split]:.3f}")
print(f"share of the (first-order) entropy drop from negative samples: rising {neg_share_rising:.3f}, "
      f"plateau {neg_share_plateau:.3f}")
gap = np.nanmean(h.curves["entropy_neg"] - h.curves["entropy_pos"])
print(f"negative-sample tokens have {gap:+.3f} nats more entropy than positive ones on average")

# %%
fig, ax = plt.subplots(1, 3, figsize=(17, 4.4))
plot_band(ax[0], h.steps, h.curves["entropy"], "entropy")
ax0b = ax[0].twinx()
plot_band(ax0b, h.steps, h.curves["accuracy"], "accuracy", "C1")
ax0b.set_ylabel("accuracy", color="C1")
ax[0].set(xlabel="step", ylabel="mean entropy (nats)", title="stages (red: detected plateau)")
plot_band(ax[1], h.steps, h.curves["entropy_pos"], "tokens of positive samples", "C2")
plot_band(ax[1], h.steps, h.curves["entropy_neg"], "tokens of negative samples", "C3")
ax[1].set(xlabel="step", ylabel="mean token entropy (nats)", title="entropy by polarity")
ax[1].legend(fontsize=8)
ax[2].plot(h.diag_steps, np.cumsum(dn.mean(axis=1)), "C3", label="negative samples")
ax[2].plot(h.diag_steps, np.cumsum(dp.mean(axis=1)), "C2", label="positive samples")
ax[2].set(xlabel="step", ylabel="cumulative ΔH per state (first order)",
          title=f"who drives the drop (negative share, rising: {neg_share_rising:.2f})")
ax[2].legend(fontsize=8)
for a in ax:
    a.axvline(split, color="red", lw=1)
fig.tight_layout()

# %% [markdown]
# The detector splits the run where a person would: nearly all the accuracy gain and the entropy drop
# happen before the red line. As paper 2 reports, **negative samples carry most of the entropy drop in
# the rising stage**, and their tokens have higher entropy than positive samples' tokens. In the quadrant
# language of notebook 3: penalising a wrong response's unlikely tokens (`neg_low`) lowers the entropy.
# (The polarity curves get noisy late in the run, when almost no response is wrong.)
#
# **Check yourself.**

# %%
assert split is not None and 0 < split < steps
assert acc[split - 1] - acc[0] > acc[-1] - acc[split]  # the accuracy gain is in the rising stage
assert ent[0] - ent[split - 1] > ent[split] - ent[-1]  # so is the entropy drop
assert neg_share_rising > 0.5
assert gap > 0

# %% [markdown]
# ## 2. The role of negative samples: an intervention
#
# Train on only one polarity: `quadrant_mask:keep=pos_high/pos_low` keeps the tokens of positive samples
# (positive-sample reinforcement), `keep=neg_high/neg_low` those of negative samples. With
# `in_normaliser=true` the dropped tokens stay in the token-mean's denominator, so each kept token gets
# the same step as in full GRPO.

# %%
psteps = 200 if SMALL else 300
polarity = {
    "GRPO (both)": None,
    "positive samples only": "quadrant_mask:keep=pos_high/pos_low,in_normaliser=true",
    "negative samples only": "quadrant_mask:keep=neg_high/neg_low,in_normaliser=true",
}
hp = {name: train(sb, GRPOConfig(group_size=8, lr=1.0 * M * Tn, init_scale=1.0, rule=spec),
                  runs=RUNS, steps=psteps, seed=0, diag_every=0) for name, spec in polarity.items()}
fig, ax = plt.subplots(1, 3, figsize=(17, 4.4))
for (name, hh), c in zip(hp.items(), ("k", "C2", "C3"), strict=True):
    plot_band(ax[0], hh.steps, hh.curves["entropy"], name, c)
    plot_band(ax[1], hh.steps, hh.curves["accuracy"], name, c)
    plot_band(ax[2], hh.steps, hh.curves["pass_at_8"], name, c)
ax[0].set(xlabel="step", ylabel="mean entropy (nats)", title="entropy")
ax[1].set(xlabel="step", ylabel="accuracy", title="accuracy")
ax[2].set(xlabel="step", ylabel="pass@8", title="pass@8")
ax[0].legend(fontsize=8)
fig.tight_layout()
end = {name: (hh.curves["entropy"][-10:].mean(), hh.curves["accuracy"][-10:].mean())
       for name, hh in hp.items()}
for name, (e, a) in end.items():
    print(f"{name:<24} final entropy {e:.3f}   final accuracy {a:.3f}")

# %% [markdown]
# Without negative samples the entropy falls much less, while the accuracy ends close to full GRPO's:
# here the negatives carry most of the entropy drop and the positives most of the learning. Negatives
# alone learn slowly in this bandit — pushing down one of 8 wrong tokens says little about which of the
# 2 correct ones to choose — but keep the entropy high.
#
# **Check yourself.**

# %%
assert end["positive samples only"][0] > end["GRPO (both)"][0]
assert end["negative samples only"][0] > end["positive samples only"][0]
assert end["positive samples only"][1] > 0.8

# %% [markdown]
# ## 3. PPL shaping (paper 2 §4.1)
#
# A response's log-perplexity is $\ell_i = -\frac{1}{|o_i|}\sum_t \log p_{i,t}$. Within each prompt
# group, standardise it (mean and std over the responses inside an IQR fence), $w_i = (\ell_i - \mu_g) /
# \sigma_g$, and scale the response's advantages:
#
# $$\tilde A_{i,t} = A_{i,t}\cdot\operatorname{clip}\bigl(1 - \alpha\, w_i,\ 0.8,\ 1.2\bigr).$$
#
# Low-PPL (confident) responses get $|\tilde A| > |A|$ — reinforced more when right, penalised more when
# wrong. The paper's code uses $\alpha = 0.01$, a ±2% effect for $|w| \lesssim 2$. (The released code's
# branch for this method computes the weight but never applies it; the rule implements the paper's
# formula — `docs/rules.md`.) Below, one batch of 6 groups × 8 responses × 12 tokens.

# %%
P, G, L = 6, 8, 12
level = rng.uniform(0.3, 2.5, size=(P * G, 1))  # each response's typical surprisal
logp = -level * rng.uniform(0.5, 1.5, size=(P * G, L))  # (B, T) log-probs of the sampled tokens
adv = np.repeat(np.where(rng.random((P * G, 1)) < 0.5, 1.0, -1.0), L, axis=1)
ppl_batch = TokenBatch(logp=logp, adv=adv, valid=np.ones((P * G, L), dtype=bool),
                       group=np.repeat(np.arange(P), G))
log_ppl = -logp.mean(axis=1)  # ℓ_i, for the x-axis
fig, ax = plt.subplots(figsize=(6.4, 4.2))
for alpha, mk in ((0.01, "o"), (0.2, "s")):
    out = make_rule(f"ppl_shaping:alpha={alpha}")(ppl_batch)
    factor = out.adv[:, 0] / adv[:, 0]
    ax.scatter(log_ppl, factor, marker=mk, s=18, label=f"α = {alpha}")
    if alpha == 0.01:
        factor_paper = factor
ax.axhline(1.0, color="0.5", lw=0.8)
ax.set(xlabel="response log-perplexity ℓ_i (lower = more confident)", ylabel="advantage factor Ã / A",
       title="PPL shaping: low-PPL responses weigh more (per group)")
ax.legend()
fig.tight_layout()

# %% [markdown]
# The factor decreases with the log-PPL *within a group*; across groups the points interleave because each
# group is standardised on its own. At α = 0.2 the clamp [0.8, 1.2] binds.
#
# **Check yourself.**

# %%
assert np.all(np.abs(factor_paper - 1.0) <= 0.05)
for g in range(P):
    sl = slice(g * G, (g + 1) * G)
    assert np.all(np.diff(factor_paper[sl][np.argsort(log_ppl[sl])]) <= 1e-12)  # monotone in ℓ within a group

# %% [markdown]
# ## 4. The position bonus (paper 2 §4.2)
#
# With relative position $r_{i,t} = (t-1)/|o_i|$ and the logistic function $\sigma$,
#
# $$\tilde A_{i,t} = A_{i,t}
# + \operatorname{sign}(A_{i,t})\,\min\bigl(\alpha\,\sigma(k(r_{i,t} - 0.5)),\ 0.5\,|A_{i,t}|\bigr),
# \qquad k = 15:$$
#
# late tokens of correct responses are rewarded more, late tokens of wrong ones penalised more. Paper 2
# applies it in the **plateau** stage only; `gate="stage"` opens it when `TokenBatch.stage == "plateau"`
# (from `StageDetector`), `gate="always"` always, and the default `gate="window"` reproduces the released
# code's step window 201..299.

# %%
Lp = 40
pos_batch = TokenBatch(logp=np.full((2, Lp), -1.0), adv=np.array([[1.0] * Lp, [-1.0] * Lp]),
                       valid=np.ones((2, Lp), dtype=bool))
r = np.arange(Lp) / Lp  # relative positions (what the rule computes from `valid`)
fig, ax = plt.subplots(figsize=(6.4, 4.2))
for alpha, ls in ((0.1, "-"), (0.05, "--")):
    out = make_rule(f"position_bonus:gate=always,alpha={alpha}")(pos_batch)
    ax.plot(r, out.adv[0] - pos_batch.adv[0], "C2", ls=ls, label=f"A = +1, α = {alpha}")
    ax.plot(r, out.adv[1] - pos_batch.adv[1], "C3", ls=ls, label=f"A = −1, α = {alpha}")
ax.axhline(0, color="0.5", lw=0.8)
ax.set(xlabel="relative position r in the response", ylabel="Ã − A",
       title="position bonus: late tokens weigh more")
ax.legend(fontsize=8)
fig.tight_layout()

gated = make_rule("position_bonus:gate=stage")
print("gate=stage, rising :", gated(pos_batch.replace(stage="rising")).metrics["active"])
print("gate=stage, plateau:", gated(pos_batch.replace(stage="plateau")).metrics["active"])
assert float(gated(pos_batch.replace(stage="rising")).metrics["active"]) == 0.0
assert np.array_equal(gated(pos_batch.replace(stage="rising")).adv, pos_batch.adv)

# %% [markdown]
# ## 5. Shaping in the sequence bandit
#
# The configurations of `entdyn toy shaping` (`toy.experiments.SHAPING_CONFIGS`): GRPO, PPL shaping at
# the paper's α = 0.01 and at α = 0.2, the position bonus always on, and the position bonus in the
# plateau only (gated by the stage detector). A sequence bandit with $T = 8$ positions, $V = 8$, 2 correct
# tokens per position, correct when at least 5 positions are.

# %%
shb = Bandit(n_prompts=16, horizon=8, vocab=8, n_correct=2, need=5)
base = GRPOConfig(group_size=8, lr=1.0 * 16 * 8, init_scale=1.0)
ssteps = 150 if SMALL else 400
hs = {}
for name, spec in SHAPING_CONFIGS.items():
    det = StageDetector(window=max(10, ssteps // 15), tau_entropy=0.15, tau_accuracy=0.02)
    hs[name] = train(shb, GRPOConfig(**{**base.__dict__, "rule": spec}), runs=RUNS, steps=ssteps, seed=0,
                     detector=det, diag_every=0)

fig, ax = plt.subplots(1, 3, figsize=(17, 4.4))
for i, (name, hh) in enumerate(hs.items()):
    plot_band(ax[0], hh.steps, hh.curves["entropy"], name, f"C{i}")
    plot_band(ax[1], hh.steps, hh.curves["reward"], name, f"C{i}")
    profile = hh.curves["entropy_by_pos"][-10:].mean(axis=(0, 1))  # (T,) entropy per position at the end
    ax[2].plot(np.arange(shb.horizon), profile, "o-", color=f"C{i}", label=name)
ax[0].set(xlabel="step", ylabel="mean entropy (nats)", title="entropy")
ax[1].set(xlabel="step", ylabel="mean reward", title="reward")
ax[2].set(xlabel="position t", ylabel="entropy (last 10 steps)", title="entropy by position at the end")
ax[0].legend(fontsize=8)
fig.tight_layout()
for name, hh in hs.items():
    e = mean_ci(hh.curves["entropy"][-10:].mean(axis=0), axis=0)
    rw = mean_ci(hh.curves["reward"][-10:].mean(axis=0), axis=0)
    print(f"{name:<26} final entropy {e[0]:.3f} ± {e[1]:.3f}   final reward {rw[0]:.3f} ± {rw[1]:.3f}"
          f"   plateau at {hh.plateau_step}")

# %% [markdown]
# In this toy every method's reward lies within GRPO's confidence band, and the entropy differences are
# small (the stronger PPL weight raises it slightly, the direction paper 2 reports); the per-position
# profiles on the right differ by a few hundredths of a nat, within the seed-to-seed noise. That is the honest
# outcome, not a verdict on the methods: paper 2's mechanisms rely on properties this bandit lacks — here
# low-perplexity responses are not more robust (every position is scored alike) and late positions are no
# more decisive than early ones. A bandit whose reward depends on position is the natural next experiment
# (exercise 4).
#
# **Check yourself.** Until the plateau is detected the plateau-gated position bonus is off, so — with
# common random numbers — its run is *identical* to GRPO's; afterwards it may differ.

# %%
g, pg = hs["grpo"], hs["position (plateau only)"]
assert pg.plateau_step is not None
cut = pg.plateau_step
assert np.array_equal(g.curves["entropy"][:cut], pg.curves["entropy"][:cut])
assert all(hh.curves["reward"][-10:].mean() > 0.8 for hh in hs.values())

# %% [markdown]
# ## Summary
#
# * A GRPO run has a rising stage (fast accuracy gain, sharp entropy drop) and a plateau; the split here
#   is `StageDetector`'s (paper 2 gives no numeric rule).
# * Negative samples carry most of the entropy drop in the rising stage, and their tokens have higher
#   entropy; training without them keeps much more entropy at little cost in accuracy, in this toy.
# * PPL shaping scales each response's advantages by its group-standardised log-perplexity (±2% at the
#   paper's α); the position bonus adds a sign-aligned bonus to late tokens, gated to the plateau.
# * In this sequence bandit neither shaping changes reward; the toy lacks the structure paper 2's
#   mechanisms need.
#
# ## Exercises
#
# 1. **Detector sensitivity.** Re-run §1 with `tau_entropy=0.05` and `0.3`. How far does the plateau step
#    move, and does the rising-stage negative share change? *Hint:* `StageDetector.override_step` forces
#    the split, as paper 2's hand-picked ~step 200.
# 2. **High-PPL ablation.** `ppl_shaping:direction=high` up-weights *high*-perplexity responses (paper 2
#    §3.3 reports the entropy "surges"). Train it with α = 0.2 and compare the entropy with `direction=low`.
# 3. **Early vs late.** Paper 2 finds rewarding *late* tokens best. Make an "early" bonus by passing
#    `position=np.tile(1 - r, (2, 1))` in the `TokenBatch` of §4 and plot the bonus. *Hint:*
#    `TokenBatch.position` overrides the relative position the rule computes.
# 4. **A position-dependent task.** Build a sequence bandit where only the last positions decide the
#    reward (`need` close to `horizon` with fewer correct tokens late is one way), and rerun §5. Does the
#    position bonus help now? *Hint:* vary `n_correct`; the reward table is `Bandit.correct_table()`.
# 5. **Composition.** Run `ppl_shaping+position_bonus:gate=stage` (both methods at once; the released code
#    never combines them). *Hint:* `make_rule` composes with `+` in order of application.
