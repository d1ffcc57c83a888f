"""Data consistency: || M F S x - y ||^2 over the measured samples, normalised.

Normalisation (`normalisation`):
- "samples" (default): divided by the number of measured complex samples (coils x sampled
  points), i.e. the mean squared residual per measurement. Its scale is set by the image's
  intensity (the recon loop scales images to the prior's convention, |x| ~ 1) and does not
  change with the acceleration, so regulariser weights transfer between R = 4, 6, 8.
- "energy": divided by ||y||^2 (relative residual energy; 1 for x = 0).
- "array": divided by the size of the k-space array (coils x height x width), the MSE over the full
  masked array that the paper's code uses ("samples" times the sampling fraction).
- "none": the plain sum of squared residuals.

Every evaluation is one call of `kernels.sense.dc_loss` (backend "auto": the fused Triton kernels
for CUDA tensors with even plane sizes, otherwise engine.physics.sense in plain torch; "torch",
"triton" force one).
"""
from __future__ import annotations

from typing import Literal

import torch

from kernels.sense import dc_loss

Normalisation = Literal["samples", "energy", "array", "none"]
Backend = Literal["auto", "torch", "triton"]


class DataConsistency(torch.nn.Module):
    """DC loss of images against fixed multicoil data.

    Args:
        kspace: measured data `(C, height, width)` or `(B, C, height, width)` complex64, centred, zero where unsampled.
        maps: coil maps `(C, height, width)` or `(B|1, C, height, width)` complex64.
        mask: sampling mask `(height, width)` 0/1 float32.
        normalisation: "samples" | "energy" | "array" | "none" (module docstring).
        backend: "auto" | "torch" | "triton" (kernels.sense).
    Call: `dc(image)` with image `(height, width)` or `(B, height, width)` complex64 -> scalar float32; with
    batched data `(B, C, height, width)`, `dc(images, rows)` compares `images` `(R, height, width)` with the data
    planes `rows` only (the stochastic planes of the 3D loop). Normalisations are per plane and a
    batch sums its planes' losses.
    """

    def __init__(self, kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor,
                 normalisation: Normalisation = "samples", backend: Backend = "auto"):
        super().__init__()
        if not kspace.is_complex() or not maps.is_complex():
            raise TypeError(f"kspace and maps must be complex, got {kspace.dtype} and {maps.dtype}")
        if mask.is_complex():
            raise TypeError("the sampling mask must be real 0/1")
        if kspace.shape[-2:] != mask.shape[-2:] or maps.shape[-3:] != kspace.shape[-3:]:
            raise ValueError(f"shape mismatch: kspace {tuple(kspace.shape)}, maps {tuple(maps.shape)}, "
                             f"mask {tuple(mask.shape)} (expected (C, height, width), (C, height, width), (height, width))")
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"unknown DC backend {backend!r}; choose auto, torch or triton")
        self.backend = backend
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
        self.register_buffer("kspace", kspace)
        self.register_buffer("maps", maps)
        self.register_buffer("mask", mask)

    def _select(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        if rows is None:
            return self.kspace, self.maps
        if self.kspace.ndim != 4:
            raise ValueError("rows can only select planes of batched data (B, C, height, width)")
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.kspace.device) if not isinstance(rows, slice) else rows
        maps = self.maps[rows] if self.maps.ndim == 4 and self.maps.shape[0] > 1 else self.maps
        return self.kspace[rows], maps

    def residual_sum(self, image: torch.Tensor, rows=None) -> torch.Tensor:
        """Sum over batch, coils and samples of |M F S x - y|^2 (float32 scalar)."""
        batched = image if image.ndim == 3 else image.unsqueeze(0)
        kspace, maps = self._select(rows)
        maps = maps if maps.ndim == 4 else maps.unsqueeze(0)
        data = kspace if kspace.ndim == 4 else kspace.unsqueeze(0).expand(batched.shape[0], -1, -1, -1)
        return dc_loss(batched, maps, self.mask, data, backend=self.backend)

    def forward(self, image: torch.Tensor, rows=None) -> torch.Tensor:
        """Normalised DC loss of `image` `(height, width)` or `(B, height, width)` complex64 (scalar); `rows`
        (int tensor / list / slice) selects the data planes that `image` holds."""
        return self.residual_sum(image, rows) * self.scale
