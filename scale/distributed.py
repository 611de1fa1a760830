r"""Multi-process training for :mod:`scale.train`: rank layout, global gathers, gradient sum-reduction.

Started by ``torchrun --nproc_per_node N -m scale.train ...`` or ``accelerate launch --num_processes N -m
scale.train ...`` (both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``), or by a
caller that has already run ``torch.distributed.init_process_group`` (the tests). Backend: ``gloo`` on CPU,
``nccl`` on CUDA (each process then uses ``cuda:LOCAL_RANK``).

**The design, one step with ``W`` processes** (see ``docs/scaling.md``):

1. every process samples the **whole** step's rollout with the per-step seed (the 1-process stream), so
   the global batch is the 1-process batch exactly; generation is replicated, not split (the simple, exact
   choice; it costs ``W``-fold generation);
2. each process owns ``1/W`` of every minibatch (:func:`owned_slices`): it scores only its rows (the
   behaviour statistics, the reference model, the training forward/backward);
3. the per-token statistics are all-gathered (:func:`gather_rows`, equal shapes: every process holds the
   same padded layout), so every process runs the rule **once on the identical global**
   :class:`theory.rules.TokenBatch` with identical noise: Clip_B's mean/std, Clip_V's std and cap,
   Clip-Cov's centring and top-k, KL-Cov's top-k, the entropy quantile and PPL's group statistics are
   global-batch statistics, never per rank or per micro-batch;
4. the loss of a process's micro-batch is divided by the **global** minibatch normaliser, so the sum over
   processes of their gradients is the 1-process gradient; :func:`all_reduce_grads` sums them (one
   coalesced all-reduce per optimizer update, after the micro-batches have accumulated). Every process
   then clips the same global gradient and applies the same optimizer step, so the replicas stay equal.

Why not ``DistributedDataParallel``: the trainer's forward calls the decoder and the lm_head weight
directly (chunked token statistics, never the full logits; forward-mode JVP for the diagnostics), which
bypasses DDP's ``forward`` and so its reducer; and DDP *averages* gradients, which would need the loss
scaled by ``W``. A sum-reduction after accumulation is what DDP with ``no_sync`` does on the last
micro-batch, without the overlap of communication and backward (a cost, not a difference in the result).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = [
    "Dist",
    "all_reduce_grads",
    "all_reduce_sum",
    "barrier",
    "broadcast_params",
    "gather_rows",
    "owned_slices",
    "setup",
]


@dataclass(frozen=True)
class Dist:
    """This process's place: ``rank`` of ``world`` (``local_rank`` picks the GPU)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "cpu") -> Dist:
    """The process group of this run: an initialised one, one from the launcher's environment, or none.

    With ``WORLD_SIZE > 1`` in the environment and no group yet, initialises one (``nccl`` for a CUDA
    ``device``, ``gloo`` otherwise) from the ``env://`` variables torchrun and accelerate set.
    """
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - every supported torch build has it
        return Dist()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Dist()
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


def owned_slices(n_seqs: int, minibatches: int, world: int, rank: int) -> list[slice]:
    """Rows of the global batch that ``rank`` trains on: the ``rank``-th ``1/world`` of every minibatch.

    >>> owned_slices(8, 2, 2, 1)
    [slice(2, 4, None), slice(6, 8, None)]
    """
    mb = n_seqs // minibatches
    share = mb // world
    return [slice(k * mb + rank * share, k * mb + (rank + 1) * share) for k in range(minibatches)]


def row_index(slices: list[slice], device=None) -> torch.Tensor:
    """The rows of ``slices`` as one long index tensor."""
    return torch.cat([torch.arange(s.start, s.stop, device=device) for s in slices])


def gather_rows(x: torch.Tensor, d: Dist, n_seqs: int, minibatches: int) -> torch.Tensor:
    """The global ``(n_seqs, ...)`` tensor from every process's owned rows ``x`` (in
    :func:`owned_slices` order; every process passes the same shape). Identity with one process."""
    if not d.enabled:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(d.world)]
    dist.all_gather(parts, x.contiguous())
    out = x.new_empty((n_seqs, *x.shape[1:]))
    for r, part in enumerate(parts):
        out[row_index(owned_slices(n_seqs, minibatches, d.world, r), x.device)] = part
    return out


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """The sum over processes of ``x`` (a new tensor; ``x`` itself with one process)."""
    if not d.enabled:
        return x
    import torch.distributed as dist

    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def all_reduce_grads(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Sum the gradients of ``params`` over processes in place (one flat all-reduce per dtype).

    A parameter without a gradient on every process keeps ``grad = None`` (as with one process, so the
    optimizer skips it); one with a gradient on some processes only counts as zeros on the others.
    """
    if not d.enabled:
        return
    import torch.distributed as dist

    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.SUM)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p, n in zip(params, has.tolist(), strict=True):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def broadcast_params(model: torch.nn.Module, d: Dist) -> None:
    """Copy rank 0's parameters and buffers to every process (replicas start equal)."""
    if not d.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()
