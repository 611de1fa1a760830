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
# # 1 · Softmax entropy and the entropy discriminator $S^*$
#
# *Tutorial 1 of 5 of `entropy-dynamics`. Prerequisites: softmax, logits, the idea of a policy-gradient
# step. Equation labels (E1)…(E10) are those of [`docs/equations.md`](../docs/equations.md); the paper is
# Wang et al., arXiv 2602.03392, "On the Entropy Dynamics in Reinforcement Fine-Tuning of LLMs".*
#
# When an LLM is fine-tuned with RL, the entropy of its next-token distributions usually falls — often
# until the model stops exploring ("entropy collapse"). This notebook answers the smallest version of the
# question *why*: **if we push up one logit, does the entropy go up or down, and by how much?**
#
# The answer is one number per token, the **entropy discriminator**
#
# $$S_* = p_k\,\bigl(H + \log p_k\bigr),$$
#
# and a one-line rule: rewarding token $k$ lowers the entropy iff $p_k > e^{-H}$.
#
# What you will do:
#
# 1. softmax and entropy (§1 of the equations);
# 2. Lemma 3.1 (E1): how one logit moves the whole distribution;
# 3. the discriminator (E2) and Theorem 3.2 (E3), checked by finite differences;
# 4. the sign threshold $e^{-H}$ (§2.4) and a map of $S^*$ over $(p_k, H)$;
# 5. the bounds of $S$ (§2.5).
#
# Every formula is called from the library (`import theory as T`); the notebook only composes, checks and
# plots. Cells marked **Check yourself** contain assertions: if you change something and an assertion
# fails, the text above it tells you which claim you broke.

# %%
import os

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np

import theory as T

# CI runs every notebook with ENTDYN_NB_SMALL=1: fewer samples, the same code and the same checks.
SMALL = os.environ.get("ENTDYN_NB_SMALL") == "1"
rng = np.random.default_rng(0)
np.set_printoptions(precision=4, suppress=True)
plt.rcParams.update({"figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})

# %% [markdown]
# ## 1. Softmax and entropy
#
# One decoding position has logits $z \in \mathbb R^V$, the policy is $p = \mathrm{softmax}(z)$,
# $p_i = e^{z_i} / \sum_j e^{z_j}$, and its Shannon entropy (in nats) is
#
# $$H(p) = -\sum_{i=1}^V p_i \log p_i, \qquad 0 \le H \le \log V.$$
#
# In this setting the **logits themselves are the parameters** ("tabular softmax", equations §1): there is
# no network, and moving one logit affects only this position. Notebook 3 shows what the tabular setting
# buys (exact predictions) and the last section of the toy results (`coupling`) what it costs.
#
# Careful with the word *entropy*: `T.entropy(z)` is the entropy of the **whole** next-token distribution.
# Some trainers log the surprisal of the *sampled* token, $-\log p_k$, and call it entropy; its
# expectation over $k \sim p$ is $H$, but a single value can be far from it (exercise 5).

# %%
z = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])  # logits of one position, V = 6
p = T.softmax(z)
H = T.entropy(z)
print("p =", p, " sum =", p.sum())
print(f"H = {H:.4f} nats   (log V = {np.log(len(z)):.4f})")

# %% [markdown]
# **Check yourself.** The uniform distribution has the largest entropy, $\log V$; a one-hot distribution
# has 0; adding a constant to every logit changes nothing (softmax is shift invariant); and `T.entropy`
# is the textbook definition.

# %%
assert np.isclose(T.entropy(np.zeros(7)), np.log(7))
assert T.entropy(np.array([40.0, 0.0, 0.0])) < 1e-15
assert np.isclose(T.entropy(z + 3.0), H)
assert np.isclose(H, -np.sum(p * np.log(p)))
assert 0.0 <= H <= np.log(len(z))

