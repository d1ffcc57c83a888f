"""INR models: coordinate encodings, MLP trunk, complex heads (2D, and 3D discretised along the readout x)."""

from engine.models.encodings import FourierFeatures, HashGridEncoding, coordinate_grid
from engine.models.inr import (
    INR2D,
    MLP,
    ComplexRowHead,
    EncodingConfig,
    INRConfig,
    ReadoutINR,
    build_encoding,
    resolve_encoding,
)

__all__ = [
    "INR2D",
    "MLP",
    "ComplexRowHead",
    "EncodingConfig",
    "FourierFeatures",
    "HashGridEncoding",
    "INRConfig",
    "ReadoutINR",
    "build_encoding",
    "coordinate_grid",
    "resolve_encoding",
]
