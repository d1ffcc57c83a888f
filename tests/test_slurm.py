"""launch/slurm/recon3d.sbatch on a real SLURM (slurmctld + slurmd + munged on this machine).

scripts/slurm_localhost.sh starts the daemons in a temporary folder (installing Debian's
slurm-wlm and munge with apt-get when root and missing); without root or packages the test is
skipped with that reason. Selected with `-m slurm` (left out of a plain run: it starts system
daemons); .ci/run runs it.

Seven 2-rank CPU jobs of the same tiny reconstruction run side by side (with the sbatch header's
CPU example options):
- one uninterrupted (the reference volume);
- one preempted eight times by the test, each at a later step: three times each
  `scancel --signal=USR1` and `scancel --signal=TERM` (the ranks get the signal, not the batch
  shell), then `scancel --batch --signal=TERM` (the batch shell alone) and
  `scancel --full --signal=USR1` (shell and ranks);
- three with a real three-minute time limit and `--signal=USR1@100`: SLURM itself signals them 50
  to 80 s into the segment (its timer ticks every 30 s); the test holds their ranks with SIGSTOP
  until after that window, so the warning always finds them running, however fast the machine.
  When the requeued job is released its limit is raised (`scontrol update TimeLimit=`), as a user
  would, so that it runs to the end: a further segment would only repeat the same preemption;
- two with debias on (shorter): one is signalled during debias's holdout fit, before the final
  run starts, and must requeue, resume that fit and end with the other's volume.
Then a job on a store that does not exist must fail with exit 2, and a job cancelled with a plain
`scancel` must end cancelled: neither is requeued.
Every preemption must requeue (the test releases the requeued job from SLURM's ~2 min requeue
delay with `scontrol update StartTime=now`), every segment must resume from the previous one's
checkpoint, and every volume must be bit-identical to the reference. Before the fix, when one
rank exited with 75 first srun killed the other and about half of such preemptions did not
requeue; the 8 + 3 preemptions here would show that with near certainty.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_localhost.sh"
SBATCH = ROOT / "launch" / "slurm" / "recon3d.sbatch"
RELEASE_AFTER_S = 3  # seconds between seeing a job requeued and releasing it
CANNOT_RUN_HERE = 77  # scripts/slurm_localhost.sh: not root, or no packages and no apt-get

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1800)]

# A small, fast run of configs/demo3d.yaml; checkpoints only on preemption, so any checkpoint a
# segment resumes from was written by the preemption under test.
OVERRIDES = ["device=cpu", "inr.hidden=32", "inr.encoding.levels=4", "inr.encoding.log2_table_size=10",
             "inr.encoding.max_res=32", "slices.per_step=2", "prior.start_step=20", "prior.every=3", "prior.upsample=1",
             "baseline.l1_wavelet=false", "output.montage=false", "output.log_every=5", "checkpoint.every=0"]
# The header's CPU example: it must fit a small node.
CPU_RANKS = 2
CPU_OPTIONS = ["--nodes=1", f"--ntasks-per-node={CPU_RANKS}", "--gpus-per-task=0", "--cpus-per-task=1",
               "--mem-per-cpu=1500M"]
# (scancel options, fraction of the steps at which they are sent): three times each signal to the
# ranks, then the batch shell alone (it forwards SIGUSR1 to the ranks), then shell and ranks.
SIGNAL_PLAN = [(("--signal=USR1",), 0.05), (("--signal=TERM",), 0.15), (("--signal=USR1",), 0.25),
               (("--signal=TERM",), 0.35), (("--signal=USR1",), 0.45), (("--signal=TERM",), 0.55),
               (("--batch", "--signal=TERM"), 0.65), (("--full", "--signal=USR1"), 0.75)]
STEPS = 400
# The time-limit jobs run with --time=3 --signal=USR1@100. SLURM's timer ticks every 30 s and
# sends the warning once the time left is within the asked 100 s plus one tick: 50 to 80 s into
# a segment (measured with slurm-wlm 22.05); the limit itself is enforced 180 to 210 s in. Their
# ranks are held with SIGSTOP from their first logged step until LIMIT_HOLD_S into the first
# segment, so on a machine of any speed the warning comes while they still run (it is delivered
# on SIGCONT), with over 90 s left to checkpoint before the limit. Released from the requeue,
# their limit becomes RAISED_LIMIT_MIN minutes.
LIMIT_OPTIONS = ("--time=3", "--signal=USR1@100")
LIMIT_HOLD_S = 82
RAISED_LIMIT_MIN = 30
LIMIT_JOBS = ("limit1", "limit2", "limit3")  # each preempted by SLURM's time limit at least once
# With debias on (configs/demo3d.yaml's default) a holdout fit runs before the final run; one job is
# signalled during it, the other runs through (its reference). Shorter: two fits of DEBIAS_STEPS.
DEBIAS_JOBS = ("debias_reference", "debias_signal")
DEBIAS_STEPS = 200
# Every job of the test at once: 7 jobs x 2 CPUs x 1500 MB (the refused and cancelled jobs come after).
CLUSTER = {"SLURM_LOCALHOST_CPUS": "14", "SLURM_LOCALHOST_MEMORY_MB": "21000"}


@dataclass
class Cluster:
    folder: Path
    env: dict

    def run(self, *args: str, check: bool = True) -> str:
        # cwd: sbatch records it as SLURM_SUBMIT_DIR, where the script expects the repository root
        done = subprocess.run(list(args), check=False, cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def job(self, job_id: int) -> dict:
        line = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", line))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if sys.platform != "linux":
        pytest.skip("the localhost SLURM cluster needs Linux")
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], check=False, capture_output=True,
                             text=True, timeout=900, env={**os.environ, **CLUSTER})
    if started.returncode == CANNOT_RUN_HERE:
        pytest.skip(started.stderr.strip().splitlines()[-1])
    assert started.returncode == 0, f"scripts/slurm_localhost.sh start failed:\n{started.stderr}"
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf"), "OMP_NUM_THREADS": "1",
           "CONFIG": "configs/demo3d.yaml",  # read by the sbatch script
           # the jobs inherit this interpreter's environment (the sbatch script then skips its set-up)
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        yield Cluster(folder, env)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], check=True, timeout=120)


def make_store(path: Path) -> Path:
    """A tiny smooth complex volume (x, y, z) = (8, 32, 16), 4 smooth coils, a random mask with
    a fully sampled centre, voxel size 2 x 1 x 1.5 mm."""
    import torch

    from engine.io.data import MulticoilData
    from engine.io.hybrid_store import prepare_hybrid_store
    from engine.physics.fft import fftc

    nx, ny, nz = 8, 32, 16
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (nx, ny, nz)), indexing="ij")
    image = ((np.exp(-(x**2 + 3 * y**2 + 2 * z**2)) + 0.5 * (np.abs(y) < 0.3)) * np.exp(1j * (x + y)))
    maps = np.stack([np.exp(-((y - c) ** 2 + z**2)) * np.exp(1j * c * z) for c in (-0.6, -0.2, 0.2, 0.6)])
    maps /= np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
    kspace = fftc(torch.from_numpy((maps * image).astype(np.complex64)), dims=(1, 2, 3)).numpy()
    kspace += 0.01 * (rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape))
    mask = (rng.random((ny, nz)) < 0.35).astype(np.float32)
    mask[ny // 2 - 3:ny // 2 + 3, nz // 2 - 2:nz // 2 + 2] = 1
    data = MulticoilData(kspace=kspace.astype(np.complex64), maps=maps.astype(np.complex64),
                         reference=image.astype(np.complex64), source="tiny slurm test case", layout="3d",
                         attrs={"acquisition": {"voxel_size_mm": [2.0, 1.0, 1.5]}})
    return prepare_hybrid_store(data, path, mask=mask, chunk_x=2)


def submit(cluster: Cluster, store: Path, out: Path, steps: int, *options: str, debias: bool = False) -> int:
    text = cluster.run("sbatch", "--parsable", f"--output={out.with_suffix('.log')}", *CPU_OPTIONS, *options,
                       str(SBATCH), str(store), str(out), "--set", f"steps={steps}", *OVERRIDES,
                       f"debias.enabled={str(debias).lower()}")
    return int(text.strip().split(";")[0])


def run_seconds(text: str) -> int:
    """scontrol's RunTime ([days-]hh:mm:ss) in seconds."""
    days, _, clock = text.rpartition("-")
    seconds = 0
    for part in clock.split(":"):
        seconds = 60 * seconds + int(part)
    return seconds + 86400 * int(days or 0)


