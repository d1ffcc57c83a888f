"""Scanner and contrast augmentations of the prior's patches (engine/prior/augment.py): each does
what it imitates, none draws randomness when off, and the sampler applies them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.physics.fft import fftc
from engine.prior.augment import (
    ScannerAugmentConfig,
    augment_scanner,
    bias_field,
    coil_shading,
    resolution_window,
    tissue_remap,
)
from engine.prior.data import DataConfig, PatchSampler, VolumeSource

P = 32


def _patch(seed: int = 0) -> torch.Tensor:
    """A (2, P, P) complex patch: a bright disc with a smooth phase, p99 about 1."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, P), torch.linspace(-1, 1, P), indexing="ij")
    magnitude = (x**2 + y**2 < 0.6).float() * (0.6 + 0.4 * (x > 0).float())
    phase = 0.5 + seed * x
    return torch.stack([magnitude * torch.cos(phase), magnitude * torch.sin(phase)])


def _only(**fields) -> ScannerAugmentConfig:
    return ScannerAugmentConfig(probability=1.0, **fields)


def _complex(patch: torch.Tensor) -> torch.Tensor:
    return torch.complex(patch[0], patch[1])


def test_off_returns_the_patch_and_draws_nothing():
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    patch = _patch()
    assert augment_scanner(patch, ScannerAugmentConfig(), g) is patch
    assert torch.equal(g.get_state(), before)  # the patch stream of an existing run is unchanged


def test_tissue_remap_keeps_background_and_is_a_function_of_magnitude():
    g = torch.Generator().manual_seed(1)
    magnitude = torch.tensor([0.0, 0.3, 0.3, 0.9, 2.0, 5.0])
    out = tissue_remap(magnitude, 6, g)
    assert out[0] == 0 and out[1] == out[2] and out[4] == out[5]  # f(0) = 0; constant beyond 1.2
    assert (out >= 0).all() and (out <= 1.2).all()
    patch = _patch()
    remapped = _complex(augment_scanner(patch, _only(remap_knots=6), torch.Generator().manual_seed(2)))
    original = _complex(patch)
    inside = original.abs() > 0
    # the phase is kept wherever the curve is not 0; equal magnitudes map to equal magnitudes
    kept = inside & (remapped.abs() > 1e-6)
    assert kept.any()
    assert torch.angle(remapped[kept] * original[kept].conj()).abs().max() < 1e-4
    levels = {round(float(m), 4) for m in original.abs()[inside]}
    assert len({round(float(m), 4) for m in remapped.abs()[inside]}) <= len(levels)
    assert remapped[~inside].abs().max() == 0


def test_bias_field_is_smooth_positive_and_bounded():
    g = torch.Generator().manual_seed(4)
    field = bias_field(P, 0.4, g)
    assert field.min() > 0
    assert torch.log(field).abs().max() == pytest.approx(0.4, rel=1e-5)
    energy = fftc(field.to(torch.complex64), dims=(-2, -1)).abs() ** 2
    centre = energy[P // 2 - 4:P // 2 + 5, P // 2 - 4:P // 2 + 5].sum()
    assert centre / energy.sum() > 0.99  # an order-3 polynomial: low frequencies only


def test_coil_shading_is_smooth_and_shades():
    field = coil_shading(P, 8, torch.Generator().manual_seed(5))
    assert field.max() == pytest.approx(1.0) and field.min() > 0
    assert field.max() / field.min() > 1.2
    energy = fftc(field.to(torch.complex64), dims=(-2, -1)).abs() ** 2
    assert energy[P // 2 - 4:P // 2 + 5, P // 2 - 4:P // 2 + 5].sum() / energy.sum() > 0.99


@pytest.mark.parametrize("ringing", [True, False])
def test_resolution_window_removes_high_frequencies(ringing):
    window = resolution_window(P, (0.5, 0.25), ringing)
    frequency_y = (torch.arange(P) - P // 2).abs()
    assert window[frequency_y > 0.5 * P / 2].abs().max() == 0  # beyond the kept band along y
    assert window[:, frequency_y > 0.25 * P / 2].abs().max() == 0  # and along x
    assert window[P // 2, P // 2] == 1
    assert set(window.unique().tolist()) <= {0.0, 1.0} if ringing else len(window.unique()) > 2
    blurred = _complex(augment_scanner(_patch(), _only(resolution_range=(0.3, 0.3)), torch.Generator().manual_seed(6)))
    spectrum = fftc(blurred, dims=(-2, -1)).abs()
    assert spectrum[frequency_y > 0.3 * P / 2].max() < 1e-5 * spectrum.max()


def test_noise_has_the_drawn_size():
    patch = _patch()
    noisy = augment_scanner(patch, _only(noise_sigma=0.05), torch.Generator().manual_seed(7))
    std = float((noisy - patch).std())
    assert 0 < std <= 0.05 * 1.2


def test_fields_keep_the_patch_p99():
    patch = _patch()
    out = augment_scanner(patch, _only(bias_field=0.5, shading_coils=6), torch.Generator().manual_seed(8))
    p99 = lambda t: float(torch.quantile(_complex(t).abs().flatten(), 0.99))
    assert p99(out) == pytest.approx(p99(patch), rel=1e-4)
    assert not torch.allclose(out, patch)


def test_probability_zero_applies_nothing_but_keeps_the_draws():
    patch = _patch()
    config = ScannerAugmentConfig(probability=0.0, bias_field=0.5, noise_sigma=0.1)
    torch.testing.assert_close(augment_scanner(patch, config, torch.Generator().manual_seed(9)), patch)


def test_config_refuses_impossible_values():
    with pytest.raises(ValueError, match="resolution_range"):
        ScannerAugmentConfig(resolution_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="probability"):
        ScannerAugmentConfig(probability=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        ScannerAugmentConfig(noise_sigma=-0.1)


def test_sampler_applies_the_scanner_augmentations(tmp_path):
    rng = np.random.default_rng(0)
    volume = tmp_path / "v.npy"
    np.save(volume, (rng.random((20, 24, 24)) > 0.5).astype(np.float32) + 0.5)
    base = {"volumes": [VolumeSource(str(volume))], "patch_size": 16, "zoom_range": (1.0, 1.0)}
    plain = PatchSampler(DataConfig(**base)).sample(4, torch.Generator().manual_seed(1))
    scanner = _only(remap_knots=4, bias_field=0.3, shading_coils=4, resolution_range=(0.5, 0.9), noise_sigma=0.02)
    augmented = PatchSampler(DataConfig(**base, scanner=scanner)).sample(4, torch.Generator().manual_seed(1))
    assert augmented.shape == plain.shape == (4, 2, 16, 16)
    assert torch.isfinite(augmented).all() and not torch.allclose(augmented, plain)
    again = PatchSampler(DataConfig(**base, scanner=scanner)).sample(4, torch.Generator().manual_seed(1))
    assert torch.equal(augmented, again)  # seeded: a resumed run draws the same patches
