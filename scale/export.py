"""``entdyn export RUN_DIR OUT [--step N]``: a run's checkpoint as a clean Hugging Face model directory.

A checkpoint (:mod:`scale.checkpoint`) is already a Hugging Face model directory, but it also holds what
only a resumed run needs: the optimizer and RNG states (``state.pt``, twice the weights' size with AdamW),
``trainer_state.json`` and ``manifest.json``. :func:`export` writes the model files alone into ``OUT``:
``config.json``, ``generation_config.json``, ``model.safetensors`` and the tokenizer's files, which
``AutoModelForCausalLM.from_pretrained(OUT)`` / ``AutoTokenizer.from_pretrained(OUT)`` load (tested), in the
layout that vLLM serves and ``hf upload`` shares (neither tried here: no vLLM wheel, no network).

Which checkpoint: the one of ``--step N``, else the newest one that verifies
(:func:`scale.checkpoint.verify_checkpoint`, and for one without a manifest, whose weights load); each
damaged newer one is skipped with a message (and left where it is: an export never changes the run
directory). A checkpoint written before checkpoints held ``config.json`` gets its config and tokenizer
from the base model that the run directory's ``config.yaml`` names (``model.name``, loaded through
:func:`scale.models.load_model`), with the checkpoint's weights loaded into it strictly.

``OUT`` is written atomically: into a temp directory beside it, every file fsynced, then renamed into
place (an existing ``OUT`` with ``overwrite`` is moved aside first and deleted after). User errors (no such
run directory, no checkpoint, no such step, ``OUT`` not empty without ``overwrite``) raise
:class:`ExportError` with one line naming the value and the fix; the CLI prints it and exits 2.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .checkpoint import (
    CHECKPOINTS,
    MANIFEST,
    TRAINING_FILES,
    WEIGHTS,
    _fsync_dir,
    _fsync_file,
    checkpoint_dir,
    list_checkpoints,
    verify_checkpoint,
    write_model_files,
)

__all__ = ["ExportError", "export", "select_checkpoint"]


class ExportError(ValueError):
    """A user error of :func:`export` (a bad ``RUN_DIR``, ``OUT`` or ``--step``); the message is one line
    that names the value and the fix."""


def _check_run_dir(run_dir: Path) -> list[Path]:
    """The run's checkpoints (oldest first); :class:`ExportError` when there is none to export."""
    if not run_dir.is_dir():
        what = "is a file, not" if run_dir.exists() else "does not exist; pass"
        raise ExportError(f"run directory {str(run_dir)!r} {what} the --out directory of an entdyn train run")
    found = list_checkpoints(run_dir)
    if found:
        return found
    if (run_dir / "state.pt").is_file() and run_dir.parent.name == CHECKPOINTS:
        raise ExportError(
            f"{str(run_dir)!r} is a checkpoint, not a run directory; pass {str(run_dir.parent.parent)!r} "
            f"and --step {int(run_dir.name[5:]) if run_dir.name[5:].isdigit() else 'N'}"
        )
    raise ExportError(
        f"run directory {str(run_dir)!r} holds no checkpoint ({CHECKPOINTS}/step_*); let the run write one "
        "(--save-every N, or the end of the run), then export"
    )


