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


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_early_signals: list[int] = []  # preemption signals that arrived before any PreemptionFlag was installed


def _remember_early(signum, _frame) -> None:
    _early_signals.append(signum)


def catch_signals_early() -> None:
    """Record SIGTERM / SIGUSR1 from now on instead of dying of them (SIGUSR1's default action).

    Launchers call it first, before the slow imports: SLURM may signal a task while it is still
    starting, and a task killed there writes no checkpoint, so its job could not be requeued.
    The next PreemptionFlag.install() takes over and starts out raised if a signal came.
    """
    for sig in PREEMPTION_SIGNALS:
        try:
            signal.signal(sig, _remember_early)
        except ValueError:  # not the main thread
            pass


def ignore_preemption_signals() -> None:
    """Ignore SIGTERM / SIGUSR1 from now on: for a launcher whose work is over, just before exit.

    At interpreter shutdown Python resets its handlers to the default action, so a SLURM warning
    arriving then would kill a finished run (exit 138 instead of 0); an ignored signal stays ignored.
    """
    for sig in PREEMPTION_SIGNALS:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM's --signal), polled at step boundaries."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum, _frame) -> None:
        self.raised = True

    def install(self, signals: Sequence[int] = PREEMPTION_SIGNALS) -> PreemptionFlag:
        if _early_signals:  # a signal came during start-up (catch_signals_early): act on it now
            self.raised = True
            _early_signals.clear()
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


__all__ = ["NON_FINITE_EXIT_CODE", "PREEMPTION_SIGNALS", "REQUEUE_EXIT_CODE", "Preempted", "PreemptionFlag",
           "catch_signals_early", "ignore_preemption_signals"]
