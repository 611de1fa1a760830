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
# # 3 · Entropy collapse in a softmax bandit: which tokens drive it
#
# *Tutorial 3 of 5. Uses notebook 2's Theorem 3.3 (E6) and quadrant table; labels from
# [`docs/equations.md`](../docs/equations.md). Paper: arXiv 2602.03392 (§4.2 quadrants, Cor 3.5, and the
# sign-verification intervention of its experiments). Full-size runs of the same experiments:
# [`docs/toy.md`](../docs/toy.md), `collapse` and `quadrants`.*
#
# Notebook 2 showed that on-policy the deviation $D = S_* - \mathbb E_p[S]$ averages to zero (Cor 3.4), so
# a GRPO step with a *fixed* step size has no expected first-order entropy change. Yet GRPO collapses
# entropy. Here we train GRPO on a **softmax bandit**, where the logits are the parameters (the tabular
# setting of the theory), and watch:
#
# 1. the collapse itself, for GRPO and REINFORCE;
# 2. whether the first-order theory predicts every step;
# 3. **which tokens** (quadrants) carry the drop, and why the advantage correlates with $D$;
# 4. Cor 3.5 during training;
# 5. paper 1's intervention: train on one quadrant's tokens only and check the entropy moves as the table
#    says.
#
# The simulator is `toy.grpo.step` (GRPO or REINFORCE, many seeds at once in one NumPy program);
# `toy.run.train` loops it and records curves and the theory diagnostics.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

import theory as T
from toy.bandit import Bandit
from toy.grpo import GRPOConfig, init_state, step
from toy.plotting import band as plot_band
from toy.run import mean_ci, train

