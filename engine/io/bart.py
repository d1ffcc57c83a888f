"""BART .cfl/.hdr files: raw read and write, and a reader into the engine's layout.

Format (mrirecon/bart): `<base>.hdr` is text with a "# Dimensions" line followed by the sizes;
`<base>.cfl` is the raw complex64 (little-endian float32 pairs) array in Fortran (column-major)
order. BART's dimension order starts READ, PHS1, PHS2, COIL, MAPS, ...; its k-space is centred.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.io.data import MulticoilData
from engine.io.errors import InputError

BART_DIM_NAMES = ("READ", "PHS1", "PHS2", "COIL", "MAPS", "TE", "COEFF", "COEFF2", "ITER", "CSHIFT",
                  "TIME", "TIME2", "LEVEL", "SLICE", "AVG", "BATCH")


def cfl_base(path: str | Path) -> Path:
    """`x.cfl`, `x.hdr` or `x` -> `x` (the base name BART uses)."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".cfl", ".hdr") else path


def _part(base: Path, suffix: str) -> Path:
    return base.parent / (base.name + suffix)  # not with_suffix: a base may contain dots


def read_cfl(path: str | Path) -> np.ndarray:
    """The array of a .cfl/.hdr pair, complex64, shaped as the header's dims (BART order)."""
    base = cfl_base(path)
    header, data = _part(base, ".hdr"), _part(base, ".cfl")
    for part in (header, data):
        if not part.is_file():
            raise InputError(part, "file not found (a BART array needs both .hdr and .cfl)")
    dims = _read_dims(header)
    expected = int(np.prod(dims))
    actual = data.stat().st_size // np.dtype(np.complex64).itemsize
    if actual != expected or data.stat().st_size % np.dtype(np.complex64).itemsize:
        raise InputError(data, f"holds {data.stat().st_size} bytes, but the header's dims "
                         f"{'x'.join(map(str, dims))} need {expected * 8} (truncated?)")
    flat = np.fromfile(data, dtype="<c8", count=expected)
    return flat.reshape(dims, order="F").astype(np.complex64, copy=False)


def write_cfl(path: str | Path, array: np.ndarray) -> Path:
    """Write `array` (BART dim order) as `<base>.hdr` + `<base>.cfl`, complex64; returns the base."""
    base = cfl_base(path)
    array = np.asarray(array, dtype=np.complex64)
    dims = array.shape if array.ndim else (1,)
    base.parent.mkdir(parents=True, exist_ok=True)
    with open(_part(base, ".hdr"), "w", encoding="ascii") as handle:
        handle.write("# Dimensions\n" + " ".join(str(d) for d in dims) + " \n")
    # .cfl holds the data in column-major (Fortran) order.
    np.asfortranarray(array).ravel(order="F").astype("<c8").tofile(_part(base, ".cfl"))
    return base


def _read_dims(header: Path) -> list[int]:
    lines = header.read_text(encoding="ascii", errors="replace").splitlines()
    for index, line in enumerate(lines):
        if line.strip() == "# Dimensions" and index + 1 < len(lines):
            try:
                dims = [int(token) for token in lines[index + 1].split()]
            except ValueError:
                break
            if dims and all(d >= 1 for d in dims):
                return dims
            break
    raise InputError(header, "no valid '# Dimensions' line in the BART header")


def read_bart(path: str | Path) -> MulticoilData:
    """Read BART multicoil k-space [READ, PHS1, PHS2, COIL] into the engine's layout.

    Dims beyond COIL must be 1. With all three spatial dims > 1 the layout is "3d"
    (coils, kx, ky, kz); with one of them 1 it is "2d" (coils, n1, n2) over the other two in
    order (e.g. dims 1 x 180 x 230 x 8, a ky-kz plane, -> (8, 180, 230)). No mask is set: use
    engine.io.derive_mask (BART marks unsampled positions with zeros).
    """
    base = cfl_base(path)
    source = str(_part(base, ".cfl"))
    array = read_cfl(base)
    dims = list(array.shape) + [1] * max(0, 4 - array.ndim)
    extra = [(BART_DIM_NAMES[i] if i < len(BART_DIM_NAMES) else str(i), d)
             for i, d in enumerate(dims[4:], start=4) if d != 1]
    if extra:
        raise InputError(source, "unsupported BART dims (must be 1 beyond COIL): "
                         + ", ".join(f"{name}={size}" for name, size in extra), "kspace")
    kspace = np.moveaxis(array.reshape(dims[:4]), 3, 0)  # (coils, READ, PHS1, PHS2)
    spatial = [axis for axis in (1, 2, 3) if dims[axis - 1] > 1]
    if len(spatial) < 2:
        raise InputError(source, f"needs at least two spatial dims > 1, got dims {dims[:4]}",
                         "kspace")
    if len(spatial) == 2:
        dropped = next(axis for axis in (1, 2, 3) if axis not in spatial)
        kspace = kspace.squeeze(axis=dropped)
    kspace = np.ascontiguousarray(kspace)
    attrs = {"format": "bart", "bart_dims": dims,
             "bart_header": _part(base, ".hdr").read_text(errors="replace")}
    return MulticoilData(kspace, attrs=attrs, source=source).validate()

