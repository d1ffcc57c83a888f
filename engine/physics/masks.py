"""Cartesian sampling masks, seeded and reproducible from a case id.

Every mask is a float32 NumPy array `(ny, nx)` of 0/1 on the centred k-space grid (DC at n // 2).
In 3D hybrid space the same function gives the `(ky, kz)` mask shared by all readout positions.

Kinds:
- "poisson": 2D variable-density Poisson-disc (sigpy.mri.poisson), optionally with a fully
  sampled calibration box. Both in-plane axes are phase encodes.
- "random1d", "equispaced1d": 1D line masks as fastMRI's RandomMaskFunc / EquispacedMaskFunc
  (fastMRI `fastmri/data/subsample.py`): the mask is a function of the last-axis index (the
  phase-encode axis), every selected column is fully sampled along ny, and a block of
  `round(nx * center_fraction)` central columns (ACS) is always sampled.
- "file": a mask supplied by the user (.npy, .npz or .h5), validated.

Seeds: `seed_from_case(case_id)` hashes the case id (as fastMRI seeds masks from the file name), so
every rank and every rerun draws the same mask for the same case.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MASK_KINDS = ("poisson", "random1d", "equispaced1d", "file")

# fastMRI's challenge pairs (R, centre fraction) = (4, 0.08) and (8, 0.04): fraction = 0.32 / R.
FASTMRI_CENTER_FRACTION_TIMES_R = 0.32


def seed_from_case(case_id: str) -> int:
    """A stable 32-bit seed from a case id: CRC-32 of its UTF-8 bytes, the same on every host."""
    if not isinstance(case_id, str) or not case_id:
        raise ValueError(f"case_id must be a non-empty string, got {case_id!r}")
    return zlib.crc32(case_id.encode("utf-8"))


def achieved_acceleration(mask: np.ndarray) -> float:
    """Number of grid points / number of sampled points of a 0/1 mask."""
    mask = np.asarray(mask)
    sampled = float(np.count_nonzero(mask))
    if sampled == 0:
        raise ValueError(f"mask of shape {mask.shape} samples no k-space point")
    return mask.size / sampled


def _check_shape_and_acceleration(shape: Sequence[int], acceleration: float) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"mask shape must be (ny, nx) with positive sizes, got {tuple(shape)}")
    if not acceleration > 1:
        raise ValueError(f"acceleration must be > 1, got {acceleration}")
    return int(shape[0]), int(shape[1])


def poisson_disc_mask(
    shape: Sequence[int],
    acceleration: float,
    calib: Sequence[int] = (0, 0),
    seed: int = 0,
    tol: float = 0.1,
    crop_corner: bool = True,
) -> np.ndarray:
    """2D variable-density Poisson-disc mask (sigpy.mri.poisson) `(ny, nx)` float32.

    sigpy bisects the density slope until the achieved acceleration is within `tol` of the
    requested one, so `achieved_acceleration(mask)` differs from `acceleration` by up to `tol`
    (e.g. 6.009 for R = 6 at 192 x 192, seed 123). The calibration box `calib = (cy, cx)` is fully
    sampled and counts toward the acceleration. sigpy restores NumPy's global random state.
    """
    ny, nx = _check_shape_and_acceleration(shape, acceleration)
    calib = tuple(int(c) for c in calib)
    if len(calib) != 2 or calib[0] < 0 or calib[1] < 0 or calib[0] > ny or calib[1] > nx:
        raise ValueError(f"calib must be (cy, cx) within the mask shape {(ny, nx)}, got {calib}")
    if calib[0] * calib[1] * acceleration > ny * nx:
        raise ValueError(
            f"a fully sampled calibration box {calib} alone exceeds 1/{acceleration} of {(ny, nx)}"
        )
    import sigpy.mri  # lazy: sigpy pulls in numba

    try:
        with np.errstate(divide="ignore"):  # sigpy's search divides by an empty trial mask's sum
            mask = sigpy.mri.poisson(
                (ny, nx),
                acceleration,
                calib=calib,
                dtype=np.float32,
                crop_corner=crop_corner,
                seed=int(seed) % 2**32,
                tol=tol,
            )
    except ValueError as err:
        raise ValueError(
            f"sigpy could not draw a Poisson-disc mask of shape {(ny, nx)} at R = {acceleration} "
            f"within tol {tol} (calib {calib}): {err}"
        ) from err
    return np.ascontiguousarray(mask, dtype=np.float32)


def _center_columns(nx: int, center_fraction: float, acceleration: float) -> slice:
    """The central block of ACS columns, placed as fastMRI does: it holds index nx // 2."""
    if not 0 <= center_fraction < 1:
        raise ValueError(f"center_fraction must be in [0, 1), got {center_fraction}")
    num_low = round(nx * center_fraction)
    if num_low * acceleration >= nx:
        raise ValueError(
            f"{num_low} ACS columns of {nx} already exceed 1/{acceleration} of the lines: "
            f"lower center_fraction ({center_fraction}) or the acceleration"
        )
    start = (nx - num_low + 1) // 2
    return slice(start, start + num_low)


