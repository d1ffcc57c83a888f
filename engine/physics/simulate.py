"""Multicoil k-space simulated from a real magnitude image or volume (real anatomy, simulated
coils and phase).

    x    = magnitude * exp(i * phase)            phase: smooth random polynomial (seeded)
    y_c  = F(S_c x) + n_c                        S_c: birdcage maps with sum_c |S_c|^2 = 1
    n_c  ~ complex Gaussian, E|n|^2 = sigma^2    F: centred orthonormal FFT over all spatial axes

SNR is defined on the image the data can give back at full sampling: the mean magnitude of x
inside the object (magnitude > object_threshold * max) divided by sigma. F is unitary and
sum_c |S_c|^2 = 1, so sigma is also the noise standard deviation of the SENSE-combined fully
sampled image: SNR = mean object signal / noise std of that image.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from engine.physics.coils import birdcage_maps
from engine.physics.fft import fftc


class SimulatedCase(NamedTuple):
    """kspace `(coils, *shape)` complex64 centred; maps `(coils, *shape)` complex64; image `shape`
    complex64 (the ground truth). Unpacks as `kspace, maps, image = simulate_multicoil(...)`."""

    kspace: np.ndarray
    maps: np.ndarray
    image: np.ndarray


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def smooth_random_phase(
    shape: Sequence[int],
    seed: int | np.random.Generator = 0,
    max_variation: float = np.pi,
    order: int = 3,
) -> np.ndarray:
    """A smooth random phase map (radians), float32 of `shape` (2D or 3D).

    A polynomial of total degree 1..`order` in coordinates scaled to [-1, 1] with standard normal
    coefficients, scaled so that its largest |value| over the grid is `max_variation`, plus a
    constant offset uniform in [-pi, pi). Low order keeps it smooth, as B0 and receive phase are.
    """
    rng = _rng(seed)
    shape = tuple(int(n) for n in shape)
    if order < 1:
        raise ValueError(f"phase polynomial order must be >= 1, got {order}")
    axes = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    exponents = [
        powers
        for powers in itertools.product(range(order + 1), repeat=len(shape))
        if 1 <= sum(powers) <= order
    ]
    coefficients = rng.standard_normal(len(exponents))
    field = np.zeros(shape)
    for coefficient, powers in zip(coefficients, exponents):
        field += coefficient * np.prod([axis**p for axis, p in zip(axes, powers)], axis=0)
    field *= max_variation / max(np.abs(field).max(), 1e-12)
    offset = rng.uniform(-np.pi, np.pi)
    return (field + offset).astype(np.float32)


def object_mask(magnitude: np.ndarray, object_threshold: float = 0.05) -> np.ndarray:
    """bool mask of the object: magnitude above `object_threshold` times its maximum."""
    magnitude = np.abs(np.asarray(magnitude))
    return magnitude > object_threshold * magnitude.max()


def noise_std_for_snr(image: np.ndarray, snr: float, object_threshold: float = 0.05) -> float:
    """sigma (std of one complex k-space sample, E|n|^2 = sigma^2) that gives `snr` as defined in
    this module's docstring: mean |image| inside the object / sigma."""
    if not snr > 0:
        raise ValueError(f"snr must be > 0, got {snr}")
    magnitude = np.abs(np.asarray(image))
    return float(magnitude[object_mask(magnitude, object_threshold)].mean() / snr)


def simulate_multicoil(
    magnitude: np.ndarray,
    ncoils: int = 8,
    snr: float | None = 40.0,
    seed: int | np.random.Generator = 0,
    max_phase_variation: float = np.pi,
    phase_order: int = 3,
    relative_radius: float = 1.5,
    object_threshold: float = 0.05,
) -> SimulatedCase:
    """Multicoil k-space from a magnitude image `(ny, nx)` or volume `(x, y, z)`.

    Args:
        magnitude: real, non-negative, finite; any scale (the k-space inherits it).
        ncoils: number of birdcage coils (8 per ring in 3D, rings around z).
        snr: as defined in the module docstring; None (or inf) adds no noise.
        seed: int or Generator; the phase is drawn first, then the noise, so a case is
            reproducible from its seed alone.
        max_phase_variation, phase_order: of the smooth random phase (`smooth_random_phase`).
        relative_radius: of the coil ring (`birdcage_maps`).
        object_threshold: defines the object for the SNR.

    Returns:
        SimulatedCase(kspace `(coils, *shape)`, maps `(coils, *shape)`, image `shape`), complex64;
        a 3D k-space is `(coils, kx, ky, kz)`, centred along all three axes.
    """
    magnitude = np.asarray(magnitude)
    if magnitude.ndim not in (2, 3):
        raise ValueError(
            "magnitude must be an image (ny, nx) or a volume (x, y, z), "
            f"got shape {magnitude.shape}"
        )
    if np.iscomplexobj(magnitude) or not np.all(np.isfinite(magnitude)) or magnitude.min() < 0:
        raise ValueError("magnitude must be real, finite and non-negative")
    if not magnitude.any():
        raise ValueError("magnitude is all zero: nothing to simulate")
    rng = _rng(seed)
    phase = smooth_random_phase(magnitude.shape, rng, max_phase_variation, phase_order)
    image = (magnitude * np.exp(1j * phase)).astype(np.complex64)
    maps = birdcage_maps(ncoils, magnitude.shape, relative_radius)
    spatial_dims = tuple(range(-magnitude.ndim, 0))
    kspace = fftc(torch.from_numpy(maps * image), spatial_dims).numpy()
    if snr is not None and np.isfinite(snr):
        sigma = noise_std_for_snr(image, snr, object_threshold)
        noise = rng.standard_normal((2, *kspace.shape), dtype=np.float32)
        kspace = kspace + (sigma / np.sqrt(2)) * (noise[0] + 1j * noise[1])
    return SimulatedCase(kspace.astype(np.complex64), maps, image)