# %% [markdown]
# ## 2. One logit moves: Lemma 3.1 (E1)
#
# Raise logit $k$ by $\varepsilon$ ($\delta z = \varepsilon e_k$; $\varepsilon > 0$ rewards token $k$,
# $\varepsilon < 0$ penalises it). From the softmax Jacobian
# $\partial p_i / \partial z_j = p_i(\mathbb 1[i=j] - p_j)$:
#
# $$\text{(E1)}\qquad \delta p_i = \varepsilon\, p_i\,\bigl(\mathbb 1[i=k] - p_k\bigr) + O(\varepsilon^2).$$
#
# Read it for $i \ne k$: $\delta p_i / p_i = -\varepsilon p_k$. **Every other token loses the same
# relative amount**; the mass token $k$ gains is taken from the others in proportion to their
# probability. `T.prob_change_single_logit` is (E1).

# %%
k, eps = 1, 1e-3
dz = eps * np.eye(len(z))[k]  # the update eps * e_k
dp_first = T.prob_change_single_logit(z, k, eps)
dp_exact = T.softmax(z + dz) - p
print("first order (E1):", dp_first)
print("exact           :", dp_exact)
print("relative change δp_i/p_i:", dp_first / p, f"  (-eps p_k = {-eps * p[k]:.3e})")

# %% [markdown]
# **Check yourself.** The changes sum to zero, all the other tokens have the same relative change
# $-\varepsilon p_k$, and the first-order error is of order $\varepsilon^2$.

# %%
others = np.arange(len(z)) != k
assert abs(dp_first.sum()) < 1e-15
assert np.allclose(dp_first[others] / p[others], -eps * p[k])
assert np.max(np.abs(dp_exact - dp_first)) < eps**2

# %% [markdown]
# ## 3. The entropy discriminator (E2) and Theorem 3.2 (E3)
#
# Define for every vocabulary item
#
# $$\text{(E2)}\qquad
# S_i = p_i\,\bigl(H + \log p_i\bigr), \qquad S_* = S_k \text{ for the updated token } k.$$
#
# Put (E1) into $\Delta H \approx -\sum_i (1 + \log p_i)\,\delta p_i$ and use $\sum_i \delta p_i = 0$:
#
# $$\text{(E3, Theorem 3.2)}\qquad \Delta H = H\bigl(\mathrm{softmax}(z + \varepsilon e_k)\bigr) - H
# = -\varepsilon\, S_* + O(\varepsilon^2).$$
#
# A shorter way to see it (equations §2.5): the gradient of the entropy in logit space is
# $\partial H / \partial z_i = -S_i$, so (E3) is just a directional derivative. Three library functions
# give the same number: `T.discriminator(z)` (all $S_i$, needs the logits), `T.s_star(logp_k, H)` (only
# the sampled token's log-prob and the entropy — what a trainer has), and
# `T.entropy_change_single_logit(z, k, eps)` (the prediction $-\varepsilon S_*$).

# %%
S = T.discriminator(z)
logp = T.log_softmax(z)
print("S =", S)
print(f"S* for k={k}: from discriminator {S[k]:.6f}, from (log p_k, H) {T.s_star(logp[k], H):.6f}")
print(f"predicted ΔH = {T.entropy_change_single_logit(z, k, eps):+.6e}")
print(f"exact     ΔH = {T.exact_entropy_change(z, dz):+.6e}")

# %% [markdown]
# ### A finite-difference check
#
# Two independent checks of (E3). First, central differences of `T.entropy` along each axis must give
# $-S$. Second, the error of the prediction $-\varepsilon S_*$ must shrink like $\varepsilon^2$: on a
# log-log plot, a line of slope 2.
#
# Why `T.exact_entropy_change` and not `T.entropy(z + dz) - T.entropy(z)`? At $\varepsilon = 10^{-6}$ the
# two entropies agree to about 6 digits, so their float64 difference keeps only about 10 correct digits
# — and far fewer in float32. `exact_entropy_change` rewrites the difference so that no digits cancel
# (equations §2.5); it is the test oracle of the whole library.

# %%
h = 1e-5
fd_grad = np.array([(T.entropy(z + h * e) - T.entropy(z - h * e)) / (2 * h) for e in np.eye(len(z))])
print("finite-difference dH/dz:", fd_grad)
print("-S                     :", -S)

eps_grid = np.logspace(-5, 0, 11)
residual = {}
for kk in range(len(z)):
    e_k = np.eye(len(z))[kk]
    residual[kk] = np.array([abs(T.exact_entropy_change(z, e * e_k) - T.entropy_change_single_logit(z, kk, e))
                             for e in eps_grid])
