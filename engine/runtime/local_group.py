"""A local process group without a launcher, for tests and benchmarks: N fresh CPU processes joined
by gloo over a file rendezvous (no network port)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.runtime.bootstrap import init_distributed, shutdown

# ---------------------------------------------------------------------------------------------
# A local process group without a launcher: tests and benchmarks (file:// rendezvous, no ports).
# ---------------------------------------------------------------------------------------------


@dataclass
class LocalRun:
    """Outcome of `launch_local`: each rank's return value (None if it returned none or died)
    and each process's exit code (0 = clean; negative = killed by that signal)."""

    results: list
    exitcodes: list


def _local_worker(fn, rank, world_size, init_method, args, queue, threads):
    import pickle
    import traceback

    torch.set_num_threads(threads)
    ctx = None
    try:
        ctx = init_distributed(device="cpu", init_method=init_method, rank=rank, world_size=world_size)
        # Plain pickle bytes: torch's queue would pass tensors as shared-memory handles, which die
        # with the process that made them.
        queue.put((rank, True, pickle.dumps(fn(ctx, *args))))
    except SystemExit:  # e.g. a preemption exit code: report it, then exit with it
        queue.put((rank, True, pickle.dumps(None)))
        raise
    except BaseException:  # noqa: BLE001 - any failure of the rank is reported to the parent
        queue.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if ctx is not None:
            shutdown(ctx)


def launch_local(
    fn: Callable,
    world_size: int,
    args: tuple = (),
    timeout_s: float = 300.0,
    check: bool = True,
    threads_per_rank: int = 1,
) -> LocalRun:
    """Run `fn(ctx, *args)` on `world_size` fresh CPU processes joined by a gloo group.

    The rendezvous is a file in a temporary folder (no network port). `fn` must be importable
    by name (a module-level function) and return something picklable.
    With check=True a rank that raised or died makes this raise RuntimeError with its traceback;
    with check=False the exit codes are returned for the caller to judge (kill/resume tests).
    """
    import pickle
    import queue as queue_module
    import tempfile
    import time

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="infusion-rdzv-") as folder:
        init_method = f"file://{folder}/rendezvous"
        messages = context.Queue()
        procs = [
            context.Process(target=_local_worker, args=(fn, r, world_size, init_method, args, messages, threads_per_rank))
            for r in range(world_size)
        ]
        for proc in procs:
            proc.start()
        results: list = [None] * world_size
        errors: dict[int, str] = {}
        pending, deadline = set(range(world_size)), time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            try:  # drain before joining: a child blocks on exit until its message is read
                rank, ok, payload = messages.get(timeout=0.2)
            except queue_module.Empty:
                if all(not p.is_alive() for p in procs):
                    break
                continue
            pending.discard(rank)
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
        for proc in procs:
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        exitcodes = [p.exitcode for p in procs]
    if check and (errors or any(code != 0 for code in exitcodes)):
        detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RuntimeError(f"local group failed: exit codes {exitcodes}\n{detail}")
    return LocalRun(results, exitcodes)
