"""INFusion 2D reconstruction of one multicoil slice, compared with zero-filled, L1-wavelet and the plain INR.

A fully sampled input is undersampled with the chosen mask and scored against its coil-combined
image inside the coil maps' support; an undersampled input keeps its own sampling and gets images
only. Writes recon_<method>.npy, mask/reference/support .npy, metrics.json (nrmse_percent, psnr_db,
ssim, seconds, prior_evals, skipped_steps per method), comparison.png, config.yaml (resolved) and
history.json to --out; metrics.json comes last. The INR fits are checkpointed in --out/checkpoints
(every `checkpoint.every` steps and on SIGTERM / SIGUSR1, after which the exit code is 75); rerun
the same command with --resume to continue. Bad input: one line on stderr, exit 2. The work is
done by engine.recon.job2d.recon2d_job.

Commands (from the repository root):
    # the bundled example (fully sampled: real anatomy, simulated coils), fast mode, Poisson-disc R = 6
    python launch/recon2d.py --out runs/recon2d_bundled
    # your fully sampled slice (.npy: coils, ny, nx) at R = 8 with the paper's recipe (slow: 80,000
    # U-Net evaluations)
    python launch/recon2d.py your_slice.npy --accel 8 --config configs/reference2d.yaml --out runs/r8_reference
    # label-free per-case choices (TV weight, prior weight incl. 0, stop) on 8 % held-out k-space, then a refit
    python launch/recon2d.py your_slice.npy --accel 6 --config configs/auto2d.yaml --out runs/r6_auto
    #   (or any config with --set selection.enabled=true)
    # a fastMRI volume, slice 10, 1D random mask with 24 ACS lines, a config override
    python launch/recon2d.py your_case.h5 --slice 10 --mask random1d --accel 4 --calib 24 \
        --set optim.steps=400 prior.every=2 --out runs/case_1d
    # an undersampled BART .cfl input: images, no scores
    python launch/recon2d.py your_ksp.cfl --out runs/bart
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    from engine.config import add_override_option

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?", type=Path, default=None,
                        help="k-space file (.npy, fastMRI/SKM-TEA .h5, BART .cfl, .mat); default: the bundled example")
    parser.add_argument("--out", type=Path, required=True, help="output folder (refused if not empty)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --out from its checkpoints (exit 75 = preempted)")
    parser.add_argument("--slice", type=int, default=None, dest="slice_index", help="slice of a multi-slice file")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo2d.yaml",
                        help="YAML config (default configs/demo2d.yaml, the fast mode)")
    add_override_option(parser)
    parser.add_argument("--mask", default="poisson", choices=["poisson", "random1d", "equispaced1d", "file"])
    parser.add_argument("--mask-file", type=Path, default=None, help="mask for --mask file")
    parser.add_argument("--accel", type=float, default=6.0, help="acceleration R (default 6)")
    parser.add_argument("--calib", type=int, default=None,
                        help="fully sampled centre: Poisson box side / 1D ACS lines (default: none for poisson)")
    parser.add_argument("--seed", type=int, default=None, help="mask seed (default: derived from the case name)")
    parser.add_argument("--sampling", default="auto", choices=["auto", "full", "undersampled"],
                        help="treat the input as fully sampled or not (auto: from its samples)")
    parser.add_argument("--calib-width", type=int, default=24, help="ESPIRiT calibration width")
    parser.add_argument("--compare", nargs="*", default=["zero_filled", "l1_wavelet", "inr"],
                        choices=["zero_filled", "l1_wavelet", "inr"], help="methods shown beside INFusion")
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine.runtime.preemption import catch_signals_early

    catch_signals_early()  # a SIGTERM / SIGUSR1 while torch is still importing still checkpoints
    args = build_parser().parse_args(argv)
    from engine.runtime.validate import run_cli

    return run_cli(lambda: _job(args))


def _job(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.recon.fit2d import Recon2DConfig
    from engine.recon.job2d import recon2d_job
    from engine.runtime.preemption import REQUEUE_EXIT_CODE, Preempted

    config = load_config(Recon2DConfig, args.config, args.set)
    try:
        metrics = recon2d_job(config, args.out, None if args.input is None else str(args.input), args.slice_index,
                              args.mask, args.accel, args.calib, args.seed,
                              None if args.mask_file is None else str(args.mask_file), args.sampling,
                              args.calib_width, tuple(args.compare), args.overwrite, args.resume)
    except Preempted as preempted:
        print(f"[recon2d] {preempted}: exit {REQUEUE_EXIT_CODE}; rerun the same command with --resume",
              file=sys.stderr)
        return REQUEUE_EXIT_CODE
    for method, values in metrics.items():
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
                          if k in ("nrmse_percent", "psnr_db", "ssim", "seconds", "prior_evals"))
        print(f"{method:12s} {shown}")
        if "selection" in values:
            chosen = values["selection"]["chosen"]
            print(f"{'':12s} chosen on held-out k-space: tv_weight {chosen['tv_weight']:g}, prior weight "
                  f"{chosen['prior_weight']:g}, {chosen['steps']} steps (metrics.json: every candidate's curve)")
    print(f"wrote {args.out}")
    return 0


def cli() -> int:
    """Console entry point `infusion-recon2d`: `main`, then late signals are ignored."""
    exit_code = main()
    from engine.runtime.preemption import ignore_preemption_signals

    ignore_preemption_signals()  # the run is over: a late SIGTERM / SIGUSR1 must not kill the exiting process
    return exit_code


if __name__ == "__main__":
    sys.exit(cli())
