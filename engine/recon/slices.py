"""Readout shards and the per-shard stochastic slice sampler of the 3D engine.

The readout axis (x, length nx) is cut into `num_shards` contiguous slabs aligned to the chunk
grid of the input store, so that a shard reads and writes whole chunks only. A rank owns one or
more consecutive shards (normally exactly one: num_shards = world size). Every shard has its own
random stream, seeded from (seed, shard index), which draws the K readout positions of each step
and the prior's noise for those planes. The stream belongs to the shard, not to the rank: one
process holding shards 0 and 1 draws exactly what two ranks holding one shard each draw, which is
what lets the tests compare 2 ranks with 1 process, and makes a run independent of how its shards
are spread over ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# A prime stride between shard seeds, so seed s of shard 1 never equals seed s+1 of shard 0.
_SHARD_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Shard:
    """Readout positions [start, stop) of the global axis."""

    index: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def split_readout(nx: int, chunk_x: int, num_shards: int) -> list[Shard]:
    """Cut [0, nx) into `num_shards` contiguous, chunk-aligned slabs of near-equal size.

    Same rule as engine.io.slabs.partition_readout (whole chunks dealt out evenly, the first
    shards get one more when they do not divide); ValueError when there are fewer chunks than
    shards.
    """
    from engine.io.slabs import partition_readout

    slabs = partition_readout(nx, num_shards, chunk_x)
    return [Shard(index, start, stop) for index, (start, stop) in enumerate(slabs)]


def shards_of_rank(shards: list[Shard], rank: int, world_size: int) -> list[Shard]:
    """The consecutive shards rank `rank` owns (shards dealt out in contiguous blocks)."""
    if len(shards) % world_size != 0:
        raise ValueError(f"config key slices.num_shards: {len(shards)} shards cannot be shared by {world_size} "
                         f"ranks; use a multiple of the number of ranks (0: one shard per rank)")
    per_rank = len(shards) // world_size
    return shards[rank * per_rank : (rank + 1) * per_rank]


def shard_seed(seed: int, shard_index: int) -> int:
    return (seed + _SHARD_SEED_STRIDE * (shard_index + 1)) % (2**63)


class ShardSampler:
    """The random stream of one shard: K readout positions per step, and the prior's noise.

    Draws are without replacement inside the shard and returned as sorted global indices.
    The stream is a CPU torch.Generator, so it is identical on every device and its state is
    a plain tensor for checkpoints.
    """

    def __init__(self, shard: Shard, k: int, seed: int, contiguous: bool = False):
        if not 1 <= k <= shard.size:
            raise ValueError(f"config key slices.per_step: K={k} must be in [1, {shard.size}], the readout "
                             f"positions of shard {shard.index}")
        self.shard, self.k, self.contiguous = shard, k, contiguous
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(shard_seed(seed, shard.index))

    def draw(self) -> torch.Tensor:
        """K global readout indices, int64 (K,), sorted ascending.

        contiguous: K consecutive positions from a uniform start, wrapping around inside the shard
        (so every position is drawn with probability K / size); `neighbour_pairs` tells which
        drawn positions are readout neighbours.
        """
        if self.contiguous:
            start = int(torch.randint(self.shard.size, (1,), generator=self.generator))
            local = (start + torch.arange(self.k)) % self.shard.size
        else:
            local = torch.randperm(self.shard.size, generator=self.generator)[: self.k]
        return torch.sort(local).values + self.shard.start

    @staticmethod
    def neighbour_pairs(rows: torch.Tensor) -> torch.Tensor:
        """Indices i into sorted `rows` with rows[i + 1] == rows[i] + 1 (readout neighbours)."""
        return torch.nonzero(rows[1:] - rows[:-1] == 1).flatten()

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal float32 noise of `shape` from this shard's stream (CPU)."""
        return torch.randn(shape, generator=self.generator)

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        """U(0, 1) float32 of `shape` from this shard's stream (CPU)."""
        return torch.rand(shape, generator=self.generator)

    def state_dict(self) -> dict:
        return {"shard": self.shard.index, "k": self.k, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["shard"] != self.shard.index or state["k"] != self.k:
            raise ValueError(
                f"sampler state is for shard {state['shard']} with K={state['k']}, "
                f"not shard {self.shard.index} with K={self.k}"
            )
        self.generator.set_state(state["generator"])
