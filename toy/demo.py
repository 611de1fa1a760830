"""Theory vs exact simulation: one GRPO logit step on random softmax states (``entdyn demo``).

A one-step softmax bandit. Each of ``n`` states is a softmax policy over ``V`` tokens (``V`` random in
``[4, 64]``, logits ``scale * N(0, 1)`` with ``scale`` log-uniform in ``[0.25, 8]`` so that entropies span
almost deterministic to almost uniform). A token ``k ~ p`` is sampled on-policy, the advantage sign is
``+-1`` at random and one GRPO step moves the logits by ``dz = alpha (e_k - p)`` with ``alpha = sign * 0.05``
(E5 of ``docs/equations.md``). Then:

* the first-order prediction ``-alpha (S* - E_p[S])`` (Theorem 3.3, E6), the second-order prediction and
  the exact entropy change are compared (R^2, relative errors, sign agreement);
* the tokens are split by quadrant ``sign(A) x sign(S* - E_p[S])`` (§4.2) and each quadrant's predicted
  and exact mean ``dH`` are reported;
* Corollaries 3.4/3.5: the on-policy mean of the deviation ``S* - E_p[S]`` is ~0 while the mean of ``S*``
  is not; ``cor35_ratio = |mean S*| / |mean (S* - E_p[S])|``;
* residual scaling: for ``|alpha|`` from 1e-4 to ~0.3 the median residuals of the first- and second-order
  predictions should scale as ``|alpha|^2`` and ``|alpha|^3`` (fitted log-log slopes ~2 and ~3).

States have different ``V``: they are stored in one ``(n, 64)`` array whose unused logits are ``-inf``
(masked tokens, probability exactly 0), which every :mod:`theory` function supports.

Every formula comes from :mod:`theory`; this module only samples, aggregates, prints and plots.
NumPy + matplotlib only (never torch).

Public API: :func:`run_demo` (compute, write ``summary.json`` and ``theory_demo.png``, return the
summary), :func:`format_table` (the printed report), :func:`main` (what ``entdyn demo`` calls).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

import theory
from theory.diagnostics import cor35_ratio, masked_mean

from .report import jsonable, r2

__all__ = [
    "DEFAULT_N",
    "QUICK_N",
    "SUMMARY_FILE",
    "FIGURE_FILE",
    "simulate",
    "residual_scaling",
    "run_demo",
    "format_table",
    "plot_demo",
    "main",
]

DEFAULT_N = 4000  #: states in a full run
QUICK_N = 500  #: states in a ``quick`` run
SUMMARY_FILE = "summary.json"
FIGURE_FILE = "theory_demo.png"

V_MIN, V_MAX = 4, 64  #: vocabulary size range (inclusive); logits are padded to V_MAX with -inf
SCALE_RANGE = (0.25, 8.0)  #: logit scale, drawn log-uniformly
ALPHA = 0.05  #: |alpha| of the main experiment
ALPHA_RANGE = (-4.0, -0.5)  #: log10 |alpha| range of the residual-scaling sweep
N_ALPHAS, N_ALPHAS_QUICK = 12, 6
RESIDUAL_SUBSET = 1000  #: states used for the residual-scaling sweep


# --------------------------------------------------------------------------------------------------
# simulation
# --------------------------------------------------------------------------------------------------


def _sample_states(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logits (n, V_MAX) padded with -inf, V (n,), scale (n,))``."""
    V = rng.integers(V_MIN, V_MAX + 1, size=n)
    scale = np.exp(rng.uniform(np.log(SCALE_RANGE[0]), np.log(SCALE_RANGE[1]), size=n))
    logits = scale[:, None] * rng.standard_normal((n, V_MAX))
    logits[np.arange(V_MAX)[None, :] >= V[:, None]] = -np.inf
    return logits, V, scale


