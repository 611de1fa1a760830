"""The trainer's small runtime pieces: its errors, seeds, precision context, host transfers, memory."""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig

__all__ = ["RewardFunctionError", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the update was not applied and no checkpoint written."""


class RewardFunctionError(RuntimeError):
    """The reward function raised with ``task.strict_reward`` set."""


def stream_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for ``(run seed, step, stream)``: 0 sampling, 1 rule noise, 2 eval."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> 1)


def autocast(cfg: TrainConfig, device: torch.device):
    """The forwards' precision context: ``torch.autocast(bfloat16)`` for ``model.dtype = bfloat16`` (the
    parameters, gradients and optimizer state stay float32), else a no-op."""
    if cfg.model.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) so that a phase's wall time is its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kilobytes


def _malloc_trim():
    """glibc's ``malloc_trim(0)`` as a callable, or None (another C library, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def release_host_memory(device: torch.device) -> None:
    """Hand the heap memory that freed CPU tensors left behind back to the OS (CPU runs, glibc only).

    glibc keeps freed blocks for reuse, so after the rollout and each backward the process holds
    hundreds of MB it no longer uses, and the next phase's peak lands on top of them (BENCHMARKS.md:
    peak RSS of the SmolLM2 step 3.0-3.2 GiB without, 2.9 GiB with). About 3 ms per call.
    """
    if _TRIM is not None and device.type == "cpu":
        _TRIM(0)


def to_floats(metrics: dict[str, Any]) -> dict[str, float | None]:
    """Tensor values to python floats with one host transfer per device; order kept."""
    values = dict(metrics)
    by_device: dict[torch.device, list[str]] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(k)
    for keys in by_device.values():  # one transfer per device
        stacked = torch.stack([metrics[k].detach().reshape(()).double() for k in keys]).cpu().tolist()
        values.update(zip(keys, stacked, strict=True))
    return {k: (None if v is None else float(v)) for k, v in values.items()}
