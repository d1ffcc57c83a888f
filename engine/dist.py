"""Rank bootstrap (torchrun / SLURM / MPI / unlaunched) and trunk-only gradient synchronisation.

The 3D engine shards the readout axis: every rank owns a slab of head rows that is never
synchronised, while the trunk (encoding + hidden layers) is replicated and only its gradients
are summed across ranks (docs/ARCHITECTURE.md, "Design"). This module is the only place that knows about
process groups; models and loops stay distribution-agnostic (STYLE.md lesson 1).

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

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


# ---------------------------------------------------------------------------------------------
# Trunk gradient synchronisation: the global loss is the SUM of the ranks' losses, so trunk
# gradients are summed (not averaged) and head gradients are left alone.
# ---------------------------------------------------------------------------------------------


class TrunkSync:
    """Owns the trunk's optimiser and the all-reduce of its gradients.

    Use: out = sync.module(x); ...; sync.backward(loss); sync.step(); sync.zero_grad().
    After `backward(loss)` every trunk parameter holds the SUM over ranks of d(loss_r)/d(param).
    Pass a loss that depends on the trunk only (the 3D loop passes sum(features * dL/dfeatures)):
    other leaves it reaches keep their rank-local gradient, times the world size with DeepSpeed.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def optimizer_state(self) -> dict:
        raise NotImplementedError

    def load_optimizer_state(self, state: dict) -> None:
        raise NotImplementedError


class AllReduceTrunkSync(TrunkSync):
    """Manual sum all-reduce of all trunk gradients in one flat buffer after backward."""

    def __init__(self, trunk: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext):
        self.module, self.trunk, self.optimizer, self.ctx = trunk, trunk, optimizer, ctx

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if not self.ctx.distributed:
            return
        params = [p for p in self.trunk.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # a rank whose loss skipped the trunk still joins the sum
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def _sum_allreduce_hook(_state, bucket):
    """DDP communication hook: SUM instead of DDP's default mean."""
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class DDPTrunkSync(AllReduceTrunkSync):
    """DistributedDataParallel over the trunk alone (bucketed, overlapped with backward)."""

    def __init__(self, trunk: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext):
        super().__init__(trunk, optimizer, ctx)
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.module = DistributedDataParallel(trunk, device_ids=device_ids, broadcast_buffers=False)
            self.module.register_comm_hook(None, _sum_allreduce_hook)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


class DeepSpeedTrunkSync(TrunkSync):
    """DeepSpeed ZeRO stage 1 or 2 over the trunk alone; the head keeps its own optimiser.

    DeepSpeed averages gradients over ranks; the loss handed to it is multiplied by the world
    size so that trunk gradients are sums. Optimiser: Adam with torch's implementation
    ("torch_adam": true), which also runs on CPU without compiled DeepSpeed ops.
    """

    def __init__(
        self,
        trunk: nn.Module,
        ctx: DistContext,
        zero_stage: int,
        lr: float,
        betas: tuple[float, float],
        extra_config: Mapping | None = None,
    ):
        if zero_stage not in (1, 2):
            raise ValueError(f"grad_sync deepspeed supports ZeRO stage 1 or 2, got {zero_stage}")
        try:
            import deepspeed  # lazy: heavy, optional (`dist` extra)
        except ImportError as error:
            raise RuntimeError(
                "grad_sync: deepspeed needs the deepspeed package (pip install 'infusion-engine[dist]' "
                "with DS_BUILD_OPS=0); use grad_sync: allreduce or ddp instead"
            ) from error
        if not ctx.distributed:
            raise RuntimeError(
                "grad_sync: deepspeed needs a process group of 2 or more ranks "
                "(launch with torchrun/srun/mpiexec); use grad_sync: allreduce on one process"
            )
        # DeepSpeed reads these even when the group already exists.
        os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
        os.environ.setdefault("RANK", str(ctx.rank))
        os.environ.setdefault("WORLD_SIZE", str(ctx.world_size))
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "optimizer": {
                "type": "Adam",
                # torch_adam: DeepSpeed's fused CPU/GPU Adam needs compiled ops; torch's does not.
                "params": {"lr": lr, "betas": list(betas), "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True},
            },
            "zero_optimization": {"stage": zero_stage},
            "steps_per_print": 2**31 - 1,
        }
        config.update(dict(extra_config or {}))
        try:
            engine, optimizer, _, _ = deepspeed.initialize(
                model=trunk, model_parameters=list(trunk.parameters()), config=config, dist_init_required=False
            )
        except Exception as error:  # report what DeepSpeed refused, with the way out
            raise RuntimeError(
                f"DeepSpeed ZeRO-{zero_stage} could not start on device {ctx.device} "
                f"({type(error).__name__}: {error}); use grad_sync: allreduce or ddp"
            ) from error
        self.module, self.engine, self.optimizer, self.ctx = engine, engine, optimizer, ctx

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.ctx.world_size)

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    # Entries of ZeRO's state_dict that are Python objects rather than tensors and numbers: kept
    # out of checkpoints (which load with weights_only=True) and taken from the live optimiser.
    _LIVE_OBJECTS = ("loss_scaler", "param_slice_mappings")

    def optimizer_state(self) -> dict:
        """This rank's ZeRO partition of the optimiser state, as tensors and plain values."""
        state = {k: v for k, v in self.optimizer.state_dict().items() if k not in self._LIVE_OBJECTS}
        if "zero_stage" in state:
            state["zero_stage"] = int(state["zero_stage"])
        return state

    def load_optimizer_state(self, state: dict) -> None:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        state = dict(state)
        state["loss_scaler"] = self.optimizer.loss_scaler
        state["param_slice_mappings"] = self.optimizer._param_slice_mappings
        if "zero_stage" in state:
            state["zero_stage"] = ZeroStageEnum(state["zero_stage"])
        # ZeRO's loader takes one state per rank and picks its own partition by dp rank.
        states = [None] * self.ctx.world_size
        states[self.ctx.rank] = state
        self.optimizer.load_state_dict(states, load_from_fp32_weights=True)