slopes = {kk: np.polyfit(np.log(eps_grid[:6]), np.log(r[:6]), 1)[0] for kk, r in residual.items()}
print("log-log slopes of the residual (small eps):", {kk: round(float(s), 3) for kk, s in slopes.items()})

# %%
fig, ax = plt.subplots(figsize=(6.5, 4.2))
for kk, r in residual.items():
    ax.loglog(eps_grid, r, "o-", ms=3, label=f"k={kk}, p_k={p[kk]:.2f}")
ax.loglog(eps_grid, eps_grid**2 * 0.1, "k--", lw=1, label=r"slope 2 ($\propto\varepsilon^2$)")
ax.set(xlabel=r"step $\varepsilon$ on logit $k$", ylabel=r"$|\Delta H_{exact} - (-\varepsilon S_*)|$",
       title="Theorem 3.2: the first-order error is $O(\\varepsilon^2)$")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# **Check yourself.** The finite-difference gradient equals $-S$, and every residual has slope 2.

# %%
assert np.allclose(fd_grad, -S, atol=1e-9)
assert all(abs(s - 2.0) < 0.1 for s in slopes.values()), slopes
assert np.isclose(S[k], T.s_star(logp[k], H))

# %% [markdown]
# ## 4. The sign threshold $e^{-H}$ (§2.4)
#
# Since $p_k > 0$, the sign of $S_*$ is the sign of $H + \log p_k$:
#
# $$\operatorname{sign}(S_*) = \operatorname{sign}(H + \log p_k)
# = \operatorname{sign}\bigl(p_k - e^{-H}\bigr).$$
#
# A token is "relatively likely" when its surprisal $-\log p_k$ is below the entropy $H$, i.e. when
# $p_k > e^{-H}$ (`T.sign_threshold(z)`). With (E3) this gives the table of §2.4:
#
# | update | $p_k > e^{-H}$ ($S_* > 0$) | $p_k < e^{-H}$ ($S_* < 0$) |
# |---|---|---|
# | reward ($\varepsilon > 0$) | $\Delta H < 0$ — the collapse driver | $\Delta H > 0$ (exploration) |
# | penalise ($\varepsilon < 0$) | $\Delta H > 0$ | $\Delta H < 0$ |
#
# Note the threshold is $e^{-H}$, not $1/V$: for a peaked distribution $e^{-H}$ is large, and rewarding
# even the *second* most likely token can raise the entropy. The figure shows one distribution: the bars
# above the dashed line are exactly the tokens with $S_i > 0$.

# %%
thr = T.sign_threshold(z)
order = np.argsort(-p)
fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
ax[0].bar(np.arange(len(z)), p[order], color=np.where(p[order] > thr, "C3", "C0"))
ax[0].axhline(thr, color="k", ls="--", lw=1, label=f"$e^{{-H}}$ = {thr:.3f}")
ax[0].set(xlabel="token (sorted by probability)", ylabel="$p_i$", title=f"one distribution, H = {H:.3f}")
ax[0].legend()
ax[1].bar(np.arange(len(z)), S[order], color=np.where(S[order] > 0, "C3", "C0"))
ax[1].axhline(0, color="k", lw=0.8)
ax[1].set(xlabel="token (sorted by probability)", ylabel="$S_i = p_i(H + \\log p_i)$",
          title="discriminator: red = rewarding it lowers H")
fig.tight_layout()

# %% [markdown]
# ### $S^*$ over $(p_k, H)$
#
# $S_*$ depends only on the pair $(p_k, H)$, so one map covers every token of every distribution. Left:
# $S_*$ as a function of $p_k$ for a few entropies — zero at $p_k = e^{-H}$, minimal at
# $p_k = e^{-H-1}$ (§5). Right: the map, with the zero line $p_k = e^{-H}$ dashed, and on top of it
# tokens sampled on-policy from random softmax states (V = 20; the grey region holds no distribution)
# after one *rewarding* step $\varepsilon = 0.1$, coloured by the sign of the **exact** entropy change.
# The dashed line separates the colours: Theorem 3.2's sign rule, observed.

