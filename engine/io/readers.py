"""`read_input`: one entry point that picks the reader by suffix, then by content."""
from __future__ import annotations

from pathlib import Path

import h5py

from engine.io import _hdf5
from engine.io.bart import cfl_base, read_bart
from engine.io.data import MulticoilData
from engine.io.errors import InputError
from engine.io.fastmri import read_fastmri
from engine.io.matlab import read_mat73
from engine.io.npy import read_npy
from engine.io.skmtea import read_skmtea

_NPY_MAGIC = b"\x93NUMPY"


def read_input(path: str | Path, slice_index: int | None = None, echo: int = 0) -> MulticoilData:
    """Read any supported multicoil k-space file into MulticoilData (engine/io/data.py layouts).

    Dispatch: `.cfl`/`.hdr` (or a base name with a .cfl beside it) -> BART; `.npy` -> NumPy;
    `.mat` -> MATLAB v7.3 coil images; HDF5 (`.h5`, `.hdf5` or any HDF5 content) with a 4D
    `kspace` -> fastMRI (`slice_index` picks one slice, None reads all), with a 5D `kspace` ->
    SKM-TEA-style (`echo` picks the echo). NIfTI is refused: it holds a magnitude image, not
    k-space (read it with engine.io.read_nifti and simulate coils with engine.physics).

    Raises:
        InputError: missing or unreadable file, unknown format, or content that fails validation.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]).lower() if path.name.lower().endswith(".nii.gz") \
        else path.suffix.lower()
    if suffix in (".cfl", ".hdr") or (not path.exists() and Path(str(path) + ".cfl").exists()):
        return read_bart(cfl_base(path) if suffix in (".cfl", ".hdr") else path)
    if suffix in (".nii", ".nii.gz"):
        raise InputError(path, "NIfTI holds a magnitude image, not multicoil k-space: read it with "
                         "engine.io.read_nifti and simulate coils with engine.physics")
    path = _hdf5.require_file(path)
    if suffix == ".npy":
        return read_npy(path)
    if suffix == ".mat":
        return read_mat73(path)
    if suffix in (".h5", ".hdf5") or h5py.is_hdf5(path):
        return _read_kspace_hdf5(path, slice_index, echo)
    with open(path, "rb") as handle:
        if handle.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
            return read_npy(path)
    raise InputError(path, "unknown format: expected .h5/.hdf5 (fastMRI or SKM-TEA), .cfl/.hdr "
                     "(BART), .npy or .mat (v7.3)")


def _read_kspace_hdf5(path: Path, slice_index: int | None, echo: int) -> MulticoilData:
    with _hdf5.open_hdf5(path) as handle:
        ndim = _hdf5.get_dataset(handle, "kspace", path).ndim
    if ndim == 4:
        return read_fastmri(path, slice_index)
    if ndim == 5:
        return read_skmtea(path, echo)
    raise InputError(path, f"expected 4 dims [slices, coils, kx, ky] (fastMRI) or 5 dims "
                     f"[x, ky, kz, echo, coil] (SKM-TEA), got {ndim}", "kspace")
