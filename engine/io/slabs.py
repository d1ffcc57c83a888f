"""Split the readout axis into contiguous, chunk-aligned slabs, one per rank."""
from __future__ import annotations


def partition_readout(n_positions: int, world_size: int, chunk: int = 1) -> list[tuple[int, int]]:
    """Contiguous slabs [start, stop) of `n_positions` readout positions for `world_size` ranks.

    Slabs hold whole chunks of `chunk` positions (the last chunk may be short), so ranks writing
    their slabs into an array chunked by `chunk` never share a chunk. Chunks are dealt as evenly
    as possible; the first ranks get one more when they do not divide.

    Raises:
        ValueError: fewer chunks than ranks (some rank would get nothing).
    """
    if n_positions < 1 or world_size < 1 or chunk < 1:
        raise ValueError(f"need n_positions, world_size, chunk >= 1, got {n_positions}, "
                         f"{world_size}, {chunk}")
    n_chunks = -(-n_positions // chunk)
    if n_chunks < world_size:
        raise ValueError(f"{n_positions} readout positions in {n_chunks} chunks of {chunk} cannot be "
                         f"split over {world_size} ranks: every rank needs at least one chunk "
                         f"(use fewer ranks or a smaller chunk)")
    base, extra = divmod(n_chunks, world_size)
    slabs, first_chunk = [], 0
    for rank in range(world_size):
        count = base + (1 if rank < extra else 0)
        start, stop = first_chunk * chunk, min((first_chunk + count) * chunk, n_positions)
        slabs.append((start, stop))
        first_chunk += count
    return slabs
