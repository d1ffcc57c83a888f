"""Training patches for the prior: 2D slices of all three orientations of 3D volumes, augmented.

Volumes are read from NIfTI (.nii/.nii.gz, nibabel), NumPy (.npy), HDF5 (.h5/.hdf5, dataset ``key``)
or Zarr (directory, array ``key``). A source can be restricted to a training part, either in world
coordinates (NIfTI: ``world_z_max_mm`` / ``world_z_min_mm`` along the RAS superior axis) or by a
voxel range on one axis (any format). Every slice is scaled so that its 99th magnitude percentile
is 1 (the prior's intensity convention). Patches are drawn with a random rotation, zoom, flips and
intensity jitter; magnitude volumes get a smooth random phase (a random polynomial of order <= 2);
optionally, augmentations that mimic other scanners (engine/prior/augment.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.prior.augment import ScannerAugmentConfig, augment_scanner


@dataclass
class VolumeSource:
    """One volume file and the part of it that may train the prior."""

    path: str
    """NIfTI, .npy, .h5/.hdf5 or Zarr (directory) file of a 3D volume (real or complex)."""
    key: str | None = None
    """Dataset / array name inside an HDF5 file or Zarr group (None: the file is the array)."""
    world_z_max_mm: float | None = None
    """NIfTI only: keep voxels whose world (RAS) z is < this (mm)."""
    world_z_min_mm: float | None = None
    """NIfTI only: keep voxels whose world (RAS) z is >= this (mm)."""
    voxel_axis: int | None = None
    """Any format: restrict this voxel axis to [voxel_start, voxel_stop)."""
    voxel_start: int = 0
    voxel_stop: int | None = None


@dataclass
class DataConfig:
    """Which volumes train the prior and how patches are augmented."""

    volumes: list[VolumeSource] = field(default_factory=list)
    """The training volumes (their training parts)."""
    orientations: tuple[int, ...] = (0, 1, 2)
    """Volume axes along which slices are taken (all three: one prior for every plane)."""
    patch_size: int = 64
    """Side of the square training patches (pixels)."""
    min_slice_fraction: float = 0.25
    """Skip slices whose 99th percentile is below this fraction of the volume's (near-empty)."""
    zoom_range: tuple[float, float] = (0.8, 2.0)
    """Source pixels per patch pixel (log-uniform); > 1.5 reads a 2x box-filtered copy (no aliasing)."""
    rotation_degrees: float = 10.0
    """Uniform random in-plane rotation in [-r, r] degrees."""
    flips: bool = True
    """Random flips of both in-plane axes."""
    intensity_jitter: float = 1.25
    """Magnitude scaled by a log-uniform factor in [1/j, j]."""
    gamma_jitter: float = 1.15
    """Magnitude raised to a log-uniform power in [1/g, g] (contrast variety)."""
    phase_order: int = 2
    """Order of the random smooth phase polynomial of magnitude volumes (-1: real images)."""
    phase_amplitude: float = math.pi
    """Each non-constant phase coefficient is uniform in [-a, a] (coordinates in [-1, 1]); the
    constant phase is uniform in [0, 2 pi)."""
    min_patch_p99: float = 0.05
    """Redraw (up to 4 times) a patch whose 99th magnitude percentile is below this (background)."""
    scanner: ScannerAugmentConfig = field(default_factory=ScannerAugmentConfig)
    """Augmentations that mimic other scanners and contrasts (engine/prior/augment.py; off by default)."""


