"""MRI forward model: centred FFTs, small linear operators, masks, coil maps, simulation."""

from engine.physics.coils import combine, espirit_maps, rss, support_mask
from engine.physics.fft import fftc, ifftc
from engine.physics.masks import achieved_acceleration, make_mask, seed_from_case
from engine.physics.operators import (
    CenteredFFT,
    CoilMultiply,
    Composed,
    LinearOperator,
    Mask,
    sense_operator,
)
from engine.physics.simulate import simulate_multicoil

__all__ = [
    "fftc",
    "ifftc",
    "LinearOperator",
    "Composed",
    "CoilMultiply",
    "CenteredFFT",
    "Mask",
    "sense_operator",
    "make_mask",
    "seed_from_case",
    "achieved_acceleration",
    "espirit_maps",
    "combine",
    "rss",
    "support_mask",
    "simulate_multicoil",
]
