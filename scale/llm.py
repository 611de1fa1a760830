"""Paper 1's checks on a real language model: ``entdyn llm NAME [--model M] [--quick] [--out DIR]``.

The toy (``entdyn toy``, :mod:`toy.experiments`) checks every claim against exact simulation; these
experiments ask the same questions of a Hugging Face model trained by this project's GRPO trainer. They
drive :mod:`scale.train` itself (no copy of the loop): each *update* is :func:`scale.train.loop.compute_step`
on a run built by :func:`scale.train.setup.build_run` (the same rollout for the same seed, since the
sampler's stream is seeded by ``(seed, step)``), each *run* is :func:`scale.train.train`. The trainer's
diagnostics give, per update, the measured entropy change of the batch's tokens, the network-level
first-order prediction (a JVP along the realised parameter change) and the tabular (E6) sum.

Like the toy's, each experiment writes ``summary.json``, ``curves.json``, PNG figures and ``table.md`` into
``--out`` (:func:`theory.reporting.write_report`) and prints its table. Experiments (:data:`EXPERIMENTS`):

``quadrants``
    arXiv 2602.03392 §7.3: from the model as loaded and one rollout batch per seed, one update that keeps
    only one quadrant's tokens (:class:`theory.rules.QuadrantMask`, by the deviation ``S* - E_p[S]`` and by
    ``S*``); does the measured entropy move the way :data:`theory.QUADRANT_DH_SIGN` says, how close is
    the JVP, does the tabular sum have the measured sign?
``first-order``
    A run of ``--steps`` diagnosed steps: JVP and tabular vs measured per step (R², slope, sign
    agreement); and, on one batch, the residual ``|measured - JVP|`` against the learning rate (log-log
    slope about 2: the JVP is exact to first order).
``attribution``
    The network-level share of each quadrant in one update's entropy change: the JVP of the update that
    the quadrant's tokens alone produce. Under plain SGD with a fixed loss normaliser (``constant``
    aggregation, no gradient clipping) the update is linear in the tokens, so the four parts sum to the
    full JVP (to rounding); under AdamW the sum's gap is reported.
``rules``
    Plain GRPO vs Clip_B, Clip_V, Clip-Cov, KL-Cov, an entropy bonus and clip-higher on the same seeds:
    entropy, reward and held-out pass@k curves (mean ± 95 % CI over seeds) and the rules' clip fractions.
``control``
    Holding 80 % of the first batch's entropy: no control, the adaptive bonus, PI weights and the
    predictive controller (:mod:`scale.llm_control`).

Sizes: ``--quick`` is a small version for CI (``--model tiny``: seconds); the defaults are sized so that
``quadrants`` and ``first-order`` take minutes on 2 CPU cores with SmolLM2-135M (``docs/llm.md``).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from theory import reporting as rep
from theory.discriminator import QUADRANT_DH_SIGN, QUADRANTS

__all__ = ["EXPERIMENTS", "Options", "main", "run_experiment"]

TASK = "arithmetic:digits=1,ops=1,n_train=200,n_eval=50"  #: the task every experiment trains on


@dataclass
class Options:
    """What the command line sets (``entdyn llm --help``); ``None`` sizes take the experiment's default."""

    model: str = "smollm2-135m"
    quick: bool = False
    seeds: int | None = None
    steps: int | None = None
    lr: float | None = None
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    progress: bool = True
    task: str = TASK
    reward: str = "auto"

    def command(self, name: str) -> str:
        """The ``entdyn llm`` command line that runs experiment ``name`` with these options."""
        parts = ["entdyn", "llm", name, "--model", self.model]
        flags = (("--seeds", self.seeds, None), ("--steps", self.steps, None), ("--lr", self.lr, None),
                 ("--seed", self.seed, 0), ("--device", self.device, "cpu"),
                 ("--threads", self.threads, None), ("--task", self.task, TASK),
                 ("--reward", self.reward, "auto"))  # fmt: skip
        for flag, value, default in flags:
            if value != default:
                parts += [flag, str(value)]
        return " ".join(parts + (["--quick"] if self.quick else []))

    def reward_fn(self) -> Callable[[str, Any], float] | None:
        """The reward: ``task`` = the task's own correctness reward; ``digits`` = the share of digit
        characters in the completion (dense: any model, even a random one, gets a spread of rewards);
        ``auto`` = ``digits`` for the random ``tiny`` model (it never solves a problem, so nothing would
        move), else ``task``."""
        if self.reward not in ("auto", "task", "digits"):
            raise ValueError(f"--reward must be auto, task or digits, got {self.reward!r}")
        if self.reward == "digits" or (self.reward == "auto" and self.model == "tiny"):
            return digit_share
        return None


