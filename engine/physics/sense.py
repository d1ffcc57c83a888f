"""The SENSE model y = M F S x, its adjoint and the data-consistency residual: the one definition.

Layout: an image batch is `(..., height, width)` complex; coil maps are `(..., coils, height,
width)`; multicoil k-space is `(..., coils, height, width)`; the mask `(height, width)` is real
0/1 (None: full sampling). The plane axes are called height and width, not y and x, because the
plane is (y, x) of a 2D slice but (y, z) of a 3D volume, where x is the readout: there the leading
`...` is the batch of readout positions x and (height, width) the (ky, kz) phase-encode plane.
F is the centred orthonormal FFT of engine.physics.fft.

Everything here is plain differentiable torch, so autograd's vector-Jacobian product of `forward`
is `adjoint` (tests/test_physics_sense.py). kernels.sense dispatches to these functions for its
"torch" backend and to the Triton kernels, tested against them, for "triton".

Centring by modulation (`residual_sum` for even sizes; the Triton kernels use the same identity).
With the checkerboard m[u, v] = (-1)^(u+v) and the sign s = (-1)^(height/2 + width/2):

    fftc(x)  = s * m * fft2(m * x,  norm="ortho")
    ifftc(k) = s * m * ifft2(m * k, norm="ortho")

Why: for even n, ifftshift is a roll by n/2, which multiplies the DFT by (-1)^k; the output
fftshift evaluates that DFT at k - n/2, which turns exp(-2 pi i j k / n) into (-1)^j exp(...) and
leaves (-1)^(k - n/2) = (-1)^(n/2) (-1)^k in front. s = +1 whenever height and width are multiples of 4
(all benchmark sizes: 160, 256, 320, 512); s = -1 e.g. for 6 x 8. For odd n the shifts are not a
modulation, so odd sizes use fftc itself. Multiplying by +-1 is exact, so folding m into the maps
and s m into the data costs no accuracy; |s m| = 1 leaves the residual's norm unchanged.
"""
from __future__ import annotations

import functools

import torch

from engine.physics.fft import fftc, ifftc


def centring_sign(height: int, width: int) -> int:
    """s = (-1)^(height/2 + width/2) of the centring identity; ValueError for odd sizes."""
    if height % 2 or width % 2:
        raise ValueError(
            f"the modulation form of the centred FFT needs even plane sizes, got {height} x {width}; "
            "odd sizes must use the fftshift path (engine.physics.fft.fftc)"
        )
    return -1 if (height // 2 + width // 2) % 2 else 1


@functools.lru_cache(maxsize=16)
def checkerboard(height: int, width: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """m[u, v] = (-1)^(u+v), shape (height, width), real `dtype` (cached: every DC evaluation needs it;
    never modify the result in place)."""
    u = torch.arange(height, device=device).unsqueeze(1)
    v = torch.arange(width, device=device).unsqueeze(0)
    return (1 - 2 * ((u + v) % 2)).to(dtype)


def forward(image: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """M F (S_c x): image `(..., height, width)` -> k-space `(..., coils, height, width)`."""
    kspace = fftc(maps * image.unsqueeze(-3))
    return kspace if mask is None else kspace * mask.to(kspace.real.dtype)


def adjoint(kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """sum_c conj(S_c) F^H (M y_c): k-space `(..., coils, height, width)` -> image `(..., height, width)`."""
    if mask is not None:
        kspace = kspace * mask.to(kspace.real.dtype)
    return (maps.conj() * ifftc(kspace)).sum(dim=-3)


def residual_sum(image: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor, kspace: torch.Tensor) -> torch.Tensor:
    """sum over batch, coils and samples of |M F(S_c x) - M y_c|^2 (a 0-dim real tensor).

    image `(..., height, width)`, maps and kspace `(..., coils, height, width)` (broadcast), mask `(height, width)`.
    Even sizes take the modulation form (module docstring: one unshifted FFT, no shifts).
    """
    height, width = image.shape[-2:]
    mask = mask.to(image.real.dtype)
    measured = kspace * mask
    if height % 2 or width % 2:
        residual = forward(image, maps, mask) - measured
    else:
        board = checkerboard(height, width, image.real.dtype, image.device)
        # |M fftc(S x) - M y| = |M fft2(m S x) - s m M y| elementwise, since fftc(z) = s m fft2(m z)
        prediction = torch.fft.fft2((maps * board) * image.unsqueeze(-3), norm="ortho")
        residual = prediction * mask - measured * (centring_sign(height, width) * board)
    return torch.view_as_real(residual).square().sum()


class LinearOperator:
    """A linear map A with `forward(x) = A x` and `adjoint(y) = A^H y`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """A^H A x, the operator of CG-SENSE."""
        return self.adjoint(self.forward(x))


class SenseOperator(LinearOperator):
    """The SENSE model A = M F S for fixed maps and mask (`forward` / `adjoint` above)."""

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor | None = None):
        if not maps.is_complex():
            raise TypeError(f"coil maps must be complex, got {maps.dtype}")
        if mask is not None and mask.is_complex():
            raise TypeError("a sampling mask must be real (0/1), got a complex tensor")
        self.maps, self.mask = maps, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward(x, self.maps, self.mask)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return adjoint(y, self.maps, self.mask)


def sense_operator(maps: torch.Tensor, mask: torch.Tensor | None = None) -> SenseOperator:
    """A = M F S: image `(..., height, width)` -> k-space `(..., coils, height, width)` (mask None: full sampling)."""
    return SenseOperator(maps, mask)
