"""Property tests of the SENSE model (engine.physics.sense): one list of operators, every property over it.

Each case builds (operator, input shape, output shape) for a dtype. Shapes mix even and odd sizes
on purpose: the centring (DC at n // 2) is where odd sizes go wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
import torch

from engine.physics import sense
from engine.physics.fft import fftc, ifftc
from engine.physics.sense import LinearOperator, sense_operator

DTYPES = [torch.complex64, torch.complex128]
# Relative tolerances of inner products and elementwise comparisons per dtype.
RTOL = {torch.complex64: 1e-5, torch.complex128: 1e-12}


class OperatorCase(NamedTuple):
    op: LinearOperator
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def _randn(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=gen)


def _mask(shape, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) < 0.4).float()


class _CentredFFT(LinearOperator):
    """fftc over `dims` as an operator: its adjoint must be ifftc."""

    def __init__(self, dims):
        self.dims = dims

    def forward(self, x):
        return fftc(x, self.dims)

    def adjoint(self, y):
        return ifftc(y, self.dims)


def _fft_2d(dtype, gen):
    return OperatorCase(_CentredFFT((-2, -1)), (3, 7, 6), (3, 7, 6))


def _fft_one_axis(dtype, gen):
    # The 1D readout iFFT that turns 3D k-space into hybrid space acts on one axis only.
    return OperatorCase(_CentredFFT((-3,)), (2, 5, 4, 3), (2, 5, 4, 3))


def _sense_full(dtype, gen):
    return OperatorCase(sense_operator(_randn((4, 6, 5), dtype, gen)), (6, 5), (4, 6, 5))


def _sense_masked(dtype, gen):
    op = sense_operator(_randn((4, 7, 6), dtype, gen), _mask((7, 6), gen))
    return OperatorCase(op, (7, 6), (4, 7, 6))


def _sense_hybrid_3d(dtype, gen):
    # A batch of 3 readout positions, each its own 2D (ky, kz) problem with its own maps and
    # the shared (ky, kz) mask: image (x, ky, kz) -> k-space (x, coils, ky, kz).
    maps, mask = _randn((3, 4, 6, 5), dtype, gen), _mask((6, 5), gen)
    return OperatorCase(sense_operator(maps, mask), (3, 6, 5), (3, 4, 6, 5))


OPERATORS: dict[str, Callable[[torch.dtype, torch.Generator], OperatorCase]] = {
    "fft_2d": _fft_2d,
    "fft_one_axis": _fft_one_axis,
    "sense_full": _sense_full,
    "sense_masked": _sense_masked,
    "sense_hybrid_3d": _sense_hybrid_3d,
}

operator_cases = pytest.mark.parametrize("name", list(OPERATORS))
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["c64", "c128"])


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> = sum(conj(a) * b)."""
    return torch.vdot(a.flatten(), b.flatten())


@operator_cases
@dtypes
def test_adjoint_dot_product(name, dtype, torch_gen):
    case = OPERATORS[name](dtype, torch_gen)
    x = _randn(case.in_shape, dtype, torch_gen)
    y = _randn(case.out_shape, dtype, torch_gen)
    ax, ahy = case.op.forward(x), case.op.adjoint(y)
    assert ax.shape == case.out_shape and ahy.shape == case.in_shape
    assert ax.dtype == dtype and ahy.dtype == dtype
    lhs, rhs = _inner(ax, y), _inner(x, ahy)
    scale = (ax.norm() * y.norm()).item()
    assert abs(lhs - rhs).item() <= RTOL[dtype] * scale, (lhs, rhs)


@operator_cases
@dtypes
def test_linearity(name, dtype, torch_gen):
    case = OPERATORS[name](dtype, torch_gen)
    x1, x2 = _randn(case.in_shape, dtype, torch_gen), _randn(case.in_shape, dtype, torch_gen)
    a, b = torch.tensor(0.7 - 1.3j, dtype=dtype), torch.tensor(-2.1 + 0.4j, dtype=dtype)
    lhs = case.op(a * x1 + b * x2)
    rhs = a * case.op(x1) + b * case.op(x2)
    torch.testing.assert_close(lhs, rhs, rtol=RTOL[dtype], atol=RTOL[dtype] * rhs.abs().max())


@operator_cases
@dtypes
def test_autograd_vjp_is_adjoint(name, dtype, torch_gen):
    case = OPERATORS[name](dtype, torch_gen)
    x = _randn(case.in_shape, dtype, torch_gen).requires_grad_(True)
    v = _randn(case.out_shape, dtype, torch_gen)
    (grad,) = torch.autograd.grad(case.op(x), x, grad_outputs=v)
    expected = case.op.adjoint(v)
    torch.testing.assert_close(
        grad, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * expected.abs().max()
    )


