"""Distributed 3D INFusion: a readout-sharded, readout-discretised INR fitted with stochastic slices.

docs/ARCHITECTURE.md, "Design". The hybrid-space store (x, coils, ky, kz) makes every readout position x an
independent 2D multicoil problem on its (ky, kz) plane. The INR maps phase-encode coordinates
(y, z) through a replicated trunk to a head with one complex output row per readout position:

    features = trunk(grid (ny*nz, 2))            (ny*nz, hidden)   replicated, grads summed
    plane_x  = head_row_x(features)              (ny, nz) complex  row x owned by one rank
             [+ decoder(G_x(y, z))]               with plane_grids: a feature grid per row x,
                                                  owned like the head row; decoder replicated

Rank r owns the shards (contiguous, chunk-aligned readout slabs) of its block: their k-space,
maps and head rows. One step: every shard draws K readout positions from its own random stream
(engine.recon.slices), the rank evaluates only those head rows, applies data consistency to those
planes (rank-local, no distributed FFT) and passes the same planes (or `slices.prior_per_step` of
them), batched, to the 2D prior.
The global loss is the sum of the ranks' losses; engine.runtime.trunk_sync sums the trunk gradients.

Loss of one step (sum over the shards s, their drawn planes x; w_s = |s| / (nx K)):
    L = sum_s sum_x w_s [ ||M F S_x p_x - y_x||^2 / (C |M|)          (DC, mean per sample)
                          + prior_term(p_x, step)                       (engine.losses.prior_term)
                          + lambda_tv TV(p_x) ]                         (engine.losses.tv)
    + sum_s w_s K lambda_tv_x mean over the drawn neighbour pairs of TV_x(p_x, p_x+1) (slices.contiguous)
    + sum_s w_s K lambda_wavelet_x mean over the pairs of |W (p_x+1 - p_x) / sqrt 2|_1 / (ny nz)
w_s makes the drawn-slice DC an unbiased estimate of the mean DC over all nx planes, which is
what a full-DC step (every plane, `dc.full_every`) computes exactly. The prior term is the 2D
engine's PriorTerm: the one-step (Tweedie) denoiser target ("tweedie") or INFusion's 10-step
Euler ODE ("reference"), distance L2/L1/LPIPS, its noise and weight schedules; each shard has
its own PriorTerm drawing noise from that shard's stream, batched over the shard's K planes.

Cross slices (`slices.cross_per_step`): the prior also sees planes across the readout, an (x, y)
plane at z = z0 or an (x, z) plane at y = y0, drawn per shard and prior step from a stream of
(seed, shard, step) that every rank computes alike. Each rank renders its rows of every drawn
slice (one line of the trunk's features through its head rows and plane grids), one all-reduce
of the zero-padded rows assembles them, the rank owning the slice's shard runs the prior on it,
and a second all-reduce hands the gradient of that loss back to every rank's rows. Their loss
is cross_weight x the mean over the drawn slices; the prior sees them at the readout's
`cross_upsample_x` and the other axis' `prior.upsample` factor, without the unmeasured-only
restriction (a (ky, kz) mask does not act on one such plane).

Memory: a step holds the trunk on the plane grid plus K planes x coils (x the number of local
shards), independent of nx; full-DC steps evaluate the slab in chunks of `dc.chunk` rows,
back-propagating chunk by chunk into a detached copy of the trunk features.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from engine.losses.prior_term import PriorTerm
from engine.losses.tv import total_variation
from engine.models import ComplexRowHead, INRConfig, ReadoutINR
from engine.models.encodings import level_resolutions
from engine.physics import sense
from engine.recon.config3d import (
    BaselineConfig,
    BundledCaseConfig,
    CheckpointConfig,
    DCConfig,
    OptimConfig,
    OutputConfig,
    PlaneGridConfig,
    Recon3DConfig,
    SliceConfig,
    result_config,
)
from engine.recon.schedule import lr_factor
from engine.recon.slices import Shard, ShardSampler, shard_seed, shards_of_rank, split_readout
from engine.runtime.checkpoint import capture_rng_state, restore_rng_state
from engine.runtime.context import DistContext
from engine.runtime.preemption import (
    NON_FINITE_EXIT_CODE,
    REQUEUE_EXIT_CODE,
    Preempted,
    PreemptionFlag,
)
from engine.runtime.trunk_sync import make_trunk_sync
from kernels.sense import dc_loss

# ================================================================================== pieces


class GridTrunk(nn.Module):
    """Encoding + MLP evaluated on the full (ny, nz) coordinate grid: forward(shape) -> (ny*nz, hidden).

    Taking the grid shape (not coordinates) lets the hash grid use its separable fast path and
    lets DDP / DeepSpeed wrap the module with a plain call.
    """

    def __init__(self, encoding: nn.Module, mlp: nn.Module, plane_decoder: nn.Module | None = None):
        super().__init__()
        self.encoding, self.mlp = encoding, mlp
        # replicated like the trunk, so it lives here and its gradient joins the trunk's all-reduce
        # (it is called outside forward: only grad_sync allreduce supports it)
        self.plane_decoder = plane_decoder

    def forward(self, shape: tuple[int, int]) -> torch.Tensor:
        return self.mlp(self.encoding.forward_grid(tuple(shape)))


class PlaneGrids(nn.Module):
    """Per-plane capacity beside the shared trunk: one dense multiresolution feature grid per
    readout position (rank-local, like the head rows), decoded by a small MLP shared by all planes.

    plane_x(y, z) = head_x(trunk(y, z)) + decoder(G_x(y, z)), G_x = the bilinear interpolation of
    its levels (resolutions min_res .. max_res, geometric, as the hash grid's; a level of
    (res+1)^2 vertices is what a hash grid stores when it does not hash). This is the 2D INR's
    encoding per plane, so a plane can hold detail that the shared features cannot, while the
    trunk carries what the planes share. Rows are initialised from (seed, global row), so any
    split over ranks gives the single-process model.
    """

    def __init__(self, config: PlaneGridConfig, x_start: int, x_stop: int, plane: tuple[int, int]):
        super().__init__()
        max_res = config.max_res or 2 * max(plane)
        self.resolutions = level_resolutions(config.min_res, max_res, config.levels)
        self.x_start, self.features = x_start, config.features_per_level
        self.levels = nn.ParameterList()
        for res in self.resolutions:
            rows = []
            for x in range(x_start, x_stop):
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + x * 101 + res)
                rows.append(torch.rand(config.features_per_level, res + 1, res + 1, generator=generator) * 2 - 1)
            self.levels.append(nn.Parameter(torch.stack(rows) * config.init_scale))

    @property
    def out_dim(self) -> int:
        return len(self.resolutions) * self.features

    def forward(self, global_rows: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Features (B, ny*nz, out_dim) of the given planes on the (ny, nz) pixel grid."""
        local = (global_rows - self.x_start).to(self.levels[0].device)
        feats = [nn.functional.interpolate(level[local], size=tuple(shape), mode="bilinear", align_corners=True)
                 for level in self.levels]
        return torch.cat(feats, dim=1).flatten(2).transpose(1, 2)

    def line(self, global_rows: torch.Tensor, axis: int, index: int, shape: tuple[int, int]) -> torch.Tensor:
        """Features (B, n, out_dim) of the given planes on one line of the (ny, nz) pixel grid: y = index
        (axis 0, n = nz) or z = index (axis 1, n = ny); equal to forward's pixels there (bilinear is
        linear along each axis in turn), at the cost of one line."""
        local = (global_rows - self.x_start).to(self.levels[0].device)
        fixed, free = shape[axis], shape[1 - axis]
        feats = []
        for res, level in zip(self.resolutions, self.levels):
            grid = level[local] if axis == 1 else level[local].transpose(-1, -2)  # fixed axis last
            position = index * res / (fixed - 1) if fixed > 1 else 0.0  # align_corners=True
            low = min(math.floor(position), res - 1)
            frac = position - low
            column = grid[..., low] * (1 - frac) + grid[..., low + 1] * frac  # (B, F, res + 1)
            feats.append(nn.functional.interpolate(column, size=free, mode="linear", align_corners=True))
        return torch.cat(feats, dim=1).transpose(1, 2)


