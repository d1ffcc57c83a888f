"""The in-memory layout every reader returns, and the checks that guard it.

`MulticoilData.layout` names one of three layouts (docs/ARCHITECTURE.md); k-space is always centred
(DC at n // 2), orthonormal, complex64, coils first:

| layout     | kspace                        | maps                     | mask        | reference        |
|------------|-------------------------------|--------------------------|-------------|------------------|
| "2d"       | (coils, ny, nx)               | (coils, ny, nx)          | (ny, nx)    | (h, w)           |
| "3d"       | (coils, kx, ky, kz), kx = RO  | (coils, x, y, z)         | (ky, kz)    | (x, y, z)        |
| "2d-stack" | (slices, coils, ny, nx)       | (slices, coils, ny, nx)  | (ny, nx)    | (slices, h, w)   |

Masks are float32 0/1. In 3D the readout kx is fully sampled, so the mask lives on the phase-encode
plane (ky, kz) and is the same for every readout position. `reference` is an image-space reference
when the file carries one (it may be cropped, e.g. fastMRI's 320 x 320 RSS, and may be real).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.io.errors import InputError

LAYOUTS = ("2d", "3d", "2d-stack")

# Leading non-spatial axes of k-space per layout (coils, or slices and coils).
_LEADING_AXES = {"2d": 1, "3d": 1, "2d-stack": 2}


@dataclass
class MulticoilData:
    """Multicoil Cartesian k-space with what the file says about it.

    Attributes:
        kspace: complex64, centred, layout given by `layout` (module docstring).
        maps: coil sensitivities in image space, complex64, same shape as `kspace`, or None.
        mask: float32 0/1 sampling mask on the (phase-encode) grid, or None when the file has none
            (derive one from the non-zero samples with `derive_mask`).
        reference: image-space reference (complex64 or float32), or None.
        attrs: what the reader learnt (format, header, acquisition matrix, ...), JSON-friendly.
        source: the path it was read from.
        layout: "2d", "3d" or "2d-stack"; inferred from kspace.ndim (3 -> "2d", 4 -> "3d") if empty.
    """

    kspace: np.ndarray
    maps: np.ndarray | None = None
    mask: np.ndarray | None = None
    reference: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)
    source: str = ""
    layout: str = ""

    def __post_init__(self) -> None:
        if not self.layout:
            self.layout = {3: "2d", 4: "3d"}.get(np.ndim(self.kspace), "")
        if self.layout not in LAYOUTS:
            raise InputError(self.source or "<memory>", f"cannot infer a layout from k-space shape "
                             f"{np.shape(self.kspace)}; expected (coils, ny, nx) or (coils, kx, ky, kz)",
                             "kspace")

    @property
    def n_coils(self) -> int:
        return int(self.kspace.shape[_LEADING_AXES[self.layout] - 1])

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Spatial k-space grid: (ny, nx) in 2D, (kx, ky, kz) in 3D."""
        return tuple(self.kspace.shape[_LEADING_AXES[self.layout]:])

    @property
    def mask_shape(self) -> tuple[int, ...]:
        """Shape a mask must have: the grid in 2D, the phase-encode plane (ky, kz) in 3D."""
        return self.grid_shape[1:] if self.layout == "3d" else self.grid_shape

    def validate(self) -> MulticoilData:
        """Check dtypes, shapes, finiteness and the mask; raise InputError on the first problem."""
        source = self.source or "<memory>"
        expected_ndim = _LEADING_AXES[self.layout] + (3 if self.layout == "3d" else 2)
        check_ndim(self.kspace, expected_ndim, source, "kspace", _layout_text(self.layout))
        check_complex(self.kspace, source, "kspace")
        check_finite(self.kspace, source, "kspace")
        if self.maps is not None:
            check_complex(self.maps, source, "maps")
            check_shape(self.maps, self.kspace.shape, source, "maps", "k-space")
            check_finite(self.maps, source, "maps")
        if self.mask is not None:
            check_mask(self.mask, self.mask_shape, source, "mask")
        if self.reference is not None:
            ref_ndim = len(self.grid_shape) + (1 if self.layout == "2d-stack" else 0)
            check_ndim(self.reference, ref_ndim, source, "reference", "image-space reference")
            check_finite(self.reference, source, "reference")
        return self