def digit_share(completion: str, problem: Any) -> float:
    """Share of digit characters in ``completion`` (0 for an empty one): the ``digits`` reward."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


@dataclass
class Result:
    summary: dict
    curves: dict
    figures: list[str] = field(default_factory=list)
    table: list[list[str]] = field(default_factory=list)  # first row: header


def _size(opts: Options, quick: tuple[int, int], full: tuple[int, int]) -> tuple[int, int]:
    """``(seeds, steps)``: the command line's, else the experiment's quick or full default."""
    seeds, steps = quick if opts.quick else full
    return opts.seeds or seeds, opts.steps or steps


def _config(opts: Options, out: Path, *, seed: int, rule: str = "none", steps: int = 1, **sections):
    """The trainer's configuration of one update or run: the experiment's model, task and sizes, the
    diagnostics every step, no eval, no checkpoints on the way, nothing printed."""
    from .flags import config_from_dict

    tiny = opts.quick or opts.model == "tiny"
    data: dict[str, dict[str, Any]] = {
        "model": {"name": opts.model, "device": opts.device},
        "task": {"spec": opts.task},
        "rollout": {"prompts": 2 if tiny else 4, "group_size": 4 if tiny else 8,
                    "max_new_tokens": 8 if tiny else 16},
        "optim": {"lr": opts.lr or 1e-5},
        "rule": {"spec": rule},
        "diag": {"diag_every": 1, "samples_per_step": 0},
        "eval": {"eval_every": 0},
        "run": {"steps": steps, "seed": seed, "out": str(out), "save_every": 0, "progress": "off",
                "tensorboard": False, "threads": opts.threads, "overwrite": True},
    }  # fmt: skip
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


def _say(opts: Options, message: str) -> None:
    if opts.progress:
        print(message, file=sys.stderr, flush=True)


def one_update(cfg, reward_fn=None) -> dict[str, Any]:
    """Build the run of ``cfg`` (the model as loaded) and apply one GRPO step to it; returns the step's
    metrics plus ``batch`` (a digest of the sampled tokens: equal digests = the identical batch),
    ``kept`` (response tokens the update used) and ``wall_s``."""
    import torch

    from .train.loop import compute_step
    from .train.setup import build_run

    t0 = time.perf_counter()
    run = build_run(cfg, reward_fn)
    b, floats = compute_step(run)
    mask = b.ro.mask
    keep = mask if b.rule_out is None else (b.rule_out.keep & mask)
    digest = hashlib.sha256(b.ro.response.cpu().numpy().tobytes()).hexdigest()[:16]
    floats.update(batch=digest, kept=int(keep.sum()), tokens=int(mask.sum()),
                  kept_adv_nonzero=int((keep & (b.adv_eff != 0)).sum()),
                  adv_nonzero=int((mask & (b.adv != 0)).sum()), wall_s=time.perf_counter() - t0)
    del run, b
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return floats


def _sign(x: float | None) -> int:
    return 0 if x is None or x == 0 else (1 if x > 0 else -1)


def _frac(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


# ------------------------------------------------------------------------------------------ quadrants


ROW_KEYS = ("theory/dH_measured", "theory/dH_jvp", "theory/dH_tabular", "kept", "kept_adv_nonzero", "tokens",
            "wall_s")  # fmt: skip


def _seeds(opts: Options, n: int, skipped: list[int]):
    """Seeds from ``opts.seed`` on until ``n`` of them carried a learning signal (at most ``3 n`` tried).
    The caller appends to ``skipped`` each seed whose batch had none: every group got one reward, so
    every advantage is 0 and no update can move anything."""
    seed = opts.seed
    while seed < opts.seed + 3 * n and (seed - opts.seed) - len(skipped) < n:
        yield seed
        seed += 1


def quadrants(opts: Options, out: Path) -> Result:
    """One update per quadrant and score from the model as loaded, on each seed's batch."""
    seeds, _ = _size(opts, (2, 1), (3, 1))
    rows: list[dict[str, Any]] = []
    skipped: list[int] = []
    for seed in _seeds(opts, seeds, skipped):
        first = None  # the seed's first update: its batch digest, its advantages
        for by in ("deviation", "s_star"):
            for q in QUADRANTS:
                rule = f"quadrant_mask:keep={q},by={by}"
                m = one_update(_config(opts, out / "scratch", seed=seed, rule=rule), opts.reward_fn())
                if first is None:
                    first = m
                    if m["adv_nonzero"] == 0:
                        break
                same = m["batch"] == first["batch"]
                rows.append({"seed": seed, "quadrant": q, "by": by, "same_batch": same,
                             **{k: m.get(k) for k in ROW_KEYS}})  # fmt: skip
                theory_sign = "+" if QUADRANT_DH_SIGN[q] > 0 else "-"
                _say(opts, f"llm quadrants: seed {seed} keep {q} by {by}: kept {m['kept']}/{m['tokens']}, "
                           f"dH {m['theory/dH_measured']:+.3e} (theory {theory_sign}), "
                           f"JVP {m['theory/dH_jvp']:+.3e} ({m['wall_s']:.1f} s)")  # fmt: skip
            if first["adv_nonzero"] == 0:
                break
        if first["adv_nonzero"] == 0:
            skipped.append(seed)
    return _quadrant_result(rows, seeds, skipped, out)


