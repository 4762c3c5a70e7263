"""Multi-process (DDP) training helpers: process group, autograd-aware gathers, sharding.

deepmetric trains on several GPUs or nodes with ``torchrun`` and
:class:`torch.nn.parallel.DistributedDataParallel` (DDP). The losses must see the **global**
batch: a pair-based loss on the local batch alone misses every pair across ranks. The recipe,
used by the trainer and reproducible by hand::

    rank, world_size, local_rank = init_distributed()     # (0, 1, 0) without torchrun
    model = wrap_model(model.to(device), sync_bn=False)    # DDP; the model itself if W = 1
    emb = model(images)                                    # (B_r, d): this rank's rows
    global_emb, global_labels = gather_batch(emb, labels)  # (B, d), (B,) in rank order
    loss = criterion(global_emb, global_labels)            # true global loss, same on all ranks
    loss.backward()                                        # DDP average = 1-process gradient

Why there is no world-size factor anywhere (unlike pytorch-metric-learning's
``DistributedLossWrapper``, whose returned loss is W x the true loss): see
:func:`all_gather_with_grad`.

Every function here works unchanged in a single process: the gathers are identities, the
rank is 0, the world size is 1, :func:`wrap_model` returns the model itself.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "all_gather",
    "all_gather_with_grad",
    "average_gradients",
    "barrier",
    "broadcast_buffers",
    "broadcast_object",
    "destroy_distributed",
    "gather_batch",
    "gather_eval",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "max_over_ranks",
    "shard_indices",
    "sum_over_ranks",
    "unwrap_model",
    "wrap_model",
]

DEFAULT_TIMEOUT_S = 1800.0


# --------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """True when a default process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes W (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_local_rank() -> int:
    """Rank within this node (``LOCAL_RANK`` set by torchrun; 0 when not launched by it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that logs, plots and saves."""
    return get_rank() == 0


def init_distributed(
    backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[int, int, int]:
    """Join the process group described by torchrun's environment; return (rank, W, local_rank).

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by
    ``torchrun``, also for multi-node rendezvous). Without them, or with ``WORLD_SIZE=1``, it
    does nothing and returns ``(0, 1, 0)``. If a group already exists it is reused.

    backend: ``None`` picks ``"nccl"`` when CUDA is available, else ``"gloo"`` (CPU).
        With NCCL the CUDA device is set to ``cuda:LOCAL_RANK`` before the group is created.
    timeout_s: collective timeout. A rank that crashes or stalls makes the others raise a
        ``RuntimeError`` (gloo: at once when the peer's socket closes, or after the timeout;
        NCCL: the watchdog aborts the communicator after the timeout) instead of hanging forever.
        torchrun then stops the remaining workers and the job ends with an error.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), get_local_rank()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun "
            "(torchrun --nproc-per-node N -m deepmetric train ...)"
        )
    rank = int(os.environ["RANK"])
    local_rank = get_local_rank()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                "visible: use --nproc-per-node <= number of GPUs per node"
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=float(timeout_s)),
    )
    return rank, world_size, local_rank


def destroy_distributed() -> None:
    """Leave the process group (no-op when none). Call once at the end of training."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (e.g. BatchNorm running statistics) to every rank, in place.

    DDP broadcasts rank 0's buffers before each training forward, but the forward itself then
    updates each rank's copy with that rank's batch: after the last step the ranks' running
    statistics differ until the next forward. Call this before evaluating on every rank.
    No-op when not distributed.
    """
    if not is_distributed():
        return
    for buffer in module.buffers():
        device = _comm_device(buffer)
        data = buffer.detach().to(device)
        dist.broadcast(data, src=src)
        buffer.copy_(data.to(buffer.device))


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":  # name the device: no guessing from the rank
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def max_over_ranks(value: int) -> int:
    """The largest ``value`` of all ranks, on every rank (one all-reduce of one integer: a
    host sync); ``value`` itself when not distributed. E.g. "did any rank get a signal"."""
    if not is_distributed():
        return int(value)
    device = _comm_device(torch.empty(0))
    box = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def sum_over_ranks(counts: Tensor) -> None:
    """Sum ``counts`` over the ranks, in place (nothing when not distributed): the pair counts
    of the verification metrics, each rank having counted its share."""
    if not is_distributed():
        return
    device = _comm_device(counts)
    if counts.device == device:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return
    moved = counts.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    counts.copy_(moved)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return ``src``'s picklable ``obj`` on every rank (identity when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------------
# Gathers
# --------------------------------------------------------------------------------------------


def _comm_device(x: Tensor) -> torch.device:
    """Device the collective must run on: NCCL needs CUDA tensors, gloo works on CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    """First-dimension size of every rank's tensor, in rank order."""
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _all_gather_cat(x: Tensor) -> tuple[Tensor, list[int]]:
    """Concatenate every rank's ``x`` along dim 0 in rank order; sizes along dim 0 may differ.

    Sizes are exchanged first; each rank pads to the largest size, the padded blocks are
    all-gathered and the padding is cut off again. Returns (gathered, sizes). No autograd.
    """
    device = _comm_device(x)
    xc = x.detach().to(device).contiguous()
    is_bool = xc.dtype == torch.bool
    if is_bool:  # NCCL has no bool collectives
        xc = xc.to(torch.uint8)
    sizes = _gather_sizes(xc.shape[0], device)
    n_max = max(sizes)
    if xc.shape[0] < n_max:
        pad = xc.new_zeros((n_max - xc.shape[0], *xc.shape[1:]))
        xc = torch.cat([xc, pad])
    blocks = [torch.empty_like(xc) for _ in sizes]
    dist.all_gather(blocks, xc)
    out = torch.cat([b[:n] for b, n in zip(blocks, sizes)])
    if is_bool:
        out = out.bool()
    return out.to(x.device), sizes


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0 (rank order). Backward: sum over ranks, own slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        gathered, sizes = _all_gather_cat(x)
        rank = dist.get_rank()
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return gathered

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        device = _comm_device(grad_output)
        grad = grad_output.to(device).contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop].to(grad_output.device)


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0, in rank order, keeping the autograd graph.

    x: (B_r, ...) on this rank; the B_r may differ between ranks (sizes are exchanged first).
    Returns (B, ...) with B = sum_r B_r; rows ``offset_r : offset_r + B_r`` are rank r's ``x``
    (``offset_r = B_0 + ... + B_{r-1}``), and on this rank they are ``x`` itself, bit for bit.
    Identity when not distributed.

    Backward (reduce-scatter semantics): the incoming gradient dL_s/dG of every rank s is
    summed over ranks (all-reduce) and each rank keeps the rows of its own slice:

        grad_x on rank r = sum_s dL_s / d f_r            (f_r = rank r's rows of G)

    **Why this gives exactly the single-process gradient, with no world-size factor.** DDP
    averages parameter gradients over the W ranks, i.e. it optimises (1/W) sum_s L_s. When every
    rank computes the *same* global loss L on the gathered batch (the deepmetric recipe), the
    rank-r embedding gradient is sum_s dL/df_r = W dL/df_r, the rank-r parameter gradient is
    W (dL/df_r)(df_r/dθ), and DDP's average is

        (1/W) sum_r W (dL/df_r)(df_r/dθ) = sum_r (dL/df_r)(df_r/dθ) = dL/dθ,

    the gradient one process computes on the whole batch. The loss *value* is the true global
    loss (what one process reports), not W x it. The same argument holds when the ranks compute
    different losses L_s (e.g. local anchors against gathered references): the result is the
    gradient of (1/W) sum_s L_s, the objective DDP optimises.

    Contrast: a gather whose backward only keeps the local slice of the local gradient
    (``torch.distributed.all_gather`` into a list and re-inserting the local tensor, as
    pytorch-metric-learning's ``DistributedLossWrapper`` does) yields dL/df_r only; after DDP's
    average the gradient is 1/W of the truth, which that wrapper compensates by multiplying the
    loss by W, so it reports W x the loss, and its "efficient" mode re-weights gradients.

    Parameters that live outside DDP (e.g. the learnable β of the margin loss) see the global
    loss directly: their gradient is already dL/dβ on every rank (see :func:`average_gradients`
    to keep them bit-identical across ranks).
    """
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order, without gradient.

    For labels, indices and evaluation embeddings; sizes may differ between ranks.
    Identity when not distributed.
    """
    if not is_distributed():
        return x
    return _all_gather_cat(x)[0]


def gather_batch(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(global_embeddings (B, d) with gradient, global_labels (B,)) in rank order.

    The global batch every rank gives to the loss (and to CrossBatchMemory, so that all ranks
    enqueue the same rows in the same order and keep identical memories). Identity when not
    distributed.
    """
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(
            f"embeddings ({embeddings.shape[0]} rows) and labels ({labels.shape[0]}) differ"
        )
    return all_gather_with_grad(embeddings), all_gather(labels)


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks for parameters DDP does not manage (e.g. a loss's β).

    With the global loss computed on every rank these gradients are already equal on all ranks;
    averaging costs one small all-reduce and rules out any drift from non-deterministic kernels.
    No-op when not distributed.
    """
    if not is_distributed():
        return
    world_size = dist.get_world_size()
    for p in parameters:
        if p.grad is None:
            continue
        device = _comm_device(p.grad)
        g = p.grad.detach().to(device).contiguous()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        p.grad.copy_(g.to(p.grad.device) / world_size)


# --------------------------------------------------------------------------------------------
# Evaluation sharding
# --------------------------------------------------------------------------------------------


def shard_indices(n: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """This rank's contiguous share of range(n) for sharded evaluation.

    Rank r gets ``range(r * n // W, (r + 1) * n // W)``: shards differ by at most one item,
    every index appears exactly once (no padding, unlike ``DistributedSampler``), and the
    concatenation in rank order is range(n). Use with ``torch.utils.data.Subset``.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    return list(range(rank * n // world_size, (rank + 1) * n // world_size))


def gather_eval(
    embeddings: Tensor, labels: Tensor, indices: Sequence[int] | Tensor
) -> tuple[Tensor, Tensor]:
    """Gather every rank's evaluation shard and restore dataset order.

    embeddings (n_r, d), labels (n_r,): what this rank embedded; indices (n_r,): the dataset
    index of each row. Shards may have different sizes. Returns (emb (N, d), labels (N,)) on
    every rank, rows sorted by dataset index (an index present on several ranks, e.g. from a
    padding sampler, is kept once), so metrics equal those of a single process. Without a
    process group the rows are only sorted by index.
    """
    indices = torch.as_tensor(indices, dtype=torch.long, device=embeddings.device)
    if not embeddings.shape[0] == labels.shape[0] == indices.shape[0]:
        raise ValueError(
            f"embeddings ({embeddings.shape[0]}), labels ({labels.shape[0]}) and indices "
            f"({indices.shape[0]}) must have the same length"
        )
    embeddings = all_gather(embeddings.detach())
    labels = all_gather(labels.to(embeddings.device))
    indices = all_gather(indices)
    order = torch.argsort(indices, stable=True)
    sorted_idx = indices[order]
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    order = order[keep]
    return embeddings[order], labels[order]


# --------------------------------------------------------------------------------------------
# Model wrapping
# --------------------------------------------------------------------------------------------


def wrap_model(
    model: nn.Module,
    sync_bn: bool = False,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """Wrap a model (already on its device) in DDP; return it unchanged when not distributed.

    sync_bn: convert BatchNorm layers to :class:`torch.nn.SyncBatchNorm`, so batch statistics
        are computed over the global batch (needs GPUs: on CPU a warning is issued and the
        per-rank BatchNorm is kept). Layers frozen in eval mode stay frozen: SyncBatchNorm
        behaves like BatchNorm in eval mode.
    find_unused_parameters: passed to DDP (needed only if some parameters get no gradient).
    On CUDA, DDP's ``device_ids`` is the model's device. Use :func:`unwrap_model` to reach
    the original module (for ``state_dict`` in checkpoints).
    """
    if not is_distributed():
        return model
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            warnings.warn(
                "sync_bn needs CUDA devices; keeping per-rank BatchNorm on " + device.type,
                stacklevel=2,
            )
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index],
            output_device=device.index,
            find_unused_parameters=find_unused_parameters,
        )
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
