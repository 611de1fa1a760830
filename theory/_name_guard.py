"""The ``scale`` name is shared with an unrelated PyPI distribution: fail early and say what to do.

PyPI has a distribution named ``scale`` that ships its own ``scale/__init__.py``, ``scale/loss.py`` and
``scale/plot.py``. Installed into the same environment as entropy-dynamics, the two write into one
``site-packages/scale/`` folder: whichever was installed last wins each of those files, imports such as
``scale.adapters.trl`` then fail in confusing ways, and ``pip uninstall scale`` deletes this project's
files of the same names. :func:`check_scale_name` turns that state into one clear ``ImportError``.

The check is one metadata lookup by name (well under a millisecond). It lives outside ``scale`` (in
:mod:`theory`, which every package imports and no other distribution shadows) so that it still runs when
the other distribution's ``scale/__init__.py`` has replaced ours: the ``entdyn`` command checks before it
imports anything from ``scale`` (one line, exit 2), and :mod:`scale` and :mod:`scale.adapters` check at
import (an ``ImportError`` with the same message).
"""

from __future__ import annotations

from importlib import metadata

FOREIGN = "scale"  #: the distribution name that collides with this project's ``scale`` package
FIX = (
    "install entropy-dynamics in a virtual environment of its own (python -m venv .venv && "
    ".venv/bin/pip install 'entropy-dynamics[scale]'), or run `pip uninstall scale` and then "
    "`pip install --force-reinstall --no-deps entropy-dynamics` (the uninstall deletes the files the two "
    "share)"
)


def foreign_scale() -> str | None:
    """The problem (one line) if a distribution named ``scale`` is beside this project, else None."""
    try:
        other = metadata.distribution(FOREIGN)
    except metadata.PackageNotFoundError:
        return None
    return (f"another distribution named {FOREIGN!r} (version {other.version}) is installed in this "
            f"environment and owns the top-level package `scale` of entropy-dynamics; {FIX}")  # fmt: skip


def check_scale_name() -> None:
    """Raise ``ImportError`` (:func:`foreign_scale`'s message) if the other ``scale`` is installed."""
    problem = foreign_scale()
    if problem is not None:
        raise ImportError(problem)
