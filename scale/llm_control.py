"""``entdyn llm control``: holding a target entropy on a real model, reactive vs predictive.

The real-model version of the toy's ``control`` experiment (:mod:`toy.control`, docs/toy.md): from the
model as loaded, each seed trains ``--steps`` steps with no control, TRL's adaptive entropy bonus
(``entropy_bonus:adaptive=true``), EntroPIC-style PI weights (``entropic_pi``) and the predictive
controller (:class:`theory.rules.EntropyTarget`, bonus actuator, defaults). The target is 80 % of the
entropy of the seed's first batch (the same batch for every method: the sampler's stream is seeded by
``(seed, step)`` and the model is the one loaded), measured by the plain run. The trainer feeds the
measured entropy change of its diagnostic steps (every ``DIAG_EVERY`` steps) into the controller's
calibration. Default learning rate 2e-5 (``--lr``): at 1e-5 SmolLM2's entropy barely moves in 40 steps.

The reactive baselines use the settings that tracked best on the toy (``delta = 0.05``; ``kp = 20``,
``ki = 2``), not tuned on the model. Per seed: ``tracking_error`` = mean ``|H − H*|`` over the steps after
the first fifth, ``overshoot`` = ``max(0, max_t H* − H_t)``, ``reward`` = the mean reward over the last
fifth, ``pass_at_4`` = held-out pass@4 after the last step; ``summary["results"][method]`` each as
[mean, 95 % CI] over seeds (a CI needs two seeds; with one the half-width is 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from theory import reporting as rep

__all__ = ["control", "METHODS", "TARGET_FRACTION", "DIAG_EVERY"]

TARGET_FRACTION = 0.8  #: the target: this fraction of the seed's first-batch entropy
DIAG_EVERY = 4  #: the runs' diagnostic period (the calibration feedback); 1 with --quick
METHODS = {  # name -> rule spec; {t}: the target (nats)
    "none": "none",
    "adaptive_bonus": "entropy_bonus:adaptive=true,coef=0.0,delta=0.05,target={t}",
    "pi_weights": "entropic_pi:schedule=constant,target={t},kp=20.0,ki=2.0",
    "predictive": "entropy_target:schedule=constant,target={t}",
}
_ACTUATOR = {"adaptive_bonus": "rule/coef", "pi_weights": "rule/w_pos", "predictive": "rule/coef"}


def control(opts, out: Path):
    """Each method trained on the same seeds toward ``TARGET_FRACTION`` of the first batch's entropy."""
    from . import llm
    from .metrics_log import read_metrics
    from .train import train

    seeds, steps = llm._size(opts, (1, 4), (1, 40))
    k = 4
    rows: dict[str, list[list[dict]]] = {m: [] for m in METHODS}
    targets = []
    for s in range(seeds):
        seed = opts.seed + s
        target = None
        for method, spec in METHODS.items():
            if method != "none" and target is None:
                target = TARGET_FRACTION * rows["none"][-1][0]["entropy"]
                targets.append(target)
            run_dir = out / "runs" / f"{method}-seed{seed}"
            rule = spec if target is None else spec.format(t=round(target, 6))
            cfg = llm._config(
                opts, run_dir, seed=seed, rule=rule, steps=steps, optim={"lr": opts.lr or 2e-5},
                diag={"diag_every": 1 if opts.quick else DIAG_EVERY, "jvp": False},
                eval={"eval_every": steps, "eval_k": k, "eval_problems": 8 if opts.quick else 16},
                run={"progress": "log" if opts.progress else "off"},
            )  # fmt: skip
            train(cfg, reward_fn=opts.reward_fn())
            rows[method].append(read_metrics(run_dir))
            llm._say(opts, f"llm control: {method} seed {seed}: {steps} steps")
    return _result(rows, np.asarray(targets), steps, k, out)


def _col(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows])


def _result(rows: dict[str, list[list[dict]]], targets: np.ndarray, steps: int, k: int, out: Path):
    from .llm import Result

    warm, last = steps // 5, max(1, steps // 5)
    results, curves = {}, {"target": targets.tolist()}
    table = [["method", "tracking error |H − H*|", "overshoot", "reward", f"pass@{k}", "final H"]]
    for method, per_seed in rows.items():
        H = np.stack([_col(r, "entropy") for r in per_seed], axis=1)  # (S, seeds)
        R = np.stack([_col(r, "reward/mean") for r in per_seed], axis=1)
        pk = np.array([_col(r, f"eval/pass@{k}")[-1] for r in per_seed])
        per = {
            **rep.tracking(H, targets, warm),
            "reward": np.nanmean(R[-last:], axis=0),
            f"pass_at_{k}": pk,
            "final_entropy": np.nanmean(H[-last:], axis=0),
        }
        results[method] = {key: [float(x) for x in rep.mean_ci(v, axis=0)] for key, v in per.items()}
        curves[method] = {"entropy": H, "reward": R}
        if method in _ACTUATOR:
            curves[method]["actuator"] = np.stack([_col(r, _ACTUATOR[method]) for r in per_seed], axis=1)
        table.append([method, *[rep.pm(*results[method][key]) for key in per]])
    comparison = rep.compare_to_best(results, "predictive", ("adaptive_bonus", "pi_weights"))
    best = comparison["best_reactive"]
    table.append([f"predictive / {best}", f"× {comparison['tracking_ratio']:.2f}", "",
                  f"{comparison['reward_difference']:+.3f}", "", ""])  # fmt: skip
    summary = {"seeds": len(targets), "steps": steps, "target_fraction": TARGET_FRACTION,
               "targets": targets.tolist(), "methods": METHODS, "results": results,
               "comparison": comparison}  # fmt: skip
    return Result(summary, curves, [_figure(curves, targets, out)], table)


def _figure(curves: dict, targets: np.ndarray, out: Path) -> str:
    plt = rep.pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(18, 5), layout="constrained")
    for i, method in enumerate(METHODS):
        c = curves[method]
        x = np.arange(1, c["entropy"].shape[0] + 1)
        rep.band(ax[0], x, c["entropy"], method, f"C{i}")
        rep.band(ax[1], x, c["reward"], method, f"C{i}")
        if "actuator" in c:
            rep.band(ax[2], x, c["actuator"], f"{method}: {_ACTUATOR[method]}", f"C{i}")
    ax[0].axhline(float(np.mean(targets)), color="k", ls="--", lw=1.2, label="target H* (mean over seeds)")
    ax[0].set(xlabel="step", ylabel="mean entropy of the batch (nats)", title="entropy")
    ax[1].set(xlabel="step", ylabel="mean reward", title="reward")
    ax[2].set(xlabel="step", ylabel="coefficient / weight", title="what the controllers set")
    ax[0].legend(fontsize=8)
    ax[2].legend(fontsize=8)
    fig.suptitle(f"holding {TARGET_FRACTION:.0%} of the first batch's entropy on a real model, "
                 f"{len(targets)} seed(s), mean ± 95% CI")  # fmt: skip
    return rep.save_figure(fig, out, "control.png")
