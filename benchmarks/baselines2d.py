"""Classical 2D baselines on real 4-coil slices: zero-filled, CG-SENSE, L1-wavelet (rule and oracle).

Protocol: each fully sampled slice gets ESPIRiT maps from its centre (calibration width 24), its
reference is the ESPIRiT-combined fully sampled image, and metrics (magnitude, fastMRI
definitions, no rescaling) are taken inside the ESPIRiT support. Masks: 2D Poisson-disc at
R = 4, 6, 8 WITHOUT a calibration region (the paper's setting), seeds 0 and 1.

The tuning section re-measures, on a slice no evaluation uses (Colin27 1 mm, axial voxel k = 70,
the training part of docs/ARCHITECTURE.md's split, with simulated coils, phase and noise), the
curves from which engine.evaluation.baselines' constants (L1_RELATIVE_FACTOR, CG_ITERATIONS) were chosen.

Commands (run from the repository root; the real slices live in ../shared/data and are never
committed):
    nice -n 5 python benchmarks/baselines2d.py                      # tuning + evaluation -> results/baselines2d.md
    nice -n 5 python benchmarks/baselines2d.py --skip-tuning
    python benchmarks/baselines2d.py --tune-only --out /tmp/tune.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.evaluation import baselines
from engine.evaluation.metrics import all_metrics, nrmse_percent

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("INFUSION_SHARED_DATA", REPO.parent / "shared" / "data"))
REAL_SLICES = {
    "GE axial T1w brain": "real2d/4h_GE_kspace_c4_256x256.npy",
    "MPRAGE axial brain": "real2d/4h_mpr_kspace_c4_256x256.npy",
    "Philips resolution phantom": "real2d/4h_Ph_kspace_c4_256x256.npy",
}
TUNING_SLICE_INDEX = 70  # Colin27 1 mm axial voxel k (world z = -1 mm < 15 mm: training part)
# Mean object signal / noise std (engine.physics.simulate's definition). The real slices' background
# (RSS of noise over 4 coils, ~0.4-0.9 % of the maximum) suggests about 60-80; 50 is a bit noisier.
TUNING_SNR = 50.0
CG_ITERATION_GRID = (3, 5, 8, 10, 15, 20, 30, 50)
TUNING_FACTOR_GRID = tuple(float(c) for c in np.logspace(-5.5, -2.5, 13))  # quarter decades
METHODS = ("zero_filled", "cg_sense", "l1_wavelet", "l1_wavelet_best")


def poisson_mask(shape: tuple[int, int], acceleration: float, seed: int) -> np.ndarray:
    """2D variable-density Poisson-disc mask without calibration region -> (ny, nx) float32."""
    from engine.physics.masks import poisson_disc_mask

    return poisson_disc_mask(shape, acceleration, calib=(0, 0), seed=seed)


def colin27_tuning_kspace(seed: int = 0, coils: int = 4, size: int = 256) -> np.ndarray:
    """Simulated 4-coil k-space (coils, size, size) of the tuning slice: real anatomy, simulated the rest.

    Magnitude: Colin27 axial slice k = 70 zero-padded to size x size; coils, smooth phase and
    noise by engine.physics.simulate at SNR TUNING_SNR.
    """
    import nibabel as nib

    from engine.physics.simulate import simulate_multicoil

    volume = nib.load(DATA / "volumes" / "colin27_t1_1mm.nii.gz")
    plane = np.asarray(volume.dataobj[:, :, TUNING_SLICE_INDEX], dtype=np.float64).T[::-1]
    magnitude = np.zeros((size, size))
    top, left = (size - plane.shape[0]) // 2, (size - plane.shape[1]) // 2
    magnitude[top : top + plane.shape[0], left : left + plane.shape[1]] = plane / plane.max()
    return simulate_multicoil(magnitude, ncoils=coils, snr=TUNING_SNR, seed=seed).kspace


def tuning_section(accelerations, seeds) -> list[str]:
    """NRMSE (%) of CG-SENSE per iteration count and of L1-wavelet per relative factor on the tuning slice."""
    kspace = colin27_tuning_kspace()
    maps, reference, support = baselines.espirit_reference(kspace)
    cg_curve = {n: [] for n in CG_ITERATION_GRID}
    l1_curve = {c: [] for c in TUNING_FACTOR_GRID}
    for acceleration in accelerations:
        for seed in seeds:
            mask = poisson_mask(kspace.shape[1:], acceleration, seed)
            measured = kspace * mask
            for n in CG_ITERATION_GRID:
                image = baselines.cg_sense(measured, maps, mask, max_iter=n, tol=0)
                cg_curve[n].append(nrmse_percent(image, reference, support))
            scale = baselines.l1_wavelet_lamda(measured, maps, mask, factor=1.0)
            for c in TUNING_FACTOR_GRID:
                image = baselines.l1_wavelet(measured, maps, mask, lamda=c * scale)
                l1_curve[c].append(nrmse_percent(image, reference, support))
            print(f"tuning R={acceleration} seed={seed} done", flush=True)
    settings = " / ".join(f"R{a}s{s}" for a in accelerations for s in seeds)
    lines = [
        "## Tuning slice (not used in evaluation)",
        "",
        (f"Colin27 1 mm axial k = {TUNING_SLICE_INDEX} (training part of the split), simulated 4 birdcage coils,"
        f" smooth random phase, SNR {TUNING_SNR:g} (engine.physics.simulate); NRMSE % inside the ESPIRiT support,"
        f" per setting ({settings}) and mean."),
        "",
        "| CG-SENSE iterations | NRMSE % per setting | mean |",
        "|---|---|---|",
    ]
    for n, values in cg_curve.items():
        chosen = " (chosen)" if n == baselines.CG_ITERATIONS else ""
        lines.append(f"| {n}{chosen} | {' / '.join(f'{v:.2f}' for v in values)} | {np.mean(values):.2f} |")
    lines += ["", "| L1-wavelet factor c | NRMSE % per setting | mean |", "|---|---|---|"]
    for c, values in l1_curve.items():
        chosen = " (chosen)" if np.isclose(c, baselines.L1_RELATIVE_FACTOR, rtol=0.05) else ""
        lines.append(f"| {c:.2e}{chosen} | {' / '.join(f'{v:.2f}' for v in values)} | {np.mean(values):.2f} |")
    best_n = min(cg_curve, key=lambda n: np.mean(cg_curve[n]))
    best_c = min(l1_curve, key=lambda c: np.mean(l1_curve[c]))
    lines += ["", (f"Lowest mean: CG-SENSE {best_n} iterations, L1-wavelet c = {best_c:.2e}. Constants in use:"
              f" CG_ITERATIONS = {baselines.CG_ITERATIONS}, L1_RELATIVE_FACTOR = {baselines.L1_RELATIVE_FACTOR:g}."), ""]
    print("\n".join(lines), flush=True)
    return lines


def evaluation_cases() -> dict[str, np.ndarray]:
    """Name -> fully sampled k-space (coils, ny, nx): the real slices, and the bundled example if present."""
    cases = {}
    for name, relative in REAL_SLICES.items():
        path = DATA / relative
        if path.exists():
            cases[name] = np.load(path)
        else:
            print(f"skipping {name}: {path} not found", flush=True)
    try:
        from engine.io.examples import bundled_case_2d
    except ImportError:
        print("skipping the bundled example: engine.io.examples not available", flush=True)
    else:
        case = bundled_case_2d()
        cases[f"bundled example ({case['name']})"] = np.asarray(case["kspace"])
    return cases


def evaluation_section(accelerations, seeds) -> list[str]:
    lines = [
        "## Evaluation",
        "",
        "Poisson-disc masks without calibration region; mean over seeds " + ", ".join(map(str, seeds))
        + " (NRMSE per seed in brackets). Seconds: wall time of one reconstruction on this machine;"
        " for L1-wavelet (best lambda) the whole oracle search (a half-decade grid of"
        f" {len(baselines.BEST_LAMBDA_GRID)} factors c from {min(baselines.BEST_LAMBDA_GRID):.1e} to"
        f" {max(baselines.BEST_LAMBDA_GRID):.1e}, extended by half decades while its best value sits at an"
        " end, then the two quarter-decade neighbours of the best).",
        "",
    ]
    for case_name, kspace in evaluation_cases().items():
        maps, reference, support = baselines.espirit_reference(kspace)
        lines += [f"### {case_name}", "", f"k-space {kspace.shape}, ESPIRiT support {100 * support.mean():.1f} % of the image.", "",
                  "| R (achieved) | method | NRMSE % | PSNR dB | SSIM | seconds |", "|---|---|---|---|---|---|"]
        for acceleration in accelerations:
            per_method: dict[str, list[dict]] = {m: [] for m in METHODS}
            achieved = []
            for seed in seeds:
                mask = poisson_mask(kspace.shape[1:], acceleration, seed)
                achieved.append(mask.size / mask.sum())
                results = baselines.run_baselines(kspace, maps, mask, METHODS, reference, support)
                for method, result in results.items():
                    scores = all_metrics(result["image"], reference, support)
                    scores["seconds"] = result["seconds"]
                    if "factor" in result:
                        scores["factor"] = result["factor"]
                    per_method[method].append(scores)
                print(f"{case_name} R={acceleration} seed={seed}: "
                      + ", ".join(f"{m} {per_method[m][-1]['nrmse_percent']:.2f}" for m in METHODS), flush=True)
            for method, runs in per_method.items():
                mean = {key: np.mean([run[key] for run in runs]) for key in runs[0]}
                per_seed = " / ".join(f"{run['nrmse_percent']:.2f}" for run in runs)
                label = method
                if method == "l1_wavelet_best":
                    label += " (c = " + " / ".join(f"{run['factor']:.1e}" for run in runs) + ")"
                lines.append(
                    f"| {acceleration} ({np.mean(achieved):.2f}) | {label} | {mean['nrmse_percent']:.2f} ({per_seed}) |"
                    f" {mean['psnr_db']:.2f} | {mean['ssim']:.4f} | {mean['seconds']:.2f} |"
                )
        lines.append("")
    return lines


def machine_lines() -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import scipy
    import sigpy
    import torch

    return [
        (f"Machine: {cpu}, {os.cpu_count()} cores visible (shared), {platform.platform()}; Python {platform.python_version()},"
        f" torch {torch.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, sigpy {sigpy.__version__}."),
        (f"Load average at start (1/5/15 min, other jobs share the cores, so seconds are indicative):"
        f" {' / '.join(f'{v:.1f}' for v in os.getloadavg())}."),
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}. Command: `nice -n 5 python benchmarks/baselines2d.py {' '.join(sys.argv[1:])}`.",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "baselines2d.md")
    parser.add_argument("--accelerations", type=float, nargs="+", default=[4, 6, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--skip-tuning", action="store_true", help="only the evaluation section")
    parser.add_argument("--tune-only", action="store_true", help="only the tuning section")
    args = parser.parse_args(argv)
    accelerations = [int(a) if float(a).is_integer() else a for a in args.accelerations]

    lines = ["# Classical 2D baselines", "", *machine_lines(),
             (f"Constants: CG-SENSE {baselines.CG_ITERATIONS} iterations, no Tikhonov; L1-wavelet db4,"
             f" {baselines.L1_ITERATIONS} iterations, lambda = {baselines.L1_RELATIVE_FACTOR:g} x max|W A^H y|;"
             " zero-filled = SENSE adjoint (no density compensation). Metrics: magnitude, fastMRI definitions,"
             " inside the ESPIRiT support, no rescaling."), ""]
    if not args.skip_tuning:
        lines += tuning_section(accelerations, args.seeds)
    if not args.tune_only:
        lines += evaluation_section(accelerations, args.seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