def last_logged_step(out: Path) -> int:
    log = out.with_name(out.name.removesuffix(".zarr") + "_run") / "log.csv"
    try:
        rows = log.read_text().strip().splitlines()[1:]
    except FileNotFoundError:
        return -1
    return int(rows[-1].split(",")[0]) if rows else -1


def rank_pids(out: Path) -> list[int]:
    """The rank processes (python launch/recon3d.py ... --out OUT, not srun) of the job writing `out`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:  # ended meanwhile
            continue
        if (args and Path(args[0].decode()).name.startswith("python") and b"launch/recon3d.py" in args
                and str(out).encode() in args):
            pids.append(int(proc.name))
    return pids


def is_stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "T"


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class Watcher:
    """Polls every job, releases a requeued one from SLURM's requeue delay at once, runs the actions
    whose condition came true (each once), and fails with the jobs' logs as soon as one fails."""

    def __init__(self, cluster: Cluster, jobs: dict[str, int], outs: dict[str, Path], hold: tuple = ()):
        self.cluster, self.jobs, self.outs = cluster, jobs, outs
        self.hold = {name: "waiting" for name in hold}  # -> "stopped" -> "released"
        self.released = dict.fromkeys(jobs, 0)
        self.requeue_seen: dict[str, float] = {}
        self.info: dict[str, dict] = {}
        self.pending: list[tuple] = []  # (condition, action), polled while the test waits for others

    def once(self, condition, action) -> None:
        self.pending.append((condition, action))

    def poll(self) -> None:
        for name, job_id in self.jobs.items():
            info = self.info[name] = self.cluster.job(job_id)
            restarts = int(info.get("Restarts", 0))
            if info.get("JobState") == "PENDING" and restarts > self.released[name]:
                # Not in the second of the requeue itself: slurmd still holds the revocation of the
                # previous run's credential and refuses a new start then ("Job credential revoked").
                first_seen = self.requeue_seen.setdefault(name, time.monotonic())
                if time.monotonic() - first_seen >= RELEASE_AFTER_S:
                    # the held jobs are the time-limit ones: one preemption by the limit is enough
                    raise_limit = [f"TimeLimit={RAISED_LIMIT_MIN}"] if name in self.hold else []
                    self.cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", *raise_limit)
                    self.released[name] = restarts
                    del self.requeue_seen[name]
            if self.hold.get(name) and restarts == 0 and info.get("JobState") == "RUNNING":
                self._hold(name, run_seconds(info.get("RunTime", "0")))
            if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                raise AssertionError(f"job {name} ({job_id}) ended {info['JobState']} ({info.get('Reason')}):\n"
                                     f"{self.log(name)[-4000:]}")
        for entry in [entry for entry in self.pending if entry[0]()]:
            self.pending.remove(entry)
            entry[1]()

    def _hold(self, name: str, seconds: int) -> None:
        """SIGSTOP the ranks once they run steps, SIGCONT them LIMIT_HOLD_S into the segment. The
        cluster is this machine, so the test signals the rank processes itself: the same signals sent
        with `scancel --signal` left a job's ranks stopped until its time limit, now and then, on a
        loaded machine. Released means no rank is stopped any more (SIGCONT is repeated until then)."""
        if self.hold[name] == "released":
            return
        ranks = rank_pids(self.outs[name])
        if self.hold[name] == "waiting" and last_logged_step(self.outs[name]) >= 0 and len(ranks) == CPU_RANKS:
            signal_all(ranks, signal.SIGSTOP)
            self.hold[name] = "stopped"
        elif self.hold[name] == "stopped" and seconds >= LIMIT_HOLD_S:
            signal_all(ranks, signal.SIGCONT)
            if not any(is_stopped(pid) for pid in ranks):
                self.hold[name] = "released"

    def log(self, name: str) -> str:
        path = self.outs[name].with_suffix(".log")
        return path.read_text() if path.exists() else ""

    def state(self, name: str) -> str:
        return self.info[name].get("JobState", "")

    def restarts(self, name: str) -> int:
        return int(self.info[name].get("Restarts", 0))

    def until(self, condition, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll()
            if condition():
                return
            time.sleep(0.5)
        tails = "\n".join(f"--- {name}:\n{self.log(name)[-2000:]}" for name in self.jobs)
        raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}\n{tails}")


