"""Distributed 3D INFusion reconstruction of a hybrid-space Zarr store into an OME-Zarr volume.

The readout axis is split over the ranks; each rank reads only its slab of the input store and
writes only its chunks of the output (engine/recon3d_run.py; docs/ARCHITECTURE.md, "Design"). Without
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

Exit codes: 0 done; 75 preempted (SIGTERM/SIGUSR1: a checkpoint was written at the end of the
next step; requeue and rerun with --resume); 2 bad config, input or output path (one line naming
the problem); 3 max_bad_steps steps in a row had a non-finite loss or gradient (skipped steps are
logged in log.csv; the checkpoints written so far are kept).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.preemption import catch_signals_early, ignore_preemption_signals

catch_signals_early()  # before torch is imported: a SLURM signal during start-up must not kill the task

from engine.recon3d_run import main

if __name__ == "__main__":
    exit_code = main(description=__doc__)
    ignore_preemption_signals()  # the run is over: a late SLURM signal must not kill the exiting process
    sys.exit(exit_code)
