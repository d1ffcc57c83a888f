"""Classical baselines: zero-filled, CG-SENSE and L1-wavelet (compressed sensing) in 2D, and a 3D
L1-wavelet over hybrid-space volumes (the section "3D (hybrid space)" below).

Layouts (docs/ARCHITECTURE.md): k-space `(coils, ny, nx)` complex64, centred and orthonormal;
coil maps `(coils, ny, nx)` complex64; mask `(ny, nx)` 0/1. Every reconstruction returns a
complex64 image `(ny, nx)`. Inputs are NumPy arrays (torch tensors are accepted and converted).

Lambda of L1-wavelet. The data's intensity scale is arbitrary (the real 4-coil slices span 7
orders of magnitude), so an absolute lambda means nothing across inputs. The rule used here is
scale-invariant: lambda = c * max |W A^H y|, W the db4 wavelet transform that sigpy's
L1WaveletRecon uses and A^H y the zero-filled SENSE image. The factor c (`L1_RELATIVE_FACTOR`)
was chosen once on a tuning slice that no benchmark uses: an axial slice of the TRAINING part of
Colin27 (voxel k = 70 < 86, docs/ARCHITECTURE.md) with simulated coils, phase and noise, at
Poisson-disc R = 4, 6, 8 without a calibration region (`benchmarks/baselines2d.py --tune-only`
prints the curves; benchmarks/results/baselines2d.md records them).
`best_lambda_l1_wavelet` is the oracle (best lambda of a grid, judged against the reference),
for benchmarks that say "even with its best lambda".
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.evaluation.metrics import nrmse_percent
from engine.physics import sense
from engine.physics.fft import ifftc
from engine.physics.sense import sense_operator

# Both tuned on the Colin27 training-part slice (module docstring): lowest mean NRMSE over
# R = 4, 6, 8 x seeds 0, 1 (c on a 0.25-decade grid: 3.5 % vs 3.6 % at 1.8e-4, 3.8 % at 5.6e-5).
L1_RELATIVE_FACTOR = 1e-4
L1_ITERATIONS = 100  # sigpy's default number of proximal-gradient (FISTA) steps
# Unregularised CG-SENSE is regularised by stopping early (semi-convergence): 8 iterations gave
# 4.1 % there, 5 gave 5.2 %, 15 gave 5.8 %.
CG_ITERATIONS = 8
ESPIRIT_CALIB_WIDTH = 24  # calibration width for the maps of the reference (sigpy's default)
# Oracle grid of relative factors c (lambda = c * max|W A^H y|): half-decade steps over three
# decades around the rule's value, then refined to quarter decades around the best (9 solves).
BEST_LAMBDA_GRID = tuple(float(c) for c in np.logspace(-5.5, -2.5, 7))


def _check_case(kspace: np.ndarray, maps: np.ndarray | None = None, mask: np.ndarray | None = None) -> None:
    if kspace.ndim != 3 or not np.iscomplexobj(kspace):
        raise ValueError(f"kspace must be complex (coils, ny, nx), got {kspace.dtype} {kspace.shape}")
    if maps is not None and maps.shape != kspace.shape:
        raise ValueError(f"coil maps shape {maps.shape} differs from kspace shape {kspace.shape}")
    if mask is not None and mask.shape != kspace.shape[1:]:
        raise ValueError(f"mask shape {mask.shape} differs from the kspace plane {kspace.shape[1:]}")


def _numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def zero_filled(kspace: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """SENSE adjoint combination sum_c conj(S_c) iFFT(y_c) of (zero-filled) k-space -> complex64 (ny, nx).

    No density compensation: unsampled k-space counts as zero, so the image is darker and blurred.
    """
    kspace, maps = _numpy(kspace), _numpy(maps)
    _check_case(kspace, maps)
    operator = sense_operator(torch.from_numpy(maps.astype(np.complex64)))
    return operator.adjoint(torch.from_numpy(kspace.astype(np.complex64))).numpy()


def zero_filled_rss(kspace: np.ndarray) -> np.ndarray:
    """Root sum of squares of the coil images, sqrt(sum_c |iFFT(y_c)|^2) -> complex64 (ny, nx), real valued."""
    kspace = _numpy(kspace)
    _check_case(kspace)
    coil_images = ifftc(torch.from_numpy(kspace.astype(np.complex64)))
    return coil_images.abs().square().sum(0).sqrt().to(torch.complex64).numpy()


def conjugate_gradient(
    normal: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    max_iter: int,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, list[float]]:
    """Solve normal(x) = rhs for a Hermitian positive (semi-)definite `normal`, starting at x = 0.

    Stops after `max_iter` steps or when ||r|| <= tol * ||rhs||. Returns x and the relative
    residual norms ||r_k|| / ||rhs|| for k = 0 .. iterations done (Hestenes-Stiefel CG).
    """
    x = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    rhs_norm = torch.linalg.vector_norm(rhs).item()
    if rhs_norm == 0:
        return x, [0.0]
    residual_sq = torch.vdot(residual.flatten(), residual.flatten()).real
    history = [1.0]
    for _ in range(max_iter):
        if history[-1] <= tol:
            break
        normal_direction = normal(direction)
        curvature = torch.vdot(direction.flatten(), normal_direction.flatten()).real
        if curvature <= 0:  # exact solution reached (or direction in the null space): nothing left
            break
        step = residual_sq / curvature
        x = x + step * direction
        residual = residual - step * normal_direction
        new_residual_sq = torch.vdot(residual.flatten(), residual.flatten()).real
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
        history.append(float(residual_sq.sqrt().item()) / rhs_norm)
    return x, history


def cg_sense(
    kspace: np.ndarray,
    maps: np.ndarray,
    mask: np.ndarray,
    lamda: float = 0.0,
    max_iter: int = CG_ITERATIONS,
    tol: float = 1e-6,
    device: str | torch.device = "cpu",
    return_residuals: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[float]]:
    """CG-SENSE: CG on (A^H A + lamda I) x = A^H y with A = M F S (Pruessmann et al. 2001).

    Args:
        kspace, maps, mask: the case in the module's layouts; unsampled k-space is masked out.
        lamda: Tikhonov weight; dimensionless, since A^H A has eigenvalues <= 1 for
            ESPIRiT-normalised maps (sum_c |S_c|^2 <= 1) and a 0/1 mask.
        max_iter: CG iterations; few on purpose (early stopping regularises).
        tol: relative residual at which CG stops before max_iter.
        device: torch device for the computation.
        return_residuals: also return the relative residual norms per iteration.

    Returns:
        complex64 image (ny, nx) [, residual history].
    """
    kspace, maps, mask = _numpy(kspace), _numpy(maps), _numpy(mask)
    _check_case(kspace, maps, mask)
    as_tensor = lambda array, dtype: torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).to(device)
    operator = sense_operator(as_tensor(maps, np.complex64), as_tensor(mask, np.float32))
    rhs = operator.adjoint(as_tensor(kspace, np.complex64))
    normal = (lambda x: operator.normal(x) + lamda * x) if lamda else operator.normal
    image, history = conjugate_gradient(normal, rhs, max_iter, tol)
    image = image.cpu().numpy().astype(np.complex64)
    return (image, history) if return_residuals else image


def max_eigenvalue(
    normal: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, iterations: int = 30, seed: int = 0
) -> float:
    """Largest eigenvalue of a Hermitian positive semi-definite `normal` by power iteration.

    The start vector comes from a seeded generator, so the result (and every step size derived
    from it) is the same on every run; sigpy's own estimate draws from NumPy's global state.
    """
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(like.shape, dtype=like.dtype, generator=generator).to(like.device)
    eigenvalue = 0.0
    for _ in range(iterations):
        vector = vector / torch.linalg.vector_norm(vector)
        image = normal(vector)
        eigenvalue = float(torch.vdot(vector.flatten(), image.flatten()).real)
        vector = image
    return eigenvalue


def _wavelet(shape: tuple[int, int], wave_name: str):
    import sigpy as sp

    return sp.linop.Wavelet(shape, wave_name=wave_name)


def l1_wavelet_lamda(
    kspace: np.ndarray,
    maps: np.ndarray,
    mask: np.ndarray,
    factor: float = L1_RELATIVE_FACTOR,
    wave_name: str = "db4",
) -> float:
    """The relative rule: lamda = factor * max |W A^H y| (scale-invariant, deterministic)."""
    zero_filled_image = zero_filled(_numpy(kspace) * _numpy(mask), maps)
    coefficients = _wavelet(zero_filled_image.shape, wave_name)(zero_filled_image)
    return float(factor * np.abs(coefficients).max())


def l1_wavelet(
    kspace: np.ndarray,
    maps: np.ndarray,
    mask: np.ndarray,
    lamda: float | None = None,
    lamda_rule: str = "relative",
    factor: float = L1_RELATIVE_FACTOR,
    max_iter: int = L1_ITERATIONS,
    wave_name: str = "db4",
) -> np.ndarray:
    """L1-wavelet reconstruction, min_x 1/2 ||M F S x - y||^2 + lamda ||W x||_1 (sigpy L1WaveletRecon).

    Args:
        kspace, maps, mask: the case in the module's layouts.
        lamda: absolute regularisation weight; None -> chosen by `lamda_rule`.
        lamda_rule: "relative": lamda = factor * max |W A^H y| (see module docstring).
        factor: the relative rule's constant c.
        max_iter: proximal-gradient iterations.
        wave_name: wavelet (pywt name).

    Returns:
        complex64 image (ny, nx).
    """
    from sigpy.mri.app import L1WaveletRecon

    kspace, maps, mask = _numpy(kspace), _numpy(maps), _numpy(mask)
    _check_case(kspace, maps, mask)
    if lamda is None:
        if lamda_rule != "relative":
            raise ValueError(f"unknown lamda_rule {lamda_rule!r}; the rule implemented is 'relative'")
        lamda = l1_wavelet_lamda(kspace, maps, mask, factor, wave_name)
    weights = mask.astype(np.float32)
    # FISTA step 1 / L, L = max eig of A^H A, estimated deterministically (sigpy's is random)
    operator = sense_operator(torch.from_numpy(maps.astype(np.complex64)), torch.from_numpy(weights))
    lipschitz = max_eigenvalue(operator.normal, torch.zeros(mask.shape, dtype=torch.complex64))
    app = L1WaveletRecon(
        (kspace * weights).astype(np.complex64),
        maps.astype(np.complex64),
        lamda,
        weights=weights,
        wave_name=wave_name,
        max_iter=max_iter,
        alpha=1.0 / lipschitz,
        show_pbar=False,
    )
    return np.asarray(app.run()).astype(np.complex64)


@dataclass
class LamdaSearch:
    """Result of the oracle search: the best image, its lamda and relative factor, the whole curve."""

    image: np.ndarray
    lamda: float
    factor: float
    nrmse_by_factor: dict[float, float]


def best_lambda_l1_wavelet(
    kspace: np.ndarray,
    maps: np.ndarray,
    mask: np.ndarray,
    reference: np.ndarray,
    support: np.ndarray | None = None,
    grid: tuple[float, ...] = BEST_LAMBDA_GRID,
    refine: bool = True,
    max_extensions: int = 4,
    max_iter: int = L1_ITERATIONS,
    wave_name: str = "db4",
) -> LamdaSearch:
    """Oracle L1-wavelet: the lamda with the lowest magnitude NRMSE against `reference`.

    `grid` holds relative factors c (lamda = c * max |W A^H y|), so one grid serves any scale.
    While the best value sits at an end of the grid, the grid is extended past that end by its
    own step, up to `max_extensions` times (so the optimum is not cut off by the grid's range).
    With `refine`, the geometric midpoints between the best grid value and its neighbours are
    then tried as well (a log-spaced grid's resolution doubles for two more solves).
    Needs the ground truth: for benchmarks only, never for a real reconstruction.
    """
    grid = tuple(sorted(grid))
    if not grid:
        raise ValueError("best_lambda_l1_wavelet needs a non-empty grid")
    scale = l1_wavelet_lamda(kspace, maps, mask, 1.0, wave_name)
    curve: dict[float, float] = {}
    best: dict = {"factor": None, "image": None}  # only the best image is kept in memory

    def evaluate(factor: float) -> None:
        image = l1_wavelet(kspace, maps, mask, lamda=factor * scale, max_iter=max_iter, wave_name=wave_name)
        curve[factor] = nrmse_percent(image, reference, support)
        if best["factor"] is None or curve[factor] < curve[best["factor"]]:
            best.update(factor=factor, image=image)

    for factor in grid:
        evaluate(factor)
    for _ in range(max_extensions if len(grid) > 1 else 0):
        best_index = grid.index(min(grid, key=curve.get))
        if best_index == 0:
            grid = (grid[0] ** 2 / grid[1],) + grid
            evaluate(grid[0])
        elif best_index == len(grid) - 1:
            grid = grid + (grid[-1] ** 2 / grid[-2],)
            evaluate(grid[-1])
        else:
            break
    if refine and len(grid) > 1:
        best_index = grid.index(min(grid, key=curve.get))
        for neighbour in (best_index - 1, best_index + 1):
            if 0 <= neighbour < len(grid):
                evaluate(float(np.sqrt(grid[best_index] * grid[neighbour])))
    return LamdaSearch(image=best["image"], lamda=best["factor"] * scale, factor=best["factor"],
                       nrmse_by_factor=dict(sorted(curve.items())))


def timed(function: Callable[..., np.ndarray], *args, **kwargs) -> tuple[np.ndarray, float]:
    """Run `function(*args, **kwargs)` and return (result, wall seconds)."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def espirit_reference(
    kspace_full: np.ndarray, calib_width: int = ESPIRIT_CALIB_WIDTH
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground truth of a fully sampled case: ESPIRiT maps from its centre, the combined image, the support.

    Returns:
        maps (coils, ny, nx) complex64 (zero outside the support, ESPIRiT crop 0.95),
        reference = sum_c conj(S_c) x_c (ny, nx) complex64, support (ny, nx) bool.
    """
    from engine.physics.coils import espirit_maps, support_mask

    kspace_full = _numpy(kspace_full)
    _check_case(kspace_full)
    maps = espirit_maps(kspace_full, calib_width=calib_width)
    return maps, zero_filled(kspace_full, maps), support_mask(maps).astype(bool)


METHODS = ("zero_filled", "zero_filled_rss", "cg_sense", "l1_wavelet")


def run_baselines(
    kspace: np.ndarray,
    maps: np.ndarray,
    mask: np.ndarray,
    methods: tuple[str, ...] = METHODS,
    reference: np.ndarray | None = None,
    support: np.ndarray | None = None,
) -> dict[str, dict]:
    """Run the named baselines on one case; each entry is `{"image": (ny, nx) complex64, "seconds": float}`.

    Methods: "zero_filled", "zero_filled_rss", "cg_sense", "l1_wavelet" (relative lamda rule) and
    "l1_wavelet_best" (oracle grid; needs `reference`; also reports "lamda" and "factor"; its
    seconds cover the whole grid). `kspace` may be fully sampled: it is masked here.
    """
    kspace, maps, mask = _numpy(kspace), _numpy(maps), _numpy(mask)
    _check_case(kspace, maps, mask)
    measured = (kspace * mask).astype(np.complex64)
    runners: dict[str, Callable[[], np.ndarray]] = {
        "zero_filled": lambda: zero_filled(measured, maps),
        "zero_filled_rss": lambda: zero_filled_rss(measured),
        "cg_sense": lambda: cg_sense(measured, maps, mask),
    }
    results: dict[str, dict] = {}
    for method in methods:
        if method == "l1_wavelet":
            start = time.perf_counter()
            lamda = l1_wavelet_lamda(measured, maps, mask)
            image = l1_wavelet(measured, maps, mask, lamda=lamda)
            results[method] = {"image": image, "seconds": time.perf_counter() - start, "lamda": lamda,
                               "factor": L1_RELATIVE_FACTOR}
        elif method == "l1_wavelet_best":
            if reference is None:
                raise ValueError("l1_wavelet_best needs a reference image (a fully sampled input)")
            search, seconds = timed(best_lambda_l1_wavelet, measured, maps, mask, reference, support)
            results[method] = {"image": search.image, "seconds": seconds, "lamda": search.lamda,
                               "factor": search.factor}
        elif method in runners:
            image, seconds = timed(runners[method])
            results[method] = {"image": image, "seconds": seconds}
        else:
            known = sorted(runners) + ["l1_wavelet", "l1_wavelet_best"]
            raise ValueError(f"unknown baseline {method!r}; known: {known}")
    return results


def fully_sampled_centre(mask: np.ndarray, smallest: int = 8) -> int:
    """Side of the largest centred square (DC at n // 2) that `mask` (ny, nx) samples fully; 0 if < smallest."""
    ny, nx = mask.shape
    for width in range(min(ny, nx), smallest - 1, -1):
        top, left = ny // 2 - width // 2, nx // 2 - width // 2
        if np.all(mask[top : top + width, left : left + width]):
            return width
    return 0


# An input whose k-space is non-zero on at least this fraction of the grid counts as fully sampled.
FULLY_SAMPLED_FRACTION = 0.95


def baseline_job(
    input_path: str | Path,
    out_dir: str | Path,
    mask_kind: str = "poisson",
    acceleration: float = 6.0,
    calib: int | None = None,
    seed: int = 0,
    mask_file: str | Path | None = None,
    slice_index: int | None = None,
    methods: tuple[str, ...] = ("zero_filled", "cg_sense", "l1_wavelet"),
    best_lambda: bool = False,
    sampling: str = "auto",
    calib_width: int = ESPIRIT_CALIB_WIDTH,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Read one 2D case, run the baselines, write recon_*.npy, metrics.json, comparison.png to `out_dir`.

    A fully sampled input is undersampled here with `make_mask(mask_kind, ...)` and scored against
    its coil-combined image (ESPIRiT maps from the centre, `calib_width`, unless the file carries
    maps) inside the maps' support. An undersampled input keeps its own sampling pattern (the
    mask options are ignored), gets ESPIRiT maps from its fully sampled centre (`calib_width`
    shrunk to the largest fully sampled centred square) and images but no scores.

    Args:
        input_path: anything engine.io.readers.read_input reads, holding one 2D slice
            (a fastMRI volume needs `slice_index`).
        out_dir: output folder; refused when not empty unless `overwrite`.
        mask_kind, acceleration, calib, seed, mask_file: see engine.physics.masks.make_mask.
        methods: baselines to run (engine.evaluation.baselines.run_baselines names).
        best_lambda: also run the oracle L1-wavelet (fully sampled input only).
        sampling: "auto" (fully sampled if >= FULLY_SAMPLED_FRACTION of k-space is non-zero and the
            file has no mask), "full" or "undersampled".
    Returns:
        the per-method entries written to metrics.json.
    """
    from engine.evaluation.report import prepare_output_dir, write_run
    from engine.io.data import derive_mask
    from engine.io.readers import read_input
    from engine.physics.coils import espirit_maps, support_mask
    from engine.physics.masks import achieved_acceleration, make_mask

    if sampling not in ("auto", "full", "undersampled"):
        raise ValueError(f"sampling must be 'auto', 'full' or 'undersampled', got {sampling!r}")
    prepare_output_dir(out_dir, overwrite)  # fail before any computation
    data = read_input(input_path, slice_index=slice_index)
    if data.layout != "2d":
        hint = " (pass a slice index)" if data.layout == "2d-stack" else ""
        raise ValueError(f"{input_path}: the baselines reconstruct one 2D slice (coils, ny, nx); "
                         f"got layout {data.layout!r} with k-space {data.kspace.shape}{hint}")
    kspace = data.kspace.astype(np.complex64)
    observed = data.mask if data.mask is not None else derive_mask(kspace, "2d", str(input_path))
    fully_sampled = sampling == "full" or (
        sampling == "auto" and observed.mean() >= FULLY_SAMPLED_FRACTION and
        (data.mask is None or bool(np.all(data.mask)))
    )
    reference = None
    if fully_sampled:
        # the mask (a user's file may be refused) before the ESPIRiT maps, the slow part
        mask = make_mask(mask_kind, kspace.shape[1:], acceleration, calib, seed, path=mask_file)
        if data.maps is not None:
            maps = data.maps.astype(np.complex64)
            reference, support = zero_filled(kspace, maps), support_mask(maps).astype(bool)
        else:
            maps, reference, support = espirit_reference(kspace, calib_width)
        methods = tuple(methods) + (("l1_wavelet_best",) if best_lambda else ())
    else:
        mask = observed
        if data.maps is not None:
            maps = data.maps.astype(np.complex64)
        else:
            # ESPIRiT needs a fully sampled centre: shrink the calibration to what the mask has
            calib_width = min(calib_width, fully_sampled_centre(mask)) or calib_width
            maps = espirit_maps(kspace * mask, calib_width)
        support = support_mask(maps).astype(bool)
    results = run_baselines(kspace, maps, mask, methods, reference, support)
    metadata = {
        "input": str(input_path),
        "slice_index": slice_index,
        "kspace_shape": list(kspace.shape),
        "fully_sampled_input": bool(fully_sampled),
        "mask": {"kind": mask_kind if fully_sampled else "from input", "requested_acceleration":
                 acceleration if fully_sampled else None, "calib": calib, "seed": seed,
                 "file": None if mask_file is None else str(mask_file),
                 "achieved_acceleration": achieved_acceleration(mask)},
        "maps": "from input" if data.maps is not None else f"ESPIRiT (sigpy), calib_width {calib_width}",
        "reference": "coil-combined fully sampled image" if fully_sampled else None,
        "metrics": "magnitude, fastMRI definitions, inside the maps' support, no rescaling",
        "cg_sense_iterations": CG_ITERATIONS,
        "l1_wavelet": {"wavelet": "db4", "iterations": L1_ITERATIONS,
                       "rule": f"lamda = {L1_RELATIVE_FACTOR:g} * max|W A^H y|"},
    }
    return write_run(out_dir, results, reference, support, metadata,
                     arrays={"mask": mask, "reference": reference, "support": support}, overwrite=overwrite)


# ================================================================================== 3D (hybrid space)
#
# A 3D volume in hybrid space (x, coils, ky, kz): the readout x is already in image space, each
# x plane is sampled on the same (ky, kz) mask. The forward operator is plane-wise,
# A v = M F_yz (S v); the regulariser couples the planes: an orthonormal db4 wavelet over (x, y, z).
#
# Lambda rule (3D). lamda = factor * s, s the 99th percentile of the zero-filled SENSE magnitude
# over the whole volume (the engine's intensity convention, engine.recon.fit3d.Recon3D.scale). With
# an orthonormal FFT and wavelet the optimal lamda scales with the image intensity and not with
# the volume's size, and s is the same for every slab of a volume (a 2D-style max|W A^H y| grows
# with the number of wavelet levels, i.e. with the slab's size). The factor was tuned once on the
# bundled 3D case at Poisson R = 4 (factors 0.0015 / 0.003 / 0.004 / 0.006 / 0.012: 6.91 / 6.21 /
# 6.17 / 6.37 / 7.37 %, benchmarks/results/quality3d.md, which has the sweep at R = 6 and 8 too).
L1_3D_RELATIVE_FACTOR = 0.004
L1_3D_ITERATIONS = 100
L1_3D_HALO = 8  # readout planes added on each side of a slab: the db4 support at the finest levels
L1_3D_CHUNK_BYTES = 48 * 2**20  # coil-expanded temporaries of the SENSE operators per chunk of planes (below)


def zero_filled_3d(kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """SENSE adjoint of hybrid k-space (n, C, ky, kz) with maps (n, C, ny, nz) -> (n, ny, nz) complex64."""
    k, m = torch.from_numpy(np.asarray(kspace, np.complex64)), torch.from_numpy(np.asarray(maps, np.complex64))
    return sense.adjoint(k, m, torch.from_numpy(np.asarray(mask, np.float32))).numpy()


def intensity_scale_3d(zero_filled_volume: np.ndarray) -> float:
    """The 3D rule's s: 99th percentile of the zero-filled magnitude (numpy; one process)."""
    return float(np.percentile(np.abs(zero_filled_volume), 99.0))


def l1_wavelet_3d(
    kspace: np.ndarray,
    maps: np.ndarray,
    mask: np.ndarray,
    lamda: float | None = None,
    factor: float = L1_3D_RELATIVE_FACTOR,
    scale: float | None = None,
    max_iter: int = L1_3D_ITERATIONS,
    wave_name: str = "db4",
    cycle_spin: bool = True,
    cycle_spin_seed: int = 0,
    anchor: np.ndarray | None = None,
    anchor_weight: float = 0.0,
    progress: str | None = None,
) -> np.ndarray:
    """3D L1-wavelet, min_v 1/2 ||M F_yz S v - y||^2 + lamda ||W_xyz v||_1, by FISTA.

    With `anchor` a (n, ny, nz) volume (another reconstruction, e.g. INFusion's) the objective gains
    anchor_weight / 2 ||v - anchor||^2 and FISTA starts from the anchor: the prior-image form of
    compressed sensing, which keeps what the anchor and the wavelet sparsity agree on.

    Args:
        kspace: hybrid k-space (n, C, ky, kz) (masked here); maps (n, C, ny, nz); mask (ky, kz).
        lamda: absolute weight; None -> factor * scale (module rule above).
        scale: the volume's intensity scale s; None -> `intensity_scale_3d` of this input (pass the
            whole volume's s when this is one slab of it).
        cycle_spin: random shifts (0..7 voxels per axis, seeded) before each shrinkage.
        progress: a tqdm bar over the iterations with this label (None: none).
    Returns:
        complex64 (n, ny, nz).
    """
    import sigpy as sp

    k = torch.from_numpy(np.asarray(kspace, np.complex64))
    m = torch.from_numpy(np.asarray(maps, np.complex64))
    w = torch.from_numpy(np.asarray(mask, np.float32))
    if k.ndim != 4 or m.shape != k.shape or w.shape != k.shape[2:]:
        raise ValueError(f"expected kspace and maps (n, C, ky, kz) and mask (ky, kz), got "
                         f"{tuple(k.shape)}, {tuple(m.shape)}, {tuple(w.shape)}")
    # The SENSE model acts on each readout plane alone: applied to a chunk of planes at a time, its
    # coil-expanded temporaries stay a chunk's size (over a whole 1 mm slab they were ~6x its k-space).
    # Chunks of ~48 MiB, above glibc's largest mmap threshold (32 MiB): each temporary is returned to the
    # system when freed (smaller ones were recycled through the heap, and the process kept growing).
    planes = max(1, L1_3D_CHUNK_BYTES // (k[0].numel() * k.element_size()))
    chunks = [slice(a, a + planes) for a in range(0, k.shape[0], planes)]
    adjoint_data = torch.cat([sense.adjoint(k[c], m[c], w) for c in chunks])  # the adjoint masks k
    if lamda is None:
        lamda = factor * (intensity_scale_3d(adjoint_data.numpy()) if scale is None else scale)

    def normal(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([sense.adjoint(sense.forward(v[c], m[c], w), m[c], w) for c in chunks])

    # the anchor's term adds anchor_weight (v - anchor) to the gradient and anchor_weight to its Lipschitz constant
    anchor_volume = torch.zeros_like(adjoint_data) if anchor is None else torch.from_numpy(np.asarray(anchor, np.complex64))
    if anchor_volume.shape != adjoint_data.shape:
        raise ValueError(f"anchor shape {tuple(anchor_volume.shape)} != volume {tuple(adjoint_data.shape)}")
    step = 1.0 / (max_eigenvalue(normal, torch.zeros(adjoint_data.shape, dtype=torch.complex64)) + anchor_weight)
    wavelet = sp.linop.Wavelet(tuple(adjoint_data.shape), wave_name=wave_name)

    # Cycle spinning (as BART's `pics -R W`): a random circular shift of the volume before each
    # shrinkage, so the wavelet's block grid does not leave blocky artefacts; seeded: deterministic.
    shifts = np.random.default_rng(cycle_spin_seed)

    def prox(v: torch.Tensor) -> torch.Tensor:  # W^H soft(W v, step lamda): W orthonormal
        shift = tuple(int(s) for s in shifts.integers(0, 8, size=3)) if cycle_spin else (0, 0, 0)
        coefficients = wavelet(np.roll(v.numpy(), shift, axis=(0, 1, 2)))
        magnitude = np.abs(coefficients)
        shrink = np.maximum(magnitude - step * lamda, 0) / np.maximum(magnitude, 1e-30)
        shrunk = np.roll(wavelet.H(coefficients * shrink), tuple(-s for s in shift), axis=(0, 1, 2))
        return torch.from_numpy(np.asarray(shrunk, np.complex64))

    x = anchor_volume.clone()
    z, t = x.clone(), 1.0
    iterations = range(max_iter)
    if progress is not None:
        from tqdm.auto import tqdm

        iterations = tqdm(iterations, desc=progress, dynamic_ncols=True)
    for _ in iterations:
        x_next = prox(z - step * (normal(z) - adjoint_data + anchor_weight * (z - anchor_volume)))
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = x_next + ((t - 1) / t_next) * (x_next - x)
        x, t = x_next, t_next
    return x.numpy().astype(np.complex64)


def l1_wavelet_3d_slabs(read_planes: Callable[[int, int], tuple[np.ndarray, np.ndarray]], mask: np.ndarray,
                        x_start: int, x_stop: int, nx: int, scale: float, halo: int = L1_3D_HALO,
                        **kwargs) -> np.ndarray:
    """`l1_wavelet_3d` of the readout positions [x_start, x_stop) of a larger volume, solved on
    that slab plus `halo` planes each side (cropped after), with the whole volume's `scale`.

    `read_planes(a, b)` returns (kspace, maps) of planes [a, b). Overlapping slabs make the result
    independent of the split up to the wavelet's reach beyond the halo.
    """
    a, b = max(0, x_start - halo), min(nx, x_stop + halo)
    kspace, maps = read_planes(a, b)
    out = l1_wavelet_3d(kspace, maps, mask, scale=scale, **kwargs)
    return out[x_start - a : x_stop - a]
