"""SKM-TEA-style 3D multicoil HDF5 reader (StanfordMIMI/skm-tea "recon" files).

File layout: `kspace` complex [x, ky, kz, echo, coil]; optional `maps` [x, y, z, coil] or
[x, y, z, coil, maps]; optional `target` [x, y, z, echo(, maps)] (reference image); optional
`mask` [ky, kz] or `masks/<name>` [ky', kz'] (SKM-TEA ships Poisson-disc masks such as
`masks/poisson_6.0x`, possibly smaller than the grid: they are zero-padded about the centre).

Readout domain. The released SKM-TEA files hold the readout axis already inverse-FFT'd
("hybrid" x, ky, kz), while "SKM-TEA-style" files written by other tools may hold true kx. The
reader returns true k-space (coils, kx, ky, kz) either way: with `readout_domain="image"` it
applies the centred FFT along x. `"auto"` uses the `readout_domain` attribute of the `kspace`
dataset or the file if present, else the energy test of `guess_readout_domain`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.io import _hdf5
from engine.io.data import MulticoilData
from engine.io.errors import InputError
from engine.physics.fft import fftc

READOUT_DOMAINS = ("auto", "kspace", "image")

# Share of the energy within the central eighth of the readout axis above which it is taken to
# be k-space: spectra of real images put most energy near DC (> 0.9 is typical), while an object
# filling a good part of the field of view puts about its area share (~0.1-0.3) there.
KSPACE_CENTRAL_ENERGY = 0.5


def read_skmtea(path: str | Path, echo: int = 0, readout_domain: str = "auto",
                mask_name: str | None = None) -> MulticoilData:
    """Read one echo of an SKM-TEA-style file.

    Args:
        path: the HDF5 file.
        echo: echo index.
        readout_domain: "auto", "kspace" (axis 0 is kx) or "image" (axis 0 is x, hybrid).
        mask_name: read `masks/<mask_name>` as the mask (else `mask` if present, else none).

    Returns:
        MulticoilData, layout "3d": kspace complex64 (coils, kx, ky, kz) centred; maps complex64
        (coils, x, y, z) (first set of maps) or None; mask float32 (ky, kz) or None; reference
        complex64 (x, y, z) from `target` or None; attrs: format, echo, readout_domain_in_file,
        file_attrs.
    """
    if readout_domain not in READOUT_DOMAINS:
        raise ValueError(f"readout_domain must be one of {READOUT_DOMAINS}, got {readout_domain!r}")
    source = str(path)
    with _hdf5.open_hdf5(path) as handle:
        dataset = _hdf5.get_dataset(handle, "kspace", source)
        if dataset.ndim != 5:
            raise InputError(source, f"expected 5 dims [x, ky, kz, echo, coil], got {dataset.ndim} "
                             f"(shape {dataset.shape})", "kspace")
        n_echoes = dataset.shape[3]
        if not -n_echoes <= echo < n_echoes:
            raise InputError(source, f"echo {echo} out of range for {n_echoes} echoes", "kspace")
        raw = _hdf5.to_complex64(
            _hdf5.read(dataset, source, (slice(None), slice(None), slice(None), echo)), source,
            "kspace")  # (x, ky, kz, coil)

        declared = dataset.attrs.get("readout_domain", handle.attrs.get("readout_domain"))
        if readout_domain == "auto":
            readout_domain = (_hdf5.json_friendly(declared) if declared is not None
                              else guess_readout_domain(raw, axis=0))
            if readout_domain not in ("kspace", "image"):
                raise InputError(source, f"attribute readout_domain={readout_domain!r} is not "
                                 f"'kspace' or 'image'", "kspace")
        # one coil at a time: peak memory is the echo as read plus the output
        kspace = np.empty((raw.shape[3],) + raw.shape[:3], dtype=np.complex64)
        for coil in range(raw.shape[3]):
            volume = np.ascontiguousarray(raw[..., coil])
            if readout_domain == "image":
                volume = fftc(torch.from_numpy(volume), dims=(0,)).numpy()
            kspace[coil] = volume
        del raw

        maps = _read_maps(handle, source) if "maps" in handle else None
        reference = _read_target(handle, source, echo) if "target" in handle else None
        mask = _read_mask(handle, source, mask_name, kspace.shape[2:])
        attrs = {"format": "skmtea", "echo": int(echo), "n_echoes": int(n_echoes),
                 "readout_domain_in_file": readout_domain, "mask_name": mask_name,
                 "file_attrs": _hdf5.file_attrs(handle)}
    return MulticoilData(kspace, maps, mask, reference, attrs, source, "3d").validate()


def guess_readout_domain(array: np.ndarray, axis: int = 1) -> str:
    """'kspace' if the readout `axis` of `array` concentrates its energy about the centre, else 'image'.

    Default axis 1 fits (coils, kx, ky, kz); the reader calls it with axis 0 on the file's
    (x, ky, kz, coil) layout.
    """
    energy = np.array([np.vdot(plane, plane).real for plane in np.moveaxis(array, axis, 0)])
    n = energy.size
    half_width = max(n // 16, 1)
    central = energy[max(n // 2 - half_width, 0): n // 2 + half_width].sum()
    return "kspace" if central > KSPACE_CENTRAL_ENERGY * energy.sum() else "image"


def _read_maps(handle, source: str) -> np.ndarray:
    dataset = handle["maps"]
    if dataset.ndim not in (4, 5):
        raise InputError(source, f"expected [x, y, z, coil] or [x, y, z, coil, maps], got shape "
                         f"{dataset.shape}", "maps")
    selection = (slice(None),) * 4 + ((0,) if dataset.ndim == 5 else ())
    maps = _hdf5.to_complex64(_hdf5.read(dataset, source, selection), source, "maps")
    return np.ascontiguousarray(maps.transpose(3, 0, 1, 2))


def _read_target(handle, source: str, echo: int) -> np.ndarray:
    dataset = handle["target"]
    if dataset.ndim not in (4, 5):
        raise InputError(source, f"expected [x, y, z, echo] or [x, y, z, echo, maps], got shape "
                         f"{dataset.shape}", "target")
    selection = (slice(None),) * 3 + (echo,) + ((0,) if dataset.ndim == 5 else ())
    target = _hdf5.read(dataset, source, selection)
    if target.dtype.names or np.iscomplexobj(target):
        return _hdf5.to_complex64(target, source, "target")
    return target.astype(np.float32)


def _read_mask(handle, source: str, mask_name: str | None, plane: tuple[int, int]) -> np.ndarray | None:
    name = f"masks/{mask_name}" if mask_name else "mask"
    if name not in handle:
        if mask_name:
            raise InputError(source, "mask not found", name)
        return None
    mask = np.asarray(_hdf5.read(handle[name], source)).astype(np.float32)
    if mask.ndim == 2 and all(m <= p for m, p in zip(mask.shape, plane)) and mask.shape != plane:
        padded = np.zeros(plane, np.float32)  # centred zero-padding, as SKM-TEA's own loader does
        start = [p // 2 - m // 2 for m, p in zip(mask.shape, plane)]  # DC stays at n // 2
        padded[start[0]:start[0] + mask.shape[0], start[1]:start[1] + mask.shape[1]] = mask
        mask = padded
    return mask
