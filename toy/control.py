"""The toy experiment ``control``: holding a target entropy, reactive vs predictive (``entdyn toy control``).

Every entropy controller of :mod:`theory.rules` on the sequence bandit of ``rules``, with three targets set
from the initial entropy ``H0`` (the mean over seeds at step 0): 80 % and 50 % of ``H0`` (constant), and a
cosine decay from 90 % to 40 % over the run. Methods:

* ``none``: plain GRPO;
* ``adaptive_bonus``: TRL's adaptive entropy coefficient (``entropy_bonus:adaptive=true``, Skywork-OR1), the
  best-tracking of three ``delta`` (TRL's 0.005 and two faster ones);
* ``pi_weights``: EntroPIC-style PI control of the positive / negative sample weights (``entropic_pi``), the
  best-tracking of three gain pairs;
* ``predictive``: :class:`theory.rules.EntropyTarget` at its defaults (the bonus actuator: the coefficient
  whose predicted first-order effect, with the predicted drift of the plain update, closes half the error);
* ``predictive_weights``: the same controller with the quadrant-weight actuator.

The reactive baselines are tuned on the very runs they are scored on (the best of their grid); the
predictive controller is not. The calibration is fed the exact entropy change of each update
(:meth:`theory.rules.Rule.feedback` in :func:`toy.grpo.step`, diagnostics every step).

Per run: ``tracking_error`` = mean ``|H − H*|`` over the steps after the warm-up (the first fifth),
``overshoot`` = how far the entropy fell below the target at worst (``max(0, max_t H*_t − H_t)``),
``reward`` and ``pass_at_8`` = their means over the last fifth of the steps; each as [mean, 95 % CI]
over seeds. ``summary["results"][method]`` is the 80 % target; ``summary["targets"][name][method]`` all
three; ``summary["comparison"][name]`` the predictive controller's tracking error over the best reactive
baseline's and its reward minus that baseline's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from theory.reporting import compare_to_best, tracking
from theory.rules import make_rule
from theory.rules.entropy_control import scheduled

from .bandit import Bandit
from .grpo import GRPOConfig
from .plotting import band, pyplot, save_figure
from .report import ExperimentResult, Size, lr_per_state, pm, size
from .run import History, mean_ci, train

__all__ = ["control", "CONTROL_METHODS", "TARGETS", "target_curve"]

#: name -> (schedule, start fraction of H0, end fraction of H0)
TARGETS: dict[str, tuple[str, float, float]] = {
    "80%": ("constant", 0.8, 0.8),
    "50%": ("constant", 0.5, 0.5),
    "decay 90%→40%": ("cosine", 0.9, 0.4),
}

#: method -> the rule specs tried (the best-tracking one is reported); ``{t}`` / ``{f}`` / ``{n}``: the
#: target's start and end (nats) and the number of steps
CONTROL_METHODS: dict[str, list[str]] = {
    "adaptive_bonus": [
        f"entropy_bonus:adaptive=true,coef=0.0,delta={d},target={{t}},final_target={{f}},"
        f"target_schedule={{s}},total_steps={{n}}" for d in (0.005, 0.02, 0.05)
    ],
    "pi_weights": [
        f"entropic_pi:schedule={{s}},target={{t}},final_target={{f}},total_steps={{n}},kp={kp},ki={kp / 10}"
        for kp in (1.0, 5.0, 20.0)
    ],
    "predictive": ["entropy_target:schedule={s},target={t},final_target={f},total_steps={n}"],
    "predictive_weights": [
        "entropy_target:schedule={s},target={t},final_target={f},total_steps={n},actuator=weights"
    ],
}
REACTIVE = ("adaptive_bonus", "pi_weights")


def target_curve(name: str, h0: float, steps: int) -> np.ndarray:
    """The target ``H*_t`` of ``TARGETS[name]`` at steps ``0 .. steps-1`` (nats), the rules' schedule."""
    schedule, a, b = TARGETS[name]
    return np.array([scheduled(schedule, a * h0, b * h0, t, steps) for t in range(steps)])


def _scores(h: History, target: np.ndarray, G: int) -> dict[str, tuple[float, float]]:
    H = h.curves["entropy"]  # (S, R)
    S = H.shape[0]
    warm, last = S // 5, max(1, S // 5)
    per_run = {
        **tracking(H, target[:, None], warm),
        "reward": h.curves["reward"][-last:].mean(axis=0),
        f"pass_at_{G}": h.curves[f"pass_at_{G}"][-last:].mean(axis=0),
        "final_entropy": H[-last:].mean(axis=0),
    }
    return {k: tuple(float(x) for x in mean_ci(v, axis=0)) for k, v in per_run.items()}


def _spec(template: str, name: str, h0: float, steps: int) -> str:
    schedule, a, b = TARGETS[name]
    return template.format(s=schedule, t=round(a * h0, 6), f=round(b * h0, 6), n=steps)