def _quadrant_result(rows: list[dict], seeds: int, skipped: list[int], out: Path) -> Result:
    used = [r for r in rows if r["kept_adv_nonzero"] > 0]  # an empty quadrant makes no update
    summary: dict[str, Any] = {"seeds": seeds, "seeds_skipped": skipped, "updates": len(rows),
                               "updates_with_tokens": len(used),
                               "identical_batches": all(r["same_batch"] for r in rows)}  # fmt: skip
    table = [["kept quadrant", "by", "theory", "measured ΔH (mean ± 95% CI)", "sign agrees",
              "JVP / measured", "tabular sign = measured"]]  # fmt: skip
    for by in ("deviation", "s_star"):
        sel = [r for r in used if r["by"] == by]
        suffix = "" if by == "deviation" else "_s_star"
        summary["quadrant_sign_agreement" + suffix] = _frac(
            [_sign(r["theory/dH_measured"]) == QUADRANT_DH_SIGN[r["quadrant"]] for r in sel])
        for q in QUADRANTS:
            qs = [r for r in sel if r["quadrant"] == q]
            dh = np.array([r["theory/dH_measured"] for r in qs])
            m, h = rep.mean_ci(dh) if len(dh) else (np.nan, np.nan)
            ratio = [r["theory/dH_jvp"] / r["theory/dH_measured"] for r in qs if r["theory/dH_measured"]]
            med = rep.median_iqr(np.array(ratio))[0] if ratio else float("nan")
            agree = _frac([_sign(r["theory/dH_measured"]) == QUADRANT_DH_SIGN[q] for r in qs])
            tab = _frac([_sign(r["theory/dH_tabular"]) == _sign(r["theory/dH_measured"]) for r in qs])
            summary[f"dH_measured/{q}/{by}"] = [float(m), float(h)]
            table.append([q, by, "up" if QUADRANT_DH_SIGN[q] > 0 else "down",
                          rep.pm(float(m), float(h), "+.2e"), _fmt(agree), _fmt(med), _fmt(tab)])  # fmt: skip
    ratios = np.array([r["theory/dH_jvp"] / r["theory/dH_measured"] for r in used
                       if r["theory/dH_measured"]])  # fmt: skip
    med, lo, hi = rep.median_iqr(ratios)
    summary["jvp_over_measured"] = {"median": med, "iqr": [lo, hi]}
    summary["tabular_sign_agreement"] = _frac(
        [_sign(r["theory/dH_tabular"]) == _sign(r["theory/dH_measured"]) for r in used])
    tab_ratio = [abs(r["theory/dH_tabular"] / r["theory/dH_measured"]) for r in used
                 if r["theory/dH_measured"]]  # fmt: skip
    summary["tabular_over_measured_median"] = rep.median_iqr(np.array(tab_ratio))[0]
    table.append(["agreement (deviation)", "", "", "", _fmt(summary["quadrant_sign_agreement"]), "", ""])
    table.append(["agreement (S*)", "", "", "", _fmt(summary["quadrant_sign_agreement_s_star"]), "", ""])
    table.append(["JVP / measured, all", "", "", "", "", f"{med:.3f} [{lo:.3f}, {hi:.3f}]", ""])
    figs = [_quadrant_figure(used, out)]
    return Result(summary, {"updates": rows}, figs, table)


