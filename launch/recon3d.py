"""Distributed 3D INFusion reconstruction of a hybrid-space Zarr store into an OME-Zarr volume.

The readout axis is split over the ranks; each rank reads only its slab of the input store and
writes only its chunks of the output (engine/recon/job3d.py; docs/ARCHITECTURE.md, "Design"). Without
--input, the bundled 3D example (real Colin27 anatomy, simulated coils and phase) is undersampled
as `bundled:` in the config says and prepared under outputs/bundled/ first. Without --out, the
volume goes to outputs/recon3d-<config>-<time>.zarr; side files (montage.png, log.csv,
metrics.json, config.yaml, checkpoints/) go to the folder <out stem>_run/ beside it.

Commands (from the repository root):
    # the 3D demo on 2 CPU processes (torchrun, gloo), a few minutes
    torchrun --nproc-per-node 2 launch/recon3d.py --config configs/demo3d.yaml
    # the same program as one process, or under MPI
    python launch/recon3d.py --config configs/demo3d.yaml
    mpiexec -n 2 python launch/recon3d.py --config configs/demo3d.yaml
    # a prepared case on 8 GPUs of one node
    python launch/prepare.py your_case.h5 --out case.zarr
    torchrun --nproc-per-node 8 launch/recon3d.py --config configs/fullres3d.yaml --input case.zarr --out recon.zarr
    # SLURM, several nodes, no torchrun (one task per GPU; see launch/slurm/recon3d.sbatch)
    srun python launch/recon3d.py --config configs/fullres3d.yaml --input case.zarr --out recon.zarr --resume
    # config overrides
    python launch/recon3d.py --config configs/demo3d.yaml --set steps=200 slices.per_step=8 bf16=false
    # without the demo's held-out band gains (debias: one run instead of two, a blurrier output)
    torchrun --nproc-per-node 2 launch/recon3d.py --config configs/demo3d.yaml --set debias.enabled=false

Exit codes: 0 done; 75 preempted (SIGTERM/SIGUSR1: a checkpoint was written at the end of the
next step; requeue and rerun with --resume); 2 bad config, input or output path (one line naming
the problem); 3 max_bad_steps steps in a row had a non-finite loss or gradient (skipped steps are
logged in log.csv; the checkpoints written so far are kept).
"""
import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.runtime.preemption import catch_signals_early, ignore_preemption_signals


def build_parser() -> argparse.ArgumentParser:
    from engine.config import add_override_option

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/demo3d.yaml"),
                        help="YAML config (default configs/demo3d.yaml)")
    parser.add_argument("--input", type=Path, default=None,
                        help="hybrid-space Zarr store from launch/prepare.py (default: the bundled example)")
    parser.add_argument("--out", type=Path, default=None, help="output OME-Zarr volume (*.zarr)")
    add_override_option(parser, "steps=200 prior.mode=off")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint (a fresh start if there is none)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run engine.recon.job3d.recon3d_job on this rank; the exit code."""
    catch_signals_early()  # before torch is imported: a SLURM signal during start-up must not kill the task
    args = build_parser().parse_args(argv)
    from engine.recon.job3d import recon3d_job

    return recon3d_job(args.config, args.set, args.input, args.out, overwrite=args.overwrite, resume=args.resume)


def cli() -> int:
    """Console entry point `infusion-recon3d`: `main`, then late signals are ignored."""
    exit_code = main()
    ignore_preemption_signals()  # the run is over: a late SLURM signal must not kill the exiting process
    return exit_code


if __name__ == "__main__":
    sys.exit(cli())