SMALL = os.environ.get("ENTDYN_NB_SMALL") == "1"  # CI: fewer seeds and steps, same code and checks
RUNS = 8 if SMALL else 32  # independent seeds, simulated together
plt.rcParams.update({"figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})
QUAD_COLORS = dict(zip(T.QUADRANTS, ["C3", "C1", "C0", "C2"], strict=True))


# %% [markdown]
# ## 1. The bandit and one GRPO step
#
# `Bandit(n_prompts=32, vocab=100, n_correct=5)` is a contextual bandit: 32 prompts, each a softmax state
# over $K = 100$ arms ("tokens") of which 5 are correct (reward 1, else 0). The policy's parameters are
# the logits, one $(M, T, V) = (32, 1, 100)$ array per seed, starting **uniform** ($H = \log 100$).
#
# One `step` samples $G = 8$ responses per prompt, computes GRPO advantages (`T.grpo_advantages`), and
# takes a gradient-ascent step on the token-mean surrogate; the logit update of each token is (E5). The
# token-mean divides every gradient by the $M\cdot T$ states' tokens, so we write the learning rate as
# $\eta \cdot M T$ with $\eta$ the per-state step (`docs/toy.md`). With `diagnostics=True` it also returns
# the exact entropy change of every state beside the theory's predictions.

# %%
bandit = Bandit(n_prompts=32, horizon=1, vocab=100, n_correct=5)
M, Tn, V = bandit.shape
grpo = GRPOConfig(group_size=8, lr=1.0 * M * Tn)  # eta = 1
state = init_state(bandit, grpo, runs=2, seed=0)
d = step(bandit, grpo, state)  # one step for 2 seeds
for key in ("reward", "entropy", "dH_exact", "dH_first", "dH_tokens_first", "s_star_mean", "dev_mean"):
    print(f"{key:>16}: {d[key]}")

# %% [markdown]
# The first step changes the entropy by ~0 to first order: at the uniform start every $S_i = 0$ (uniform
# means $p_i = e^{-H}$ for all $i$), so (E6) predicts exactly 0 and only the second-order term moves it.
# After that the logits differ and first order takes over.
#
# ## 2. The collapse
#
# Now 300 steps (80 in small mode) for GRPO and for REINFORCE (advantage = reward minus a running
# per-prompt mean reward), all seeds at once.

# %%
steps = 80 if SMALL else 300
hist = {
    "GRPO": train(bandit, grpo, runs=RUNS, steps=steps, seed=0),
    "REINFORCE": train(bandit, GRPOConfig(algorithm="reinforce", group_size=8, lr=1.0 * M * Tn),
                       runs=RUNS, steps=steps, seed=0),
}
h = hist["GRPO"]
fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
for name, hh in hist.items():
    plot_band(ax[0], hh.steps, hh.curves["entropy"], name)
    plot_band(ax[1], hh.steps, hh.curves["accuracy"], name)
ax[0].axhline(np.log(V), color="0.5", ls=":", lw=1, label="log K (uniform)")
ax[0].set(xlabel="step", ylabel="mean entropy (nats)",
          title=f"entropy collapse ({RUNS} seeds, mean ± 95% CI)")
ax[1].set(xlabel="step", ylabel="accuracy (fraction of correct samples)", title="accuracy")
ax[0].legend()
ax[1].legend()
fig.tight_layout()

H_start, H_end = h.curves["entropy"][0].mean(), h.curves["entropy"][-5:].mean()
print(f"GRPO entropy {H_start:.3f} -> {H_end:.3f}, accuracy -> {h.curves['accuracy'][-5:].mean():.3f}")
print(f"REINFORCE entropy -> {hist['REINFORCE'].curves['entropy'][-5:].mean():.3f}")

# %% [markdown]
# **Check yourself.** Both algorithms learn the task and drive the entropy far below $\log K$.

# %%
assert H_start > 4.6 and H_end < 0.5 * H_start
assert h.curves["accuracy"][-5:].mean() > 0.9
assert hist["REINFORCE"].curves["entropy"][-1].mean() < H_start

# %% [markdown]
# ## 3. Does the theory predict every step?
#
# For each step `train` records the exact change `dH_exact` (mean over states) and the **tabular
# prediction** `dH_tokens_first`: every sampled token's own (E6) term $-\alpha(S_* - \mathbb E_p[S])$ with
# its actual $\alpha$, summed. In the tabular setting this sum *is* (E4) applied to the actual update, so
# its error is second order only. At $\eta = 1$ the steps are not tiny, so the fit is good but not
# perfect; `docs/toy.md` (`first-order`) shows R² = 0.999 at $\eta = 0.05$ and the $\eta^2$ scaling.

# %%
ex, tok = h.diag["dH_exact"].ravel(), h.diag["dH_tokens_first"].ravel()
r2 = 1 - np.sum((ex - tok) ** 2) / np.sum((ex - ex.mean()) ** 2)
fig, ax = plt.subplots(figsize=(5.6, 4.6))
ax.scatter(tok, ex, s=6, alpha=0.4, label="one step of one seed")
lim = np.abs(ex).max() * 1.05
ax.plot([-lim, lim], [-lim, lim], "k--", lw=1, label="y = x")
ax.set(xlabel="predicted ΔH per step: sum of the tokens' (E6) terms", ylabel="exact ΔH per step",
       title=f"GRPO, η = 1: R² = {r2:.4f}")
ax.legend(fontsize=8)
fig.tight_layout()
assert r2 > 0.95 and np.allclose(h.diag["dH_first"], h.diag["dH_tokens_first"], atol=1e-9)

# %% [markdown]
# ## 4. Which tokens drive the collapse
#
# Split the predicted change by quadrant, $\operatorname{sign}(A) \times \operatorname{sign}(D)$
# (`quad_<q>_dH`), and accumulate over training. Two quadrants lower the entropy (`pos_high`, `neg_low`)
# and two raise it (`pos_low`, `neg_high`).
#
# Why does the sum come out negative when Cor 3.4 says the on-policy mean of $D$ is zero? Because the
# advantage is **correlated** with $D$. Once the policy leans towards the correct arms, a correct sample
# is usually a likely token ($D > 0$, `pos_high`) and a wrong sample is usually an unlikely token
# ($D < 0$, `neg_low`): both lower the entropy. The right panel shows the token fractions: the two
# collapse quadrants take over as soon as learning starts.

# %%
shares = {q: h.diag[f"quad_{q}_dH"].sum() / h.diag["dH_tokens_first"].sum() for q in T.QUADRANTS}
neg_share = h.diag["dH_neg_first"].sum() / h.diag["dH_tokens_first"].sum()
print("share of the first-order entropy change:", {q: round(float(v), 3) for q, v in shares.items()})
print(f"share from negative samples: {neg_share:.3f}")

fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
for q in T.QUADRANTS:
    cumulative = np.cumsum(h.diag[f"quad_{q}_dH"].mean(axis=1))
    ax[0].plot(h.diag_steps, cumulative, color=QUAD_COLORS[q], label=q)
    plot_band(ax[1], h.diag_steps, h.diag[f"quad_{q}_frac"], q, QUAD_COLORS[q])
ax[0].plot(h.diag_steps, np.cumsum(h.diag["dH_exact"].mean(axis=1)), "k--", label="total (exact)")
ax[0].set(xlabel="step", ylabel="cumulative ΔH per state (first order)",
          title="which quadrants move the entropy")
ax[1].set(xlabel="step", ylabel="fraction of sampled tokens", title="tokens per quadrant")
ax[0].legend(fontsize=8)
ax[1].legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# **Check yourself.** The two collapse quadrants carry more than all of the drop (the other two push
# back a little), and negative samples carry a large part of it — the "role of negative samples" that
# notebook 5 picks up.

# %%
assert shares["pos_high"] > 0 and shares["neg_low"] > 0
assert shares["pos_high"] + shares["neg_low"] > 1.0
assert shares["pos_low"] <= 0 and shares["neg_high"] <= 0
assert neg_share > 0.3

# %% [markdown]
# ## 5. Corollary 3.5 during training
#
# Per step, the batch mean of $S_*$ (`s_star_mean`) and of the deviation $D$ (`dev_mean`). The paper
# reports the mean of $D$ about 1000× smaller than the mean of $S_*$ on LLM batches; over a whole run the
# ratio of the two overall means is computed below (the per-step ratio is noisier).

# %%
s_mean, d_mean = h.diag["s_star_mean"], h.diag["dev_mean"]
ratio = abs(s_mean.mean()) / abs(d_mean.mean())
fig, ax = plt.subplots(figsize=(6.4, 4.2))
ax.semilogy(h.diag_steps, np.abs(s_mean.mean(axis=1)), label="|batch mean of S*|")
ax.semilogy(h.diag_steps, np.abs(d_mean.mean(axis=1)), label="|batch mean of S* − E_p[S]|")
ax.set_ylim(bottom=1e-7)  # the uniform start has S* = 0 exactly
ax.set(xlabel="step", ylabel="magnitude (mean over seeds)",
       title=f"Cor 3.5: ratio of the overall means ≈ {ratio:.0f}")
ax.legend()
fig.tight_layout()
print(f"|mean S*| / |mean D| over the run: {ratio:.0f}")
assert ratio > 100

# %% [markdown]
# ## 6. The quadrant intervention (paper 1's sign verification)
#
# Paper 1 verifies its theory by intervention: during training, keep the gradient of only one quadrant's
# tokens and watch the entropy. `quadrant_mask` (a rule of `theory.rules`, `docs/rules.md`) does this:
# `quadrant_mask:keep=pos_high,by=deviation` keeps only positive-sample tokens with $D > 0$. With
# `by=s_star` the split is by $\operatorname{sign}(S_*)$ instead (Theorem 3.2's single-logit criterion,
# which is what the paper's figure splits on).
#
# Setting (as `entdyn toy quadrants`): a sequence bandit with $M = 16$ prompts, $T = 4$ positions,
# $V = 20$, 3 correct tokens per position, reward when at least 2 positions are correct; logits start at
# $\mathcal N(0, 1)$; $\eta = 0.5$. One training run per quadrant, criterion and seed.

# %%
qb = Bandit(n_prompts=16, horizon=4, vocab=20, n_correct=3, need=2)
qsteps = 30 if SMALL else 100
runs_q = {}
for by in ("deviation", "s_star"):
    for q in T.QUADRANTS:
        spec = f"quadrant_mask:keep={q},by={by}"
        cfg = GRPOConfig(group_size=8, lr=0.5 * 16 * 4, init_scale=1.0, rule=spec)
        runs_q[q, by] = train(qb, cfg, runs=RUNS, steps=qsteps, seed=0, diag_every=0)

sign_a = {q: 1.0 if q.startswith("pos") else -1.0 for q in T.QUADRANTS}  # sign(A) of each quadrant
sign_d = {q: 1.0 if q.endswith("high") else -1.0 for q in T.QUADRANTS}  # sign(D)
predicted = {q: int(T.entropy_change_sign(np.array(sign_a[q]), np.array(sign_d[q]))) for q in T.QUADRANTS}
agreement = {}
print(f"{'kept quadrant':<14}{'by':<11}{'theory':>7}   ΔH over the run (mean ± 95% CI)")
for (q, by), hq in runs_q.items():
    trend = hq.curves["entropy"][-1] - hq.curves["entropy"][0]  # (runs,)
    m, ci = mean_ci(trend, axis=0)
    agreement.setdefault(by, []).extend(np.sign(trend) == predicted[q])
    print(f"{q:<14}{by:<11}{'up' if predicted[q] > 0 else 'down':>7}   {m:+.3f} ± {ci:.3f}")
agreement = {by: float(np.mean(v)) for by, v in agreement.items()}
print("fraction of runs whose entropy moved the predicted way:", agreement)

fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), sharey=True)
for ax, by in zip(axes, ("deviation", "s_star"), strict=True):
    for q in T.QUADRANTS:
        hq = runs_q[q, by]
        arrow = "↑" if predicted[q] > 0 else "↓"
        plot_band(ax, hq.steps, hq.curves["entropy"], f"keep {q} (theory {arrow})", QUAD_COLORS[q])
    crit = "S* − E_p[S]" if by == "deviation" else "S*"
    ax.set(xlabel="step", ylabel="mean entropy (nats)",
           title=f"by sign({crit}): agreement {agreement[by]:.2f}")
    ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# Every run that keeps one quadrant by the deviation moves its entropy the way Theorem 3.3's table says.
