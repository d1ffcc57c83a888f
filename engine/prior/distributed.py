"""Rank helpers for the prior trainer: they work unlaunched (rank 0 of 1, no process group),
under torchrun (RANK / WORLD_SIZE / LOCAL_RANK) and with an explicit init method (tests use
file:// rendezvous, no ports). Backend: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank_info(device: str = "auto") -> RankInfo:
    """Rank, world size and device from the environment (rank 0 of 1 when not launched)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
    return RankInfo(rank, world, local, dev)


def init_distributed(device: str = "auto", init_method: str | None = None) -> RankInfo:
    """Start the process group if WORLD_SIZE > 1 (idempotent) and return this rank's info."""
    info = env_rank_info(device)
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        if info.device.type == "cuda":
            torch.cuda.set_device(info.device)
        dist.init_process_group(backend, init_method=init_method or "env://",
                                rank=info.rank, world_size=info.world_size)
    return info


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a float over ranks (the value itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["RankInfo", "all_reduce_mean", "barrier", "env_rank_info", "init_distributed", "shutdown"]
