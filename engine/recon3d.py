"""Distributed 3D INFusion: a readout-sharded z-discretized INR fitted with stochastic slices.

DESIGN.md section 3. The hybrid-space store (x, coils, ky, kz) makes every readout position x an
independent 2D multicoil problem on its (ky, kz) plane. The INR maps phase-encode coordinates
(y, z) through a replicated trunk to a head with one complex output row per readout position:

    features = trunk(grid (ny*nz, 2))            (ny*nz, hidden)   replicated, grads summed
    plane_x  = head_row_x(features)              (ny, nz) complex  row x owned by one rank

Rank r owns the shards (contiguous, chunk-aligned readout slabs) of its block: their k-space,
maps and head rows. One step: every shard draws K readout positions from its own random stream
(engine.slices), the rank evaluates only those head rows, applies data consistency to those
planes (rank-local, no distributed FFT) and passes the same planes, batched, to the 2D prior.
The global loss is the sum of the ranks' losses; engine.dist sums the trunk gradients.

Loss of one step (sum over the shards s, their drawn planes x; w_s = |s| / (nx K)):
    L = sum_s sum_x w_s [ ||M F S_x p_x - y_x||^2 / (C |M|)          (DC, mean per sample)
                          + prior_term(p_x, step)                       (engine.losses.prior_term)
                          + lambda_tv TV(p_x) ]                         (engine.losses.tv)
w_s makes the drawn-slice DC an unbiased estimate of the mean DC over all nx planes, which is
what a full-DC step (every plane, `dc.full_every`) computes exactly. The prior term is the 2D
engine's PriorTerm: the one-step (Tweedie) denoiser target ("tweedie") or INFusion's 10-step
Euler ODE ("reference"), distance L2/L1/LPIPS, its noise and weight schedules; each shard has
its own PriorTerm drawing noise from that shard's stream, batched over the shard's K planes.

Memory: a step holds the trunk on the plane grid plus K planes x coils (x the number of local
shards), independent of nx; full-DC steps evaluate the slab in chunks of `dc.chunk` rows,
back-propagating chunk by chunk into a detached copy of the trunk features.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from engine.checkpoint import (
    CheckpointConfig,
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
)
from engine.config import config_to_dict
from engine.dist import DistContext, make_trunk_sync
from engine.losses.prior_term import PriorTerm, PriorTermConfig
from engine.losses.tv import total_variation
from engine.models import INRZ, ComplexRowHead, INRConfig
from engine.physics.fft import ifftc
from engine.preemption import NON_FINITE_EXIT_CODE, REQUEUE_EXIT_CODE, Preempted, PreemptionFlag
from engine.slices import Shard, ShardSampler, shards_of_rank, split_readout

# ================================================================================== configs


@dataclass
class SliceConfig:
    """Stochastic slices (readout positions) drawn per step."""

    per_step: int = 4
    """K: readout positions drawn per shard and step (memory and time per step scale with it)."""
    num_shards: int = 0
    """Readout shards, each with its own random stream; 0 = one per rank. A multiple of the
    world size; keep it fixed to reproduce a run on another number of ranks."""
    seed: int = 0
    """Seed of the shards' streams (slice draws and the prior's noise)."""


@dataclass
class DCConfig:
    """Data consistency."""

    full_every: int = 0
    """Every n-th step uses all planes of the slab for DC instead of the K drawn ones (0: never)."""
    full_final_steps: int = 0
    """The last n steps all use full DC."""
    chunk: int = 16
    """Planes per chunk in a full-DC pass (bounds its memory)."""
    backend: str = "auto"
    """kernels.sense backend when present ("auto": Triton on CUDA, torch on CPU)."""


@dataclass
class OptimConfig:
    """Adam on trunk and head."""

    lr: float = 1e-2
    """Learning rate of the trunk (and of the head unless lr_head is set)."""
    lr_head: float | None = None
    """Learning rate of the head rows; null = lr."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam betas."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Learning-rate schedule over the steps."""
    lr_final_fraction: float = 0.1
    """cosine: final lr = lr * this."""


@dataclass
class OutputConfig:
    """Output volume and side files (do not change results; not part of the config hash)."""

    eval_rows: int = 16
    """Readout positions evaluated per chunk when writing (rounded to whole output chunks)."""
    montage: bool = True
    """Write a PNG montage of three orthogonal planes."""
    log_every: int = 1
    """Write a CSV row (and update tqdm) every n steps."""
    progress: bool = True
    """tqdm progress bar on rank 0."""


@dataclass
class BundledCaseConfig:
    """How the bundled example is undersampled when no --input is given."""

    mask: Literal["poisson", "random1d", "equispaced1d"] = "poisson"
    """Mask on the (ky, kz) plane."""
    acceleration: float = 4.0
    """Requested acceleration R."""
    calib: int | None = None
    """Fully sampled centre (poisson: a calib x calib box); null = none (as the paper)."""
    chunk_x: int = 4
    """Readout positions per Zarr chunk of the prepared store."""


@dataclass
class BaselineConfig:
    """Classical comparison computed beside the reconstruction (not part of the config hash)."""

    l1_wavelet: bool = True
    """L1-wavelet per readout plane (engine.baselines, relative lambda rule) on each rank's slab."""


