"""Named toy experiments: ``entdyn toy NAME [--out DIR] [--quick]``.

Each experiment trains many seeds of a softmax bandit (:mod:`toy.run`), writes into ``DIR``

* ``summary.json``: headline numbers (keys documented in the README, "Toy experiments"), plus the
  experiment's name, size, seed and wall time;
* ``curves.json``: per-step curves (mean and 95% CI half-width over seeds) of every configuration;
* PNG figures (listed in ``summary["figures"]``);
* ``table.md``: the printed summary table,

and returns an :class:`ExperimentResult`. ``quick`` is a small version that still meets the thresholds
of ``first-order``, ``quadrants`` and ``collapse``. Learning rates are written ``eta * M * T``: the
token-mean loss divides every state's gradient by the ``M * T`` states of a batch, so ``eta`` is the
per-state step size and does not change with the bandit's size.

Experiments (:data:`EXPERIMENTS`):

``first-order``
    Predicted (E4, on the actual update) vs realised entropy change along GRPO training; residual vs
    step size from fixed states and samples (log-log slope ~2 first order, ~3 second order).
``quadrants``
    Paper 1's intervention: keep only one quadrant's tokens (:class:`theory.rules.QuadrantMask`), one
    run per quadrant and seed; does entropy move the way the quadrant table says?
``collapse``
    Plain GRPO (and REINFORCE) entropy collapse; which quadrants drive it; Cor 3.5's batch means.
``rules``
    No rule vs Clip_B, Clip_V, Clip-Cov, KL-Cov, the 80/20 mask, an entropy bonus and clip-higher.
``stages``
    Rising vs plateau (:class:`theory.rules.StageDetector`); the share of the entropy drop that comes
    from negative samples in each stage (paper 2 §3.1).
``shaping``
    PPL and position advantage shaping vs GRPO on a sequence bandit (paper 2 §4).
``coupling``
    Tabular vs shared-feature linear policy: the tabular (E6-sum) prediction against the exact
    parameter-space first-order prediction and the realised change.
``control``
    Holding a target entropy (80 % and 50 % of the initial one, a decaying schedule): no control, the
    adaptive bonus, EntroPIC-style PI weights and the predictive controller (:mod:`toy.control`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

import theory
from theory.diagnostics import cor35_ratio
from theory.discriminator import QUADRANT_DH_SIGN
from theory.reporting import write_report
from theory.rules import StageDetector, make_rule

from .bandit import Bandit
from .control import control
from .grpo import GRPOConfig, init_state, step
from .plotting import band, pyplot, save_figure
from .report import ExperimentResult, Size, compare_outcomes, final, format_table, loglog_slope, pm, r2
from .report import lr_per_state as _lr
from .report import size as _size
from .run import History, mean_ci, train

__all__ = ["EXPERIMENTS", "ExperimentResult", "run_experiment", "format_table", "main"]

PREDICTED_SIGN = QUADRANT_DH_SIGN  # the quadrant table (docs/equations.md §4)


def _outcome_figure(hist: dict[str, History], *, entropy_title: str, reward_label: str):
    """A 1 x 3 figure whose first two panels show every configuration's entropy and reward (mean ± 95%
    CI over seeds, colour ``C<i>``); the caller draws the third. Returns ``(fig, axes)``."""
    fig, ax = pyplot().subplots(1, 3, figsize=(18, 5), layout="constrained")
    for i, (name, h) in enumerate(hist.items()):
        band(ax[0], h.steps, h.curves["entropy"], name, f"C{i}")
        band(ax[1], h.steps, h.curves["reward"], name, f"C{i}")
    ax[0].set(xlabel="step", ylabel="mean entropy (nats)", title=entropy_title)
    ax[1].set(xlabel="step", ylabel=reward_label, title="reward")
    ax[0].legend(fontsize=8)
    return fig, ax


# --------------------------------------------------------------------------------------- first-order


def first_order(out: Path, *, quick: bool, seed: int, progress: bool, runs=None, steps=None):
    """(E4) on the actual update vs realised dH along training, and residual scaling in step size."""
    size = _size(quick, Size(8, 40), Size(32, 150), runs, steps)
    b = Bandit(n_prompts=16, horizon=4, vocab=20, n_correct=3, need=2)
    eta = 0.05  # "small step size": the per-state logit step is ~eta * |A| / G
    cfg = GRPOConfig(group_size=8, lr=_lr(eta, b), init_scale=1.0)
    h = train(b, cfg, runs=size.runs, steps=size.steps, seed=seed, progress=progress and "first-order")
    real, pred, pred2 = h.diag["dH_exact"], h.diag["dH_first"], h.diag["dH_second"]
    tok = h.diag["dH_tokens_first"]
    # step-size sweep: the same states and samples, only the step size changes
    sweep_cfg = replace(cfg, init_scale=1.5)
    st0 = init_state(b, sweep_cfg, runs=size.runs, seed=seed + 1)
    etas = np.logspace(-3, 0.5, 8)
    res1, res2, r2_by = [], [], []
    for e in etas:
        st = copy.deepcopy(st0)
        step(b, replace(sweep_cfg, lr=_lr(float(e), b)), st)
        z0, dz = st0.logits, st.logits - st0.logits  # per state (R, M, T, V)
        ex = theory.exact_entropy_change(z0, dz)
        first = theory.entropy_change_first_order(z0, dz)
        res1.append(np.mean(np.abs(ex - first)))
        res2.append(np.mean(np.abs(ex - theory.entropy_change_second_order(z0, dz))))
        r2_by.append(r2(ex, first))
    res1, res2 = np.array(res1), np.array(res2)
    small = slice(0, 5)  # the asymptotic regime: the five smallest step sizes
    summary = {
        "r2_first_order": r2(real, pred),
        "r2_second_order": r2(real, pred2),
        "r2_tokens_first": r2(real, tok),
        "sign_agreement": float(np.mean(np.sign(real) == np.sign(pred))),
        "residual_slope": loglog_slope(etas[small], res1[small]),
        "residual_slope_second": loglog_slope(etas[small], res2[small]),
        "eta": eta,
        "sweep_eta": etas.tolist(),
        "sweep_residual_first": res1.tolist(),
        "sweep_residual_second": res2.tolist(),
        "sweep_r2_states": r2_by,  # per-state R² of (E4) at each step size
    }
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    lim = float(np.max(np.abs(real))) * 1.05
    ax[0].plot([-lim, lim], [-lim, lim], color="0.6", lw=1, ls="--", label="y = x")
    ax[0].scatter(pred.ravel(), real.ravel(), s=7, alpha=0.5, label="first order (E4)")
    ax[0].set(xlabel="predicted ΔH per step (mean over states)", ylabel="realised ΔH (exact)",
              title=f"GRPO steps, η={eta}: R² = {summary['r2_first_order']:.4f}")
    ax[0].legend()
    ax[1].loglog(etas, res1, "o-", label=f"|exact − first order|, slope {summary['residual_slope']:.2f}")
    ax[1].loglog(etas, res2, "s-",
                 label=f"|exact − second order|, slope {summary['residual_slope_second']:.2f}")
    ax[1].set(xlabel="per-state step size η", ylabel="mean |residual| of ΔH per state",
              title="residual vs step size (same states and samples)")
    ax[1].legend()
    figs = [save_figure(fig, out, "first_order.png")]
    table = [["quantity", "value", "target"],
             ["R² first order (training steps)", f"{summary['r2_first_order']:.5f}", "≥ 0.99"],
             ["R² second order", f"{summary['r2_second_order']:.5f}", ""],
             ["sign agreement", f"{summary['sign_agreement']:.3f}", ""],
             ["residual slope, first order", f"{summary['residual_slope']:.3f}", "2 ± 0.2"],
             ["residual slope, second order", f"{summary['residual_slope_second']:.3f}", "≈ 3"],
             ["per-state R², η = 0.001 … 3.2", " … ".join(f"{r:.4f}" for r in r2_by[::3]), ""]]
    curves = {"train": h.to_json()}
    return ExperimentResult("first-order", summary, curves, figs, table)


# ----------------------------------------------------------------------------------------- quadrants


def quadrants(out: Path, *, quick: bool, seed: int, progress: bool, runs=None, steps=None):
    """Keep one quadrant's tokens; compare the entropy trend's sign with the quadrant table."""
    size = _size(quick, Size(8, 30), Size(32, 100), runs, steps)
    b = Bandit(n_prompts=16, horizon=4, vocab=20, n_correct=3, need=2)
    base = GRPOConfig(group_size=8, lr=_lr(0.5, b), init_scale=1.0)
    hist: dict[str, History] = {}
    agree: dict[str, list] = {}
    for by in ("deviation", "s_star"):
        for q in PREDICTED_SIGN:
            cfg = replace(base, rule=make_rule(f"quadrant_mask:keep={q},by={by}"))
            h = train(b, cfg, runs=size.runs, steps=size.steps, seed=seed, diag_every=0,
                      progress=progress and f"quadrants {q} ({by})")
            hist[f"{q}/{by}"] = h
            trend = h.curves["entropy"][-1] - h.curves["entropy"][0]  # (R,)
            agree.setdefault(by, []).extend((np.sign(trend) == PREDICTED_SIGN[q]).tolist())
    summary = {
        "quadrant_sign_agreement": float(np.mean(agree["deviation"])),
        "quadrant_sign_agreement_s_star": float(np.mean(agree["s_star"])),
        "runs_per_quadrant": size.runs,
    }
    for key, h in hist.items():
        trend = h.curves["entropy"][-1] - h.curves["entropy"][0]
        m, ci = mean_ci(trend, axis=0)
        summary[f"entropy_change/{key}"] = [float(m), float(ci)]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained", sharey=True)
    colors = dict(zip(PREDICTED_SIGN, ["C3", "C1", "C0", "C2"], strict=True))
    for ax, by in zip(axes, ("deviation", "s_star"), strict=True):
        for q, sgn in PREDICTED_SIGN.items():
            h = hist[f"{q}/{by}"]
            band(ax, h.steps, h.curves["entropy"], f"keep {q} (theory: {'↑' if sgn > 0 else '↓'})",
                  colors[q])
        crit = "S* − E_p[S]" if by == "deviation" else "S*"
        ax.set(xlabel="step", ylabel="mean entropy (nats)",
               title=f"keep one quadrant by sign(A) × sign({crit}); agreement "
                     f"{summary['quadrant_sign_agreement' + ('' if by == 'deviation' else '_s_star')]:.2f}")
        ax.legend(fontsize=8)
    figs = [save_figure(fig, out, "quadrants.png")]
    table = [["kept quadrant", "by", "theory", "ΔH over run (mean ± 95% CI)"]]
    for key in hist:
        q, by = key.split("/")
        m, ci = summary[f"entropy_change/{key}"]
        table.append([q, by, "up" if PREDICTED_SIGN[q] > 0 else "down", pm(m, ci, "+.4f")])
    table.append(["agreement (deviation)", "", "", f"{summary['quadrant_sign_agreement']:.3f}  (≥ 0.95)"])
    table.append(["agreement (S*)", "", "", f"{summary['quadrant_sign_agreement_s_star']:.3f}"])
    curves = {k: v.to_json() for k, v in hist.items()}
    return ExperimentResult("quadrants", summary, curves, figs, table)


# ------------------------------------------------------------------------------------------ collapse


def collapse(out: Path, *, quick: bool, seed: int, progress: bool, runs=None, steps=None):
    """Plain GRPO and REINFORCE collapse entropy; quadrant shares of the drop; Cor 3.5 batch means."""
    size = _size(quick, Size(8, 80), Size(32, 300), runs, steps)
    b = Bandit(n_prompts=32, horizon=1, vocab=100, n_correct=5)
    cfgs = {"grpo": GRPOConfig(group_size=8, lr=_lr(1.0, b)),
            "reinforce": GRPOConfig(algorithm="reinforce", group_size=8, lr=_lr(1.0, b))}
    hist = {k: train(b, c, runs=size.runs, steps=size.steps, seed=seed, progress=progress and f"collapse {k}")
            for k, c in cfgs.items()}
    h = hist["grpo"]
    s_mean, d_mean = h.diag["s_star_mean"], h.diag["dev_mean"]
    total = h.diag["dH_tokens_first"].sum()
    shares = {q: float(h.diag[f"quad_{q}_dH"].sum() / total) for q in PREDICTED_SIGN}
    H0, H1 = h.curves["entropy"][0].mean(), h.curves["entropy"][-10:].mean()
    summary = {
        "cor35_ratio": float(cor35_ratio(s_mean.mean(), d_mean.mean())),  # over every step and run
        "mean_s_star": float(s_mean.mean()),
        "mean_deviation": float(d_mean.mean()),
        "entropy_start": float(H0),
        "entropy_end": float(H1),
        "entropy_end_reinforce": float(hist["reinforce"].curves["entropy"][-10:].mean()),
        "accuracy_end": float(h.curves["accuracy"][-10:].mean()),
        "accuracy_end_reinforce": float(hist["reinforce"].curves["accuracy"][-10:].mean()),
        "quadrant_share_of_dH": shares,
        "neg_share_of_dH": float(h.diag["dH_neg_first"].sum() / total),
    }
    plt = pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.8), layout="constrained")
    for k, hh in hist.items():
        band(ax[0], hh.steps, hh.curves["entropy"], f"entropy, {k}")
    a2 = ax[0].twinx()
    for k, hh in hist.items():
        band(a2, hh.steps, hh.curves["accuracy"], f"accuracy, {k}", ls=":")
    a2.set_ylabel("accuracy (dotted)")
    ax[0].set(xlabel="step", ylabel="mean entropy (nats, solid)", title="entropy collapse (mean ± 95% CI)")
    ax[0].legend(loc="center right", fontsize=8)
    for q in PREDICTED_SIGN:
        ax[1].plot(h.diag_steps, np.cumsum(h.diag[f"quad_{q}_dH"].mean(axis=1)), label=q)
    ax[1].plot(h.diag_steps, np.cumsum(h.diag["dH_exact"].mean(axis=1)), "k--", label="total (exact)")
    ax[1].set(xlabel="step", ylabel="cumulative ΔH (first order, per state)",
              title="which tokens drive the drop (GRPO)")
    ax[1].legend(fontsize=8)
    ax[2].semilogy(h.diag_steps, np.abs(s_mean.mean(axis=1)), label="|batch mean S*|")
    ax[2].semilogy(h.diag_steps, np.abs(d_mean.mean(axis=1)), label="|batch mean S* − E_p[S]|")
    ax[2].set_ylim(bottom=1e-7)  # the uniform start has S* = 0 exactly
    ax[2].set(xlabel="step", ylabel="magnitude (mean over runs)",
              title=f"Cor 3.5: ratio of overall means = {summary['cor35_ratio']:.0f}")
    ax[2].legend(fontsize=8)
    figs = [save_figure(fig, out, "collapse.png")]
    table = [["quantity", "value"],
             ["entropy start → end (GRPO)", f"{H0:.3f} → {H1:.3f}"],
             ["entropy end (REINFORCE)", f"{summary['entropy_end_reinforce']:.3f}"],
             ["accuracy end GRPO / REINFORCE",
              f"{summary['accuracy_end']:.3f} / {summary['accuracy_end_reinforce']:.3f}"],
             ["cor35_ratio |mean S*| / |mean(S* − E_p[S])|", f"{summary['cor35_ratio']:.1f}  (≥ 100)"]]
    table += [[f"share of ΔH from {q}", f"{v:+.3f}"] for q, v in shares.items()]
    curves = {k: v.to_json() for k, v in hist.items()}
    return ExperimentResult("collapse", summary, curves, figs, table)


# --------------------------------------------------------------------------------------------- rules

#: the rules compared, with toy-scale parameters (the LLM defaults select ~1e-4 of ~1e6 tokens; a toy
#: batch has 512 tokens per run, so fraction-based rules use 0.02)
RULE_CONFIGS: dict[str, dict] = {
    "grpo": {},
    "clip_b": {"rule": "clip_b:mu=1.0"},
    "clip_v": {"rule": "clip_v:mu=1.0,max_frac=0.02"},
    "clip_cov": {"rule": "clip_cov:frac=0.02"},
    "kl_cov": {"rule": "kl_cov:frac=0.02"},
    "80/20 mask": {"rule": "high_entropy_mask:rho=0.2"},
    "entropy_bonus": {"rule": "entropy_bonus:coef=0.01"},
    "clip_higher": {"clip_high": 0.28},
}


def rules(out: Path, *, quick: bool, seed: int, progress: bool, runs=None, steps=None):
    """Every rule on the same sequence bandit and seeds: entropy, reward and pass@G over training."""
    size = _size(quick, Size(8, 60), Size(32, 200), runs, steps)
    b = Bandit(n_prompts=16, horizon=4, vocab=10, n_correct=2, need=3)
    base = GRPOConfig(group_size=8, lr=_lr(1.0, b), epochs=4, init_scale=1.0)
    hist = {}
    for name, kw in RULE_CONFIGS.items():
        hist[name] = train(b, replace(base, **kw), runs=size.runs, steps=size.steps, seed=seed,
                           progress=progress and f"rules {name}")
    G = base.group_size

    def clip_frac(h: History):
        frac = final(h, "ratio_clip_frac")
        return {"ratio_clip_frac": frac}, f"{frac[0]:.3f}"

    results, table = compare_outcomes(hist, G, "rule", "ratio-clip frac", clip_frac)
    summary: dict = {"config": {"bandit": repr(b), "base": repr(base)}, "results": results}
    fig, ax = _outcome_figure(hist, entropy_title="entropy", reward_label="mean reward (accuracy)")
    for i, (name, h) in enumerate(hist.items()):
        band(ax[2], h.steps, h.curves[f"pass_at_{G}"], name, f"C{i}")
    ax[2].set(xlabel="step", ylabel=f"pass@{G}", title=f"pass@{G} (unbiased)")
    fig.suptitle(f"rules on a sequence bandit (M=16, T=4, V=10), μ=4 PPO epochs, "
                 f"{size.runs} seeds, mean ± 95% CI")
    figs = [save_figure(fig, out, "rules.png")]
    curves = {k: v.to_json() for k, v in hist.items()}
    return ExperimentResult("rules", summary, curves, figs, table)


# -------------------------------------------------------------------------------------------- stages


def stages(out: Path, *, quick: bool, seed: int, progress: bool, runs=None, steps=None):
    """Rising vs plateau; the share of the entropy drop coming from negative samples in each stage."""
    size = _size(quick, Size(8, 300), Size(32, 600), runs, steps)
    b = Bandit(n_prompts=32, horizon=4, vocab=10, n_correct=2, need=3, reward="pm1")
    cfg = GRPOConfig(group_size=8, lr=_lr(1.0, b), init_scale=1.0)
    detector = StageDetector(window=max(10, size.steps // 15), tau_entropy=0.15, tau_accuracy=0.02)
    h = train(b, cfg, runs=size.runs, steps=size.steps, seed=seed, detector=detector,
              progress=progress and "stages")
    split = h.plateau_step if h.plateau_step is not None else size.steps
    dn, dp = h.diag["dH_neg_first"], h.diag["dH_pos_first"]
    tot = dn + dp
    stage_of = h.diag_steps < split

    def share(sel):
        t = tot[sel].sum()
        return float(dn[sel].sum() / t) if t != 0 else float("nan")

    ent = h.curves["entropy"].mean(axis=1)
    acc = h.curves["accuracy"].mean(axis=1)
    summary = {
        "plateau_step": h.plateau_step,
        "neg_share_rising": share(stage_of),
        "neg_share_plateau": share(~stage_of) if (~stage_of).any() else None,
        "entropy_drop_rising": float(ent[0] - ent[min(split, size.steps) - 1]),
        "entropy_drop_plateau": float(ent[min(split, size.steps - 1)] - ent[-1]),
        "accuracy_gain_rising": float(acc[min(split, size.steps) - 1] - acc[0]),
        "accuracy_gain_plateau": float(acc[-1] - acc[min(split, size.steps - 1)]),
        "entropy_neg_minus_pos": float(np.nanmean(h.curves["entropy_neg"] - h.curves["entropy_pos"])),
    }
    plt = pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.8), layout="constrained")
    band(ax[0], h.steps, h.curves["entropy"], "entropy")
    a2 = ax[0].twinx()
    band(a2, h.steps, h.curves["accuracy"], "accuracy", "C1")
    a2.set_ylabel("accuracy", color="C1")
    ax[0].set(xlabel="step", ylabel="mean entropy (nats)", title="stages (red line: detected plateau)")
    band(ax[1], h.steps, h.curves["entropy_pos"], "positive samples", "C2")
    band(ax[1], h.steps, h.curves["entropy_neg"], "negative samples", "C3")
    ax[1].set(xlabel="step", ylabel="mean token entropy (nats)", title="entropy by polarity")
    ax[1].legend()
    ax[2].plot(h.diag_steps, np.cumsum(dn.mean(axis=1)), "C3", label="negative samples")
    ax[2].plot(h.diag_steps, np.cumsum(dp.mean(axis=1)), "C2", label="positive samples")
    ax[2].set(xlabel="step", ylabel="cumulative ΔH (first order, per state)",
              title=f"who drives the drop: neg share rising {summary['neg_share_rising']:.2f}")
    ax[2].legend()
    if h.plateau_step is not None:
        for a in ax:
            a.axvline(h.plateau_step, color="red", lw=1)
    figs = [save_figure(fig, out, "stages.png")]
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    table = [["quantity", "rising", "plateau"],
             ["steps", f"0–{split}", f"{split}–{size.steps}" if split < size.steps else "—"],
             ["share of entropy drop from negatives", fmt(summary["neg_share_rising"]),
              fmt(summary["neg_share_plateau"])],
             ["entropy drop", f"{summary['entropy_drop_rising']:.3f}",
              f"{summary['entropy_drop_plateau']:.3f}"],
             ["accuracy gain", f"{summary['accuracy_gain_rising']:.3f}",
              f"{summary['accuracy_gain_plateau']:.3f}"]]
    return ExperimentResult("stages", summary, {"grpo": h.to_json()}, figs, table)


# ------------------------------------------------------------------------------------------- shaping

SHAPING_CONFIGS: dict[str, str | None] = {
    "grpo": None,
    "ppl (α=0.01, paper)": "ppl_shaping",
    "ppl (α=0.2)": "ppl_shaping:alpha=0.2",
    "position (always)": "position_bonus:gate=always",
    "position (plateau only)": "position_bonus:gate=stage",
}


def shaping(out: Path, *, quick: bool, seed: int, progress: bool, runs=None, steps=None):
    """PPL and position shaping vs GRPO on a sequence bandit with T = 8 positions."""
    size = _size(quick, Size(8, 150), Size(32, 400), runs, steps)
    b = Bandit(n_prompts=16, horizon=8, vocab=8, n_correct=2, need=5)
    base = GRPOConfig(group_size=8, lr=_lr(1.0, b), init_scale=1.0)
    detector = StageDetector(window=max(10, size.steps // 15), tau_entropy=0.15, tau_accuracy=0.02)
    hist = {name: train(b, replace(base, rule=spec), runs=size.runs, steps=size.steps, seed=seed,
                        detector=detector, progress=progress and f"shaping {name}")
            for name, spec in SHAPING_CONFIGS.items()}

    def profile(h: History):
        prof = h.curves["entropy_by_pos"][-10:].mean(axis=(0, 1))  # (T,)
        res = {"entropy_by_position": prof.tolist(), "plateau_step": h.plateau_step}
        return res, f"{prof[0]:.3f} / {prof[-1]:.3f}"

    results, table = compare_outcomes(hist, base.group_size, "method", "entropy first/last position", profile)
    summary: dict = {"results": results}
    fig, ax = _outcome_figure(hist, entropy_title="entropy (mean ± 95% CI)", reward_label="mean reward")
    for i, (name, res) in enumerate(results.items()):
        ax[2].plot(np.arange(b.horizon), res["entropy_by_position"], "o-", color=f"C{i}", label=name)
    ax[2].set(xlabel="position t", ylabel="entropy (last 10 steps)", title="entropy by position at the end")
    figs = [save_figure(fig, out, "shaping.png")]
    curves = {k: v.to_json() for k, v in hist.items()}
    return ExperimentResult("shaping", summary, curves, figs, table)


# ------------------------------------------------------------------------------------------ coupling


def coupling(out: Path, *, quick: bool, seed: int, progress: bool, runs=None, steps=None):
    """Tabular vs shared-feature linear policy: where the tabular (E6-sum) prediction stops being exact."""
    size = _size(quick, Size(8, 40), Size(32, 150), runs, steps)
    b = Bandit(n_prompts=8, horizon=1, vocab=50, n_correct=5)
    cfgs = {
        "tabular": GRPOConfig(group_size=8, lr=_lr(0.5, b), init_scale=1.0),
        "linear d=8": GRPOConfig(group_size=8, lr=0.5, init_scale=1.0, policy="linear", n_features=8),
        "linear d=64": GRPOConfig(group_size=8, lr=0.5, init_scale=1.0, policy="linear", n_features=64),
    }
    hist = {k: train(b, c, runs=size.runs, steps=size.steps, seed=seed, progress=progress and f"coupling {k}")
            for k, c in cfgs.items()}
    summary: dict = {"results": {}}
    table = [["policy", "R² tabular prediction", "R² parameter-space first order",
              "slope exact/tabular", "sign agreement (tabular)"]]
    for k, h in hist.items():
        ex, tab, par = h.diag["dH_exact"], h.diag["dH_tokens_first"], h.diag["dH_first"]
        slope = float(np.sum(ex * tab) / np.sum(tab * tab))  # least squares through the origin
        res = {"r2_tabular": r2(ex, tab), "r2_param_first": r2(ex, par), "slope_exact_on_tabular": slope,
               "sign_agreement_tabular": float(np.mean(np.sign(ex) == np.sign(tab))),
               "final_accuracy": final(h, "accuracy")}
        summary["results"][k] = res
        table.append([k, f"{res['r2_tabular']:.4f}", f"{res['r2_param_first']:.5f}", f"{slope:.3f}",
                      f"{res['sign_agreement_tabular']:.3f}"])
    plt = pyplot()
    fig, axes = plt.subplots(1, len(hist), figsize=(6 * len(hist), 4.8), layout="constrained")
    for ax, (k, h) in zip(axes, hist.items(), strict=True):
        ex = h.diag["dH_exact"].ravel()
        lim = float(np.max(np.abs(ex))) * 1.1
        ax.plot([-lim, lim], [-lim, lim], color="0.6", ls="--", lw=1)
        ax.scatter(h.diag["dH_tokens_first"].ravel(), ex, s=7, alpha=0.5,
                   label=f"tabular (E6 sum), R²={summary['results'][k]['r2_tabular']:.3f}")
        ax.scatter(h.diag["dH_first"].ravel(), ex, s=7, alpha=0.5, marker="x",
                   label=f"parameter space (E4 on Φ·Δw), R²={summary['results'][k]['r2_param_first']:.4f}")
        ax.set(xlabel="predicted ΔH per step", ylabel="realised ΔH (exact)", title=k)
        ax.legend(fontsize=8)
    figs = [save_figure(fig, out, "coupling.png")]
    curves = {k: v.to_json() for k, v in hist.items()}
    return ExperimentResult("coupling", summary, curves, figs, table)


# ---------------------------------------------------------------------------------------- the runner

EXPERIMENTS: dict[str, Callable[..., ExperimentResult]] = {
    "first-order": first_order,
    "quadrants": quadrants,
    "collapse": collapse,
    "rules": rules,
    "stages": stages,
    "shaping": shaping,
    "coupling": coupling,
    "control": control,
}


def run_experiment(name: str, out: str | Path, *, quick: bool = False, seed: int = 0, progress: bool = True,
                   runs: int | None = None, steps: int | None = None, echo: bool = True) -> ExperimentResult:
    """Run experiment ``name`` and write its files into ``out`` (created if needed)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    for field_name, v in (("runs", runs), ("steps", steps)):
        if v is not None and v < 1:
            raise ValueError(f"{field_name} must be >= 1, got {v!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = EXPERIMENTS[name](out, quick=quick, seed=seed, progress=progress, runs=runs, steps=steps)
    wall = time.perf_counter() - t0
    res.summary = {"experiment": name, "quick": quick, "seed": seed, "wall_s": round(wall, 2),
                   "figures": res.figures, **res.summary}
    table = write_report(out, f"toy experiment `{name}`", res.summary, res.curves, res.table)
    if echo:
        print(f"\n== {name} ({'quick, ' if quick else ''}seed {seed}, {wall:.1f} s) ==")
        print(table)
        print(f"-> {out}/summary.json, curves.json, " + ", ".join(res.figures))
    return res


def main(names: list[str], out: str | Path, *, quick: bool = False, seed: int = 0, progress: bool = True,
         runs: int | None = None, steps: int | None = None) -> int:
    """``entdyn toy``: run each named experiment (``all``: every one) into ``out/<name>``."""
    names = list(EXPERIMENTS) if names == ["all"] else names
    bad = [n for n in names if n not in EXPERIMENTS]
    if bad:
        raise ValueError(f"unknown experiment(s) {', '.join(map(repr, bad))}; choose from "
                         f"{', '.join(EXPERIMENTS)} or 'all'")
    out = Path(out)
    single = len(names) == 1
    for n in names:
        run_experiment(n, out if single else out / n, quick=quick, seed=seed, progress=progress,
                       runs=runs, steps=steps)
    return 0
