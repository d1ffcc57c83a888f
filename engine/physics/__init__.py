"""MRI forward model: centred FFTs, small linear operators, masks, coil maps, simulation."""

from engine.physics.fft import fftc, ifftc
from engine.physics.operators import (
    CenteredFFT,
    CoilMultiply,
    Composed,
    LinearOperator,
    Mask,
    sense_operator,
)

__all__ = [
    "fftc",
    "ifftc",
    "LinearOperator",
    "Composed",
    "CoilMultiply",
    "CenteredFFT",
    "Mask",
    "sense_operator",
]