def _sample_tokens(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """One on-policy token per row of ``p`` (n, V) by inverse CDF; never picks a zero-probability token."""
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(p.shape[0]) * cdf[:, -1]
    # First index whose CDF exceeds u: a p = 0 entry never raises the CDF, so it is never the first.
    return np.argmax(cdf > u[:, None], axis=-1)


def simulate(*, seed: int = 0, n: int = DEFAULT_N, alpha: float = ALPHA) -> dict[str, np.ndarray]:
    """Sample ``n`` states, on-policy tokens and advantage signs; apply one GRPO step of size ``|alpha|``.

    Returns a dict of arrays (all ``(n,)`` unless noted): ``logits`` (n, V_MAX), ``V``, ``scale``, ``k``,
    ``adv`` (``+-1``), ``alpha`` (``adv * |alpha|``), ``H``, ``p_k``, ``s_star``, ``baseline`` (E_p[S]),
    ``dev`` (S* - E_p[S]), ``dev_expect`` (its exact on-policy expectation per state, ~0),
    ``quadrant`` (codes of :func:`theory.quadrant`), ``pred_sign`` (:func:`theory.entropy_change_sign`),
    ``first``, ``first_general`` (E4 on the same update), ``second``, ``exact``.
    """
    rng = np.random.default_rng(seed)
    logits, V, scale = _sample_states(rng, n)
    p = theory.softmax(logits)
    k = _sample_tokens(rng, p)
    adv = rng.choice(np.array([-1.0, 1.0]), size=n)
    alpha_t = adv * abs(alpha)

    rows = np.arange(n)
    H = theory.entropy(logits)
    logp_k = theory.log_softmax(logits)[rows, k]
    s_star = theory.s_star(logp_k, H)
    baseline = theory.vocab_baseline(logits)
    dev = theory.deviation(logits, k)

    # Corollary 3.4 without sampling noise: E_{k~p}[S_k - E_p[S]] = sum_k p_k S_k - E_p[S] per state.
    dev_expect = np.sum(p * theory.discriminator(logits), axis=-1) - baseline

    dz = theory.grpo_logit_update(logits, k, alpha_t)
    return {
        "logits": logits,
        "V": V,
        "scale": scale,
        "k": k,
        "adv": adv,
        "alpha": alpha_t,
        "H": H,
        "p_k": np.exp(logp_k),
        "s_star": s_star,
        "baseline": baseline,
        "dev": dev,
        "dev_expect": dev_expect,
        "quadrant": theory.quadrant(adv, dev),
        "pred_sign": theory.entropy_change_sign(adv, dev),
        "first": theory.entropy_change_grpo(logits, k, alpha_t),
        "first_general": theory.entropy_change_first_order(logits, dz),
        "second": theory.entropy_change_second_order(logits, dz),
        "exact": theory.exact_entropy_change(logits, dz),
    }


def residual_scaling(
    logits: np.ndarray, k: np.ndarray, sign: np.ndarray, alphas: np.ndarray
) -> dict[str, np.ndarray | float]:
    """Median ``|exact - first|`` and ``|exact - second|`` for each step size in ``alphas``.

    The step of state ``i`` is ``sign[i] * a`` for ``a`` in ``alphas``. Returns ``alphas``,
    ``median_abs_resid_first``, ``median_abs_resid_second`` (arrays) and the least-squares log-log
    slopes ``slope_first`` (expected ~2) and ``slope_second`` (expected ~3).
    """
    alphas = np.asarray(alphas, dtype=float)
    r1 = np.empty_like(alphas)
    r2 = np.empty_like(alphas)
    for j, a in enumerate(alphas):
        dz = theory.grpo_logit_update(logits, k, sign * a)
        exact = theory.exact_entropy_change(logits, dz)
        r1[j] = np.median(np.abs(exact - theory.entropy_change_first_order(logits, dz)))
        r2[j] = np.median(np.abs(exact - theory.entropy_change_second_order(logits, dz)))
    la = np.log10(alphas)
    return {
        "alphas": alphas,
        "median_abs_resid_first": r1,
        "median_abs_resid_second": r2,
        "slope_first": float(np.polyfit(la, np.log10(r1), 1)[0]),
        "slope_second": float(np.polyfit(la, np.log10(r2), 1)[0]),
    }


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def _median_rel_err(pred: np.ndarray, target: np.ndarray) -> float:
    nz = target != 0
    return float(np.median(np.abs(pred[nz] - target[nz]) / np.abs(target[nz]))) if nz.any() else float("nan")


def _quadrant_stats(sim: dict[str, np.ndarray]) -> dict[str, dict]:
    q, first, exact, pred_sign = sim["quadrant"], sim["first"], sim["exact"], sim["pred_sign"]
    out = {}
    for code, name in enumerate(theory.QUADRANTS):
        m = q == code
        cnt = int(m.sum())
        # Sign the theory table predicts for this quadrant: -sign(A) * sign(S* - E_p[S]).
        sa, sd = (1.0 if code < 2 else -1.0), (1.0 if code % 2 == 0 else -1.0)
        expected = int(theory.entropy_change_sign(np.array(sa), np.array(sd)))
        out[name] = {
            "code": code,
            "count": cnt,
            "expected_sign": expected,
            "mean_pred_dH": float(first[m].mean()) if cnt else float("nan"),
            "mean_exact_dH": float(exact[m].mean()) if cnt else float("nan"),
            "sign_agreement": float(np.mean(pred_sign[m] == np.sign(exact[m]))) if cnt else float("nan"),
        }
    return out


def _cor35(sim: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """Corollaries 3.4/3.5 over the ``n`` states as one batch (:mod:`theory.diagnostics`): the means of
    ``S*`` and of ``S* - E_p[S]`` and ``cor35_ratio = |mean S*| / |mean (S* - E_p[S])|``."""
    valid = np.ones((1, sim["s_star"].shape[0]), dtype=bool)  # one batch of n one-token responses
    mean_s, mean_d = masked_mean(sim["s_star"][None], valid), masked_mean(sim["dev"][None], valid)
    return float(mean_s), float(mean_d), float(cor35_ratio(mean_s, mean_d))


def _summarize(sim: dict[str, np.ndarray], scaling: dict, *, seed: int, n: int, quick: bool) -> dict:
    first, second, exact = sim["first"], sim["second"], sim["exact"]
    mean_s, mean_d, ratio = _cor35(sim)
    se_d = float(np.std(sim["dev"], ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {
        "n": n,
        "seed": seed,
        "quick": quick,
        "alpha": ALPHA,
        "v_range": [V_MIN, V_MAX],
        "scale_range": list(SCALE_RANGE),
        "entropy_range": [float(sim["H"].min()), float(sim["H"].max())],
        "r2_first_order": r2(exact, first),
        "r2_second_order": r2(exact, second),
        "median_rel_err_first": _median_rel_err(first, exact),
        "median_rel_err_second": _median_rel_err(second, exact),
        "sign_agreement": float(np.mean(sim["pred_sign"] == np.sign(exact))),
        "n_undefined_quadrant": int(np.sum(sim["quadrant"] < 0)),
        "quadrants": _quadrant_stats(sim),
        "mean_s_star": mean_s,
        "mean_deviation": mean_d,
        "mean_deviation_stderr": se_d,
        "cor35_ratio": ratio,
        "mean_deviation_z": mean_d / se_d if se_d > 0 else float("nan"),
        "cor34_exact_max_abs": float(np.max(np.abs(sim["dev_expect"]))),
        "mean_pred_dH": float(np.mean(first)),
        "mean_exact_dH": float(np.mean(exact)),
        # The O(alpha^2) part the first order leaves out: its mean is a net drift even though the
        # first-order mean vanishes on-policy (Cor 3.4); fraction of states where it is negative.
        "mean_resid_first": float(np.mean(exact - first)),
        "frac_resid_first_negative": float(np.mean(exact - first < 0)),
        # Two routes to the same first-order prediction (E6 vs E4 on dz = alpha (e_k - p)) and
        # S* - E_p[S] computed from s_star/vocab_baseline vs deviation: both should agree to rounding.
        "consistency_max_abs": float(
            max(
                np.max(np.abs(sim["first"] - sim["first_general"])),
                np.max(np.abs(sim["s_star"] - sim["baseline"] - sim["dev"])),
            )
        ),
        "residual_slope_first": scaling["slope_first"],
        "residual_slope_second": scaling["slope_second"],
        "residual_scaling": {
            "n_states": int(scaling["n_states"]),
            "alphas": [float(a) for a in scaling["alphas"]],
            "median_abs_resid_first": [float(r) for r in scaling["median_abs_resid_first"]],
            "median_abs_resid_second": [float(r) for r in scaling["median_abs_resid_second"]],
        },
        "files": {"summary": SUMMARY_FILE, "figure": FIGURE_FILE},
    }


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

_ARROW = {-1: "down", 1: "up", 0: "none"}


def _fmt(x, spec: str) -> str:
    """``format(x, spec)``, or ``"n/a"`` for a missing (``None``) or non-finite value."""
    return "n/a" if x is None or not np.isfinite(x) else format(x, spec)


def format_table(summary: dict) -> str:
    """Plain-text report of a summary: one row per quadrant, then the headline numbers."""
    lines = [
        f"Theory vs exact: one GRPO logit step on {summary['n']} random softmax states "
        f"(V in [{summary['v_range'][0]}, {summary['v_range'][1]}], H in "
        f"[{summary['entropy_range'][0]:.3f}, {summary['entropy_range'][1]:.3f}], "
        f"|alpha| = {summary['alpha']}, "
        f"seed {summary['seed']})",
        "",
        f"{'quadrant':<10} {'A':>3} {'S*-E[S]':>8} {'theory dH':>10} {'count':>6} "
        f"{'mean pred dH':>13} {'mean exact dH':>14} {'sign agree':>11}",
    ]
    lines.append("-" * len(lines[-1]))
    for name, q in summary["quadrants"].items():
        a = "+" if q["code"] < 2 else "-"
        d = "+" if q["code"] % 2 == 0 else "-"
        lines.append(
            f"{name:<10} {a:>3} {d:>8} {_ARROW[q['expected_sign']]:>10} {q['count']:>6d} "
            f"{_fmt(q['mean_pred_dH'], '>13.3e')} {_fmt(q['mean_exact_dH'], '>14.3e')} "
            f"{_fmt(q['sign_agreement'], '>11.4f')}"
        )
    if summary["n_undefined_quadrant"]:
        lines.append(f"({summary['n_undefined_quadrant']} tokens with A = 0 or S* - E_p[S] = 0 left out)")
    rs = summary["residual_scaling"]
    head = [
        ("R^2 first order vs exact", f"{_fmt(summary['r2_first_order'], '.6f')}"),
        ("R^2 second order vs exact", f"{_fmt(summary['r2_second_order'], '.6f')}"),
        ("median rel. error, first order", f"{_fmt(summary['median_rel_err_first'], '.3e')}"),
        ("median rel. error, second order", f"{_fmt(summary['median_rel_err_second'], '.3e')}"),
        ("sign agreement (pred vs exact)", f"{_fmt(summary['sign_agreement'], '.4f')}"),
        ("mean S* (on-policy)", f"{_fmt(summary['mean_s_star'], '+.4e')}"),
        (
            "mean S* - E_p[S] (Cor 3.4/3.5)",
            f"{_fmt(summary['mean_deviation'], '+.4e')}  "
            f"(stderr {_fmt(summary['mean_deviation_stderr'], '.1e')})",
        ),
        ("cor35_ratio |mean S*|/|mean dev|", f"{_fmt(summary['cor35_ratio'], '.1f')}"),
        ("mean dev / stderr", f"{_fmt(summary['mean_deviation_z'], '+.2f')}"),
        ("max |E_k~p[S* - E_p[S]]| (exact)", f"{_fmt(summary['cor34_exact_max_abs'], '.1e')}"),
        ("mean dH: predicted / exact", f"{summary['mean_pred_dH']:+.3e} / {summary['mean_exact_dH']:+.3e}"),
        (
            "mean exact - first (O(alpha^2))",
            f"{summary['mean_resid_first']:+.3e}  ({summary['frac_resid_first_negative']:.1%} of states < 0)",
        ),
        (
            "residual slope, first order (~2)",
            f"{_fmt(summary['residual_slope_first'], '.3f')}",
        ),
        ("residual slope, second order (~3)", f"{_fmt(summary['residual_slope_second'], '.3f')}"),
        (
            "  sweep",
            f"{len(rs['alphas'])} |alpha| in [{rs['alphas'][0]:.0e}, {rs['alphas'][-1]:.2g}], "
            f"{rs['n_states']} states",
        ),
        ("consistency (max abs, two routes)", f"{_fmt(summary['consistency_max_abs'], '.1e')}"),
    ]
    width = max(len(k) for k, _ in head)
    lines += ["", *(f"{k:<{width}}  {v}" for k, v in head)]
    return "\n".join(lines)


_QCOLORS = ("#d62728", "#1f77b4", "#ff7f0e", "#2ca02c")  # pos_high, pos_low, neg_high, neg_low


def plot_demo(sim: dict[str, np.ndarray], summary: dict, path: str | Path) -> Path:
    """Three-panel figure: S*(p_k, H) map, predicted vs exact dH by quadrant, residual scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.4), layout="constrained")
    _panel_s_star(fig, axes[0], sim)
    _panel_prediction(axes[1], sim, summary)
    _panel_residuals(axes[2], summary)
    fig.suptitle("Entropy dynamics of a softmax policy: first-order theory (arXiv 2602.03392) vs exact")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _panel_s_star(fig, ax, sim: dict[str, np.ndarray]) -> None:
    """Panel (a): ``S*`` over ``(p_k, H)``, the infeasible region (for ``V = V_MAX``) greyed out."""
    import matplotlib
    from matplotlib.colors import TwoSlopeNorm

    pk = np.logspace(-4, 0, 400)
    Hs = np.linspace(0.0, np.log(V_MAX), 300)
    P, HH = np.meshgrid(pk, Hs)
    S = theory.s_star(np.log(P), HH)
    q = 1.0 - P
    h2 = -P * np.log(P) - q * np.log(np.where(q > 0, q, 1.0))  # binary entropy: the least H given p_k
    feasible = (HH >= h2) & (HH <= h2 + q * np.log(V_MAX - 1))
    S_plot = np.where(feasible, S, np.nan)
    norm = TwoSlopeNorm(vmin=float(np.nanmin(S_plot)), vcenter=0.0, vmax=float(np.nanmax(S_plot)))
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")
    mesh = ax.pcolormesh(P, HH, S_plot, cmap=cmap, norm=norm, shading="auto", rasterized=True)
    cb = fig.colorbar(mesh, ax=ax, pad=0.01)
    cb.set_label(r"$S_* = p_k\,(H + \log p_k)$")
    ax.plot(np.exp(-Hs), Hs, color="k", lw=2)
    ax.annotate(
        r"$S_*=0$:  $p_k = e^{-H}$",
        xy=(np.exp(-2.0), 2.0),
        xytext=(2.5e-2, 0.5),
        fontsize=10,
        arrowprops={"arrowstyle": "->", "color": "k"},
        bbox={"boxstyle": "round", "fc": "white", "ec": "0.5", "alpha": 0.9},
    )
    ax.text(3e-1, 3.4, r"$S_*>0$", fontsize=11, ha="center")
    ax.text(1.2e-3, 2.6, r"$S_*<0$", fontsize=11, ha="center")
    ax.text(1.5e-4, 0.25, f"grey: infeasible\nfor V = {V_MAX}", fontsize=8.5, color="0.25", va="bottom")
    ax.scatter(sim["p_k"], sim["H"], s=1.5, c="k", alpha=0.15, lw=0, label="sampled states")
    ax.set_xscale("log")
    ax.set_xlim(pk[0], 1.0)
    ax.set_ylim(0.0, np.log(V_MAX))
    ax.set_xlabel(r"probability of the sampled token $p_k$")
    ax.set_ylabel(r"entropy $H$ (nats)")
    ax.set_title("(a) entropy discriminator $S_*$", loc="left")
    ax.legend(loc="upper left", fontsize=8.5, markerscale=6, framealpha=0.9)


def _panel_prediction(ax, sim: dict[str, np.ndarray], summary: dict) -> None:
    """Panel (b): predicted (first order) vs exact ``dH``, coloured by quadrant (drawn in random order
    so that quadrants with the same predicted sign do not hide each other), with the residual inset."""
    from matplotlib.lines import Line2D

    first, exact, quad = sim["first"], sim["exact"], sim["quadrant"]
    colors = np.array([*_QCOLORS, "0.5"])[quad]  # code -1 (undefined) -> grey
    order = np.random.default_rng(0).permutation(first.shape[0])
    ax.scatter(first[order], exact[order], s=5, alpha=0.6, lw=0, c=colors[order], rasterized=True)
    lim = float(np.max(np.abs(np.concatenate([first, exact])))) * 1.05
    ax.plot([-lim, lim], [-lim, lim], color="k", lw=1, ls="--", label="y = x")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.axvline(0, color="0.6", lw=0.6)
    handles = []
    for code, name in enumerate(theory.QUADRANTS):
        qs = summary["quadrants"][name]
        arrow = {-1: r"$\Delta H<0$", 1: r"$\Delta H>0$"}[qs["expected_sign"]]
        handles.append(
            Line2D(
                [],
                [],
                ls="",
                marker="o",
                ms=5,
                color=_QCOLORS[code],
                label=f"{name} (n={qs['count']}): {arrow}",
            )
        )
    handles += ax.get_legend_handles_labels()[0]
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(r"predicted $\Delta H = -\alpha\,(S_* - \mathbb{E}_p[S])$")
    ax.set_ylabel(r"exact $\Delta H$")
    ax.set_title(
        f"(b) one GRPO step, |α| = {summary['alpha']}:  R² = {_fmt(summary['r2_first_order'], '.5f')}",
        loc="left",
    )
    ax.legend(handles=handles, loc="upper left", fontsize=8.5, framealpha=0.9)
    # Inset: the residual exact - predicted, i.e. the O(alpha^2) term the first order leaves out.
    ins = ax.inset_axes((0.6, 0.08, 0.37, 0.3))
    ins.scatter(first[order], (exact - first)[order], s=2, alpha=0.5, lw=0, c=colors[order], rasterized=True)
    ins.axhline(0, color="k", lw=0.6)
    ins.set_title("exact − predicted", fontsize=8)
    ins.tick_params(labelsize=7)
    ins.ticklabel_format(axis="both", style="sci", scilimits=(-2, 2))
    ins.xaxis.get_offset_text().set_fontsize(7)
    ins.yaxis.get_offset_text().set_fontsize(7)


def _panel_residuals(ax, summary: dict) -> None:
    """Panel (c): the median residuals of the first and second order against ``|alpha|`` (log-log)."""
    rs = summary["residual_scaling"]
    a = np.asarray(rs["alphas"])
    for key, slope, marker, color, label in (
        ("median_abs_resid_first", summary["residual_slope_first"], "o", "C0", "first order"),
        ("median_abs_resid_second", summary["residual_slope_second"], "s", "C3", "second order"),
    ):
        r = np.asarray(rs[key])
        ax.loglog(a, r, marker=marker, color=color, label=f"{label}: slope {_fmt(slope, '.2f')}")
        order_ = 2 if key.endswith("first") else 3
        guide = 0.1 * r[len(r) // 2] * (a / a[len(a) // 2]) ** order_
        ax.loglog(a, guide, color=color, lw=1, ls=":", label=rf"$\propto|\alpha|^{order_}$ guide")
    ax.axvline(summary["alpha"], color="0.5", lw=0.8, ls="--")
    ax.text(
        summary["alpha"],
        0.02,
        r" $|\alpha|$ of (b)",
        transform=ax.get_xaxis_transform(),
        color="0.4",
        fontsize=8.5,
    )
    ax.set_xlabel(r"step size $|\alpha|$")
    ax.set_ylabel(r"median $|\Delta H_{\rm exact} - \Delta H_{\rm pred}|$")
    ax.set_title(f"(c) residual scaling ({rs['n_states']} states)", loc="left")
    ax.legend(fontsize=9, loc="upper left")
    ax.grid(True, which="major", alpha=0.3)


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------


def run_demo(out_dir: str | Path, *, seed: int = 0, n: int | None = None, quick: bool = False) -> dict:
    """Run the demo, write ``summary.json`` and ``theory_demo.png`` into ``out_dir``; return the summary.

    Args:
        out_dir: output directory (created if missing).
        seed: seed of the NumPy generator; the summary is a deterministic function of ``(seed, n, quick)``.
        n: number of states; default :data:`DEFAULT_N`, or :data:`QUICK_N` when ``quick``.
        quick: fewer states (by default) and fewer step sizes in the residual sweep.

    Returns:
        The dict written to ``summary.json``.
    """
    n = (QUICK_N if quick else DEFAULT_N) if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    sim = simulate(seed=seed, n=n, alpha=ALPHA)
    m = min(n, RESIDUAL_SUBSET)
    alphas = np.logspace(*ALPHA_RANGE, N_ALPHAS_QUICK if quick else N_ALPHAS)
    scaling = residual_scaling(sim["logits"][:m], sim["k"][:m], sim["adv"][:m], alphas)
    scaling["n_states"] = m

    summary = jsonable(_summarize(sim, scaling, seed=seed, n=n, quick=quick))
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    plot_demo(sim, summary, out_dir / FIGURE_FILE)
    return summary


def main(
    out_dir: str | Path = "runs/demo", *, seed: int = 0, n: int | None = None, quick: bool = False
) -> int:
    """``entdyn demo``: run :func:`run_demo`, print the table and where the outputs are; return 0."""
    t0 = time.perf_counter()
    summary = run_demo(out_dir, seed=seed, n=n, quick=quick)
    elapsed = time.perf_counter() - t0
    out_dir = Path(out_dir)
    print(format_table(summary))
    print()
    print(f"wrote {out_dir / SUMMARY_FILE}")
    print(f"wrote {out_dir / FIGURE_FILE}")
    print(f"({elapsed:.1f} s)")
    return 0
