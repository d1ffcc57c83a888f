"""engine.runtime.checkpoint: atomic per-rank checkpoints, config refusal, exact resume after SIGKILL / SIGTERM."""
from __future__ import annotations

import json
import os
import random
import signal
import time

import numpy as np
import pytest
import torch
from tiny3d import make_tiny_store, tiny_config, tiny_prior

from engine.recon.job3d import run_recon3d
from engine.runtime.bootstrap import init_distributed
from engine.runtime.checkpoint import (
    CheckpointManager,
    CheckpointMismatch,
    capture_rng_state,
    config_diff,
    config_hash,
    restore_rng_state,
)
from engine.runtime.context import DistContext
from engine.runtime.local_group import launch_local
from engine.runtime.preemption import REQUEUE_EXIT_CODE, Preempted

pytestmark = pytest.mark.usefixtures("one_thread")


def _ctx() -> DistContext:
    return init_distributed(device="cpu", env={})


def test_config_hash_and_diff():
    a = {"steps": 10, "prior": {"mode": "tweedie", "weight": 0.1}}
    b = {"steps": 12, "prior": {"mode": "tweedie"}, "new": [1, 2]}
    assert config_hash(a) == config_hash(json.loads(json.dumps(a)))
    assert config_hash(a) != config_hash(b)
    assert config_diff(a, b) == ["new: '<absent>' -> [1, 2]", "prior.weight: 0.1 -> '<absent>'", "steps: 10 -> 12"]


def test_rng_state_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_manager_saves_atomically_keeps_last_and_refuses_other_configs(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", _ctx(), keep_last=2)
    config = {"steps": 5, "lr": 0.01}
    for step in (1, 2, 3):
        manager.save(step, {"trunk": {"w": torch.full((2,), float(step))}}, {"head": torch.ones(1) * step}, config)
    assert manager.complete_steps() == [2, 3]
    # a folder left by a kill during a save is never taken for a checkpoint
    (tmp_path / "ckpt" / "step-00000004.partial").mkdir()
    assert not list((tmp_path / "ckpt").glob("**/*.tmp"))
    step, trunk, rank = manager.load_latest(config)
    assert step == 3 and trunk["trunk"]["w"].tolist() == [3.0, 3.0] and rank["head"].item() == 3
    with pytest.raises(CheckpointMismatch, match=r"refusing to resume:\n  lr: 0.01 -> 0.02"):
        manager.load_latest({"steps": 5, "lr": 0.02})
    meta = tmp_path / "ckpt" / "step-00000003" / "meta.json"
    meta.write_text(meta.read_text().replace('"world_size": 1', '"world_size": 2'))
    with pytest.raises(CheckpointMismatch, match="written by 2 ranks"):
        manager.load_latest(config)
    (tmp_path / "ckpt" / "step-00000002" / "rank-00000.pt").write_bytes(b"truncated")
    (tmp_path / "ckpt" / "step-00000003" / "meta.json").unlink()  # now step 2 is the newest
    with pytest.raises(RuntimeError, match="unreadable or truncated"):
        manager.load_latest(config)


# ------------------------------------------------------------------ exact resume, 2 ranks

RESUME_CHANGES = {"steps": 9, "checkpoint": {"every": 3, "keep_last": 2}}


def _resume_worker(ctx: DistContext, store: str, out: str, resume: bool, kill_at: int | None,
                   term_at: int | None, reference_out: str | None) -> dict | None:
    """One launch: optionally an uninterrupted reference run first, then the run under test,
    killed (SIGKILL, both ranks) or preempted (SIGTERM to rank 0 only) after step `*_at`."""
    if reference_out is not None:
        run_recon3d(tiny_config(**RESUME_CHANGES), store, reference_out, ctx, prior=tiny_prior())

    def on_step_end(recon, result):
        if recon.step_index == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if recon.step_index == term_at and ctx.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        run_recon3d(tiny_config(**RESUME_CHANGES), store, out, ctx, resume=resume, prior=tiny_prior(),
                    on_step_end=on_step_end)
    except Preempted as preempted:
        raise SystemExit(REQUEUE_EXIT_CODE) from preempted
    return None


@pytest.mark.slow  # 20-40 s on 2 shared cores: three 2-rank launches
@pytest.mark.dist
def test_killed_and_preempted_run_resumes_bit_identically(tmp_path):
    """2 ranks: SIGKILL after step 5 (checkpoint at 3), resume, SIGTERM to rank 0 after step 7
    (seen by both ranks in step 8's all-reduce: checkpoints at 6 and 8, requeue exit code), resume
    to step 9: the volume equals an uninterrupted run bit for bit."""
    from engine.io.ome_zarr import open_volume

    store = make_tiny_store(tmp_path / "tiny.zarr")
    out, reference = tmp_path / "run.zarr", tmp_path / "uninterrupted.zarr"
    killed = launch_local(_resume_worker, 2, args=(str(store), str(out), False, 5, None, str(reference)),
                          check=False, timeout_s=240)
    assert killed.exitcodes == [-signal.SIGKILL, -signal.SIGKILL]
    assert CheckpointManager(tmp_path / "run_run" / "checkpoints", _ctx()).complete_steps() == [3]
    preempted = launch_local(_resume_worker, 2, args=(str(store), str(out), True, None, 7, None),
                             check=False, timeout_s=240)
    assert preempted.exitcodes == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]
    assert CheckpointManager(tmp_path / "run_run" / "checkpoints", _ctx()).complete_steps() == [6, 8]
    launch_local(_resume_worker, 2, args=(str(store), str(out), True, None, None, None), timeout_s=240)
    resumed, uninterrupted = open_volume(out), open_volume(reference)
    assert np.array_equal(resumed.complex[...], uninterrupted.complex[...])
    log_steps = [int(line.split(",")[0]) for line in (tmp_path / "run_run" / "log.csv").read_text().splitlines()[1:]]
    assert log_steps == list(range(9))


