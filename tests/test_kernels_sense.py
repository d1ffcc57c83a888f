"""kernels.sense: dc_loss, sense_forward and sense_adjoint on every backend against the composite
SENSE model (engine.physics.sense.sense_operator), under the Triton interpreter.

Tolerances: float32 paths agree with the composite to summation-order rounding (loss rtol 1e-5,
fields 2e-6 of their peak); the float64 gradchecks use torch's defaults.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from engine.physics.sense import sense_operator
from kernels import sense
from kernels.runtime import check_launchable, triton_available, triton_interpreter

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# (backend, fft): the torch reference, Triton elementwise + torch.fft, Triton with fused FFT.
PATHS = [("torch", "torch"), ("triton", "torch"), ("triton", "triton")]
# (batch, coils, height, width, maps batch): odd batch, 1 and 4 coils, s = -1 at 6 x 8 (and no
# power-of-two, so fft="triton" falls back to torch.fft there).
SHAPES = [(3, 4, 8, 8, 1), (3, 1, 16, 32, 3), (1, 4, 6, 8, 1)]
FIELD_TOLERANCE = 2e-6


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    with triton_interpreter():
        yield


def _inputs(batch, coils, height, width, maps_batch, density=0.3, dtype=torch.complex64, seed=3):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, height, width, dtype=dtype, generator=generator)
    maps = torch.randn(maps_batch, coils, height, width, dtype=dtype, generator=generator)
    mask = (torch.rand(height, width, generator=generator) < density).to(image.real.dtype)
    kspace = torch.randn(batch, coils, height, width, dtype=dtype, generator=generator)
    return image, maps, mask, kspace


def _composite_loss_and_gradient(image, maps, mask, kspace):
    image = image.detach().clone().requires_grad_()
    loss = torch.sum(torch.abs(sense_operator(maps, mask)(image) - mask * kspace) ** 2)
    loss.backward()
    return loss.detach(), image.grad


def _assert_close_to_peak(actual, expected, tolerance=FIELD_TOLERANCE):
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error < tolerance, f"relative error {error:.2e} >= {tolerance:.0e}"


def _inner(a, b):
    return torch.sum(a.conj() * b)


@pytest.mark.parametrize("backend, fft", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_dc_loss_value_and_gradient_match_the_composite(backend, fft, shape, density):
    image, maps, mask, kspace = _inputs(*shape, density=density)
    expected_loss, expected_gradient = _composite_loss_and_gradient(image, maps, mask, kspace)
    image = image.clone().requires_grad_()
    loss = sense.dc_loss(image, maps, mask, kspace, backend=backend, fft=fft)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-5, atol=0)
    _assert_close_to_peak(image.grad, expected_gradient)


@pytest.mark.parametrize("backend, fft", PATHS)
def test_dc_loss_without_gradient_equals_the_loss_with_it(backend, fft):
    image, maps, mask, kspace = _inputs(3, 4, 8, 8, 1)
    with torch.no_grad():
        plain = sense.dc_loss(image, maps, mask, kspace, backend=backend, fft=fft)
    tracked = sense.dc_loss(image.requires_grad_(), maps, mask, kspace, backend=backend, fft=fft)
    torch.testing.assert_close(plain, tracked.detach())


@pytest.mark.parametrize("backend, fft", PATHS)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_forward_and_adjoint_match_the_operators(backend, fft, shape):
    image, maps, mask, kspace = _inputs(*shape)
    operator = sense_operator(maps, mask)
    _assert_close_to_peak(sense.sense_forward(image, maps, mask, backend, fft), operator(image))
    _assert_close_to_peak(
        sense.sense_adjoint(kspace, maps, mask, backend, fft), operator.adjoint(kspace)
    )


@pytest.mark.parametrize("backend, fft", PATHS)
def test_adjoint_dot_product_through_the_dc_loss_function(backend, fft):
    """At x = 0 the dc_loss gradient is -2 A^H y (M binary); <A z, y> must equal <z, A^H y>."""
    _, maps, mask, kspace = _inputs(3, 4, 8, 16, 1)
    probe = torch.randn(3, 8, 16, dtype=torch.complex64, generator=torch.Generator().manual_seed(9))
    zero = torch.zeros_like(probe, requires_grad=True)
    sense.dc_loss(zero, maps, mask, kspace, backend=backend, fft=fft).backward()
    adjoint_of_data = -zero.grad / 2
    forward_of_probe = sense.sense_forward(probe, maps, mask, backend, fft)
    lhs, rhs = _inner(forward_of_probe, kspace), _inner(probe, adjoint_of_data)
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs), (lhs, rhs)


@pytest.mark.parametrize("backend, fft", PATHS)
def test_autograd_of_forward_is_the_adjoint(backend, fft):
    image, maps, mask, kspace = _inputs(1, 4, 8, 8, 1)
    image.requires_grad_()
    forward = sense.sense_forward(image, maps, mask, backend, fft)
    (gradient,) = torch.autograd.grad(forward, image, grad_outputs=kspace)
    _assert_close_to_peak(gradient, sense_operator(maps, mask).adjoint(kspace))
    lhs = _inner(forward.detach(), kspace)
    rhs = _inner(image.detach(), sense.sense_adjoint(kspace, maps, mask, backend, fft))
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


def test_float64_gradcheck_of_the_torch_dc_loss():
    image, maps, mask, kspace = _inputs(2, 2, 4, 6, 1, density=0.5, dtype=torch.complex128)
    image.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: sense.dc_loss(x, maps, mask, kspace, backend="torch"), (image,)
    )


def test_float64_gradcheck_of_the_torch_forward_and_adjoint():
    # fast_mode: random projections of the Jacobian (full Jacobians of these maps are 100s of rows).
    image, maps, mask, kspace = _inputs(2, 2, 4, 6, 2, density=0.5, dtype=torch.complex128)
    assert torch.autograd.gradcheck(
        lambda x: sense.sense_forward(x, maps, mask, backend="torch"),
        (image.requires_grad_(),),
        fast_mode=True,
    )
    assert torch.autograd.gradcheck(
        lambda k: sense.sense_adjoint(k, maps, mask, backend="torch"),
        (kspace.requires_grad_(),),
        fast_mode=True,
    )


def test_odd_sizes_use_the_shift_path_on_torch_and_are_refused_by_triton():
    image, maps, mask, kspace = _inputs(3, 2, 5, 8, 1)
    expected_loss, expected_gradient = _composite_loss_and_gradient(image, maps, mask, kspace)
    image.requires_grad_()
    loss = sense.dc_loss(image, maps, mask, kspace, backend="auto")
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss)
    torch.testing.assert_close(image.grad, expected_gradient)
    with pytest.raises(ValueError, match="even plane sizes"):
        sense.dc_loss(image, maps, mask, kspace, backend="triton")


def test_backend_and_fft_selection():
    cpu = torch.zeros(1)
    assert sense.resolve_backend("auto", cpu, 8, 8) == "torch"  # auto = triton on CUDA only
    assert sense.resolve_backend("auto", cpu, 7, 8) == "torch"  # odd: the fftshift form
    assert sense.resolve_backend("triton", cpu, 8, 8) == "triton"
    assert isinstance(sense.make_pipeline("triton", 16, 32), sense.FusedFFTPipeline)
    # 320 and 160 are no powers of two: the fused elementwise kernels run around torch.fft.
    fallback = sense.make_pipeline("triton", 320, 160)
    assert isinstance(fallback, sense.ElementwisePipeline) and fallback.fft2 is sense._torch_fft2
    with pytest.raises(ValueError, match="backend must be one of"):
        sense.resolve_backend("cuda", cpu, 8, 8)


def test_auto_backend_picks_triton_for_cuda_tensors_of_even_planes(monkeypatch):
    """The decision alone (no GPU here): only `is_cuda` of the tensor and Triton's presence count."""

    class CudaTensorStandIn:
        is_cuda = True

    monkeypatch.setattr(sense, "triton_available", lambda: True)
    assert sense.resolve_backend("auto", CudaTensorStandIn(), 16, 256) == "triton"
    assert sense.resolve_backend("auto", CudaTensorStandIn(), 15, 256) == "torch"  # odd: fftshift form
    monkeypatch.setattr(sense, "triton_available", lambda: False)
    assert sense.resolve_backend("auto", CudaTensorStandIn(), 16, 256) == "torch"


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda t: t.update(mask=torch.ones(8, 9)), ValueError, r"`mask` must have shape \(8, 8\)"),
        (
            lambda t: t.update(mask=torch.ones(8, 8, dtype=torch.complex64)),
            TypeError,
            "`mask` must be a real",
        ),
        (lambda t: t.update(kspace=t["kspace"][:, :2]), ValueError, "`kspace` shape"),
        (lambda t: t.update(maps=t["maps"].expand(2, -1, -1, -1)), ValueError, "`maps` shape"),
        (lambda t: t.update(image=t["image"].real), TypeError, "`image` must be a complex tensor"),
        (lambda t: t.update(maps=t["maps"].requires_grad_()), ValueError, "`maps` requires grad"),
        (lambda t: t.update(fft="cufft"), ValueError, "fft must be one of"),
    ],
)
def test_bad_inputs_get_clear_errors(change, error, message):
    image, maps, mask, kspace = _inputs(3, 4, 8, 8, 1)
    arguments = {
        "image": image,
        "maps": maps.clone(),
        "mask": mask,
        "kspace": kspace,
        "fft": "torch",
    }
    change(arguments)
    with pytest.raises(error, match=message):
        sense.dc_loss(backend="triton", **arguments)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_triton_backend_refuses_complex128_and_accepts_complex32():
    image, maps, mask, kspace = _inputs(1, 2, 8, 8, 1)
    with pytest.raises(TypeError, match="complex64"):
        sense.dc_loss(image.to(torch.complex128), maps, mask, kspace, backend="triton")
    half_image = image.to(torch.complex32)
    half = sense.dc_loss(half_image, maps, mask, kspace, backend="triton")
    # the kernels on the rounded values equal the composite operators on the same values...
    expected, _ = _composite_loss_and_gradient(half_image.to(torch.complex64), maps, mask, kspace)
    torch.testing.assert_close(half, expected, rtol=1e-5, atol=0)
    # ...and the rounding to half precision is visible, at its size (fp16: 2^-11 relative per value)
    full = sense.dc_loss(image, maps, mask, kspace, backend="triton")
    assert half != full
    torch.testing.assert_close(half, full, rtol=5e-3, atol=0)


def test_compiled_kernels_need_cuda_tensors():
    with pytest.raises(RuntimeError, match="need CUDA"):
        check_launchable(object(), {"image": torch.zeros(1)})


def test_interpreter_block_restores_modules_and_environment():
    triton_before = sys.modules["triton"]
    environment_before = os.environ.get("TRITON_INTERPRET")
    with triton_interpreter():
        assert os.environ["TRITON_INTERPRET"] == "1"
        assert sys.modules["triton"] is not triton_before
    assert sys.modules["triton"] is triton_before
    assert os.environ.get("TRITON_INTERPRET") == environment_before
