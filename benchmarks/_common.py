"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import platform

__all__ = ["cpu_model", "fmt_s", "fmt_r"]


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt_s(x: float | None) -> str:
    """Seconds for a table cell (4 significant digits; a dash when missing)."""
    return "—" if x is None else f"{x:.4g}"


def fmt_r(x: float | None) -> str:
    """A ratio for a table cell (one decimal; a dash when missing)."""
    return "—" if x is None else f"{x:.1f}"
