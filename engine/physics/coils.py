"""Coil sensitivity maps: ESPIRiT (sigpy), simulated birdcage maps, coil combination.

Layouts (docs/ARCHITECTURE.md): 2D maps `(coils, ny, nx)`, 3D maps `(coils, x, y, z)`, hybrid-space
maps `(x, coils, y, z)`; all complex64. `combine` and `rss` accept NumPy arrays or torch tensors
and take the coil axis as an argument (0 by default, 1 for hybrid space).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

Array = TypeVar("Array")  # np.ndarray or torch.Tensor: combine/rss use operations both share


def _as_numpy_complex64(array, name: str) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if not np.iscomplexobj(array):
        raise TypeError(f"{name} must be complex k-space, got dtype {array.dtype}")
    # C order: sigpy's numba kernels compile once per memory layout, so keep one layout.
    return np.ascontiguousarray(array, dtype=np.complex64)


def _check_calibration_region(kspace: np.ndarray, calib_width: int, name: str) -> None:
    """ESPIRiT needs a fully sampled centre; warn when the calibration block has holes."""
    spatial = kspace.shape[1:]
    if calib_width > min(spatial):
        raise ValueError(f"{name}: calib_width {calib_width} exceeds the k-space size {spatial}")
    box = tuple(
        slice(n // 2 - calib_width // 2, n // 2 - calib_width // 2 + calib_width) for n in spatial
    )
    sampled = np.any(kspace[(slice(None), *box)] != 0, axis=0).mean()
    if sampled < 1:
        warnings.warn(
            f"{name}: only {sampled:.0%} of the {calib_width}-wide ESPIRiT calibration region is "
            "sampled; maps from an undersampled centre are unreliable (use a mask with calib)",
            stacklevel=3,
        )


def espirit_maps(
    kspace,
    calib_width: int = 24,
    thresh: float = 0.02,
    kernel_width: int = 6,
    crop: float = 0.95,
    max_iter: int = 100,
) -> np.ndarray:
    """ESPIRiT coil maps (sigpy.mri.app.EspiritCalib, one set of maps) from centred k-space.

    Args:
        kspace: `(coils, ny, nx)` complex (NumPy or torch), centred; the central
            `calib_width`^2 block should be fully sampled.
        calib_width: side of the calibration block (k-space samples).
        thresh: singular values below thresh * the largest are dropped (null space).
        kernel_width: side of the GRAPPA-like kernel.
        crop: maps are zeroed where the top eigenvalue is below `crop` (outside the object).
        max_iter: power iterations per pixel.

    Returns:
        `(coils, ny, nx)` complex64; sum_c |S_c|^2 = 1 where not cropped, 0 elsewhere; phase
        relative to coil 0 (sigpy's convention), so a combined image carries coil 0's phase.
    """
    kspace = _as_numpy_complex64(kspace, "kspace")
    if kspace.ndim != 3:
        raise ValueError(f"kspace must be (coils, ny, nx), got shape {kspace.shape}")
    _check_calibration_region(kspace, calib_width, "kspace")
    from sigpy.mri.app import EspiritCalib  # lazy: sigpy pulls in numba

    maps = EspiritCalib(
        kspace,
        calib_width=calib_width,
        thresh=thresh,
        kernel_width=kernel_width,
        crop=crop,
        max_iter=max_iter,
        show_pbar=False,
    ).run()
    # sigpy divides by |S_0| to fix the phase; where S_0 == 0 that leaves NaN: no signal there.
    return np.nan_to_num(np.asarray(maps), nan=0.0, posinf=0.0, neginf=0.0).astype(np.complex64)


def espirit_maps_hybrid(
    hybrid,
    calib_width: int = 24,
    thresh: float = 0.02,
    kernel_width: int = 6,
    crop: float = 0.95,
    max_iter: int = 100,
    progress: bool = True,
) -> np.ndarray:
    """ESPIRiT for 3D in hybrid space, slab by slab: each readout position x is its own 2D
    (ky, kz) calibration.

    Args:
        hybrid: `(x, coils, ky, kz)` complex, 1D centred iFFT along kx already applied.
        progress: show a tqdm bar over readout positions.

    Returns:
        maps `(x, coils, y, z)` complex64 (the hybrid Zarr layout).
    """
    hybrid = _as_numpy_complex64(hybrid, "hybrid k-space")
    if hybrid.ndim != 4:
        raise ValueError(f"hybrid k-space must be (x, coils, ky, kz), got shape {hybrid.shape}")
    from tqdm.auto import tqdm

    maps = np.zeros_like(hybrid)
    with warnings.catch_warnings():
        warnings.simplefilter("once")  # one undersampled-centre warning, not one per position
        for x in tqdm(
            range(hybrid.shape[0]), desc="ESPIRiT per readout position",
            disable=None if progress else True,  # None: no bar when stderr is not a terminal
        ):
            maps[x] = espirit_maps(hybrid[x], calib_width, thresh, kernel_width, crop, max_iter)
    return maps


def support_mask(maps, coil_axis: int = 0, eps: float = 1e-6) -> np.ndarray:
    """float32 0/1 mask of the positions where the maps are non-zero (sum_c |S_c|^2 > eps)."""
    maps = _as_numpy_complex64(maps, "maps")
    return (np.sum(np.abs(maps) ** 2, axis=coil_axis) > eps).astype(np.float32)


def birdcage_maps(
    ncoils: int, shape: Sequence[int], relative_radius: float = 1.5, coils_per_ring: int = 8
) -> np.ndarray:
    """Simulated birdcage coil maps (sigpy.mri.birdcage_maps), normalised to sum_c |S_c|^2 = 1
    at every position (hence inside any object).

    Args:
        ncoils: number of coils.
        shape: `(ny, nx)` for 2D or `(x, y, z)` for a volume; in 3D the coil rings surround the
            z axis (superior-inferior for a head) and stack along it, `coils_per_ring` per ring.
        relative_radius: coil ring radius relative to half the field of view (> 1: outside it).

    Returns:
        `(ncoils, *shape)` complex64.
    """
    import sigpy.mri

    shape = tuple(int(n) for n in shape)
    if ncoils < 1 or any(n < 1 for n in shape):
        raise ValueError(f"need ncoils >= 1 and a positive shape, got {ncoils}, {shape}")
    if len(shape) == 2:
        maps = sigpy.mri.birdcage_maps((ncoils, *shape), r=relative_radius)
    elif len(shape) == 3:
        nx, ny, nz = shape
        # sigpy's 3D layout is (coils, z, y, x) with rings around its first spatial axis.
        maps = sigpy.mri.birdcage_maps((ncoils, nz, ny, nx), r=relative_radius, nzz=coils_per_ring)
        maps = maps.transpose(0, 3, 2, 1)
    else:
        raise ValueError(f"birdcage maps need a 2D (ny, nx) or 3D (x, y, z) shape, got {shape}")
    maps = maps / np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
    return np.ascontiguousarray(maps, dtype=np.complex64)


def combine(coil_images: Array, maps: Array, coil_axis: int = 0, eps: float = 1e-12) -> Array:
    """SENSE coil combination sum_c conj(S_c) y_c / sum_c |S_c|^2 (0 where the maps vanish).

    Fully sampled and noiseless, it inverts y_c = S_c x inside the support of the maps.
    `coil_images` and `maps` have the same shape, coils on `coil_axis`; NumPy or torch.
    """
    numerator = (maps.conj() * coil_images).sum(coil_axis)
    energy = (abs(maps) ** 2).sum(coil_axis)
    return numerator / energy.clip(min=eps) * (energy > eps)


def rss(coil_images: Array, coil_axis: int = 0) -> Array:
    """Root sum of squares over coils: sqrt(sum_c |y_c|^2); NumPy or torch, real output."""
    return ((abs(coil_images) ** 2).sum(coil_axis)) ** 0.5


def validate_maps(maps, expected_shape: Sequence[int], name: str = "maps") -> np.ndarray:
    """Check user-supplied coil maps: shape, complex or real numbers, finite, not all zero.

    Returns complex64 NumPy. Raises ValueError naming `name` (e.g. the file and dataset).
    """
    if hasattr(maps, "detach"):
        maps = maps.detach().cpu().numpy()
    maps = np.asarray(maps)
    if tuple(maps.shape) != tuple(expected_shape):
        raise ValueError(
            f"{name}: coil maps of shape {maps.shape} do not match the expected "
            f"{tuple(expected_shape)}"
        )
    if not (np.iscomplexobj(maps) or np.issubdtype(maps.dtype, np.floating)):
        raise ValueError(
            f"{name}: coil maps must be complex (or real floats), got dtype {maps.dtype}"
        )
    if not np.all(np.isfinite(maps)):
        raise ValueError(
            f"{name}: coil maps contain {np.count_nonzero(~np.isfinite(maps))} NaN/inf values"
        )
    if not np.any(maps):
        raise ValueError(f"{name}: coil maps are all zero")
    return maps.astype(np.complex64)
