"""DDP for training: join torchrun's process group, collectives that are no-ops alone, wrapping.

Under ``torchrun`` every rank trains on its shard (NCCL on GPU, gloo on CPU); alone (no
``WORLD_SIZE``, or 1) every function here returns at once without touching
``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from tilenet.runtime import resolve_device

__all__ = [
    "Dist",
    "all_reduce_sum",
    "barrier",
    "broadcast",
    "gather",
    "init",
    "rank",
    "wrap",
]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size and local rank (GPU index)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK``, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0"))


def init(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (if any) and pick this rank's device."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name, option="train.device")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank=local, option="train.device")
    # DDP (and torch.compile) import torch._dynamo, which imports
    # torch.distributed.nn.functional: its functions bind ``group.WORLD`` as a default
    # argument when the module is first imported. Imported after init_process_group, they
    # pin the default group for good: destroy_process_group() then cannot free it, and
    # its gloo threads and sockets live on into interpreter exit, where a rank aborted now
    # and then ("terminate called without an active exception"). Imported now, while there
    # is no default group, they bind None.
    import torch._dynamo
    import torch.distributed.nn

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local), device


def barrier(d: Dist) -> None:
    """Wait for every rank."""
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, d: Dist) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """``t`` summed over ranks, in place; returns it."""
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap(
    model: torch.nn.Module, d: Dist, device: torch.device, *, compile: bool
) -> tuple[torch.nn.Module, Any]:
    """``(net, forward)``: ``model`` in DDP when distributed, and ``net`` compiled if asked.

    DDP syncs the parameters that require grad when it wraps: call again (rewrap) when that
    set changes, as when a frozen encoder thaws.
    """
    net: torch.nn.Module = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Parameters of layers the forward never calls (an smp encoder's stages past
        # encoder_depth) get no gradient: DDP must be told to look for them.
        called = getattr(getattr(model, "analysis", None), "called", None)
        unused = called is not None and any(
            p.requires_grad and name.rpartition(".")[0] not in called
            for name, p in model.named_parameters()
        )
        net = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused,
        )
    return net, torch.compile(net) if compile else net