def random_1d_mask(
    shape: Sequence[int], acceleration: float, center_fraction: float, seed: int = 0
) -> np.ndarray:
    """fastMRI RandomMaskFunc: each outer column kept with the probability that makes the expected
    number of columns nx / R; `(ny, nx)` float32, constant along ny."""
    ny, nx = _check_shape_and_acceleration(shape, acceleration)
    center = _center_columns(nx, center_fraction, acceleration)
    num_low = center.stop - center.start
    keep_probability = (nx / acceleration - num_low) / (nx - num_low)
    columns = np.random.default_rng(seed).uniform(size=nx) < keep_probability
    columns[center] = True
    return np.broadcast_to(columns.astype(np.float32), (ny, nx)).copy()


def equispaced_1d_mask(
    shape: Sequence[int], acceleration: float, center_fraction: float, seed: int = 0
) -> np.ndarray:
    """fastMRI EquispacedMaskFunc: outer columns every `a` lines from a random offset, with `a`
    adjusted so that ACS plus the equispaced lines total about nx / R; `(ny, nx)` float32."""
    ny, nx = _check_shape_and_acceleration(shape, acceleration)
    center = _center_columns(nx, center_fraction, acceleration)
    num_low = center.stop - center.start
    # Solve (nx - num_low) / a + num_low = nx / R for the spacing a of the outer lines.
    spacing = (nx - num_low) / (nx / acceleration - num_low)
    offset = int(np.random.default_rng(seed).integers(0, max(round(spacing), 1)))
    positions = np.around(np.arange(offset, nx - 1, spacing)).astype(int)
    columns = np.zeros(nx, dtype=bool)
    columns[positions[positions < nx]] = True
    columns[center] = True
    return np.broadcast_to(columns.astype(np.float32), (ny, nx)).copy()