@dataclass
class Recon3DConfig:
    """A 3D reconstruction run (configs/demo3d.yaml, configs/fullres3d.yaml)."""

    steps: int = 300
    """Optimisation steps."""
    inr: INRConfig = field(default_factory=INRConfig)
    """Encoding, trunk and head (engine.models)."""
    slices: SliceConfig = field(default_factory=SliceConfig)
    dc: DCConfig = field(default_factory=DCConfig)
    prior: PriorTermConfig = field(default_factory=lambda: PriorTermConfig(mode="tweedie", distance="l2"))
    """The 2D prior term (engine.losses.prior_term), applied to each shard's drawn planes."""
    tv_weight: float = 0.0
    """Weight of the isotropic TV term (engine.losses.tv) on the drawn planes (0: off)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    bf16: bool | None = None
    """bf16 autocast for trunk, head and prior (FFT and losses stay float32/complex64);
    null = on where the device supports it (CUDA with bf16), off on CPU."""
    grad_sync: Literal["allreduce", "ddp", "deepspeed"] = "allreduce"
    """Trunk gradient sum: manual flat all-reduce, DDP over the trunk, or DeepSpeed ZeRO."""
    zero_stage: int = 2
    """grad_sync deepspeed: ZeRO stage (1 or 2)."""
    device: str = "auto"
    """'auto' (CUDA if visible), 'cuda' or 'cpu'."""
    data_on_host: bool = False
    """Keep the slab's k-space and maps in host memory and move only the drawn planes each step."""
    max_bad_steps: int = 3
    """A step with a non-finite loss or gradient on any rank is skipped (no update) and logged;
    this many in a row stop the run (exit code 3), keeping the checkpoints written so far."""
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    bundled: BundledCaseConfig = field(default_factory=BundledCaseConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.dc.chunk < 1 or self.output.log_every < 1 or self.max_bad_steps < 1:
            raise ValueError("dc.chunk, output.log_every and max_bad_steps must be >= 1")


# Keys that do not change the numbers a run produces: excluded from the checkpoint's config hash.
# (grad_sync stays in: where the trunk's optimiser state lives depends on it.)
_NOT_HASHED = ("output", "checkpoint", "baseline", "bundled", "data_on_host", "max_bad_steps")


def result_config(cfg: Recon3DConfig, input_desc: dict) -> dict:
    """The part of the config (plus the input's shape) that decides the result; hashed by checkpoints."""
    values = {k: v for k, v in config_to_dict(cfg).items() if k not in _NOT_HASHED}
    values["input"] = input_desc
    return values


# ================================================================================== pieces


class GridTrunk(nn.Module):
    """Encoding + MLP evaluated on the full (ny, nz) coordinate grid: forward(shape) -> (ny*nz, hidden).

    Taking the grid shape (not coordinates) lets the hash grid use its separable fast path and
    lets DDP / DeepSpeed wrap the module with a plain call.
    """

    def __init__(self, encoding: nn.Module, mlp: nn.Module):
        super().__init__()
        self.encoding, self.mlp = encoding, mlp

    def forward(self, shape: tuple[int, int]) -> torch.Tensor:
        return self.mlp(self.encoding.forward_grid(tuple(shape)))


def build_sharded_inr(config: INRConfig, nx: int, x_start: int, x_stop: int) -> tuple[GridTrunk, ComplexRowHead]:
    """The trunk and the head rows [x_start, x_stop) of the INRZ with nx rows.

    The full model is initialised from config.seed on every rank (identical trunk everywhere,
    head rows identical to the single-process model's), then only the slab's rows are kept.
    """
    full = INRZ(config, out_rows=nx, in_dim=2)
    head = ComplexRowHead(config.hidden, x_stop - x_start)
    with torch.no_grad():
        head.weight.copy_(full.head.weight[x_start:x_stop])
        head.bias.copy_(full.head.bias[x_start:x_stop])
    return GridTrunk(full.encoding, full.trunk), head


def dc_sum(image: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor, kspace: torch.Tensor,
           backend: str = "auto") -> torch.Tensor:
    """sum |M F (S image) - y|^2 over a batch of planes (differentiable, float32 scalar).

    image (B, ny, nz) complex64; maps, kspace (B, C, ny, nz) complex64 (kspace zero outside the
    mask); mask (ny, nz) float32. The engine's one DC call: kernels.sense.dc_loss (fused Triton
    kernels on CUDA, the torch reference on CPU; backend "auto" | "torch" | "triton").
    """
    from kernels.sense import dc_loss

    return dc_loss(image, maps, mask, kspace, backend=backend)


def global_percentile(values: torch.Tensor, q: float, ctx: DistContext, bins: int = 65536) -> float:
    """q-th percentile (0..100) of non-negative `values` spread over all ranks.

    A histogram with `bins` bins between 0 and the global maximum is summed over ranks, so the
    result does not depend on how the values are split (resolution max/bins).
    """
    flat = values.detach().float().reshape(-1).cpu()
    top = ctx.all_reduce_max(flat.max().reshape(1).clone())
    if float(top) <= 0:
        raise ValueError("the zero-filled slab is all zeros: k-space or coil maps are empty")
    hist = torch.histc(flat, bins=bins, min=0.0, max=float(top)).double()
    ctx.all_reduce_sum(hist)
    cumulative = torch.cumsum(hist, 0)
    index = int(torch.searchsorted(cumulative, cumulative[-1] * q / 100.0))
    return float(top) * (index + 1) / bins


class NonFiniteStop(RuntimeError):
    """`max_bad_steps` steps in a row had a non-finite loss or gradient; exit with code 3."""

    def __init__(self, step: int, in_a_row: int, checkpoint_step: int | None):
        kept = (f"the last checkpoint (step {checkpoint_step}) is kept" if checkpoint_step is not None
                else "no checkpoint was written (checkpoint.every is 0 or none was due yet)")
        super().__init__(f"stopped at step {step}: {in_a_row} consecutive steps had a non-finite loss or "
                         f"gradient (every update was skipped); {kept}")
        self.step, self.checkpoint_step = step, checkpoint_step


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)



