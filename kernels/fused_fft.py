"""The SENSE data-consistency pass with the Triton FFT fused into kernels (1)-(3).

Three kernels, each one read and one write of the coil planes (power-of-two height, width <= 512):

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
    image_ptr,  # (B, HEIGHT, WIDTH, 2) float32: complex64 image x
    maps_ptr,  # (B_maps, C, HEIGHT, WIDTH, 2) float32: coil maps S
    out_ptr,  # (B, C, HEIGHT, WIDTH, 2) float32: FFT along the rows of s * m * S_c * x_b, orthonormal
    twiddle_re_ptr,  # (WIDTH/2,) float32
    twiddle_im_ptr,  # (WIDTH/2,) float32
    maps_batch_stride,  # complex elements between maps of consecutive b (0 when shared)
    n_coils,
    sign,  # s = (-1)^(HEIGHT/2 + WIDTH/2)
    scale,  # 1 / sqrt(WIDTH)
    HEIGHT: tl.constexpr,
    WIDTH: tl.constexpr,
    LOG2NX: tl.constexpr,
    ROWS: tl.constexpr,
):
    row_block = tl.program_id(0)
    coil = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    row = row_block * ROWS + tl.arange(0, ROWS)
    pixel = tl.expand_dims(row, 1) * WIDTH + tl.expand_dims(tl.arange(0, WIDTH), 0)  # (ROWS, WIDTH)
    inside = pixel < HEIGHT * WIDTH  # always true (ROWS divides HEIGHT); gives the mask its shape

    x_re, x_im = load_complex(image_ptr, batch * HEIGHT * WIDTH + pixel, inside)
    s_re, s_im = load_complex(maps_ptr, batch * maps_batch_stride + coil * HEIGHT * WIDTH + pixel, inside)
    modulation = sign * checkerboard_sign(pixel, WIDTH)
    re = (s_re * x_re - s_im * x_im) * modulation
    im = (s_re * x_im + s_im * x_re) * modulation
    re, im = stockham_fft(re, im, twiddle_re_ptr, twiddle_im_ptr, ROWS, WIDTH, LOG2NX, False)
    element = (batch * n_coils + coil) * HEIGHT * WIDTH + pixel
    store_complex(out_ptr, element, inside, re * scale, im * scale)


@triton.jit
def _fft_columns_residual_kernel(
    spectrum_ptr,  # (B*C, HEIGHT, WIDTH, 2) float32: output of _expand_fft_rows_kernel
    mask_ptr,  # (HEIGHT, WIDTH) float32: sampling mask M
    measured_ptr,  # (B*C, HEIGHT, WIDTH, 2) float32: centred measured k-space y
    out_ptr,  # (B*C, HEIGHT, WIDTH, 2) float32: m M r, or its orthonormal iFFT along the columns
    partial_ptr,  # (B*C * WIDTH/COLS,) float32: per-program sum of |r|^2
    twiddle_re_ptr,  # (HEIGHT/2,) float32
    twiddle_im_ptr,  # (HEIGHT/2,) float32
    scale,  # 1 / sqrt(HEIGHT)
    HEIGHT: tl.constexpr,
    WIDTH: tl.constexpr,
    LOG2NY: tl.constexpr,
    COLS: tl.constexpr,
    INVERSE_COLUMNS: tl.constexpr,
):
    column_block = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    column = column_block * COLS + tl.arange(0, COLS)
    # Tile (COLS, HEIGHT): whole columns along the last axis, where the FFT helper works.
    pixel = tl.expand_dims(tl.arange(0, HEIGHT), 0) * WIDTH + tl.expand_dims(column, 1)
    inside = pixel < HEIGHT * WIDTH
    element = plane * HEIGHT * WIDTH + pixel

    re, im = load_complex(spectrum_ptr, element, inside)
    re, im = stockham_fft(re, im, twiddle_re_ptr, twiddle_im_ptr, COLS, HEIGHT, LOG2NY, False)
    modulation = checkerboard_sign(pixel, WIDTH)
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
            r_re, r_im, twiddle_re_ptr, twiddle_im_ptr, COLS, HEIGHT, LOG2NY, True
        )
        r_re = r_re * scale
        r_im = r_im * scale
    store_complex(out_ptr, element, inside, r_re, r_im)


@triton.jit
def _ifft_rows_combine_kernel(
    coil_ptr,  # (B, C, HEIGHT, WIDTH, 2) float32: column-iFFT'd premodulated residual
    maps_ptr,  # (B_maps, C, HEIGHT, WIDTH, 2) float32: coil maps S
    out_ptr,  # (B, HEIGHT, WIDTH, 2) float32: scale * s * m * sum_c conj(S_c) iFFT_x(z_c)
    scale_ptr,  # (1,) float32, read on the device (no host sync in backward)
    twiddle_re_ptr,  # (WIDTH/2,) float32
    twiddle_im_ptr,  # (WIDTH/2,) float32
    maps_batch_stride,
    n_coils,
    sign,
    norm,  # 1 / sqrt(WIDTH)
    HEIGHT: tl.constexpr,
    WIDTH: tl.constexpr,
    LOG2NX: tl.constexpr,
    ROWS: tl.constexpr,
):
    row_block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    row = row_block * ROWS + tl.arange(0, ROWS)
    pixel = tl.expand_dims(row, 1) * WIDTH + tl.expand_dims(tl.arange(0, WIDTH), 0)
    inside = pixel < HEIGHT * WIDTH
    acc_re = tl.zeros((ROWS, WIDTH), dtype=tl.float32)
    acc_im = tl.zeros((ROWS, WIDTH), dtype=tl.float32)
    for coil in range(n_coils):
        z_re, z_im = load_complex(coil_ptr, (batch * n_coils + coil) * HEIGHT * WIDTH + pixel, inside)
        z_re, z_im = stockham_fft(
            z_re, z_im, twiddle_re_ptr, twiddle_im_ptr, ROWS, WIDTH, LOG2NX, True
        )
        s_re, s_im = load_complex(
            maps_ptr, batch * maps_batch_stride + coil * HEIGHT * WIDTH + pixel, inside
        )
        acc_re += s_re * z_re + s_im * z_im  # conj(S) z
        acc_im += s_re * z_im - s_im * z_re
    factor = tl.load(scale_ptr) * sign * norm * checkerboard_sign(pixel, WIDTH)
    store_complex(out_ptr, batch * HEIGHT * WIDTH + pixel, inside, acc_re * factor, acc_im * factor)


def _plane_sizes(height: int, width: int) -> tuple[int, int]:
    return check_length(height, "height"), check_length(width, "width")


def _rows_for_parallelism(rows: int, height: int, batch: int, min_programs: int = 256) -> int:
    """Fewer rows per program when the grid would be too small to fill the GPU (the combine
    kernel loops over coils inside one program, so its grid is only height / rows x batch)."""
    while rows > 1 and (height // rows) * batch < min_programs:
        rows //= 2
    return rows


def _num_warps(tile_elements: int) -> int:
    return 4 if tile_elements <= 1024 else 8


def expand_fft_rows(image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Fused kernel (1) + orthonormal FFT along the rows: (B, C, height, width) complex64.

    Args:
        image: (B, height, width) complex64; maps: (B or 1, C, height, width) complex64;
            height, width powers of two <= 512.
    """
    image, maps = image.contiguous(), maps.contiguous()
    check_launchable(_expand_fft_rows_kernel, {"image": image, "maps": maps})
    batch, height, width = image.shape
    _, log2_nx = _plane_sizes(height, width)
    n_coils = maps.shape[1]
    rows = lines_per_program(width, height)
    out = torch.empty((batch, n_coils, height, width), dtype=torch.complex64, device=image.device)
    twiddle_re, twiddle_im = twiddles(width, image.device)
    _expand_fft_rows_kernel[(height // rows, n_coils, batch)](
        torch.view_as_real(image),
        torch.view_as_real(maps),
        torch.view_as_real(out),
        twiddle_re,
        twiddle_im,
        maps_batch_stride_of(maps, batch),
        n_coils,
        float(centring_sign(height, width)),
        1.0 / math.sqrt(width),
        HEIGHT=height,
        WIDTH=width,
        LOG2NX=log2_nx,
        ROWS=rows,
        num_warps=_num_warps(rows * width),
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
    batch, n_coils, height, width = row_spectrum.shape
    if measured.shape != row_spectrum.shape:
        raise ValueError(
            f"`measured` shape {tuple(measured.shape)} != coil planes {tuple(row_spectrum.shape)}"
        )
    log2_ny, _ = _plane_sizes(height, width)
    mask = as_float_mask(mask, height, width, row_spectrum.device)
    check_launchable(
        _fft_columns_residual_kernel,
        {"row_spectrum": row_spectrum, "mask": mask, "measured": measured},
    )
    cols = lines_per_program(height, width)
    planes = batch * n_coils
    partials = torch.empty(planes * (width // cols), device=row_spectrum.device)
    out = torch.empty_like(row_spectrum)
    twiddle_re, twiddle_im = twiddles(height, row_spectrum.device)
    _fft_columns_residual_kernel[(width // cols, planes)](
        torch.view_as_real(row_spectrum),
        mask,
        torch.view_as_real(measured),
        torch.view_as_real(out),
        partials,
        twiddle_re,
        twiddle_im,
        1.0 / math.sqrt(height),
        HEIGHT=height,
        WIDTH=width,
        LOG2NY=log2_ny,
        COLS=cols,
        INVERSE_COLUMNS=inverse_columns,
        num_warps=_num_warps(cols * height),
    )
    return out, partials.sum()


def ifft_rows_combine(
    column_images: torch.Tensor, maps: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused orthonormal iFFT along the rows + kernel (3): (B, height, width) complex64."""
    column_images, maps = column_images.contiguous(), maps.contiguous()
    batch, n_coils, height, width = column_images.shape
    _, log2_nx = _plane_sizes(height, width)
    scale_values = scale_tensor(scale, column_images.device)
    check_launchable(
        _ifft_rows_combine_kernel,
        {"column_images": column_images, "maps": maps, "scale": scale_values},
    )
    rows = _rows_for_parallelism(lines_per_program(width, height), height, batch)
    out = torch.empty((batch, height, width), dtype=torch.complex64, device=column_images.device)
    twiddle_re, twiddle_im = twiddles(width, column_images.device)
    _ifft_rows_combine_kernel[(height // rows, batch)](
        torch.view_as_real(column_images),
        torch.view_as_real(maps),
        torch.view_as_real(out),
        scale_values,
        twiddle_re,
        twiddle_im,
        maps_batch_stride_of(maps, batch),
        n_coils,
        float(centring_sign(height, width)),
        1.0 / math.sqrt(width),
        HEIGHT=height,
        WIDTH=width,
        LOG2NX=log2_nx,
        ROWS=rows,
        num_warps=_num_warps(rows * width),
    )
    return out
