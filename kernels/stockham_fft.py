"""Triton kernel (4): radix-2 Stockham FFT along one axis, power-of-two lengths 2..512.

Each program holds a tile of ROWS whole lines of length N in registers and runs the log2(N)
Stockham stages on it, so a line is read once and written once (cuFFT also does one pass for
these sizes; the point of having our own is to fuse it with kernels (1)-(3), `kernels.fused_fft`).

Stockham autosort, decimation in frequency, written with reshapes instead of index arithmetic:
before a stage the tile is (ROWS, L, P), where column p of the (L, P) block is a sequence whose
length-L DFT gives the outputs X[P * k + p]. A stage splits each column into halves a, b
(rows j and j + L/2), and writes u = a + b to column p and v = (a - b) * w_L^j to column P + p:
(ROWS, L/2, 2P) with the same invariant. After log2(N) stages the tile is (ROWS, 1, N) in natural
order, with no bit reversal. The twiddles w_N^j = exp(-2 pi i j / N), j < N/2, come from a float64-
computed table; stage L reads every (N/L)-th entry. The inverse uses the conjugate twiddles.

Reference: `kernels.reference.fft_axis` (torch.fft). Where cuFFT should be kept: see
kernels/README.md; the default path of `kernels.sense` uses torch.fft (cuFFT).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.elementwise import load_complex, store_complex
from kernels.reference import NORMS
from kernels.runtime import check_launchable

MAX_LENGTH = 512
TILE_ELEMENTS = 2048  # complex elements per program (ROWS * N); untuned, no GPU during writing

_twiddle_cache: dict[tuple[int, str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


def check_length(length: int, what: str = "FFT length") -> int:
    """log2(length) for a power of two in [2, MAX_LENGTH]; ValueError otherwise."""
    if length < 2 or length > MAX_LENGTH or length & (length - 1):
        raise ValueError(
            f"the Triton FFT handles power-of-two lengths 2..{MAX_LENGTH}; {what} is {length} "
            "(use torch.fft / cuFFT for this size)"
        )
    return length.bit_length() - 1


def twiddles(length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of w^j = exp(-2 pi i j / length), j < length / 2: two (length/2,) float32."""
    key = (length, device.type, device.index)
    if key not in _twiddle_cache:
        angle = -2.0 * math.pi * torch.arange(length // 2, dtype=torch.float64) / length
        _twiddle_cache[key] = (
            torch.cos(angle).to(device=device, dtype=torch.float32),
            torch.sin(angle).to(device=device, dtype=torch.float32),
        )
    return _twiddle_cache[key]


@triton.jit
def _stockham_stage(
    re,  # (ROWS, L, P) float32
    im,  # (ROWS, L, P) float32
    twiddle_re_ptr,  # (N/2,) float32: cos(-2 pi j / N)
    twiddle_im_ptr,  # (N/2,) float32: sin(-2 pi j / N)
    ROWS: tl.constexpr,
    L: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    INVERSE: tl.constexpr,
):
    HALF: tl.constexpr = L // 2
    # (ROWS, L, P) -> (ROWS, 2, L/2, P) -> (ROWS, L/2, P, 2) -> halves a (rows j), b (rows j + L/2)
    a_re, b_re = tl.split(tl.permute(tl.reshape(re, (ROWS, 2, HALF, P)), (0, 2, 3, 1)))
    a_im, b_im = tl.split(tl.permute(tl.reshape(im, (ROWS, 2, HALF, P)), (0, 2, 3, 1)))
    j = tl.arange(0, HALF)
    w_re = tl.reshape(tl.load(twiddle_re_ptr + j * (N // L)), (1, HALF, 1))
    w_im = tl.reshape(tl.load(twiddle_im_ptr + j * (N // L)), (1, HALF, 1))
    if INVERSE:
        w_im = -w_im
    d_re = a_re - b_re
    d_im = a_im - b_im
    v_re = d_re * w_re - d_im * w_im
    v_im = d_re * w_im + d_im * w_re
    # join(u, v): (ROWS, L/2, P, 2) -> (ROWS, L/2, 2, P) -> (ROWS, L/2, 2P): u at p, v at P + p
    out_re = tl.reshape(tl.permute(tl.join(a_re + b_re, v_re), (0, 1, 3, 2)), (ROWS, HALF, 2 * P))
    out_im = tl.reshape(tl.permute(tl.join(a_im + b_im, v_im), (0, 1, 3, 2)), (ROWS, HALF, 2 * P))
    return out_re, out_im


@triton.jit
def stockham_fft(
    re,  # (ROWS, N) float32, lines along the last axis
    im,  # (ROWS, N) float32
    twiddle_re_ptr,
    twiddle_im_ptr,
    ROWS: tl.constexpr,
    N: tl.constexpr,
    LOG2N: tl.constexpr,
    INVERSE: tl.constexpr,
):
    """Unnormalised DFT (or inverse DFT without 1/N) of each line of a register tile."""
    re = tl.reshape(re, (ROWS, N, 1))
    im = tl.reshape(im, (ROWS, N, 1))
    for stage in tl.static_range(LOG2N):
        re, im = _stockham_stage(
            re, im, twiddle_re_ptr, twiddle_im_ptr, ROWS, N >> stage, 1 << stage, N, INVERSE
        )
    return tl.reshape(re, (ROWS, N)), tl.reshape(im, (ROWS, N))


@triton.jit
def _fft_axis_kernel(
    x_ptr,  # (outer, N, inner, 2) float32: complex64 input, transformed along N
    out_ptr,  # (outer, N, inner, 2) float32
    twiddle_re_ptr,  # (N/2,) float32
    twiddle_im_ptr,  # (N/2,) float32
    n_lines,  # outer * inner
    inner,  # complex elements between consecutive entries of one line
    scale,  # normalisation (1/sqrt(N) for "ortho")
    N: tl.constexpr,
    LOG2N: tl.constexpr,
    ROWS: tl.constexpr,
    INVERSE: tl.constexpr,
):
    line = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    valid = line < n_lines
    # line -> (outer, inner) index; consecutive lines are consecutive inner positions, so for
    # inner > 1 a tile column is one coalesced run.
    start = (line // inner) * N * inner + line % inner
    element = tl.expand_dims(start, 1) + tl.expand_dims(tl.arange(0, N), 0) * inner
    inside = tl.broadcast_to(tl.expand_dims(valid, 1), (ROWS, N))
    re, im = load_complex(x_ptr, element, inside)
    re, im = stockham_fft(re, im, twiddle_re_ptr, twiddle_im_ptr, ROWS, N, LOG2N, INVERSE)
    store_complex(out_ptr, element, inside, re * scale, im * scale)


def lines_per_program(length: int, n_lines: int) -> int:
    """Power-of-two ROWS with ROWS * length <= TILE_ELEMENTS, not above the number of lines."""
    rows = max(1, TILE_ELEMENTS // length)
    return max(1, min(rows, triton.next_power_of_2(n_lines)))


def norm_scale(length: int, inverse: bool, norm: str) -> float:
    """Factor torch.fft applies for `norm` ("ortho": 1/sqrt(n); "backward": 1/n on the inverse)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "ortho":
        return 1.0 / math.sqrt(length)
    divides = (norm == "backward") == inverse
    return 1.0 / length if divides else 1.0


def fft_axis(
    x: torch.Tensor, dim: int = -1, inverse: bool = False, norm: str = "ortho"
) -> torch.Tensor:
    """Triton 1D (i)FFT of complex64 `x` along `dim`, as torch.fft.fft / ifft with `norm`.

    Args:
        x: complex64 tensor of any shape; x.shape[dim] a power of two in [2, 512].
    Returns:
        complex64 tensor of the same shape (a new tensor).
    """
    if x.dtype != torch.complex64:
        raise TypeError(f"the Triton FFT takes complex64, got {x.dtype}")
    dim = dim % x.dim()
    length = x.shape[dim]
    log2_length = check_length(length, f"x.shape[{dim}]")
    x = x.contiguous()
    check_launchable(_fft_axis_kernel, {"x": x})
    inner = math.prod(x.shape[dim + 1 :])
    n_lines = x.numel() // length
    rows = lines_per_program(length, n_lines)
    out = torch.empty_like(x)
    if n_lines == 0:
        return out
    twiddle_re, twiddle_im = twiddles(length, x.device)
    _fft_axis_kernel[(triton.cdiv(n_lines, rows),)](
        torch.view_as_real(x),
        torch.view_as_real(out),
        twiddle_re,
        twiddle_im,
        n_lines,
        inner,
        norm_scale(length, inverse, norm),
        N=length,
        LOG2N=log2_length,
        ROWS=rows,
        INVERSE=inverse,
        num_warps=4 if rows * length <= 1024 else 8,
    )
    return out