def _fmt(x: float | None) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _quadrant_figure(rows: list[dict], out: Path) -> str:
    plt = rep.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    colors = dict(zip(QUADRANTS, ["C3", "C1", "C0", "C2"], strict=True))
    for i, by in enumerate(("deviation", "s_star")):
        for j, q in enumerate(QUADRANTS):
            ys = [r["theory/dH_measured"] for r in rows if r["by"] == by and r["quadrant"] == q]
            axes[0].scatter(np.full(len(ys), j + 0.15 * (2 * i - 1)), ys, color=colors[q],
                            marker="o" if by == "deviation" else "x", label=f"{q} by {by}")  # fmt: skip
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set_xticks(range(4), [f"{q}\n(theory {'↑' if QUADRANT_DH_SIGN[q] > 0 else '↓'})"
                                  for q in QUADRANTS])  # fmt: skip
    axes[0].set(ylabel="measured ΔH of the batch's tokens (nats)", title="one update keeping one quadrant")
    axes[0].legend(fontsize=7, ncol=2)
    meas = np.array([r["theory/dH_measured"] for r in rows])
    jvp = np.array([r["theory/dH_jvp"] for r in rows])
    axes[1].scatter(meas, jvp, c=[colors[r["quadrant"]] for r in rows], s=18)
    lim = float(np.max(np.abs(np.concatenate([meas, jvp])))) if len(meas) else 1.0
    axes[1].plot([-lim, lim], [-lim, lim], "k--", lw=0.8, label="JVP = measured")
    axes[1].set(xlabel="measured ΔH", ylabel="JVP (network first order)", title="prediction vs measurement")
    axes[1].legend(fontsize=8)
    return rep.save_figure(fig, out, "quadrants.png")


# ---------------------------------------------------------------------------------------- first-order


#: the learning rates of the sweep, as multiples of the run's lr (both ways: where the residual is second
#: order depends on the model; AdamW's first step, about lr * sign(g) for every weight, is large)
LR_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
#: residuals below this (nats) are float32 rounding of the re-scored entropies, not the second order
RESIDUAL_FLOOR = 1e-6


