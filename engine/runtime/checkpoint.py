"""Per-rank checkpoints of a sharded run: exact resume after a kill or a SLURM preemption.

Layout of one checkpoint (a directory per step under the run's checkpoint folder):

    step-00000120/
        trunk.pt          replicated trunk weights (written once, by rank 0)
        rank-00000.pt     per rank: head slab, optimiser states, RNG states (torch, numpy,
        rank-00001.pt     python, CUDA, every shard's slice sampler) and the step
        meta.json         step, world size, config hash and the config itself: written last

Protocol: the ranks write into `step-XXXXXXXX.partial/`, each file to a temporary name, fsynced,
then renamed; after a barrier rank 0 writes meta.json the same way and renames the directory to
its final name (an atomic rename), so a directory without the `.partial` suffix is complete.
The last `keep_last` complete checkpoints are kept. Everything is saved as tensors and plain
Python values and loaded with `torch.load(weights_only=True)`: no pickled code.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.runtime.context import DistContext

_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class CheckpointConfig:
    """When checkpoints are written (not part of a run's config hash)."""

    every: int = 0
    """Checkpoint every n steps (0: only on SIGTERM / SIGUSR1 and, in 2D, at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept."""


class CheckpointMismatch(RuntimeError):
    """The checkpoint was written by a run with another config or world size."""


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of a (nested, JSON-able) config dict."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def config_diff(saved: dict, current: dict) -> list[str]:
    """Lines "key: saved -> current" for every leaf that differs (missing shown as <absent>)."""
    old, new = _flatten(json.loads(json.dumps(saved, default=str))), _flatten(json.loads(json.dumps(current, default=str)))
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines


# ------------------------------------------------------------------ RNG states as plain tensors


def capture_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python `random` global states, as tensors and ints."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ atomic files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to `path.tmp`, fsync, rename to `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise RuntimeError(f"checkpoint file {path} is unreadable or truncated: {error}") from error


class CheckpointManager:
    """Saves and finds the checkpoints of one run (all ranks construct it with the same root).

    Args:
        root: the run's checkpoint folder (shared file system for multi-node runs).
        ctx: this rank's DistContext (barriers, rank number).
        keep_last: number of complete checkpoints to keep (older ones are deleted by rank 0).
    """

    def __init__(self, root: str | Path, ctx: DistContext, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root, self.ctx, self.keep_last = Path(root), ctx, keep_last

    def _final_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def complete_steps(self) -> list[int]:
        """Steps with a complete checkpoint (final name and meta.json), ascending."""
        if not self.root.is_dir():
            return []
        steps = []
        for child in self.root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / "meta.json").is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def start_fresh(self, overwrite: bool, hint: str) -> None:
        """Collective, for a run that does not resume: refuse the checkpoints of an earlier run
        (FileExistsError ending with `hint`), or delete them when `overwrite`. Kept beside a new
        run, their higher steps would make the pruning delete the new run's own checkpoints."""
        if not self.complete_steps():
            return
        if not overwrite:
            raise FileExistsError(f"{self.root} holds checkpoints of an earlier run; {hint}")
        self.ctx.barrier()  # every rank has looked before rank 0 deletes
        if self.ctx.is_main:
            shutil.rmtree(self.root)

    def save(self, step: int, trunk_state: dict, rank_state: dict, config: dict) -> Path:
        """Collective: every rank calls it at the same step. Returns the checkpoint folder."""
        final, partial = self._final_dir(step), self.root / f"step-{step:08d}.partial"
        if self.ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():  # leftover of a run killed while saving this very step
                shutil.rmtree(partial)
            partial.mkdir()
        self.ctx.barrier()
        atomic_torch_save({"step": step, "rank": self.ctx.rank, **rank_state}, partial / f"rank-{self.ctx.rank:05d}.pt")
        if self.ctx.is_main:
            atomic_torch_save(trunk_state, partial / "trunk.pt")
        self.ctx.barrier()
        if self.ctx.is_main:
            meta = {"step": step, "world_size": self.ctx.world_size, "config_hash": config_hash(config), "config": config}
            atomic_write_text(json.dumps(meta, indent=1, sort_keys=True, default=str), partial / "meta.json")
            _fsync_dir(partial)
            if final.exists():  # a rerun of the same step replaces the old copy
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(self.root)
            for old in self.complete_steps()[: -self.keep_last]:
                shutil.rmtree(self._final_dir(old), ignore_errors=True)
        self.ctx.barrier()
        return final

    def load_latest(self, config: dict) -> tuple[int, dict, dict] | None:
        """(step, trunk_state, this rank's state) of the newest complete checkpoint, or None.

        Raises CheckpointMismatch (with a diff) when the config or the world size differs.
        """
        steps = self.complete_steps()
        # All ranks must agree on the step even if rank 0 pruned meanwhile: rank 0 decides.
        step = self.ctx.broadcast_object(steps[-1] if steps else None)
        if step is None:
            return None
        folder = self._final_dir(step)
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta["world_size"] != self.ctx.world_size:
            raise CheckpointMismatch(
                f"checkpoint {folder} was written by {meta['world_size']} ranks; this run has "
                f"{self.ctx.world_size}: resume with the same number of ranks"
            )
        if meta["config_hash"] != config_hash(config):
            diff = "\n  ".join(config_diff(meta["config"], config)) or "(hash differs)"
            raise CheckpointMismatch(f"checkpoint {folder} has another config; refusing to resume:\n  {diff}")
        trunk_state = _load(folder / "trunk.pt")
        rank_state = _load(folder / f"rank-{self.ctx.rank:05d}.pt")
        if rank_state.get("step") != step:
            raise CheckpointMismatch(f"{folder}/rank-{self.ctx.rank:05d}.pt holds step {rank_state.get('step')}, not {step}")
        return step, trunk_state, rank_state
