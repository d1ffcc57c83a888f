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

import math
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
    if not (math.isfinite(acceleration) and acceleration > 1):
        raise ValueError(f"acceleration must be a finite number > 1, got {acceleration}")
    return int(shape[0]), int(shape[1])


# sigpy.mri.poisson bisects the density slope until the acceleration is within tol, and stops
# otherwise only when the interval collapses; when R is missed (out of reach, or jumped over: each
# trial is a new random draw, so at high R the achieved value jumps by more than 2 tol) the
# midpoint ends up rounding to slope_min and the loop never ends. The same search runs here over
# sigpy's own sampler, bounded, so the mask is identical to sigpy's wherever sigpy returns one.
_MIN_SLOPE_INTERVAL = 1e-6  # ~29 halvings of [0, 512]; successes come within ~15
# At large R an absolute tol is finer than the jumps between trials: the tolerance is also relative.
_ABSOLUTE_TOL = 0.1
_RELATIVE_TOL = 0.01
# The densest draw (slope 0) has R ~ 1.5-1.7; below this R it is checked first, in one draw.
_DENSE_CHECK_BELOW = 3.0


def _poisson_radius(shape: tuple[int, int], calib: tuple[int, int]) -> np.ndarray:
    """sigpy's normalised k-space radius `(ny, nx)` outside the calibration box (1 at the edges)."""
    ny, nx = shape
    y, x = np.mgrid[:ny, :nx]
    x = np.maximum(abs(x - nx / 2) - calib[-1] / 2, 0)
    x /= max(x.max(), 1e-12)  # sigpy divides by x.max(); a calib box over the whole axis makes it 0
    y = np.maximum(abs(y - ny / 2) - calib[-2] / 2, 0)
    y /= max(y.max(), 1e-12)
    return np.sqrt(x**2 + y**2)


def _calibration_box(shape: tuple[int, int], calib: tuple[int, int]) -> np.ndarray:
    """The fully sampled box `(ny, nx)` bool, placed as sigpy's sampler places it."""
    ny, nx = shape
    box = np.zeros(shape, dtype=bool)
    box[int(ny / 2 - calib[0] / 2):int(ny / 2 + calib[0] / 2), int(nx / 2 - calib[1] / 2):int(nx / 2 + calib[1] / 2)] = True
    return box


def _poisson_trial(shape: tuple[int, int], calib: tuple[int, int], radius: np.ndarray, slope: float,
                   seed: int, crop_corner: bool) -> np.ndarray:
    """One Poisson-disc draw with density 1 / (1 + slope |r|) (sigpy.mri.poisson's loop body)."""
    from sigpy.mri.samp import _poisson  # lazy: sigpy pulls in numba

    ny, nx = shape
    radius_x = np.clip((1 + radius * slope) * nx / max(nx, ny), 1, None)
    radius_y = np.clip((1 + radius * slope) * ny / max(nx, ny), 1, None)
    mask = _poisson(nx, ny, 30, radius_x, radius_y, calib, seed)
    if crop_corner:
        mask *= radius < 1
    return mask


def _acceleration_of(mask: np.ndarray) -> float:
    sampled = float(np.sum(mask))
    return mask.size / sampled if sampled > 0 else math.inf


def max_poisson_acceleration(shape: Sequence[int], calib: Sequence[int] = (0, 0)) -> float:
    """The largest acceleration `poisson_disc_mask` reaches for `shape` and `calib`.

    With k of N points sampled the achievable accelerations are N / k, spaced ~R^2 / N apart near
    R; they stay within the tolerance max(0.1, 1 % of R) of any R up to sqrt(0.2 N) (tolerance
    0.1) or, from N = 500 points on, N / 50 (1 %). A calibration box of A points caps R at N / A.
    """
    ny, nx = int(shape[0]), int(shape[1])
    points = ny * nx
    spacing_bound = max(math.sqrt(2 * _ABSOLUTE_TOL * points), 2 * _RELATIVE_TOL * points)
    box = int(_calibration_box((ny, nx), (int(calib[0]), int(calib[1]))).sum())
    return min(spacing_bound, points / box) if box else spacing_bound


