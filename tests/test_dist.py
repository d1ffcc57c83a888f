"""engine.runtime: launcher detection, SLURM / MPI bootstrap, trunk-only gradient sums (2 gloo ranks)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.runtime.bootstrap import detect_launch, first_host, init_distributed
from engine.runtime.context import DistContext
from engine.runtime.local_group import launch_local
from engine.runtime.trunk_sync import AllReduceTrunkSync, make_trunk_sync

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node[01-04],gpu7", "node01"),
        ("gpu7,node[1,3]", "gpu7"),
        ("a-b[009-010,12]", "a-b009"),
        ("single", "single"),
        ("rack1-n[7]", "rack1-n7"),
    ],
)
def test_first_host_of_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_first_host_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        first_host(" ")


def test_detect_launch_from_each_environment():
    assert detect_launch({}).launcher == "single"
    torchrun = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (torchrun.launcher, torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_port) == (
        "torchrun", 3, 8, 1, 1234)
    slurm_env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
                 "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "4242"}
    slurm = detect_launch(slurm_env)
    assert (slurm.launcher, slurm.rank, slurm.world_size, slurm.local_rank) == ("slurm", 5, 8, 1)
    assert (slurm.master_addr, slurm.master_port) == ("gpu03", 29500 + 242)
    # outside an srun step (a plain python in the batch script) SLURM variables are not a launch
    no_step = {k: v for k, v in slurm_env.items() if k != "SLURM_STEP_ID"}
    assert detect_launch(no_step).launcher == "single"
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        detect_launch({**slurm_env, "SLURM_PROCID": "x"})


def test_unlaunched_context_is_rank_zero_of_one(capsys):
    ctx = init_distributed(device="cpu", env={})
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed, ctx.backend) == (0, 1, True, False, None)
    ctx.print0("only on rank 0")
    assert "only on rank 0" in capsys.readouterr().out
    assert ctx.seed(7) == 7 and DistContext(rank=2).seed(7) == 7 + 2 * 1_000_003
    assert ctx.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_rank(rank: int, port: int, queue) -> None:
    env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank), "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "localhost,othernode", "MASTER_PORT": str(port)}
    ctx = init_distributed(device="cpu", env=env, timeout_s=60)
    total = ctx.all_reduce_sum(torch.tensor([float(rank + 1)]))
    queue.put((ctx.launcher, ctx.rank, ctx.world_size, ctx.backend, float(total)))
    torch.distributed.destroy_process_group()


@pytest.mark.dist
def test_slurm_environment_bootstrap_two_ranks():
    """srun-style variables (set here) are enough to form a gloo group: master from the node list."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue, port = context.Queue(), _free_port()
    procs = [context.Process(target=_slurm_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == [("slurm", 0, 2, "gloo", 3.0), ("slurm", 1, 2, "gloo", 3.0)]


MPI_SCRIPT = """
import sys
import torch
from engine.runtime.bootstrap import init_distributed, shutdown
ctx = init_distributed(device="cpu", timeout_s=60)
total = ctx.all_reduce_sum(torch.tensor([float(ctx.rank + 1)]))
# one file per rank: mpiexec may interleave the ranks' stdout within a line
with open(f"{sys.argv[1]}/rank{ctx.rank}.txt", "w") as out:
    out.write(f"{ctx.launcher} {ctx.rank} {ctx.world_size} {ctx.backend} {float(total)}")
shutdown(ctx)
"""


@pytest.mark.dist
def test_mpiexec_bootstrap_two_ranks(tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        mpiexec = shutil.which("mpiexec")
        if mpiexec is None:
            pytest.skip("mpiexec is not installed (pip install mpich mpi4py: the `dist` extra)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_", "MASTER_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-c", MPI_SCRIPT, str(tmp_path)], env=env,
                         cwd=REPO, check=False, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert results == ["mpi 0 2 gloo 3.0", "mpi 1 2 gloo 3.0"]


# ------------------------------------------------------------------ trunk gradient sums


def _tiny_trunk() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5))
    with torch.no_grad():
        for p in trunk.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return trunk


def _rank_loss(out: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank-dependent loss of the trunk output: ranks see different data, as readout shards do."""
    target = torch.linspace(-1, 1, out.numel()).view_as(out) * (rank + 1)
    return ((out - target) ** 2).sum() * (0.5 + rank)


def _rank_input(rank: int) -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(100 + rank))


def _sync_modes_worker(ctx: DistContext, modes: tuple[str, ...]) -> dict:
    import importlib

    ds_comm = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: the package
    # re-exports PyTorch under the name `torch`. DeepSpeed JIT-compiles a shared-memory all-reduce op for CPU on first use (about a minute);
    # it is an optimisation of its own collectives, not what this test checks.
    ds_comm.build_shm_op = lambda: None
    out = {}
    for mode in modes:
        trunk = _tiny_trunk()
        sync = make_trunk_sync(mode, trunk, ctx, lr=0.1, betas=(0.9, 0.99), zero_stage=2)
        loss = _rank_loss(sync.module(_rank_input(ctx.rank)), ctx.rank)
        sync.backward(loss)
        grads = [None if p.grad is None else p.grad.clone() for p in trunk.parameters()]
        sync.step()
        out[mode] = {"grads": grads, "params": [p.detach().clone() for p in trunk.parameters()]}
    return out


@pytest.mark.slow  # about 20 s on 2 shared cores: one 2-rank launch importing DeepSpeed
@pytest.mark.dist
def test_trunk_sync_sums_gradients_over_ranks():
    """allreduce, DDP and DeepSpeed ZeRO-2: trunk gradients (and the Adam step) equal the
    single-process gradient of the sum of the two ranks' losses."""
    pytest.importorskip("deepspeed")
    modes = ("allreduce", "ddp", "deepspeed")
    run = launch_local(_sync_modes_worker, 2, args=(modes,), timeout_s=240)

    reference = _tiny_trunk()
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.1, betas=(0.9, 0.99))
    total = sum(_rank_loss(reference(_rank_input(r)), r) for r in range(2))
    total.backward()
    ref_grads = [p.grad.clone() for p in reference.parameters()]
    optimizer.step()
    ref_params = [p.detach().clone() for p in reference.parameters()]
    for rank in range(2):
        for mode in modes:
            got = run.results[rank][mode]
            if mode != "deepspeed":  # ZeRO keeps reduced gradients in its own partitioned buffers
                for g, ref in zip(got["grads"], ref_grads):
                    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
            for p, ref in zip(got["params"], ref_params):
                # atol: Adam's first step is g / (|g| + eps), so a near-zero gradient summed in
                # another order moves by up to ~1e-5 (the step itself is lr = 0.1).
                torch.testing.assert_close(p, ref, rtol=1e-5, atol=2e-5, msg=f"{mode} rank {rank}")


def test_deepspeed_needs_a_process_group():
    ctx = init_distributed(device="cpu", env={})
    with pytest.raises(RuntimeError, match="needs a process group of 2 or more ranks"):
        make_trunk_sync("deepspeed", _tiny_trunk(), ctx, lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="ZeRO stage 1 or 2"):
        make_trunk_sync("deepspeed", _tiny_trunk(), ctx, lr=0.1, betas=(0.9, 0.99), zero_stage=3)
    with pytest.raises(ValueError, match="grad_sync must be"):
        make_trunk_sync("horovod", _tiny_trunk(), ctx, lr=0.1, betas=(0.9, 0.99))
    assert isinstance(make_trunk_sync("allreduce", _tiny_trunk(), ctx, 0.1, (0.9, 0.99)), AllReduceTrunkSync)
