"""Denoising check of a prior on held-out slices (never in its training set).

    python -m engine.prior.evaluate --colin27 colin27_t1_1mm.nii.gz [--prior DIR] [--out evaluation.json]

Default slice: Colin27 1 mm, axial, world z = 40 mm (voxel k = 111; evaluation part z >= 25 mm),
zero-padded to 256 x 256, given a fixed smooth phase, scaled by :func:`normalise`. Noise is
N(0, sigma^2) per channel (real, imag), as in training, so the noisy RMSE is about sigma.
RMSE is over both channels and all pixels of the normalised image.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from engine.prior.checkpoint import default_prior_path, load_prior
from engine.prior.edm import EDMPrior
from engine.prior.intensity import complex_to_channels, normalise

EVAL_WORLD_Z_MM = 40.0
EVALUATION_PART_MIN_Z_MM = 25.0


def colin_eval_slice(path: str, world_z_mm: float = EVAL_WORLD_Z_MM, size: int = 256) -> np.ndarray:
    """An axial slice of Colin27 from the evaluation part, zero-padded to size x size, with a
    smooth phase: (size, size) complex64, not yet normalised."""
    import nibabel as nib

    if world_z_mm < EVALUATION_PART_MIN_Z_MM:
        raise ValueError(f"colin_eval_slice: z = {world_z_mm} mm is not in the evaluation part (>= 25 mm)")
    img = nib.load(path)
    k = round((world_z_mm - img.affine[2, 3]) / img.affine[2, 2])
    mag = np.asarray(img.dataobj[:, :, k], dtype=np.float32)
    out = np.zeros((size, size), np.float32)
    h, w = mag.shape
    if h > size or w > size:
        raise ValueError(f"colin_eval_slice: slice {mag.shape} larger than {size}")
    out[(size - h) // 2:(size - h) // 2 + h, (size - w) // 2:(size - w) // 2 + w] = mag
    y, x = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    phase = 0.7 + 1.2 * x - 0.8 * y + 0.6 * x * y  # fixed smooth phase, radians
    return (out * np.exp(1j * phase)).astype(np.complex64)


def real_slice_rss(path: str) -> np.ndarray:
    """Root-sum-of-squares magnitude of a (coils, ny, nx) centred k-space .npy: (ny, nx) complex64."""
    from engine.physics.fft import ifftc

    k = torch.from_numpy(np.load(path))
    coils = ifftc(k, dims=(-2, -1))
    return coils.abs().square().sum(0).sqrt().numpy().astype(np.complex64)


@torch.no_grad()
def denoising_rmse(prior: EDMPrior, image: np.ndarray, sigmas: tuple[float, ...] = (0.1, 0.2, 0.5),
                   seed: int = 0) -> list[dict]:
    """RMSE of noisy and one-step-denoised versions of ``image`` (normalised inside) per sigma."""
    scaled, _ = normalise(image)
    clean = complex_to_channels(torch.from_numpy(scaled))[None].float()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for sigma in sigmas:
        noisy = clean + sigma * torch.randn(clean.shape, generator=g)
        denoised = prior(noisy, sigma)
        rows.append({
            "sigma": sigma,
            "rmse_noisy": float((noisy - clean).square().mean().sqrt()),
            "rmse_denoised": float((denoised - clean).square().mean().sqrt()),
        })
    return rows


@torch.no_grad()
def seconds_per_call(prior: EDMPrior, size: int = 256, repeats: int = 5) -> float:
    """Median wall time of one denoiser call on a (1, 2, size, size) input."""
    x = torch.randn(1, 2, size, size)
    prior(x, 0.2)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        prior(x, 0.2)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", default=str(default_prior_path()))
    parser.add_argument("--colin27", required=True,
                        help="the Colin27 T1 volume at 1 mm (colin27_t1_1mm.nii.gz; not shipped: BSD-3, "
                        "e.g. from Debian's mricron-data package)")
    parser.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    parser.add_argument("--real", nargs="*", default=[], help="evaluation-only real k-space .npy files")
    args = parser.parse_args(argv)
    prior = load_prior(args.prior)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "prior": args.prior,
        "colin27_eval_slice": {"file": Path(args.colin27).name, "world_z_mm": EVAL_WORLD_Z_MM, "orientation": "axial",
                               "padded_to": 256, "phase": "fixed smooth (0.7 + 1.2x - 0.8y + 0.6xy rad)",
                               "rows": denoising_rmse(prior, colin_eval_slice(args.colin27))},
        "real_slices_rss": {Path(p).name: denoising_rmse(prior, real_slice_rss(p)) for p in args.real},
        "seconds_per_256x256_call": seconds_per_call(prior),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(math.isfinite(r["rmse_denoised"]) for r in result["colin27_eval_slice"]["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