def first_order(opts: Options, out: Path) -> Result:
    """A run of diagnosed steps, then a learning-rate sweep of one update on one batch."""
    from .metrics_log import read_metrics
    from .train import train

    _, steps = _size(opts, (1, 4), (1, 30))
    t0 = time.perf_counter()
    cfg = _config(opts, out / "run", seed=opts.seed, steps=steps,
                  run={"progress": "log" if opts.progress else "off"})  # fmt: skip
    train(cfg, reward_fn=opts.reward_fn())
    rows = read_metrics(out / "run")
    _say(opts, f"llm first-order: {steps} steps in {time.perf_counter() - t0:.1f} s")
    meas = np.array([r["theory/dH_measured"] for r in rows])
    jvp = np.array([r["theory/dH_jvp"] for r in rows])
    tab = np.array([r["theory/dH_tabular"] for r in rows])
    base_lr = cfg.optim.lr
    sweep = []
    for f in LR_FACTORS:
        cfg_f = _config(opts, out / "scratch", seed=opts.seed, optim={"lr": base_lr * f})
        m = one_update(cfg_f, opts.reward_fn())
        sweep.append({"lr": base_lr * f, "measured": m["theory/dH_measured"], "jvp": m["theory/dH_jvp"],
                      "residual": abs(m["theory/dH_measured"] - m["theory/dH_jvp"])})  # fmt: skip
        _say(opts, f"llm first-order: lr {base_lr * f:.2e}: dH {m['theory/dH_measured']:+.3e}, JVP "
                   f"{m['theory/dH_jvp']:+.3e} ({m['wall_s']:.1f} s)")  # fmt: skip
    lrs = np.array([s["lr"] for s in sweep])
    res = np.array([s["residual"] for s in sweep])
    ok = res > RESIDUAL_FLOOR
    slope_fit = float(np.dot(jvp, meas) / np.dot(meas, meas)) if np.dot(meas, meas) > 0 else float("nan")
    summary = {
        "steps": steps, "r2_jvp": rep.r2(meas, jvp), "slope_jvp_vs_measured": slope_fit,
        "jvp_sign_agreement": float(np.mean(np.sign(jvp) == np.sign(meas))),
        "tabular_sign_agreement": float(np.mean(np.sign(tab) == np.sign(meas))),
        "jvp_over_measured": dict(zip(("median", "q25", "q75"),
                                      rep.median_iqr(jvp / np.where(meas == 0, np.nan, meas)), strict=True)),
        "residual_lr_slope": rep.loglog_slope(lrs[ok], res[ok]) if ok.sum() >= 2 else float("nan"),
        "residual_local_slopes": [rep.loglog_slope(lrs[i : i + 2], res[i : i + 2]) if ok[i] and ok[i + 1]
                                  else None for i in range(len(lrs) - 1)],  # fmt: skip
        "lr_sweep": sweep,
    }  # fmt: skip
    table = [["quantity", "value"], ["steps", str(steps)], ["R² (JVP vs measured)", _fmt(summary["r2_jvp"])],
             ["slope (JVP on measured, through 0)", _fmt(slope_fit)],
             ["JVP sign agreement", _fmt(summary["jvp_sign_agreement"])],
             ["tabular sign agreement", _fmt(summary["tabular_sign_agreement"])],
             ["residual vs lr, log-log slope (≈ 2)", _fmt(summary["residual_lr_slope"])],
             ["local slopes, lr ascending",
              " ".join(_fmt(x) for x in summary["residual_local_slopes"])]]  # fmt: skip
    curves = {"step": [r["step"] for r in rows], "measured": meas, "jvp": jvp, "tabular": tab,
              "entropy": [r.get("entropy") for r in rows],
              "reward": [r.get("reward/mean") for r in rows]}  # fmt: skip
    figs = [_first_order_figure(curves, lrs, res, out)]
    return Result(summary, curves, figs, table)


def _first_order_figure(c: dict, lrs: np.ndarray, res: np.ndarray, out: Path) -> str:
    plt = rep.pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.6), layout="constrained")
    ax[0].plot(c["step"], c["measured"], "k-o", ms=3, label="measured")
    ax[0].plot(c["step"], c["jvp"], "C0--", label="JVP (network first order)")
    ax[0].set(xlabel="step", ylabel="ΔH of the step's tokens (nats)", title="per-step entropy change")
    ax[0].legend(fontsize=8)
    lim = float(np.max(np.abs(np.concatenate([c["measured"], c["jvp"]])))) or 1.0
    ax[1].scatter(c["measured"], c["jvp"], s=14)
    ax[1].plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
    ax[1].set(xlabel="measured ΔH", ylabel="JVP", title="JVP vs measured")
    ok = res > RESIDUAL_FLOOR
    ax[2].axhline(RESIDUAL_FLOOR, color="0.6", ls="--", lw=0.8, label="float32 floor")
    ax[2].loglog(lrs[ok], res[ok], "o-", label="|measured − JVP|")
    if ok.sum() >= 1:
        ref = res[ok][0] * (lrs[ok] / lrs[ok][0]) ** 2
        ax[2].loglog(lrs[ok], ref, "k:", label="slope 2")
    ax[2].set(xlabel="learning rate", ylabel="residual", title="second-order residual (one batch)")
    ax[2].legend(fontsize=8)
    return rep.save_figure(fig, out, "first_order.png")


