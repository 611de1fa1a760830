"""Plotting helpers shared by the toy experiments and the notebooks (matplotlib; no state)."""

from __future__ import annotations

import numpy as np

from .run import mean_ci

__all__ = ["band"]


def band(ax, x, values: np.ndarray, label: str, color=None, ls: str = "-"):
    """Plot the mean over seeds (axis 1 of ``values``, shape ``(S, R)``) with its 95% CI band.

    The band is :func:`toy.run.mean_ci`'s Student-t half-width; returns the mean's line.
    """
    m, h = mean_ci(values, axis=1)
    line = ax.plot(x, m, label=label, color=color, ls=ls, lw=1.6)[0]
    ax.fill_between(x, m - h, m + h, color=line.get_color(), alpha=0.18, lw=0)
    return line
