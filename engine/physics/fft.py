"""Centred orthonormal FFTs.

Convention (the same as fastMRI): the DC sample sits at index n // 2 and
`image = fftshift(ifftn(ifftshift(k)), norm="ortho")` over the transformed axes. Orthonormal
scaling makes the FFT unitary, so its adjoint is exactly the inverse FFT.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

Dims = Sequence[int] | int


def as_dims(dims: Dims) -> tuple[int, ...]:
    """`dims` as a tuple; a single int (one axis) is accepted, as torch.fft.fftn accepts it."""
    return (dims,) if isinstance(dims, int) else tuple(dims)


def fftc(x: torch.Tensor, dims: Dims = (-2, -1)) -> torch.Tensor:
    """Centred orthonormal forward FFT over `dims` (image -> k-space)."""
    dims = as_dims(dims)
    x = torch.fft.ifftshift(x, dim=dims)
    x = torch.fft.fftn(x, dim=dims, norm="ortho")
    return torch.fft.fftshift(x, dim=dims)


def ifftc(k: torch.Tensor, dims: Dims = (-2, -1)) -> torch.Tensor:
    """Centred orthonormal inverse FFT over `dims` (k-space -> image); adjoint of `fftc`."""
    dims = as_dims(dims)
    k = torch.fft.ifftshift(k, dim=dims)
    k = torch.fft.ifftn(k, dim=dims, norm="ortho")
    return torch.fft.fftshift(k, dim=dims)


def kspace_radius(shape: tuple[int, int]) -> torch.Tensor:
    """(H, W) float64: each centred k-space point's |k| over the Nyquist radius of each axis (0 at
    the DC sample, 1 at the edge's centre, sqrt(2) in the corners)."""
    ky = (torch.arange(shape[0], dtype=torch.float64) - shape[0] // 2) / (shape[0] / 2)
    kx = (torch.arange(shape[1], dtype=torch.float64) - shape[1] // 2) / (shape[1] / 2)
    return torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
