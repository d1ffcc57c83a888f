"""NumPy .npy k-space (the engine's convention): complex, coils first, centred, orthonormal."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.io._hdf5 import require_file
from engine.io.data import MulticoilData
from engine.io.errors import InputError


def read_npy(path: str | Path) -> MulticoilData:
    """Read `(coils, ny, nx)` (layout "2d") or `(coils, kx, ky, kz)` (layout "3d") complex k-space.

    Returns MulticoilData with kspace complex64; no maps, mask or reference (a .npy holds one array).
    """
    path = require_file(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(path, f"cannot be read as .npy (truncated or not NumPy): {err}") from err
    if array.ndim not in (3, 4):
        raise InputError(path, f"expected 3 dims (coils, ny, nx) or 4 dims (coils, kx, ky, kz), got "
                         f"{array.ndim} (shape {array.shape})", "kspace")
    if not np.iscomplexobj(array):
        raise InputError(path, f"must be complex, got {array.dtype}", "kspace")
    kspace = array.astype(np.complex64, copy=False)
    return MulticoilData(kspace, attrs={"format": "npy"}, source=str(path)).validate()
