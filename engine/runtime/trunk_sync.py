"""Trunk gradient synchronisation of the 3D engine: the trunk is replicated over the ranks and only its
gradients are summed (manual flat all-reduce, DDP on the trunk, or DeepSpeed ZeRO); the head rows
of each rank's slab are never synchronised (docs/ARCHITECTURE.md, "Design")."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from engine.runtime.context import DistContext

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