# ---------------------------------------------------------------------------------------- attribution


def attribution(opts: Options, out: Path) -> Result:
    """Each quadrant's JVP share of one update, under SGD (exact sum) and AdamW (the sum's gap)."""
    seeds, _ = _size(opts, (1, 1), (2, 1))
    base_lr = opts.lr or 1e-5
    sgd = {"optimizer": "sgd", "max_grad_norm": None, "lr": base_lr * 1000}  # plain SGD steps are far smaller
    optims = {"sgd": sgd, "adamw": {"optimizer": "adamw"}}
    rows: list[dict[str, Any]] = []
    skipped: list[int] = []
    for seed in _seeds(opts, seeds, skipped):
        for oname, optim in optims.items():
            kw = {"optim": optim, "loss": {"aggregation": "constant"}}
            full = one_update(_config(opts, out / "scratch", seed=seed, **kw), opts.reward_fn())
            if full["adv_nonzero"] == 0:
                skipped.append(seed)
                break
            parts = {}
            for q in QUADRANTS:
                rule = f"quadrant_mask:keep={q},in_normaliser=true"
                cfg_q = _config(opts, out / "scratch", seed=seed, rule=rule, **kw)
                part = one_update(cfg_q, opts.reward_fn())
                parts[q] = part["theory/dH_jvp"]
            total = sum(parts.values())
            rows.append({"seed": seed, "optimizer": oname, "full_jvp": full["theory/dH_jvp"],
                         "full_measured": full["theory/dH_measured"], "parts": parts, "sum_of_parts": total,
                         "gap": abs(total - full["theory/dH_jvp"])
                                / max(abs(full["theory/dH_jvp"]), 1e-300)})  # fmt: skip
            _say(opts, f"llm attribution: seed {seed} {oname}: full JVP {full['theory/dH_jvp']:+.3e}, sum of "
                       f"quadrants {total:+.3e} (gap {rows[-1]['gap']:.1e})")  # fmt: skip
    summary: dict[str, Any] = {"seeds": seeds, "seeds_skipped": skipped}
    table = [["optimizer", *[f"{q} (nats)" for q in QUADRANTS], "full update (nats)", "Σ parts / full",
              "max rel. gap"]]  # fmt: skip
    for oname in optims:
        sel = [r for r in rows if r["optimizer"] == oname]
        parts = {q: rep.mean_ci(np.array([r["parts"][q] for r in sel])) for q in QUADRANTS}
        full = rep.mean_ci(np.array([r["full_jvp"] for r in sel]))
        pooled = sum(r["full_jvp"] for r in sel)  # shares of the pooled change, as the toy's (one update
        shares = {q: sum(r["parts"][q] for r in sel) / pooled if pooled else float("nan")  # per seed is
                  for q in QUADRANTS}  # a small difference of large parts: ill-conditioned)  # fmt: skip
        ratio = rep.mean_ci(np.array([r["sum_of_parts"] / r["full_jvp"] for r in sel]))
        gap = max(r["gap"] for r in sel)
        summary[oname] = {"parts": {q: [float(m), float(h)] for q, (m, h) in parts.items()},
                          "full": [float(full[0]), float(full[1])], "share": shares,
                          "sum_over_full": [float(ratio[0]), float(ratio[1])], "max_gap": gap}  # fmt: skip
        table.append([oname, *[rep.pm(float(m), float(h), "+.2e") for m, h in parts.values()],
                      rep.pm(float(full[0]), float(full[1]), "+.2e"),
                      rep.pm(float(ratio[0]), float(ratio[1]), ".4f"), f"{gap:.1e}"])  # fmt: skip
    summary["sum_gap_sgd"], summary["sum_gap_adamw"] = summary["sgd"]["max_gap"], summary["adamw"]["max_gap"]
    summary["quadrant_share_of_dH"] = summary["sgd"]["share"]
    return Result(summary, {"updates": rows}, [_attribution_figure(rows, out)], table)


