"""Pure-torch references of every Triton kernel in this package (no triton import).

Each function has the signature of the Triton launcher it specifies (`kernels.elementwise`,
`kernels.stockham_fft`, `kernels.fused_fft`) and works for any complex dtype,
so the kernel tests compare each launcher with its reference. They live in one triton-free module, rather
than inside each kernel file, because importing triton must stay optional (CPU builds of torch).

The centring identity the kernels use (even height and width) and the SENSE model they compute are
defined in engine.physics.sense; these functions split that computation the way the kernels do.
"""

from __future__ import annotations

import torch

from engine.physics.sense import centring_sign, checkerboard

NORMS = ("ortho", "backward", "forward")


def _real_dtype(tensor: torch.Tensor) -> torch.dtype:
    return tensor.real.dtype if tensor.is_complex() else tensor.dtype


# --- kernel (1) ------------------------------------------------------------------------------


def coil_expand_modulate(image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """s * m * S_c * x_b: coil images ready for an unshifted FFT.

    Args:
        image: (B, height, width) complex.
        maps: (B or 1, C, height, width) complex; a batch of 1 is shared by all B images.
    Returns:
        (B, C, height, width) complex.
    """
    height, width = image.shape[-2:]
    sign_m = centring_sign(height, width) * checkerboard(height, width, _real_dtype(image), image.device)
    return maps * (image * sign_m).unsqueeze(1)


# --- kernel (2) ------------------------------------------------------------------------------


def masked_residual(
    spectrum: torch.Tensor,
    mask: torch.Tensor,
    measured: torch.Tensor | None = None,
    premodulate: bool = False,
    compute_loss: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Centre an unshifted spectrum, mask it, subtract the masked data, and sum |r|^2.

    With c = m * spectrum (the centred k-space when `spectrum` = fft2 of kernel (1)'s output):
        r = M * c - M * y          (y = `measured`, or 0 when None)
        out = m * M * r if premodulate else r
        loss = sum |r|^2 (plain sum of squares over everything), or None if not compute_loss.
    `premodulate=True` gives what an unshifted ifft2 needs to apply ifftc to M * r (the adjoint
    of the mask applied to the residual), so backward needs no extra pass.
    The same call with premodulate=False maps centred k-space y to M * m * y, the input of the
    adjoint's unshifted ifft2 (m is its own inverse).

    Args:
        spectrum: (B, C, height, width) complex, unshifted FFT output (or centred data, see above).
        mask: (height, width) real, 0/1.
        measured: (B, C, height, width) complex, centred measured k-space, or None.
    Returns:
        out (B, C, height, width) complex, loss 0-dim real tensor or None.
    """
    height, width = spectrum.shape[-2:]
    m = checkerboard(height, width, _real_dtype(spectrum), spectrum.device)
    mask = mask.to(_real_dtype(spectrum))
    residual = mask * (m * spectrum)
    if measured is not None:
        residual = residual - mask * measured
    loss = torch.sum(torch.abs(residual) ** 2) if compute_loss else None
    out = m * mask * residual if premodulate else residual
    return out, loss


# --- kernel (3) ------------------------------------------------------------------------------


def coil_combine_modulate(
    coil_images: torch.Tensor, maps: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """scale * s * m * sum_c conj(S_c) * z_c: adjoint of kernel (1) after an unshifted ifft2.

    Args:
        coil_images: (B, C, height, width) complex, unshifted ifft2 output.
        maps: (B or 1, C, height, width) complex.
        scale: real scalar tensor (e.g. 2 * dL/dloss in backward), or None for 1.
    Returns:
        (B, height, width) complex.
    """
    height, width = coil_images.shape[-2:]
    sign_m = centring_sign(height, width) * checkerboard(
        height, width, _real_dtype(coil_images), coil_images.device
    )
    combined = (maps.conj() * coil_images).sum(dim=1) * sign_m
    return combined if scale is None else combined * scale


# --- kernel (4) ------------------------------------------------------------------------------


def fft_axis(
    x: torch.Tensor, dim: int = -1, inverse: bool = False, norm: str = "ortho"
) -> torch.Tensor:
    """Unshifted 1D (i)FFT of `x` along `dim` (torch.fft; the Triton kernel matches it)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    transform = torch.fft.ifft if inverse else torch.fft.fft
    return transform(x, dim=dim, norm=norm)


# --- fused FFT kernels (kernels.fused_fft) ---------------------------------------------------


def expand_fft_rows(image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Kernel (1) followed by the orthonormal FFT along the rows (width axis): (B, C, height, width) complex."""
    return fft_axis(coil_expand_modulate(image, maps), dim=-1)


def fft_columns_residual(
    row_spectrum: torch.Tensor,
    mask: torch.Tensor,
    measured: torch.Tensor,
    inverse_columns: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FFT along the columns (height axis), then kernel (2) with premodulate=True, then optionally the iFFT along
    y of the premodulated residual (the first half of backward's ifft2).

    Args:
        row_spectrum: (B, C, height, width) complex, output of `expand_fft_rows`.
        mask: (height, width) real; measured: (B, C, height, width) complex centred k-space.
    Returns:
        state (B, C, height, width) complex (input of `ifft_rows_combine` when inverse_columns), loss.
    """
    premodulated, loss = masked_residual(
        fft_axis(row_spectrum, dim=-2), mask, measured, premodulate=True
    )
    state = fft_axis(premodulated, dim=-2, inverse=True) if inverse_columns else premodulated
    return state, loss


def ifft_rows_combine(
    column_images: torch.Tensor, maps: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The orthonormal iFFT along the rows (width axis) followed by kernel (3): (B, height, width) complex."""
    return coil_combine_modulate(fft_axis(column_images, dim=-1, inverse=True), maps, scale)
