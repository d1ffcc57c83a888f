"""2D EDM diffusion prior: U-Net, EDM preconditioning, samplers, checkpoint format.

Typical use (the reconstruction loop):
    prior = load_prior()                       # shipped weights, float32, eval mode
    scaled, scale = normalise(image)           # image (H, W) complex; 99th pct. magnitude -> 1
    x = complex_to_channels(scaled)[None]      # (1, 2, H, W), H and W multiples of 8
    denoised = prior(x + sigma * noise, sigma) # one-step (Tweedie) denoiser D(x; sigma)
    x0 = ode_to_x0(prior, x_t, sigma_t, steps=10)  # INFusion's 10-step Euler ODE to sigma = 0
"""

from engine.prior.checkpoint import default_prior_path, freeze, load_prior, read_arch, save_prior
from engine.prior.edm import (
    EDMPrior,
    edm_coefficients,
    edm_loss,
    edm_loss_weight,
    sample_training_sigma,
)
from engine.prior.intensity import (
    INTENSITY_NORMALISATION,
    channels_to_complex,
    complex_to_channels,
    magnitude_scale,
    normalise,
)
from engine.prior.sampler import edm_time_steps, ode_to_x0, sample
from engine.prior.unet import UNet, UNetConfig, count_parameters

__all__ = [
    "INTENSITY_NORMALISATION",
    "EDMPrior",
    "UNet",
    "UNetConfig",
    "channels_to_complex",
    "complex_to_channels",
    "count_parameters",
    "default_prior_path",
    "edm_coefficients",
    "edm_loss",
    "edm_loss_weight",
    "edm_time_steps",
    "freeze",
    "load_prior",
    "magnitude_scale",
    "normalise",
    "ode_to_x0",
    "read_arch",
    "sample",
    "sample_training_sigma",
    "save_prior",
]
