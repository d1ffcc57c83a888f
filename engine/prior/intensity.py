"""Intensity convention of the prior and the complex <-> 2-channel layout.

The prior was trained on images scaled so that the 99th percentile of the magnitude of the whole
image (background included) is 1 (arch.json: ``intensity_normalisation``). Callers scale their
image the same way with :func:`normalise`, denoise, and multiply back by ``scale``.
"""

from __future__ import annotations

import numpy as np
import torch

INTENSITY_NORMALISATION = "magnitude_percentile_99_is_1"
PERCENTILE = 99.0


def magnitude_scale(image: torch.Tensor | np.ndarray, percentile: float = PERCENTILE) -> torch.Tensor:
    """The 99th percentile of |image| over the last two axes: shape image.shape[:-2], float32.

    image: (..., H, W) complex or real, torch or NumPy.
    """
    mag = torch.as_tensor(image).abs().float()
    if mag.ndim < 2:
        raise ValueError(f"magnitude_scale: expected an image (..., H, W), got shape {tuple(mag.shape)}")
    flat = mag.reshape(*mag.shape[:-2], -1)
    return torch.quantile(flat, percentile / 100.0, dim=-1)


def normalise(image: torch.Tensor | np.ndarray, percentile: float = PERCENTILE
              ) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray | float]:
    """Scale an image to the prior's convention: returns (image / scale, scale).

    image: (H, W) or (..., H, W), complex or real, torch or NumPy (the result has the input's type).
    scale: the 99th percentile of the magnitude per image (a float for a single 2D image, otherwise
    shape image.shape[:-2]). An all-zero image raises (it has no scale).
    """
    scale = magnitude_scale(image, percentile)
    if torch.any(scale <= 0):
        raise ValueError("normalise: the image's 99th magnitude percentile is 0 (empty image?)")
    if isinstance(image, np.ndarray):
        s = scale.numpy().astype(np.float64)
        scaled = image / s[..., None, None]
        return scaled, float(s) if s.ndim == 0 else s
    s = scale.to(image.device)
    scaled = image / s[..., None, None].to(image.real.dtype if image.is_complex() else image.dtype)
    return scaled, float(s) if s.ndim == 0 else s


def complex_to_channels(image: torch.Tensor) -> torch.Tensor:
    """(..., H, W) complex -> (..., 2, H, W) float (channels real, imag), the prior's input layout."""
    if not torch.is_complex(image):
        raise ValueError(f"complex_to_channels: expected a complex tensor, got {image.dtype}")
    return torch.stack([image.real, image.imag], dim=-3)


def channels_to_complex(channels: torch.Tensor) -> torch.Tensor:
    """(..., 2, H, W) float -> (..., H, W) complex (float32 first: torch.complex rejects bf16)."""
    if channels.shape[-3] != 2:
        raise ValueError(f"channels_to_complex: expected (..., 2, H, W), got {tuple(channels.shape)}")
    c = channels.float()
    return torch.complex(c[..., 0, :, :], c[..., 1, :, :])


__all__ = [
    "INTENSITY_NORMALISATION",
    "PERCENTILE",
    "channels_to_complex",
    "complex_to_channels",
    "magnitude_scale",
    "normalise",
]