def test_resume_refuses_a_changed_config(tmp_path):
    store = make_tiny_store(tmp_path / "tiny.zarr")
    out = tmp_path / "run.zarr"

    def stop_after_two(recon, result):
        if recon.step_index == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    with pytest.raises(Preempted):
        run_recon3d(tiny_config(**RESUME_CHANGES), store, out, _ctx(), prior=tiny_prior(), on_step_end=stop_after_two)
    changed = tiny_config(**RESUME_CHANGES, optim={"lr": 0.02})
    with pytest.raises(CheckpointMismatch, match=r"optim.lr: 0.01 -> 0.02"):
        run_recon3d(changed, store, out, _ctx(), resume=True, prior=tiny_prior())
    assert not out.exists()  # nothing was written


def test_training_time_adds_up_over_resumed_segments(tmp_path):
    """train_seconds and log.csv's seconds cover every segment of a resumed run, not the last."""
    store = make_tiny_store(tmp_path / "tiny.zarr")
    out = tmp_path / "run.zarr"
    pause_s = 0.5

    def slow_then_preempted(recon, result):
        time.sleep(pause_s)  # segment 1's loop (steps 1 to 4) takes at least 4 x pause_s
        if recon.step_index == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        run_recon3d(tiny_config(**RESUME_CHANGES), store, out, _ctx(), prior=tiny_prior(),
                    on_step_end=slow_then_preempted)
    metrics = run_recon3d(tiny_config(**RESUME_CHANGES), store, out, _ctx(), resume=True, prior=tiny_prior())
    assert metrics["resumed_from_step"] == 4
    # segment 2's loop alone (5 tiny steps, no pauses) takes a small fraction of that
    assert metrics["train_seconds"] >= 4 * pause_s
    rows = (tmp_path / "run_run" / "log.csv").read_text().splitlines()[1:]
    seconds = [float(row.split(",")[1]) for row in rows]
    assert seconds == sorted(seconds) and seconds[4] >= 4 * pause_s  # the resumed rows continue the clock


def test_a_signal_during_start_up_is_kept_for_the_run():
    """SLURM may signal a task while it still imports torch: the signal must not kill it (SIGUSR1's
    default action) but make the run checkpoint at its first step."""
    from engine.runtime.preemption import PREEMPTION_SIGNALS, PreemptionFlag, catch_signals_early

    original = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    try:
        catch_signals_early()
        os.kill(os.getpid(), signal.SIGUSR1)  # the process survives: the handler records it
        flag = PreemptionFlag().install()
        assert flag.raised
        flag.uninstall()
        assert not PreemptionFlag().install().raised  # consumed once, not replayed
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)


def test_a_finished_run_ignores_late_preemption_signals():
    """Python resets its own handlers to the default action at shutdown, where a late SIGUSR1 would
    kill a finished run (exit 138); an ignored signal stays ignored, so the launchers ignore them."""
    from engine.runtime.preemption import (
        PREEMPTION_SIGNALS,
        catch_signals_early,
        ignore_preemption_signals,
    )

    original = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    try:
        catch_signals_early()
        ignore_preemption_signals()
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in PREEMPTION_SIGNALS)
        os.kill(os.getpid(), signal.SIGUSR1)  # survives
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)
