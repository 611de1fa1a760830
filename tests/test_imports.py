"""Import hygiene: ``import theory, toy`` (and the CLI entry module) never imports torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "trl", "accelerate")


MODULES = [
    "theory",
    "toy",
    "theory, toy",
    "theory.rules, toy.bandit, toy.grpo, toy.demo, toy.run, toy.experiments, toy.plotting",
    "entdyn, entdyn.cli, scale, scale.config, scale.flags, scale.adapters, scale.plot, scale.models",
]


@pytest.mark.parametrize("modules", MODULES)
def test_import_does_not_pull_torch(modules):
    code = (
        f"import sys; import {modules}; "
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_theory_public_names_are_documented():
    import theory

    for name in theory.__all__:
        obj = getattr(theory, name)
        if callable(obj):
            doc = obj.__doc__ or ""
            assert "Example" in doc or ">>>" in doc, f"{name} has no doctest example"
            assert "(E" in doc or "Theorem" in doc or "Lemma" in doc or "arXiv" in doc or "§" in doc, (
                f"{name} cites no equation label or source"
            )


def test_a_foreign_scale_distribution_is_named_at_import(tmp_path):
    """PyPI's unrelated ``scale`` distribution shares the top-level package: ``import scale`` (and
    ``scale.adapters``) fail with one message naming it and the fix, instead of a confusing error later."""
    info = tmp_path / "scale-1.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: scale\nVersion: 1.1.2\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path[1:]])}
    for module in ("scale", "scale.adapters.trl"):
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                              env=env)  # fmt: skip
        assert proc.returncode == 1, (module, proc.stderr)
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("ImportError: another distribution named 'scale' (version 1.1.2)"), last
        assert "virtual environment of its own" in last
    cli = subprocess.run([sys.executable, "-m", "entdyn", "rules"], capture_output=True, text=True, env=env)
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1, cli.stderr  # one line, checked before scale
    assert cli.stderr.startswith("entdyn: error: another distribution named 'scale'"), cli.stderr
    clean = subprocess.run([sys.executable, "-c", "import scale, scale.adapters"], capture_output=True,
                           text=True)  # fmt: skip
    assert clean.returncode == 0, clean.stderr
