"""Augmentations of training patches that mimic other scanners and contrasts (issue 12).

The shipped prior saw one subject on one scanner; real slices from other scanners differ in
tissue contrast, receive-field shading, noise, resolution and ringing. Each augmentation below
imitates one of these on a complex patch `(2, P, P)` (channels real, imag; p99 of the magnitude
~ the patch's gain) and is applied with probability `probability`:

- tissue remap: magnitude -> a random piecewise-linear curve of it with `remap_knots` knots
  (f(0) = 0, so background stays dark; not monotone, so contrasts may invert as T1 -> T2);
- bias field: magnitude x exp(b), b a random polynomial of order 3 with |b| <= `bias_field`;
- coil shading: magnitude x the root-sum-of-squares of `shading_coils` Gaussian receive
  profiles on a circle around the patch (the shading of an RSS / adaptive coil combination);
- resolution: k-space cropped to a random kept fraction in `resolution_range` of each axis, by a
  box window (Gibbs ringing) or a Hann window (smooth blur), one of the two at random;
- noise: complex Gaussian noise with std uniform in [0, `noise_sigma`].

After the multiplicative fields and the remap the patch is rescaled to its former 99th
percentile, so the intensity jitter of engine.prior.data keeps its meaning. With every field at
its default nothing is drawn from the generator: the patch stream of a run is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ScannerAugmentConfig:
    """Scanner and contrast augmentations of the prior's training patches (all off by default)."""

    probability: float = 0.5
    """Chance that each enabled augmentation is applied to a patch (independently)."""
    remap_knots: int = 0
    """Tissue remap: number of random knots of the intensity curve on [0, 1.2] (0: off)."""
    bias_field: float = 0.0
    """Bias field: largest |log gain| of the random order-3 polynomial field (0: off)."""
    shading_coils: int = 0
    """Coil shading: number of Gaussian receive profiles combined by RSS (0: off)."""
    resolution_range: tuple[float, float] = (1.0, 1.0)
    """Resolution: kept fraction of each k-space axis, uniform in this range ((1, 1): off)."""
    noise_sigma: float = 0.0
    """Noise: largest std of the added complex Gaussian noise, per channel (0: off)."""

    def __post_init__(self) -> None:
        low, high = self.resolution_range
        if not 0 < low <= high <= 1:
            raise ValueError(f"resolution_range must satisfy 0 < low <= high <= 1, got {self.resolution_range}")
        if not 0 <= self.probability <= 1:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if min(self.remap_knots, self.shading_coils) < 0 or min(self.bias_field, self.noise_sigma) < 0:
            raise ValueError("remap_knots, shading_coils, bias_field and noise_sigma must be >= 0")

    @property
    def enabled(self) -> bool:
        return bool(self.remap_knots or self.bias_field or self.shading_coils or self.noise_sigma
                     or self.resolution_range[0] < 1)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _p99(magnitude: torch.Tensor) -> float:
    return float(torch.quantile(magnitude.flatten(), 0.99))


def _grid(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    axis = torch.linspace(-1, 1, p)
    return torch.meshgrid(axis, axis, indexing="ij")


def tissue_remap(magnitude: torch.Tensor, knots: int, g: torch.Generator) -> torch.Tensor:
    """A random piecewise-linear f(magnitude) with f(0) = 0 and `knots` values uniform in [0, 1.2]
    at equally spaced inputs in (0, 1.2]; constant beyond the last knot."""
    values = torch.cat([torch.zeros(1), 1.2 * torch.rand(knots, generator=g)])
    position = (magnitude.clamp(0, 1.2) / 1.2 * knots).clamp(max=knots - 1e-6)
    left = position.floor().long()
    weight = position - left
    return values[left] * (1 - weight) + values[left + 1] * weight


def bias_field(p: int, amplitude: float, g: torch.Generator) -> torch.Tensor:
    """exp(b) `(p, p)` with b a random polynomial of order <= 3 in [-1, 1]^2 scaled to max |b| = amplitude."""
    y, x = _grid(p)
    field = torch.zeros(p, p)
    for order in range(1, 4):
        for i in range(order + 1):
            field = field + _uniform(g, -1, 1) * x.pow(i) * y.pow(order - i)
    return torch.exp(amplitude * field / field.abs().max().clamp_min(1e-6))


def coil_shading(p: int, coils: int, g: torch.Generator) -> torch.Tensor:
    """RSS `(p, p)` of `coils` Gaussian profiles centred on a circle of radius 1-1.6 around the
    patch (coordinates [-1, 1]), widths 0.5-1.5, normalised to a maximum of 1."""
    y, x = _grid(p)
    rss = torch.zeros(p, p)
    start = _uniform(g, 0, 2 * math.pi)
    for c in range(coils):
        angle = start + 2 * math.pi * c / coils
        radius, width = _uniform(g, 1.0, 1.6), _uniform(g, 0.5, 1.5)
        cy, cx = radius * math.sin(angle), radius * math.cos(angle)
        rss = rss + torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / width**2) ** 2
    rss = rss.sqrt()
    return rss / rss.max()


def resolution_window(p: int, kept: tuple[float, float], ringing: bool) -> torch.Tensor:
    """Centred k-space window `(p, p)`: keeps the central fraction kept = (ky, kx) of each axis,
    with a box (Gibbs ringing) or a Hann taper over that band (no ringing)."""
    windows = []
    for fraction in kept:
        frequency = (torch.arange(p) - p // 2).abs().float()
        half = fraction * p / 2
        if ringing:
            windows.append((frequency <= half).float())
        else:
            windows.append(torch.where(frequency <= half, 0.5 * (1 + torch.cos(math.pi * frequency / half)),
                                       torch.zeros(())))
    return windows[0][:, None] * windows[1][None, :]


def augment_scanner(patch: torch.Tensor, cfg: ScannerAugmentConfig, g: torch.Generator) -> torch.Tensor:
    """`patch` `(2, P, P)` with the enabled augmentations of `cfg` applied (module docstring)."""
    if not cfg.enabled:
        return patch
    from engine.physics.fft import fftc, ifftc

    p = patch.shape[-1]
    image = torch.complex(patch[0], patch[1])
    target = _p99(image.abs())

    def chosen() -> bool:
        return float(torch.rand((), generator=g)) < cfg.probability

    if cfg.remap_knots and chosen():
        magnitude = image.abs()
        image = image * (tissue_remap(magnitude / max(target, 1e-8), cfg.remap_knots, g) * target
                         / magnitude.clamp_min(1e-12))
    if cfg.bias_field and chosen():
        image = image * bias_field(p, cfg.bias_field, g)
    if cfg.shading_coils and chosen():
        image = image * coil_shading(p, cfg.shading_coils, g)
    now = _p99(image.abs())
    if now > 0:
        image = image * (target / now)
    if cfg.resolution_range[0] < 1 and chosen():
        kept = (_uniform(g, *cfg.resolution_range), _uniform(g, *cfg.resolution_range))
        window = resolution_window(p, kept, ringing=float(torch.rand((), generator=g)) < 0.5)
        image = ifftc(fftc(image, dims=(-2, -1)) * window, dims=(-2, -1))
    if cfg.noise_sigma and chosen():
        sigma = _uniform(g, 0, cfg.noise_sigma)
        image = image + sigma * torch.complex(torch.randn(p, p, generator=g), torch.randn(p, p, generator=g))
    return torch.stack([image.real, image.imag]).to(patch.dtype)


__all__ = ["ScannerAugmentConfig", "augment_scanner", "bias_field", "coil_shading", "resolution_window",
           "tissue_remap"]
