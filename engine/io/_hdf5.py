"""HDF5 access that turns every failure into a one-line InputError (missing, truncated, absent dataset)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from engine.io.errors import InputError


def require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a directory, expected a file")
    return path


@contextmanager
def open_hdf5(path: str | Path) -> Iterator[h5py.File]:
    """Open read-only; a missing, truncated or non-HDF5 file raises InputError."""
    path = require_file(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        reason = str(err).split("(")[0].strip() or type(err).__name__
        raise InputError(path, f"cannot be read as HDF5 (truncated, corrupt or not HDF5): "
                         f"{reason}") from err
    with handle:
        yield handle


def get_dataset(handle: h5py.File, name: str, source: str | Path) -> h5py.Dataset:
    """The dataset `name`, or InputError listing what the file holds."""
    node = handle.get(name)
    if not isinstance(node, h5py.Dataset):
        present = sorted(handle.keys())
        raise InputError(source, f"dataset not found (file holds: {', '.join(present) or 'nothing'})",
                         name)
    return node


def read(dataset: h5py.Dataset, source: str | Path, selection: tuple = ()) -> np.ndarray:
    """Read `dataset[selection]`; an I/O failure (truncated data) becomes InputError."""
    try:
        return dataset[selection] if selection else dataset[()]
    except (OSError, ValueError) as err:
        raise InputError(source, f"read failed (truncated or corrupt data?): {err}",
                         dataset.name.lstrip("/")) from err


def to_complex64(array: np.ndarray, source: str | Path, name: str) -> np.ndarray:
    """complex64 from a complex array or a compound (real, imag) / (r, i) record array."""
    fields = array.dtype.names
    if fields:
        for real, imag in (("real", "imag"), ("r", "i")):
            if real in fields and imag in fields:
                out = np.empty(array.shape, dtype=np.complex64)
                out.real, out.imag = array[real], array[imag]
                return out
        raise InputError(source, f"compound dtype with fields {fields} is not complex", name)
    if not np.iscomplexobj(array):
        raise InputError(source, f"must be complex, got {array.dtype}", name)
    return array.astype(np.complex64, copy=False)


def json_friendly(value: object, max_list: int = 64) -> object:
    """Attributes as plain Python (numpy scalars -> numbers, bytes -> str); big arrays dropped."""
    if isinstance(value, dict):
        return {str(k): json_friendly(v, max_list) for k, v in value.items()}
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return json_friendly(value.item(), max_list)
    if isinstance(value, (np.ndarray, list, tuple)):
        items = list(np.asarray(value).ravel()) if isinstance(value, np.ndarray) else list(value)
        if len(items) > max_list:
            return f"<{len(items)} values omitted>"
        return [json_friendly(v, max_list) for v in items]
    if isinstance(value, complex):
        return [value.real, value.imag]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def file_attrs(node: h5py.HLObject) -> dict:
    return {str(k): json_friendly(v) for k, v in node.attrs.items()}
