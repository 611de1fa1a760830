"""Atomic training checkpoints: ``RUN_DIR/checkpoints/step_XXXXXX/``.

Each checkpoint directory is also a standard Hugging Face model directory, so that what a run trains can
be served and shared: ``AutoModelForCausalLM.from_pretrained(ckpt)`` and
``AutoTokenizer.from_pretrained(ckpt)`` load it; it is the layout vLLM and the Hub read (vLLM was not
tried here). ``entdyn export`` copies the model files alone into a clean directory (:mod:`scale.export`).
A checkpoint holds

===========================  =======================================================================
``model.safetensors``        the policy's parameters and buffers, named as ``from_pretrained`` expects
                             (:func:`hf_state_dict`: a tied weight stored once, under the name of the
                             tie's source, ``model.embed_tokens.weight``, and re-tied on load), with the
                             ``{"format": "pt"}`` metadata transformers checks; full tensors also from an
                             FSDP run (:func:`scale.distributed.full_model_state`)
``config.json``              the model's config (``architectures``, ``dtype`` of the weights written)
``generation_config.json``   its generation defaults (when the model has them)
tokenizer files              what ``tokenizer.save_pretrained`` writes (``tokenizer.json``,
                             ``tokenizer_config.json``, ``chat_template.jinja``, ...), when the trainer
                             passes its tokenizer
``state.pt``                 ``torch.save`` of the optimizer and lr-scheduler state dicts, torch's CPU
                             (and CUDA) RNG states and the rule's state (e.g. the adaptive entropy
                             coefficient); loaded with ``weights_only=True``
``trainer_state.json``       the step, the data position, the stage detector's state, the NumPy and
                             Python RNG states, running counters (reward errors)
``manifest.json``            written last: the size and SHA-256 of every other file of the directory
===========================  =======================================================================

Writing is atomic: everything goes into a fresh ``checkpoints/.tmp-*`` directory, each file and the
directory are fsynced, then the directory is renamed to its final name in one ``os.rename`` and the
parent is fsynced. A crash at any point leaves either no new checkpoint or a complete one; leftover
temp directories are removed by :func:`clean_temp`. After a successful write only the newest
``keep`` checkpoints are kept. A directory named ``step_*`` is complete by construction.

What the disk does afterwards is another matter (a copy cut short, a full disk, a file truncated by
hand): :func:`verify_checkpoint` compares every file with the manifest, and :func:`resumable_checkpoint`
returns the newest checkpoint that verifies and loads, moving each damaged newer one aside to
``checkpoints/damaged-step_XXXXXX`` (never deleting it) with the reason. Checkpoints written before
this layout still verify and resume: one without a manifest is accepted if its files load, one whose
manifest lists only ``model.safetensors``, ``state.pt`` and ``trainer_state.json`` (no config, no
tokenizer; its tied weight named ``lm_head.weight``, as ``safetensors.torch.save_model`` wrote it) is
checked against that manifest. :func:`load_checkpoint` reads either naming.
"""

from __future__ import annotations

import copy
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
    "hf_state_dict",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "resumable_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "verify_checkpoint",
    "write_model_files",
]