def make_trunk_sync(
    mode: str,
    trunk: nn.Module,
    ctx: DistContext,
    lr: float,
    betas: tuple[float, float],
    zero_stage: int = 2,
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> TrunkSync:
    """Build the trunk's gradient synchroniser: "allreduce" (default), "ddp" or "deepspeed"."""
    if mode == "deepspeed":
        return DeepSpeedTrunkSync(trunk, ctx, zero_stage, lr, betas)
    make_opt = optimizer_factory or (lambda params: torch.optim.Adam(params, lr=lr, betas=betas))
    optimizer = make_opt(trunk.parameters())
    if mode == "allreduce":
        return AllReduceTrunkSync(trunk, optimizer, ctx)
    if mode == "ddp":
        return DDPTrunkSync(trunk, optimizer, ctx)
    raise ValueError(f"grad_sync must be 'allreduce', 'ddp' or 'deepspeed', got {mode!r}")


# ---------------------------------------------------------------------------------------------
# A local process group without a launcher: tests and benchmarks (file:// rendezvous, no ports).
# ---------------------------------------------------------------------------------------------


@dataclass
class LocalRun:
    """Outcome of `launch_local`: each rank's return value (None if it returned none or died)
    and each process's exit code (0 = clean; negative = killed by that signal)."""

    results: list
    exitcodes: list


def _local_worker(fn, rank, world_size, init_method, args, queue, threads):
    import pickle
    import traceback

    torch.set_num_threads(threads)
    ctx = None
    try:
        ctx = init_distributed(device="cpu", init_method=init_method, rank=rank, world_size=world_size)
        # Plain pickle bytes: torch's queue would pass tensors as shared-memory handles, which die
        # with the process that made them.
        queue.put((rank, True, pickle.dumps(fn(ctx, *args))))
    except SystemExit:  # e.g. a preemption exit code: report it, then exit with it
        queue.put((rank, True, pickle.dumps(None)))
        raise
    except BaseException:  # noqa: BLE001 - any failure of the rank is reported to the parent
        queue.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if ctx is not None:
            shutdown(ctx)


def launch_local(
    fn: Callable,
    world_size: int,
    args: tuple = (),
    timeout_s: float = 300.0,
    check: bool = True,
    threads_per_rank: int = 1,
) -> LocalRun:
    """Run `fn(ctx, *args)` on `world_size` fresh CPU processes joined by a gloo group.

    The rendezvous is a file in a temporary folder (no network port). `fn` must be importable
    by name (a module-level function) and return something picklable.
    With check=True a rank that raised or died makes this raise RuntimeError with its traceback;
    with check=False the exit codes are returned for the caller to judge (kill/resume tests).
    """
    import pickle
    import queue as queue_module
    import tempfile
    import time

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="infusion-rdzv-") as folder:
        init_method = f"file://{folder}/rendezvous"
        messages = context.Queue()
        procs = [
            context.Process(target=_local_worker, args=(fn, r, world_size, init_method, args, messages, threads_per_rank))
            for r in range(world_size)
        ]
        for proc in procs:
            proc.start()
        results: list = [None] * world_size
        errors: dict[int, str] = {}
        pending, deadline = set(range(world_size)), time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            try:  # drain before joining: a child blocks on exit until its message is read
                rank, ok, payload = messages.get(timeout=0.2)
            except queue_module.Empty:
                if all(not p.is_alive() for p in procs):
                    break
                continue
            pending.discard(rank)
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
        for proc in procs:
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        exitcodes = [p.exitcode for p in procs]
    if check and (errors or any(code != 0 for code in exitcodes)):
        detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RuntimeError(f"local group failed: exit codes {exitcodes}\n{detail}")
    return LocalRun(results, exitcodes)


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
