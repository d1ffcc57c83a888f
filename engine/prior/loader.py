"""Training batches drawn ahead in worker processes (`train.loader_workers` > 0).

The patch sampler is CPU work, one patch at a time; on a GPU it bounds the trainer (about 230 patches
per second in one process on an H200 machine: the shipped prior's stage 3, engine/assets/prior). With workers,
the batch of step s on rank r comes from its own generator seeded by (seed, rank, s): the batches do
not depend on how many workers draw them, and a resumed run draws exactly the batches that an
uninterrupted one would have (no stream state to save). `loader_workers: 0` keeps the single stream
of engine.prior.train (each rank's generator, saved with the checkpoints), which the shipped prior's
stages were trained with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from engine.prior.data import PatchSampler

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def step_seed(seed: int, rank: int, step: int) -> int:
    """A well-mixed 63-bit seed of (seed, rank, step): neighbouring steps and ranks get unrelated streams."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class StepBatches(Dataset):
    """Item s: step s's batch, `draw(sampler, batch_size, generator)` with the generator of (seed, rank, s)."""

    def __init__(self, sampler: PatchSampler, batch_size: int, seed: int, rank: int,
                 draw: Callable[[PatchSampler, int, torch.Generator], Batch]):
        self.sampler, self.batch_size, self.seed, self.rank, self.draw = sampler, batch_size, seed, rank, draw

    def __len__(self) -> int:  # steps are addressed directly; the loader's sampler says which
        return 2**62

    def __getitem__(self, step: int) -> Batch:
        generator = torch.Generator().manual_seed(step_seed(self.seed, self.rank, step))
        return self.draw(self.sampler, self.batch_size, generator)


def step_batches(batches: StepBatches, start: int, stop: int, workers: int, prefetch: int = 4) -> Iterator[Batch]:
    """Steps start..stop-1's batches in order, drawn by `workers` processes, `prefetch` steps ahead each."""
    loader = DataLoader(batches, batch_size=None, sampler=range(start, stop), num_workers=workers,
                        prefetch_factor=prefetch if workers > 0 else None)
    return iter(loader)


__all__ = ["StepBatches", "step_batches", "step_seed"]