def _attribution_figure(rows: list[dict], out: Path) -> str:
    plt = rep.pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained", sharey=False)
    for a, oname in zip(ax, ("sgd", "adamw"), strict=True):
        sel = [r for r in rows if r["optimizer"] == oname]
        for i, r in enumerate(sel):
            vals = [r["parts"][q] for q in QUADRANTS]
            a.bar(np.arange(4) + 0.8 * i / max(len(sel), 1), vals, width=0.8 / max(len(sel), 1),
                  color=["C3", "C1", "C0", "C2"], alpha=0.5 + 0.5 / (i + 1))  # fmt: skip
            a.axhline(r["full_jvp"], color="k", ls="--", lw=0.8)
        a.axhline(0, color="k", lw=0.5)
        a.set_xticks(range(4), QUADRANTS)
        a.set(ylabel="JVP of the quadrant's own update (nats)",
              title=f"{oname}: parts (bars) vs the full update's JVP (dashed)")  # fmt: skip
    return rep.save_figure(fig, out, "attribution.png")


# --------------------------------------------------------------------------------------------- rules

RULES = {  # name -> (rule spec, loss overrides)
    "grpo": ("none", {}),
    "clip_b": ("clip_b", {}),
    "clip_v": ("clip_v", {}),
    "clip_cov": ("clip_cov", {}),
    "kl_cov": ("kl_cov", {}),
    "entropy_bonus": ("entropy_bonus", {}),
    "clip_higher": ("none", {"clip_high": 0.28}),
}


