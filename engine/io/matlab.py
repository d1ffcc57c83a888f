"""MATLAB v7.3 (HDF5) multicoil coil *images*, converted to centred k-space.

MATLAB stores arrays column-major, so h5py sees the axes reversed: a MATLAB array
(rows, cols, coils) appears as (coils, cols, rows). The reader restores MATLAB's order, takes the
last MATLAB axis as the coil axis (as in the phantom.mat of GitHub marcsous/parallel),
and returns k-space = fftc(coil images) over the spatial axes. Complex values are stored as a
compound with fields `real` and `imag`.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from engine.io import _hdf5
from engine.io.data import MulticoilData
from engine.io.errors import InputError
from engine.physics.fft import fftc

PREFERRED_NAMES = ("kspace_images", "images", "data", "img")


def read_mat73(path: str | Path, dataset: str | None = None) -> MulticoilData:
    """Read complex coil images from a v7.3 .mat file and return their centred k-space.

    Args:
        path: the .mat file (v7.3 = HDF5; older .mat files are refused with a hint).
        dataset: variable name; default: the only variable, or the first of PREFERRED_NAMES.

    Returns:
        MulticoilData: 3 MATLAB dims (rows, cols, coils) -> layout "2d" (coils, ny, nx);
        4 dims (x, y, z, coils) -> layout "3d" (coils, kx, ky, kz); attrs: format, variable.
    """
    source = str(path)
    path = _hdf5.require_file(path)
    if not h5py.is_hdf5(path):
        raise InputError(source, "not a MATLAB v7.3 (HDF5) file; re-save it in MATLAB with "
                         "save(..., '-v7.3')")
    with _hdf5.open_hdf5(path) as handle:
        variables = [k for k, v in handle.items() if isinstance(v, h5py.Dataset) and not k.startswith("#")]
        name = dataset or _pick_variable(variables, source)
        node = _hdf5.get_dataset(handle, name, source)
        images = _hdf5.to_complex64(_hdf5.read(node, source), source, name)
    if images.ndim not in (3, 4):
        raise InputError(source, f"expected 3 MATLAB dims (rows, cols, coils) or 4 (x, y, z, coils), "
                         f"got shape {images.shape[::-1]} (MATLAB order)", name)
    images = np.moveaxis(images.transpose(), -1, 0)  # MATLAB order, then coils first
    spatial = tuple(range(1, images.ndim))
    kspace = fftc(torch.from_numpy(np.ascontiguousarray(images)), dims=spatial).numpy()
    attrs = {"format": "mat73", "variable": name, "content": "coil images converted with fftc"}
    return MulticoilData(kspace, attrs=attrs, source=source).validate()


def _pick_variable(variables: list[str], source: str) -> str:
    if len(variables) == 1:
        return variables[0]
    for name in PREFERRED_NAMES:
        if name in variables:
            return name
    raise InputError(source, f"cannot tell which variable holds the coil images ({', '.join(variables) or 'none'}); "
                     "pass dataset=")
