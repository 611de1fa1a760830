"""Atomic training checkpoints: ``RUN_DIR/checkpoints/step_XXXXXX/``.

Each checkpoint directory holds

=======================  =========================================================================
``model.safetensors``    the policy's parameters and buffers (``safetensors.torch.save_model``: tied
                         weights are stored once and re-tied on load); full tensors also from an
                         FSDP run (:func:`scale.distributed.full_model_state`)
``state.pt``             ``torch.save`` of the optimizer and lr-scheduler state dicts, torch's CPU
                         (and CUDA) RNG states and the rule's state (e.g. the adaptive entropy
                         coefficient); loaded with ``weights_only=True``
``trainer_state.json``   the step, the data position, the stage detector's state, the NumPy and
                         Python RNG states, running counters (reward errors)
``manifest.json``        written last: the size and SHA-256 of each file above
=======================  =========================================================================

Writing is atomic: everything goes into a fresh ``checkpoints/.tmp-*`` directory, each file and the
directory are fsynced, then the directory is renamed to its final name in one ``os.rename`` and the
parent is fsynced. A crash at any point leaves either no new checkpoint or a complete one; leftover
temp directories are removed by :func:`clean_temp`. After a successful write only the newest
``keep`` checkpoints are kept. A directory named ``step_*`` is complete by construction.

What the disk does afterwards is another matter (a copy cut short, a full disk, a file truncated by
hand): :func:`verify_checkpoint` compares every file with the manifest, and :func:`resumable_checkpoint`
returns the newest checkpoint that verifies and loads, moving each damaged newer one aside to
``checkpoints/damaged-step_XXXXXX`` (never deleting it) with the reason. A checkpoint without a
manifest (written before manifests existed) is accepted if its files load.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINTS",
    "capture_rng",
    "checkpoint_dir",
    "clean_temp",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "resumable_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "verify_checkpoint",
]

CHECKPOINTS = "checkpoints"  #: sub-directory of the run directory
MANIFEST = "manifest.json"  #: written last into each checkpoint: name -> {"bytes", "sha256"}
FILES = ("model.safetensors", "state.pt", "trainer_state.json")  #: what a checkpoint holds besides it


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def clean_temp(run_dir: str | Path) -> None:
    """Remove temp directories left by an interrupted :func:`save_checkpoint`."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# RNG states


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(json_part, tensor_part)``: Python and NumPy (legacy global) RNG states; torch CPU/CUDA states."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global stream)
    json_part = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return json_part, tensors


def restore_rng(json_part: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = json_part["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = json_part["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["torch_cuda"]))


# --------------------------------------------------------------------------------------------------
# save / load


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    entries = {
        name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in FILES
    }
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def verify_checkpoint(path: str | Path) -> str | None:
    """``None`` if the checkpoint at ``path`` is intact, else why not (one line).

    Intact: every file of :data:`FILES` exists and, when ``manifest.json`` is there, has the recorded size
    and SHA-256. Without a manifest only presence is checked (:func:`resumable_checkpoint` then finds out
    by loading)."""
    path = Path(path)
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    if not (path / MANIFEST).is_file():
        return None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        return f"unreadable {MANIFEST} ({type(err).__name__})"
    for name in FILES:
        want, size = files.get(name, {}), (path / name).stat().st_size
        if size != want.get("bytes"):
            return f"{name} has {size} bytes, the manifest says {want.get('bytes')}"
        if _sha256(path / name) != want.get("sha256"):
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    tensor_state: dict[str, Any] | None = None,
    keep: int = 2,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically (see the module docstring); return its directory.

    ``trainer_state`` must be JSON-serialisable; ``tensor_state`` may hold tensors, numbers, strings,
    lists, tuples, dicts and None (what ``torch.load(weights_only=True)`` reads back).
    ``model_state`` / ``optimizer_state``: full state dicts gathered beforehand (an FSDP run, where
    gathering is a collective of every process and only rank 0 writes), written instead of
    ``model``'s and ``optimizer``'s own.
    """
    from safetensors.torch import save_file, save_model

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, step)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # (not mkdtemp, which makes it 0700: a checkpoint is as readable as the rest of its run)
    try:
        if model_state is not None:
            save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})  # fmt: skip
        else:
            save_model(model, str(tmp / "model.safetensors"))
        state = {
            "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **(tensor_state or {}),
        }
        torch.save(state, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1) + "\n")
        for name in FILES:
            _fsync_file(tmp / name)
        _write_manifest(tmp)  # last: a manifest vouches for files that are already on disk
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        if final.exists():  # the same step written again (a resumed run): replace it
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{final.name}-", dir=root))
            os.replace(final, old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resumable_checkpoint(run_dir: str | Path, load: Any, *, report: Any = None) -> tuple[Path, Any] | None:
    """The newest checkpoint of ``run_dir`` that verifies and loads: ``(path, load(path))``, or None.

    ``load(path)`` restores it (raising on a damaged file). Each newer checkpoint that fails
    :func:`verify_checkpoint` or ``load`` is renamed to ``checkpoints/damaged-step_XXXXXX`` (kept, no
    longer listed) and ``report(message)`` is called with which one was skipped and why.
    """
    for path in reversed(list_checkpoints(run_dir)):
        why = verify_checkpoint(path)
        if why is None:
            try:
                return path, load(path)
            except Exception as err:  # a damaged file the manifest could not vouch for
                why = f"does not load ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        aside = path.with_name(f"damaged-{path.name}")
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(path, aside)
        if report is not None:
            report(f"skipped checkpoint {path.name}: {why}; moved it to {aside}")
    return None


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint into ``model`` (and ``optimizer``, ``scheduler``); return
    ``(trainer_state, tensor_state)`` (the JSON state and the rest of ``state.pt``).

    An FSDP-sharded ``model`` (every process calls this) gets the full tensors sharded as it is
    (:func:`scale.distributed.load_full_model_state`), its optimizer likewise."""
    from safetensors.torch import load_file, load_model

    from .distributed import is_fsdp, load_full_model_state, load_full_optimizer_state

    path = Path(path)
    sharded = is_fsdp(model)
    if sharded:
        load_full_model_state(model, load_file(str(path / "model.safetensors")))
    else:
        device = next(model.parameters()).device
        load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if optimizer is not None and sharded:
        load_full_optimizer_state(model, optimizer, state.pop("optimizer"))
    elif optimizer is not None:
        optimizer.load_state_dict(state.pop("optimizer"))
    else:
        state.pop("optimizer")
    if scheduler is not None:
        scheduler.load_state_dict(state.pop("scheduler"))
    else:
        state.pop("scheduler")
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    return trainer_state, state
