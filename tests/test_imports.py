"""Import hygiene: ``import theory, toy`` (and the CLI entry module) never imports torch."""

from __future__ import annotations

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