def test_preempted_jobs_always_requeue_resume_and_match_an_uninterrupted_run(cluster, tmp_path):
    from engine.io.ome_zarr import open_volume

    store = make_store(tmp_path / "tiny.zarr")
    steps = STEPS
    names = ("reference", "signals", *LIMIT_JOBS)
    outs = {name: tmp_path / f"{name}.zarr" for name in (*names, *DEBIAS_JOBS)}
    jobs = {name: submit(cluster, store, outs[name], steps, *(LIMIT_OPTIONS if name in LIMIT_JOBS else ()))
            for name in names}
    jobs.update({name: submit(cluster, store, outs[name], DEBIAS_STEPS, debias=True) for name in DEBIAS_JOBS})
    watch = Watcher(cluster, jobs, outs, hold=LIMIT_JOBS)

    # A signal during debias's holdout fit, before the final run has a step or a log.csv: the fit
    # checkpoints in checkpoints/debias, the job requeues and the holdout fit resumes.
    watch.once(lambda: watch.state("debias_signal") == "RUNNING" and watch.restarts("debias_signal") == 0
               and "debias holdout fit: step" in watch.log("debias_signal"),
               lambda: cluster.run("scancel", "--signal=USR1", str(jobs["debias_signal"])))
    # The test's own preemptions of one job, each at a later step, alternating the two signals; each
    # once the segment has logged a step past the last checkpoint (log.csv holds every segment's rows).
    for count, (options, fraction) in enumerate(SIGNAL_PLAN, start=1):
        step = max(int(fraction * steps), 1 + max(map(int, re.findall(r"preempted at step (\d+)",
                                                                      watch.log("signals"))), default=-1))
        watch.until(lambda step=step: watch.state("signals") == "RUNNING"
                    and last_logged_step(outs["signals"]) >= step, 600, f"step {step} of the signals job")
        cluster.run("scancel", *options, str(jobs["signals"]))
        watch.until(lambda count=count: watch.restarts("signals") >= count, 180,
                    f"the requeue after scancel {' '.join(options)} at step {step}")
    watch.until(lambda: all(watch.state(name) == "COMPLETED" for name in jobs), 900, "every job to complete")
    assert not watch.pending, "the debias job's holdout fit ended before the test saw it running to signal it"

    # Not requeued: a run that fails (here: refused input, exit 2; there is no new checkpoint), and a
    # cancelled job (plain scancel: its ranks get SIGTERM and checkpoint, but the job must end).
    refused_out, cancelled_out = tmp_path / "refused.zarr", tmp_path / "cancelled.zarr"
    refused = submit(cluster, tmp_path / "absent.zarr", refused_out, steps)
    cancelled = submit(cluster, store, cancelled_out, steps)
    ended = ("FAILED", "COMPLETED", "CANCELLED", "TIMEOUT")
    deadline, cancel_sent = time.monotonic() + 300, False
    while time.monotonic() < deadline:
        states = [cluster.job(job).get("JobState") for job in (refused, cancelled)]
        if not cancel_sent and states[1] == "RUNNING" and last_logged_step(cancelled_out) >= 0:
            cluster.run("scancel", str(cancelled))
            cancel_sent = True
        if cancel_sent and all(state in ended for state in states):
            break
        time.sleep(0.5)
    info, log = cluster.job(refused), refused_out.with_suffix(".log").read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log
    assert "absent.zarr: Zarr store not found" in log and "requeueing" not in log
    time.sleep(2 * RELEASE_AFTER_S)  # a requeue would show by now
    info, log = cluster.job(cancelled), cancelled_out.with_suffix(".log").read_text()
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log
    assert "not requeued" in log and "requeueing" not in log, log

    reference = open_volume(outs["reference"])
    assert watch.restarts("reference") == 0
    expected = reference.complex[...]
    scale = reference.multiscales[0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [2.0, 1.0, 1.5]  # the store's voxel size reaches the OME-Zarr output
    report = []
    for name in names[1:]:
        restarts, log = watch.restarts(name), watch.log(name)
        report.append(f"{name}: {restarts} requeues")
        assert watch.info[name]["ExitCode"] == "0:0", f"{name}: exit {watch.info[name]['ExitCode']}\n{log[-3000:]}"
        assert restarts >= (len(SIGNAL_PLAN) if name == "signals" else 1), f"{name}: {restarts} requeues\n{log}"
        # every segment but the last ended in a requeue with a checkpoint, and the next resumed from it
        assert log.count("checkpoint written; requeueing job") == restarts, log
        assert len(re.findall(r"resumed from step \d+", log)) == restarts, log
        assert "\r" not in log, f"{name}: progress-bar carriage returns in a batch log"
        volume = open_volume(outs[name])
        assert np.array_equal(volume.complex[...], expected), f"{name}: volume differs from the uninterrupted run"
        assert volume.metrics["resumed_from_step"] > 0
    log = watch.log("debias_signal")
    assert watch.restarts("debias_reference") == 0 and watch.restarts("debias_signal") == 1, log
    assert watch.info["debias_signal"]["ExitCode"] == "0:0", log[-3000:]
    assert log.count("checkpoint written; requeueing job") == 1, log
    assert re.search(r"debias holdout fit resumed from step \d+", log), log
    assert np.array_equal(open_volume(outs["debias_signal"]).complex[...],
                          open_volume(outs["debias_reference"]).complex[...]), "debias: volume differs"
    report.append("debias_signal: 1 requeue in the holdout fit")
    print("; ".join(report))  # shown with -s: the preemptions each job went through
