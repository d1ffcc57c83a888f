"""Label-free correction of the shrinkage of a 3D reconstruction at the (ky, kz) points it did not measure.

Why: every regulariser of the fit (TV, wavelets, the prior's denoiser) pulls the content it has to
invent, at the unmeasured (ky, kz) points, towards zero: on the bundled case at R = 4 the output holds
56 % of the reference's power beyond 0.75 of the Nyquist radius, and scaling that band by the best
factor (judged by the reference) lowers the error. The factor can be measured without a reference,
from measured samples the fit never saw, where the noise is independent of the fit's prediction:

    gain_b = Re sum conj(F S x) y / sum |F S x|^2   over the held-out samples of radial band b,

the least-squares factor that maps the predicted k-space onto the measured one there (noise adds no
bias to the numerator). Procedure (`estimate_band_gains`, collective):
1. split the (ky, kz) mask into fit and held-out samples (engine.recon.selection2d.split_holdout);
2. run the config in full on the fit samples (the holdout fit);
3. one gain per radial band (`band_edges`, |k| over the Nyquist radius, as in the benchmark's
   error spectrum) from its held-out samples, summed over every plane and coil of every rank;
4. run_recon3d then reconstructs from all measured samples and multiplies the output's centred
   (ky, kz) spectrum, plane by plane, by the gains at the unmeasured points (`apply_band_gains`;
   measured points keep what the data fixed).
The gains of a fit on fewer samples are a little larger than those of the final fit (it has less to
go on), so the correction errs on the strong side; measured in benchmarks/results/quality3d.md.
Cost: one more run of the config. In a job (engine.recon.job3d) the holdout fit has its own checkpoints
and stops on a preemption signal like the final run, and the record is saved (debias.json beside the
output) before the final run starts, so a resumed run continues the holdout fit or skips it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Debias3DConfig:
    """Held-out band gains on the output's unmeasured (ky, kz) points (module docstring)."""

    enabled: bool = False
    """estimate the gains with a holdout fit and apply them to the output (costs one more run)."""
    holdout_fraction: float = 0.08
    """fraction of the measured (ky, kz) samples withheld from the holdout fit (0 < f < 0.5)."""
    holdout_seed: int = 0
    """seed of the held-out draw (independent of the mask's and of selection.holdout_seed's use)."""
    band_edges: tuple[float, ...] = (0.25, 0.5, 0.75)
    """inner edges of the radial bands in |k| over the Nyquist radius (increasing, > 0); the last band
    runs to the corners."""

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 0.5:
            raise ValueError(f"debias.holdout_fraction must be in (0, 0.5), got {self.holdout_fraction}")
        check_band_edges(self.band_edges, "debias.band_edges")


def check_band_edges(edges, key: str) -> None:
    """Refuse radial band edges that are not increasing and > 0 (`key` names the config key)."""
    edges = list(edges)
    if any(e <= 0 for e in edges) or edges != sorted(set(edges)):
        raise ValueError(f"{key} must be increasing and > 0, got {edges}")


def radial_bands(shape: tuple[int, int], edges) -> np.ndarray:
    """(ny, nz) int: the band of each centred (ky, kz) point, 0 .. len(edges), by |k| over the
    Nyquist radius of each axis (the benchmark's error_spectrum convention)."""
    from engine.physics.fft import kspace_radius

    radius = kspace_radius(tuple(shape)).numpy()
    return np.searchsorted(np.asarray(edges, dtype=np.float64), radius, side="right")