CHECKPOINTS = "checkpoints"  #: sub-directory of the run directory
MANIFEST = "manifest.json"  #: written last into each checkpoint: name -> {"bytes", "sha256"}
WEIGHTS = "model.safetensors"  #: the weights file, as Hugging Face names a single-file checkpoint
FILES = (WEIGHTS, "state.pt", "trainer_state.json")  #: what every checkpoint holds besides the manifest
TRAINING_FILES = ("state.pt", "trainer_state.json", MANIFEST)  #: what is there only to resume a run


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
    """``manifest.json``: the size and SHA-256 of every other file in ``folder`` (name order)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    entries = {
        name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in names
    }
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def verify_checkpoint(path: str | Path) -> str | None:
    """``None`` if the checkpoint at ``path`` is intact, else why not (one line).

    Intact: every file of :data:`FILES` exists and, when ``manifest.json`` is there, every file the
    manifest lists (those of :data:`FILES` always; config, generation config and tokenizer files in a
    checkpoint of the Hugging Face layout) exists with the recorded size and SHA-256. An older manifest
    lists the three files of :data:`FILES` only, and is checked for those. Without a manifest only
    presence is checked (:func:`resumable_checkpoint` then finds out by loading)."""
    path = Path(path)
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    if not (path / MANIFEST).is_file():
        return None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        names = [*FILES, *sorted(set(files) - set(FILES))]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        return f"unreadable {MANIFEST} ({type(err).__name__})"
    for name in names:
        want = files.get(name, {})
        if not (path / name).is_file():
            return f"missing {name} (the manifest lists it)"
        size = (path / name).stat().st_size
        if size != want.get("bytes"):
            return f"{name} has {size} bytes, the manifest says {want.get('bytes')}"
        if _sha256(path / name) != want.get("sha256"):
            return f"{name} does not match its SHA-256 in the manifest"
    return None


# --------------------------------------------------------------------------------------------------
# the Hugging Face model files


def hf_state_dict(
    model: torch.nn.Module, model_state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``model``'s state dict (or ``model_state``, gathered from an FSDP run) named as ``from_pretrained``
    and vLLM expect, each tensor contiguous.

    A tied weight is kept once, under the name of the tie's source (``model.embed_tokens.weight``), not
    under its targets (``model._tied_weights_keys``: ``lm_head.weight``) that transformers re-ties on
    load: vLLM skips ``lm_head.weight`` for a tied model, and older transformers do not re-tie the other
    way round. Without that attribute the alphabetically first name is kept. ``model_state`` may hold
    the weight under any of its names (:func:`scale.distributed.full_model_state` keeps the first)."""
    from .distributed import _tied_groups  # names sharing one parameter (also under FSDP2)

    sd = dict(model_state) if model_state is not None else dict(model.state_dict())
    targets = set(getattr(model, "_tied_weights_keys", None) or ())  # a dict (v5: target -> source) or list
    for names in _tied_groups(model):
        present = [n for n in names if n in sd]
        if len(names) < 2 or not present:
            continue
        tensor = sd[present[0]]
        keep = sorted(n for n in names if n not in targets) or sorted(names)
        for n in names:
            sd.pop(n, None)
        sd[keep[0]] = tensor
    return {k: v.contiguous() for k, v in sd.items()}


def _architecture(model: torch.nn.Module) -> str:
    """The transformers class of ``model``: ``LlamaForCausalLM``, also for FSDP2's ``FSDPLlamaForCausalLM``
    (``config.json``'s ``architectures``, which vLLM picks its implementation by)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls.__name__
    return type(model).__name__


def write_model_files(
    folder: str | Path,
    model: torch.nn.Module,
    tokenizer: Any = None,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Write ``model`` (or ``model_state``) into ``folder`` as a Hugging Face model directory; return the
    names written.

    ``model.safetensors`` (:func:`hf_state_dict`, metadata ``{"format": "pt"}``, which transformers
    requires of a safetensors file with metadata), ``config.json`` (a copy of ``model.config`` with
    ``architectures`` and ``dtype`` set from the model and the weights written: float64 weights of a
    float64 run say so), ``generation_config.json`` when the model has a generation config, and the
    tokenizer's files when ``tokenizer`` is given. A model without a ``config`` gets the weights only.
    Nothing is fsynced here (the caller syncs the folder it publishes)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    sd = hf_state_dict(model, model_state)
    save_file(sd, str(folder / WEIGHTS), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config = copy.deepcopy(config)
        config.architectures = [_architecture(model)]
        floating = {v.dtype for v in sd.values() if v.is_floating_point()}
        if len(floating) == 1:
            config.dtype = floating.pop()
        config.save_pretrained(folder)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return sorted(p.name for p in folder.iterdir() if p.is_file())


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
    tokenizer: Any = None,
) -> Path:
    """Write checkpoint ``step`` atomically (see the module docstring); return its directory.

    ``trainer_state`` must be JSON-serialisable; ``tensor_state`` may hold tensors, numbers, strings,
    lists, tuples, dicts and None (what ``torch.load(weights_only=True)`` reads back).
    ``model_state`` / ``optimizer_state``: full state dicts gathered beforehand (an FSDP run, where
    gathering is a collective of every process and only rank 0 writes), written instead of
    ``model``'s and ``optimizer``'s own. ``tokenizer``: saved alongside (``save_pretrained``), so that
    the checkpoint is a complete Hugging Face model directory (:func:`write_model_files`).
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, step)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # (not mkdtemp, which makes it 0700: a checkpoint is as readable as the rest of its run)
    try:
        write_model_files(tmp, model, tokenizer, model_state=model_state)
        state = {
            "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **(tensor_state or {}),
        }
        torch.save(state, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1) + "\n")
        for item in tmp.iterdir():
            _fsync_file(item)
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
