"""The configuration of a 3D run (configs/demo3d.yaml, configs/fullres3d.yaml): typed, documented keys.

engine.config loads YAML into these dataclasses and refuses unknown keys and wrong types;
`result_config` is the part a checkpoint's hash covers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from engine.config import config_to_dict
from engine.losses.dc import Backend
from engine.losses.prior_term import PriorTermConfig
from engine.models import INRConfig
from engine.recon.debias3d import Debias3DConfig
from engine.recon.refine3d import Refine3DConfig
from engine.recon.schedule import AdamConfig
from engine.recon.selection3d import Selection3DConfig
from engine.runtime.checkpoint import (
    CheckpointConfig,
)


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
    contiguous: bool = False
    """Draw K consecutive readout positions per shard (wrapping inside it) instead of K scattered
    ones: the drawn planes then have readout neighbours for `tv_x_weight`."""
    prior_per_step: int = 0
    """At most this many of a shard's K drawn planes go to the prior each prior step, evenly spaced
    in the block (0, or K and more: all K). The prior is the costly term; its loss stays the mean
    over the planes it saw, an unbiased estimate of the mean over all K."""
    cross_per_step: int = 0
    """Slices across the readout per shard and prior step (0: off): an (x, y) plane at a random z
    or an (x, z) plane at a random y, assembled from every rank's rows, shown to the same prior
    (the paper's random 2D slices of the volume; engine.recon.fit3d, "Cross slices")."""
    cross_weight: float = 1.0
    """Weight of the cross slices' prior loss (a mean over them) beside the readout planes' (a mean
    over those)."""
    cross_upsample_x: int = 1
    """Upsampling of the readout axis before a cross slice meets the prior (its other axis takes
    y's or z's factor of prior.upsample): the prior was trained on 1 mm pixels."""

    def __post_init__(self) -> None:
        if self.cross_per_step < 0 or self.cross_upsample_x < 1 or self.cross_weight < 0:
            raise ValueError("config keys slices.cross_per_step, cross_weight must be >= 0 and "
                             "slices.cross_upsample_x >= 1")


@dataclass
class DCConfig:
    """Data consistency."""

    full_every: int = 0
    """Every n-th step uses all planes of the slab for DC instead of the K drawn ones (0: never)."""
    full_final_steps: int = 0
    """The last n steps all use full DC."""
    chunk: int = 16
    """Planes per chunk in a full-DC pass (bounds its memory)."""
    backend: Backend = "auto"
    """kernels.sense backend: 'triton' (fused kernels, CUDA), 'torch' (engine.physics.sense) or 'auto'
    (Triton for CUDA tensors with even plane sizes, torch otherwise)."""


@dataclass
class OptimConfig(AdamConfig):
    """Adam on trunk and head (the shared keys: engine.recon.schedule.AdamConfig); lr is the
    trunk's, and the head's unless lr_head is set."""

    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """learning-rate decay after warm-up, down to lr * lr_final_fraction at the last step."""
    lr_head: float | None = None
    """Learning rate of the head rows; null = lr."""
    ema: float = 0.0
    """Polyak averaging: the output uses an exponential moving average of the parameters with this
    decay per step (e.g. 0.99: about the last 100 steps), which averages out the noise of the
    stochastic plane draws; 0 = the last iterate."""


@dataclass
class PlaneGridConfig:
    """Per-plane capacity beside the shared trunk (engine.recon.fit3d.PlaneGrids): a dense
    multiresolution feature grid per readout position, decoded by a small shared MLP."""

    enabled: bool = False
    """Add decoder(G_x(y, z)) to every plane (needs grad_sync allreduce)."""
    levels: int = 8
    """Resolution levels per plane (configs/inr_tv2d.yaml's hash grid: 8)."""
    features_per_level: int = 2
    """Features per vertex and level."""
    min_res: int = 16
    """Coarsest level's resolution."""
    max_res: int = 0
    """Finest level's resolution; 0 = twice the plane's larger side."""
    hidden: int = 64
    """Width of the shared decoder's hidden layers."""
    layers: int = 2
    """Hidden layers of the shared decoder."""
    lr: float | None = None
    """Learning rate of the grids; null = optim.lr (the decoder follows the trunk's)."""
    init_scale: float = 1e-4
    """Grids start uniform in +-init_scale (Instant-NGP's init)."""
    seed: int = 0
    """Seed of the grids and the decoder."""


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

    def __post_init__(self) -> None:
        # the upper bound depends on the plane: engine.physics.masks refuses an unreachable R by name
        if not (math.isfinite(self.acceleration) and self.acceleration > 1):
            raise ValueError(f"acceleration must be a finite number > 1, got {self.acceleration}")


@dataclass
class BaselineConfig:
    """Classical comparison computed beside the reconstruction (not part of the config hash)."""

    l1_wavelet_3d: bool = True
    """3D L1-wavelet (engine.evaluation.baselines.l1_wavelet_3d: db4 over x, y, z, cycle spinning, 3D lambda
    rule) on each rank's slab plus a halo of neighbouring planes: the comparison to beat."""
    l1_wavelet: bool = False
    """Also L1-wavelet per readout plane (the 2D rule; far too weak on coarse planes, issue 11)."""


@dataclass
class Recon3DConfig:
    """A 3D reconstruction run (configs/demo3d.yaml, configs/fullres3d.yaml)."""

    steps: int = 300
    """Optimisation steps."""
    inr: INRConfig = field(default_factory=INRConfig)
    """Encoding, trunk and head (engine.models)."""
    plane_grids: PlaneGridConfig = field(default_factory=PlaneGridConfig)
    """Per-plane feature grids beside the shared trunk (off: the plain readout-discretised INR)."""
    slices: SliceConfig = field(default_factory=SliceConfig)
    dc: DCConfig = field(default_factory=DCConfig)
    prior: PriorTermConfig = field(default_factory=lambda: PriorTermConfig(mode="tweedie", distance="l2"))
    """The 2D prior term (engine.losses.prior_term), applied to each shard's drawn planes."""
    tv_weight: float = 0.0
    """Weight of the isotropic TV term (engine.losses.tv) on the drawn planes (0: off)."""
    wavelet_weight: float = 0.0
    """Weight of an L1 penalty on the db3 wavelet details (3 levels) of the drawn planes: mean
    over pixels of the complex coefficients' magnitudes (engine.recon.fit3d.wavelet_detail_l1; 0: off)."""
    tv_x_weight: float = 0.0
    """Weight of TV along the readout: mean sqrt(|p_(x+1) - p_x|^2 + eps^2) - eps over the drawn
    neighbour pairs (needs slices.contiguous; rank-local: pairs never cross a shard)."""
    wavelet_x_weight: float = 0.0
    """Weight of an L1 penalty on the readout detail of a 3D wavelet: the db3 coefficients (3 levels,
    approximation included) of (p_(x+1) - p_x) / sqrt 2 over the drawn neighbour pairs, i.e. the
    x-detail bands of a Haar transform along x at every shift; mean over pixels like `wavelet_weight`
    (needs slices.contiguous)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    bf16: bool | None = None
    """bf16 autocast for trunk, head and prior (FFT and losses stay float32/complex64);
    null = on where the device supports it (CUDA with bf16), off on CPU. Measured on one H200
    (benchmarks/results/gpu_check3d-NVIDIA-H200.md, 256 x 256 x 80 x 16 coils): it saves about a quarter
    of the per-step memory and costs 20-40 % of the step time (the steps are launch-bound): false is
    faster where memory allows."""
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
    selection: Selection3DConfig = field(default_factory=Selection3DConfig)
    """Label-free choice of the regularisation strength from held-out samples (engine.recon.selection3d)."""
    debias: Debias3DConfig = field(default_factory=Debias3DConfig)
    """Label-free gains on the output's unmeasured (ky, kz) bands from a holdout fit (engine.recon.debias3d)."""
    refine: Refine3DConfig = field(default_factory=Refine3DConfig)
    """Anchored 3D L1-wavelet refinement of the output (engine.recon.refine3d; off by default)."""

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



__all__ = [
    "BaselineConfig",
    "BundledCaseConfig",
    "CheckpointConfig",
    "DCConfig",
    "OptimConfig",
    "OutputConfig",
    "PlaneGridConfig",
    "Recon3DConfig",
    "SliceConfig",
    "result_config",
]