# %%
V, n_states = 20, (300 if SMALL else 3000)
scales = np.exp(rng.uniform(np.log(0.3), np.log(6.0), size=n_states))
Z = scales[:, None] * rng.standard_normal((n_states, V))  # (n, V) random logits
P, HZ = T.softmax(Z), T.entropy(Z)
ks = np.array([rng.choice(V, p=row) for row in P])  # one on-policy token per state
pk = P[np.arange(n_states), ks]
step = 0.1 * np.eye(V)[ks]  # rewarding step eps e_k, eps = 0.1
dH_exact = T.exact_entropy_change(Z, step)
dH_pred = T.entropy_change_single_logit(Z, ks, 0.1)
above = pk > T.sign_threshold(Z)

fig, ax = plt.subplots(1, 2, figsize=(12, 4.6))
pgrid = np.logspace(-3, 0, 400)
for Hv in np.array([0.5, 1.0, 2.0, 3.0]):
    line = ax[0].semilogx(pgrid, T.s_star(np.log(pgrid), Hv), label=f"H = {Hv}")[0]
    ax[0].plot(np.exp(-Hv), 0.0, "o", color=line.get_color())
    ax[0].plot(np.exp(-Hv - 1), T.s_star(-Hv - 1.0, Hv), "v", color=line.get_color())
ax[0].axhline(0, color="k", lw=0.8)
ax[0].set(xlabel="$p_k$", ylabel="$S_* = p_k(H + \\log p_k)$", ylim=(-0.3, 0.6),
          title="$S_*$ vs $p_k$: zero at $e^{-H}$ (o), minimum at $e^{-H-1}$ (v)")
ax[0].legend(fontsize=8)
PK, HH = np.meshgrid(np.logspace(-4, 0, 300), np.linspace(0.0, np.log(V), 200))
SS = T.s_star(np.log(PK), HH)
# the largest entropy a V-token distribution with probability p_k on one token can have: the rest uniform
rest = np.repeat(((1 - PK[0]) / (V - 1))[:, None], V - 1, axis=1)
H_max = T.entropy(np.log(np.concatenate([PK[0][:, None], rest], axis=1)))  # (300,)
SS = np.ma.masked_where(HH > H_max[None, :], SS)  # pairs (p_k, H) no distribution has
norm = mpl.colors.TwoSlopeNorm(vmin=SS.min(), vcenter=0.0, vmax=SS.max())
ax[1].set_facecolor("0.85")
im = ax[1].pcolormesh(PK, HH, SS, cmap="RdBu_r", norm=norm, shading="auto")
ax[1].contour(PK, HH, SS, levels=[0.0], colors="k", linestyles="--")
ax[1].scatter(pk[dH_exact < 0], HZ[dH_exact < 0], s=6, c="darkred", label="exact ΔH < 0 after reward")
ax[1].scatter(pk[dH_exact > 0], HZ[dH_exact > 0], s=6, c="navy", label="exact ΔH > 0 after reward")
ax[1].set_xscale("log")
ax[1].set(xlabel="$p_k$ (sampled token)", ylabel="entropy H (nats)",
          title="$S_*$ over $(p_k, H)$; grey: no V = 20 distribution")
fig.colorbar(im, ax=ax[1], label="$S_*$")
ax[1].legend(fontsize=8, loc="upper left")
fig.tight_layout()

# %% [markdown]
# **Check yourself.** The sign of $S_*$ is the sign of $p_k - e^{-H}$ for every sampled token, and the
# predicted sign $-\operatorname{sign}(S_*)$ matches the exact change for almost all of them. The
# misses sit on the dashed line, where $|S_*|$ is small compared with $\varepsilon$: there the
# $O(\varepsilon^2)$ term (§2.5) decides the sign. The first-order sign is a small-step statement; make
# $\varepsilon$ ten times smaller and most misses disappear.

# %%
s_k = T.s_star(np.log(pk), HZ)
assert np.array_equal(s_k > 0, above)
agree = np.mean(np.sign(dH_pred) == np.sign(dH_exact))
wrong = np.sign(dH_pred) != np.sign(dH_exact)
print(f"sign agreement of (E3) with the exact change at eps = 0.1: {agree:.4f} ({wrong.sum()} misses)")
if wrong.any():
    print(f"misses: largest |S*| = {np.abs(s_k[wrong]).max():.4f}, median p_k = {np.median(pk[wrong]):.4f}")
