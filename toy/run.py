"""Training loops over many seeds at once, with curves, confidence intervals and a progress bar.

:func:`train` runs :func:`toy.grpo.step` ``steps`` times for ``runs`` independent seeds and returns a
:class:`History`: the cheap per-step curves ``(S, R)`` (``entropy_by_pos``: ``(S, R, T)``), the theory
diagnostics every ``diag_every`` steps ``(D, R)``, and the rising/plateau stage of the *mean* run
(:class:`theory.rules.StageDetector` over the runs' mean entropy and accuracy; the stage is shared by all
runs, which are seeds of one configuration, and is what a stage-gated rule sees).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from theory.reporting import mean_ci, t_quantile_975
from theory.rules import StageDetector

from .bandit import Bandit
from .grpo import GRPOConfig, init_state, is_diagnostic, step
from .progress import Progress

__all__ = ["History", "train", "mean_ci", "t_quantile_975"]  # (the last two from theory.reporting)


@dataclass
class History:
    """What :func:`train` recorded. Arrays are float64; the run axis is axis 1."""

    steps: np.ndarray  # (S,) step index of each per-step row
    curves: dict[str, np.ndarray]  # (S, R) cheap metrics every step
    diag_steps: np.ndarray  # (D,) step index of each diagnostics row
    diag: dict[str, np.ndarray]  # (D, R) theory diagnostics
    plateau: np.ndarray  # (S,) bool: the detector's stage after each step
    plateau_step: int | None
    wall_s: float
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """A JSON-ready dict: every curve as mean and 95% CI half-width over runs, plus raw runs."""
        out: dict = {"meta": self.meta, "steps": self.steps.tolist(), "diag_steps": self.diag_steps.tolist(),
                     "plateau_step": self.plateau_step, "curves": {}, "diag": {}}
        for src, dst in ((self.curves, out["curves"]), (self.diag, out["diag"])):
            for k, v in src.items():
                m, h = mean_ci(v, axis=1)
                dst[k] = {"mean": _round(m), "ci95": _round(h)}
        return out


def _round(x: np.ndarray) -> list:
    return np.round(np.asarray(x, dtype=np.float64), 8).tolist()


def train(
    bandit: Bandit,
    cfg: GRPOConfig,
    *,
    runs: int,
    steps: int,
    seed: int = 0,
    diag_every: int = 1,
    detector: StageDetector | None = None,
    progress: bool | str = False,
) -> History:
    """Train ``runs`` seeds for ``steps`` steps; theory diagnostics every ``diag_every`` steps (0: never).

    ``detector`` (default: a :class:`~theory.rules.StageDetector` with ``window = max(10, steps // 10)``)
    tracks the stage; the state's stage is passed to the rules each step. ``progress``: False, True or a
    label for the progress bar.
    """
    if not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if diag_every < 0:
        raise ValueError(f"diag_every must be >= 0, got {diag_every!r}")
    detector = detector or StageDetector(window=max(10, steps // 10))
    stage = detector.init()
    state = init_state(bandit, cfg, runs=runs, seed=seed)
    table = bandit.correct_table()
    rows: dict[str, list] = {}
    drows: dict[str, list] = {}
    dsteps, plateau = [], []
    label = progress if isinstance(progress, str) else "toy"
    t0 = time.perf_counter()
    with Progress(steps, label, enabled=bool(progress)) as bar:
        for s in range(steps):
            do_diag = diag_every > 0 and s % diag_every == 0
            d = step(bandit, cfg, state, table=table, diagnostics=do_diag)
            for k, v in d.items():
                (drows if do_diag and is_diagnostic(k) else rows).setdefault(k, []).append(v)
            if do_diag:
                dsteps.append(s)
            stage = detector.update(stage, float(d["entropy"].mean()), float(d["accuracy"].mean()))
            state.stage = stage.stage
            plateau.append(stage.stage == "plateau")
            bar.update(1, H=d["entropy"].mean(), R=d["reward"].mean())
    wall = time.perf_counter() - t0
    curves = {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}
    diag = {k: np.asarray(v, dtype=np.float64) for k, v in drows.items()}
    meta = {"runs": runs, "steps": steps, "seed": seed, "diag_every": diag_every,
            "bandit": repr(bandit), "config": repr(cfg), "wall_s": round(wall, 3)}
    return History(np.arange(steps), curves, np.asarray(dsteps, dtype=np.int64), diag,
                   np.asarray(plateau), stage.plateau_step, wall, meta)
