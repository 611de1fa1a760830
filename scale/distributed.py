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

**FSDP** (``model.fsdp``, or ``accelerate launch --use_fsdp``; :func:`shard`): the same design with the
parameters, gradients and optimizer state sharded over the processes by FSDP2 (``fully_shard`` on every
decoder layer and on the root module, which keeps the embedding, final norm and lm_head). Three things
change:

- the training forward runs as the root module's ``forward`` (:func:`run_as_forward`), so FSDP's root
  hooks gather the root's weights (the trainer reads the lm_head weight itself), and each layer's
  hooks gather it around its call and reduce-scatter its gradient after the backward;
- no-grad passes (the rollout, scoring, evaluation, the JVP diagnostic) run with every weight gathered
  once (:func:`gathered`), as verl gathers the weights for its rollout engine: a decode loop would
  otherwise all-gather every layer at every token;
- the gradient reduction is FSDP's reduce-scatter with divide factor 1 (a sum, as above), and
  checkpoints hold full (unsharded) tensors in the 1-process layout (:func:`full_model_state`,
  :func:`full_optimizer_state`), so a run can resume with or without FSDP.

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
    "FSDP_ENV",
    "all_reduce_grads",
    "all_reduce_sum",
    "barrier",
    "broadcast_params",
    "check_replicated",
    "full_model_state",
    "full_optimizer_state",
    "full_tensor",
    "gather_rows",
    "gathered",
    "is_fsdp",
    "load_full_model_state",
    "load_full_optimizer_state",
    "owned_slices",
    "run_as_forward",
    "setup",
    "shard",
]

#: the environment variable ``accelerate launch --use_fsdp`` sets ("true")
FSDP_ENV = "ACCELERATE_USE_FSDP"


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
        if backend == "nccl":  # this process's GPU is the current device (nccl and FSDP's mesh use it)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
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


def check_replicated(x: torch.Tensor, d: Dist, what: str) -> None:
    """Raise ``RuntimeError`` unless ``x`` is the same on every process (a fingerprint all-gather).

    Every process samples and grades the whole batch itself (module docstring); this catches the
    processes drifting apart (e.g. a nondeterministic GPU kernel) before the rule runs on batches that
    differ. The fingerprint is ``(sum, position-weighted sum)`` of ``x`` in float64.
    """
    if not d.enabled:
        return
    import torch.distributed as dist

    v = x.detach().reshape(-1).to(torch.float64)
    pos = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device)
    fp = torch.stack([v.sum(), (v * pos).sum(), torch.tensor(float(v.numel()), dtype=torch.float64,
                                                            device=v.device)])  # fmt: skip
    parts = [torch.empty_like(fp) for _ in range(d.world)]
    dist.all_gather(parts, fp)
    bad = [r for r, p in enumerate(parts) if not torch.equal(p, parts[0])]
    if bad:
        raise RuntimeError(
            f"{what} differs between processes: rank(s) {bad} disagree with rank 0 (fingerprints "
            f"{[p.tolist() for p in parts]}); every process must sample the same global batch"
        )


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


# --------------------------------------------------------------------------------------------------
# FSDP2


def _fsdp_modules(model: torch.nn.Module) -> list:
    """The FSDP2-sharded modules in ``model`` (itself first when it is one)."""
    if not torch.distributed.is_available():  # pragma: no cover
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard(model: torch.nn.Module, d: Dist) -> None:
    """Shard ``model`` (a Hugging Face causal LM) over the ``d.world`` processes with FSDP2, in place.

    ``fully_shard`` on every decoder layer (gathered around its forward and backward, resharded after
    each) and on the root (the embedding, final norm and lm_head — tied or not — kept gathered from
    its forward to its backward). Gradients are **summed** over processes (divide factor 1): the trainer
    divides every loss by the global normaliser (module docstring). Call after :func:`broadcast_params`
    and before creating the optimizer (its parameters are then the ``DTensor`` shards).
    """
    from torch.distributed.fsdp import fully_shard

    if not d.enabled:
        raise ValueError(f"FSDP needs several processes (world size {d.world})")
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder.layers to shard")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=False)
    for m in _fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM for float32)


