"""Shared test configuration: hypothesis profiles and the array-backend fixture.

Profiles (numpy-style): ``ci`` is chosen when the environment sets ``CI`` (derandomized, 200 examples
per property, no deadline, no example database); ``dev`` otherwise (random, 50 examples). Override with
``HYPOTHESIS_PROFILE=ci`` (or ``dev``) or pytest's ``--hypothesis-profile``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_default = "ci" if os.environ.get("CI", "").lower() not in ("", "0", "false") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))


class Backend:
    """One array library under test: converts NumPy test data in and results out."""

    def __init__(self, name: str):
        self.name = name
        if name == "numpy":
            self.xp = np
        elif name == "torch":
            self.xp = pytest.importorskip("torch")
        elif name == "array_api_strict":
            self.xp = pytest.importorskip("array_api_strict")
        else:  # pragma: no cover
            raise ValueError(name)

    def asarray(self, a):
        """NumPy array (or scalar) -> this backend's array, same dtype."""
        a = np.asarray(a)
        if self.name == "numpy":
            return a.copy()
        if self.name == "torch":
            return self.xp.from_numpy(a.copy())
        return self.xp.asarray(a)

    def __repr__(self) -> str:
        return self.name


def to_numpy(x) -> np.ndarray:
    """Any backend's array -> NumPy (detached, on the host)."""
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x)
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.from_dlpack(x)


BACKENDS = ["numpy", "torch", "array_api_strict"]


@pytest.fixture(scope="session", params=BACKENDS)
def be(request) -> Backend:
    """The array backend a test runs on: numpy, torch, array_api_strict."""
    return Backend(request.param)
