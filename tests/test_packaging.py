"""The declared dependency bounds hold what CI actually runs.

``pyproject.toml`` promises ranges; CI installs one version of each. If an install ever resolves a
version outside the declared range (a bound edited without the Makefile, or the Makefile's pins moved
past the bounds), this fails and names the package. Also: the extras the trainer and the TRL adapter
rely on carry upper bounds (a private API without an upper bound breaks a fresh install silently).
"""

from __future__ import annotations

import os
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

packaging = pytest.importorskip("packaging")
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
EXTRAS = PYPROJECT["optional-dependencies"]


def _requirements(group: str) -> list[Requirement]:
    return [Requirement(r) for r in (PYPROJECT["dependencies"] if group == "core" else EXTRAS[group])]


@pytest.mark.parametrize("group", ["core", "scale", "trl", "dev"])
def test_installed_versions_lie_within_the_declared_bounds(group):
    checked = 0
    for req in _requirements(group):
        try:
            have = Version(metadata.version(req.name))
        except metadata.PackageNotFoundError:
            continue  # an extra this environment did not install
        assert req.specifier.contains(have, prereleases=True), f"{req.name} {have} is outside {req}"
        checked += 1
    assert checked, f"no package of {group!r} is installed here"


@pytest.mark.parametrize("name", ["torch", "transformers", "trl"])
def test_the_packages_whose_internals_we_use_have_upper_bounds(name):
    reqs = [r for group in ("scale", "trl", "dev") for r in _requirements(group) if r.name == name]
    assert reqs, name
    for req in reqs:
        assert any(s.operator in ("<", "<=", "~=", "==") for s in req.specifier), f"{req} has no upper bound"


def test_the_makefile_torch_pin_satisfies_the_bound():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    pin = next(line.split("?=")[1].strip() for line in makefile.splitlines() if line.startswith("TORCH_SPEC"))
    version = Requirement(pin).specifier
    (want,) = [r for r in _requirements("scale") if r.name == "torch"]
    pinned = next(iter(version)).version
    assert want.specifier.contains(pinned), f"Makefile {pin} is outside pyproject's {want}"


def test_the_environment_has_the_versions_its_job_pinned():
    """``make test-lower`` pins the lower bounds (``ENTDYN_EXPECT_VERSIONS``): prove they were installed,
    so a green run there really is a run at the lower bounds (skipped where nothing is pinned)."""
    pins = [Requirement(p) for p in os.environ.get("ENTDYN_EXPECT_VERSIONS", "").split()]
    if not pins:
        pytest.skip("no ENTDYN_EXPECT_VERSIONS (only make test-lower sets it)")
    for pin in pins:
        assert pin.specifier.contains(Version(metadata.version(pin.name))), (pin, metadata.version(pin.name))
