"""Plotting helpers shared by the toy experiments and the notebooks (matplotlib; no state)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .run import mean_ci

__all__ = ["band", "pyplot", "save_figure"]


def band(ax, x, values: np.ndarray, label: str, color=None, ls: str = "-"):
    """Plot the mean over seeds (axis 1 of ``values``, shape ``(S, R)``) with its 95% CI band.

    The band is :func:`toy.run.mean_ci`'s Student-t half-width; returns the mean's line.
    """
    m, h = mean_ci(values, axis=1)
    line = ax.plot(x, m, label=label, color=color, ls=ls, lw=1.6)[0]
    ax.fill_between(x, m - h, m + h, color=line.get_color(), alpha=0.18, lw=0)
    return line


def pyplot():
    """``matplotlib.pyplot``, on the Agg backend unless pyplot is already loaded (a notebook's choice)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, name: str) -> str:
    """Write ``fig`` to ``out/name`` (120 dpi), close it and return ``name``."""
    fig.savefig(out / name, dpi=120)
    pyplot().close(fig)
    return name