def rules(opts: Options, out: Path) -> Result:
    """Each rule trained on the same seeds; entropy, reward and held-out pass@k curves."""
    from .metrics_log import read_metrics
    from .train import train

    seeds, steps = _size(opts, (2, 3), (3, 30))
    k = 4
    curves: dict[str, dict[str, list]] = {}
    for name, (spec, loss) in RULES.items():
        per_seed = []
        for s in range(seeds):
            t0 = time.perf_counter()
            run_dir = out / "runs" / f"{name}-seed{opts.seed + s}"
            ev = {"eval_every": max(1, steps // 3), "eval_k": k, "eval_problems": 8 if opts.quick else 16}
            cfg = _config(opts, run_dir, seed=opts.seed + s, rule=spec, steps=steps, loss=loss,
                          diag={"diag_every": 0}, eval=ev,
                          run={"progress": "log" if opts.progress else "off"})  # fmt: skip
            train(cfg, reward_fn=opts.reward_fn())
            per_seed.append(read_metrics(run_dir))
            _say(opts, f"llm rules: {name} seed {opts.seed + s}: {steps} steps in "
                       f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        curves[name] = _rule_curves(per_seed, k)
    return _rules_result(curves, seeds, steps, k, out)


def _rule_curves(per_seed: list[list[dict]], k: int) -> dict[str, Any]:
    """``(S, R)`` arrays of a rule's runs: entropy, reward, clip fraction; pass@k at the eval steps."""
    def col(key, rows):
        return [np.nan if r.get(key) is None else r[key] for r in rows]

    clip_keys = sorted({key for rows in per_seed for r in rows for key in r if key.endswith("clip_frac")})
    ev = [[r for r in rows if r.get(f"eval/pass@{k}") is not None] for rows in per_seed]
    return {
        "step": [r["step"] for r in per_seed[0]],
        "entropy": np.array([col("entropy", rows) for rows in per_seed]).T,
        "reward": np.array([col("reward/mean", rows) for rows in per_seed]).T,
        "clip_frac": (np.array([[sum(np.nan_to_num(r.get(c) or 0.0) for c in clip_keys) for r in rows]
                                for rows in per_seed]).T),  # fmt: skip
        "eval_step": [r["step"] for r in ev[0]],
        f"pass_at_{k}": np.array([col(f"eval/pass@{k}", rows) for rows in ev]).T,
    }


def _rules_result(curves: dict, seeds: int, steps: int, k: int, out: Path) -> Result:
    results = {}
    table = [["rule", "final entropy", "final reward", f"final pass@{k}", "mean reward", "clip frac"]]
    last = max(1, steps // 3)
    for name, c in curves.items():
        res = {
            "entropy": rep.mean_ci(np.nanmean(c["entropy"][-last:], axis=0), axis=0),
            "reward": rep.mean_ci(np.nanmean(c["reward"][-last:], axis=0), axis=0),
            f"pass_at_{k}": rep.mean_ci(c[f"pass_at_{k}"][-1], axis=0),
            "reward_auc": rep.mean_ci(np.nanmean(c["reward"], axis=0), axis=0),
            "clip_frac": rep.mean_ci(np.nanmean(c["clip_frac"], axis=0), axis=0),
        }
        results[name] = {key: [float(m), float(h)] for key, (m, h) in res.items()}
        table.append([name, *[rep.pm(*results[name][key]) for key in res]])
    plt = rep.pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(18, 5), layout="constrained")
    for i, (name, c) in enumerate(curves.items()):
        rep.band(ax[0], c["step"], c["entropy"], name, f"C{i}")
        rep.band(ax[1], c["step"], c["reward"], name, f"C{i}")
        rep.band(ax[2], c["eval_step"], c[f"pass_at_{k}"], name, f"C{i}")
    ax[0].set(xlabel="step", ylabel="mean entropy (nats)", title="entropy")
    ax[1].set(xlabel="step", ylabel="mean reward", title="reward")
    ax[2].set(xlabel="step", ylabel=f"held-out pass@{k}", title=f"pass@{k}")
    ax[0].legend(fontsize=8)
    fig.suptitle(f"rules on a real model, {seeds} seeds, mean ± 95% CI")
    figs = [rep.save_figure(fig, out, "rules.png")]
    return Result({"seeds": seeds, "steps": steps, "results": results}, curves, figs, table)


# ------------------------------------------------------------------------------------------- running

EXPERIMENTS: dict[str, Callable[[Options, Path], Result]] = {
    "quadrants": quadrants,
    "first-order": first_order,
    "attribution": attribution,
    "rules": rules,
    "control": lambda opts, out: _control(opts, out),
}


def _control(opts: Options, out: Path) -> Result:
    from .llm_control import control  # its own module (it imports this one)

    return control(opts, out)


def run_experiment(name: str, out: str | Path, opts: Options, *, echo: bool = True) -> Result:
    """Run experiment ``name`` with ``opts`` and write its files into ``out`` (created if needed)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    for what, v in (("seeds", opts.seeds), ("steps", opts.steps)):
        if v is not None and v < 1:
            raise ValueError(f"--{what} must be >= 1, got {v!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    t0 = time.perf_counter()
    res = EXPERIMENTS[name](opts, out)
    wall = time.perf_counter() - t0
    res.summary = {"experiment": name, "model": opts.model, "quick": opts.quick, "seed": opts.seed,
                   "task": opts.task, "lr": opts.lr, "command": opts.command(name), "wall_s": round(wall, 2),
                   "figures": res.figures, **res.summary}  # fmt: skip
    title = f"llm experiment `{name}` ({opts.model})"
    table = rep.write_report(out, title, res.summary, res.curves, res.table)
    if echo:
        print(f"\n== llm {name} ({opts.model}{', quick' if opts.quick else ''}, {wall:.1f} s) ==")
        print(table)
        print(f"-> {out}/summary.json, curves.json, " + ", ".join(res.figures))
    return res


def main(names: list[str], out: str | Path, opts: Options) -> int:
    """``entdyn llm``: run each named experiment (``all``: every one) into ``out/<name>``."""
    names = list(EXPERIMENTS) if names == ["all"] else names
    bad = [n for n in names if n not in EXPERIMENTS]
    if bad:
        raise ValueError(f"unknown experiment(s) {', '.join(map(repr, bad))}; choose from "
                         f"{', '.join(EXPERIMENTS)} or 'all'")  # fmt: skip
    for n in names:
        run_experiment(n, Path(out) if len(names) == 1 else Path(out) / n, opts)
    return 0
