"""The SENSE data-consistency pass with the Triton FFT fused into kernels (1)-(3).

Three kernels, each one read and one write of the coil planes (power-of-two ny, nx <= 512):

  expand_fft_rows       x, S -> FFT_x(s m S_c x)                         [kernel (1) + row FFT]
  fft_columns_residual  -> FFT_y, centring, mask, residual vs y, partial sums of |r|^2,
                           then m M r and (if backward will run) its iFFT_y  [(2) + column FFTs]
  ifft_rows_combine     -> iFFT_x, conj(S_c) coil sum, s m, scale          [row iFFT + kernel (3)]

Against the cuFFT path (kernel (1), cuFFT 2D, kernel (2), cuFFT 2D inverse, kernel (3)) this saves
the separate FFT passes over the coil planes; whether that wins depends on the in-register FFT
keeping up with memory bandwidth, which only benchmarks/kernels.py on a GPU can decide.

References with the same signatures: `kernels.reference.expand_fft_rows`,
`fft_columns_residual`, `ifft_rows_combine`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.physics.sense import centring_sign
from kernels.elementwise import (
    as_float_mask,
    checkerboard_sign,
    load_complex,
    maps_batch_stride_of,
    scale_tensor,
    store_complex,
)
from kernels.runtime import check_launchable
from kernels.stockham_fft import check_length, lines_per_program, stockham_fft, twiddles


@triton.jit
def _expand_fft_rows_kernel(
    image_ptr,  # (B, NY, NX, 2) float32: complex64 image x
    maps_ptr,  # (B_maps, C, NY, NX, 2) float32: coil maps S
    out_ptr,  # (B, C, NY, NX, 2) float32: FFT along x of s * m * S_c * x_b, orthonormal
    twiddle_re_ptr,  # (NX/2,) float32
    twiddle_im_ptr,  # (NX/2,) float32
    maps_batch_stride,  # complex elements between maps of consecutive b (0 when shared)
    n_coils,
    sign,  # s = (-1)^(NY/2 + NX/2)
    scale,  # 1 / sqrt(NX)
    NY: tl.constexpr,
    NX: tl.constexpr,
    LOG2NX: tl.constexpr,
    ROWS: tl.constexpr,
):
    row_block = tl.program_id(0)
    coil = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    row = row_block * ROWS + tl.arange(0, ROWS)
    pixel = tl.expand_dims(row, 1) * NX + tl.expand_dims(tl.arange(0, NX), 0)  # (ROWS, NX)
    inside = pixel < NY * NX  # always true (ROWS divides NY); gives the mask its shape

    x_re, x_im = load_complex(image_ptr, batch * NY * NX + pixel, inside)
    s_re, s_im = load_complex(maps_ptr, batch * maps_batch_stride + coil * NY * NX + pixel, inside)
    modulation = sign * checkerboard_sign(pixel, NX)
    re = (s_re * x_re - s_im * x_im) * modulation
    im = (s_re * x_im + s_im * x_re) * modulation
    re, im = stockham_fft(re, im, twiddle_re_ptr, twiddle_im_ptr, ROWS, NX, LOG2NX, False)
    element = (batch * n_coils + coil) * NY * NX + pixel
    store_complex(out_ptr, element, inside, re * scale, im * scale)


@triton.jit
def _fft_columns_residual_kernel(
    spectrum_ptr,  # (B*C, NY, NX, 2) float32: output of _expand_fft_rows_kernel
    mask_ptr,  # (NY, NX) float32: sampling mask M
    measured_ptr,  # (B*C, NY, NX, 2) float32: centred measured k-space y
    out_ptr,  # (B*C, NY, NX, 2) float32: m M r, or its orthonormal iFFT along y
    partial_ptr,  # (B*C * NX/COLS,) float32: per-program sum of |r|^2
    twiddle_re_ptr,  # (NY/2,) float32
    twiddle_im_ptr,  # (NY/2,) float32
    scale,  # 1 / sqrt(NY)
    NY: tl.constexpr,
    NX: tl.constexpr,
    LOG2NY: tl.constexpr,
    COLS: tl.constexpr,
    INVERSE_COLUMNS: tl.constexpr,
):
    column_block = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    column = column_block * COLS + tl.arange(0, COLS)
    # Tile (COLS, NY): whole columns along the last axis, where the FFT helper works.
    pixel = tl.expand_dims(tl.arange(0, NY), 0) * NX + tl.expand_dims(column, 1)
    inside = pixel < NY * NX
    element = plane * NY * NX + pixel

    re, im = load_complex(spectrum_ptr, element, inside)
    re, im = stockham_fft(re, im, twiddle_re_ptr, twiddle_im_ptr, COLS, NY, LOG2NY, False)
    modulation = checkerboard_sign(pixel, NX)
    sampled = tl.load(mask_ptr + pixel)
    y_re, y_im = load_complex(measured_ptr, element, inside)
    r_re = sampled * (modulation * scale * re - y_re)
    r_im = sampled * (modulation * scale * im - y_im)
    partial = tl.sum(tl.sum(r_re * r_re + r_im * r_im, axis=1), axis=0)
    tl.store(partial_ptr + plane * tl.num_programs(0) + column_block, partial)
    r_re = r_re * (sampled * modulation)
    r_im = r_im * (sampled * modulation)
    if INVERSE_COLUMNS:
        r_re, r_im = stockham_fft(
            r_re, r_im, twiddle_re_ptr, twiddle_im_ptr, COLS, NY, LOG2NY, True
        )
        r_re = r_re * scale
        r_im = r_im * scale
    store_complex(out_ptr, element, inside, r_re, r_im)


@triton.jit
def _ifft_rows_combine_kernel(
    coil_ptr,  # (B, C, NY, NX, 2) float32: column-iFFT'd premodulated residual
    maps_ptr,  # (B_maps, C, NY, NX, 2) float32: coil maps S
    out_ptr,  # (B, NY, NX, 2) float32: scale * s * m * sum_c conj(S_c) iFFT_x(z_c)
    scale_ptr,  # (1,) float32, read on the device (no host sync in backward)
    twiddle_re_ptr,  # (NX/2,) float32
    twiddle_im_ptr,  # (NX/2,) float32
    maps_batch_stride,
    n_coils,
    sign,
    norm,  # 1 / sqrt(NX)
    NY: tl.constexpr,
    NX: tl.constexpr,
    LOG2NX: tl.constexpr,
    ROWS: tl.constexpr,
):
    row_block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    row = row_block * ROWS + tl.arange(0, ROWS)
    pixel = tl.expand_dims(row, 1) * NX + tl.expand_dims(tl.arange(0, NX), 0)
    inside = pixel < NY * NX
    acc_re = tl.zeros((ROWS, NX), dtype=tl.float32)
    acc_im = tl.zeros((ROWS, NX), dtype=tl.float32)
    for coil in range(n_coils):
        z_re, z_im = load_complex(coil_ptr, (batch * n_coils + coil) * NY * NX + pixel, inside)
        z_re, z_im = stockham_fft(
            z_re, z_im, twiddle_re_ptr, twiddle_im_ptr, ROWS, NX, LOG2NX, True
        )
        s_re, s_im = load_complex(
            maps_ptr, batch * maps_batch_stride + coil * NY * NX + pixel, inside
        )
        acc_re += s_re * z_re + s_im * z_im  # conj(S) z
        acc_im += s_re * z_im - s_im * z_re
    factor = tl.load(scale_ptr) * sign * norm * checkerboard_sign(pixel, NX)
    store_complex(out_ptr, batch * NY * NX + pixel, inside, acc_re * factor, acc_im * factor)


def _plane_sizes(ny: int, nx: int) -> tuple[int, int]:
    return check_length(ny, "ny"), check_length(nx, "nx")


def _rows_for_parallelism(rows: int, ny: int, batch: int, min_programs: int = 256) -> int:
    """Fewer rows per program when the grid would be too small to fill the GPU (the combine
    kernel loops over coils inside one program, so its grid is only ny / rows x batch)."""
    while rows > 1 and (ny // rows) * batch < min_programs:
        rows //= 2
    return rows


def _num_warps(tile_elements: int) -> int:
    return 4 if tile_elements <= 1024 else 8


def expand_fft_rows(image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Fused kernel (1) + orthonormal FFT along x: (B, C, ny, nx) complex64.

    Args:
        image: (B, ny, nx) complex64; maps: (B or 1, C, ny, nx) complex64;
            ny, nx powers of two <= 512.
    """
    image, maps = image.contiguous(), maps.contiguous()
    check_launchable(_expand_fft_rows_kernel, {"image": image, "maps": maps})
    batch, ny, nx = image.shape
    _, log2_nx = _plane_sizes(ny, nx)
    n_coils = maps.shape[1]
    rows = lines_per_program(nx, ny)
    out = torch.empty((batch, n_coils, ny, nx), dtype=torch.complex64, device=image.device)
    twiddle_re, twiddle_im = twiddles(nx, image.device)
    _expand_fft_rows_kernel[(ny // rows, n_coils, batch)](
        torch.view_as_real(image),
        torch.view_as_real(maps),
        torch.view_as_real(out),
        twiddle_re,
        twiddle_im,
        maps_batch_stride_of(maps, batch),
        n_coils,
        float(centring_sign(ny, nx)),
        1.0 / math.sqrt(nx),
        NY=ny,
        NX=nx,
        LOG2NX=log2_nx,
        ROWS=rows,
        num_warps=_num_warps(rows * nx),
    )
    return out


def fft_columns_residual(
    row_spectrum: torch.Tensor,
    mask: torch.Tensor,
    measured: torch.Tensor,
    inverse_columns: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused column FFT + kernel (2) (+ column iFFT of m M r); as the reference of the same name."""
    row_spectrum, measured = row_spectrum.contiguous(), measured.contiguous()
    batch, n_coils, ny, nx = row_spectrum.shape
    if measured.shape != row_spectrum.shape:
        raise ValueError(
            f"`measured` shape {tuple(measured.shape)} != coil planes {tuple(row_spectrum.shape)}"
        )
    log2_ny, _ = _plane_sizes(ny, nx)
    mask = as_float_mask(mask, ny, nx, row_spectrum.device)
    check_launchable(
        _fft_columns_residual_kernel,
        {"row_spectrum": row_spectrum, "mask": mask, "measured": measured},
    )
    cols = lines_per_program(ny, nx)
    planes = batch * n_coils
    partials = torch.empty(planes * (nx // cols), device=row_spectrum.device)
    out = torch.empty_like(row_spectrum)
    twiddle_re, twiddle_im = twiddles(ny, row_spectrum.device)
    _fft_columns_residual_kernel[(nx // cols, planes)](
        torch.view_as_real(row_spectrum),
        mask,
        torch.view_as_real(measured),
        torch.view_as_real(out),
        partials,
        twiddle_re,
        twiddle_im,
        1.0 / math.sqrt(ny),
        NY=ny,
        NX=nx,
        LOG2NY=log2_ny,
        COLS=cols,
        INVERSE_COLUMNS=inverse_columns,
        num_warps=_num_warps(cols * ny),
    )
    return out, partials.sum()


def ifft_rows_combine(
    column_images: torch.Tensor, maps: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused orthonormal iFFT along x + kernel (3): (B, ny, nx) complex64."""
    column_images, maps = column_images.contiguous(), maps.contiguous()
    batch, n_coils, ny, nx = column_images.shape
    _, log2_nx = _plane_sizes(ny, nx)
    scale_values = scale_tensor(scale, column_images.device)
    check_launchable(
        _ifft_rows_combine_kernel,
        {"column_images": column_images, "maps": maps, "scale": scale_values},
    )
    rows = _rows_for_parallelism(lines_per_program(nx, ny), ny, batch)
    out = torch.empty((batch, ny, nx), dtype=torch.complex64, device=column_images.device)
    twiddle_re, twiddle_im = twiddles(nx, column_images.device)
    _ifft_rows_combine_kernel[(ny // rows, batch)](
        torch.view_as_real(column_images),
        torch.view_as_real(maps),
        torch.view_as_real(out),
        scale_values,
        twiddle_re,
        twiddle_im,
        maps_batch_stride_of(maps, batch),
        n_coils,
        float(centring_sign(ny, nx)),
        1.0 / math.sqrt(nx),
        NY=ny,
        NX=nx,
        LOG2NX=log2_nx,
        ROWS=rows,
        num_warps=_num_warps(rows * nx),
    )
    return out
