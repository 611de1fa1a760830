"""Reporting helpers of the toy experiments (:mod:`toy.experiments`) and the demo (:mod:`toy.demo`):
the result type and sizes of an experiment and the mean ± CI cells of the comparison tables. The generic
pieces (fit statistics, markdown tables, strict JSON) live in :mod:`theory.reporting`, shared with the
real-model experiments, and are re-exported here.

No plotting (:mod:`toy.plotting`) and no state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from theory.reporting import format_table, jsonable, loglog_slope, pm, r2

from .bandit import Bandit
from .run import History, mean_ci

__all__ = ["ExperimentResult", "Size", "size", "lr_per_state",
           "r2", "loglog_slope", "pm", "final", "outcome", "outcome_header", "outcome_cells",
           "compare_outcomes", "format_table", "jsonable"]


@dataclass
class ExperimentResult:
    """What a toy experiment returns (:mod:`toy.experiments`): the summary, curves, figures and table."""

    name: str
    summary: dict
    curves: dict
    figures: list[str] = field(default_factory=list)
    table: list[list[str]] = field(default_factory=list)  # first row: header


@dataclass(frozen=True)
class Size:
    runs: int
    steps: int


def size(quick: bool, quick_size: Size, full_size: Size, runs: int | None, steps: int | None) -> Size:
    """The experiment's quick or full size, with the command line's ``runs`` / ``steps`` if given."""
    s = quick_size if quick else full_size
    return Size(runs or s.runs, steps or s.steps)


def lr_per_state(eta: float, bandit: Bandit) -> float:
    """The learning rate ``eta * M * T``: ``eta`` per state under the token-mean loss."""
    M, T, _ = bandit.shape
    return eta * M * T


def final(h: History, key: str, last: int = 10) -> tuple[float, float]:
    """Mean over the last ``last`` steps per run, then mean and CI over runs."""
    v = h.curves[key][-last:].mean(axis=0)
    m, ci = mean_ci(v, axis=0)
    return float(m), float(ci)


def outcome(h: History, G: int) -> dict:
    """Final entropy, reward and pass@G (last 10 steps) and the mean reward over training, each as
    (mean, 95% CI half-width) over seeds: the columns every comparison table shares."""
    auc = mean_ci(h.curves["reward"].mean(axis=0), axis=0)
    return {"entropy": final(h, "entropy"), "reward": final(h, "reward"),
            f"pass_at_{G}": final(h, f"pass_at_{G}"), "reward_auc": (float(auc[0]), float(auc[1]))}


def outcome_header(first: str, G: int) -> list[str]:
    return [first, "final entropy", "final reward", f"final pass@{G}", "mean reward (AUC)"]


def outcome_cells(name: str, res: dict, G: int) -> list[str]:
    """The :func:`outcome_header` cells of one configuration's :func:`outcome`."""
    return [name] + [pm(*res[k]) for k in ("entropy", "reward", f"pass_at_{G}", "reward_auc")]


def compare_outcomes(hist: dict[str, History], G: int, first: str, extra_column: str,
                     extra: Callable[[History], tuple[dict, str]]) -> tuple[dict, list[list[str]]]:
    """``(results, table)`` of configurations compared on the :func:`outcome` columns plus one more.

    ``extra(h)`` gives a configuration's further results (merged into its :func:`outcome`) and the cell
    of ``extra_column``; ``table``'s first row is the header.
    """
    results, table = {}, [outcome_header(first, G) + [extra_column]]
    for name, h in hist.items():
        more, cell = extra(h)
        results[name] = res = outcome(h, G) | more
        table.append(outcome_cells(name, res, G) + [cell])
    return results, table


