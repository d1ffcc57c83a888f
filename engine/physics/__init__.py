"""MRI forward model: centred FFTs, the SENSE model (engine.physics.sense), masks, coil maps, simulation."""

from engine.physics.coils import combine, espirit_maps, rss, support_mask
from engine.physics.fft import fftc, ifftc
from engine.physics.masks import achieved_acceleration, make_mask, seed_from_case
from engine.physics.sense import LinearOperator, SenseOperator, sense_operator
from engine.physics.simulate import simulate_multicoil

__all__ = [
    "LinearOperator",
    "SenseOperator",
    "achieved_acceleration",
    "combine",
    "espirit_maps",
    "fftc",
    "ifftc",
    "make_mask",
    "rss",
    "seed_from_case",
    "sense_operator",
    "simulate_multicoil",
    "support_mask",
]
