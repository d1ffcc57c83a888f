"""Triton kernels (1)-(3) against their torch references, run by the Triton interpreter on CPU.

The module-scoped fixture swaps in an interpreted triton for these tests only
(kernels.runtime.triton_interpreter restores modules and TRITON_INTERPRET afterwards).
Tolerances: float32 elementwise products agree to rounding (a few ulp); loss sums differ only in
summation order (relative 1e-5).
"""

from __future__ import annotations

import pytest
import torch

from engine.physics.fft import fftc, ifftc
from kernels import reference
from kernels.runtime import kernel_module, triton_available, triton_interpreter

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# (batch, coils, height, width, maps batch): odd batch, 1 / 4 / 16 coils, shared and per-image maps,
# sign s = -1 (6 x 8), a plane size that is not a multiple of the block (34 x 34), 64 x 64.
SHAPES = [
    (3, 4, 8, 8, 1),
    (1, 1, 6, 8, 1),
    (3, 4, 16, 32, 3),
    (2, 3, 34, 34, 2),
    (1, 16, 64, 64, 1),
]
DENSITIES = [0.25, 1.0]


@pytest.fixture(scope="module", autouse=True)
def elementwise():
    with triton_interpreter():
        yield kernel_module("elementwise")


def _inputs(batch, coils, height, width, maps_batch, density, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def complex_normal(*shape):
        return torch.randn(*shape, dtype=torch.complex64, generator=generator)

    image = complex_normal(batch, height, width)
    maps = complex_normal(maps_batch, coils, height, width)
    mask = (torch.rand(height, width, generator=generator) < density).float()
    measured = complex_normal(batch, coils, height, width)
    return image, maps, mask, measured


def test_complex_views_round_trip_through_the_interpreter(elementwise):
    """Triton has no complex dtype: the kernels see view_as_real float32 pairs."""
    image, maps, _, _ = _inputs(1, 1, 4, 4, 1, 1.0)
    ones = torch.ones_like(maps)
    out = elementwise.coil_expand_modulate(image, ones)
    expected = (
        image * reference.centring_sign(4, 4) * reference.checkerboard(4, 4, torch.float32, "cpu")
    )
    torch.testing.assert_close(out[:, 0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_coil_expand_modulate_matches_reference(elementwise, shape):
    image, maps, _, _ = _inputs(*shape, density=1.0)
    torch.testing.assert_close(
        elementwise.coil_expand_modulate(image, maps), reference.coil_expand_modulate(image, maps)
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("premodulate", [False, True])
def test_masked_residual_matches_reference(elementwise, shape, density, premodulate):
    image, maps, mask, measured = _inputs(*shape, density=density)
    spectrum = torch.fft.fft2(reference.coil_expand_modulate(image, maps), norm="ortho")
    out, loss = elementwise.masked_residual(spectrum, mask, measured, premodulate)
    expected_out, expected_loss = reference.masked_residual(spectrum, mask, measured, premodulate)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    unsampled = mask == 0
    assert torch.all(out[..., unsampled] == 0), "the residual must vanish off the mask"


def test_masked_residual_without_data_or_loss(elementwise):
    image, maps, mask, _ = _inputs(3, 4, 16, 32, 1, density=0.25)
    spectrum = torch.fft.fft2(reference.coil_expand_modulate(image, maps), norm="ortho")
    out, loss = elementwise.masked_residual(spectrum, mask, None, False, compute_loss=False)
    assert loss is None
    expected, _ = reference.masked_residual(spectrum, mask, None, False)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_coil_combine_modulate_matches_reference(elementwise, shape):
    _, maps, _, coil_images = _inputs(*shape, density=1.0)
    scale = torch.tensor(-2.5)
    torch.testing.assert_close(
        elementwise.coil_combine_modulate(coil_images, maps, scale),
        reference.coil_combine_modulate(coil_images, maps, scale),
    )
    torch.testing.assert_close(
        elementwise.coil_combine_modulate(coil_images, maps),
        reference.coil_combine_modulate(coil_images, maps),
    )


@pytest.mark.parametrize("height, width", [(8, 8), (6, 8), (6, 10), (16, 32), (10, 12)])
def test_centring_identity_of_the_references(height, width):
    """fftc = s m fft2(m .) and ifftc = s m ifft2(m .) for even sizes, exactly as documented."""
    x = torch.randn(2, height, width, dtype=torch.complex128)
    m = reference.checkerboard(height, width, torch.float64, "cpu")
    s = reference.centring_sign(height, width)
    assert s == (-1) ** (height // 2 + width // 2)
    torch.testing.assert_close(fftc(x), s * m * torch.fft.fft2(m * x, norm="ortho"))
    torch.testing.assert_close(ifftc(x), s * m * torch.fft.ifft2(m * x, norm="ortho"))


def test_references_compose_to_the_centred_sense_model():
    """Kernel (1) + fft2 + kernel (2) = M fftc(S x) - M y, as the operators compute it."""
    image, maps, mask, measured = _inputs(3, 4, 6, 8, 1, density=0.5)
    spectrum = torch.fft.fft2(reference.coil_expand_modulate(image, maps), norm="ortho")
    residual, loss = reference.masked_residual(spectrum, mask, measured)
    expected = mask * fftc(maps * image.unsqueeze(1)) - mask * measured
    torch.testing.assert_close(residual, expected)
    torch.testing.assert_close(loss, (expected.abs() ** 2).sum())


def test_odd_sizes_are_refused_with_a_clear_error(elementwise):
    image, maps, _, _ = _inputs(1, 1, 5, 8, 1, density=1.0)
    with pytest.raises(ValueError, match="even plane sizes"):
        elementwise.coil_expand_modulate(image, maps)


def test_maps_batch_must_be_one_or_the_image_batch(elementwise):
    image, _, _, _ = _inputs(3, 1, 8, 8, 1, density=1.0)
    maps = torch.ones(2, 1, 8, 8, dtype=torch.complex64)
    with pytest.raises(ValueError, match="batch 2 must be 1 or the image batch 3"):
        elementwise.coil_expand_modulate(image, maps)
