"""Regenerate the tutorial notebooks ``NN_*.ipynb`` from their jupytext sources ``NN_*.py``.

The ``.py`` files (jupytext "percent" format) are the source of truth: they diff and review like code. The
``.ipynb`` files are generated from them, without outputs, so that JupyterLab users get real notebooks.

    python notebooks/sync.py           # rewrite every .ipynb whose cells differ from its .py
    python notebooks/sync.py --check   # exit 1 if some .ipynb is missing or out of date (what CI checks)

"In sync" compares the cells' types and text and the kernel, not outputs: a notebook you have run is still
in sync (regenerate it before committing to drop the outputs: delete it and run this script).

Cell ids are derived from the cell's content (a short hash), so regenerating an unchanged notebook gives the
same file and editing one cell changes only that cell's id: the ``.ipynb`` diff stays as small as the
``.py`` diff. ``tests/test_notebooks.py`` uses :func:`in_sync` and :func:`build`.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent


def sources(folder: Path = HERE) -> list[Path]:
    """The tutorial sources ``NN_*.py`` in order."""
    return sorted(folder.glob("[0-9][0-9]_*.py"))


def build(py: Path) -> nbformat.NotebookNode:
    """The notebook of source ``py``: its cells, no outputs, content-derived cell ids."""
    nb = jupytext.read(py)
    seen: dict[str, int] = {}
    for cell in nb.cells:
        digest = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()[:10]
        n = seen.get(digest, 0)
        seen[digest] = n + 1
        cell["id"] = digest if n == 0 else f"{digest}-{n}"
        if cell.cell_type == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return nb


def render(py: Path) -> str:
    """The exact text of the ``.ipynb`` generated from ``py``."""
    return nbformat.writes(build(py)) + "\n"


def cells(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """What must agree between a source and its notebook: each cell's type and text (outputs are ignored,
    so a notebook a user has run is still in sync)."""
    return [(c.cell_type, c.source) for c in nb.cells]


def in_sync(py: Path) -> bool:
    """Whether ``py``'s ``.ipynb`` exists, has the source's cells and the same kernel."""
    ipynb = py.with_suffix(".ipynb")
    if not ipynb.exists():
        return False
    have, want = nbformat.read(ipynb, as_version=4), build(py)
    return cells(have) == cells(want) and have.metadata.get("kernelspec") == want.metadata.get("kernelspec")


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for py in sources():
        if in_sync(py):
            continue
        stale.append(py.with_suffix(".ipynb").name)
        if not check:
            py.with_suffix(".ipynb").write_text(render(py), encoding="utf-8")
    if check and stale:
        print("out of date (run: python notebooks/sync.py):", ", ".join(stale))
        return 1
    print(("checked " if check else "wrote ") + (", ".join(stale) if stale else "nothing (all in sync)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
