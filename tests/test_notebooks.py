"""The tutorial notebooks (``notebooks/NN_*.py``, jupytext percent sources; ``NN_*.ipynb`` generated).

* every notebook executes headlessly, in small mode (``ENTDYN_NB_SMALL=1``, ``MPLBACKEND=Agg``), with no
  cell error — the "check yourself" assertions inside the notebooks are part of this test;
* every committed ``.ipynb`` has exactly the cells of its source (``notebooks/sync.py``), so the two
  cannot drift;
* drift guards against the library: a notebook defines no function or class whose name is a public
  name of ``theory`` / ``toy`` / ``scale``, defines functions only as plotting glue (``plot_*``), and
  imports no private (``_``) name or module from the library.

Needs jupytext and nbclient (the ``notebooks`` and ``dev`` extras); without them the tests skip locally
and fail under CI (``CI`` set), so a missing install step cannot pass silently.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
SOURCES = sorted(NB_DIR.glob("[0-9][0-9]_*.py"))
LIBRARY_MODULES = ("theory", "theory.rules", "toy", "toy.bandit", "toy.grpo", "toy.run", "toy.experiments",
                   "toy.control", "toy.demo", "toy.progress", "scale.config", "scale.train", "scale.plot",
                   "scale.metrics_log")
LIBRARY_PACKAGES = ("theory", "toy", "scale")
EXPECTED = 6  # notebooks 1-6
SMALL_BUDGET_S = 240  # per notebook in small mode (timeout per cell and total)


def _require(name: str):
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


def _sync_module():
    _require("jupytext")
    spec = importlib.util.spec_from_file_location("notebooks_sync", NB_DIR / "sync.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_tutorial_has_a_source_and_a_notebook():
    assert [int(p.name[:2]) for p in SOURCES] == list(range(1, EXPECTED + 1)), [p.name for p in SOURCES]
    for py in SOURCES:
        assert py.with_suffix(".ipynb").exists(), f"{py.name} has no .ipynb: run python notebooks/sync.py"
    readme = (NB_DIR / "README.md").read_text(encoding="utf-8")
    for py in SOURCES:
        assert py.stem in readme, f"notebooks/README.md does not list {py.stem}"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_ipynb_is_in_sync_with_its_source(py):
    sync = _sync_module()
    assert sync.in_sync(py), f"{py.with_suffix('.ipynb').name} differs from {py.name}: run notebooks/sync.py"


# notebooks taking more than ~20 s in small mode on 2 cores (all six together: about 1.5-2 minutes)
SLOW = {"05_stages_and_shaping", "06_from_toy_to_llm"}


@pytest.mark.parametrize("py", [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p
                                for p in SOURCES], ids=lambda p: p.stem)
def test_notebook_executes_in_small_mode(py, monkeypatch):
    nbclient = _require("nbclient")
    sync = _sync_module()
    monkeypatch.setenv("ENTDYN_NB_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::DeprecationWarning")
    nb = sync.build(py)
    client = nbclient.NotebookClient(nb, timeout=SMALL_BUDGET_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NB_DIR)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    wall = time.perf_counter() - t0
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    assert wall < SMALL_BUDGET_S, f"{py.name} took {wall:.0f} s in small mode"


# ----------------------------------------------------------------------------------------- drift guards


def _public_library_names() -> set[str]:
    names: set[str] = set()
    for modname in LIBRARY_MODULES:
        mod = importlib.import_module(modname)
        names.update(getattr(mod, "__all__", ()))
        for name, obj in inspect.getmembers(mod):
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)) \
                    and getattr(obj, "__module__", "").split(".")[0] in LIBRARY_PACKAGES:
                names.add(name)
    return names


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_notebook_defines_no_library_logic(py):
    tree = ast.parse(py.read_text(encoding="utf-8"), filename=str(py))
    public = _public_library_names()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            assert node.name not in public, (
                f"{py.name}:{node.lineno} defines {node.name!r}, a public library name: import it instead")
            assert isinstance(node, ast.FunctionDef) and node.name.startswith("plot_"), (
                f"{py.name}:{node.lineno} defines {node.name!r}: notebooks define only plotting glue "
                "(plot_*); "
                "put logic in theory/, toy/ or scale/")
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            pytest.fail(f"{py.name}:{node.lineno} assigns a lambda: notebooks define no helper logic")


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_notebook_imports_only_public_library_names(py):
    tree = ast.parse(py.read_text(encoding="utf-8"), filename=str(py))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARY_PACKAGES:
            assert not any(part.startswith("_") for part in node.module.split(".")), (
                f"{py.name}:{node.lineno} imports from private module {node.module}")
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{py.name}:{node.lineno} imports private names {private} from {node.module}"
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] in LIBRARY_PACKAGES
                   and any(part.startswith("_") for part in a.name.split("."))]
            assert not bad, f"{py.name}:{node.lineno} imports private modules {bad}"
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and isinstance(node.value, ast.Name) \
                and node.value.id in ("T", "theory", "toy", "rules", "scale"):
            pytest.fail(f"{py.name}:{node.lineno} uses the private name {node.value.id}.{node.attr}")
