"""Preemption and exit codes shared by the long-running loops (2D, 3D, prior training).

SLURM sends SIGTERM (or the signal named by `--signal`, here SIGUSR1) some seconds before it
kills a job. The loops poll a `PreemptionFlag` at step boundaries, write a checkpoint, raise
`Preempted`, and the launcher exits with REQUEUE_EXIT_CODE, on which launch/slurm/recon3d.sbatch
requeues the job; the requeued job runs with --resume.
"""
from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path

REQUEUE_EXIT_CODE = 75  # sysexits EX_TEMPFAIL: "try again later"; the sbatch file requeues on it
NON_FINITE_EXIT_CODE = 3  # max_bad_steps non-finite steps in a row: not worth a requeue, it would recur


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM's --signal), polled at step boundaries."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum, _frame) -> None:
        self.raised = True

    def install(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGUSR1)) -> PreemptionFlag:
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside some test harnesses)
                pass
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class Preempted(Exception):
    """Raised after the preemption checkpoint was written; exit with REQUEUE_EXIT_CODE."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"preempted at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


__all__ = ["NON_FINITE_EXIT_CODE", "REQUEUE_EXIT_CODE", "Preempted", "PreemptionFlag"]
