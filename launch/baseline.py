"""Classical baselines (zero-filled, CG-SENSE, L1-wavelet) on one 2D multicoil input.

A fully sampled input is undersampled with the chosen mask and scored against its ESPIRiT-combined
image inside the ESPIRiT support; an undersampled input keeps its own sampling and gets images only.
Writes recon_<method>.npy, mask.npy, support.npy (and reference.npy), metrics.json and
comparison.png to --out. The work is done by engine.evaluation.baselines.baseline_job.

Commands (from the repository root):
    # the bundled example (fully sampled, simulated coils on real anatomy), Poisson-disc R = 6
    python launch/baseline.py data/colin27_axial_z45mm_8coil.h5 --slice 0 --out runs/baseline_bundled
    # your fully sampled slice (.npy: coils, ny, nx), R = 8, with the oracle L1-wavelet as well
    python launch/baseline.py your_slice.npy --accel 8 --best-lambda --out runs/r8
    # fastMRI-style 1D random mask with 24 ACS lines
    python launch/baseline.py your_case.h5 --slice 10 --mask random1d --accel 4 --calib 24 --out runs/case_1d
    # a mask of your own (.npy/.npz/.h5, 0/1, (ny, nx) or (nx,))
    python launch/baseline.py your_case.npy --mask file --mask-file your_my_mask.npy --out runs/case_file
    # an already undersampled input (BART .cfl): images, no scores
    python launch/baseline.py your_ksp.cfl --out runs/bart

Exit codes: 0 done; 2 refused (bad input file or mask, existing --out without --overwrite), with
one line on stderr naming the file, the array and the problem.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="k-space file: .npy, fastMRI/SKM-TEA .h5, BART .cfl, .mat")
    parser.add_argument("--out", type=Path, required=True, help="output folder (refused if not empty)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--slice", type=int, default=None, dest="slice_index", help="slice of a multi-slice file")
    parser.add_argument("--mask", default="poisson", choices=["poisson", "random1d", "equispaced1d", "file"])
    parser.add_argument("--mask-file", type=Path, default=None, help="mask for --mask file")
    parser.add_argument("--accel", type=float, default=6.0, help="acceleration R (default 6)")
    parser.add_argument("--calib", type=int, default=None,
                        help="fully sampled centre: Poisson box side / 1D ACS lines (default: none for "
                             "poisson, fastMRI's 0.32/R fraction for 1D)")
    parser.add_argument("--seed", type=int, default=0, help="mask seed")
    parser.add_argument("--methods", nargs="+", default=["zero_filled", "cg_sense", "l1_wavelet"],
                        choices=["zero_filled", "zero_filled_rss", "cg_sense", "l1_wavelet"])
    parser.add_argument("--best-lambda", action="store_true", help="also the oracle-lambda L1-wavelet")
    parser.add_argument("--sampling", default="auto", choices=["auto", "full", "undersampled"],
                        help="treat the input as fully sampled or not (auto: from its non-zero samples)")
    parser.add_argument("--calib-width", type=int, default=24, help="ESPIRiT calibration width")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 with a one-line error for a refused input,
    config or output path: engine.runtime.validate.run_cli)."""
    args = build_parser().parse_args(argv)
    if args.mask == "file" and args.mask_file is None:
        build_parser().error("--mask file needs --mask-file")
    from engine.runtime.validate import run_cli

    return run_cli(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    from engine.evaluation.baselines import baseline_job

    per_method = baseline_job(
        args.input, args.out, mask_kind=args.mask, acceleration=args.accel, calib=args.calib,
        seed=args.seed, mask_file=args.mask_file, slice_index=args.slice_index,
        methods=tuple(args.methods), best_lambda=args.best_lambda, sampling=args.sampling,
        calib_width=args.calib_width, overwrite=args.overwrite,
    )
    for method, entry in per_method.items():
        scores = "".join(f"  {key} {entry[key]:.4g}" for key in ("nrmse_percent", "psnr_db", "ssim") if key in entry)
        print(f"{method:18s}{scores}  seconds {entry['seconds']:.2f}")
    print(f"wrote {args.out}/metrics.json, comparison.png, recon_*.npy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
