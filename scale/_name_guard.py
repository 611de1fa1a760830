"""The ``scale`` name is shared with an unrelated PyPI distribution: fail early and say what to do.

PyPI has a distribution named ``scale`` that ships its own ``scale/__init__.py``, ``scale/loss.py`` and
``scale/plot.py``. Installed into the same environment as entropy-dynamics, the two write into one
``site-packages/scale/`` folder: whichever was installed last wins each of those files, imports such as
``scale.adapters.trl`` then fail in confusing ways, and ``pip uninstall scale`` deletes this project's
files of the same names. :func:`check_scale_name` turns that state into one clear ``ImportError``.

The check is one metadata lookup by name (well under a millisecond), run when :mod:`scale` and
:mod:`scale.adapters` are imported (the adapters package too, in case the other ``__init__.py`` won).
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


def check_scale_name() -> None:
    """Raise ``ImportError`` if a distribution named ``scale`` is installed beside this project."""
    try:
        other = metadata.distribution(FOREIGN)
    except metadata.PackageNotFoundError:
        return
    raise ImportError(
        f"another distribution named {FOREIGN!r} (version {other.version}) is installed in this environment "
        f"and owns the same top-level package `scale` as entropy-dynamics; {FIX}"
    )