def _thin_to(mask: np.ndarray, samples: int, radius: np.ndarray, box: np.ndarray, seed: int) -> np.ndarray:
    """`mask` without its outermost samples (largest radius first, ties in seeded random order;
    the calibration box kept) until `samples` remain."""
    candidates = np.flatnonzero((mask.ravel() > 0) & ~box.ravel())
    excess = int(mask.sum()) - samples
    ties = np.random.default_rng(seed).random(candidates.size)
    order = np.lexsort((ties, -radius.ravel()[candidates]))
    thinned = mask.copy().ravel()
    thinned[candidates[order[:excess]]] = 0
    return thinned.reshape(mask.shape)


def poisson_disc_mask(
    shape: Sequence[int],
    acceleration: float,
    calib: Sequence[int] = (0, 0),
    seed: int = 0,
    tol: float = _ABSOLUTE_TOL,
    crop_corner: bool = True,
) -> np.ndarray:
    """2D variable-density Poisson-disc mask (sigpy.mri.poisson's algorithm) `(ny, nx)` float32.

    The density slope is bisected until the achieved acceleration is within max(tol, 1 % of R)
    of the requested one (e.g. 6.009 for R = 6 at 192 x 192, seed 123). If the search misses (at
    high R each trial's random draw jumps by more than the tolerance), the nearest denser trial
    loses its outermost samples until N / R remain. The calibration box `calib = (cy, cx)` is
    fully sampled and counts toward the acceleration. NumPy's global random state is restored.
    Raises ValueError naming the reachable range when R is above `max_poisson_acceleration` or
    below the densest Poisson-disc mask (R ~ 1.5).
    """
    ny, nx = _check_shape_and_acceleration(shape, acceleration)
    calib = tuple(int(c) for c in calib)
    if len(calib) != 2 or calib[0] < 0 or calib[1] < 0 or calib[0] > ny or calib[1] > nx:
        raise ValueError(f"calib must be (cy, cx) within the mask shape {(ny, nx)}, got {calib}")
    where = f"a {ny} x {nx} Poisson-disc mask" + (f" with a {calib[0]} x {calib[1]} calibration box"
                                                  if any(calib) else " without calibration region")
    largest = max_poisson_acceleration((ny, nx), calib)
    if acceleration > largest:
        box = int(_calibration_box((ny, nx), calib).sum())
        why = (f"the calibration box alone samples {box} points" if box and largest == ny * nx / box else
               f"beyond it {ny * nx} / k for k sampled points is too coarse to meet R within tolerance")
        raise ValueError(f"acceleration {acceleration:g} is out of reach for {where}: the largest is "
                         f"{largest:.4g} ({why})")
    tol = max(tol, _RELATIVE_TOL * acceleration)
    seed = int(seed) % 2**32
    radius = _poisson_radius((ny, nx), calib)
    state = np.random.get_state()
    try:
        mask, denser, densest = _bisect_slope((ny, nx), calib, radius, acceleration, tol, seed, crop_corner)
    finally:
        np.random.set_state(state)
    if mask is None and denser is None:
        raise ValueError(f"acceleration {acceleration:g} is out of reach for {where}: the densest Poisson-disc "
                         f"mask has R = {densest:.3g} (sample every point instead, or ask for a larger R)")
    if mask is None:
        mask = _thin_to(denser, round(ny * nx / acceleration), radius, _calibration_box((ny, nx), calib), seed)
    return np.ascontiguousarray(mask, dtype=np.float32)


def _bisect_slope(shape: tuple[int, int], calib: tuple[int, int], radius: np.ndarray, acceleration: float,
                  tol: float, seed: int, crop_corner: bool) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    """sigpy's search, bounded: (the first trial within tol or None, the trial closest to R from
    below (more samples) or None, the lowest R drawn)."""
    denser, densest = None, math.inf
    if acceleration < _DENSE_CHECK_BELOW:  # else the search bisects down to slope 0 one dense draw at a time
        densest = _acceleration_of(_poisson_trial(shape, calib, radius, 0.0, seed, crop_corner))
        if acceleration < densest - tol:
            return None, None, densest
    slope_min, slope_max = 0.0, float(max(shape))
    while slope_max - slope_min > _MIN_SLOPE_INTERVAL:
        slope = (slope_max + slope_min) / 2
        mask = _poisson_trial(shape, calib, radius, slope, seed, crop_corner)
        achieved = _acceleration_of(mask)
        densest = min(densest, achieved)
        if abs(achieved - acceleration) < tol:
            return mask, denser, densest
        if achieved < acceleration:
            slope_min = slope
            if denser is None or achieved > _acceleration_of(denser):
                denser = mask
        else:
            slope_max = slope
    return None, denser, densest


