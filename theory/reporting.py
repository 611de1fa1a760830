"""Statistics and reports shared by every experiment: the toy's (``entdyn toy``) and the real model's
(``entdyn llm``), so both print and store their numbers one way.

* :func:`mean_ci`: mean over seeds and the half-width of its 95 % Student-t interval;
* :func:`r2`, :func:`loglog_slope`: how well a prediction explains a measurement, how a residual scales;
* :func:`median_iqr`: a robust centre and spread (for ratios with a heavy tail);
* :func:`pm`, :func:`format_table`: ``m ± h`` cells, GitHub-markdown tables;
* :func:`jsonable`: strict JSON data (NaN and inf become ``null``);
* :func:`write_report`: an experiment's ``summary.json``, ``curves.json`` and ``table.md``;
* :func:`pyplot`, :func:`band`, :func:`save_figure`: matplotlib on Agg, mean ± CI bands, PNGs.

NumPy (and matplotlib, imported when a figure is drawn) only, never torch; the inputs are host arrays
of per-seed or per-step results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["t_quantile_975", "mean_ci", "r2", "loglog_slope", "median_iqr", "tracking", "compare_to_best",
           "pm", "format_table", "jsonable", "write_report", "pyplot", "band", "save_figure"]

# two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (then the normal 1.96 is within 2%)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """``t_{0.975}`` with ``df`` degrees of freedom (table to 30, then 1.96 + 2.4/df).

    >>> t_quantile_975(1), t_quantile_975(30)
    (12.706, 2.042)
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df!r}")
    return _T975[df - 1] if df <= 30 else 1.96 + 2.4 / df


def mean_ci(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Mean over ``axis`` (the seeds) and the half-width of its 95% Student-t confidence interval.

    With one seed the half-width is 0 (no interval can be estimated; reported as such).

    >>> m, h = mean_ci(np.array([1.0, 2.0, 3.0]))
    >>> float(m), round(float(h), 3)
    (2.0, 2.484)
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[axis]
    m = x.mean(axis=axis)
    if n < 2:
        return m, np.zeros_like(m)
    return m, t_quantile_975(n - 1) * x.std(axis=axis, ddof=1) / np.sqrt(n)


def r2(target: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination of ``pred`` for ``target`` (flattened); NaN for a constant target.

    >>> r2(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]))
    1.0
    """
    target, pred = np.ravel(target), np.ravel(pred)
    ss = np.sum((target - target.mean()) ** 2)
    return float(1.0 - np.sum((target - pred) ** 2) / ss) if ss > 0 else float("nan")


def loglog_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of ``log y`` on ``log x`` (a residual of order ``k`` in ``x`` has slope ``k``).

    >>> round(loglog_slope(np.array([1.0, 2.0, 4.0]), np.array([3.0, 12.0, 48.0])), 6)
    2.0
    """
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def median_iqr(x: np.ndarray) -> tuple[float, float, float]:
    """``(median, 25th percentile, 75th percentile)`` of the finite entries of ``x``; NaNs if none.

    >>> median_iqr(np.array([1.0, 2.0, 3.0, 4.0, 5.0, np.nan]))
    (3.0, 2.0, 4.0)
    """
    x = np.ravel(np.asarray(x, dtype=np.float64))
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    q25, q50, q75 = np.percentile(x, [25, 50, 75])
    return float(q50), float(q25), float(q75)


def tracking(H: np.ndarray, target: np.ndarray, warm: int) -> dict[str, np.ndarray]:
    """Per-run scores of holding a target entropy (issue 17). ``H``: ``(S, R)`` entropies (steps x runs);
    ``target``: broadcastable to ``H`` (``(S, 1)`` a schedule, ``(R,)`` one value per run).
    ``tracking_error`` = mean ``|H - H*|`` over the steps from ``warm`` on; ``overshoot`` =
    ``max(0, max_t H*_t - H_t)``, how far below the target the entropy fell at worst. ``(R,)`` each."""
    H = np.asarray(H, dtype=np.float64)
    target = np.broadcast_to(np.asarray(target, dtype=np.float64), H.shape)
    return {"tracking_error": np.nanmean(np.abs(H[warm:] - target[warm:]), axis=0),
            "overshoot": np.maximum(0.0, np.nanmax(target - H, axis=0))}


def compare_to_best(results: dict, method: str, rivals: tuple[str, ...]) -> dict:
    """``method`` against the rival with the smallest mean ``tracking_error`` in ``results`` (each entry
    ``{key: [mean, ci]}``): the rival's name, the ratio of tracking errors and the reward difference."""
    best = min(rivals, key=lambda m: results[m]["tracking_error"][0])
    a, b = results[method], results[best]
    return {"best_reactive": best, "tracking_ratio": a["tracking_error"][0] / b["tracking_error"][0],
            "reward_difference": a["reward"][0] - b["reward"][0]}


def pm(m: float, h: float, spec: str = ".3f") -> str:
    """``"m ± h"``, both in ``spec`` (a sign flag applies to ``m`` only).

    >>> pm(0.5, 0.25, "+.2f")
    '+0.50 ± 0.25'
    """
    return f"{m:{spec}} ± {h:{spec.lstrip('+')}}"


def format_table(rows: list[list[str]]) -> str:
    """A GitHub-markdown table (also readable in a terminal); ``rows[0]`` is the header.

    >>> print(format_table([["a", "b"], ["1", "22"]]))
    | a | b  |
    |---|----|
    | 1 | 22 |
    """
    if not rows:
        return ""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows[1:]])  # fmt: skip


def jsonable(obj):
    """``obj`` as strict JSON data: NumPy scalars and arrays as Python numbers and lists, non-finite floats
    (NaN, inf) as ``None`` (JSON has no NaN; a missing value is null), keys as strings.

    >>> jsonable({"a": np.float64("nan"), 1: (np.int64(2), 0.5)})
    {'a': None, '1': [2, 0.5]}
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_report(out: Path, title: str, summary: dict, curves: dict, table: list[list[str]]) -> str:
    """Write ``out/summary.json`` (strict JSON), ``out/curves.json`` and ``out/table.md`` (headed
    ``## title``); return the markdown table (for printing)."""
    text = format_table(table)
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n")
    (out / "curves.json").write_text(json.dumps(jsonable(curves)) + "\n")
    (out / "table.md").write_text(f"## {title}\n\n{text}\n")
    return text


def pyplot():
    """``matplotlib.pyplot``, on the Agg backend unless pyplot is already loaded (a notebook's choice)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def band(ax, x, values: np.ndarray, label: str, color=None, ls: str = "-"):
    """Plot the mean over seeds (axis 1 of ``values``, shape ``(S, R)``) with its 95% CI band
    (:func:`mean_ci`'s Student-t half-width); returns the mean's line."""
    m, h = mean_ci(values, axis=1)
    line = ax.plot(x, m, label=label, color=color, ls=ls, lw=1.6)[0]
    ax.fill_between(x, m - h, m + h, color=line.get_color(), alpha=0.18, lw=0)
    return line


def save_figure(fig, out: Path, name: str) -> str:
    """Write ``fig`` to ``out/name`` (120 dpi), close it and return ``name``."""
    fig.savefig(out / name, dpi=120)
    pyplot().close(fig)
    return name
