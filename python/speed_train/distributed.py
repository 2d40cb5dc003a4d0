"""torchrun for the training loop: this process's rank and device, the process group it joins,
and the few collectives the loop uses (each a no-op on one rank).

Under torchrun (WORLD_SIZE > 1) the trainer joins the process group itself (gloo on CPU, NCCL on
CUDA) and leaves it on close; one model replica per rank under DDP, the global batch divided
among the ranks, every rank's losses gathered when the strategy learns from them.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["ranks_from_env", "pick_device", "join_process_group", "leave_process_group", "learns_from_losses",
           "wrap_ddp", "mean_over_ranks", "gather_cat", "average_gradients", "any_rank", "max_over_ranks",
           "barrier", "gather_objects", "broadcast_from_main"]


def ranks_from_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) outside torchrun."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def join_process_group(device: torch.device, world_size: int) -> bool:
    """Join torchrun's process group unless there is one already (or a single rank); True when
    this call created it (the caller then leaves it: :func:`leave_process_group`)."""
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return True
    return False


def leave_process_group() -> bool:
    """Destroy the process group; False when there was none."""
    if dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


def learns_from_losses(strategy) -> bool:
    """True when the strategy's update() uses the losses (importance sampling), directly or
    inside a combination: only then must every rank see every rank's losses."""
    parts = [getattr(strategy, "sampling", None), getattr(strategy, "weighting", None)]
    if any(p is not None for p in parts):
        return any(learns_from_losses(p) for p in parts if p is not None)
    from speed_kernels.strategies import Strategy

    return getattr(strategy, "dynamic", False) and type(strategy).update is not Strategy.update


def wrap_ddp(model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """The model behind DDP on several ranks (the model itself on one)."""
    if world_size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


# ---------------------------------------------------------------------------------- collectives
# each returns its input unchanged (or does nothing) on one rank


def mean_over_ranks(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """``t`` averaged over the ranks, in place."""
    if world_size > 1:
        dist.all_reduce(t)
        t /= world_size
    return t


def gather_cat(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's ``t`` (same shape on each), concatenated in rank order."""
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def average_gradients(params, world_size: int) -> None:
    """Average the gradients of parameters DDP does not manage."""
    if world_size > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world_size)


def any_rank(flag: torch.Tensor, world_size: int) -> torch.Tensor:
    """A boolean flag, true on every rank when it is true on any."""
    if world_size > 1:
        f = flag.to(torch.int32)
        dist.all_reduce(f, op=dist.ReduceOp.MAX)
        flag = f.bool()
    return flag


def max_over_ranks(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """The largest of every rank's ``t`` (a copy)."""
    t = t.clone()
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def gather_objects(obj, world_size: int) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    if world_size <= 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj, world_size: int):
    """Rank 0's picklable ``obj`` on every rank."""
    if world_size <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
