"""EDM preconditioning, denoiser and training loss (Karras et al. 2022, arXiv 2206.00364).

Complex images enter as (B, 2, H, W) float tensors, channels (real, imag), scaled by
:func:`engine.prior.normalise` (99th percentile of the magnitude = 1).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.prior.unet import UNet, UNetConfig

# Training noise distribution ln(sigma) ~ N(P_mean, P_std^2) (EDM Table 1, "Training").
P_MEAN = -1.2
P_STD = 1.2


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> dict[str, torch.Tensor]:
    """Preconditioning of EDM Table 1 ("Network and preconditioning").

    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = ln(s) / 4. Inputs and outputs have sigma's shape.
    """
    s2 = sigma.square()
    sd2 = sigma_data**2
    return {
        "c_skip": sd2 / (s2 + sd2),
        "c_out": sigma * sigma_data / (s2 + sd2).sqrt(),
        "c_in": 1.0 / (s2 + sd2).sqrt(),
        "c_noise": sigma.log() / 4.0,
    }


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (EDM Table 1): unit effective weight."""
    return (sigma.square() + sigma_data**2) / (sigma * sigma_data).square()


class EDMPrior(nn.Module):
    """Denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM Eq. 7).

    forward(x (B, 2, H, W) float, sigma (B,) or scalar) -> (B, 2, H, W): the estimate of the
    clean image E[x0 | x], i.e. a one-step (Tweedie) denoiser. The network runs in x's dtype or
    under an outer autocast; the skip connection and the result are float32.
    """

    def __init__(self, unet_config: UNetConfig | None = None, sigma_data: float = 0.5):
        super().__init__()
        self.unet = UNet(unet_config)
        self.sigma_data = float(sigma_data)

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"EDMPrior: sigma must be scalar or ({x.shape[0]},), got {tuple(sigma.shape)}")
        if not torch.all(sigma > 0):
            raise ValueError("EDMPrior: sigma must be > 0 (sigma = 0 means x is already clean)")
        c = edm_coefficients(sigma, self.sigma_data)
        view = (-1, 1, 1, 1)
        f = self.unet(c["c_in"].view(view) * x, c["c_noise"])
        return c["c_skip"].view(view) * x + c["c_out"].view(view) * f.float()


def sample_training_sigma(batch: int, generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """ln(sigma) ~ N(P_mean, P_std^2) (EDM Table 1): (batch,) float32."""
    normal = torch.randn(batch, generator=generator, device=device)
    return (normal * P_STD + P_MEAN).exp()


def edm_loss(model: nn.Module, clean: torch.Tensor, generator: torch.Generator | None = None,
             sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             sigma_data: float | None = None) -> torch.Tensor:
    """EDM training loss (Eq. 2 with the Table 1 weighting lambda), mean over pixels: scalar.

    model: an EDMPrior, possibly wrapped (DDP / DeepSpeed: pass ``sigma_data`` then).
    clean: (B, 2, H, W) float32 training images. sigma: optional (B,) noise levels (default:
    log-normal, EDM Table 1); noise: optional (B, 2, H, W) N(0, 1) draws (default: drawn from
    ``generator``), so that a run is reproducible and resumable exactly.
    """
    b = clean.shape[0]
    if sigma_data is None:
        sigma_data = getattr(model, "sigma_data", None)
        if sigma_data is None:
            sigma_data = model.module.sigma_data
    if sigma is None:
        sigma = sample_training_sigma(b, generator, clean.device)
    if noise is None:
        noise = torch.randn(clean.shape, generator=generator, device=clean.device)
    noisy = clean + sigma.view(-1, 1, 1, 1) * noise
    denoised = model(noisy, sigma)
    weight = edm_loss_weight(sigma, sigma_data).view(-1, 1, 1, 1)
    return (weight * (denoised.float() - clean).square()).mean()


__all__ = [
    "P_MEAN",
    "P_STD",
    "EDMPrior",
    "edm_coefficients",
    "edm_loss",
    "edm_loss_weight",
    "sample_training_sigma",
]