class gathered:
    """Context manager: every FSDP-sharded weight in ``model`` gathered once for a no-grad pass.

    Each FSDP module in ``model`` (the root and its sharded children: :func:`shard`'s layout, or
    accelerate's) is unsharded on entry (a collective: every process must enter) and kept gathered
    through its forwards; on exit each is resharded and gets back its reshard-after-forward setting.
    A no-op for a model without FSDP. Memory: one full copy of the weights per process, for the duration.
    """

    def __init__(self, model: torch.nn.Module):
        self.modules = _fsdp_modules(model)
        self.flags: list[bool] = []

    def __enter__(self):
        self.flags = [_reshards_after_forward(m) for m in self.modules]
        for m in self.modules:
            m.set_reshard_after_forward(False, recurse=False)
        for m in self.modules:
            m.unshard()
        return self

    def __exit__(self, *exc):
        for m, flag in zip(self.modules, self.flags, strict=True):  # (before reshard(): it keeps a module
            m.set_reshard_after_forward(flag, recurse=False)  # that does not reshard after forward gathered)
        for m in self.modules:
            m.reshard()
        return False


def _reshards_after_forward(m) -> bool:
    """``m``'s reshard-after-forward setting (FSDP2 has no public getter; True if it cannot be read)."""
    state = m._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch < 2.12: one group per module
        groups = [getattr(state, "_fsdp_param_group", None)]
    flags = [getattr(g, "_reshard_after_forward", None) for g in groups if g is not None]
    return bool(flags[0]) if flags and flags[0] is not None else True


def is_fsdp(model: torch.nn.Module, *, recurse: bool = False) -> bool:
    """Whether ``model`` (``recurse``: or any submodule) is sharded by FSDP2's ``fully_shard``."""
    if recurse:
        return bool(_fsdp_modules(model))
    if not torch.distributed.is_available():  # pragma: no cover
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def run_as_forward(model: torch.nn.Module, fn, *args):
    """``fn(*args)`` run as ``model``'s forward, so FSDP's root hooks wrap it (a plain call without FSDP).

    The root's pre-forward gathers its own weights (read directly by ``fn``: the lm_head weight), its
    post-forward registers the backward hooks that reduce-scatter every gradient at the end of the
    backward. ``fn`` returns a tuple of tensors (or None).
    """
    if not is_fsdp(model):
        return fn(*args)
    model.forward = fn  # an instance attribute: nn.Module.__call__ runs the hooks around it
    try:
        return model(*args)
    finally:
        del model.forward


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (a collective), ``t`` itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _tied_groups(model: torch.nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return list(by_id.values())


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) CPU state dict of an FSDP ``model`` on rank 0, ``{}`` elsewhere (a collective).

    A tied weight appears once, under the alphabetically first of its names (the one
    ``safetensors.torch.save_model`` keeps for an unsharded model, e.g. ``lm_head.weight``).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_state_dict_options(cpu_offload=True))
    for names in _tied_groups(model):
        for extra in sorted(names)[1:]:
            sd.pop(extra, None)
    return sd


def load_full_model_state(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every process passes it) into an FSDP ``model``; tied names restored."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    sd = dict(sd)
    for names in _tied_groups(model):
        have = [n for n in names if n in sd]
        for n in names:
            if n not in sd and have:
                sd[n] = sd[have[0]]
    set_model_state_dict(model, sd, options=_state_dict_options())


def _param_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters in ``model.parameters()`` order (the optimizer's indices)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state on rank 0 (``{}`` elsewhere; a collective), in the layout of a
    1-process ``optimizer.state_dict()`` (parameters numbered in ``model.parameters()`` order)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_state_dict_options(cpu_offload=True))
    if not osd:
        return {}
    index = {n: i for i, n in enumerate(_param_names(model))}
    return {
        "state": {index[n]: v for n, v in osd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]],
    }


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, osd: dict) -> None:
    """Load a 1-process-layout optimizer state (every process passes it) into the optimizer of an FSDP
    ``model`` (:func:`full_optimizer_state`'s inverse)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model)
    fqn = {
        "state": {names[i]: v for i, v in osd["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, fqn, options=_state_dict_options())
