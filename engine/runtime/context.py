"""The rank context: this process's rank, world size and device, and the collectives the engine
uses (sums, max, broadcast and gather of objects, barrier); rank 0 of 1 works without a group."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """This process's place in the run; works unlaunched as rank 0 of 1 (STYLE.md lesson 4).

    Attributes:
        rank, world_size, local_rank: as given by the launcher.
        device: the torch device this rank computes on (cuda:local_rank or cpu).
        backend: "nccl", "gloo" or None when no process group exists (world size 1).
        launcher: "torchrun" | "slurm" | "mpi" | "single" | "explicit".
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    launcher: str = "single"
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def print0(self, *args, **kwargs) -> None:
        """print() on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def seed(self, base_seed: int, offset: int | None = None) -> int:
        """A per-rank seed (base + 1,000,003 x rank, a prime stride so nearby seeds never collide)."""
        return (base_seed + 1_000_003 * (self.rank if offset is None else offset)) % (2**63)

    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if not self.distributed:
            return tensor
        if self.backend == "nccl" and tensor.device.type != "cuda":  # NCCL reduces GPU tensors only
            on_device = tensor.to(self.device)
            dist.all_reduce(on_device, op=op)
            tensor.copy_(on_device.cpu())
        else:
            dist.all_reduce(tensor, op=op)
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (no-op on one rank; CPU tensors work with NCCL too); returns it."""
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place maximum over ranks; returns the tensor."""
        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def broadcast_object(self, obj):
        """Rank 0's Python object on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out