# Splitting by $S_*$ alone misclassifies the tokens with $S_* > 0 > D$ (notebook 2's wedge): they are
# counted as "high" but act as "low" under a GRPO step, so that split agrees less well (`docs/toy.md`: 0.97
# at full size vs 1.00). Note also the first steps of `pos_low`: the entropy dips before it rises. Few
# tokens are kept, so the token-mean normaliser is small and the per-token step large: the second-order
# term of notebook 2 §6 wins at first.
#
# **Check yourself.**

# %%
assert agreement["deviation"] >= 0.95
assert agreement["s_star"] >= 0.75

# %% [markdown]
# ## Summary
#
# * In the tabular bandit, GRPO and REINFORCE both collapse the entropy while they learn; the sum of the
#   tokens' (E6) terms predicts each step (exactly (E4) on the update; error second order).
# * The collapse is carried by `pos_high` (rewarding likely correct tokens) and `neg_low` (penalising
#   unlikely wrong tokens): learning makes the advantage correlate with $D$, which Cor 3.4's zero mean
#   does not forbid. Negative samples carry much of the drop.
# * Cor 3.5 holds along training: the batch mean of $D$ is orders of magnitude below that of $S_*$.
# * Keeping one quadrant moves the entropy in the direction of the quadrant table — paper 1's
#   intervention, reproduced.
#
# ## Exercises
#
# 1. **REINFORCE's quadrants.** Repeat §4 for `hist["REINFORCE"]`. Does the same pair of quadrants
#    dominate? *Hint:* REINFORCE's advantage $R - b$ has a sign that depends on the running baseline $b$.
# 2. **Noisy rewards.** Use `Bandit(..., reward="bernoulli", p_correct=0.8)`. Does the entropy still
#    collapse, and how do the quadrant shares change? *Hint:* wrong arms are now sometimes rewarded.
# 3. **Random start.** Start from `init_scale=1.0`. Is the first step's entropy change still second
#    order? *Hint:* print `step(...)["dH_tokens_first"]` and `["dH_exact"]` for the first step.
# 4. **Normaliser.** In §6 add `in_normaliser=true` to the `quadrant_mask` spec (masked tokens then stay
#    in the token-mean's denominator). Does the early dip of `pos_low` disappear? Why? *Hint:* compare the
#    per-token step size.
# 5. **Beyond tabular.** Train with `GRPOConfig(policy="linear", n_features=8, ...)` (shared features: one
#    update moves every logit). Plot `dH_tokens_first` against `dH_exact` and against `dH_first`. Which
#    prediction survives? *Hint:* `docs/toy.md`, section `coupling`.
