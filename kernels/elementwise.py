"""Triton kernels (1)-(3): the elementwise passes around an unshifted FFT of the SENSE model.

(1) coil expansion fused with the centring modulation, (2) centring + mask + residual + partial
sums of |r|^2, (3) adjoint coil combination fused with the modulation. Torch references with the
same signatures: `kernels.reference` (see there for the centring identity and the sign s).

Complex tensors are passed as their `torch.view_as_real` float32 views: element e of a complex64
tensor is the float pair at 2e, 2e + 1. Each program loads a (BLOCK, 2) tile and splits it, so that
one pixel is one 8-byte access (coalesced).

Block sizes are untuned (no GPU was available while writing them); they are module constants so
that benchmarks/kernels.py can report with them and a later tuning changes one line.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.physics.sense import centring_sign
from kernels.runtime import check_launchable

ELEMENTWISE_BLOCK = 1024  # pixels per program for kernels (1) and (2)
COMBINE_BLOCK = 256  # pixels per program for (3): it loops over coils, so keep more programs
NUM_WARPS = 4


@triton.jit
def load_complex(ptr, element_offsets, inside):
    """(re, im) of complex elements at `element_offsets` (any shape) of a float32 pair view."""
    pair = tl.arange(0, 2)
    offsets = tl.expand_dims(element_offsets * 2, -1) + pair
    values = tl.load(ptr + offsets, mask=tl.expand_dims(inside, -1), other=0.0)
    return tl.split(values)


@triton.jit
def store_complex(ptr, element_offsets, inside, re, im):
    """Store (re, im) at complex `element_offsets` of a float32 pair view."""
    pair = tl.arange(0, 2)
    offsets = tl.expand_dims(element_offsets * 2, -1) + pair
    tl.store(ptr + offsets, tl.join(re, im), mask=tl.expand_dims(inside, -1))


@triton.jit
def checkerboard_sign(pixel, width):
    """(-1)^(u+v) as float32 for flat pixel indices u * width + v."""
    parity = (pixel // width + pixel % width) & 1
    return (1 - 2 * parity).to(tl.float32)


# --- (1) coil expansion x modulation ----------------------------------------------------------


@triton.jit
def _coil_expand_modulate_kernel(
    image_ptr,  # (B, height, width, 2) float32: the complex64 image x
    maps_ptr,  # (B_maps, C, height, width, 2) float32: coil maps S, B_maps in {1, B}
    out_ptr,  # (B, C, height, width, 2) float32: s * m * S_c * x_b
    maps_batch_stride,  # complex elements between maps of consecutive b (0 when shared)
    n_coils,
    plane_size,  # height * width
    width,
    sign,  # s = (-1)^(height/2 + width/2)
    BLOCK: tl.constexpr,
):
    pixel_block = tl.program_id(0)
    coil = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    pixel = pixel_block * BLOCK + tl.arange(0, BLOCK)
    inside = pixel < plane_size

    x_re, x_im = load_complex(image_ptr, batch * plane_size + pixel, inside)
    s_re, s_im = load_complex(
        maps_ptr, batch * maps_batch_stride + coil * plane_size + pixel, inside
    )
    modulation = sign * checkerboard_sign(pixel, width)
    out_re = (s_re * x_re - s_im * x_im) * modulation
    out_im = (s_re * x_im + s_im * x_re) * modulation
    store_complex(out_ptr, (batch * n_coils + coil) * plane_size + pixel, inside, out_re, out_im)


def maps_batch_stride_of(maps: torch.Tensor, batch: int, name: str = "maps") -> int:
    """Complex elements between the maps of consecutive images: C*height*width, or 0 for shared maps."""
    if maps.shape[0] == batch:
        return maps.shape[1] * maps.shape[2] * maps.shape[3]
    if maps.shape[0] == 1:
        return 0
    raise ValueError(f"`{name}` batch {maps.shape[0]} must be 1 or the image batch {batch}")


def coil_expand_modulate(image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Triton kernel (1): s * m * S_c * x_b, (B, C, height, width) complex64.

    Args:
        image: (B, height, width) complex64. maps: (B or 1, C, height, width) complex64.
    """
    image, maps = image.contiguous(), maps.contiguous()
    check_launchable(_coil_expand_modulate_kernel, {"image": image, "maps": maps})
    batch, height, width = image.shape
    n_coils = maps.shape[1]
    out = torch.empty((batch, n_coils, height, width), dtype=torch.complex64, device=image.device)
    plane_size = height * width
    grid = (triton.cdiv(plane_size, ELEMENTWISE_BLOCK), n_coils, batch)
    _coil_expand_modulate_kernel[grid](
        torch.view_as_real(image),
        torch.view_as_real(maps),
        torch.view_as_real(out),
        maps_batch_stride_of(maps, batch),
        n_coils,
        plane_size,
        width,
        float(centring_sign(height, width)),
        BLOCK=ELEMENTWISE_BLOCK,
        num_warps=NUM_WARPS,
    )
    return out


