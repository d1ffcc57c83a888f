"""fastMRI multicoil HDF5 reader (facebookresearch/fastMRI layout).

File layout: `kspace` complex64 [slices, coils, kx, ky] (rows = readout kx, columns = phase
encode ky; centred), `ismrmrd_header` (XML string), optional `mask` [ky] (test / challenge
files), optional `reconstruction_rss` [slices, h, w] (cropped magnitude), file attributes
(`acquisition`, `max`, `norm`, `patient_id`).

In memory (engine/io/data.py): one slice -> layout "2d", kspace (coils, ny, nx) with ny = kx of
the file (rows stay rows); all slices -> layout "2d-stack" (slices, coils, ny, nx). A 1D mask
[ky] becomes the 2D mask (ny, nx) broadcast along the readout rows.
"""
from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from engine.io import _hdf5
from engine.io.data import MulticoilData
from engine.io.errors import InputError


def read_fastmri(path: str | Path, slice_index: int | None = None) -> MulticoilData:
    """Read one slice (`slice_index`) or all slices of a fastMRI multicoil file.

    Returns:
        MulticoilData with kspace complex64 (coils, ny, nx) for one slice, (slices, coils, ny, nx)
        for all; mask float32 (ny, nx) if the file has one; reference = `reconstruction_rss`
        (h, w) / (slices, h, w) float32 if present; attrs: format, ismrmrd_header (str),
        acquisition (parsed matrix sizes and FOV), file_attrs, slice_index, n_slices.
    """
    source = str(path)
    with _hdf5.open_hdf5(path) as handle:
        dataset = _hdf5.get_dataset(handle, "kspace", source)
        if dataset.ndim != 4:
            raise InputError(source, f"expected 4 dims [slices, coils, kx, ky], got {dataset.ndim} "
                             f"(shape {dataset.shape})", "kspace")
        n_slices = dataset.shape[0]
        if slice_index is not None and not -n_slices <= slice_index < n_slices:
            raise InputError(source, f"slice index {slice_index} out of range for {n_slices} slices",
                             "kspace")
        selection = (slice_index,) if slice_index is not None else ()
        kspace = _hdf5.to_complex64(_hdf5.read(dataset, source, selection), source, "kspace")

        header = None
        if "ismrmrd_header" in handle:
            header = _hdf5.json_friendly(_hdf5.read(handle["ismrmrd_header"], source))
        mask = None
        if "mask" in handle:
            mask = _mask_2d(_hdf5.read(handle["mask"], source), kspace.shape[-2:], source)
        reference = None
        if "reconstruction_rss" in handle:
            reference = _hdf5.read(handle["reconstruction_rss"], source, selection).astype(np.float32)
        attrs = {
            "format": "fastmri",
            "ismrmrd_header": header,
            "acquisition": parse_ismrmrd_header(header) if isinstance(header, str) else {},
            "file_attrs": _hdf5.file_attrs(handle),
            "slice_index": slice_index,
            "n_slices": int(n_slices),
            "readout_axis": "ny (rows): fastMRI stores the readout kx along the rows",
        }
    layout = "2d" if slice_index is not None else "2d-stack"
    return MulticoilData(kspace, None, mask, reference, attrs, source, layout).validate()


def _mask_2d(mask: np.ndarray, grid: tuple[int, int], source: str) -> np.ndarray:
    """fastMRI masks are 1D over the phase-encode columns; broadcast them over the readout rows."""
    mask = np.asarray(mask).astype(np.float32)
    if mask.ndim == 1:
        if mask.shape[0] != grid[1]:
            raise InputError(source, f"length {mask.shape[0]} disagrees with k-space: expected "
                             f"{grid[1]} phase-encode columns", "mask")
        mask = np.broadcast_to(mask[None, :], grid).copy()
    return mask  # shape and 0/1 content are checked by MulticoilData.validate


def parse_ismrmrd_header(header: str) -> dict:
    """Matrix sizes and fields of view from an ISMRMRD XML header; {} if it cannot be parsed.

    Returns keys (when present): encoded_matrix [x, y, z], recon_matrix [x, y, z],
    encoded_fov_mm [x, y, z], recon_fov_mm [x, y, z], field_strength_t, system_model.
    """
    try:
        root = ElementTree.fromstring(header)
    except ElementTree.ParseError:
        return {}
    for element in root.iter():  # drop the ISMRMRD namespace so paths stay readable
        element.tag = element.tag.rsplit("}", 1)[-1]
    found: dict = {}
    for space in ("encoded", "recon"):
        for key, tag, cast in (("matrix", "matrixSize", int), ("fov_mm", "fieldOfView_mm", float)):
            node = root.find(f"encoding/{space}Space/{tag}")
            if node is not None:
                try:
                    found[f"{space}_{key}"] = [cast(float(node.findtext(a))) for a in "xyz"]
                except (TypeError, ValueError):
                    pass
    for key, path, cast in (("field_strength_t", "acquisitionSystemInformation/systemFieldStrength_T",
                             float),
                            ("system_model", "acquisitionSystemInformation/systemModel", str)):
        text = root.findtext(path)
        if text is not None:
            try:
                found[key] = cast(text)
            except ValueError:
                pass
    return found
