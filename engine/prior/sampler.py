"""Deterministic EDM samplers (Karras et al. 2022): time steps of Eq. 5, Euler and Heun
(Algorithm 1, deterministic), and an ODE integration from a given noise level down to 0.

The probability-flow ODE with sigma(t) = t, s(t) = 1 (EDM Eq. 1 / Table 1, "VE"-style as used by
the EDM sampler): dx/dsigma = (x - D(x; sigma)) / sigma.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""D(x (B, C, H, W), sigma (B,)) -> (B, C, H, W), e.g. an :class:`engine.prior.EDMPrior`."""

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


def edm_time_steps(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                   rho: float = RHO) -> torch.Tensor:
    """EDM Eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < N,
    followed by sigma_N = 0. Returns (steps + 1,) float64, decreasing from sigma_max to 0."""
    if steps < 1:
        raise ValueError(f"edm_time_steps: steps must be >= 1, got {steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"edm_time_steps: need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(steps, dtype=torch.float64)
    frac = i / max(steps - 1, 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def _per_sample_schedule(sigma_start: torch.Tensor, steps: int, sigma_min: float,
                         rho: float) -> torch.Tensor:
    """Eq. 5 with sigma_max = sigma_start per sample: (steps + 1, B) float64, last row 0.

    A sample whose sigma_start is below sigma_min gets a single step from sigma_start to 0.
    """
    start = sigma_start.double()
    i = torch.arange(steps, dtype=torch.float64, device=start.device)[:, None]
    frac = i / max(steps - 1, 1)
    lo = torch.clamp(torch.full_like(start, sigma_min), max=start) ** (1.0 / rho)
    hi = start ** (1.0 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros_like(start)[None]], dim=0)


def _integrate(denoiser: Denoiser, x: torch.Tensor, schedule: torch.Tensor, heun: bool) -> torch.Tensor:
    """Deterministic EDM Algorithm 1 (Heun; Euler without the correction) over a schedule of shape
    (N + 1, B) (per-sample sigmas; last row 0). x: (B, C, H, W) at noise level schedule[0]."""
    view = (-1,) + (1,) * (x.ndim - 1)
    x = x.float()
    for t_cur, t_next in itertools.pairwise(schedule):
        t_cur32, t_next32 = t_cur.float(), t_next.float()
        active = t_cur32 > 0  # samples that already reached 0 stay put
        if not torch.any(active):
            break
        safe_cur = torch.where(active, t_cur32, torch.ones_like(t_cur32))
        d_cur = (x - denoiser(x, safe_cur)) / safe_cur.view(view)  # Alg. 1 line 4
        dt = torch.where(active, t_next32 - t_cur32, torch.zeros_like(t_cur32)).view(view)
        x_next = x + dt * d_cur  # Alg. 1 line 5 (Euler step)
        if heun and bool(torch.all(t_next32[active] > 0)):
            # Alg. 1 lines 6-8: second-order correction, skipped on the last step to sigma = 0.
            safe_next = torch.where(active, t_next32, torch.ones_like(t_next32))
            d_next = (x_next - denoiser(x_next, safe_next)) / safe_next.view(view)
            x_next = x + dt * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


@torch.no_grad()
def sample(denoiser: Denoiser, shape: tuple[int, ...], steps: int = 18, heun: bool = True,
           sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
           seed: int | None = 0, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw samples from pure noise: x_0 ~ N(0, sigma_max^2 I), then Algorithm 1 (deterministic).

    shape: (B, 2, H, W). With ``heun=True`` one sample costs 2 * steps - 1 denoiser calls.
    The initial noise comes from ``generator`` or, if None, from a generator seeded with ``seed``:
    the same seed gives the same samples. Returns (B, 2, H, W) float32.
    """
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)
    x = torch.randn(shape, generator=generator, device=device) * sigma_max
    steps_1d = edm_time_steps(steps, sigma_min, sigma_max, rho).to(device)
    schedule = steps_1d[:, None].expand(-1, shape[0])
    return _integrate(denoiser, x, schedule, heun)


@torch.no_grad()
def ode_to_x0(denoiser: Denoiser, x_t: torch.Tensor, sigma_start: torch.Tensor | float,
              steps: int = 10, rho: float = RHO, sigma_min: float = SIGMA_MIN,
              heun: bool = False) -> torch.Tensor:
    """Integrate the probability-flow ODE from x_t at noise level sigma_start down to sigma = 0.

    x_t: (B, 2, H, W); sigma_start: scalar or (B,) per-sample noise level. Time steps: EDM Eq. 5
    with sigma_max = sigma_start (per sample), ``steps`` steps ending at 0 (INFusion's prior term
    uses a 10-step Euler ODE from t to 0). Costs ``steps`` denoiser calls (2 * steps - 1 with Heun).
    Returns (B, 2, H, W) float32 without gradient.
    """
    if steps < 1:
        raise ValueError(f"ode_to_x0: steps must be >= 1, got {steps}")
    start = torch.as_tensor(sigma_start, dtype=torch.float32, device=x_t.device)
    if start.ndim == 0:
        start = start.expand(x_t.shape[0])
    if start.shape != (x_t.shape[0],):
        raise ValueError(f"ode_to_x0: sigma_start must be scalar or ({x_t.shape[0]},), got {tuple(start.shape)}")
    if torch.any(start < 0):
        raise ValueError("ode_to_x0: sigma_start must be >= 0")
    schedule = _per_sample_schedule(start, steps, sigma_min, rho)
    return _integrate(denoiser, x_t, schedule, heun)


__all__ = ["RHO", "SIGMA_MAX", "SIGMA_MIN", "Denoiser", "edm_time_steps", "ode_to_x0", "sample"]
