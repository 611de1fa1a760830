"""Plotting helpers shared by the toy experiments and the notebooks (matplotlib; no state).

They live in :mod:`theory.reporting` (shared with the real-model experiments) and are re-exported here.
"""

from __future__ import annotations

from theory.reporting import band, pyplot, save_figure

__all__ = ["band", "pyplot", "save_figure"]