assert agree > 0.95
assert np.all(np.abs(s_k[wrong]) < 0.1)  # |S*| < eps wherever the sign is missed

# %% [markdown]
# ## 5. Bounds of the discriminator (§2.5)
#
# Two facts the tests of the library use as oracles, worth knowing by heart:
#
# * $\sum_i S_i = H + \sum_i p_i \log p_i = 0$: pushing every logit up by the same amount changes
#   nothing (shift invariance), so the gradient $-S$ has zero sum;
# * $-e^{-H-1} \le S_i \le p_i H$: for fixed $H$, $x (H + \log x)$ is smallest at $x = e^{-H-1}$ (the
#   triangles on the left panel above). So **penalising** a token can lower the entropy by at most
#   about $\varepsilon e^{-H-1}$ to first order, while rewarding a dominant token can lower it by up to
#   $\varepsilon p_k H$.

# %%
S_all = T.discriminator(Z)  # (n, V)
print(f"max |sum_i S_i| over {n_states} states: {np.abs(S_all.sum(-1)).max():.2e}")
assert np.abs(S_all.sum(-1)).max() < 1e-12
assert np.all(S_all >= -np.exp(-HZ - 1)[:, None] - 1e-15)
assert np.all(S_all <= P * HZ[:, None] + 1e-15)

# %% [markdown]
# ## Summary
#
# * One logit step $\varepsilon e_k$ changes the entropy by $-\varepsilon S_*$ (E3) with
#   $S_* = p_k(H + \log p_k)$ (E2); the error is $O(\varepsilon^2)$.
# * Rewarding a token lowers the entropy iff $p_k > e^{-H}$; rewarding a rare token raises it.
# * $S$ is minus the entropy gradient in logit space, sums to zero and is bounded below by $-e^{-H-1}$.
#
# A GRPO step does not move one logit: it moves all of them, $\delta z = \alpha(e_k - p)$. Notebook 2
# shows that this replaces $S_*$ by its deviation from a baseline, $S_* - \mathbb E_p[S]$ (Theorem 3.3).
#
# ## Exercises
#
# 1. **Two tokens.** For $V = 2$ with $p = (q, 1-q)$, plot $S_*$ of token 0 against $q$ using
#    `T.s_star(np.log(q), T.entropy(...))`. Show that rewarding the less likely token always raises the
#    entropy. *Hint:* where is $e^{-H}$ when $q = 1/2$? Is $q > e^{-H(q)}$ for every $q > 1/2$?
# 2. **Autograd.** Check $\nabla_z H = -S$ with torch: `zt = torch.tensor(z, requires_grad=True)`, then
#    `T.entropy(zt).backward()` and compare `zt.grad` with `-T.discriminator(z)`. *Hint:* every function of
#    `theory` accepts torch tensors and returns torch tensors.
# 3. **Masked vocabulary.** Set two logits of `z` to `-np.inf`. What are their $S_i$? Does the residual
#    plot of §3 still have slope 2 for the remaining tokens? *Hint:* a `-inf` logit is a legal masked
#    entry (probability exactly 0).
# 4. **Largest effects.** Which token's reward raises the entropy the most, and which lowers it the
#    most? Compare `np.argmin(S)` and `np.argmax(S)` with the bounds of §5. *Hint:* which token is
#    closest to $p = e^{-H-1}$?
# 5. **Entropy is not surprisal.** Sample 8 tokens from `p` and print $-\log p_k$ for each next to `H`.
#    How many samples does it take for the mean surprisal to be within 5% of $H$? *Hint:*
#    $\mathbb E_{k\sim p}[-\log p_k] = H$, but the variance can be large; this is why the library logs
#    `T.entropy` of the full distribution.
# 6. **Second order.** `T.entropy_change_second_order(z, dz)` adds the $\varepsilon^2$ term of §2.5.
#    Add its residual to the log-log plot. What slope do you expect, and what do you get?
