"""Triton Stockham FFT (kernel 4) and the fused FFT kernels against torch, under the interpreter.

Tolerance: a radix-2 float32 FFT of length n has error ~ log2(n) ulp relative to the largest
output; 2e-6 of the peak covers n = 512 with margin (measured ~2e-7).
"""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.runtime import kernel_module, triton_available, triton_interpreter

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

FFT_TOLERANCE = 2e-6


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    with triton_interpreter():
        yield


@pytest.fixture(scope="module")
def fft():
    return kernel_module("stockham_fft")


@pytest.fixture(scope="module")
def fused():
    return kernel_module("fused_fft")


def _assert_close_to_peak(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error < tolerance, f"relative error {error:.2e} >= {tolerance:.0e}"


# (shape, dim): both axes of a plane, a middle axis with inner stride 3, lengths 2..512.
CASES = [
    ((3, 2), -1),
    ((3, 8), -1),
    ((2, 512), -1),
    ((5, 16, 32), -1),
    ((5, 16, 32), -2),
    ((2, 64, 3), 1),
    ((512, 2), 0),
]


@pytest.mark.parametrize("shape, dim", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("inverse", [False, True])
def test_fft_axis_matches_torch_fft(fft, shape, dim, inverse):
    x = torch.randn(shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    _assert_close_to_peak(
        fft.fft_axis(x, dim, inverse), reference.fft_axis(x, dim, inverse), FFT_TOLERANCE
    )


@pytest.mark.parametrize("norm", ["backward", "forward"])
def test_fft_axis_normalisations(fft, norm):
    x = torch.randn(4, 16, dtype=torch.complex64)
    for inverse in (False, True):
        _assert_close_to_peak(
            fft.fft_axis(x, -1, inverse, norm),
            reference.fft_axis(x, -1, inverse, norm),
            FFT_TOLERANCE,
        )


def test_fft_axis_on_both_axes_is_the_2d_fft(fft):
    x = torch.randn(3, 32, 16, dtype=torch.complex64)
    _assert_close_to_peak(
        fft.fft_axis(fft.fft_axis(x, -1), -2), torch.fft.fft2(x, norm="ortho"), FFT_TOLERANCE
    )


@pytest.mark.parametrize("length", [1, 3, 320, 1024])
def test_fft_axis_refuses_unsupported_lengths(fft, length):
    with pytest.raises(ValueError, match="power-of-two lengths 2..512"):
        fft.fft_axis(torch.zeros(2, length, dtype=torch.complex64))


def test_fft_axis_refuses_other_dtypes(fft):
    with pytest.raises(TypeError, match="complex64"):
        fft.fft_axis(torch.zeros(2, 8, dtype=torch.complex128))


# Fused kernels: (batch, coils, height, width, maps batch).
FUSED_SHAPES = [(3, 4, 8, 8, 1), (3, 1, 16, 32, 3), (1, 16, 8, 4, 1), (1, 2, 2, 4, 1)]


def _inputs(batch, coils, height, width, maps_batch, density=0.4, seed=2):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, height, width, dtype=torch.complex64, generator=generator)
    maps = torch.randn(maps_batch, coils, height, width, dtype=torch.complex64, generator=generator)
    mask = (torch.rand(height, width, generator=generator) < density).float()
    measured = torch.randn(batch, coils, height, width, dtype=torch.complex64, generator=generator)
    return image, maps, mask, measured


@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_expand_fft_rows_matches_reference(fused, shape):
    image, maps, _, _ = _inputs(*shape)
    _assert_close_to_peak(
        fused.expand_fft_rows(image, maps), reference.expand_fft_rows(image, maps), FFT_TOLERANCE
    )


@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("inverse_columns", [False, True])
def test_fft_columns_residual_matches_reference(fused, shape, inverse_columns):
    image, maps, mask, measured = _inputs(*shape)
    rows = reference.expand_fft_rows(image, maps)
    state, loss = fused.fft_columns_residual(rows, mask, measured, inverse_columns)
    expected_state, expected_loss = reference.fft_columns_residual(
        rows, mask, measured, inverse_columns
    )
    _assert_close_to_peak(state, expected_state, FFT_TOLERANCE)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ifft_rows_combine_matches_reference(fused, shape):
    _, maps, _, coil_images = _inputs(*shape)
    scale = torch.tensor(0.75)
    _assert_close_to_peak(
        fused.ifft_rows_combine(coil_images, maps, scale),
        reference.ifft_rows_combine(coil_images, maps, scale),
        FFT_TOLERANCE,
    )


def test_fused_chain_is_the_centred_dc_residual_and_its_adjoint(fused):
    """rows FFT, columns FFT + residual, rows iFFT + combine = 2 S^H ifftc(M r), r the residual."""
    from engine.physics.fft import fftc, ifftc

    image, maps, mask, measured = _inputs(3, 4, 8, 16, 1)
    state, loss = fused.fft_columns_residual(fused.expand_fft_rows(image, maps), mask, measured)
    gradient = fused.ifft_rows_combine(state, maps, torch.tensor(2.0))
    residual = mask * fftc(maps * image.unsqueeze(1)) - mask * measured
    torch.testing.assert_close(loss, (residual.abs() ** 2).sum(), rtol=1e-5, atol=0)
    expected = 2 * (maps.conj() * ifftc(mask * residual)).sum(dim=1)
    _assert_close_to_peak(gradient, expected, FFT_TOLERANCE)


def test_fused_kernels_refuse_non_power_of_two_planes(fused):
    image, maps, _, _ = _inputs(1, 1, 8, 10, 1)
    with pytest.raises(ValueError, match="width is 10"):
        fused.expand_fft_rows(image, maps)