# ================================================================================== the loop


@dataclass
class StepResult:
    """What one step did: this rank's draws, and the loss terms summed over ranks."""

    step: int
    rows: torch.Tensor  # global readout indices drawn by this rank's shards, (K * local shards,)
    terms: dict[str, float]  # dc, prior, tv: the global loss terms (sums over ranks)
    full_dc: bool
    prior_evals: int  # U-Net evaluations so far, all ranks
    skipped: bool  # a non-finite loss or gradient on some rank: no parameter was updated
    stop_requested: bool  # some rank had `request_stop` set (a preemption signal)


class Recon3D:
    """One rank's part of a 3D reconstruction.

    Args:
        cfg: the run's config.
        source: a hybrid store (engine.io.HybridStore or anything with `shape`, `chunk_x`,
            `mask`, `read_slab(x0, x1)` returning .kspace/.maps/.reference).
        ctx: this rank's DistContext.
        prior: an EDMPrior to use instead of loading cfg.prior.path (tests, benchmarks).
    """

    def __init__(self, cfg: Recon3DConfig, source, ctx: DistContext, prior: nn.Module | None = None):
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        nx, coils, ny, nz = (int(s) for s in source.shape)
        self.nx, self.coils, self.plane = nx, coils, (ny, nz)
        self.chunk_x = int(source.chunk_x)
        num_shards = cfg.slices.num_shards or ctx.world_size
        self.shards = split_readout(nx, self.chunk_x, num_shards)
        self.local_shards: list[Shard] = shards_of_rank(self.shards, ctx.rank, ctx.world_size)
        self.x_start, self.x_stop = self.local_shards[0].start, self.local_shards[-1].stop
        self.bf16 = (self.device.type == "cuda" and torch.cuda.is_bf16_supported()) if cfg.bf16 is None else cfg.bf16

        slab = source.read_slab(self.x_start, self.x_stop)
        if slab.maps is None:
            raise ValueError(f"{getattr(source, 'path', 'input')}: the hybrid store has no coil maps "
                             "(prepare it again with launch/prepare.py --maps-from espirit, or --maps FILE)")
        mask = torch.as_tensor(np.asarray(source.mask, dtype=np.float32))
        kspace = torch.as_tensor(np.asarray(slab.kspace, dtype=np.complex64)) * mask
        maps = torch.as_tensor(np.asarray(slab.maps, dtype=np.complex64))
        self.reference = None if slab.reference is None else np.asarray(slab.reference)
        self.measured_per_plane = float(mask.sum()) * coils
        # Intensity convention of the prior: 99th percentile of the zero-filled magnitude -> 1.
        zero_filled = torch.cat([(m.conj() * ifftc(k)).sum(dim=1) for k, m in zip(kspace.split(8), maps.split(8))])
        self.scale = global_percentile(zero_filled.abs(), 99.0, ctx)
        self.zero_filled = zero_filled.numpy()
        kspace = kspace / self.scale
        data_device = torch.device("cpu") if cfg.data_on_host else self.device
        pin = cfg.data_on_host and self.device.type == "cuda"
        self.kspace = (kspace.pin_memory() if pin else kspace).to(data_device)
        self.maps = (maps.pin_memory() if pin else maps).to(data_device)
        self.mask = mask.to(self.device)

        trunk, head = build_sharded_inr(cfg.inr, nx, self.x_start, self.x_stop)
        self.trunk, self.head = trunk.to(self.device), head.to(self.device)
        self.samplers = [ShardSampler(s, cfg.slices.per_step, cfg.slices.seed) for s in self.local_shards]
        lr_head = cfg.optim.lr if cfg.optim.lr_head is None else cfg.optim.lr_head
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=lr_head, betas=cfg.optim.betas)
        self.sync = make_trunk_sync(cfg.grad_sync, self.trunk, ctx, cfg.optim.lr, tuple(cfg.optim.betas),
                                    zero_stage=cfg.zero_stage)
        self.prior_terms = self._build_prior_terms(prior)
        self.step_index = 0
        self.prior_evals = 0
        self.request_stop = False  # set by the run loop on SIGTERM/SIGUSR1; shared in the step's all-reduce

    # ------------------------------------------------------------------ setup helpers

    def _build_prior_terms(self, prior: nn.Module | None) -> list[PriorTerm]:
        """One PriorTerm per local shard, each drawing its noise from that shard's stream."""
        if self.cfg.prior.mode == "off":
            return []
        if self.cfg.prior.reuse_target:
            raise ValueError("config key prior.reuse_target: not available in 3D, where the drawn planes "
                             "change every step (a target is only valid for the planes it was made from)")
        if prior is None:
            from engine.prior import load_prior

            prior = load_prior(self.cfg.prior.path)
        for p in prior.parameters():
            p.requires_grad_(False)
        prior = prior.to(self.device).eval()
        dtype = torch.bfloat16 if self.bf16 else None
        # the (ky, kz) mask is shared by every readout plane: unmeasured_only applies plane by plane
        return [PriorTerm(self.cfg.prior, prior, self.cfg.steps, s.generator, dtype, mask=self.mask)
                for s in self.samplers]

    def input_description(self) -> dict:
        return {"shape_x_coils_ky_kz": [self.nx, self.coils, *self.plane], "chunk_x": self.chunk_x,
                "num_shards": len(self.shards)}

    # ------------------------------------------------------------------ schedules

    def lr_factor(self, step: int) -> float:
        o = self.cfg.optim
        if o.schedule == "constant":
            return 1.0
        cosine = 0.5 * (1 + math.cos(math.pi * step / max(self.cfg.steps - 1, 1)))
        return o.lr_final_fraction + (1 - o.lr_final_fraction) * cosine

    def is_full_dc_step(self, step: int) -> bool:
        d = self.cfg.dc
        return (d.full_every > 0 and (step + 1) % d.full_every == 0) or step >= self.cfg.steps - d.full_final_steps

    # ------------------------------------------------------------------ one step

    def _planes(self, features: torch.Tensor, global_rows: torch.Tensor) -> torch.Tensor:
        """Head rows (global indices) on the feature grid -> (B, ny, nz) complex64."""
        with _autocast(self.device, self.bf16):
            out = self.head(features, (global_rows - self.x_start).to(self.device))
        return out.view(-1, *self.plane)

    def _slab_data(self, global_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = global_rows - self.x_start
        k, m = self.kspace[local], self.maps[local]
        return k.to(self.device, non_blocking=True), m.to(self.device, non_blocking=True)

    def _dc_term(self, planes: torch.Tensor, rows: torch.Tensor, weight: float) -> torch.Tensor:
        kspace, maps = self._slab_data(rows)
        return dc_sum(planes, maps, self.mask, kspace, self.cfg.dc.backend) * (weight / self.measured_per_plane)

    def step(self) -> StepResult:
        """One optimisation step (collective when distributed)."""
        cfg, step = self.cfg, self.step_index
        full = self.is_full_dc_step(step)
        K = cfg.slices.per_step
        draws = [s.draw() for s in self.samplers]
        weights = [s.shard.size / (self.nx * K) for s in self.samplers]  # w_s of the module docstring
        for group in self.head_optimizer.param_groups:
            group["lr"] = (cfg.optim.lr if cfg.optim.lr_head is None else cfg.optim.lr_head) * self.lr_factor(step)
        self.sync.set_lr(cfg.optim.lr * self.lr_factor(step))

        with _autocast(self.device, self.bf16):
            features = self.sync.module(self.plane)  # (ny*nz, hidden), the graph through the trunk
        leaf = features.detach().requires_grad_(True)
        rows = torch.cat(draws)
        planes = self._planes(leaf, rows)
        zero = torch.zeros((), device=self.device)
        terms = {"dc": zero, "prior": zero, "tv": zero}
        for i, (draw, w) in enumerate(zip(draws, weights)):
            shard_planes = planes[i * K:(i + 1) * K]
            if not full:
                terms["dc"] = terms["dc"] + self._dc_term(shard_planes, draw, w)
            if self.prior_terms and self.prior_terms[i].active(step):
                # PriorTerm and total_variation return means over the K planes: x K for sums.
                prior_loss, evals = self.prior_terms[i](shard_planes, step)
                terms["prior"] = terms["prior"] + (w * K) * prior_loss
                self.prior_evals += evals
            if cfg.tv_weight > 0:
                tv = total_variation(shard_planes, "isotropic", scale=1.0)
                terms["tv"] = terms["tv"] + (cfg.tv_weight * w * K) * tv
        local_loss = terms["dc"] + terms["prior"] + terms["tv"]
        if local_loss.requires_grad:
            local_loss.backward()
        if full:  # every plane of the slab, chunk by chunk, accumulating into leaf.grad
            dc_total = torch.zeros((), device=self.device)
            all_rows = torch.arange(self.x_start, self.x_stop)
            for chunk in all_rows.split(cfg.dc.chunk):
                dc_chunk = self._dc_term(self._planes(leaf, chunk), chunk, 1.0 / self.nx)
                dc_chunk.backward()
                dc_total = dc_total + dc_chunk.detach()
            terms["dc"] = dc_total
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        # d/d(features) of sum(features * grad) is grad: the trunk's backward of the whole loss.
        self.sync.backward((features * grad.to(features.dtype)).sum())
        # One small all-reduce per step: the loss terms, the U-Net count, the non-finite guard and
        # the stop request, so that every rank takes the same decisions.
        values = [float(terms[k].detach()) for k in ("dc", "prior", "tv")]
        local_bad = not (all(math.isfinite(v) for v in values) and self._gradients_finite())
        packed = torch.tensor([*values, float(self.prior_evals), float(local_bad), float(self.request_stop)],
                              dtype=torch.float64)
        dc, prior_term, tv, prior_evals, bad, stop = self.ctx.all_reduce_sum(packed).tolist()
        skipped = bad > 0 or not math.isfinite(bad)
        if skipped:  # leave every parameter and optimiser state as it was (issue 5's NaN guard)
            if self.cfg.grad_sync == "deepspeed":
                self.sync.step()  # ZeRO finds the non-finite gradient norm itself, skips and clears
        else:
            self.sync.step()
            self.head_optimizer.step()
        self.sync.zero_grad()
        self.head_optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        return StepResult(step, rows, {"dc": dc, "prior": prior_term, "tv": tv}, full, int(prior_evals),
                          skipped, stop > 0)

    def _gradients_finite(self) -> bool:
        """Head gradients, and trunk gradients (already summed over ranks) unless ZeRO holds them."""
        params = list(self.head.parameters())
        if self.cfg.grad_sync != "deepspeed":
            params += list(self.trunk.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate_rows(self, x0: int, x1: int) -> np.ndarray:
        """The reconstruction of readout positions [x0, x1) (inside this rank's slab), complex64
        (x1 - x0, ny, nz) in the input's intensity units."""
        with _autocast(self.device, self.bf16):
            features = self.trunk(self.plane)
        planes = self._planes(features, torch.arange(x0, x1))
        return (planes * self.scale).cpu().numpy().astype(np.complex64)

    def evaluate_slab(self) -> np.ndarray:
        """This rank's whole slab (x_stop - x_start, ny, nz) complex64 (kept in host memory)."""
        return np.concatenate([self.evaluate_rows(a, b) for a, b in self.output_chunks()])

    def output_chunks(self) -> list[tuple[int, int]]:
        """Chunk-aligned [x0, x1) pieces of the slab of about output.eval_rows positions."""
        rows = max(self.chunk_x, (self.cfg.output.eval_rows // self.chunk_x) * self.chunk_x)
        return [(a, min(a + rows, self.x_stop)) for a in range(self.x_start, self.x_stop, rows)]

    # ------------------------------------------------------------------ checkpoint state

    def trunk_state(self) -> dict:
        state = {"trunk": self.trunk.state_dict()}
        if self.cfg.grad_sync != "deepspeed":  # replicated: stored once with the trunk
            state["trunk_optimizer"] = self.sync.optimizer_state()
        return state

    def rank_state(self) -> dict:
        state = {
            "head": self.head.state_dict(),
            "head_optimizer": self.head_optimizer.state_dict(),
            "samplers": [s.state_dict() for s in self.samplers],
            "rng": capture_rng_state(),
            "prior_evals": self.prior_evals,
            "prior_targets": [t.target for t in self.prior_terms],  # reused when prior.reuse_target
            "slab": [self.x_start, self.x_stop],
        }
        if self.cfg.grad_sync == "deepspeed":  # ZeRO partitions the optimiser: one part per rank
            state["trunk_optimizer"] = self.sync.optimizer_state()
        return state

    def load_state(self, step: int, trunk_state: dict, rank_state: dict) -> None:
        if list(rank_state["slab"]) != [self.x_start, self.x_stop]:
            raise ValueError(f"checkpoint slab {rank_state['slab']} differs from this rank's "
                             f"[{self.x_start}, {self.x_stop})")
        self.trunk.load_state_dict(trunk_state["trunk"])
        self.sync.load_optimizer_state(trunk_state.get("trunk_optimizer", rank_state.get("trunk_optimizer")))
        self.head.load_state_dict(rank_state["head"])
        self.head_optimizer.load_state_dict(rank_state["head_optimizer"])
        for sampler, state in zip(self.samplers, rank_state["samplers"], strict=True):
            sampler.load_state_dict(state)
        restore_rng_state(rank_state["rng"])
        self.prior_evals = int(rank_state["prior_evals"])
        for term, target in zip(self.prior_terms, rank_state["prior_targets"]):
            term.target = None if target is None else target.to(self.device)
        self.step_index = step


# ================================================================================== a whole run


@dataclass
class RunPaths:
    """Where a run writes: the OME-Zarr volume and a side folder for everything else."""

    volume: Path
    side: Path

    @classmethod
    def for_output(cls, volume: str | Path) -> RunPaths:
        volume = Path(volume)
        stem = volume.name.removesuffix(".zarr")
        return cls(volume, volume.with_name(stem + "_run"))

    @property
    def checkpoints(self) -> Path:
        return self.side / "checkpoints"

    @property
    def log_csv(self) -> Path:
        return self.side / "log.csv"

    @property
    def montage(self) -> Path:
        return self.side / "montage.png"

    @property
    def metrics(self) -> Path:
        return self.side / "metrics.json"


class _CsvLog:
    """Rank 0's per-step CSV; on resume, rows after the resumed step are dropped first."""

    FIELDS = ("step", "seconds", "loss", "dc", "prior", "tv", "lr", "full_dc", "prior_evals", "skipped")

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if resume_step > 0 and path.is_file():
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) < resume_step]
        self.handle = open(path, "w", newline="")  # noqa: SIM115 - kept open for the whole run
        self.writer = csv.DictWriter(self.handle, fieldnames=self.FIELDS)
        self.writer.writeheader()
        self.writer.writerows(rows)

    def write(self, row: dict) -> None:
        self.writer.writerow({k: row.get(k, "") for k in self.FIELDS})
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _error_sums(volume: np.ndarray, reference: np.ndarray, support: np.ndarray | None) -> list[float]:
    """[sum (|x| - |r|)^2, sum |r|^2] over the support: NRMSE terms that add up over ranks."""
    diff = np.abs(volume).astype(np.float64) - np.abs(reference).astype(np.float64)
    ref = np.abs(reference).astype(np.float64)
    if support is not None:
        diff, ref = diff[support], ref[support]
    return [float(np.sum(diff**2)), float(np.sum(ref**2))]


def _l1_wavelet_slab(kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """engine.baselines.l1_wavelet on every readout plane of a slab: (n, ny, nz) complex64."""
    from engine.baselines import l1_wavelet

    return np.stack([l1_wavelet(kspace[i], maps[i], mask) for i in range(kspace.shape[0])])


def gather_planes(slab: np.ndarray, x_start: int, nx: int, ctx: DistContext) -> tuple | None:
    """Rank 0 gets the three central orthogonal planes of the volume assembled from the ranks'
    slabs (n, ny, nz): (yz at x=nx//2, xz at y=ny//2, xy at z=nz//2); None elsewhere."""
    ny, nz = slab.shape[1:]
    x_mid = nx // 2
    mine = {
        "x0": x_start,
        "yz": slab[x_mid - x_start] if x_start <= x_mid < x_start + slab.shape[0] else None,
        "xz": slab[:, ny // 2, :],
        "xy": slab[:, :, nz // 2],
    }
    parts = ctx.all_gather_object(mine)
    if not ctx.is_main:
        return None
    parts.sort(key=lambda p: p["x0"])
    yz = next(p["yz"] for p in parts if p["yz"] is not None)
    return yz, np.concatenate([p["xz"] for p in parts]), np.concatenate([p["xy"] for p in parts])


def write_montage(path: Path, rows: dict[str, tuple], title: str) -> None:
    """PNG: one row per image (name -> three planes), columns yz / xz / xy, shared grey scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    vmax = max(float(np.percentile(np.abs(rows[n][0]), 99.5)) for n in names) or 1.0
    fig, axes = plt.subplots(len(names), 3, figsize=(9, 3 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c, (plane, label) in enumerate(zip(rows[name], ("y-z (x = mid)", "x-z (y = mid)", "x-y (z = mid)"))):
            ax = axes[r][c]
            ax.imshow(np.abs(plane), cmap="gray", vmin=0, vmax=vmax, aspect="equal")
            ax.set_title(f"{name}: {label}", fontsize=9)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def run_recon3d(
    cfg: Recon3DConfig,
    input_path: str | Path,
    output_path: str | Path,
    ctx: DistContext,
    overwrite: bool = False,
    resume: bool = False,
    prior: nn.Module | None = None,
    store=None,
    on_step_end: Callable[[Recon3D, StepResult], None] | None = None,
) -> dict:
    """Reconstruct the hybrid store at `input_path` into the OME-Zarr `output_path` (collective).

    Args:
        cfg: the run's config.
        input_path: a store from launch/prepare.py (engine.io.prepare_hybrid_store).
        output_path: the output volume `*.zarr`; side files go to `<stem>_run/` beside it.
        ctx: from engine.dist.init_distributed.
        overwrite: replace an existing output.
        resume: continue from the newest complete checkpoint in `<stem>_run/checkpoints` (a fresh
            start when there is none).
        prior: use this EDMPrior instead of loading cfg.prior.path.
        store: a zarr Store to read instead of opening `input_path` (tests count chunk reads).
        on_step_end: called after each step (tests use it to kill or signal the process).
    Returns:
        the metrics dict (on every rank). Raises Preempted after a SIGTERM/SIGUSR1 checkpoint.
    """
    from engine.io.hybrid_store import HybridStore
    from engine.io.ome_zarr import VolumeWriter

    paths = RunPaths.for_output(output_path)
    if paths.volume.exists() and not (overwrite or resume):  # every rank checks: no rank waits alone
        raise FileExistsError(f"{paths.volume} exists; pass --overwrite to replace it or --resume to continue")
    if resume and paths.volume.exists():
        from engine.io.errors import InputError
        from engine.io.ome_zarr import open_volume

        try:
            finished = open_volume(paths.volume)
        except InputError:  # incomplete: the run is to be continued and the volume rewritten
            finished = None
        if finished is not None:
            ctx.print0(f"[recon3d] {paths.volume} is already complete; nothing to resume")
            return finished.metrics
    source = HybridStore(store if store is not None else input_path)
    if source.shape[0] < ctx.world_size:
        raise ValueError(f"{input_path}: {source.shape[0]} readout positions for {ctx.world_size} ranks")
    shards = cfg.slices.num_shards or ctx.world_size
    chunks = -(-int(source.shape[0]) // int(source.chunk_x))
    if chunks < shards:
        raise ValueError(f"{input_path}: {source.shape[0]} readout positions in {chunks} chunks of "
                         f"{source.chunk_x} cannot be split over {shards} shards (one per rank unless "
                         f"slices.num_shards is set): use fewer ranks, or prepare the store with a smaller chunk_x")
    recon = Recon3D(cfg, source, ctx, prior=prior)
    hashed = result_config(cfg, recon.input_description())
    manager = CheckpointManager(paths.checkpoints, ctx, cfg.checkpoint.keep_last)
    if ctx.is_main:
        paths.side.mkdir(parents=True, exist_ok=True)
        from engine.config import save_config

        save_config(cfg, paths.side / "config.yaml")
    ctx.barrier()
    start_step = 0
    if resume:
        loaded = manager.load_latest(hashed)
        if loaded is None:
            ctx.print0(f"[recon3d] --resume: no checkpoint in {paths.checkpoints}, starting fresh")
        else:
            start_step, trunk_state, rank_state = loaded
            recon.load_state(start_step, trunk_state, rank_state)
            ctx.print0(f"[recon3d] resumed from step {start_step} ({paths.checkpoints})")

    flag = PreemptionFlag().install()
    log = _CsvLog(paths.log_csv, start_step) if ctx.is_main else None
    bar = None
    if ctx.is_main and cfg.output.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="recon3d", dynamic_ncols=True)
    t_start = time.perf_counter()
    bad_in_a_row, skipped_steps = 0, 0
    try:
        while recon.step_index < cfg.steps:
            recon.request_stop = flag.raised  # a signal during this step is seen in the next one
            result = recon.step()
            if on_step_end is not None:
                on_step_end(recon, result)
            step_done = recon.step_index
            bad_in_a_row = bad_in_a_row + 1 if result.skipped else 0
            skipped_steps += int(result.skipped)
            if ctx.is_main and (result.step % cfg.output.log_every == 0 or step_done == cfg.steps
                                or result.skipped):
                t = result.terms
                log.write({"step": result.step, "seconds": f"{time.perf_counter() - t_start:.3f}",
                           "loss": t["dc"] + t["prior"] + t["tv"], **t,
                           "lr": cfg.optim.lr * recon.lr_factor(result.step), "full_dc": int(result.full_dc),
                           "prior_evals": result.prior_evals, "skipped": int(result.skipped)})
                if bar is not None:
                    bar.set_postfix(dc=f"{t['dc']:.3g}", prior=f"{t['prior']:.3g}", tv=f"{t['tv']:.3g}",
                                    refresh=False)
            if bar is not None:
                bar.update(1)
            if bad_in_a_row >= cfg.max_bad_steps:
                steps = manager.complete_steps()
                raise NonFiniteStop(result.step, bad_in_a_row, steps[-1] if steps else None)
            if result.stop_requested:
                folder = manager.save(step_done, recon.trunk_state(), recon.rank_state(), hashed)
                ctx.print0(f"[recon3d] preemption signal: checkpoint at step {step_done} in {folder}")
                raise Preempted(step_done, folder)
            if cfg.checkpoint.every and step_done % cfg.checkpoint.every == 0 and step_done < cfg.steps:
                manager.save(step_done, recon.trunk_state(), recon.rank_state(), hashed)
    finally:
        flag.uninstall()
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    train_seconds = time.perf_counter() - t_start
    return finish_run(cfg, recon, paths, ctx, overwrite or resume, train_seconds, VolumeWriter,
                      {"skipped_steps": skipped_steps})


def finish_run(cfg: Recon3DConfig, recon: Recon3D, paths: RunPaths, ctx: DistContext, overwrite: bool,
               train_seconds: float, writer_cls, extra_metrics: dict | None = None) -> dict:
    """Write the volume (each rank its chunks), compute metrics over ranks, montage, marker."""
    attrs = {"config": config_to_dict(cfg), "input": recon.input_description()}
    writer = writer_cls(paths.volume, (recon.nx, *recon.plane), recon.chunk_x, overwrite=overwrite,
                        rank=0, attrs=attrs) if ctx.is_main else None
    ctx.barrier()
    if not ctx.is_main:
        writer = writer_cls(paths.volume, (recon.nx, *recon.plane), recon.chunk_x, rank=ctx.rank)
    pieces = []
    for x0, x1 in recon.output_chunks():
        piece = recon.evaluate_rows(x0, x1)
        writer.write_slab(x0, piece)
        pieces.append(piece)
    volume = np.concatenate(pieces)

    metrics: dict = {"steps": cfg.steps, "train_seconds": train_seconds, "ranks": ctx.world_size,
                     "slices_per_step": cfg.slices.per_step, "prior_mode": cfg.prior.mode,
                     "prior_distance": cfg.prior.distance, **(extra_metrics or {})}
    evals = torch.tensor([float(recon.prior_evals)], dtype=torch.float64)
    metrics["prior_evals"] = int(ctx.all_reduce_sum(evals).item())
    images = {"INFusion": volume}
    if recon.reference is not None:
        maps_power = (recon.maps.abs().square().sum(dim=1) > 0).cpu().numpy()
        support = maps_power if not maps_power.all() else None
        candidates = {"infusion": volume, "zero_filled": recon.zero_filled}
        baseline_seconds = 0.0
        if cfg.baseline.l1_wavelet:
            t0 = time.perf_counter()
            candidates["l1_wavelet"] = _l1_wavelet_slab((recon.kspace * recon.scale).cpu().numpy(),
                                                        recon.maps.cpu().numpy(), recon.mask.cpu().numpy())
            baseline_seconds = time.perf_counter() - t0
            images["L1-wavelet"] = candidates["l1_wavelet"]
        sums = torch.tensor([s for img in candidates.values() for s in _error_sums(img, recon.reference, support)],
                            dtype=torch.float64)
        ctx.all_reduce_sum(sums)
        for i, name in enumerate(candidates):
            err, ref = sums[2 * i].item(), sums[2 * i + 1].item()
            metrics[f"nrmse_percent_{name}"] = 100.0 * math.sqrt(err / ref)
        if cfg.baseline.l1_wavelet:
            metrics["l1_wavelet_seconds_max_rank"] = float(
                ctx.all_reduce_max(torch.tensor([baseline_seconds], dtype=torch.float64)).item())
        images["reference"] = recon.reference
    planes = {name: gather_planes(img, recon.x_start, recon.nx, ctx) for name, img in images.items()}
    ctx.barrier()
    if ctx.is_main:
        writer.finalize(metrics)
        paths.metrics.write_text(json.dumps(metrics, indent=1, sort_keys=True))
        if cfg.output.montage:
            title = ", ".join(f"{k.replace('nrmse_percent_', '')} {v:.2f}%" for k, v in metrics.items()
                              if k.startswith("nrmse_percent_")) or "INFusion 3D"
            write_montage(paths.montage, planes, f"NRMSE: {title}" if "%" in title else title)
    ctx.barrier()
    return metrics


# ================================================================================== bundled case


def prepare_bundled_store(cfg: BundledCaseConfig, folder: str | Path, ctx: DistContext) -> Path:
    """The bundled 3D case undersampled as `cfg` says, as a hybrid store in `folder` (collective).

    Rank 0 prepares it once (the store name encodes the settings, so a rerun reuses it); the
    others wait at a barrier and then open it.
    """
    from engine.examples import bundled_case_3d
    from engine.io.data import MulticoilData
    from engine.io.hybrid_store import prepare_hybrid_store
    from engine.physics.masks import make_mask, seed_from_case

    folder = Path(folder)
    calib = "none" if cfg.calib is None else cfg.calib
    path = None
    if ctx.is_main:
        case = bundled_case_3d()
        _, _, ny, nz = case["kspace"].shape
        name = f"{case['name']}_{cfg.mask}_R{cfg.acceleration:g}_calib{calib}_cx{cfg.chunk_x}.zarr"
        path = folder / name
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            mask = make_mask(cfg.mask, (ny, nz), cfg.acceleration, cfg.calib, seed=seed_from_case(case["name"]))
            data = MulticoilData(kspace=case["kspace"], maps=case["maps"], reference=case["reference"],
                                 attrs={"description": case["description"]}, source=str(case["path"]),
                                 layout="3d")
            prepare_hybrid_store(data, path, mask=mask, chunk_x=cfg.chunk_x)
    path = ctx.broadcast_object(str(path) if path is not None else None)
    ctx.barrier()
    return Path(path)


# ================================================================================== the job


def default_output(config_path: str | Path | None, ctx: DistContext, root: str | Path = "outputs") -> Path:
    """outputs/recon3d-<config stem>-<UTC time>.zarr, the time taken on rank 0 and shared."""
    stamp = ctx.broadcast_object(time.strftime("%Y%m%d-%H%M%S", time.gmtime()) if ctx.is_main else None)
    stem = Path(config_path).stem if config_path else "default"
    return Path(root) / f"recon3d-{stem}-{stamp}.zarr"


def recon3d_job(config_path: str | Path | None, overrides: Sequence[str] = (), input_path: str | Path | None = None,
                output_path: str | Path | None = None, overwrite: bool = False, resume: bool = False) -> int:
    """The whole command of launch/recon3d.py on this rank; returns the process exit code.

    0: done; REQUEUE_EXIT_CODE: preempted after a checkpoint (rerun with resume); 2: bad input,
    config or output path (one line on stderr naming what is wrong).
    """
    import sys

    from engine.checkpoint import CheckpointMismatch
    from engine.config import ConfigError, load_config
    from engine.dist import init_distributed, set_cpu_threads, shutdown
    from engine.io.errors import InputError

    try:
        cfg = load_config(Recon3DConfig, config_path, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ctx = init_distributed(device=cfg.device)
    threads = set_cpu_threads(ctx)
    ctx.print0(f"[recon3d] {ctx.world_size} rank(s) via {ctx.launcher}, backend {ctx.backend or 'none'}, "
               f"device {ctx.device}" + (f", {threads} CPU threads per rank" if ctx.device.type == "cpu" else ""))
    try:
        if input_path is None:
            input_path = prepare_bundled_store(cfg.bundled, Path("outputs") / "bundled", ctx)
            ctx.print0(f"[recon3d] no --input: the bundled 3D example (real Colin27 anatomy, simulated "
                       f"coils and phase), {cfg.bundled.mask} R={cfg.bundled.acceleration:g}: {input_path}")
        if output_path is None:
            output_path = default_output(config_path, ctx)
        metrics = run_recon3d(cfg, input_path, output_path, ctx, overwrite=overwrite, resume=resume)
    except Preempted as preempted:
        ctx.print0(f"[recon3d] {preempted}: exit {REQUEUE_EXIT_CODE} (requeue, then rerun with --resume)")
        return REQUEUE_EXIT_CODE
    except NonFiniteStop as stop:
        if ctx.is_main:
            print(f"error: {stop}", file=sys.stderr)
        return NON_FINITE_EXIT_CODE
    except (InputError, ConfigError, CheckpointMismatch, FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"error (rank {ctx.rank}): {error}", file=sys.stderr)
        return 2
    paths = RunPaths.for_output(output_path)
    if ctx.is_main:
        print(f"[recon3d] volume: {paths.volume} (OME-Zarr; open with zarr or napari)")
        print(f"[recon3d] montage {paths.montage}, log {paths.log_csv}, metrics {paths.metrics}")
        if "nrmse_percent_infusion" in metrics:
            line = f"NRMSE vs the fully sampled reference: INFusion {metrics['nrmse_percent_infusion']:.2f} %"
            if "nrmse_percent_l1_wavelet" in metrics:
                line += f", L1-wavelet {metrics['nrmse_percent_l1_wavelet']:.2f} %"
            line += f", zero-filled {metrics['nrmse_percent_zero_filled']:.2f} %"
            print(line + f" ({metrics['train_seconds']:.1f} s, {metrics['steps']} steps)")
    shutdown(ctx)
    return 0


def build_parser(description: str | None = None):
    """The command line of launch/recon3d.py (and of a console entry point)."""
    import argparse

    parser = argparse.ArgumentParser(description=description or "Distributed 3D INFusion reconstruction.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/demo3d.yaml"),
                        help="YAML config (default configs/demo3d.yaml)")
    parser.add_argument("--input", type=Path, default=None,
                        help="hybrid-space Zarr store from launch/prepare.py (default: the bundled example)")
    parser.add_argument("--out", type=Path, default=None, help="output OME-Zarr volume (*.zarr)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. steps=200 prior.mode=off")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint (a fresh start if there is none)")
    return parser


def main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """Parse the command line and run `recon3d_job`; returns the exit code."""
    args = build_parser(description).parse_args(argv)
    return recon3d_job(args.config, args.set, args.input, args.out, overwrite=args.overwrite, resume=args.resume)


__all__ = [
    "NON_FINITE_EXIT_CODE",
    "REQUEUE_EXIT_CODE",
    "BaselineConfig",
    "BundledCaseConfig",
    "CheckpointConfig",
    "DCConfig",
    "GridTrunk",
    "NonFiniteStop",
    "OptimConfig",
    "OutputConfig",
    "Preempted",
    "Recon3D",
    "Recon3DConfig",
    "RunPaths",
    "SliceConfig",
    "StepResult",
    "build_parser",
    "build_sharded_inr",
    "dc_sum",
    "gather_planes",
    "main",
    "prepare_bundled_store",
    "recon3d_job",
    "run_recon3d",
]
