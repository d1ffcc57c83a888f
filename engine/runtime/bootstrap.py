"""Rank bootstrap: which launcher started this process, joining (and leaving) its process group.

engine.runtime is the only package that knows about process groups (this module, the rank
context with its collectives in context.py, the trunk gradient sync in trunk_sync.py, local
groups for tests in local_group.py); models and loops stay distribution-agnostic (STYLE.md lesson 1).

Launchers, detected in this order from the environment:
  torchrun  RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  SLURM     SLURM_PROCID, SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_ID
            (only inside an `srun` step, so a plain `python` in a batch script is not mistaken
            for rank 0 of N), master = first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST /
            SLURM_NODELIST, port = MASTER_PORT or 29500 + SLURM_JOB_ID % 1000
  MPI       PMI_RANK (MPICH/Hydra), OMPI_COMM_WORLD_RANK (Open MPI), PMIX_RANK, MV2_COMM_WORLD_RANK:
            rank and world size from mpi4py's COMM_WORLD, rank 0 broadcasts host and a free port
  single    none of the above: rank 0 of 1, no process group
Backend: NCCL when the device is CUDA, gloo otherwise.
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.runtime.context import DistContext

DEFAULT_MASTER_PORT = 29500
_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, as read from its launcher's environment."""

    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list, without calling scontrol.

    Examples: "node[01-04],gpu7" -> "node01"; "gpu7,node[1,3]" -> "gpu7"; "a-b[009-010]" -> "a-b009".
    """
    text = nodelist.strip()
    if not text:
        raise ValueError("empty SLURM node list")
    match = re.match(r"([^,\[]+)(\[([^\]]*)\])?", text)
    if match is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(3)
    if ranges is None:
        return prefix
    first_range = ranges.split(",")[0]
    return prefix + first_range.split("-")[0]  # keep zero padding: "01-04" -> "01"


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as error:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from error


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size and rendezvous address from the launcher's environment.

    For MPI this queries mpi4py (imported lazily) for rank/size and broadcasts rank 0's address.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            "torchrun",
            _int_env(env, "RANK"),
            _int_env(env, "WORLD_SIZE"),
            _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            env.get("MASTER_ADDR"),
            _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
        )
    in_srun_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if "SLURM_PROCID" in env and in_srun_step:
        tasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        if tasks_var not in env:
            raise RuntimeError("SLURM step without SLURM_NTASKS: launch with `srun --ntasks N`")
        nodelist = next(
            (env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if k in env),
            None,
        )
        if nodelist is None:
            raise RuntimeError("SLURM step without a node list (SLURM_STEP_NODELIST/SLURM_JOB_NODELIST)")
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        else:  # distinct jobs sharing a node get distinct ports
            port = DEFAULT_MASTER_PORT + _int_env(env, "SLURM_JOB_ID") % 1000 if "SLURM_JOB_ID" in env else DEFAULT_MASTER_PORT
        return LaunchEnv(
            "slurm",
            _int_env(env, "SLURM_PROCID"),
            _int_env(env, tasks_var),
            _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            env.get("MASTER_ADDR") or first_host(nodelist),
            port,
        )
    if any(name in env for name in _MPI_RANK_VARS):
        return _mpi_launch(env)
    return LaunchEnv("single", 0, 1, 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _mpi_launch(env: Mapping[str, str]) -> LaunchEnv:
    try:
        from mpi4py import MPI  # lazy: optional dependency, and it initialises MPI on import
    except ImportError as error:
        raise RuntimeError(
            "launched by mpiexec (PMI/OMPI variables set) but mpi4py is missing: "
            "pip install mpi4py mpich (the `dist` extra)"
        ) from error
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    host = socket.gethostname()
    hosts = comm.allgather(host)
    # One host: loopback avoids depending on the host name resolving to a reachable address.
    addr = "127.0.0.1" if len(set(hosts)) == 1 else hosts[0]
    port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else (_free_port() if rank == 0 else None)
    addr, port = comm.bcast((addr, port), root=0)
    local_rank = sum(1 for h in hosts[:rank] if h == host)
    return LaunchEnv("mpi", rank, world, local_rank, addr, int(port))


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but no CUDA device is visible")
        # srun --gpus-per-task leaves one visible GPU per task; torchrun leaves all of them.
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(device)


def init_distributed(
    device: str = "auto",
    backend: str = "auto",
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timeout_s: float = 600.0,
    env: Mapping[str, str] | None = None,
) -> DistContext:
    """Join (or create) the process group of this run.

    Args:
        device: "auto" (CUDA when available), "cuda" or "cpu".
        backend: "auto" (NCCL on CUDA, gloo on CPU), "nccl" or "gloo".
        init_method: explicit rendezvous such as "file:///tmp/x" (tests); needs rank and world_size.
        rank, world_size: with init_method, this process's rank and the group size.
        env: environment to read the launcher from (default os.environ; tests pass their own).
    Returns:
        the DistContext; world size 1 creates no process group.
    """
    if init_method is not None:
        if rank is None or world_size is None:
            raise ValueError("init_method needs explicit rank and world_size")
        launch = LaunchEnv("explicit", rank, world_size, rank)
    else:
        launch = detect_launch(env)
    torch_device = _pick_device(device, launch.local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    chosen = backend if backend != "auto" else ("nccl" if torch_device.type == "cuda" else "gloo")
    ctx = DistContext(launch.rank, launch.world_size, launch.local_rank, torch_device, None, launch.launcher)
    if launch.world_size == 1:
        return ctx
    if dist.is_initialized():  # someone (e.g. a test harness) already joined the group
        ctx.backend = dist.get_backend()
        return ctx
    if init_method is None:
        if launch.master_addr is None or launch.master_port is None:
            raise RuntimeError(
                f"{launch.launcher} launch without a rendezvous address: set MASTER_ADDR and MASTER_PORT"
            )
        init_method = f"tcp://{launch.master_addr}:{launch.master_port}"
    dist.init_process_group(
        chosen,
        init_method=init_method,
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    ctx.backend, ctx.owns_group = chosen, True
    return ctx


def shutdown(ctx: DistContext) -> None:
    """Leave the process group this module created (no-op otherwise)."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        ctx.owns_group = False


def set_cpu_threads(ctx: DistContext) -> int:
    """On CPU, share the cores among the ranks of this host (unless OMP_NUM_THREADS is set).

    torchrun sets OMP_NUM_THREADS=1 itself; srun and mpiexec do not, and N ranks each using every
    core of a node oversubscribe it badly. Returns the thread count in effect.
    """
    if ctx.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        host = socket.gethostname()
        local_ranks = sum(1 for h in ctx.all_gather_object(host) if h == host)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    return torch.get_num_threads()
