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
# # 2 · First-order entropy change: any update, a GRPO step, and where first order fails
#
# *Tutorial 2 of 5. Builds on notebook 1 ($S_i = p_i(H + \log p_i)$, $\nabla_z H = -S$). Labels are those
# of [`docs/equations.md`](../docs/equations.md); paper: arXiv 2602.03392, Theorem 3.3 and Corollaries
# 3.4/3.5.*
#
# Notebook 1 moved a single logit. Real updates move all of them. This notebook:
#
# 1. gives the first-order entropy change of **any** logit update (E4), and shows it is the covariance
#    formula of Cui et al. (arXiv 2505.22617);
# 2. specialises it to one **GRPO token update** (E5, E6, Theorem 3.3): the driver becomes the deviation
#    $S_* - \mathbb E_p[S]$ from a dynamic baseline (E7), and the sign of the change follows a quadrant
#    table;
# 3. checks Corollaries 3.4 and 3.5 (E8, E9): on-policy, the deviation averages to zero;
# 4. looks at the second-order term (equations §2.5) and at where the first-order picture breaks down.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

import theory as T
from toy.demo import residual_scaling, simulate

SMALL = os.environ.get("ENTDYN_NB_SMALL") == "1"  # CI: fewer states, same code and checks
rng = np.random.default_rng(1)
np.set_printoptions(precision=4, suppress=True)
plt.rcParams.update({"figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})
QUAD_COLORS = dict(zip(T.QUADRANTS, ["C3", "C1", "C0", "C2"], strict=True))

# %% [markdown]
# ## 1. Any logit update: (E4)
#
# Because $\nabla_z H = -S$, a small update $\delta z$ (any direction) changes the entropy by
#
# $$\text{(E4)}\qquad \Delta H \approx -\sum_i S_i\,\delta z_i
# = -\operatorname{Cov}_{a\sim p}\bigl(\log p_a,\ \delta z_a\bigr).$$
#
# The second form follows from $S_i = p_i(\log p_i - \mathbb E_p[\log p])$ (since $H = -\mathbb E_p[\log p]$)
# and $\sum_i S_i = 0$. It reads: **the entropy falls when the update raises the logits of tokens that are
# already likely** (positive covariance between $\log p$ and $\delta z$), and rises when it raises unlikely
# ones. Adding a constant to every $\delta z_i$ changes nothing. `T.entropy_change_first_order(z, dz)` is
# (E4).

# %%
V = 12
z = 1.5 * rng.standard_normal(V)
p, logp = T.softmax(z), T.log_softmax(z)
dz = 1e-3 * rng.standard_normal(V)

pred = T.entropy_change_first_order(z, dz)
exact = T.exact_entropy_change(z, dz)
cov = np.sum(p * (logp - p @ logp) * (dz - p @ dz))  # Cov_{a~p}(log p_a, dz_a), written out
print(f"(E4) {pred:+.6e}   -Cov {-cov:+.6e}   exact {exact:+.6e}")

# %% [markdown]
# **Check yourself.** (E4) is the covariance form, is shift invariant, contains Theorem 3.2 (E3) as the
# special case $\delta z = \varepsilon e_k$, and is accurate to $O(|\delta z|^2)$.

# %%
k = int(np.argmax(p))
assert np.isclose(pred, -cov, rtol=1e-12)
assert np.isclose(T.entropy_change_first_order(z, dz + 5.0), pred, rtol=1e-9)
assert np.isclose(T.entropy_change_first_order(z, 1e-3 * np.eye(V)[k]),
                  T.entropy_change_single_logit(z, k, 1e-3))
assert abs(exact - pred) < np.sum(dz**2)

# %% [markdown]
# ## 2. One GRPO token update: (E5), (E6), Theorem 3.3
#
# GRPO's per-token surrogate for a sampled token $k$ with advantage $A$ and ratio $r$ is
# $r\,A\,\log p_k$. Gradient ascent **on the logits** with learning rate $\eta$ uses
# $\nabla_z \log p_k = e_k - p$:
#
# $$\text{(E5)}\qquad
# \delta z = \alpha\,(e_k - p), \qquad \alpha = \eta\, r\, A \quad \text{(the effective step)}.$$
#
# The sampled logit goes up by $\alpha(1-p_k)$ and *every* logit goes down by $\alpha p_i$. Put this into
# (E4) and use $\sum_i S_i p_i = \mathbb E_{i\sim p}[S_i]$:
#
# $$\text{(E6, Theorem 3.3)}\qquad
# \Delta H = -\alpha\,\bigl(S_* - \mathbb E_{i\sim p}[S_i]\bigr) + O(\alpha^2),$$
#
# $$\text{(E7)}\qquad \mathbb E_{i\sim p}[S_i] = \sum_i p_i^2\,(H + \log p_i)
# = \operatorname{Cov}_{a\sim p}(p_a, \log p_a) \;\ge 0 .$$
#
# So under GRPO the driver is not $S_*$ but the **deviation** $D = S_* - \mathbb E_p[S]$ (`T.deviation`)
# from a **dynamic baseline** (`T.vocab_baseline`; Trinity-RFT calls it `nec`). The library has all the
# pieces: `T.grpo_logit_update` (E5), `T.effective_step_size` ($\alpha$, optionally divided by the loss
# normaliser), `T.entropy_change_grpo` (E6).

# %%
A, lr, ratio = -1.2, 0.05, 1.0  # a negative sample: its token is penalised
alpha = T.effective_step_size(lr, np.array(A), ratio)
dz_grpo = T.grpo_logit_update(z, k, alpha)
print("alpha =", alpha, "  dz =", dz_grpo)
print(f"(E6) {T.entropy_change_grpo(z, k, alpha):+.6e}   "
      f"(E4) on dz {T.entropy_change_first_order(z, dz_grpo):+.6e}   "
      f"exact {T.exact_entropy_change(z, dz_grpo):+.6e}")
base = T.vocab_baseline(z)
S = T.discriminator(z)
print(f"S* = {S[k]:+.4f}   E_p[S] = {base:.4f}   D = S* - E_p[S] = {T.deviation(z, k):+.4f}")

# %% [markdown]
# **Check yourself.** (E6) is (E4) applied to the GRPO update; the baseline is a non-negative covariance;
# $D$ is $S_*$ minus the baseline, computed either from the logits or from the per-token statistics a
# trainer has ($\log p_k$, $H$, and $\mathbb E_p[S]$ from the logits).

# %%
assert np.isclose(T.entropy_change_grpo(z, k, alpha), T.entropy_change_first_order(z, dz_grpo), rtol=1e-12)
assert base >= 0 and np.isclose(base, np.sum(p * (p - p @ p) * (logp - p @ logp)))  # Cov_p(p, log p)
assert np.isclose(T.deviation(z, k), T.s_star(logp[k], T.entropy(z)) - base)

# %% [markdown]
# ### The baseline moves the sign threshold
#
# Because $\mathbb E_p[S] \ge 0$, every token with $S_* < 0$ also has $D < 0$, but not the converse:
# tokens with $0 < S_* < \mathbb E_p[S]$ are "relatively likely" for a single-logit step (Theorem 3.2),
# yet a GRPO step on them behaves like a step on an *unlikely* token (Theorem 3.3). Left: one
# distribution's $S_i$, sorted by probability, with the baseline. Right: $S_*$ against $D$ for on-policy
# samples from 4000 random states (the demo's states: `toy.demo.simulate`); every point lies below the
# diagonal, and the shaded wedge holds the tokens the two theorems classify differently.

# %%
sim = simulate(n=600 if SMALL else 4000, alpha=0.05, seed=0)  # random states, on-policy tokens, one step
order = np.argsort(-p)
fig, ax = plt.subplots(1, 2, figsize=(12, 4.4))
colors = np.where(S[order] > base, "C3", np.where(S[order] > 0, "C4", "C0"))
ax[0].bar(np.arange(V), S[order], color=colors)
ax[0].axhline(base, color="k", ls="--", lw=1, label=f"$E_p[S]$ = {base:.3f}")
ax[0].axhline(0, color="k", lw=0.8)
ax[0].set(xlabel="token (sorted by probability)", ylabel="$S_i$",
          title="red: D > 0; purple: S* > 0 > D; blue: S* < 0")
ax[0].legend()
ax[1].scatter(sim["s_star"], sim["dev"], s=4, alpha=0.5, c="0.3")
lo, hi = sim["s_star"].min(), sim["s_star"].max()
ax[1].plot([lo, hi], [lo, hi], "k--", lw=1, label="D = S* (zero baseline)")
ax[1].fill_between([0, hi], [0, 0], [-0.5, -0.5], color="C4", alpha=0.15, label="S* > 0 > D")
ax[1].axhline(0, color="k", lw=0.6)
ax[1].axvline(0, color="k", lw=0.6)
ax[1].set(xlabel="$S_*$", ylabel="$D = S_* - E_p[S]$", ylim=(-0.45, hi),
          title="on-policy tokens of random states")
ax[1].legend(fontsize=8)
fig.tight_layout()

wedge = (sim["s_star"] > 0) & (sim["dev"] < 0)
print(f"share of on-policy tokens with S* > 0 > D: {wedge.mean():.3f}")
assert np.all(sim["dev"] <= sim["s_star"] + 1e-15)  # D <= S* because E_p[S] >= 0

# %% [markdown]
# ## 3. The quadrant table and one GRPO step on many states
#
# With $\alpha = \eta r A$ and $\eta, r > 0$, the sign of (E6) is
# $-\operatorname{sign}(A)\operatorname{sign}(D)$:
#
# | | $D > 0$ | $D < 0$ |
# |---|---|---|
# | $A > 0$ (positive sample) | `pos_high`: $\Delta H < 0$ (the collapse driver) | `pos_low`: $\Delta H > 0$ |
# | $A < 0$ (negative sample) | `neg_high`: $\Delta H > 0$ | `neg_low`: $\Delta H < 0$ |
#
# `T.quadrant(adv, dev)` returns the codes of `T.QUADRANTS` and `T.entropy_change_sign(adv, dev)` the
# predicted sign. `toy.demo.simulate` (what `entdyn demo` runs) draws random softmax states
# ($V \in [4, 64]$, entropies from almost 0 to almost $\log V$), samples one token on-policy per state,
# gives it a random advantage sign and applies one GRPO step with $|\alpha| = 0.05$. We compare (E6) with
# the exact change.

# %%
q, first, ex = sim["quadrant"], sim["first"], sim["exact"]
r2 = 1 - np.sum((ex - first) ** 2) / np.sum((ex - ex.mean()) ** 2)
print(f"{'quadrant':<9} {'count':>6} {'theory':>7} {'mean (E6)':>11} {'mean exact':>11} {'sign agree':>10}")
agree = {}
for code, name in enumerate(T.QUADRANTS):
    m = q == code
    sign_a, sign_d = (1.0 if code < 2 else -1.0), (1.0 if code % 2 == 0 else -1.0)  # the quadrant's signs
    expected = int(T.entropy_change_sign(np.array(sign_a), np.array(sign_d)))
    agree[name] = np.mean(np.sign(ex[m]) == sim["pred_sign"][m])
    print(f"{name:<9} {m.sum():>6} {'up' if expected > 0 else 'down':>7} {first[m].mean():>+11.2e} "
          f"{ex[m].mean():>+11.2e} {agree[name]:>10.4f}")
print(f"R² of (E6) against the exact change: {r2:.6f}")

fig, ax = plt.subplots(figsize=(6.2, 5))
for code, name in enumerate(T.QUADRANTS):
    m = q == code
    ax.scatter(first[m], ex[m], s=5, alpha=0.6, color=QUAD_COLORS[name], label=name)
lim = np.abs(ex).max() * 1.05
ax.plot([-lim, lim], [-lim, lim], "k--", lw=1, label="y = x")
ax.set(xlabel="predicted ΔH, (E6)", ylabel="exact ΔH", title=f"one GRPO step, |α| = 0.05: R² = {r2:.5f}")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# **Check yourself.** At this step size (E6) explains essentially all of the variance, and the quadrant
# predicts the sign of at least 95% of each quadrant's tokens. The misses have $|D|$ smaller than the step
# $|\alpha|$: there the $O(\alpha^2)$ term, which is negative for most states (section 6), decides. That is
# why the misses are in the two "up" quadrants.

# %%
miss = np.sign(ex) != sim["pred_sign"]
print(f"misses: {miss.sum()} of {len(ex)}, largest |D| among them {np.abs(sim['dev'][miss]).max():.4f}")
assert r2 > 0.99
assert all(a > 0.95 for a in agree.values()), agree
assert np.all(np.abs(sim["dev"][miss]) < 0.05)

# %% [markdown]
# ## 4. The covariance view of Cui et al.
#
# Cui et al. (arXiv 2505.22617) write the entropy change of a softmax policy-gradient step as a covariance
# between $\log p$ and the advantage. That is (E4) applied to the **expected** update. With an advantage
# $A_a$ for *every* token $a$, the expected GRPO logit step over $k \sim p$ is
# $\mathbb E_k[\eta A_k (e_k - p)] = \eta\, p \odot (A - \mathbb E_p A)$, so (E4) gives
#
# $$\Delta H \approx -\eta\,\operatorname{Cov}_{a\sim p}\bigl(\log p_a,\ p_a (A_a - \mathbb E_p A)\bigr)
# = \mathbb E_{k\sim p}\bigl[-\eta A_k (S_k - \mathbb E_p[S])\bigr],$$
#
# the on-policy average of (E6). Three routes, one number — computed below.
#
# Paper 1's objection to the covariance form is practical: it needs the advantages of **unsampled**
# tokens, which an RFT algorithm never sees. (E6) uses only the sampled token, its $\log p_k$, $H$ and
# $\mathbb E_p[S]$.

# %%
eta = 0.1
A_all = rng.standard_normal(V)  # an advantage for every token (what the covariance form needs)
ks = np.arange(V)
zs = np.broadcast_to(z, (V, V))  # the same state V times, one row per possible sampled token
e6_avg = np.sum(p * T.entropy_change_grpo(zs, ks, eta * A_all))  # E_{k~p}[(E6)]
e4_expected = T.entropy_change_first_order(z, eta * p * (A_all - p @ A_all))  # (E4) on E[dz]
cui = -eta * np.sum(p * (logp - p @ logp) * (p * (A_all - p @ A_all)))  # written out
print(f"E_k[(E6)] {e6_avg:+.6e}   (E4) on the expected step {e4_expected:+.6e}   Cui et al. {cui:+.6e}")
assert np.isclose(e6_avg, e4_expected, rtol=1e-10) and np.isclose(e4_expected, cui, rtol=1e-10)

# %% [markdown]
# ## 5. Corollaries 3.4 and 3.5: on-policy, the deviation averages to zero
#
# If $k \sim p$,
#
# $$\text{(E8, Cor 3.4)}\qquad \mathbb E_{k\sim p}\bigl[S_k - \mathbb E_p[S]\bigr]
# = \sum_k p_k S_k - \mathbb E_p[S] = 0 \quad\text{exactly.}$$
#
# So for a **fixed** $\alpha$ the expected first-order entropy change of a token update is zero. Over a
# batch of on-policy tokens (E9, Cor 3.5) the mean of $D$ is close to 0, much smaller than the mean of
# $S_*$ (the paper reports about 1000× on LLM batches). Any systematic entropy drift must therefore come
# from (i) the **correlation between $A$ and $D$** — notebook 3, (ii) clipping and masking rules that
# remove tokens unevenly — notebook 4, and (iii) **higher-order terms** — section 6 below.
#
# The figure: running means over more and more on-policy tokens. The mean of $S_*$ settles at a positive
# value; the mean of $D$ keeps shrinking like $1/\sqrt n$ (pure sampling noise around 0).

# %%
n = len(sim["dev"])
ns = np.arange(1, n + 1)
run_s, run_d = np.cumsum(sim["s_star"]) / ns, np.cumsum(sim["dev"]) / ns
sd = np.std(sim["dev"])
ratio35 = abs(sim["s_star"].mean()) / abs(sim["dev"].mean())
print(f"max |E_k[D]| per state (exact, Cor 3.4): {np.abs(sim['dev_expect']).max():.1e}")
print(f"mean S* = {sim['s_star'].mean():+.4f}, mean D = {sim['dev'].mean():+.5f} "
      f"(standard error {sd / np.sqrt(n):.5f}); ratio {ratio35:.0f}")

fig, ax = plt.subplots(figsize=(6.5, 4.2))
ax.loglog(ns, np.abs(run_s), label="|running mean of S*|")
ax.loglog(ns, np.abs(run_d), label="|running mean of D = S* − E_p[S]|", alpha=0.8)
ax.loglog(ns, 2 * sd / np.sqrt(ns), "k--", lw=1, label="2 × std(D) / √n")
ax.set(xlabel="number of on-policy tokens n", ylabel="magnitude",
       title="Cor 3.5: the batch mean of D is noise around 0")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# The ratio $|\text{mean } S_*| / |\text{mean } D|$ printed above is modest here because it is set by the
# noise: the mean of $D$ sits at about $\mathrm{std}(D)/\sqrt n$. With a few thousand tokens that gives a
# ratio of tens; an LLM batch has ~$10^6$ tokens, and the toy collapse run of notebook 3 (millions of
# tokens) reaches thousands, like the paper's ~1000×.
#
# **Check yourself.** Cor 3.4 holds to rounding in every state; the batch mean of $D$ is within 3
# standard errors of 0.

# %%
assert np.abs(sim["dev_expect"]).max() < 1e-12
assert abs(sim["dev"].mean()) < 3 * sd / np.sqrt(n)

# %% [markdown]
# ## 6. The second-order term, and where first order fails
#
# The Hessian of $H$ in logit space (equations §2.5, derived here, not in the paper) is
#
# $$\frac{\partial^2 H}{\partial z_j\,\partial z_l}
# = -\mathbb 1[j=l]\,p_j(L_j + 1) + p_j p_l (L_j + L_l + 1), \qquad L_j = \log p_j + H,$$
#
# so $\Delta H = -S\cdot\delta z + \tfrac12 \delta z^\top \nabla^2 H\, \delta z + O(|\delta z|^3)$
# (`T.entropy_hessian`, and `T.entropy_change_second_order` without building the $V\times V$ matrix).
# `toy.demo.residual_scaling` measures the median error of both predictions over a range of $|\alpha|$:
# slopes 2 and 3 on a log-log plot.

# %%
Hz = T.entropy_hessian(z)
quad = T.entropy_change_first_order(z, dz_grpo) + 0.5 * dz_grpo @ Hz @ dz_grpo
assert np.isclose(quad, T.entropy_change_second_order(z, dz_grpo), rtol=1e-10)
assert np.allclose(Hz, Hz.T) and np.allclose(Hz.sum(-1), 0.0)

n_sub = 200 if SMALL else 1000
scaling = residual_scaling(sim["logits"][:n_sub], sim["k"][:n_sub], sim["adv"][:n_sub],
                           np.logspace(-4, -0.5, 8))
print(f"slopes: first order {scaling['slope_first']:.3f}, second order {scaling['slope_second']:.3f}")
assert abs(scaling["slope_first"] - 2) < 0.15 and abs(scaling["slope_second"] - 3) < 0.2

# %% [markdown]
# **Where first order fails.** Two effects, both visible below.
#
# *Large steps on rare tokens.* Reward a rare token (`pos_low`, $D < 0$): (E6) predicts a linear entropy
# *increase*. The exact change rises, peaks, and turns negative once the token has taken over the
# distribution — a large enough reward of *any* token ends in a peaked distribution. The second-order
# prediction tracks the exact curve a little longer (to $\alpha \approx 1$ here), then overshoots: no
# low-order polynomial in $\alpha$ captures the turn-over. (The quadrant experiment of notebook 3
# sees this: when few tokens are kept, the per-token step is large and `pos_low` runs first lose entropy.)
#
# *A net drift at second order.* On-policy with random advantage signs, (E6) averages to almost 0
# (Cor 3.4), yet the second-order term is negative for most states: random GRPO steps lower the entropy on
# average, by an amount that grows like $\alpha^2$.

# %%
z_rare = np.log(np.array([0.55, 0.25, 0.12, 0.05, 0.03]))
k_rare = 4  # p_k = 0.03
alphas = np.linspace(0.0, 8.0, 161)
zb = np.broadcast_to(z_rare, (len(alphas), 5))
dzs = T.grpo_logit_update(zb, np.full(len(alphas), k_rare), alphas)
ex_a = T.exact_entropy_change(zb, dzs)
fo_a = T.entropy_change_first_order(zb, dzs)
so_a = T.entropy_change_second_order(zb, dzs)
cross = alphas[np.argmax((ex_a < 0) & (alphas > 0))]

drift = {}
for a in (0.05, 0.2, 0.5, 1.0):
    s_a = simulate(n=600 if SMALL else 4000, alpha=a, seed=0)
    drift[a] = (s_a["first"].mean(), s_a["exact"].mean())

fig, ax = plt.subplots(1, 3, figsize=(17, 4.4))
ax[0].loglog(scaling["alphas"], scaling["median_abs_resid_first"], "o-",
             label=f"|exact − first order|, slope {scaling['slope_first']:.2f}")
ax[0].loglog(scaling["alphas"], scaling["median_abs_resid_second"], "s-",
             label=f"|exact − second order|, slope {scaling['slope_second']:.2f}")
ax[0].set(xlabel="|α|", ylabel="median |residual| of ΔH", title="residuals shrink as α² and α³")
ax[0].legend(fontsize=8)
ax[1].plot(alphas, ex_a, "k", lw=2, label="exact")
ax[1].plot(alphas, fo_a, "C0--", label="first order (E6)")
ax[1].plot(alphas, so_a, "C1:", lw=2, label="second order")
ax[1].axhline(0, color="0.5", lw=0.8)
ax[1].axvline(cross, color="C3", lw=1, label=f"exact ΔH turns negative, α ≈ {cross:.2f}")
ax[1].set(xlabel="α (reward on a token with p_k = 0.03)", ylabel="ΔH", ylim=(-1.3, 1.0),
          title="pos_low: up for small α, down for large α")
ax[1].legend(fontsize=8)
a_list = np.array(list(drift))
ax[2].plot(a_list, [drift[a][0] for a in a_list], "o--", label="mean first-order ΔH (E6)")
ax[2].plot(a_list, [drift[a][1] for a in a_list], "s-", label="mean exact ΔH")
ax[2].axhline(0, color="0.5", lw=0.8)
ax[2].set(xlabel="|α| (random advantage signs, on-policy)", ylabel="mean ΔH over states",
          title="random GRPO steps: a second-order drift down")
ax[2].legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# **Check yourself.** For small $\alpha$ the rare-token reward raises the entropy as (E6) says; for
# large $\alpha$ it lowers it. At $|\alpha| = 1$ the mean exact change is clearly negative while the mean
# first-order change is not.

# %%
assert ex_a[1] > 0 and fo_a[1] > 0 and ex_a[-1] < 0
assert drift[1.0][1] < -0.01 and abs(drift[1.0][0]) < abs(drift[1.0][1]) / 3

# %% [markdown]
# ## Summary
#
# * Any small logit update:
#   $\Delta H \approx -\sum_i S_i\delta z_i = -\operatorname{Cov}_p(\log p, \delta z)$ (E4).
# * One GRPO token update, $\delta z = \alpha(e_k - p)$ with $\alpha = \eta r A$ (E5):
#   $\Delta H \approx -\alpha(S_* - \mathbb E_p[S])$ (E6, Theorem 3.3), with the baseline
#   $\mathbb E_p[S] = \operatorname{Cov}_p(p, \log p) \ge 0$ (E7). The sign follows the quadrant table.
# * On-policy the deviation has mean exactly 0 per state (E8) and ≈ 0 over a batch (E9); systematic drift
#   needs a correlation between $A$ and $D$, uneven clipping, or large steps.
# * The first-order error is $O(\alpha^2)$ (second-order $O(\alpha^3)$); for large steps even the sign can be
#   wrong, and random steps drift downward at second order.
#
# ## Exercises
#
# 1. **Natural policy gradient.** Cui et al. also give $\Delta H \approx -\eta\operatorname{Cov}_p(\log p, A)$
#    for natural PG, whose logit update is $\delta z = \eta A$. Check it with `T.entropy_change_first_order`.
#    *Hint:* one line; compare with the covariance written out as in §1.
# 2. **Which token raises the entropy most when rewarded?** For the state `z` of §2, compute
#    `T.deviation(zs, ks)` for every token and find the most negative. Is it the rarest token? *Hint:* look
#    at the left panel of the figure in §2 and at the minimum of $S$ (notebook 1, §5).
# 3. **Normalisers.** A token-mean loss over $N$ tokens divides every token's gradient by $N$. Use
#    `T.effective_step_size(lr, adv, ratio, normaliser=N)` and check that (E6) with that $\alpha$ predicts
#    the change of a step taken with the mean loss. *Hint:* the logit update of a mean is the mean of the
#    per-token updates (E5).
# 4. **The wedge.** What fraction of on-policy tokens fall in $S_* > 0 > D$ when the states are nearly
#    uniform, and when they are peaked? *Hint:* `simulate` returns `scale`; split by it.
# 5. **Second-order drift.** Show that the second-order term of a random-sign on-policy step is negative
#    on average by computing `T.entropy_change_second_order - T.entropy_change_first_order` on `sim`'s
#    states for several $|\alpha|$. How does the mean scale with $|\alpha|$? *Hint:* fit a log-log slope.