# --- (2) centring, mask, residual, partial sums -----------------------------------------------


@triton.jit
def _masked_residual_kernel(
    spectrum_ptr,  # (B*C, height, width, 2) float32: unshifted FFT output K
    mask_ptr,  # (height, width) float32: sampling mask M
    measured_ptr,  # (B*C, height, width, 2) float32: centred measured k-space y (if HAS_MEASURED)
    out_ptr,  # (B*C, height, width, 2) float32: r = M m K - M y, or m M r when PREMODULATE
    partial_ptr,  # (B*C * n_pixel_blocks,) float32: per-program sum of |r|^2
    plane_size,  # height * width
    width,
    HAS_MEASURED: tl.constexpr,
    PREMODULATE: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pixel_block = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    pixel = pixel_block * BLOCK + tl.arange(0, BLOCK)
    inside = pixel < plane_size
    element = plane * plane_size + pixel

    k_re, k_im = load_complex(spectrum_ptr, element, inside)
    modulation = checkerboard_sign(pixel, width)
    sampled = tl.load(mask_ptr + pixel, mask=inside, other=0.0)
    r_re = sampled * modulation * k_re
    r_im = sampled * modulation * k_im
    if HAS_MEASURED:
        y_re, y_im = load_complex(measured_ptr, element, inside)
        r_re -= sampled * y_re
        r_im -= sampled * y_im
    if COMPUTE_LOSS:
        partial = tl.sum(r_re * r_re + r_im * r_im, axis=0)
        tl.store(partial_ptr + plane * tl.num_programs(0) + pixel_block, partial)
    if PREMODULATE:
        r_re = r_re * (sampled * modulation)
        r_im = r_im * (sampled * modulation)
    store_complex(out_ptr, element, inside, r_re, r_im)


def as_float_mask(mask: torch.Tensor, height: int, width: int, device: torch.device) -> torch.Tensor:
    """The (height, width) sampling mask as a contiguous float32 tensor on `device`."""
    if mask.is_complex():
        raise TypeError("`mask` must be real (0/1), got a complex tensor")
    if mask.numel() != height * width:
        raise ValueError(f"`mask` must have {height} x {width} entries, got shape {tuple(mask.shape)}")
    return mask.reshape(height, width).to(device=device, dtype=torch.float32).contiguous()


def masked_residual(
    spectrum: torch.Tensor,
    mask: torch.Tensor,
    measured: torch.Tensor | None = None,
    premodulate: bool = False,
    compute_loss: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton kernel (2); semantics and shapes as `kernels.reference.masked_residual`.

    The loss is the sum of per-program partial sums (float32, deterministic, no atomics).
    """
    spectrum = spectrum.contiguous()
    *_, height, width = spectrum.shape
    planes = spectrum.numel() // (height * width)
    mask = as_float_mask(mask, height, width, spectrum.device)
    tensors = {"spectrum": spectrum, "mask": mask}
    if measured is not None:
        if measured.shape != spectrum.shape:
            raise ValueError(
                f"`measured` shape {tuple(measured.shape)} != spectrum {tuple(spectrum.shape)}"
            )
        measured = measured.contiguous()
        tensors["measured"] = measured
    check_launchable(_masked_residual_kernel, tensors)
    plane_size = height * width
    n_blocks = triton.cdiv(plane_size, ELEMENTWISE_BLOCK)
    out = torch.empty_like(spectrum)
    partials = torch.empty(planes * n_blocks if compute_loss else 1, device=spectrum.device)
    _masked_residual_kernel[(n_blocks, planes)](
        torch.view_as_real(spectrum),
        mask,
        torch.view_as_real(measured if measured is not None else spectrum),
        torch.view_as_real(out),
        partials,
        plane_size,
        width,
        HAS_MEASURED=measured is not None,
        PREMODULATE=premodulate,
        COMPUTE_LOSS=compute_loss,
        BLOCK=ELEMENTWISE_BLOCK,
        num_warps=NUM_WARPS,
    )
    return out, (partials.sum() if compute_loss else None)


# --- (3) adjoint: conj(S) coil sum x modulation -----------------------------------------------


@triton.jit
def _coil_combine_modulate_kernel(
    coil_ptr,  # (B, C, height, width, 2) float32: unshifted ifft2 output z
    maps_ptr,  # (B_maps, C, height, width, 2) float32: coil maps S
    out_ptr,  # (B, height, width, 2) float32: scale * s * m * sum_c conj(S_c) z_c
    scale_ptr,  # (1,) float32: read on the device so backward needs no host sync
    maps_batch_stride,
    n_coils,
    plane_size,
    width,
    sign,
    BLOCK: tl.constexpr,
):
    pixel_block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    pixel = pixel_block * BLOCK + tl.arange(0, BLOCK)
    inside = pixel < plane_size
    acc_re = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_im = tl.zeros((BLOCK,), dtype=tl.float32)
    for coil in range(n_coils):
        z_re, z_im = load_complex(coil_ptr, (batch * n_coils + coil) * plane_size + pixel, inside)
        s_re, s_im = load_complex(
            maps_ptr, batch * maps_batch_stride + coil * plane_size + pixel, inside
        )
        acc_re += s_re * z_re + s_im * z_im  # conj(S) z
        acc_im += s_re * z_im - s_im * z_re
    factor = tl.load(scale_ptr) * sign * checkerboard_sign(pixel, width)
    store_complex(out_ptr, batch * plane_size + pixel, inside, acc_re * factor, acc_im * factor)


def scale_tensor(scale: torch.Tensor | float | None, device: torch.device) -> torch.Tensor:
    """A (1,) float32 tensor on `device` holding `scale` (1 when None)."""
    if scale is None:
        return torch.ones(1, device=device)
    if isinstance(scale, torch.Tensor):
        return scale.detach().to(device=device, dtype=torch.float32).reshape(1)
    return torch.full((1,), float(scale), device=device)


def coil_combine_modulate(
    coil_images: torch.Tensor, maps: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton kernel (3); semantics and shapes as `kernels.reference.coil_combine_modulate`."""
    coil_images, maps = coil_images.contiguous(), maps.contiguous()
    batch, n_coils, height, width = coil_images.shape
    scale_values = scale_tensor(scale, coil_images.device)
    check_launchable(
        _coil_combine_modulate_kernel,
        {"coil_images": coil_images, "maps": maps, "scale": scale_values},
    )
    out = torch.empty((batch, height, width), dtype=torch.complex64, device=coil_images.device)
    plane_size = height * width
    grid = (triton.cdiv(plane_size, COMBINE_BLOCK), batch)
    _coil_combine_modulate_kernel[grid](
        torch.view_as_real(coil_images),
        torch.view_as_real(maps),
        torch.view_as_real(out),
        scale_values,
        maps_batch_stride_of(maps, batch),
        n_coils,
        plane_size,
        width,
        float(centring_sign(height, width)),
        BLOCK=COMBINE_BLOCK,
        num_warps=NUM_WARPS,
    )
    return out
