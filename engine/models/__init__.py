"""INR models: coordinate encodings, MLP trunk, complex heads (2D and z-discretized 3D)."""

from engine.models.encodings import FourierFeatures, HashGridEncoding, coordinate_grid
from engine.models.inr import (
    INR2D,
    INRZ,
    MLP,
    ComplexRowHead,
    EncodingConfig,
    INRConfig,
    build_encoding,
    resolve_encoding,
)

__all__ = [
    "INR2D",
    "INRZ",
    "MLP",
    "ComplexRowHead",
    "EncodingConfig",
    "FourierFeatures",
    "HashGridEncoding",
    "INRConfig",
    "build_encoding",
    "coordinate_grid",
    "resolve_encoding",
]