def gain_map(gains, bands: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(ny, nz) float32: the band's gain at unmeasured points, 1 where `mask` measured."""
    per_point = np.asarray(gains, dtype=np.float64)[bands]
    return np.where(np.asarray(mask) > 0, 1.0, per_point).astype(np.float32)


def apply_band_gains(planes: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Planes (B, ny, nz) complex with their centred orthonormal (ky, kz) spectrum multiplied by
    `gains` (ny, nz) (gain_map)."""
    from engine.physics.fft import fftc, ifftc

    spectrum = fftc(torch.from_numpy(np.ascontiguousarray(planes)))
    return ifftc(spectrum * torch.from_numpy(gains)).numpy().astype(planes.dtype)


@torch.no_grad()
def band_sums(planes: torch.Tensor, kspace: torch.Tensor, maps: torch.Tensor, held: torch.Tensor,
              bands: torch.Tensor, count: int) -> torch.Tensor:
    """(2, count) float64: per band, sum Re conj(F S x) y and sum |F S x|^2 over the points `held`
    (ny, nz) bool of planes x (B, ny, nz), their k-space y and maps (B, coils, ny, nz); bands (ny, nz)."""
    from engine.physics import sense

    held = held.flatten()
    predicted = sense.forward(planes, maps).flatten(-2)[..., held]  # (B, coils, held points)
    measured = kspace.flatten(-2)[..., held]
    where = bands.flatten()[held].cpu()
    sums = torch.zeros(2, count, dtype=torch.float64)
    sums[0].index_add_(0, where, (predicted.conj() * measured).real.sum(dim=(0, 1)).double().cpu())
    sums[1].index_add_(0, where, predicted.abs().square().sum(dim=(0, 1)).double().cpu())
    return sums


def gains_from_sums(sums) -> list[float]:
    """The least-squares gain of each band (module docstring); 1 where a band has no held-out power."""
    return [float(c / p) if p > 0 and math.isfinite(c / p) else 1.0 for c, p in zip(*np.asarray(sums))]


def debiased(output, heldout_fit, kspace, maps, mask: np.ndarray, holdout: np.ndarray,
             band_edges) -> tuple[np.ndarray, list[float]]:
    """`output` planes (B, ny, nz) with the gains applied, and the gains: measured on `heldout_fit`
    (the same planes fit without the `holdout` samples) against their k-space (B, coils, ny, nz)
    and maps there, applied at the points `mask` did not measure. For solvers that hold the whole
    volume in one process (2D selection, the benchmark's L1-wavelet); Recon3D's sharded fit sums
    over ranks with heldout_band_sums."""
    planes = torch.as_tensor(heldout_fit)
    device = planes.device
    bands = radial_bands(np.asarray(mask).shape, band_edges)
    sums = band_sums(planes, torch.as_tensor(kspace).to(device), torch.as_tensor(maps).to(device),
                     torch.from_numpy(np.asarray(holdout) > 0).to(device), torch.from_numpy(bands).to(device),
                     len(band_edges) + 1)
    gains = gains_from_sums(sums)
    output = output.cpu().numpy() if isinstance(output, torch.Tensor) else np.asarray(output)
    return apply_band_gains(output, gain_map(gains, bands, mask)), gains


@torch.no_grad()
def heldout_band_sums(recon, bands: np.ndarray, count: int) -> np.ndarray:
    """`band_sums` of a Recon3D made with a holdout on its held-out samples, over every plane of every
    rank (collective)."""
    if recon.holdout is None:
        raise ValueError("heldout_band_sums needs a Recon3D made with a holdout mask")
    band_index = torch.as_tensor(bands, device=recon.device)
    sums = torch.zeros(2, count, dtype=torch.float64)
    for x0, x1 in recon.output_chunks():
        planes = torch.from_numpy(recon.evaluate_rows(x0, x1)).to(recon.device) / recon.scale
        local = torch.arange(x0, x1) - recon.x_start
        kspace, maps = recon.kspace[local].to(recon.device), recon.maps[local].to(recon.device)
        sums += band_sums(planes, kspace, maps, recon.holdout > 0, band_index, count)
    return recon.ctx.all_reduce_sum(sums.flatten()).view(2, count).numpy()


def estimate_band_gains(cfg, source, ctx, prior=None, progress: bool = False, checkpoints=None) -> dict[str, Any]:
    """The holdout fit and its gains (collective; module docstring).

    checkpoints: engine.recon.job3d.FitCheckpoints of the run (resumes the holdout fit, checkpoints it
    and stops it on a preemption signal), or None (a fit in one go).

    Returns the record saved as debias.json and in metrics.json: holdout_fraction, holdout_seed,
    fit_samples, holdout_samples (per plane), band_edges, gains (one per band; 1 for a band without
    held-out samples), heldout_samples_per_band, seconds[, holdout_fit_nrmse_percent when the store
    has a reference (reported, never used)].
    """
    from engine.recon.fit3d import Recon3D
    from engine.recon.selection2d import split_holdout
    from engine.recon.selection3d import reference_nrmse_percent

    settings = cfg.debias
    began = time.perf_counter()
    mask = np.asarray(source.mask, np.float32)
    fit_mask, holdout = split_holdout(mask, settings.holdout_fraction, settings.holdout_seed)
    recon = Recon3D(cfg, source, ctx, prior=prior, holdout=holdout)
    if checkpoints is not None:
        checkpoints.start(recon)
    recon.run_to_end("debias holdout fit" if progress else None,
                     after_step=None if checkpoints is None else checkpoints.after_step)
    bands = radial_bands(mask.shape, settings.band_edges)
    count = len(settings.band_edges) + 1
    gains = gains_from_sums(heldout_band_sums(recon, bands, count))
    record = {"holdout_fraction": settings.holdout_fraction, "holdout_seed": settings.holdout_seed,
              "fit_samples": int(fit_mask.sum()), "holdout_samples": int(holdout.sum()),
              "band_edges": list(settings.band_edges), "gains": gains,
              "heldout_samples_per_band": [int(((bands == b) & (holdout > 0)).sum()) for b in range(count)],
              "seconds": time.perf_counter() - began}
    nrmse = reference_nrmse_percent(recon)
    if nrmse is not None:
        record["holdout_fit_nrmse_percent"] = nrmse
    return record


__all__ = ["Debias3DConfig", "apply_band_gains", "band_sums", "check_band_edges", "debiased", "estimate_band_gains",
           "gain_map", "gains_from_sums", "heldout_band_sums", "radial_bands"]