@dataclass
class MagnitudeVolume:
    """A real-valued image volume (e.g. NIfTI anatomy for simulation).

    Attributes:
        data: float32 `(x, y, z)` in the file's voxel order.
        affine: float64 (4, 4) voxel -> world (RAS, mm) transform.
        attrs: voxel size, header fields, etc.
        source: the path it was read from.
    """

    data: np.ndarray
    affine: np.ndarray
    attrs: dict = field(default_factory=dict)
    source: str = ""


def _layout_text(layout: str) -> str:
    return {"2d": "(coils, ny, nx)", "3d": "(coils, kx, ky, kz)",
            "2d-stack": "(slices, coils, ny, nx)"}[layout]


def check_ndim(array: np.ndarray, ndim: int, source: str, name: str, meaning: str) -> None:
    if array.ndim != ndim:
        raise InputError(source, f"expected {ndim} dims {meaning}, got {array.ndim} (shape "
                         f"{tuple(array.shape)})", name)


def check_complex(array: np.ndarray, source: str, name: str) -> None:
    if not np.iscomplexobj(array):
        raise InputError(source, f"must be complex, got {array.dtype}", name)


def check_shape(array: np.ndarray, expected: tuple[int, ...], source: str, name: str,
                against: str) -> None:
    if tuple(array.shape) != tuple(expected):
        raise InputError(source, f"shape {tuple(array.shape)} disagrees with {against}: expected "
                         f"{tuple(expected)}", name)


def check_finite(array: np.ndarray, source: str, name: str) -> None:
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InputError(source, f"contains {bad} non-finite values (NaN/Inf) of {array.size}", name)


def check_mask(mask: np.ndarray, expected_shape: tuple[int, ...], source: str,
               name: str = "mask") -> np.ndarray:
    """Validate a 0/1 sampling mask and return it as float32."""
    mask = np.asarray(mask)
    if np.iscomplexobj(mask):
        raise InputError(source, f"a sampling mask must be real 0/1, got {mask.dtype}", name)
    check_shape(mask, expected_shape, source, name, "the k-space sampling grid")
    check_finite(mask, source, name)
    if not np.isin(mask, (0, 1)).all():
        raise InputError(source, "a sampling mask must contain only 0 and 1", name)
    if not mask.any():
        raise InputError(source, "has no sampled positions (all zero)", name)
    return mask.astype(np.float32)


def derive_mask(kspace: np.ndarray, layout: str, source: str = "<memory>") -> np.ndarray:
    """The sampling mask implied by the non-zero samples of k-space, float32 0/1.

    2D: `(ny, nx)`, sampled where any coil is non-zero. 2D stack: the same over all slices.
    3D: `(ky, kz)`; every readout position that holds data must show the same pattern (the readout
    is fully sampled), else InputError. Readout positions that are zero everywhere (zero-filled
    partial echo) are ignored.
    """
    if layout == "3d":
        per_readout = np.zeros(kspace.shape[1:], dtype=bool)  # (kx, ky, kz)
        for coil in kspace:  # one coil at a time keeps the temporary at 1/8 of k-space
            per_readout |= coil != 0
        mask = per_readout.any(axis=0)
        occupied = per_readout.any(axis=(1, 2))
        differing = int(np.count_nonzero(per_readout[occupied] != mask))
        if differing:
            raise InputError(source, f"the sampling pattern differs between readout positions "
                             f"({differing} samples); 3D Cartesian data must be fully sampled "
                             f"along kx", "kspace")
    else:
        leading = tuple(range(_LEADING_AXES[layout]))
        mask = (kspace != 0).any(axis=leading)
    if not mask.any():
        raise InputError(source, "k-space is all zero: no sampled positions", "kspace")
    return mask.astype(np.float32)