def control(out: Path, *, quick: bool, seed: int, progress: bool, runs=None, steps=None):
    """Hold three target entropies with every controller; tracking error, overshoot and reward cost."""
    sz = size(quick, Size(8, 60), Size(32, 200), runs, steps)
    b = Bandit(n_prompts=16, horizon=4, vocab=10, n_correct=2, need=3)
    base = GRPOConfig(group_size=8, lr=lr_per_state(1.0, b), init_scale=1.0)
    G = base.group_size

    def run(rule: str | None, label: str) -> History:
        cfg = base if rule is None else replace(base, rule=make_rule(rule))
        return train(b, cfg, runs=sz.runs, steps=sz.steps, seed=seed, progress=progress and label)

    plain = run(None, "control none")
    h0 = float(plain.curves["entropy"][0].mean())
    targets, comparison, hists, chosen = {}, {}, {}, {}
    for tname in TARGETS:
        tcurve = target_curve(tname, h0, sz.steps)
        res = {"none": _scores(plain, tcurve, G)}
        hists[tname] = {"none": plain}
        for method, templates in CONTROL_METHODS.items():
            tried = []
            for i, tpl in enumerate(templates):
                spec = _spec(tpl, tname, h0, sz.steps)
                h = run(spec, f"control {tname} {method} {i + 1}/{len(templates)}")
                tried.append((_scores(h, tcurve, G), spec, h))
            best = min(tried, key=lambda x: x[0]["tracking_error"][0])
            res[method], hists[tname][method] = best[0], best[2]
            chosen.setdefault(tname, {})[method] = {
                "spec": best[1], "tried": {sp: sc["tracking_error"][0] for sc, sp, _ in tried}}
        targets[tname] = {m: {k: list(v) for k, v in r.items()} for m, r in res.items()}
        comparison[tname] = compare_to_best(res, "predictive", REACTIVE)
    summary = {"h0": h0, "config": {"bandit": repr(b), "base": repr(base)}, "results": targets["80%"],
               "targets": targets, "comparison": comparison, "chosen": chosen}  # fmt: skip
    table = [["target", "method", "tracking error |H − H*|", "overshoot", "reward", f"pass@{G}", "final H"]]
    for tname, res in targets.items():
        for method, r in res.items():
            keys = ("tracking_error", "overshoot", "reward", f"pass_at_{G}", "final_entropy")
            table.append([tname, method, *[pm(*r[k]) for k in keys]])
    for tname, c in comparison.items():
        table.append([tname, "predictive / " + c["best_reactive"], f"× {c['tracking_ratio']:.2f}", "",
                      f"{c['reward_difference']:+.3f}", "", ""])  # fmt: skip
    figs = [_figure(hists, h0, sz, G, out)]
    curves = {f"{t} | {m}": h.to_json() for t, hs in hists.items() for m, h in hs.items()}
    return ExperimentResult("control", summary, curves, figs, table)


def _figure(hists: dict[str, dict[str, History]], h0: float, sz: Size, G: int, out: Path) -> str:
    """One row per target: entropy with the target (dashed), reward, and what each controller set."""
    plt = pyplot()
    fig, axes = plt.subplots(len(hists), 3, figsize=(18, 4.6 * len(hists)), layout="constrained",
                             squeeze=False)  # fmt: skip
    for row, (tname, hs) in zip(axes, hists.items(), strict=True):
        for i, (method, h) in enumerate(hs.items()):
            band(row[0], h.steps, h.curves["entropy"], method, f"C{i}")
            band(row[1], h.steps, h.curves["reward"], method, f"C{i}")
        row[0].plot(np.arange(sz.steps), target_curve(tname, h0, sz.steps), "k--", lw=1.2, label="target H*")
        row[0].set(xlabel="step", ylabel="mean entropy (nats)", title=f"target {tname}: entropy")
        row[1].set(xlabel="step", ylabel="mean reward", title=f"target {tname}: reward")
        row[0].legend(fontsize=8)
        ax = row[2]
        acts = [("adaptive_bonus", "rule/coef", "adaptive bonus: coefficient"),
                ("predictive", "rule/coef", "predictive: bonus coefficient"),
                ("pi_weights", "rule/w_pos", "PI: positive-sample weight"),
                ("predictive_weights", "rule/w_pos_high", "predictive (weights): w_pos_high")]  # fmt: skip
        colour = {method: f"C{i}" for i, method in enumerate(hs)}  # as in the first two panels
        for method, key, label in acts:
            h = hs[method]
            if key in h.diag:
                m, ci = mean_ci(h.diag[key], axis=1)
                ax.plot(h.diag_steps, m, color=colour[method], label=label)
                ax.fill_between(h.diag_steps, m - ci, m + ci, color=colour[method], alpha=0.18, lw=0)
        ax.set(xlabel="step", ylabel="coefficient / weight",
               title=f"target {tname}: what the controllers set")  # fmt: skip
        ax.legend(fontsize=8)
    fig.suptitle(f"holding an entropy target on a sequence bandit (M=16, T=4, V=10), {sz.runs} seeds, "
                 f"mean ± 95% CI; H0 = {h0:.3f} nats")  # fmt: skip
    return save_figure(fig, out, "control.png")