def load_mask(
    path: str | Path, shape: Sequence[int] | None = None, key: str = "mask"
) -> np.ndarray:
    """A user-supplied 0/1 mask from .npy, .npz (array `key`) or .h5/.hdf5 (dataset `key`).

    A 1D mask of length nx (fastMRI stores its test masks so) is taken as a line mask along the
    last axis and broadcast to `shape`. Returns float32 `(ny, nx)`. Raises ValueError naming the
    file for a shape mismatch, a mask without samples, or values other than 0/1.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"mask file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".h5", ".hdf5"):
        raise ValueError(f"mask file {path}: unsupported format {suffix!r} (use .npy, .npz or .h5)")
    try:
        mask = _read_mask_file(path, suffix, key)
    except (OSError, EOFError, ValueError) as err:
        if str(path) in str(err):  # already names the file (e.g. a missing key)
            raise
        raise ValueError(f"mask file {path} cannot be read (truncated or not {suffix}): "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    return validate_mask(mask, shape, name=str(path))


def _read_mask_file(path: Path, suffix: str, key: str) -> np.ndarray:
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive:
                raise ValueError(f"mask file {path} has no array {key!r} (has {list(archive)})")
            return archive[key]
    import h5py

    with h5py.File(path, "r") as f:
        if key not in f:
            raise ValueError(f"mask file {path} has no dataset {key!r} (has {list(f)})")
        return f[key][()]


def validate_mask(
    mask: np.ndarray, shape: Sequence[int] | None = None, name: str = "mask"
) -> np.ndarray:
    """Check a 0/1 mask (2D, or 1D along the last axis) against `shape`; float32 `(ny, nx)`."""
    mask = np.asarray(mask)
    if np.iscomplexobj(mask):
        if np.any(mask.imag != 0):
            raise ValueError(f"{name}: mask has non-zero imaginary parts; a mask must be real 0/1")
        mask = mask.real
    if mask.ndim == 2 and mask.shape[0] == 1 and shape is not None and shape[0] != 1:
        mask = mask[0]  # (1, nx): a stored line mask
    if mask.ndim == 1:
        if shape is None:
            raise ValueError(f"{name}: a 1D mask needs the target shape (ny, nx) to broadcast to")
        if mask.shape[0] != shape[-1]:
            raise ValueError(
                f"{name}: 1D mask of length {mask.shape[0]} does not match nx = {shape[-1]}"
            )
        mask = np.broadcast_to(mask, tuple(shape))
    if mask.ndim != 2:
        raise ValueError(f"{name}: mask must be 2D (ny, nx) or 1D (nx,), got shape {mask.shape}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name}: mask shape {mask.shape} does not match k-space shape {tuple(shape)}"
        )
    if mask.dtype != bool and not np.all((mask == 0) | (mask == 1)):
        bad = np.unique(mask[(mask != 0) & (mask != 1)])[:5]
        raise ValueError(f"{name}: mask must hold only 0 and 1, found e.g. {bad.tolist()}")
    if not np.any(mask):
        raise ValueError(f"{name}: mask samples no k-space point")
    return np.ascontiguousarray(mask, dtype=np.float32)


def make_mask(
    kind: str,
    shape: Sequence[int],
    acceleration: float = 4.0,
    calib: int | Sequence[int] | None = None,
    seed: int = 0,
    path: str | Path | None = None,
) -> np.ndarray:
    """One entry point for every mask kind; float32 `(ny, nx)`.

    Args:
        kind: one of MASK_KINDS.
        shape: (ny, nx) of the phase-encode grid.
        acceleration: requested R (ignored for "file").
        calib: fully sampled centre. "poisson": None = no calibration region (as the INFusion
            paper), an int c = (c, c) box, or (cy, cx). 1D kinds: the number of ACS columns
            (an int, or the last entry of a pair); None = fastMRI's fraction 0.32 / R.
        seed: e.g. `seed_from_case(case_id)`.
        path: the mask file for kind "file".
    """
    if kind == "file":
        if path is None:
            raise ValueError("mask kind 'file' needs a path")
        return load_mask(path, shape)
    if path is not None:
        raise ValueError(f"a mask path was given but kind is {kind!r}; use kind 'file'")
    if kind == "poisson":
        box = (
            (0, 0)
            if calib is None
            else (int(calib), int(calib))
            if np.isscalar(calib)
            else tuple(calib)
        )
        return poisson_disc_mask(shape, acceleration, calib=box, seed=seed)
    if kind in ("random1d", "equispaced1d"):
        nx = int(shape[-1])
        if calib is None:
            center_fraction = FASTMRI_CENTER_FRACTION_TIMES_R / acceleration
        else:
            lines = int(calib) if np.isscalar(calib) else int(tuple(calib)[-1])
            center_fraction = lines / nx
        make = random_1d_mask if kind == "random1d" else equispaced_1d_mask
        return make(shape, acceleration, center_fraction, seed)
    raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
