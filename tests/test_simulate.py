"""Multicoil simulation (phase, coils, noise at a defined SNR) and the bundled example cases."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.io.examples import CASE_2D_PATH, DATA_DIR, bundled_case_3d
from engine.physics.coils import combine
from engine.physics.fft import fftc, ifftc
from engine.physics.simulate import (
    noise_std_for_snr,
    object_mask,
    simulate_multicoil,
    smooth_random_phase,
)

REPO = Path(__file__).resolve().parents[1]
COLIN_DIR = REPO.parent / "shared" / "data" / "volumes"


def _disc(shape) -> np.ndarray:
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grid))
    return np.where(radius < 0.7, 0.5 + 0.5 * (grid[0] > 0), 0.0).astype(np.float32)


def test_smooth_random_phase_seeded_bounded_smooth():
    a = smooth_random_phase((48, 40), seed=7, max_variation=2.0)
    assert a.shape == (48, 40) and a.dtype == np.float32
    np.testing.assert_array_equal(a, smooth_random_phase((48, 40), seed=7, max_variation=2.0))
    assert not np.allclose(a, smooth_random_phase((48, 40), seed=8, max_variation=2.0))
    # Polynomial of max |.| = 2 plus a constant: the spread is between 2 and 4 radians.
    assert 2.0 - 1e-5 <= a.max() - a.min() <= 4.0 + 1e-5
    # Smooth: a cubic on [-1, 1] changes little between neighbouring pixels.
    assert np.abs(np.diff(a, axis=0)).max() < 0.5 and np.abs(np.diff(a, axis=1)).max() < 0.5
    assert smooth_random_phase((6, 5, 4), seed=1).shape == (6, 5, 4)


@pytest.mark.parametrize("shape", [(40, 36), (16, 12, 10)], ids=["2d", "3d"])
def test_noiseless_simulation_is_the_forward_model(shape):
    magnitude = _disc(shape)
    kspace, maps, image = simulate_multicoil(magnitude, ncoils=4, snr=None, seed=3)
    assert kspace.shape == maps.shape == (4, *shape) and image.shape == shape
    assert kspace.dtype == maps.dtype == image.dtype == np.complex64
    np.testing.assert_allclose(np.abs(image), magnitude, atol=1e-6)
    dims = tuple(range(-len(shape), 0))
    expected = fftc(torch.from_numpy(maps * image), dims).numpy()
    np.testing.assert_allclose(kspace, expected, atol=1e-6)
    coil_images = ifftc(torch.from_numpy(kspace), dims).numpy()
    np.testing.assert_allclose(combine(coil_images, maps), image, atol=1e-5)
    # The phase is not trivial: it varies over the object.
    assert np.ptp(np.angle(image[magnitude > 0])) > 0.5


def test_noise_has_the_defined_snr():
    magnitude = _disc((128, 128))
    snr = 20.0
    noiseless = simulate_multicoil(magnitude, ncoils=8, snr=None, seed=11)
    noisy = simulate_multicoil(magnitude, ncoils=8, snr=snr, seed=11)  # same phase: drawn first
    noise = noisy.kspace - noiseless.kspace
    sigma = noise_std_for_snr(noiseless.image, snr)
    obj = object_mask(magnitude)
    assert sigma == pytest.approx(np.abs(magnitude[obj]).mean() / snr)
    # Complex Gaussian with E|n|^2 = sigma^2, real and imaginary parts independent, each sigma^2/2.
    assert np.sqrt(np.mean(np.abs(noise) ** 2)) == pytest.approx(sigma, rel=0.01)
    assert np.var(noise.real) == pytest.approx(np.var(noise.imag), rel=0.02)
    assert abs(np.mean(noise.real * noise.imag)) < 0.02 * sigma**2
    # SNR of the SENSE-combined fully sampled image is the requested one.
    coil_images = ifftc(torch.from_numpy(noisy.kspace)).numpy()
    image_noise = combine(coil_images, noisy.maps) - noisy.image
    measured = np.abs(noisy.image[obj]).mean() / np.sqrt(np.mean(np.abs(image_noise) ** 2))
    assert measured == pytest.approx(snr, rel=0.02)


def test_simulation_reproducible_and_seed_dependent():
    magnitude = _disc((32, 32))
    a = simulate_multicoil(magnitude, seed=5)
    b = simulate_multicoil(magnitude, seed=np.random.default_rng(5))
    c = simulate_multicoil(magnitude, seed=6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a.kspace, c.kspace)
    np.testing.assert_array_equal(a.maps, c.maps)  # the coils are fixed; phase and noise are drawn


def test_simulation_input_errors():
    with pytest.raises(ValueError, match="image .* or a volume"):
        simulate_multicoil(np.ones(8))
    with pytest.raises(ValueError, match="non-negative"):
        simulate_multicoil(-np.ones((8, 8)))
    with pytest.raises(ValueError, match="all zero"):
        simulate_multicoil(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="snr must be > 0"):
        simulate_multicoil(np.ones((8, 8)), snr=0)


def _self_consistent(kspace, maps, reference, noise_std, dims):
    """The stored k-space is F(S x) + noise: the residual has the stated noise level."""
    residual = kspace - fftc(torch.from_numpy(maps * reference), dims).numpy()
    return np.sqrt(np.mean(np.abs(residual) ** 2)) / noise_std


def test_bundled_2d_case(bundled_2d):
    case = bundled_2d
    assert case["kspace"].shape == case["maps"].shape == (8, 192, 192)
    assert case["reference"].shape == (192, 192)
    assert {case[k].dtype for k in ("kspace", "maps", "reference")} == {np.dtype(np.complex64)}
    assert (
        "simulated coils and phase" in case["description"] and "real anatomy" in case["description"]
    )
    assert case["name"] == "colin27_axial_z45mm_8coil"
    ratio = _self_consistent(
        case["kspace"], case["maps"], case["reference"], case["noise_std"], (-2, -1)
    )
    assert ratio == pytest.approx(1.0, rel=0.02)
    # The head fits in the field of view: the border is background.
    magnitude = np.abs(case["reference"])
    assert magnitude[[0, -1]].max() < 0.05 and magnitude[:, [0, -1]].max() < 0.05
    import h5py

    with h5py.File(CASE_2D_PATH, "r") as f:
        assert f["kspace"].shape == (1, 8, 192, 192)
        assert b"ismrmrdHeader" in f["ismrmrd_header"][()]


def test_bundled_3d_case():
    case = bundled_case_3d()
    assert case["kspace"].shape == case["maps"].shape == (8, 72, 64, 40)
    assert case["reference"].shape == (72, 64, 40)
    assert "simulated coils and phase" in case["description"]
    sigma = noise_std_for_snr(case["reference"], case["snr"])
    ratio = _self_consistent(case["kspace"], case["maps"], case["reference"], sigma, (-3, -2, -1))
    assert ratio == pytest.approx(1.0, rel=0.01)
    again = bundled_case_3d()
    np.testing.assert_array_equal(again["kspace"], case["kspace"])


def test_bundled_files_and_notice_are_shipped():
    sizes = {p.name: p.stat().st_size for p in DATA_DIR.iterdir() if p.is_file()}
    assert "colin27_COPYRIGHT.txt" in sizes and "README.md" in sizes
    # a few MB at most: 2D slice 4.1 MB, 1 mm 3D case 1.2 MB, its tuning case 1.9 MB, bundled 3D 0.07 MB
    assert sum(sizes.values()) < 8e6
    readme = (DATA_DIR / "README.md").read_text()
    assert "simulated coils and phase" in readme and "BSD-3" in readme


@pytest.mark.skipif(
    not (COLIN_DIR / "colin27_t1_1mm.nii.gz").exists(), reason="needs ../shared/data"
)
def test_generator_reproduces_the_committed_2d_case(tmp_path, monkeypatch, bundled_2d):
    spec = importlib.util.spec_from_file_location(
        "make_bundled_example", REPO / "scripts" / "make_bundled_example.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "CASE_2D_PATH", tmp_path / "case.h5")
    import h5py
    import nibabel as nib

    volume = np.asarray(nib.load(COLIN_DIR / "colin27_t1_1mm.nii.gz").dataobj)
    with h5py.File(script.make_case_2d(volume), "r") as f:
        np.testing.assert_allclose(f["kspace"][0], bundled_2d["kspace"], atol=1e-5)
        # not bit-equal: terms of 1e-16 (real parts of purely imaginary values) follow the summation order
        np.testing.assert_allclose(f["maps"][0], bundled_2d["maps"], rtol=0, atol=1e-6)