def _check_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    """:class:`ExportError` unless ``out`` can become the exported directory without losing anything."""
    real_out, real_run = out.resolve(), run_dir.resolve()
    if real_run == real_out or real_out in real_run.parents:
        raise ExportError(f"OUT {str(out)!r} holds the run directory {str(run_dir)!r}; pass an OUT outside")
    if real_run / CHECKPOINTS in (real_out, *real_out.parents):
        raise ExportError(f"OUT {str(out)!r} is inside the run's {CHECKPOINTS}/; pass an OUT outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT {str(out)!r} is a file; pass a directory that does not exist yet or is empty")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(
            f"OUT {str(out)!r} exists and is not empty; pass --overwrite to replace it, or another OUT"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _steps(found: list[Path]) -> str:
    return ", ".join(str(int(p.name[5:])) for p in found)


def _damage(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be exported (one line), or None.

    :func:`verify_checkpoint`; a checkpoint without a manifest (nothing vouches for its bytes) must
    also have weights that load."""
    why = verify_checkpoint(path)
    if why is not None or (path / MANIFEST).is_file():
        return why
    from safetensors.torch import load_file

    try:
        load_file(str(path / WEIGHTS))
    except Exception as err:  # a truncated or overwritten file: safetensors raises its own error types
        return f"{WEIGHTS} does not load ({type(err).__name__}: {_first_line(err)})"
    return None


def select_checkpoint(
    run_dir: str | Path, step: int | None = None, *, report: Callable[[str], None] | None = None
) -> Path:
    """The checkpoint to export: ``step``'s (which must be intact), else the newest intact one.

    Each damaged newer checkpoint is skipped with ``report(message)``; nothing is moved or deleted.
    Raises :class:`ExportError` when there is no such step, it is damaged, or none is intact."""
    run_dir = Path(run_dir)
    found = _check_run_dir(run_dir)
    if step is not None:
        path = checkpoint_dir(run_dir, step)
        if path not in found:
            raise ExportError(
                f"run {str(run_dir)!r} has no checkpoint of step {step}; its checkpoints are of step(s) "
                f"{_steps(found)}: pass one of them to --step, or leave --step out for the newest"
            )
        why = _damage(path)
        if why is not None:
            raise ExportError(
                f"checkpoint {path.name} of {str(run_dir)!r} is damaged ({why}); pass another --step "
                f"({_steps(found)}), or leave --step out for the newest intact one"
            )
        return path
    for path in reversed(found):
        why = _damage(path)
        if why is None:
            return path
        if report is not None:
            report(f"skipped checkpoint {path.name}: {why}")
    raise ExportError(
        f"no checkpoint of {str(run_dir)!r} is intact (step(s) {_steps(found)}; see above); resume the run "
        f"(entdyn train --resume {run_dir}) to write a new one"
    )


def _copy_model_files(src: Path, dest: Path) -> None:
    """A checkpoint of the Hugging Face layout: every file but :data:`scale.checkpoint.TRAINING_FILES`."""
    for item in sorted(src.iterdir()):
        if item.is_file() and item.name not in TRAINING_FILES:
            shutil.copyfile(item, dest / item.name)


def _rebuild_model_files(src: Path, dest: Path, run_dir: Path) -> None:
    """A checkpoint written before checkpoints held ``config.json``: the base model of ``config.yaml``
    (its config and tokenizer) with the checkpoint's weights loaded strictly, written out."""
    import torch
    from safetensors.torch import load_model as load_weights

    from .config import ConfigError
    from .flags import config_from_dict, load_config_file, saved_config_path
    from .models import load_model

    old = f"checkpoint {src.name} predates config.json in checkpoints"
    try:
        cfg = config_from_dict(load_config_file(saved_config_path(run_dir)))
    except (ConfigError, ValueError, OSError) as err:
        why = _first_line(err)
        raise ExportError(f"{old}, and the run's config cannot tell its base model: {why}") from None
    m = cfg.model
    try:
        model, tok = load_model(m.name, seed=cfg.run.seed, cache_dir=m.cache_dir)  # float32, on the CPU
    except (ValueError, ImportError, OSError) as err:  # the base model is gone, or its wheel is missing
        why = _first_line(err)
        raise ExportError(f"{old}; rebuilding it needs the run's base model {m.name!r}: {why}") from None
    if m.dtype == "float64":  # as the trainer ran it (scale.train.setup.load_model)
        model = model.to(torch.float64)
    try:
        load_weights(model, str(src / WEIGHTS), strict=True)
    except RuntimeError as err:
        raise ExportError(
            f"{old}, and its weights do not fit the run's base model {m.name!r} "
            f"({str(err).splitlines()[-1].strip()})"
        ) from None
    write_model_files(dest, model, tok)


def _publish(tmp: Path, out: Path) -> None:
    """fsync ``tmp``'s files and itself, then rename it to ``out`` (an existing ``out`` moved aside first)."""
    for item in tmp.iterdir():
        _fsync_file(item)
    _fsync_dir(tmp)
    if out.exists():
        aside = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(out, aside)
        os.rename(tmp, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, out)
    _fsync_dir(out.parent)


def export(
    run_dir: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    overwrite: bool = False,
    report: Callable[[str], None] | None = None,
) -> tuple[Path, Path]:
    """Write the model files of ``run_dir``'s checkpoint (``step``'s, else the newest intact one) into
    ``out`` (see the module docstring); return ``(out, the checkpoint exported)``.

    ``overwrite`` replaces a non-empty ``out``; ``report(message)`` hears of each damaged checkpoint
    skipped. Raises :class:`ExportError` for a user error (nothing is written then)."""
    run_dir, out = Path(run_dir), Path(out)
    _check_run_dir(run_dir)
    _check_out(out, run_dir, overwrite)
    src = select_checkpoint(run_dir, step, report=report)
    dest = out.resolve()  # (``OUT`` may be ``.``, whose name is empty)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
    except OSError as err:
        why = err.strerror or err
        raise ExportError(f"cannot create OUT {str(out)!r} ({why}); pass another OUT") from None
    try:
        if (src / "config.json").is_file():
            _copy_model_files(src, tmp)
        else:
            _rebuild_model_files(src, tmp, run_dir)
        _publish(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out, src
