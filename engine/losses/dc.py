"""Data consistency: || M F S x - y ||^2 over the measured samples, normalised.

Normalisation (`normalisation`):
- "samples" (default): divided by the number of measured complex samples (coils x sampled
  points), i.e. the mean squared residual per measurement. Its scale is set by the image's
  intensity (the recon loop scales images to the prior's convention, |x| ~ 1) and does not
  change with the acceleration, so regulariser weights transfer between R = 4, 6, 8.
- "energy": divided by ||y||^2 (relative residual energy; 1 for x = 0).
- "array": divided by the size of the k-space array (coils x ny x nx), the MSE over the full
  masked array that the paper's code uses ("samples" times the sampling fraction).
- "none": the plain sum of squared residuals.

Backends: "kernels" = `kernels.sense.dc_loss` (fused Triton kernels on CUDA, their torch
reference on CPU); "torch" = the local path below, which folds the centring shifts into the coil
maps and the data once (the modulation identity of kernels/reference.py: for even sizes
fftc(z) = s m fft2(m z) with m the (-1)^(u+v) checkerboard and s = +-1), so each evaluation is
one coil multiply, one unshifted FFT and one masked difference; "auto" = "kernels" for CUDA
tensors when that module exists, else "torch" (on 2 CPU cores the kernels' torch reference took
1.29 s per INR step at 128 x 128 x 4 coils against 0.41 s for the local path, measured 2026-11-26).
"""
from __future__ import annotations

import importlib
from typing import Literal

import torch

from engine.physics.fft import fftc

Normalisation = Literal["samples", "energy", "array", "none"]


def _kernels_dc_loss():
    try:
        return importlib.import_module("kernels.sense").dc_loss
    except (ImportError, AttributeError):
        return None


def _checkerboard(ny: int, nx: int, device: torch.device) -> torch.Tensor:
    u = torch.arange(ny, device=device).unsqueeze(1)
    v = torch.arange(nx, device=device).unsqueeze(0)
    return (1 - 2 * ((u + v) % 2)).float()


class DataConsistency(torch.nn.Module):
    """DC loss of images against fixed multicoil data.

    Args:
        kspace: measured data `(C, ny, nx)` or `(B, C, ny, nx)` complex64, centred, zero where unsampled.
        maps: coil maps `(C, ny, nx)` or `(B|1, C, ny, nx)` complex64.
        mask: sampling mask `(ny, nx)` 0/1 float32.
        normalisation: "samples" | "energy" | "array" | "none" (module docstring).
        backend: "auto" | "torch" | "kernels".
    Call: `dc(image)` with image `(ny, nx)` or `(B, ny, nx)` complex64 -> scalar float32; with
    batched data `(B, C, ny, nx)`, `dc(images, rows)` compares `images` `(R, ny, nx)` with the data
    planes `rows` only (the stochastic planes of the 3D loop). Normalisations are per plane and a
    batch sums its planes' losses.
    """

    def __init__(self, kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor,
                 normalisation: Normalisation = "samples", backend: str = "auto"):
        super().__init__()
        if not kspace.is_complex() or not maps.is_complex():
            raise TypeError(f"kspace and maps must be complex, got {kspace.dtype} and {maps.dtype}")
        if mask.is_complex():
            raise TypeError("the sampling mask must be real 0/1")
        if kspace.shape[-2:] != mask.shape[-2:] or maps.shape[-3:] != kspace.shape[-3:]:
            raise ValueError(f"shape mismatch: kspace {tuple(kspace.shape)}, maps {tuple(maps.shape)}, "
                             f"mask {tuple(mask.shape)} (expected (C, ny, nx), (C, ny, nx), (ny, nx))")
        if backend not in ("auto", "torch", "kernels"):
            raise ValueError(f"unknown DC backend {backend!r}; choose auto, torch or kernels")
        wants_kernel = backend == "kernels" or (backend == "auto" and kspace.device.type == "cuda")
        kernel = _kernels_dc_loss() if wants_kernel else None
        if backend == "kernels" and kernel is None:
            raise ImportError("DC backend 'kernels' needs kernels.sense.dc_loss, which is not available")
        self.kernel = kernel
        mask = mask.float()
        kspace = kspace * mask
        coils = kspace.shape[-3]
        planes = kspace.shape[0] if kspace.ndim == 4 else 1
        # per plane: a batch of planes sums their per-plane losses
        denominators = {"samples": float(mask.sum()) * coils, "none": 1.0,
                        "array": float(kspace.shape[-3] * kspace.shape[-2] * kspace.shape[-1]),
                        "energy": float((kspace.abs() ** 2).sum()) / planes}
        if normalisation not in denominators:
            raise ValueError(f"unknown DC normalisation {normalisation!r}; choose {list(denominators)}")
        if denominators[normalisation] <= 0:
            raise ValueError(f"DC normalisation {normalisation!r} is zero: the mask or the data is empty")
        self.scale = 1.0 / denominators[normalisation]
        ny, nx = mask.shape[-2:]
        self.modulated = kernel is None and ny % 2 == 0 and nx % 2 == 0
        if kernel is not None:
            self.register_buffer("kspace", kspace)
            self.register_buffer("maps", maps)
        elif self.modulated:
            sign = -1.0 if (ny // 2 + nx // 2) % 2 else 1.0
            board = _checkerboard(ny, nx, kspace.device)
            self.register_buffer("maps", maps * board)               # m S
            self.register_buffer("kspace", kspace * (sign * board))  # s m y (s m is its own inverse)
        else:  # odd sizes: plain shifted FFTs
            self.register_buffer("kspace", kspace)
            self.register_buffer("maps", maps)
        self.register_buffer("mask", mask)

    def _select(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        if rows is None:
            return self.kspace, self.maps
        if self.kspace.ndim != 4:
            raise ValueError("rows can only select planes of batched data (B, C, ny, nx)")
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.kspace.device) if not isinstance(rows, slice) else rows
        maps = self.maps[rows] if self.maps.ndim == 4 and self.maps.shape[0] > 1 else self.maps
        return self.kspace[rows], maps

    def residual_sum(self, image: torch.Tensor, rows=None) -> torch.Tensor:
        """Sum over batch, coils and samples of |M F S x - y|^2 (float32 scalar)."""
        batched = image if image.ndim == 3 else image.unsqueeze(0)
        kspace, maps = self._select(rows)
        if self.kernel is not None:
            maps = maps if maps.ndim == 4 else maps.unsqueeze(0)
            data = kspace if kspace.ndim == 4 else kspace.unsqueeze(0).expand(batched.shape[0], -1, -1, -1)
            return self.kernel(batched, maps, self.mask, data)
        coil_images = maps * batched.unsqueeze(-3)
        if self.modulated:
            prediction = torch.fft.fft2(coil_images, norm="ortho")
        else:
            prediction = fftc(coil_images)
        residual = prediction * self.mask - kspace
        return torch.view_as_real(residual).square().sum()

    def forward(self, image: torch.Tensor, rows=None) -> torch.Tensor:
        """Normalised DC loss of `image` `(ny, nx)` or `(B, ny, nx)` complex64 (scalar); `rows`
        (int tensor / list / slice) selects the data planes that `image` holds."""
        return self.residual_sum(image, rows) * self.scale