def read_volume(source: VolumeSource) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a 3D volume: (array (X, Y, Z) float32 or complex64, affine (4, 4) or None)."""
    path = Path(source.path)
    if not path.exists():
        raise FileNotFoundError(f"read_volume: {path} does not exist")
    name = path.name.lower()
    affine = None
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    elif name.endswith(".npy"):
        data = np.load(path, allow_pickle=False)
    elif name.endswith((".h5", ".hdf5")):
        import h5py

        with h5py.File(path, "r") as f:
            if source.key is None or source.key not in f:
                raise KeyError(f"read_volume: {path} needs key= one of {list(f.keys())}, got {source.key!r}")
            data = f[source.key][()]
    elif path.is_dir() or name.endswith(".zarr"):
        import zarr

        store = zarr.open(str(path), mode="r")
        data = np.asarray(store[source.key][...] if source.key is not None else store[...])
    else:
        raise ValueError(f"read_volume: {path}: unknown format (NIfTI, .npy, .h5, Zarr)")
    data = np.squeeze(data)
    if data.ndim != 3:
        raise ValueError(f"read_volume: {path} holds shape {data.shape}; expected a 3D volume")
    data = data.astype(np.complex64 if np.iscomplexobj(data) else np.float32)
    return data, affine


def training_part(data: np.ndarray, affine: np.ndarray | None, source: VolumeSource) -> np.ndarray:
    """Crop a volume to the part ``source`` allows (world z range and/or voxel range)."""
    if source.world_z_max_mm is not None or source.world_z_min_mm is not None:
        if affine is None:
            raise ValueError(f"{source.path}: a world-z split needs an affine (NIfTI); use voxel_axis")
        row = affine[2, :3]
        axis = int(np.argmax(np.abs(row)))
        if np.abs(np.delete(row, axis)).max() > 1e-6 * abs(row[axis]):
            raise ValueError(f"{source.path}: affine is oblique ({row}); world-z split needs axis alignment")
        world_z = affine[2, 3] + row[axis] * np.arange(data.shape[axis])
        keep = np.ones_like(world_z, dtype=bool)
        if source.world_z_max_mm is not None:
            keep &= world_z < source.world_z_max_mm
        if source.world_z_min_mm is not None:
            keep &= world_z >= source.world_z_min_mm
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            raise ValueError(f"{source.path}: no voxels in the requested world-z range")
        data = np.take(data, idx, axis=axis)
    if source.voxel_axis is not None:
        sl = [slice(None)] * 3
        sl[source.voxel_axis] = slice(source.voxel_start, source.voxel_stop)
        data = data[tuple(sl)]
        if data.size == 0:
            raise ValueError(f"{source.path}: the voxel range is empty")
    return np.ascontiguousarray(data)


def trained_near(sources: list, filename: str, world_z_mm: float, gap_mm: float = 10.0) -> bool:
    """Whether an axial plane at world z ``world_z_mm`` of the file named ``filename`` lies in, or
    within ``gap_mm`` of, the training part of any of ``sources`` (VolumeSource objects or their
    dicts, e.g. arch.json's ``training.volumes``) that names the same file. A source of that file
    with no world-z limit (the whole volume, or a voxel range) counts as trained near every plane.
    Evaluation code calls this to refuse a slice a prior may have seen (engine/assets/prior/SPLIT.md)."""
    for source in sources:
        values = source if isinstance(source, dict) else source.__dict__
        if Path(values["path"]).name != filename:
            continue
        low, high = values.get("world_z_min_mm"), values.get("world_z_max_mm")
        if low is None and high is None:
            return True
        if (low is None or world_z_mm >= low - gap_mm) and (high is None or world_z_mm < high + gap_mm):
            return True
    return False


class _Pyramid:
    """A volume at full resolution and 2x box-filtered, with per-slice scales per orientation."""

    def __init__(self, data: np.ndarray, orientations: tuple[int, ...], min_fraction: float):
        vol = torch.from_numpy(data)
        self.is_complex = vol.is_complex()
        chans = torch.stack([vol.real, vol.imag]) if self.is_complex else vol[None]
        half = F.avg_pool3d(chans[None], 2, ceil_mode=True)[0]
        self.levels = [chans.contiguous(), half.contiguous()]
        mag = np.abs(data)
        vol_p99 = float(np.percentile(mag, 99))
        self.slices: list[tuple[int, int]] = []  # (axis, index) of usable full-resolution slices
        self.scales: dict[tuple[int, int, int], float] = {}  # (level, axis, index) -> p99
        for level, arr in enumerate(self.levels):
            m = arr.square().sum(0).sqrt().numpy()
            for axis in orientations:
                moved = np.moveaxis(m, axis, 0).reshape(m.shape[axis], -1)
                p99 = np.percentile(moved, 99, axis=1)
                for i, v in enumerate(p99):
                    self.scales[(level, axis, i)] = float(v)
                    if level == 0 and v >= min_fraction * vol_p99 and v > 0:
                        self.slices.append((axis, i))

    def slice(self, level: int, axis: int, index: int) -> tuple[torch.Tensor, float]:
        """(C, H, W) slice (C = 1 magnitude or 2 real/imag) and its p99 scale."""
        arr = self.levels[level]
        index = min(index, arr.shape[axis + 1] - 1)
        s = arr.select(axis + 1, index)
        return s, max(self.scales[(level, axis, index)], 1e-8)


class PatchSampler:
    """Draws augmented (B, 2, P, P) float32 patches; all randomness from one torch.Generator."""

    def __init__(self, config: DataConfig):
        if not config.volumes:
            raise ValueError("PatchSampler: the data config lists no volumes")
        self.config = config
        self.volumes = []
        for source in config.volumes:
            data, affine = read_volume(source)
            part = training_part(data, affine, source)
            pyr = _Pyramid(part, tuple(config.orientations), config.min_slice_fraction)
            if not pyr.slices:
                raise ValueError(f"PatchSampler: {source.path} has no usable slices in its training part")
            self.volumes.append(pyr)
        self.index = [(v, a, i) for v, pyr in enumerate(self.volumes) for a, i in pyr.slices]

    def __len__(self) -> int:
        """Number of usable full-resolution slices."""
        return len(self.index)

    def _uniform(self, g: torch.Generator, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    def _one(self, g: torch.Generator) -> torch.Tensor:
        cfg = self.config
        p = cfg.patch_size
        v, axis, index = self.index[int(torch.randint(len(self.index), (), generator=g))]
        pyr = self.volumes[v]
        zoom = math.exp(self._uniform(g, math.log(cfg.zoom_range[0]), math.log(cfg.zoom_range[1])))
        level = 1 if zoom > 1.5 else 0
        if level:
            zoom, index = zoom / 2.0, index // 2
        image, scale = pyr.slice(level, axis, index)
        h, w = image.shape[-2:]
        theta = math.radians(self._uniform(g, -cfg.rotation_degrees, cfg.rotation_degrees))
        for _ in range(5):
            # Patch centre in pixel coordinates of the slice; grid in align_corners=False units.
            # Keep the rotated patch inside the slice where it fits: a cut edge of the training
            # part (e.g. z = 15 mm) must not appear as a straight edge in the patches.
            reach = 0.5 * p * zoom * (abs(math.cos(theta)) + abs(math.sin(theta)))
            cy = self._uniform(g, reach, h - reach) if h > 2 * reach else h / 2
            cx = self._uniform(g, reach, w - reach) if w > 2 * reach else w / 2
            offs = (torch.arange(p, dtype=torch.float32) - (p - 1) / 2) * zoom
            oy, ox = torch.meshgrid(offs, offs, indexing="ij")
            ry = math.cos(theta) * oy - math.sin(theta) * ox + cy
            rx = math.sin(theta) * oy + math.cos(theta) * ox + cx
            grid = torch.stack([(2 * rx + 1) / w - 1, (2 * ry + 1) / h - 1], dim=-1)
            patch = F.grid_sample(image[None], grid[None], mode="bilinear",
                                  padding_mode="zeros", align_corners=False)[0] / scale
            mag = patch.square().sum(0).sqrt()
            if float(torch.quantile(mag.flatten(), 0.99)) >= cfg.min_patch_p99:
                break
        gain = math.exp(self._uniform(g, -math.log(cfg.intensity_jitter), math.log(cfg.intensity_jitter)))
        gamma = math.exp(self._uniform(g, -math.log(cfg.gamma_jitter), math.log(cfg.gamma_jitter)))
        if pyr.is_complex:
            new_mag = gain * mag.clamp_min(0).pow(gamma)
            ratio = new_mag / mag.clamp_min(1e-12)
            real, imag = patch[0] * ratio, patch[1] * ratio
            phase0 = self._uniform(g, 0.0, 2 * math.pi)  # a global phase leaves the image's statistics
            real, imag = (math.cos(phase0) * real - math.sin(phase0) * imag,
                          math.sin(phase0) * real + math.cos(phase0) * imag)
        else:
            new_mag = gain * patch[0].clamp_min(0).pow(gamma)
            phase = self._smooth_phase(g, grid)
            real, imag = new_mag * torch.cos(phase), new_mag * torch.sin(phase)
        out = torch.stack([real, imag])
        if cfg.flips:
            if float(torch.rand((), generator=g)) < 0.5:
                out = out.flip(-1)
            if float(torch.rand((), generator=g)) < 0.5:
                out = out.flip(-2)
        return augment_scanner(out, cfg.scanner, g)

    def _smooth_phase(self, g: torch.Generator, grid: torch.Tensor) -> torch.Tensor:
        """Random polynomial phase of order <= phase_order in the slice's [-1, 1] coordinates."""
        cfg = self.config
        u, v = grid[..., 0], grid[..., 1]
        if cfg.phase_order < 0:
            return torch.zeros_like(u)
        phase = torch.full_like(u, self._uniform(g, 0.0, 2 * math.pi))
        for order in range(1, cfg.phase_order + 1):
            for i in range(order + 1):
                coef = self._uniform(g, -cfg.phase_amplitude, cfg.phase_amplitude)
                phase = phase + coef * u.pow(i) * v.pow(order - i)
        return phase

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, 2, P, P) float32 patches (channels real, imag), scaled by their slice's p99."""
        return torch.stack([self._one(generator) for _ in range(batch)])


__all__ = ["DataConfig", "PatchSampler", "VolumeSource", "read_volume", "trained_near", "training_part"]