def plane_decoder(config: PlaneGridConfig, in_dim: int) -> nn.Module:
    """The shared decoder of PlaneGrids: MLP (layers x hidden, ReLU) -> 2 (real, imag); seeded."""
    from engine.models.inr import MLP

    state = torch.random.get_rng_state()
    torch.manual_seed(config.seed + 7)
    try:
        return nn.Sequential(MLP(in_dim, config.hidden, config.layers, "relu"), nn.Linear(config.hidden, 2))
    finally:
        torch.random.set_rng_state(state)


def build_sharded_inr(config: INRConfig, nx: int, x_start: int, x_stop: int) -> tuple[GridTrunk, ComplexRowHead]:
    """The trunk and the head rows [x_start, x_stop) of the ReadoutINR with nx rows.

    The full model is initialised from config.seed on every rank (identical trunk everywhere,
    head rows identical to the single-process model's), then only the slab's rows are kept.
    """
    full = ReadoutINR(config, out_rows=nx, in_dim=2)
    head = ComplexRowHead(config.hidden, x_stop - x_start)
    with torch.no_grad():
        head.weight.copy_(full.head.weight[x_start:x_stop])
        head.bias.copy_(full.head.bias[x_start:x_stop])
    return GridTrunk(full.encoding, full.trunk), head


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


