"""Reporting helpers of the toy experiments (:mod:`toy.experiments`) and the demo (:mod:`toy.demo`):
fit statistics, the mean ± CI cells of the comparison tables, markdown tables and strict JSON.

No plotting (:mod:`toy.plotting`) and no state.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .run import History, mean_ci

__all__ = ["r2", "loglog_slope", "pm", "final", "outcome", "outcome_header", "outcome_cells",
           "compare_outcomes", "format_table", "jsonable"]


def r2(target: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination of ``pred`` for ``target`` (flattened); NaN for a constant target."""
    target, pred = np.ravel(target), np.ravel(pred)
    ss = np.sum((target - target.mean()) ** 2)
    return float(1.0 - np.sum((target - pred) ** 2) / ss) if ss > 0 else float("nan")


def loglog_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of ``log y`` on ``log x``."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def pm(m: float, h: float, spec: str = ".3f") -> str:
    """``"m ± h"``, both in ``spec`` (a sign flag applies to ``m`` only)."""
    return f"{m:{spec}} ± {h:{spec.lstrip('+')}}"


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


def format_table(rows: list[list[str]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    if not rows:
        return ""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows[1:]])


def jsonable(obj):
    """``obj`` as strict JSON data: NumPy scalars as Python numbers, non-finite floats (NaN, inf) as
    ``None`` (JSON has no NaN; a missing value is null), keys as strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
