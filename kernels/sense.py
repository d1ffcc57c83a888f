"""The SENSE forward model, adjoint and data-consistency loss behind one call, with fused Triton
kernels as the fast path on CUDA: the call the 2D and 3D reconstruction loops make (through
engine.losses.dc.DataConsistency).

    loss = dc_loss(image, maps, mask, kspace)     # sum_{b,c,pixels} |M F(S_c x_b) - M y_bc|^2

Layouts (docs/ARCHITECTURE.md): image (B, height, width) complex64; maps (B or 1, C, height, width) complex64
(a batch of 1 is shared by the B images: 2D slices of one coil set; B maps for B readout positions
in 3D); mask (height, width) float32 0/1; kspace (B, C, height, width) complex64, centred (DC at n//2). F is the
centred orthonormal FFT of engine.physics.fft.fftc. The loss is the plain sum of squares, not
divided by the number of samples: the caller scales it (e.g. by 1 / mask.sum() / C / B for an MSE).

Backends (`backend=`):
  "torch"  engine.physics.sense, the definition of the model (plain autograd; any complex dtype,
           complex128 for gradcheck; odd height or width through the fftshift form).
  "triton" the Triton kernels of kernels.elementwise (complex64; even height and width, else ValueError),
           tested against "torch" (tests/test_kernels_sense.py).
  "auto"   "triton" for CUDA tensors with even plane sizes when triton is installed, else "torch".
FFT between the fused elementwise kernels (`fft=`, Triton only):
  "torch"  torch.fft (cuFFT on GPU): the default until benchmarks/kernels.py shows otherwise.
  "triton" the Triton Stockham FFT fused with the elementwise kernels (kernels.fused_fft) where
           both plane sizes are powers of two <= 512; other sizes (320, 160) silently use cuFFT.

On Triton, `dc_loss` is an autograd.Function: forward = kernel (1), FFT, kernel (2) (loss and the
masked residual in one pass); backward = 2 * dL * S^H F^H (M r) = inverse FFT then kernel (3). It
differentiates with respect to `image` only. `sense_forward` / `sense_adjoint` are autograd
Functions too (each one's backward is the other), with respect to image / kspace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from engine.physics import sense as model
from kernels.runtime import kernel_module, triton_available

BACKENDS = ("auto", "torch", "triton")
FFT_IMPLEMENTATIONS = ("torch", "triton")


# --- pipelines: which kernels and which FFT -------------------------------------------------


def _torch_fft2(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fft2(x, norm="ortho")


def _torch_ifft2(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft2(x, norm="ortho")


@dataclass(frozen=True)
class ElementwisePipeline:
    """Kernels (1)-(3) around an unshifted orthonormal 2D FFT.

    `ops` provides coil_expand_modulate, masked_residual, coil_combine_modulate
    (kernels.reference or kernels.elementwise); fft2 / ifft2 act on the last two axes.
    """

    ops: Any
    fft2: Callable[[torch.Tensor], torch.Tensor]
    ifft2: Callable[[torch.Tensor], torch.Tensor]

    def forward(self, image: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        spectrum = self.fft2(self.ops.coil_expand_modulate(image, maps))
        kspace, _ = self.ops.masked_residual(spectrum, mask, None, False, False)
        return kspace

    def adjoint(self, kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # masked_residual on centred data with premodulate=False gives M * m * y (see reference).
        premodulated, _ = self.ops.masked_residual(kspace, mask, None, False, False)
        return self.ops.coil_combine_modulate(self.ifft2(premodulated), maps)

    def loss_and_state(
        self,
        image: torch.Tensor,
        maps: torch.Tensor,
        mask: torch.Tensor,
        measured: torch.Tensor,
        keep_state: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        spectrum = self.fft2(self.ops.coil_expand_modulate(image, maps))
        premodulated_residual, loss = self.ops.masked_residual(spectrum, mask, measured, True, True)
        return loss, premodulated_residual

    def gradient(
        self, state: torch.Tensor, maps: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        return self.ops.coil_combine_modulate(self.ifft2(state), maps, scale)


@dataclass(frozen=True)
class FusedFFTPipeline:
    """The Triton FFT fused into kernels (1)-(3) (`ops`: kernels.fused_fft or kernels.reference);
    forward / adjoint alone run through `elementwise` (they are not the hot path)."""

    ops: Any
    elementwise: ElementwisePipeline

    def forward(self, image: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.elementwise.forward(image, maps, mask)

    def adjoint(self, kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.elementwise.adjoint(kspace, maps, mask)

    def loss_and_state(
        self,
        image: torch.Tensor,
        maps: torch.Tensor,
        mask: torch.Tensor,
        measured: torch.Tensor,
        keep_state: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        row_spectrum = self.ops.expand_fft_rows(image, maps)
        state, loss = self.ops.fft_columns_residual(row_spectrum, mask, measured, keep_state)
        return loss, state

    def gradient(
        self, state: torch.Tensor, maps: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        return self.ops.ifft_rows_combine(state, maps, scale)


def _triton_fft2_pipeline(elementwise: ModuleType) -> ElementwisePipeline:
    fft = kernel_module("stockham_fft")
    return ElementwisePipeline(
        ops=elementwise,
        fft2=lambda x: fft.fft_axis(fft.fft_axis(x, -1), -2),
        ifft2=lambda x: fft.fft_axis(fft.fft_axis(x, -1, inverse=True), -2, inverse=True),
    )


def triton_fft_applies(height: int, width: int) -> bool:
    """Whether the Triton FFT handles a height x width plane (both powers of two in [2, 512])."""
    return all(2 <= n <= 512 and n & (n - 1) == 0 for n in (height, width))


def make_pipeline(fft: str, height: int, width: int) -> ElementwisePipeline | FusedFFTPipeline:
    """The Triton pipeline for this FFT choice and plane size."""
    elementwise = kernel_module("elementwise")
    if fft == "triton" and triton_fft_applies(height, width):
        return FusedFFTPipeline(kernel_module("fused_fft"), _triton_fft2_pipeline(elementwise))
    return ElementwisePipeline(elementwise, _torch_fft2, _torch_ifft2)


def resolve_backend(backend: str, tensor: torch.Tensor, height: int, width: int) -> str:
    """ "torch" or "triton" for these inputs (module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    even = height % 2 == 0 and width % 2 == 0
    if backend == "triton":
        if not even:
            raise ValueError(
                f"the Triton SENSE kernels need even plane sizes (centring by modulation), got "
                f"{height} x {width}; use backend='torch' (fftshift path) for odd sizes"
            )
        return "triton"
    if backend == "auto" and even and tensor.is_cuda and triton_available():
        return "triton"
    return "torch"


# --- input checks ------------------------------------------------------------------------------


def _check_complex(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_complex():
        kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise TypeError(f"`{name}` must be a complex tensor {layout}, got {kind}")
    if tensor.dim() != ndim:
        raise ValueError(f"`{name}` must be {layout}, got shape {tuple(tensor.shape)}")


def _check_maps(maps: torch.Tensor, batch: int, height: int, width: int) -> None:
    _check_complex("maps", maps, 4, "(B or 1, C, height, width)")
    if maps.shape[0] not in (1, batch) or tuple(maps.shape[2:]) != (height, width):
        raise ValueError(
            f"`maps` shape {tuple(maps.shape)} does not fit (B or 1, C, {height}, {width}), B = {batch}"
        )


def _check_mask(mask: torch.Tensor, height: int, width: int) -> None:
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        raise TypeError("`mask` must be a real (0/1) tensor of shape (height, width)")
    if tuple(mask.shape) != (height, width):
        raise ValueError(f"`mask` must have shape ({height}, {width}), got {tuple(mask.shape)}")


def _check_kspace(kspace: torch.Tensor, batch: int, n_coils: int, height: int, width: int) -> None:
    _check_complex("kspace", kspace, 4, "(B, C, height, width)")
    if tuple(kspace.shape) != (batch, n_coils, height, width):
        raise ValueError(
            f"`kspace` shape {tuple(kspace.shape)} != (B, C, height, width) = {(batch, n_coils, height, width)}"
        )


def _check_devices(**tensors: torch.Tensor) -> None:
    devices = {name: tensor.device for name, tensor in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def _as_complex64(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """complex32 is upcast (exact); complex128 is refused rather than silently rounded."""
    if tensor.dtype == torch.complex64:
        return tensor
    if tensor.dtype == torch.complex32:
        return tensor.to(torch.complex64)
    raise TypeError(
        f"the Triton backend computes in complex64; `{name}` is {tensor.dtype} "
        "(use backend='torch' for complex128)"
    )


def _refuse_grad(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.requires_grad:
            raise ValueError(
                f"`{name}` requires grad, but these fused operators differentiate only "
                "with respect to the image (forward, loss) or k-space (adjoint); detach it, or use "
                "backend='torch' (engine.physics.sense) for other gradients"
            )


# --- autograd Functions ---------------------------------------------------------------------


class _DataConsistencyLoss(torch.autograd.Function):
    """loss = sum |M F(S x) - M y|^2; grad_x = 2 * dL * S^H F^H (M r) from the saved residual."""

    @staticmethod
    def forward(ctx, image, maps, mask, measured, pipeline):  # type: ignore[override]
        keep_state = ctx.needs_input_grad[0]
        loss, state = pipeline.loss_and_state(image, maps, mask, measured, keep_state)
        ctx.pipeline = pipeline
        ctx.save_for_backward(state if keep_state else None, maps)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):  # type: ignore[override]
        state, maps = ctx.saved_tensors
        grad_image = ctx.pipeline.gradient(state, maps, 2 * grad_loss)
        return grad_image, None, None, None, None


class _SenseForward(torch.autograd.Function):
    """k = M F(S x); the vector-Jacobian product of a linear map is its adjoint."""

    @staticmethod
    def forward(ctx, image, maps, mask, pipeline):  # type: ignore[override]
        ctx.save_for_backward(maps, mask)
        ctx.pipeline = pipeline
        return pipeline.forward(image, maps, mask)

    @staticmethod
    def backward(ctx, grad_kspace):  # type: ignore[override]
        maps, mask = ctx.saved_tensors
        return _SenseAdjoint.apply(grad_kspace, maps, mask, ctx.pipeline), None, None, None


class _SenseAdjoint(torch.autograd.Function):
    """x = S^H F^H (M k); its vector-Jacobian product is the forward operator."""

    @staticmethod
    def forward(ctx, kspace, maps, mask, pipeline):  # type: ignore[override]
        ctx.save_for_backward(maps, mask)
        ctx.pipeline = pipeline
        return pipeline.adjoint(kspace, maps, mask)

    @staticmethod
    def backward(ctx, grad_image):  # type: ignore[override]
        maps, mask = ctx.saved_tensors
        return _SenseForward.apply(grad_image, maps, mask, ctx.pipeline), None, None, None


# --- public API -------------------------------------------------------------------------------


def _prepare(
    backend: str, fft: str, height: int, width: int, differentiated: str, tensors: dict[str, torch.Tensor]
) -> tuple[ElementwisePipeline | FusedFFTPipeline | None, dict[str, torch.Tensor]]:
    """The Triton pipeline (None: the torch backend); checks gradients and dtypes for Triton."""
    if fft not in FFT_IMPLEMENTATIONS:
        raise ValueError(f"fft must be one of {FFT_IMPLEMENTATIONS}, got {fft!r}")
    if resolve_backend(backend, tensors[differentiated], height, width) == "torch":
        return None, tensors
    _refuse_grad(**{name: t for name, t in tensors.items() if name != differentiated})
    tensors = {name: _as_complex64(name, t) if t.is_complex() else t for name, t in tensors.items()}
    return make_pipeline(fft, height, width), tensors


def sense_forward(
    image: torch.Tensor,
    maps: torch.Tensor,
    mask: torch.Tensor,
    backend: str = "auto",
    fft: str = "torch",
) -> torch.Tensor:
    """M F(S_c x_b): image (B, height, width) -> masked centred k-space (B, C, height, width), complex.

    Differentiable with respect to `image` (backward = sense_adjoint).
    """
    _check_complex("image", image, 3, "(B, height, width)")
    batch, height, width = image.shape
    _check_maps(maps, batch, height, width)
    _check_mask(mask, height, width)
    _check_devices(image=image, maps=maps, mask=mask)
    pipeline, t = _prepare(backend, fft, height, width, "image", {"image": image, "maps": maps, "mask": mask})
    if pipeline is None:
        return model.forward(image, maps, mask)
    return _SenseForward.apply(t["image"], t["maps"], t["mask"], pipeline)


def sense_adjoint(
    kspace: torch.Tensor,
    maps: torch.Tensor,
    mask: torch.Tensor,
    backend: str = "auto",
    fft: str = "torch",
) -> torch.Tensor:
    """S^H F^H (M y): k-space (B, C, height, width) -> image (B, height, width), complex.

    Differentiable with respect to `kspace` (backward = sense_forward).
    """
    _check_complex("kspace", kspace, 4, "(B, C, height, width)")
    batch, n_coils, height, width = kspace.shape
    _check_maps(maps, batch, height, width)
    if maps.shape[1] != n_coils:
        raise ValueError(f"`maps` has {maps.shape[1]} coils, `kspace` has {n_coils}")
    _check_mask(mask, height, width)
    _check_devices(kspace=kspace, maps=maps, mask=mask)
    pipeline, t = _prepare(backend, fft, height, width, "kspace", {"kspace": kspace, "maps": maps, "mask": mask})
    if pipeline is None:
        return model.adjoint(kspace, maps, mask)
    return _SenseAdjoint.apply(t["kspace"], t["maps"], t["mask"], pipeline)


def dc_loss(
    image: torch.Tensor,
    maps: torch.Tensor,
    mask: torch.Tensor,
    kspace: torch.Tensor,
    backend: str = "auto",
    fft: str = "torch",
) -> torch.Tensor:
    """Data-consistency loss sum_{b,c,pixels} |M F(S_c x_b) - M y_bc|^2 (plain sum; 0-dim).

    Args:
        image: (B, height, width) complex64 (complex128 with backend="torch"); differentiated.
        maps: (B or 1, C, height, width) complex; mask: (height, width) real 0/1; kspace: (B, C, height, width)
            complex measured data y (masked or not: M is applied to it). Not differentiated.
        backend: "auto" | "torch" | "triton" (module docstring); fft: "torch" | "triton".
    Returns:
        0-dim float32 tensor (float64 for complex128 inputs on the torch backend).
    """
    _check_complex("image", image, 3, "(B, height, width)")
    batch, height, width = image.shape
    _check_maps(maps, batch, height, width)
    _check_mask(mask, height, width)
    _check_kspace(kspace, batch, maps.shape[1], height, width)
    _check_devices(image=image, maps=maps, mask=mask, kspace=kspace)
    pipeline, t = _prepare(
        backend, fft, height, width, "image", {"image": image, "maps": maps, "mask": mask, "kspace": kspace}
    )
    if pipeline is None:
        return model.residual_sum(image, maps, mask, kspace)
    return _DataConsistencyLoss.apply(t["image"], t["maps"], t["mask"], t["kspace"], pipeline)
