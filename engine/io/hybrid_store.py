"""The hybrid-space Zarr input store of a 3D case, chunked along the readout so ranks read slabs.

3D Cartesian data are fully sampled along the readout kx, so one centred 1D iFFT along kx turns
k-space (coils, kx, ky, kz) into hybrid space (x, coils, ky, kz), in which every readout
position x is an independent 2D multicoil problem on the (ky, kz) plane (docs/ARCHITECTURE.md, "Design").

Store layout (Zarr format 3, one group):
    kspace     (x, coils, ky, kz) complex64, chunks (chunk_x, coils, ky, kz)
    maps       (x, coils, y, z)   complex64, chunks (chunk_x, coils, y, z)   (optional)
    mask       (ky, kz)           float32 0/1, one chunk
    reference  (x, y, z)          complex64 or float32, chunks (chunk_x, y, z) (optional)
    attrs["infusion_hybrid"]: format, format_version, convention, shape, chunk_x, source,
        acquisition, mask / maps / reference provenance, reader attrs.
The k-space stored is zero outside the mask (a supplied mask is applied to fully sampled data).
Every array has the fill value NaN and every chunk is stored, so a chunk missing from a truncated
or partly copied store reads as NaN and is refused by name instead of passing as zero k-space.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import zarr

from engine.io._hdf5 import json_friendly
from engine.io._paths import atomic_directory, refuse_existing
from engine.io.data import (
    MulticoilData,
    check_complex,
    check_finite,
    check_mask,
    check_shape,
    derive_mask,
)
from engine.io.errors import InputError
from engine.physics.fft import ifftc

ATTRS_KEY = "infusion_hybrid"
FORMAT_NAME = "infusion-hybrid-kspace"
FORMAT_VERSION = 1
CONVENTION = ("kspace (x, coils, ky, kz) complex64 = engine.physics.fft.ifftc along kx of centred "
              "orthonormal k-space (coils, kx, ky, kz), transposed; maps (x, coils, y, z) complex64; "
              "mask (ky, kz) float32 0/1 shared by every x; reference (x, y, z); chunked along x only")

MapsEstimator = Callable[[np.ndarray], np.ndarray]


def to_hybrid(kspace: np.ndarray) -> np.ndarray:
    """Centred 1D iFFT along kx: (coils, kx, ky, kz) -> hybrid (x, coils, ky, kz) complex64.

    One coil at a time, so the peak memory is the input plus the output plus one coil volume.
    """
    coils, nx, ny, nz = kspace.shape
    hybrid = np.empty((nx, coils, ny, nz), dtype=np.complex64)
    for coil in range(coils):
        volume = torch.from_numpy(np.ascontiguousarray(kspace[coil], dtype=np.complex64))
        hybrid[:, coil] = ifftc(volume, dims=(0,)).numpy()
    return hybrid


def rss_reference(hybrid: np.ndarray, block: int = 8) -> np.ndarray:
    """Root-sum-of-squares image (x, y, z) float32 of fully sampled hybrid k-space (x, coils, ky, kz)."""
    out = np.empty((hybrid.shape[0],) + hybrid.shape[2:], dtype=np.float32)
    for start in range(0, hybrid.shape[0], block):
        coil_images = ifftc(torch.from_numpy(hybrid[start:start + block]), dims=(-2, -1))
        out[start:start + block] = coil_images.abs().square().sum(dim=1).sqrt().numpy()
    return out


def prepare_hybrid_store(data: MulticoilData, out_path: str | Path, maps: np.ndarray | None = None,
                         mask: np.ndarray | None = None, chunk_x: int = 8, overwrite: bool = False,
                         estimate_maps: MapsEstimator | None = None,
                         extra_attrs: dict | None = None) -> Path:
    """Convert a 3D case to the hybrid-space store at `out_path` (written atomically).

    Args:
        data: layout "3d" MulticoilData (kspace (coils, kx, ky, kz)).
        out_path: the store directory to create; refused if it exists unless `overwrite`.
        maps: coil maps (coils, x, y, z) complex; default `data.maps`.
        mask: sampling mask (ky, kz) 0/1; default `data.mask`, else derived from the non-zero
            samples (and checked to be the same at every readout position). A mask given for
            fully sampled k-space is applied (retrospective undersampling), and the RSS image of
            the fully sampled data becomes the reference if the input has none.
        chunk_x: readout positions per chunk.
        overwrite: replace an existing store.
        estimate_maps: called as `estimate_maps(hybrid)` with the masked hybrid k-space
            (x, coils, ky, kz) when no maps are given; must return maps (x, coils, y, z).
        extra_attrs: merged into the store attributes under "extra".

    Returns:
        The path of the store. Peak memory is about twice the k-space.
    """
    out_path = Path(out_path)
    source = data.source or "<memory>"
    if data.layout != "3d":
        raise InputError(source, f"the hybrid store needs 3D k-space (coils, kx, ky, kz), got layout "
                         f"{data.layout!r} with shape {tuple(data.kspace.shape)}", "kspace")
    if chunk_x < 1:
        raise ValueError(f"chunk_x must be >= 1, got {chunk_x}")
    refuse_existing(out_path, overwrite)  # before any long work
    data.validate()
    coils, nx, ny, nz = data.kspace.shape

    maps_origin = "argument" if maps is not None else ("input" if data.maps is not None else None)
    maps = maps if maps is not None else data.maps
    if maps is not None:
        check_complex(maps, source, "maps")
        check_shape(maps, data.kspace.shape, source, "maps", "k-space (coils, x, y, z)")
        check_finite(maps, source, "maps")

    sampled = derive_mask(data.kspace, "3d", source)  # also checks the pattern is kx-independent
    mask_origin = "argument" if mask is not None else ("input" if data.mask is not None else "derived")
    mask = check_mask(mask if mask is not None else (data.mask if data.mask is not None else sampled),
                      (ny, nz), source, "mask")
    retrospective = bool(np.any((sampled > 0) & (mask == 0)))
    # A position without data cannot have been sampled (e.g. the corners of elliptical scanning).
    without_data = int(np.count_nonzero((mask > 0) & (sampled == 0)))
    if without_data:
        mask = check_mask(mask * sampled, (ny, nz), source, "mask")

    hybrid = to_hybrid(data.kspace)
    reference, reference_kind = data.reference, ("input" if data.reference is not None else None)
    if reference is None and retrospective and sampled.all():
        reference, reference_kind = rss_reference(hybrid), "rss_of_fully_sampled_input"
    if retrospective:
        hybrid *= mask  # masking commutes with the kx iFFT: the mask does not depend on kx
    if maps is not None:
        maps_hybrid = np.ascontiguousarray(np.moveaxis(maps, 0, 1), dtype=np.complex64)
    elif estimate_maps is not None:
        maps_hybrid, maps_origin = np.asarray(estimate_maps(hybrid)), "estimated"
        check_shape(maps_hybrid, hybrid.shape, source, "maps", "hybrid k-space (x, coils, y, z)")
        check_finite(maps_hybrid, source, "maps")
        maps_hybrid = maps_hybrid.astype(np.complex64, copy=False)
    else:
        maps_hybrid = None
    if reference is not None:
        check_shape(reference, (nx, ny, nz), source, "reference", "the image grid (x, y, z)")

    attrs = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "convention": CONVENTION,
        "shape": {"x": nx, "coils": coils, "ky": ny, "kz": nz}, "chunk_x": int(chunk_x),
        "source": source, "acquisition": json_friendly(data.attrs.get("acquisition", {})),
        "mask": {"origin": mask_origin, "retrospectively_applied": retrospective,
                 "sampled_fraction": float(mask.mean()),
                 "positions_without_data_dropped": without_data, "acceleration": float(mask.size / mask.sum())},
        "maps": {"present": maps_hybrid is not None, "origin": maps_origin},
        "reference": {"present": reference is not None, "kind": reference_kind},
        "reader_attrs": json_friendly(data.attrs),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "extra": json_friendly(extra_attrs or {}),
    }
    with atomic_directory(out_path, overwrite) as temporary:
        group = zarr.open_group(temporary, mode="w-", zarr_format=3)
        _write(group, "kspace", hybrid, (chunk_x, coils, ny, nz))
        if maps_hybrid is not None:
            _write(group, "maps", maps_hybrid, (chunk_x, coils, ny, nz))
        _write(group, "mask", mask, mask.shape)
        if reference is not None:
            dtype = np.complex64 if np.iscomplexobj(reference) else np.float32
            _write(group, "reference", np.asarray(reference, dtype=dtype), (chunk_x, ny, nz))
        group.attrs[ATTRS_KEY] = attrs  # last: a store without it is refused by HybridStore
    return out_path


def _write(group: zarr.Group, name: str, array: np.ndarray, chunks: tuple[int, ...]) -> None:
    chunks = tuple(min(c, s) for c, s in zip(chunks, array.shape))
    # Fill NaN: an absent chunk (truncated copy) must not read as valid zeros. The data are
    # checked finite before writing, so every chunk differs from the fill value and is stored.
    target = group.create_array(name, shape=array.shape, chunks=chunks, dtype=array.dtype,
                                fill_value=np.nan)
    target[...] = array


@dataclass
class HybridSlab:
    """Readout positions [x_start, x_stop) of a hybrid store.

    Attributes:
        kspace: (n, coils, ky, kz) complex64.
        maps: (n, coils, y, z) complex64, or None if the store has none.
        reference: (n, y, z), or None.
    """

    x_start: int
    x_stop: int
    kspace: np.ndarray
    maps: np.ndarray | None
    reference: np.ndarray | None


def voxel_size_from_acquisition(acquisition: dict, image_shape: tuple[int, int, int],
                                source: str = "") -> tuple[float, float, float] | None:
    """(x, y, z) voxel size in mm from a store's acquisition attributes, or None if not recorded.

    Read from `voxel_size_mm` (3 positive numbers), else from a field of view `recon_fov_mm` /
    `encoded_fov_mm` whose matrix (`recon_matrix` / `encoded_matrix`) is the image grid.
    A malformed `voxel_size_mm` raises InputError naming `source`.
    """
    given = acquisition.get("voxel_size_mm")
    if given is not None:
        try:
            sizes = tuple(float(v) for v in given)
        except (TypeError, ValueError):
            sizes = ()
        if len(sizes) != 3 or not all(np.isfinite(sizes)) or min(sizes) <= 0:
            raise InputError(source, f"acquisition attribute voxel_size_mm must be 3 positive numbers "
                             f"(x, y, z), got {given!r}")
        return sizes
    for space in ("recon", "encoded"):
        fov, matrix = acquisition.get(f"{space}_fov_mm"), acquisition.get(f"{space}_matrix")
        if fov is not None and matrix is not None and [int(m) for m in matrix] == list(image_shape):
            return tuple(float(f) / int(m) for f, m in zip(fov, matrix))
    return None


class HybridStore:
    """Read-only view of a hybrid-space store; validates it on opening, reads slabs on demand.

    Args:
        path: the store directory, or a zarr Store object (e.g. a wrapper that counts reads).
    """

    def __init__(self, path: str | Path | zarr.abc.store.Store):
        is_store = isinstance(path, zarr.abc.store.Store)
        self.path = str(path)
        if not is_store and not Path(path).exists():
            raise InputError(self.path, "Zarr store not found")
        try:
            self._group = zarr.open_group(store=path, mode="r")
        except Exception as err:  # zarr raises many types for a broken store
            raise InputError(self.path, f"cannot be read as a Zarr group: {err}") from err
        self.attrs: dict = dict(self._group.attrs.get(ATTRS_KEY) or {})
        self._validate()
        self._mask: np.ndarray | None = None

    def _array(self, name: str, required: bool = True) -> zarr.Array | None:
        try:
            node = self._group.get(name)
        except Exception as err:
            raise InputError(self.path, f"cannot be read: {err}", name) from err
        if node is None and required:
            raise InputError(self.path, "array not found (incomplete or not a hybrid store)", name)
        if node is not None and not isinstance(node, zarr.Array):
            raise InputError(self.path, "is a group, expected an array", name)
        return node

    def _validate(self) -> None:
        if self.attrs.get("format") != FORMAT_NAME:
            raise InputError(self.path, f"not an engine hybrid store (attribute {ATTRS_KEY!r} "
                             f"missing: written by another tool or interrupted)")
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise InputError(self.path, f"format version {self.attrs.get('format_version')} is not "
                             f"the supported {FORMAT_VERSION}; rerun launch/prepare.py")
        self._kspace = self._array("kspace")
        if self._kspace.ndim != 4 or self._kspace.dtype != np.complex64:
            raise InputError(self.path, f"expected (x, coils, ky, kz) complex64, got shape "
                             f"{self._kspace.shape} {self._kspace.dtype}", "kspace")
        nx, coils, ny, nz = self._kspace.shape
        self._maps = self._array("maps", required=False)
        if self._maps is not None and tuple(self._maps.shape) != (nx, coils, ny, nz):
            raise InputError(self.path, f"shape {self._maps.shape} disagrees with k-space: expected "
                             f"{(nx, coils, ny, nz)}", "maps")
        self._reference = self._array("reference", required=False)
        if self._reference is not None and tuple(self._reference.shape) != (nx, ny, nz):
            raise InputError(self.path, f"shape {self._reference.shape} disagrees with k-space: "
                             f"expected {(nx, ny, nz)}", "reference")
        mask = self._array("mask")
        if tuple(mask.shape) != (ny, nz):
            raise InputError(self.path, f"shape {mask.shape} disagrees with k-space: expected "
                             f"{(ny, nz)}", "mask")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(x, coils, ky, kz)."""
        return tuple(int(s) for s in self._kspace.shape)

    @property
    def voxel_size_mm(self) -> tuple[float, float, float] | None:
        """(x, y, z) voxel size in mm from the acquisition attributes; None when not recorded."""
        nx, _, ny, nz = self.shape
        return voxel_size_from_acquisition(self.attrs.get("acquisition") or {}, (nx, ny, nz), self.path)

    @property
    def n_readout(self) -> int:
        return self.shape[0]

    @property
    def n_coils(self) -> int:
        return self.shape[1]

    @property
    def plane_shape(self) -> tuple[int, int]:
        """(ky, kz), the phase-encode plane of every readout position."""
        return self.shape[2], self.shape[3]

    @property
    def chunk_x(self) -> int:
        return int(self._kspace.chunks[0])

    @property
    def has_maps(self) -> bool:
        return self._maps is not None

    @property
    def has_reference(self) -> bool:
        return self._reference is not None

    @property
    def mask(self) -> np.ndarray:
        """(ky, kz) float32 0/1, read once and validated."""
        if self._mask is None:
            values = _read_array(self._array("mask"), ..., self.path, "mask")
            if values.size and np.isnan(values).all():
                raise InputError(self.path, "no stored chunk (the store is truncated or was copied "
                                 "in part)", "mask")
            self._mask = check_mask(values, self.plane_shape, self.path, "mask")
        return self._mask

    def read_slab(self, x_start: int, x_stop: int, check_values: bool = True) -> HybridSlab:
        """Read readout positions [x_start, x_stop): only the chunks that overlap them are fetched.

        With `check_values`, NaN/Inf in the slab's k-space or maps, and readout positions whose
        chunk is absent from the store (they read as the fill value NaN), raise InputError; a
        chunk that cannot be decoded always does.
        """
        if not 0 <= x_start < x_stop <= self.n_readout:
            raise ValueError(f"slab [{x_start}, {x_stop}) outside the readout range "
                             f"[0, {self.n_readout}) of {self.path}")
        where = f"{self.path} [x {x_start}:{x_stop}]"
        rows = slice(x_start, x_stop)
        kspace = _read_array(self._kspace, rows, where, "kspace")
        maps = _read_array(self._maps, rows, where, "maps") if self._maps is not None else None
        reference = (_read_array(self._reference, rows, where, "reference")
                     if self._reference is not None else None)
        if check_values:
            for name, values in (("kspace", kspace), ("maps", maps), ("reference", reference)):
                if values is not None:
                    _check_chunks_present(values, x_start, where, name)
            check_finite(kspace, where, "kspace")
            if maps is not None:
                check_finite(maps, where, "maps")
        return HybridSlab(x_start, x_stop, kspace, maps, reference)

    def __repr__(self) -> str:
        return (f"HybridStore({self.path!r}, shape(x, coils, ky, kz)={self.shape}, "
                f"chunk_x={self.chunk_x}, maps={self.has_maps}, reference={self.has_reference})")


def _read_array(array: zarr.Array, selection, where: str, name: str) -> np.ndarray:
    """array[selection]; a chunk that cannot be decoded (truncated file) becomes InputError."""
    try:
        return array[selection]
    except Exception as err:  # codecs raise RuntimeError / ValueError for truncated bytes
        raise InputError(where, f"read failed (truncated or corrupt chunk?): {err}", name) from err


def _check_chunks_present(values: np.ndarray, x_start: int, where: str, name: str) -> None:
    """Refuse readout positions whose values are all NaN: the fill value of an absent chunk."""
    per_position = np.isnan(values.reshape(values.shape[0], -1)).all(axis=1)
    if per_position.any():
        missing = np.flatnonzero(per_position) + x_start
        raise InputError(where, f"no stored chunk for {missing.size} readout positions (x "
                         f"{missing[0]}..{missing[-1]}): the store is truncated or was copied in "
                         f"part", name)
