"""Orthogonal 2D Daubechies-3 wavelet transform (periodic boundaries) and its L1 penalty, in torch.

The paper's code adds an L1 penalty on db3 wavelet coefficients (3 levels, weight 1e-8). pywt is
not a dependency, so the transform is written here with strided convolutions:

- analysis along one axis: a[k] = sum_n h[n] x[(2k + n) mod N], d[k] = sum_n g[n] x[(2k + n) mod N],
  with h the db3 scaling filter and g[n] = (-1)^n h[L-1-n] (quadrature mirror); 2D is the
  separable product, one `conv2d` with 4 outer-product kernels (LL, LH, HL, HH) and stride 2 on
  the circularly padded image;
- periodic extension makes the transform orthogonal (Parseval), so the inverse is the transpose:
  `conv_transpose2d` with the same kernels, then the wrapped border folded back.
Boundaries differ from pywt's default 'symmetric' mode (pywt 'periodization' is the same
transform up to a shift); for a sparsity penalty that does not matter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Daubechies 3 scaling filter (Daubechies 1988; 3 vanishing moments): sum = sqrt(2), sum of
# squares = 1, orthogonal to its even shifts (tests/test_losses.py checks all three).
DB3 = (0.3326705529509569, 0.8068915093133388, 0.4598775021193313,
       -0.13501102001039084, -0.08544127388224149, 0.035226291882100656)


def db3_filters(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-pass h, high-pass g) of length 6, g[n] = (-1)^n h[5 - n]."""
    h = torch.tensor(DB3, dtype=torch.float64)
    g = torch.tensor([(-1) ** n * DB3[len(DB3) - 1 - n] for n in range(len(DB3))], dtype=torch.float64)
    return h.to(dtype=dtype, device=device), g.to(dtype=dtype, device=device)


def _kernels(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(4, 1, 6, 6): LL, LH, HL, HH outer products (first factor along rows / y)."""
    h, g = db3_filters(dtype, device)
    pairs = [(h, h), (h, g), (g, h), (g, g)]
    return torch.stack([torch.outer(a, b) for a, b in pairs]).unsqueeze(1)


def max_levels(height: int, width: int, taps: int = len(DB3)) -> int:
    """Most db3 levels an image of this size takes: the coarsest level's input keeps at least
    taps - 2 pixels per axis (0 when even one level does not fit)."""
    levels = 0
    while min(height, width) // 2**levels >= taps - 2:
        levels += 1
    return levels


def _check_size(height: int, width: int, levels: int, taps: int) -> None:
    step = 2 ** levels
    if height % step or width % step:
        raise ValueError(f"db3 DWT with {levels} levels needs image sizes divisible by {step}, got {height} x {width}")
    if levels > max_levels(height, width, taps):
        raise ValueError(f"image {height} x {width} is too small for {levels} db3 levels "
                         f"(the coarsest level needs at least {taps - 2} pixels per axis)")


def dwt2(x: torch.Tensor, levels: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Multilevel 2D DWT of real `x` `(B, height, width)`.

    Returns (approximation `(B, height/2^L, width/2^L)`, details) with details[j] `(B, 3, height/2^(j+1), width/2^(j+1))`
    (LH, HL, HH; j = 0 is the finest level). The transform is orthogonal.
    """
    if x.is_complex() or x.ndim != 3:
        raise ValueError(f"dwt2 expects real (B, height, width), got {tuple(x.shape)} {x.dtype}")
    kernels = _kernels(x.dtype, x.device)
    taps = kernels.shape[-1]
    _check_size(x.shape[-2], x.shape[-1], levels, taps)
    approx = x.unsqueeze(1)
    details = []
    for _ in range(levels):
        padded = F.pad(approx, (0, taps - 2, 0, taps - 2), mode="circular")
        bands = F.conv2d(padded, kernels, stride=2)  # (B, 4, n/2, n/2)
        approx, detail = bands[:, :1], bands[:, 1:]
        details.append(detail)
    return approx[:, 0], details


def idwt2(approx: torch.Tensor, details: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `dwt2`: `(B, height, width)` from its coefficients."""
    kernels = _kernels(approx.dtype, approx.device)
    taps = kernels.shape[-1]
    current = approx.unsqueeze(1)
    for detail in reversed(details):
        bands = torch.cat([current, detail], dim=1)
        padded = F.conv_transpose2d(bands, kernels, stride=2)  # (B, 1, n + taps - 2, ...)
        height, width = 2 * bands.shape[-2], 2 * bands.shape[-1]
        wrap = taps - 2
        out = padded[..., :height, :width].clone()
        out[..., :wrap, :] += padded[..., height:, :width]   # fold the circular padding back
        out[..., :, :wrap] += padded[..., :height, width:]
        out[..., :wrap, :wrap] += padded[..., height:, width:]
        current = out
    return current[:, 0]


def wavelet_l1(image: torch.Tensor, levels: int = 3, include_approximation: bool = True,
               scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Sum of |coefficients| of the db3 DWT of `image` `(..., height, width)` (complex: real and imaginary
    parts transformed separately), divided by `scale`; float32 scalar. Sizes not divisible by 2^levels
    are zero-padded at the end."""
    x = image / scale
    x = torch.view_as_real(x).movedim(-1, -3) if x.is_complex() else x
    height, width = x.shape[-2:]
    step = 2 ** levels
    x = F.pad(x, (0, (-width) % step, 0, (-height) % step)).reshape(-1, height + (-height) % step, width + (-width) % step)
    approx, details = dwt2(x, levels)
    total = sum(d.abs().sum() for d in details)
    if include_approximation:
        total = total + approx.abs().sum()
    return total