@operator_cases
@dtypes
def test_normal_operator(name, dtype, torch_gen):
    case = OPERATORS[name](dtype, torch_gen)
    x = _randn(case.in_shape, dtype, torch_gen)
    normal = case.op.normal(x)
    torch.testing.assert_close(normal, case.op.adjoint(case.op.forward(x)))
    # <x, A^H A x> = ||A x||^2: real and non-negative.
    quad = _inner(x, normal)
    norm_sq = case.op.forward(x).norm() ** 2
    assert abs(quad.imag).item() <= RTOL[dtype] * norm_sq.item() * 10
    assert abs(quad.real - norm_sq).item() <= RTOL[dtype] * norm_sq.item() * 10


@pytest.mark.parametrize("dims", [(-2, -1), (-1,), (0,), (-3, -2, -1)], ids=str)
@pytest.mark.parametrize("shape", [(4, 6, 8), (3, 7, 5)], ids=str)
@dtypes
def test_fftc_matches_numpy(dims, shape, dtype, rng):
    x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex128)
    ref_k = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, dims), axes=dims, norm="ortho"), dims)
    ref_x = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(x, dims), axes=dims, norm="ortho"), dims)
    xt = torch.from_numpy(x).to(dtype)
    k, img = fftc(xt, dims), ifftc(xt, dims)
    assert k.dtype == dtype and img.dtype == dtype
    scale = np.abs(x).max()
    assert np.abs(k.numpy() - ref_k).max() <= 1e-6 * scale
    assert np.abs(img.numpy() - ref_x).max() <= 1e-6 * scale
    torch.testing.assert_close(ifftc(k, dims), xt, rtol=RTOL[dtype], atol=1e-6 * scale)


def test_fftc_dc_at_centre():
    """A constant image has all its energy at index n // 2 (the convention of ../shared/data)."""
    img = torch.ones(5, 6, dtype=torch.complex64)
    k = fftc(img)
    assert k.abs().argmax().item() == (5 // 2) * 6 + 6 // 2
    assert torch.isclose(k[2, 3].real, torch.tensor(30.0**0.5))


def test_fft_accepts_single_int_axis():
    x = torch.randn(4, 6, dtype=torch.complex64)
    torch.testing.assert_close(fftc(x, -1), fftc(x, (-1,)))
    torch.testing.assert_close(ifftc(x, 0), ifftc(x, (0,)))


@pytest.mark.parametrize("shape", [(8, 12), (6, 10), (7, 5)], ids=str)  # s = +1, s = -1, odd
@dtypes
def test_residual_sum_is_the_masked_residual_of_forward(shape, dtype, torch_gen):
    """The modulation form of residual_sum (even sizes) equals |M F S x - M y|^2, value and gradient."""
    maps, mask = _randn((2, 3, 4, *shape), dtype, torch_gen), _mask(shape, torch_gen)
    image = _randn((2, 3, *shape), dtype, torch_gen).requires_grad_(True)
    kspace = _randn((2, 3, 4, *shape), dtype, torch_gen)
    got = sense.residual_sum(image, maps, mask, kspace)
    want = (sense.forward(image, maps, mask) - mask * kspace).abs().square().sum()
    torch.testing.assert_close(got, want, rtol=RTOL[dtype], atol=0)
    (grad_got,), (grad_want,) = (torch.autograd.grad(v, image) for v in (got, want))
    torch.testing.assert_close(grad_got, grad_want, rtol=RTOL[dtype], atol=RTOL[dtype] * grad_want.abs().max())


def test_centring_sign_and_checkerboard():
    assert (sense.centring_sign(8, 12), sense.centring_sign(6, 8)) == (1, -1)
    assert sense.checkerboard(2, 3, torch.float32, "cpu").tolist() == [[1, -1, 1], [-1, 1, -1]]
    with pytest.raises(ValueError, match="even plane sizes"):
        sense.centring_sign(7, 8)


def test_operator_input_errors():
    with pytest.raises(TypeError, match="coil maps must be complex"):
        sense_operator(torch.ones(2, 4, 4))
    with pytest.raises(TypeError, match="mask must be real"):
        sense_operator(torch.ones(2, 4, 4, dtype=torch.complex64), torch.ones(4, 4, dtype=torch.complex64))
