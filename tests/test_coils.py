"""Coil maps: birdcage simulation, SENSE combination, ESPIRiT on the bundled example, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.physics.coils import (
    birdcage_maps,
    combine,
    espirit_maps,
    espirit_maps_hybrid,
    rss,
    support_mask,
    validate_maps,
)
from engine.physics.fft import fftc, ifftc
from engine.physics.simulate import object_mask


@pytest.fixture(scope="module")
def espirit_2d(bundled_2d) -> np.ndarray:
    """ESPIRiT maps of the fully sampled bundled 2D case (about 3 s; computed once)."""
    return espirit_maps(bundled_2d["kspace"])


def test_birdcage_maps_normalised_distinct_and_smooth_2d_and_3d():
    maps_2d = birdcage_maps(8, (40, 48))
    maps_3d = birdcage_maps(12, (24, 32, 16), coils_per_ring=6)
    for maps, shape in ((maps_2d, (8, 40, 48)), (maps_3d, (12, 24, 32, 16))):
        assert maps.shape == shape and maps.dtype == np.complex64
        np.testing.assert_allclose(np.sum(np.abs(maps) ** 2, axis=0), 1.0, rtol=1e-5)
        # Distinct: no two coils alike.
        flat = maps.reshape(len(maps), -1)
        correlation = np.abs(flat.conj() @ flat.T) / np.outer(*[np.linalg.norm(flat, axis=1)] * 2)
        assert correlation[~np.eye(len(maps), dtype=bool)].max() < 0.99
        # Smooth: > 95 % of their energy in the central quarter of k-space along every axis.
        spatial = tuple(range(1, maps.ndim))
        energy = np.abs(fftc(torch.from_numpy(maps), spatial).numpy()) ** 2
        centre = (slice(None), *[slice(n // 2 - n // 8, n // 2 + n // 8) for n in shape[1:]])
        assert energy[centre].sum() > 0.95 * energy.sum()


def test_birdcage_3d_rings_surround_z():
    """One ring, volume (x, y, z): the middle z plane is the 2D pattern of the (x, y) plane."""
    nx, ny, nz = 12, 10, 8
    maps_3d = birdcage_maps(8, (nx, ny, nz))
    # sigpy's 2D maps are (coils, rows, cols); our plane is (x, y) with x first.
    maps_2d = birdcage_maps(8, (ny, nx)).transpose(0, 2, 1)
    np.testing.assert_allclose(maps_3d[..., nz // 2], maps_2d, atol=1e-5)
    # Two rings stacked along z: the second ring's coils are stronger at the other end of z.
    two_rings = np.abs(birdcage_maps(16, (nx, ny, nz)))
    assert two_rings[0, :, :, 0].mean() > two_rings[0, :, :, -1].mean()
    assert two_rings[8, :, :, -1].mean() > two_rings[8, :, :, 0].mean()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_combine_inverts_coil_multiplication_and_rss(backend, rng):
    maps = birdcage_maps(6, (9, 11))
    image = (rng.standard_normal((9, 11)) + 1j * rng.standard_normal((9, 11))).astype(np.complex64)
    maps[:, 0, :] = 0  # no sensitivity on one row: combine must give 0 there, not NaN
    coil_images = maps * image
    if backend == "torch":
        maps, coil_images = torch.from_numpy(maps), torch.from_numpy(coil_images)
    combined, magnitude = combine(coil_images, maps), rss(coil_images)
    combined, magnitude = np.asarray(combined), np.asarray(magnitude)
    np.testing.assert_allclose(combined[1:], image[1:], rtol=1e-5, atol=1e-6)
    assert np.all(combined[0] == 0)
    np.testing.assert_allclose(magnitude[1:], np.abs(image[1:]), rtol=1e-5)


def test_combine_on_hybrid_layout(rng):
    """Hybrid maps are (x, coils, y, z): coil_axis=1."""
    maps = birdcage_maps(4, (5, 6, 7)).transpose(1, 0, 2, 3)
    volume = rng.standard_normal((5, 6, 7)).astype(np.complex64)
    np.testing.assert_allclose(
        combine(maps * volume[:, None], maps, coil_axis=1), volume, atol=1e-5
    )


def test_support_mask():
    maps = birdcage_maps(4, (6, 6))
    maps[:, :2] = 0
    support = support_mask(maps)
    assert support.dtype == np.float32 and support.shape == (6, 6)
    assert support[:2].sum() == 0 and support[2:].all()
    assert support_mask(maps.transpose(1, 0, 2)[None], coil_axis=2).shape == (1, 6, 6)


def test_espirit_reproduces_bundled_coil_images(bundled_2d, espirit_2d):
    """ESPIRiT maps span the coil images: S * combine(y) = y up to the noise (inside the support).

    With noise of std sigma per coil pixel, projecting onto the one-dimensional span of S leaves
    the noise of the other coils - 1 dimensions: expected residual sigma * sqrt((coils - 1) n).
    """
    kspace, reference = bundled_2d["kspace"], bundled_2d["reference"]
    coil_images = ifftc(torch.from_numpy(kspace)).numpy()
    maps = espirit_2d
    assert maps.shape == kspace.shape and maps.dtype == np.complex64
    support = support_mask(maps) > 0
    inside = object_mask(reference)
    assert support[inside].mean() > 0.999  # the object lies inside the ESPIRiT support
    np.testing.assert_allclose(np.sum(np.abs(maps[:, support]) ** 2, axis=0), 1.0, rtol=1e-4)
    residual = maps * combine(coil_images, maps) - coil_images
    ncoils = len(maps)
    noise_floor = bundled_2d["noise_std"] * np.sqrt((ncoils - 1) * support.sum())
    assert np.linalg.norm(residual[:, support]) < 1.1 * noise_floor
    assert np.linalg.norm(residual[:, support]) / np.linalg.norm(coil_images[:, support]) < 0.1
    # The combined magnitude matches the ground truth to the noise level (the phase is coil 0's).
    combined = np.abs(combine(coil_images, maps))
    nrmse = np.linalg.norm(combined[inside] - np.abs(reference[inside])) / np.linalg.norm(
        reference[inside]
    )
    assert nrmse < 2 * bundled_2d["noise_std"] / np.abs(reference[inside]).mean()


def test_espirit_hybrid_matches_per_position_2d(rng):
    """Hybrid (x, coils, ky, kz) ESPIRiT = 2D ESPIRiT of each readout position, and it fits."""
    maps_true = birdcage_maps(4, (3, 32, 24))  # (coils, x, y, z)
    y, z = np.mgrid[:32, :24]
    blob = ((y - 16) ** 2 / 120 + (z - 12) ** 2 / 60 < 1).astype(np.float32)
    volume = blob[None] * np.exp(1j * rng.uniform(-0.3, 0.3, size=(3, 1, 1))).astype(np.complex64)
    hybrid = fftc(torch.from_numpy(maps_true * volume), (-2, -1)).numpy().transpose(1, 0, 2, 3)
    maps = espirit_maps_hybrid(hybrid, calib_width=16, progress=False)
    assert maps.shape == hybrid.shape and maps.dtype == np.complex64
    np.testing.assert_allclose(maps[1], espirit_maps(hybrid[1], calib_width=16), atol=1e-6)
    coil_images = ifftc(torch.from_numpy(hybrid), (-2, -1)).numpy()
    inside = np.broadcast_to(blob > 0, (3, 32, 24))
    residual = maps * combine(coil_images, maps, coil_axis=1)[:, None] - coil_images
    assert np.linalg.norm(residual.transpose(1, 0, 2, 3)[:, inside]) < 1e-2 * np.linalg.norm(
        coil_images
    )


def test_espirit_input_errors_and_undersampled_centre_warning(bundled_2d):
    kspace = bundled_2d["kspace"][:, 80:112, 80:112]
    with pytest.raises(TypeError, match="complex"):
        espirit_maps(np.abs(kspace))
    with pytest.raises(ValueError, match=r"\(coils, ny, nx\)"):
        espirit_maps(kspace[0])
    with pytest.raises(ValueError, match="calib_width 40 exceeds"):
        espirit_maps(kspace, calib_width=40)
    holes = kspace.copy()
    holes[:, ::2] = 0
    with pytest.warns(UserWarning, match="50% of the 24-wide ESPIRiT calibration region"):
        espirit_maps(holes)


def test_validate_maps_errors():
    good = birdcage_maps(2, (4, 5))
    assert validate_maps(torch.from_numpy(good), (2, 4, 5)).dtype == np.complex64
    assert validate_maps(np.abs(good), (2, 4, 5), "real.npy").dtype == np.complex64
    bad_nan = good.copy()
    bad_nan[0, 1, 1] = np.nan
    with pytest.raises(
        ValueError, match=r"maps.h5:maps: coil maps of shape \(2, 4, 5\) do not match"
    ):
        validate_maps(good, (3, 4, 5), "maps.h5:maps")
    with pytest.raises(ValueError, match="1 NaN/inf"):
        validate_maps(bad_nan, (2, 4, 5))
    with pytest.raises(ValueError, match="all zero"):
        validate_maps(np.zeros_like(good), (2, 4, 5))
    with pytest.raises(ValueError, match="dtype int64"):
        validate_maps(np.ones((2, 4, 5), dtype=np.int64), (2, 4, 5))