def wavelet_detail_l1(planes: torch.Tensor, levels: int = 3, eps: float = 1e-4,
                      include_approximation: bool = False) -> torch.Tensor:
    """Mean over the planes' pixels of |d| (complex magnitude, smoothed by eps like the TV) of the
    db3 wavelet details of (B, ny, nz) complex planes; sides not divisible by 2^levels are
    zero-padded; planes too small for `levels` (fewer than 4 coarsest pixels per side) get fewer.
    The approximation band is left free unless `include_approximation` (for planes that are
    themselves details, such as readout differences)."""
    import torch.nn.functional as F

    from engine.losses.wavelet import dwt2, max_levels

    b, ny, nz = planes.shape
    levels = max(1, min(levels, max_levels(ny, nz)))
    step = 2**levels
    parts = torch.view_as_real(planes).movedim(-1, 1).reshape(2 * b, ny, nz)  # (re, im) of each plane
    parts = F.pad(parts, (0, (-nz) % step, 0, (-ny) % step))
    approx, details = dwt2(parts, levels)
    if include_approximation:
        details = [*details, approx.unsqueeze(1)]
    total = planes.new_zeros((), dtype=torch.float32)
    for d in details:
        pair = d.reshape(b, 2, *d.shape[1:])
        total = total + (torch.sqrt(pair[:, 0].square() + pair[:, 1].square() + eps * eps) - eps).sum()
    return total / (b * ny * nz)


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
        holdout: (ny, nz) weights >= 0 whose non-zero entries are measured samples withheld from the
            fit (engine.recon.selection3d): the fit sees the other samples, :meth:`heldout_error` scores
            on these with these weights (0/1: unweighted).
    """

    def __init__(self, cfg: Recon3DConfig, source, ctx: DistContext, prior: nn.Module | None = None,
                 holdout: np.ndarray | None = None):
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        nx, coils, ny, nz = (int(s) for s in source.shape)
        self.nx, self.coils, self.plane = nx, coils, (ny, nz)
        self.chunk_x = int(source.chunk_x)
        num_shards = cfg.slices.num_shards or ctx.world_size
        self.shards = split_readout(nx, self.chunk_x, num_shards)
        self.local_shards: list[Shard] = shards_of_rank(self.shards, ctx.rank, ctx.world_size)
        self.x_start, self.x_stop = self.local_shards[0].start, self.local_shards[-1].stop
        self.bf16 = (self.device.type == "cuda" and torch.cuda.is_bf16_supported()) if cfg.bf16 is None else cfg.bf16

        self.source = source  # the 3D baseline reads its slab with a halo of neighbouring planes
        acquisition = (getattr(source, "attrs", None) or {}).get("acquisition") or {}
        voxel = acquisition.get("voxel_size_mm")
        self.voxel_size_mm = tuple(float(v) for v in voxel) if voxel and len(voxel) == 3 else None
        slab = source.read_slab(self.x_start, self.x_stop)
        if slab.maps is None:
            raise ValueError(f"{getattr(source, 'path', 'input')}: the hybrid store has no coil maps "
                             "(prepare it again with launch/prepare.py --maps-from espirit, or --maps FILE)")
        mask = torch.as_tensor(np.asarray(source.mask, dtype=np.float32))
        kspace = torch.as_tensor(np.asarray(slab.kspace, dtype=np.complex64)) * mask
        maps = torch.as_tensor(np.asarray(slab.maps, dtype=np.complex64))
        self.reference = None if slab.reference is None else np.asarray(slab.reference)
        # Intensity convention of the prior: 99th percentile of the zero-filled magnitude -> 1 (of all
        # measured samples, so that a fit with a held-out part has the same scale as one without).
        zero_filled = torch.cat([sense.adjoint(k, m) for k, m in zip(kspace.split(8), maps.split(8))])
        self.holdout = None  # the held-out samples' weights (0 elsewhere)
        if holdout is not None:
            weights = torch.as_tensor(np.asarray(holdout, dtype=np.float32))
            held = (weights > 0).float()
            if weights.shape != mask.shape or bool((held > mask).any()) or bool((weights < 0).any()):
                raise ValueError(f"holdout {tuple(weights.shape)} must be weights >= 0 on a part of the "
                                 f"{tuple(mask.shape)} mask")
            mask = mask - held
            self.holdout = weights.to(self.device)
        self.measured_per_plane = float(mask.sum()) * coils
        self.scale = global_percentile(zero_filled.abs(), 99.0, ctx)
        self.zero_filled = zero_filled.numpy()
        kspace = kspace / self.scale
        data_device = torch.device("cpu") if cfg.data_on_host else self.device
        pin = cfg.data_on_host and self.device.type == "cuda"
        self.kspace = (kspace.pin_memory() if pin else kspace).to(data_device)
        self.maps = (maps.pin_memory() if pin else maps).to(data_device)
        self.mask = mask.to(self.device)

        trunk, head = build_sharded_inr(cfg.inr, nx, self.x_start, self.x_stop)
        self.plane_grids = None
        if cfg.plane_grids.enabled:
            if cfg.grad_sync != "allreduce":
                raise ValueError("plane_grids.enabled needs grad_sync allreduce (its shared decoder is "
                                 "called outside the trunk's forward, which DDP and DeepSpeed do not see)")
            self.plane_grids = PlaneGrids(cfg.plane_grids, self.x_start, self.x_stop, self.plane).to(self.device)
            trunk.plane_decoder = plane_decoder(cfg.plane_grids, self.plane_grids.out_dim)
        self.trunk, self.head = trunk.to(self.device), head.to(self.device)
        K, seen = cfg.slices.per_step, cfg.slices.prior_per_step
        if seen < 0:
            raise ValueError(f"config key slices.prior_per_step: {seen} must be >= 0 (0: all drawn planes)")
        # evenly spaced in the drawn block: with contiguous draws they cover its length
        self.prior_subset = torch.linspace(0, K - 1, seen).round().long() if 0 < seen < K else slice(None)
        for key in ("tv_x_weight", "wavelet_x_weight"):
            if getattr(cfg, key) > 0 and not cfg.slices.contiguous:
                raise ValueError(f"{key} needs slices.contiguous: true (scattered draws have no neighbours)")
        self.samplers = [ShardSampler(s, cfg.slices.per_step, cfg.slices.seed, cfg.slices.contiguous)
                         for s in self.local_shards]
        self.head_optimizer = torch.optim.Adam(self._local_param_groups(), betas=cfg.optim.betas)
        self.sync = make_trunk_sync(cfg.grad_sync, self.trunk, ctx, cfg.optim.lr, tuple(cfg.optim.betas),
                                    zero_stage=cfg.zero_stage)
        self.prior_terms = self._build_prior_terms(prior)
        self.cross_terms = self._build_cross_terms()
        # Polyak averaging (optim.ema): shadow copies of every parameter, used for the output
        self.ema = {name: p.detach().clone() for name, p in self._named_parameters()} if cfg.optim.ema else None
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

    def _build_cross_terms(self) -> list[dict[int, PriorTerm]]:
        """Per local shard, the prior terms of its cross slices by fixed axis (0: y, an (x, z) plane;
        1: z, an (x, y) plane), drawing noise from the shard's stream like its readout planes'."""
        s = self.cfg.slices
        if s.cross_per_step == 0:
            return []
        if not self.prior_terms:
            raise ValueError("config key slices.cross_per_step: cross slices need the prior (prior.mode is off)")
        up_y, up_z = self.cfg.prior.upsample_factors
        crossing = replace(self.cfg.prior, unmeasured_only=False, min_k_radius=0.0)  # no (ky, kz) mask across
        configs = {0: replace(crossing, upsample=(s.cross_upsample_x, up_z)),
                   1: replace(crossing, upsample=(s.cross_upsample_x, up_y))}
        return [{axis: PriorTerm(c, term.prior, self.cfg.steps, term.generator, term.autocast_dtype)
                 for axis, c in configs.items()} for term in self.prior_terms]

    def _local_lrs(self) -> list[float]:
        """Base learning rates of the rank-local parameter groups: head rows[, plane grids]."""
        o = self.cfg.optim
        lrs = [o.lr if o.lr_head is None else o.lr_head]
        if self.plane_grids is not None:
            lrs.append(o.lr if self.cfg.plane_grids.lr is None else self.cfg.plane_grids.lr)
        return lrs

    def _local_param_groups(self) -> list[dict]:
        groups = [{"params": list(self.head.parameters())}]
        if self.plane_grids is not None:
            groups.append({"params": list(self.plane_grids.parameters()), "eps": 1e-15})
        return [dict(g, lr=lr) for g, lr in zip(groups, self._local_lrs())]

    def _named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Trunk (replicated), head rows and plane grids (this rank's), with unique names."""
        modules = {"trunk": self.trunk, "head": self.head, "plane_grids": self.plane_grids}
        return [(f"{key}.{name}", p) for key, module in modules.items() if module is not None
                for name, p in module.named_parameters()]

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.optim.ema
        for name, p in self._named_parameters():
            self.ema[name].lerp_(p.detach(), 1.0 - decay)

    def input_description(self) -> dict:
        return {"shape_x_coils_ky_kz": [self.nx, self.coils, *self.plane], "chunk_x": self.chunk_x,
                "num_shards": len(self.shards)}

    # ------------------------------------------------------------------ schedules

    def lr_factor(self, step: int) -> float:
        """Multiplier of optim.lr at `step` (engine.recon.schedule, the rule 2D uses too)."""
        o = self.cfg.optim
        return lr_factor(step, self.cfg.steps, o.schedule, o.lr_final_fraction, o.warmup_steps)

    def is_full_dc_step(self, step: int) -> bool:
        d = self.cfg.dc
        return (d.full_every > 0 and (step + 1) % d.full_every == 0) or step >= self.cfg.steps - d.full_final_steps

    # ------------------------------------------------------------------ one step

    def _planes(self, features: torch.Tensor, global_rows: torch.Tensor) -> torch.Tensor:
        """Head rows (global indices) on the feature grid -> (B, ny, nz) complex64."""
        with _autocast(self.device, self.bf16):
            out = self.head(features, (global_rows - self.x_start).to(self.device))
            if self.plane_grids is not None:
                out = out + self._decoded(self.plane_grids(global_rows, self.plane))
        return out.view(-1, *self.plane)

    def _decoded(self, grid_features: torch.Tensor) -> torch.Tensor:
        """The shared decoder's complex64 output for plane-grid features (..., out_dim)."""
        residual = self.trunk.plane_decoder(grid_features).float()
        return torch.complex(residual[..., 0], residual[..., 1])

    def _slab_data(self, global_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k-space (of the fitted samples) and maps of these readout positions, on the device."""
        local = global_rows - self.x_start
        k, m = self.kspace[local].to(self.device, non_blocking=True), self.maps[local].to(self.device, non_blocking=True)
        # self.kspace keeps every measured sample (the held-out error needs them); the fit sees its part
        return (k if self.holdout is None else k * self.mask), m

    def _dc_term(self, planes: torch.Tensor, rows: torch.Tensor, weight: float) -> torch.Tensor:
        kspace, maps = self._slab_data(rows)
        return dc_loss(planes, maps, self.mask, kspace, backend=self.cfg.dc.backend) * (weight / self.measured_per_plane)

    def step(self) -> StepResult:
        """One optimisation step (collective when distributed)."""
        cfg, step = self.cfg, self.step_index
        full = self.is_full_dc_step(step)
        K = cfg.slices.per_step
        draws = [s.draw() for s in self.samplers]
        weights = [s.shard.size / (self.nx * K) for s in self.samplers]  # w_s of the module docstring
        for group, lr in zip(self.head_optimizer.param_groups, self._local_lrs()):
            group["lr"] = lr * self.lr_factor(step)
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
                # PriorTerm and total_variation return means over the planes they see: x K for sums.
                prior_loss, evals = self.prior_terms[i](shard_planes[self.prior_subset], step)
                terms["prior"] = terms["prior"] + (w * K) * prior_loss
                self.prior_evals += evals
            if cfg.tv_weight > 0:
                tv = total_variation(shard_planes, "isotropic", scale=1.0)
                terms["tv"] = terms["tv"] + (cfg.tv_weight * w * K) * tv
            if cfg.wavelet_weight > 0:
                wavelet = wavelet_detail_l1(shard_planes)
                terms["tv"] = terms["tv"] + (cfg.wavelet_weight * w * K) * wavelet
            if cfg.tv_x_weight > 0 or cfg.wavelet_x_weight > 0:
                pairs = ShardSampler.neighbour_pairs(draw).to(self.device)
                if len(pairs):
                    step_x = shard_planes[pairs + 1] - shard_planes[pairs]
                    # means over the K - 1 pairs of a block, x K: the same scale per plane as `tv`
                    if cfg.tv_x_weight > 0:
                        eps = 1e-4  # as engine.losses.tv: a finite gradient where neighbours agree
                        tv_x = (torch.sqrt(step_x.real.square() + step_x.imag.square() + eps * eps) - eps).mean()
                        terms["tv"] = terms["tv"] + (cfg.tv_x_weight * w * K) * tv_x
                    if cfg.wavelet_x_weight > 0:
                        wavelet_x = wavelet_detail_l1(step_x / math.sqrt(2.0), include_approximation=True)
                        terms["tv"] = terms["tv"] + (cfg.wavelet_x_weight * w * K) * wavelet_x
        local_loss = terms["dc"] + terms["prior"] + terms["tv"]
        if self.cross_terms and self.cross_terms[0][0].active(step):  # the same step on every rank
            cross_loss, surrogate, evals = self._cross_prior(leaf, step)
            terms["prior"] = terms["prior"] + cross_loss
            local_loss = local_loss + surrogate
            self.prior_evals += evals
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
            if self.ema is not None:
                self._update_ema()
        self.sync.zero_grad()
        self.head_optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        return StepResult(step, rows, {"dc": dc, "prior": prior_term, "tv": tv}, full, int(prior_evals),
                          skipped, stop > 0)

    def run_to_end(self, progress_label: str | None = None, after_step=None) -> None:
        """Step until cfg.steps, calling `after_step(self, result)` after each step (it may raise to
        stop, e.g. Preempted); progress labelled `progress_label` on the main rank when given: a tqdm
        bar, or a line every tenth of the steps when stderr is not a terminal (batch logs). Collective.
        The fits before the final one (selection's candidates, debias's holdout fit) run this way; the
        job's own loop adds its log and the final run's checkpoints."""
        bar, plain_every = None, 0
        if progress_label is not None and self.ctx.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.cfg.steps, initial=self.step_index, desc=progress_label, dynamic_ncols=True,
                       disable=None)
            plain_every = max(self.cfg.steps // 10, 1) if bar.disable else 0
        try:
            while self.step_index < self.cfg.steps:
                result = self.step()
                if bar is not None:
                    bar.update(1)
                if plain_every and (self.step_index % plain_every == 0 or self.step_index == self.cfg.steps):
                    print(f"[recon3d] {progress_label}: step {self.step_index}/{self.cfg.steps}", flush=True)
                if after_step is not None:
                    after_step(self, result)
        finally:
            if bar is not None:
                bar.close()

    # ------------------------------------------------------------------ cross slices

    def cross_slices(self, step: int) -> list[tuple[int, int, int]]:
        """(shard index, fixed axis (0: y, 1: z), index) of every shard's cross slices at `step`,
        the same on every rank: drawn from a stream seeded by (seed, shard, step), so nothing to
        checkpoint."""
        draws = []
        for shard in self.shards:
            seed = (shard_seed(self.cfg.slices.seed, shard.index) + 7919 * (step + 1)) % 2**63
            generator = torch.Generator().manual_seed(seed)
            for _ in range(self.cfg.slices.cross_per_step):
                axis = int(torch.randint(2, (1,), generator=generator))
                draws.append((shard.index, axis, int(torch.randint(self.plane[axis], (1,), generator=generator))))
        return draws

    def _cross_rows(self, leaf: torch.Tensor, axis: int, index: int) -> torch.Tensor:
        """This rank's rows of the cross slice at y (axis 0) or z (axis 1) = index: (slab, n) complex64,
        n the other phase-encode axis' length."""
        ny, nz = self.plane
        grid = leaf.view(ny, nz, -1)
        line = grid[index] if axis == 0 else grid[:, index]
        with _autocast(self.device, self.bf16):
            out = self.head(line)  # every local row
            if self.plane_grids is not None:
                rows = torch.arange(self.x_start, self.x_stop)
                out = out + self._decoded(self.plane_grids.line(rows, axis, index, self.plane))
        return out

    def _sum_over_ranks(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Complex tensors summed over ranks, packed into one all-reduce."""
        flat = torch.cat([torch.view_as_real(t).reshape(-1) for t in tensors]).cpu()
        self.ctx.all_reduce_sum(flat)
        out, offset = [], 0
        for t in tensors:
            out.append(torch.view_as_complex(flat[offset:offset + 2 * t.numel()].view(*t.shape, 2)).to(self.device))
            offset += 2 * t.numel()
        return out

    def _cross_prior(self, leaf: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The cross slices' term (module docstring): (this rank's share of the loss, detached; a
        surrogate whose gradient through this rank's rows is the loss's; U-Net evaluations)."""
        draws = self.cross_slices(step)
        parts = [self._cross_rows(leaf, axis, index) for _, axis, index in draws]
        padded = []
        for part in parts:
            full = part.new_zeros((self.nx, part.shape[1]))
            full[self.x_start:self.x_stop] = part.detach()
            padded.append(full)
        slices = self._sum_over_ranks(padded)  # every rank's rows: the whole slices
        owner = {shard.index: i for i, shard in enumerate(self.local_shards)}
        weight = self.cfg.slices.cross_weight / len(draws)
        loss, evals, grads = torch.zeros((), device=self.device), 0, []
        for (shard, axis, _), whole in zip(draws, slices):
            if shard not in owner:
                grads.append(torch.zeros_like(whole))
                continue
            whole.requires_grad_(True)
            term, n = self.cross_terms[owner[shard]][axis](whole.unsqueeze(0), step)
            (weight * term).backward()
            loss, evals = loss + weight * term.detach(), evals + n
            grads.append(whole.grad)
        grads = self._sum_over_ranks(grads)
        surrogate = sum((torch.view_as_real(part) * torch.view_as_real(g[self.x_start:self.x_stop])).sum()
                        for part, g in zip(parts, grads))
        return loss, surrogate, evals

    def _gradients_finite(self) -> bool:
        """Head gradients, and trunk gradients (already summed over ranks) unless ZeRO holds them."""
        params = list(self.head.parameters())
        if self.plane_grids is not None:
            params += list(self.plane_grids.parameters())
        if self.cfg.grad_sync != "deepspeed":
            params += list(self.trunk.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    # ------------------------------------------------------------------ evaluation

    @contextlib.contextmanager
    def _output_parameters(self):
        """With optim.ema, the averaged parameters in place of the live ones (put back on exit)."""
        live = None
        if self.ema is not None:
            live = {name: p.detach().clone() for name, p in self._named_parameters()}
            for name, p in self._named_parameters():
                p.copy_(self.ema[name])
        try:
            yield
        finally:
            if live is not None:
                for name, p in self._named_parameters():
                    p.copy_(live[name])

    @torch.no_grad()
    def evaluate_rows(self, x0: int, x1: int) -> np.ndarray:
        """The reconstruction of readout positions [x0, x1) (inside this rank's slab), complex64
        (x1 - x0, ny, nz) in the input's intensity units."""
        with self._output_parameters():
            with _autocast(self.device, self.bf16):
                features = self.trunk(self.plane)
            planes = self._planes(features, torch.arange(x0, x1))
        return (planes * self.scale).cpu().numpy().astype(np.complex64)

    @torch.no_grad()
    def heldout_error(self, volume: np.ndarray | None = None) -> float:
        """sum w |F S x - y|^2 / sum w |y|^2 over the held-out samples (weights w), the output volume's
        relative error there, summed over every plane of every rank (collective; needs `holdout`).
        volume: this rank's slab in the input's units (as evaluate_slab returns it) to score in place
        of the INR's output (a refinement of it)."""
        if volume is not None:
            return float(self.heldout_gram([volume])[0, 0].sum())
        self._needs_holdout()
        # kernels.sense.dc_loss's mask is 0/1, so the weighted sum is written out here
        sums = torch.zeros(2, dtype=torch.float64)
        with self._output_parameters():
            with _autocast(self.device, self.bf16):
                features = self.trunk(self.plane)
            for chunk in torch.arange(self.x_start, self.x_stop).split(self.cfg.dc.chunk):
                local = chunk - self.x_start
                kspace, maps = self.kspace[local].to(self.device), self.maps[local].to(self.device)
                predicted = sense.forward(self._planes(features, chunk), maps)
                sums[0] += float((self.holdout * (predicted - kspace).abs().square()).sum())
                sums[1] += float((self.holdout * kspace.abs().square()).sum())
        error, energy = self.ctx.all_reduce_sum(sums).tolist()
        return error / energy

    @torch.no_grad()
    def heldout_gram(self, volumes: Sequence[np.ndarray]) -> np.ndarray:
        """G[i, j, l] = Re sum w conj(r_i) r_j / sum w |y|^2 at the l-th held-out (ky, kz) location (in
        the order of the holdout's non-zero entries; weights w), where r_i = F S v_i - y is the residual of
        volumes[i] (this rank's slab in the input's units), summed over coils and every plane of every
        rank (collective; needs `holdout`). G.sum(-1)[i, i] is the held-out error of volumes[i]; a blend
        sum_i a_i v_i with sum_i a_i = 1 has the held-out error a^T G.sum(-1) a. Per location, because
        the locations are the independent draws whose spread gives a difference its standard error
        (engine.recon.selection3d.one_standard_error_choice)."""
        self._needs_holdout()
        n, held = len(volumes), self.holdout > 0
        sums = torch.zeros(n, n, int(held.sum()), dtype=torch.float64)
        energy = torch.zeros(1, dtype=torch.float64)
        for chunk in torch.arange(self.x_start, self.x_stop).split(self.cfg.dc.chunk):
            local = chunk - self.x_start
            kspace, maps = self.kspace[local].to(self.device), self.maps[local].to(self.device)
            residuals = [sense.forward(torch.from_numpy(v[local.numpy()]).to(self.device) / self.scale, maps) - kspace
                         for v in volumes]
            for i in range(n):
                weighted = self.holdout * residuals[i]
                for j in range(n):
                    sums[i, j] += (weighted.conj() * residuals[j]).real.sum(dim=(0, 1))[held].double().cpu()
            energy += float((self.holdout * kspace.abs().square()).sum())
        total = self.ctx.all_reduce_sum(torch.cat([sums.flatten(), energy]))
        return (total[:-1] / total[-1]).reshape(sums.shape).numpy()

    def _needs_holdout(self) -> None:
        if self.holdout is None:
            raise ValueError("the held-out error needs a Recon3D made with a holdout mask")

    def input_planes(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """k-space of the fitted samples (the held-out ones zeroed) and maps of the input's planes [a, b),
        in its units, read from the input: the slab solves (3D L1-wavelet, refinement) read a halo of
        planes beyond this rank's slab."""
        slab = self.source.read_slab(a, b)
        mask = self.mask.cpu().numpy()
        return np.asarray(slab.kspace, np.complex64) * mask, np.asarray(slab.maps, np.complex64)

    def maps_support(self) -> np.ndarray | None:
        """(slab, ny, nz) bool: where the coil maps cover the image (the metrics' support), None
        when they cover everything."""
        power = (self.maps.abs().square().sum(dim=1) > 0).cpu().numpy()
        return power if not power.all() else None

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
            "plane_grids": None if self.plane_grids is None else self.plane_grids.state_dict(),
            "head_optimizer": self.head_optimizer.state_dict(),
            "samplers": [s.state_dict() for s in self.samplers],
            "rng": capture_rng_state(),
            "prior_evals": self.prior_evals,
            "prior_targets": [t.target for t in self.prior_terms],  # reused when prior.reuse_target
            "slab": [self.x_start, self.x_stop],
            "ema": self.ema,
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
        if self.plane_grids is not None:
            self.plane_grids.load_state_dict(rank_state["plane_grids"])
        self.head_optimizer.load_state_dict(rank_state["head_optimizer"])
        for sampler, state in zip(self.samplers, rank_state["samplers"], strict=True):
            sampler.load_state_dict(state)
        restore_rng_state(rank_state["rng"])
        self.prior_evals = int(rank_state["prior_evals"])
        if self.ema is not None:
            self.ema = {name: t.to(self.device) for name, t in rank_state["ema"].items()}
        for term, target in zip(self.prior_terms, rank_state["prior_targets"]):
            term.target = None if target is None else target.to(self.device)
        self.step_index = step


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
    "PreemptionFlag",
    "Recon3D",
    "Recon3DConfig",
    "SliceConfig",
    "StepResult",
    "build_sharded_inr",
    "global_percentile",
    "result_config",
]
