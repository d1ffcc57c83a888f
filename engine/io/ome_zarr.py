"""OME-Zarr (NGFF 0.4) output volume, written in parallel by ranks, completion marker last.

Layout (Zarr format 2, as NGFF 0.4 requires; '/' chunk-key separator):
    <out>/.zattrs     multiscales (NGFF 0.4): one image "magnitude", axes x, y, z (space; unit
                      millimeter and the voxel size as scale when the input store records it,
                      else scale 1 and no unit), one scale level whose dataset path is
                      "magnitude"; plus "infusion": format,
                      shape, chunk_x, user attrs, metrics, and "complete" (the marker).
    <out>/magnitude   (x, y, z) float32, chunks (chunk_x, y, z)   <- what NGFF viewers show
    <out>/complex     (x, y, z) complex64, same chunks            <- the reconstruction itself

Choice: complex data are one native complex64 array beside the NGFF image rather than a
real/imag channel pair, because every Zarr reader returns it as complex without reassembly;
viewers (napari, via napari-ome-zarr) open the root and show the magnitude, with a slider along
x (the readout) and the phase-encode (y, z) plane on screen.

Collective use (the barriers are the caller's business):
    rank 0: writer = VolumeWriter(path, shape, chunk_x, overwrite=..., rank=0)   # creates
    barrier()
    others: writer = VolumeWriter(path, shape, chunk_x, rank=r)  # or VolumeWriter.open_for_write(path)
    every rank: writer.write_slab(x_start, slab) for its own chunk-aligned slab (no gather)
    barrier()
    rank 0: writer.finalize(metrics)   # checks every chunk was written, then writes the marker
An interrupted run leaves "complete": false, and `open_volume` refuses it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from engine.io._hdf5 import json_friendly
from engine.io._paths import is_zarr_store, refuse_existing, remove_tree
from engine.io.errors import InputError

NGFF_VERSION = "0.4"
ATTRS_KEY = "infusion"
FORMAT_NAME = "infusion-volume"
FORMAT_VERSION = 1
ARRAY_NAMES = ("magnitude", "complex")


def ngff_multiscales(voxel_size: Sequence[float] | None, name: str = "magnitude") -> list[dict]:
    """NGFF 0.4 `multiscales` metadata for one (x, y, z) scale level stored at path `name`.

    voxel_size: (x, y, z) in mm; None when the acquisition did not record it: the scale is then 1
    and the axes carry no unit, so a viewer shows voxels rather than a made-up physical size.
    """
    unit = {} if voxel_size is None else {"unit": "millimeter"}
    scale = [1.0, 1.0, 1.0] if voxel_size is None else [float(v) for v in voxel_size]
    return [{
        "version": NGFF_VERSION,
        "name": name,
        "axes": [{"name": axis, "type": "space", **unit} for axis in "xyz"],
        "datasets": [{"path": name, "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        "type": "none",
        "metadata": {"description": "INFusion reconstruction magnitude; complex64 data in the "
                                    "sibling array 'complex'"},
    }]


class VolumeWriter:
    """Writer of one output volume (x, y, z), chunked along x, shared by all ranks.

    Args:
        path: the output directory (`*.zarr`).
        shape: (x, y, z).
        chunk_x: readout positions per chunk; each rank's slabs must be chunk-aligned.
        overwrite: rank 0 only: replace an existing output (it is deleted first, so no stale
            completion marker survives); without it an existing path is refused.
        rank: 0 creates the store; any other rank opens the one rank 0 created (after a barrier)
            and checks that shape and chunk_x agree.
        voxel_size: (x, y, z) in mm for the NGFF scale transform; None: unknown (scale 1, no unit).
        attrs: JSON-friendly attributes stored under "infusion" (config, source, ...), rank 0 only.
    """

    def __init__(self, path: str | Path, shape: Sequence[int], chunk_x: int, overwrite: bool = False,
                 *, rank: int = 0, voxel_size: Sequence[float] | None = None,
                 attrs: dict | None = None):
        self.path = Path(path)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1 or chunk_x < 1:
            raise ValueError(f"need a 3D shape (x, y, z) and chunk_x >= 1, got {shape}, {chunk_x}")
        if rank == 0:
            group = _create(self.path, shape, int(chunk_x), overwrite, voxel_size, attrs or {})
        else:
            group = _open_for_write(self.path)
            found = (tuple(group["complex"].shape), int(group["complex"].chunks[0]))
            if found != (shape, int(chunk_x)):
                raise ValueError(f"{self.path}: rank {rank} expects shape {shape} chunk_x {chunk_x}, "
                                 f"the store has shape {found[0]} chunk_x {found[1]}")
        self._attach(group)

    @classmethod
    def create(cls, path: str | Path, shape: Sequence[int], chunk_x: int, overwrite: bool = False,
               voxel_size: Sequence[float] | None = None,
               attrs: dict | None = None) -> VolumeWriter:
        """Rank 0: create the store (then barrier before the others open it)."""
        return cls(path, shape, chunk_x, overwrite, rank=0, voxel_size=voxel_size, attrs=attrs)

    @classmethod
    def open_for_write(cls, path: str | Path) -> VolumeWriter:
        """Ranks > 0: open the store rank 0 created; shape and chunk_x are read from it."""
        writer = cls.__new__(cls)
        writer.path = Path(path)
        writer._attach(_open_for_write(writer.path))
        return writer

    def _attach(self, group: zarr.Group) -> None:
        self._group = group
        self._complex = group["complex"]
        self._magnitude = group["magnitude"]
        self.shape: tuple[int, int, int] = tuple(int(s) for s in self._complex.shape)
        self.chunk_x: int = int(self._complex.chunks[0])

    def write_slab(self, x_start: int, volume_slab: np.ndarray) -> None:
        """Write readout positions [x_start, x_start + n) from `volume_slab` (n, y, z) complex.

        The slab must start on a chunk boundary and end on one or at the end of the volume, so
        no two ranks ever write the same chunk. Accepts NumPy arrays or CPU torch tensors.
        """
        slab = np.asarray(volume_slab).astype(np.complex64, copy=False)
        x_stop = x_start + (slab.shape[0] if slab.ndim == 3 else 0)
        if slab.ndim != 3 or tuple(slab.shape[1:]) != self.shape[1:]:
            raise ValueError(f"{self.path}: slab shape {slab.shape} does not fit (n, y, z) with "
                             f"(y, z) = {self.shape[1:]}")
        if not 0 <= x_start < x_stop <= self.shape[0]:
            raise ValueError(f"{self.path}: slab [{x_start}, {x_stop}) outside [0, {self.shape[0]})")
        if x_start % self.chunk_x or (x_stop % self.chunk_x and x_stop != self.shape[0]):
            raise ValueError(f"{self.path}: slab [{x_start}, {x_stop}) is not aligned to chunks of "
                             f"{self.chunk_x}: ranks sharing a chunk would overwrite each other")
        if not np.isfinite(slab).all():
            raise ValueError(f"{self.path}: slab [{x_start}, {x_stop}) holds NaN/Inf; not written")
        self._complex[x_start:x_stop] = slab
        self._magnitude[x_start:x_stop] = np.abs(slab)

    def chunks_written(self) -> tuple[int, int]:
        """(chunks present, chunks expected) over both arrays."""
        return (sum(self._group[name].nchunks_initialized for name in ARRAY_NAMES),
                sum(self._group[name].nchunks for name in ARRAY_NAMES))

    def finalize(self, metrics: dict | None = None) -> None:
        """Rank 0, after every rank has written: store metrics, then the completion marker, last.

        Raises RuntimeError (and writes no marker) if any chunk of either array is missing.
        """
        present, expected = self.chunks_written()
        if present != expected:
            raise RuntimeError(f"{self.path}: only {present} of {expected} chunks written; some rank "
                               f"did not write its slab, the output stays marked incomplete")
        group = zarr.open_group(self.path, mode="r+")
        info = dict(group.attrs[ATTRS_KEY])
        info["metrics"] = json_friendly(metrics or {})
        group.attrs[ATTRS_KEY] = info
        info["complete"] = True
        group.attrs[ATTRS_KEY] = info  # the marker: a separate, final metadata write


def _create(path: Path, shape: tuple[int, int, int], chunk_x: int, overwrite: bool,
            voxel_size: Sequence[float] | None, attrs: dict) -> zarr.Group:
    refuse_existing(path, overwrite)
    if path.exists():
        if not is_zarr_store(path):
            raise InputError(path, "exists and is not a Zarr store; refusing to delete it")
        remove_tree(path)  # delete first: a half-rewritten store must not keep an old marker
    group = zarr.open_group(path, mode="w-", zarr_format=2)
    group.attrs.update({
        "multiscales": ngff_multiscales(voxel_size),
        ATTRS_KEY: {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "complete": False,
                    "shape_xyz": list(shape), "chunk_x": chunk_x,
                    "voxel_size_mm": None if voxel_size is None else [float(v) for v in voxel_size],
                    "arrays": {"magnitude": "float32 |complex|, the NGFF image",
                               "complex": "complex64 reconstruction (x, y, z)"},
                    "attrs": json_friendly(attrs)},
    })
    for name, dtype in zip(ARRAY_NAMES, ("float32", "complex64")):
        group.create_array(name, shape=shape, chunks=(min(chunk_x, shape[0]),) + shape[1:],
                           dtype=dtype, fill_value=0,
                           chunk_key_encoding={"name": "v2", "separator": "/"},
                           # every chunk is stored even if all zero, so finalize can count them
                           config={"write_empty_chunks": True})
    return group


def _open_group(path: Path, mode: str) -> zarr.Group:
    if not path.exists():
        raise InputError(path, "output volume not found")
    try:
        return zarr.open_group(path, mode=mode)
    except Exception as err:  # zarr raises many types for broken metadata
        raise InputError(path, f"cannot be read as a Zarr group: {err}") from err


def _info(path: Path, group: zarr.Group) -> dict:
    info = group.attrs.get(ATTRS_KEY)
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise InputError(path, f"not an engine output volume (attribute {ATTRS_KEY!r} missing)")
    for name in ARRAY_NAMES:
        if not isinstance(group.get(name), zarr.Array):
            raise InputError(path, "array missing", name)
    return info


def _open_for_write(path: Path) -> zarr.Group:
    group = _open_group(path, "r+")
    if _info(path, group).get("complete"):
        raise InputError(path, "output is already complete; refusing to write into it")
    return group


@dataclass
class OutputVolume:
    """A complete output volume, opened lazily (zarr arrays; slice them to read).

    Attributes:
        magnitude: zarr array (x, y, z) float32.
        complex: zarr array (x, y, z) complex64.
        attrs: the "infusion" attributes (metrics under "metrics").
        multiscales: the NGFF metadata.
    """

    path: Path
    magnitude: zarr.Array
    complex: zarr.Array
    attrs: dict = field(default_factory=dict)
    multiscales: list = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.complex.shape)

    @property
    def metrics(self) -> dict:
        return dict(self.attrs.get("metrics", {}))


def open_volume(path: str | Path) -> OutputVolume:
    """Open a finished output read-only; an incomplete one (no marker) raises InputError."""
    path = Path(path)
    group = _open_group(path, "r")
    info = _info(path, group)
    if info.get("complete") is not True:
        raise InputError(path, "output is incomplete (no completion marker): the run writing it was "
                         "interrupted or is still running")
    return OutputVolume(path, group["magnitude"], group["complex"], dict(info),
                        list(group.attrs.get("multiscales", [])))
