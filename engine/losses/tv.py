"""Total variation of complex images, on the image divided by a robust intensity scale.

TV(x) = mean over pixels of sqrt(|D_y x|^2 + |D_x x|^2 + eps^2) - eps  (isotropic) or
        mean over pixels of |D_y x| + |D_x x|                           (anisotropic),
with forward differences (the last row / column has no difference). The image is divided by
`scale` first (the recon loop passes a fixed robust scale, e.g. the 99th percentile of the
zero-filled magnitude), so the weight does not depend on the data's units. The small eps keeps
the gradient of the isotropic form finite where the image is flat.
"""
from __future__ import annotations

from typing import Literal

import torch


def _squared_magnitude(z: torch.Tensor) -> torch.Tensor:
    return z.real.square() + z.imag.square() if z.is_complex() else z.square()


def total_variation(image: torch.Tensor, kind: Literal["isotropic", "anisotropic"] = "isotropic",
                    scale: float | torch.Tensor = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """TV of `image` `(..., height, width)` complex or real, divided by `scale`; float32 scalar."""
    if image.ndim < 2:
        raise ValueError(f"total_variation expects (..., height, width), got shape {tuple(image.shape)}")
    x = image / scale
    dy = x[..., 1:, :] - x[..., :-1, :]
    dx = x[..., :, 1:] - x[..., :, :-1]
    if kind == "anisotropic":
        return (dy.abs().sum() + dx.abs().sum()) / x.numel()
    if kind != "isotropic":
        raise ValueError(f"unknown TV kind {kind!r}; choose isotropic or anisotropic")
    sq_y = torch.nn.functional.pad(_squared_magnitude(dy), (0, 0, 0, 1))
    sq_x = torch.nn.functional.pad(_squared_magnitude(dx), (0, 1, 0, 0))
    return (torch.sqrt(sq_y + sq_x + eps * eps) - eps).mean()