def _center_columns(nx: int, center_fraction: float, acceleration: float) -> slice:
    """The central block of ACS columns, placed as fastMRI does: it holds index nx // 2."""
    if not 0 <= center_fraction < 1:
        raise ValueError(f"center_fraction must be in [0, 1), got {center_fraction}")
    num_low = round(nx * center_fraction)
    largest = nx / max(num_low, 1)  # the ACS block (or one line) alone
    if acceleration > largest or (num_low > 0 and num_low * acceleration >= nx):
        acs = f"{num_low} ACS columns, R must stay below {largest:g}" if num_low else f"one line, R = {nx} at most"
        raise ValueError(f"acceleration {acceleration:g} is out of reach for a line mask of {nx} columns: with "
                         f"{acs} (lower the acceleration or the calibration lines)")
    start = (nx - num_low + 1) // 2
    return slice(start, start + num_low)


def _check_lines(columns: np.ndarray, acceleration: float, kind: str, seed: int) -> None:
    """Refuse a line mask whose number of lines misses nx / R by more than one line (and 10 %)."""
    nx, lines, target = columns.size, int(np.count_nonzero(columns)), columns.size / acceleration
    if lines == 0 or abs(lines - target) > max(1.0, 0.1 * target):
        raise ValueError(f"{kind} mask of {nx} columns at R = {acceleration:g} drew {lines} lines where "
                         f"{target:.1f} were asked for (seed {seed}): try a smaller R or another seed")


def random_1d_mask(
    shape: Sequence[int], acceleration: float, center_fraction: float, seed: int = 0
) -> np.ndarray:
    """fastMRI RandomMaskFunc: each outer column kept with the probability that makes the expected
    number of columns nx / R; `(ny, nx)` float32, constant along ny. The realised number of
    lines varies with the seed (binomial), so only a mask without any line is refused."""
    ny, nx = _check_shape_and_acceleration(shape, acceleration)
    center = _center_columns(nx, center_fraction, acceleration)
    num_low = center.stop - center.start
    keep_probability = (nx / acceleration - num_low) / (nx - num_low)
    columns = np.random.default_rng(seed).uniform(size=nx) < keep_probability
    columns[center] = True
    if not columns.any():
        raise ValueError(f"random1d mask of {nx} columns at R = {acceleration:g} drew no line (seed {seed}): "
                         "try a smaller R or another seed")
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
    _check_lines(columns, acceleration, "equispaced1d", seed)
    return np.broadcast_to(columns.astype(np.float32), (ny, nx)).copy()


def max_acceleration(kind: str, shape: Sequence[int], calib: int | Sequence[int] | None = None) -> float:
    """The largest acceleration `make_mask(kind, shape, R, calib)` reaches (not for kind "file").

    poisson: `max_poisson_acceleration`; line masks: nx over the ACS lines (or over one line without ACS). With calib None the
    line masks use fastMRI's ACS fraction 0.32 / R, which shrinks as R grows: the bound is nx.
    """
    ny, nx = int(shape[0]), int(shape[1])
    if kind == "poisson":
        return max_poisson_acceleration((ny, nx), _poisson_box(calib))
    if kind in ("random1d", "equispaced1d"):
        lines = 0 if calib is None else int(calib) if np.isscalar(calib) else int(tuple(calib)[-1])
        return nx / max(lines, 1)
    raise ValueError(f"max_acceleration: mask kind {kind!r} has no bound; expected poisson, random1d or equispaced1d")


def _poisson_box(calib: int | Sequence[int] | None) -> tuple[int, int]:
    return (0, 0) if calib is None else (int(calib), int(calib)) if np.isscalar(calib) else tuple(calib)


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
        return poisson_disc_mask(shape, acceleration, calib=_poisson_box(calib), seed=seed)
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
