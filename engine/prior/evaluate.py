"""Denoising check of a prior on held-out slices (never in its training set).

    python -m engine.prior.evaluate --colin27 colin27_t1_1mm.nii.gz [--prior DIR] [--out evaluation.json]
    # old vs new, side by side on the real slices (markdown + JSON):
    python -m engine.prior.evaluate --colin27 colin27_t1_1mm.nii.gz --real REAL.npy ... \
        --compare old=DIR new=DIR --markdown benchmarks/results/prior_eval.md --out benchmarks/results/prior_eval.json

Default slice: Colin27 1 mm, axial, world z = 40 mm (voxel k = 111; evaluation part z >= 25 mm),
zero-padded to 256 x 256, given a fixed smooth phase, scaled by :func:`normalise`. Noise is
N(0, sigma^2) per channel (real, imag), as in training, so the noisy RMSE is about sigma.
RMSE is over both channels and all pixels of the normalised image; with several noise seeds the
rows give the mean over seeds. The sigmas include the small ones the 2D reconstruction uses
(0.01-0.05, where the prior term is evaluated near the end of a fit) and the large ones.

Real slices (k-space .npy, never trained on) are evaluated twice: as the root-sum-of-squares
magnitude (real, no phase) and as the ESPIRiT-combined complex image (engine.baselines; the image
the reconstruction regularises, with its own phase).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.prior.checkpoint import default_prior_path, load_prior
from engine.prior.edm import EDMPrior
from engine.prior.intensity import complex_to_channels, normalise

SIGMAS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
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


def real_slice_espirit(path: str) -> np.ndarray:
    """ESPIRiT-combined complex image of a (coils, ny, nx) centred k-space .npy: (ny, nx) complex64."""
    from engine.evaluation.baselines import espirit_reference

    return espirit_reference(np.load(path).astype(np.complex64))[1]


@torch.no_grad()
def denoising_rmse(prior: EDMPrior, image: np.ndarray, sigmas: tuple[float, ...] = SIGMAS,
                   seed: int = 0, seeds: int = 1) -> list[dict]:
    """RMSE of noisy and one-step-denoised versions of ``image`` (normalised inside) per sigma,
    averaged over ``seeds`` noise draws (generator seeds seed, seed + 1, ...; the same draws for
    every prior, so two priors are compared on identical noise)."""
    scaled, _ = normalise(image)
    clean = complex_to_channels(torch.from_numpy(scaled))[None].float()
    rows = []
    for sigma in sigmas:
        noisy_rmse, denoised_rmse = [], []
        for k in range(seeds):
            g = torch.Generator().manual_seed(seed + k + round(1e6 * sigma))
            noisy = clean + sigma * torch.randn(clean.shape, generator=g)
            denoised = prior(noisy, sigma)
            noisy_rmse.append(float((noisy - clean).square().mean().sqrt()))
            denoised_rmse.append(float((denoised - clean).square().mean().sqrt()))
        rows.append({"sigma": sigma, "rmse_noisy": float(np.mean(noisy_rmse)),
                     "rmse_denoised": float(np.mean(denoised_rmse))})
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


def evaluate_prior(prior: EDMPrior, colin27: str, real: list[str], sigmas: tuple[float, ...] = SIGMAS,
                   seeds: int = 1) -> dict:
    """The denoising rows of one prior: Colin27 evaluation slice, real slices (RSS and ESPIRiT)."""
    images = {name: image for name, image in real_images(real).items()}
    return {
        "colin27_eval_slice": {"file": Path(colin27).name, "world_z_mm": EVAL_WORLD_Z_MM, "orientation": "axial",
                               "padded_to": 256, "phase": "fixed smooth (0.7 + 1.2x - 0.8y + 0.6xy rad)",
                               "rows": denoising_rmse(prior, colin_eval_slice(colin27), sigmas, seeds=seeds)},
        "real_slices_rss": {name: denoising_rmse(prior, rss, sigmas, seeds=seeds) for name, (rss, _) in images.items()},
        "real_slices_espirit": {name: denoising_rmse(prior, combined, sigmas, seeds=seeds)
                                for name, (_, combined) in images.items()},
    }


_IMAGES: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def real_images(paths: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{file name: (RSS image, ESPIRiT image)} of real k-space files (computed once per process)."""
    for p in paths:
        if p not in _IMAGES:
            _IMAGES[p] = (real_slice_rss(p), real_slice_espirit(p))
    return {Path(p).name: _IMAGES[p] for p in paths}


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def comparison_markdown(result: dict) -> str:
    """Old vs new (or any priors) side by side: denoised RMSE per image and sigma, and the ratio."""
    labels = list(result["priors"])
    first = result["priors"][labels[0]]
    lines = ["# Denoising check: priors side by side (engine/prior/evaluate.py)", "",
             f"Machine: {result['machine']}; {result['date']}. Regenerate: `{result['command']}`", "",
             ("One denoiser call D(x + n, sigma) on each image scaled to p99 = 1 (the prior's intensity convention), "
              f"n ~ N(0, sigma^2) per channel, RMSE over both channels and all 256 x 256 pixels, mean over "
              f"{result['noise_seeds']} noise draws (the same draws for every prior). Lower is better; "
              "`noisy` is the RMSE of the input (about sigma). None of these images was in either prior's training set."),
             "", "| prior | folder | weights sha256 | trained |", "|---|---|---|---|"]
    for label in labels:
        p = result["priors"][label]
        lines.append(f"| {label} | {p['folder']} | {p['weights_sha256']} | {p['trained']} |")
    lines.append("")
    groups = [("Real slices, ESPIRiT-combined complex image (what the reconstruction regularises)",
               "real_slices_espirit"),
              ("Real slices, root-sum-of-squares magnitude", "real_slices_rss")]
    for title, key in groups:
        if not first[key]:
            continue
        lines += [f"## {title}", "",
                  "| image | sigma | noisy | " + " | ".join(labels) +
                  (f" | {labels[-1]} / {labels[0]} |" if len(labels) > 1 else " |"),
                  "|---|---|---|" + "---|" * (len(labels) + (len(labels) > 1))]
        for name in first[key]:
            for i, row in enumerate(first[key][name]):
                values = [result["priors"][lab][key][name][i]["rmse_denoised"] for lab in labels]
                ratio = f" | {values[-1] / values[0]:.3f}" if len(labels) > 1 else ""
                lines.append(f"| {name.split('_kspace')[0]} | {row['sigma']:g} | {row['rmse_noisy']:.4f} | "
                             + " | ".join(f"{v:.4f}" for v in values) + ratio + " |")
        lines.append("")
    lines += ["## Colin27 evaluation slice (axial, world z = 40 mm, fixed smooth phase)", "",
              "| sigma | noisy | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for i, row in enumerate(first["colin27_eval_slice"]["rows"]):
        values = [result["priors"][lab]["colin27_eval_slice"]["rows"][i]["rmse_denoised"] for lab in labels]
        lines.append(f"| {row['sigma']:g} | {row['rmse_noisy']:.4f} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    if len(labels) > 1 and first["real_slices_espirit"]:
        small = [s for s in result["sigmas"] if s <= 0.05]
        better = {key: [(name, s) for name in first[key] for i, s in enumerate(result["sigmas"]) if s in small
                        and result["priors"][labels[-1]][key][name][i]["rmse_denoised"]
                        < result["priors"][labels[0]][key][name][i]["rmse_denoised"]]
                  for key in ("real_slices_espirit", "real_slices_rss")}
        total = len(first["real_slices_espirit"]) * len(small)
        lines += ["", (f"{labels[-1]} below {labels[0]} at sigma <= 0.05 on the real slices: "
                  f"{len(better['real_slices_espirit'])} of {total} (ESPIRiT), "
                  f"{len(better['real_slices_rss'])} of {total} (RSS).")]
    return "\n".join(lines) + "\n"


def compare(priors: dict[str, str], colin27: str, real: list[str], sigmas: tuple[float, ...] = SIGMAS,
            seeds: int = 3, command: str = "") -> dict:
    """Evaluate several prior folders on the same images and noise: a JSON-able dict."""
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(),
              "command": command, "sigmas": list(sigmas), "noise_seeds": seeds, "priors": {}}
    for label, folder in priors.items():
        from engine.prior.checkpoint import read_arch

        training = read_arch(folder).get("training", {})
        trained = (f"{training.get('steps', '?')} steps, {training.get('date', '?')}"
                   + (f", from {training['initialised_from']}" if training.get("initialised_from") else ""))
        result["priors"][label] = {"folder": folder, "weights_sha256": _sha(Path(folder) / "weights.pt"),
                                   "trained": trained,
                                   **evaluate_prior(load_prior(folder), colin27, real, sigmas, seeds)}
    return result


def _machine() -> str:
    import os

    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", default=str(default_prior_path()))
    parser.add_argument("--colin27", required=True,
                        help="the Colin27 T1 volume at 1 mm (colin27_t1_1mm.nii.gz; not shipped: BSD-3, "
                        "e.g. from Debian's mricron-data package)")
    parser.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    parser.add_argument("--real", nargs="*", default=[], help="evaluation-only real k-space .npy files")
    parser.add_argument("--sigmas", nargs="+", type=float, default=list(SIGMAS))
    parser.add_argument("--seeds", type=int, default=None, help="noise draws per sigma (default 1; 3 with --compare)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="LABEL=DIR",
                        help="evaluate these prior folders side by side (instead of --prior)")
    parser.add_argument("--markdown", default=None, help="with --compare: write the side-by-side table here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sigmas = tuple(args.sigmas)
    if args.compare:
        priors = dict(item.split("=", 1) for item in args.compare)
        command = "python -m engine.prior.evaluate " + " ".join(
            a if not a.startswith("/") else Path(a).name for a in (argv if argv is not None else sys.argv[1:]))
        result = compare(priors, args.colin27, args.real, sigmas, args.seeds or 3, command)
        rows = [r for p in result["priors"].values() for r in p["colin27_eval_slice"]["rows"]]
    else:
        prior = load_prior(args.prior)
        result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(),
                  "prior": args.prior, **evaluate_prior(prior, args.colin27, args.real, sigmas, args.seeds or 1),
                  "seconds_per_256x256_call": seconds_per_call(prior)}
        rows = result["colin27_eval_slice"]["rows"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.markdown and args.compare:
        Path(args.markdown).write_text(comparison_markdown(result))
    return 0 if all(math.isfinite(r["rmse_denoised"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
