"""Distance between the INR's image and the prior's estimate: LPIPS (the paper) or a pixel fallback.

Complex images `(B, H, W)` are shown to LPIPS as 3-channel pictures (real, imag, 0), the channel
layout of the paper's code; they are in the prior's intensity convention (99th percentile of the
magnitude = 1), which matches LPIPS' expected input range [-1, 1] closely enough.

`fallback` decides what happens when no offline backbone weights exist (engine.losses.lpips_weights):
"error" raises LPIPSWeightsMissing naming the options; "l2" / "l1" use the mean squared / absolute
difference of the complex images instead, with a warning.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch

from engine.losses.lpips_weights import LPIPSWeightsMissing, build_lpips

Kind = Literal["lpips", "l2", "l1"]


def complex_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """(B, H, W) complex -> (B, 3, H, W) float32: real, imag, zeros."""
    if not image.is_complex() or image.ndim != 3:
        raise ValueError(f"expected a complex batch (B, H, W), got {tuple(image.shape)} {image.dtype}")
    return torch.stack([image.real, image.imag, torch.zeros_like(image.real)], dim=1).float()


def pixel_distance(image: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean |image - target|^2 ("l2") or |image - target| ("l1") over the batch; float32 scalar."""
    diff = image - target
    if kind == "l2":
        return (diff.real.square() + diff.imag.square()).mean() if diff.is_complex() else diff.square().mean()
    if kind == "l1":
        return diff.abs().mean()
    raise ValueError(f"unknown pixel distance {kind!r}")


class PerceptualLoss(torch.nn.Module):
    """`loss(image, target)` with image, target `(B, H, W)` complex; mean over the batch, float32.

    Args:
        kind: "lpips" (the paper), "l2" or "l1".
        net: LPIPS backbone, "vgg" (the paper) or "alex".
        weights_path, cache_dir: see engine.losses.lpips_weights.find_backbone_weights.
        fallback: "error" | "l2" | "l1": what to use when kind = "lpips" and no weights exist.
    """

    def __init__(self, kind: Kind = "lpips", net: str = "vgg", weights_path: str | Path | None = None,
                 cache_dir: str | Path | None = None, fallback: Literal["error", "l2", "l1"] = "error"):
        super().__init__()
        self.kind = kind
        self.lpips = None
        if kind == "lpips":
            try:
                self.lpips = build_lpips(net, weights_path, cache_dir)
            except LPIPSWeightsMissing as err:
                if fallback == "error":
                    raise
                warnings.warn(f"{err}\nUsing the configured fallback: {fallback} distance.", stacklevel=2)
                self.kind = fallback
        elif kind not in ("l2", "l1"):
            raise ValueError(f"unknown perceptual loss kind {kind!r}; choose lpips, l2 or l1")

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if image.shape != target.shape:
            raise ValueError(f"image {tuple(image.shape)} and target {tuple(target.shape)} differ in shape")
        if self.lpips is None:
            return pixel_distance(image, target, self.kind)
        return self.lpips(complex_to_rgb(image), complex_to_rgb(target)).mean()
