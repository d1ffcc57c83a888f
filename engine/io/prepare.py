"""`prepare_case`: read a 3D case, attach coil maps, write the hybrid-space Zarr store.

The command line is launch/prepare.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.io.bart import read_cfl
from engine.io.data import check_finite, check_shape
from engine.io.errors import InputError
from engine.io.hybrid_store import prepare_hybrid_store
from engine.io.readers import read_input

MAPS_SOURCES = ("espirit", "file", "none")


def prepare_case(input_path: str | Path, out_path: str | Path, *, echo: int = 0, chunk_x: int = 8,
                 maps_from: str = "espirit", maps_path: str | Path | None = None,
                 calib_width: int = 24, overwrite: bool = False,
                 mask_path: str | Path | None = None,
                 voxel_size: tuple[float, float, float] | None = None) -> Path:
    """Convert a 3D multicoil case to a hybrid-space store (engine.io.hybrid_store).

    Args:
        input_path: any 3D input `read_input` accepts (SKM-TEA-style .h5, BART .cfl, .npy, .mat).
        out_path: the store to create; refused if it exists unless `overwrite`.
        echo: echo of a multi-echo file.
        chunk_x: readout positions per chunk (each rank reads whole chunks of its slab).
        maps_from: "espirit" (estimate from the calibration region of every readout position),
            "file" (maps of the input file, or `maps_path`), "none" (store without maps).
        maps_path: coil maps (coils, x, y, z) as .npy, or BART .cfl [x, y, z, coils]; implies "file".
        calib_width: ESPIRiT calibration width (phase-encode samples per axis).
        overwrite: replace an existing store.
        mask_path: sampling mask (ky, kz) 0/1 (.npy, .npz or .h5 dataset `mask`) applied to the
            input (retrospective undersampling of fully sampled data); default: the input's.
        voxel_size: (x, y, z) mm, stored as the acquisition attribute `voxel_size_mm` (the output
            volume's OME-Zarr scale); default: what the input's header says, if anything.
    """
    if maps_from not in MAPS_SOURCES:
        raise ValueError(f"maps_from must be one of {MAPS_SOURCES}, got {maps_from!r}")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:  # fail before reading a large input
        raise InputError(out_path, "output exists; pass overwrite=True (--overwrite) to replace it")
    data = read_input(input_path, echo=echo)
    if data.layout != "3d":
        raise InputError(data.source, f"prepare needs 3D k-space (coils, kx, ky, kz), got layout "
                         f"{data.layout!r} with shape {tuple(data.kspace.shape)}", "kspace")
    if voxel_size is not None:
        sizes = [float(v) for v in voxel_size]
        if len(sizes) != 3 or not all(np.isfinite(sizes)) or min(sizes) <= 0:
            raise ValueError(f"voxel size must be 3 positive numbers (x, y, z) in mm, got {voxel_size}")
        data.attrs["acquisition"] = {**(data.attrs.get("acquisition") or {}), "voxel_size_mm": sizes}
    mask = None
    if mask_path is not None:
        from engine.physics.masks import load_mask  # lazy: sigpy is heavy

        mask = load_mask(mask_path, data.mask_shape)
    maps, estimate = None, None
    if maps_path is not None:
        maps = read_maps(maps_path, expected_shape=data.kspace.shape)
    elif maps_from == "file" and data.maps is None:
        raise InputError(data.source, "no coil maps in the input (use --maps-from espirit, or "
                         "--maps FILE)", "maps")
    elif maps_from == "none":
        data.maps = None
    elif maps_from == "espirit":
        data.maps = None

        def estimate(hybrid: np.ndarray) -> np.ndarray:
            from engine.physics.coils import espirit_maps_hybrid  # lazy: sigpy is heavy

            return espirit_maps_hybrid(hybrid, calib_width=calib_width)

    return prepare_hybrid_store(data, out_path, maps=maps, mask=mask, chunk_x=chunk_x,
                                overwrite=overwrite, estimate_maps=estimate,
                                extra_attrs={"maps_from": "file" if maps_path else maps_from,
                                             "maps_path": str(maps_path) if maps_path else None,
                                             "mask_path": str(mask_path) if mask_path else None,
                                             "calib_width": calib_width, "echo": echo})


def read_maps(path: str | Path, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Coil maps (coils, x, y, z) complex64 from a .npy (coils first) or BART .cfl [x, y, z, coils].

    Refuses (InputError naming the maps file) real or non-4D arrays, NaN/Inf, and a shape other
    than `expected_shape` (the k-space's (coils, kx, ky, kz)) when given.
    """
    path = Path(path)
    if path.suffix in (".cfl", ".hdr"):
        maps = read_cfl(path)
        dims = list(maps.shape) + [1] * max(0, 4 - maps.ndim)
        if any(d != 1 for d in dims[4:]):
            raise InputError(path, f"expected BART dims [x, y, z, coils], got {dims}", "maps")
        maps = np.moveaxis(maps.reshape(dims[:4]), 3, 0)
    else:
        if not path.is_file():
            raise InputError(path, "file not found")
        try:
            maps = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise InputError(path, f"cannot be read as .npy: {err}") from err
    if not np.iscomplexobj(maps) or maps.ndim != 4:
        raise InputError(path, f"expected complex maps (coils, x, y, z), got {maps.dtype} "
                         f"{maps.shape}", "maps")
    if expected_shape is not None:
        check_shape(maps, expected_shape, str(path), "maps", "k-space (coils, x, y, z)")
    check_finite(maps, str(path), "maps")
    return np.ascontiguousarray(maps, dtype=np.complex64)
