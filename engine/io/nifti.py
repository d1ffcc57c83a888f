"""NIfTI magnitude volumes (anatomy to simulate multicoil data from), read with nibabel."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.io._hdf5 import require_file
from engine.io.data import MagnitudeVolume, check_finite
from engine.io.errors import InputError


def read_nifti(path: str | Path) -> MagnitudeVolume:
    """Read a 3D magnitude volume: data float32 (x, y, z) in voxel order, affine (4, 4) float64.

    A trailing singleton 4th dim is dropped; other 4D volumes are refused. attrs: voxel_size_mm
    (from the header zooms), affine (nested list), datatype of the file.
    """
    import nibabel  # lazy: only volume readers need it

    path = require_file(path)
    try:
        image = nibabel.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib errors)
        raise InputError(path, f"cannot be read as NIfTI: {err}") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D volume, got shape {data.shape}", "data")
    check_finite(data, str(path), "data")
    affine = np.asarray(image.affine, dtype=np.float64)
    attrs = {"format": "nifti", "voxel_size_mm": [float(z) for z in image.header.get_zooms()[:3]],
             "affine": affine.tolist(), "file_datatype": str(image.get_data_dtype())}
    return MagnitudeVolume(data, affine, attrs, str(path))
