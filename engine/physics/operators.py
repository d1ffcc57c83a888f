"""Small linear operators, each with its adjoint, composed into the SENSE model.

Layout: an image batch is `(..., ny, nx)` complex; coil maps are `(..., coils, ny, nx)`;
multicoil k-space is `(..., coils, ny, nx)`. For hybrid-space 3D the leading `...` is the batch
of readout positions and (ny, nx) is the (ky, kz) phase-encode plane.

All operators are written in differentiable torch ops, so autograd's vector-Jacobian product
through `forward` is `adjoint` (tested in tests/test_physics_operators.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.physics.fft import Dims, as_dims, fftc, ifftc


class LinearOperator:
    """A linear map A with `forward(x) = A x` and `adjoint(y) = A^H y`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def __matmul__(self, inner: LinearOperator) -> Composed:
        """`outer @ inner` applies `inner` first, as in matrix products."""
        return Composed([inner, self])

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """A^H A x, the operator of CG-SENSE."""
        return self.adjoint(self.forward(x))


class Composed(LinearOperator):
    """Operators applied in list order; the adjoint runs the adjoints in reverse."""

    def __init__(self, ops: Sequence[LinearOperator]):
        flat: list[LinearOperator] = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, Composed) else [op])
        self.ops = flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            x = op.forward(x)
        return x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        for op in reversed(self.ops):
            y = op.adjoint(y)
        return y

    def __repr__(self) -> str:
        return " @ ".join(type(op).__name__ for op in reversed(self.ops))


class CoilMultiply(LinearOperator):
    """Image `(..., ny, nx)` -> coil images `(..., coils, ny, nx)` = S_c x; adjoint sums conj(S_c) y_c."""

    def __init__(self, maps: torch.Tensor):
        if not maps.is_complex():
            raise TypeError(f"coil maps must be complex, got {maps.dtype}")
        self.maps = maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maps * x.unsqueeze(-3)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return (self.maps.conj() * y).sum(dim=-3)


class CenteredFFT(LinearOperator):
    """Centred orthonormal FFT over `dims`; unitary, so the adjoint is the inverse."""

    def __init__(self, dims: Dims = (-2, -1)):
        self.dims = as_dims(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fftc(x, self.dims)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return ifftc(y, self.dims)


class Mask(LinearOperator):
    """Sampling mask M (0/1, broadcast over coils); real and idempotent, hence self-adjoint."""

    def __init__(self, mask: torch.Tensor):
        if mask.is_complex():
            raise TypeError("a sampling mask must be real (0/1), got a complex tensor")
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.real.dtype)

    adjoint = forward


def sense_operator(maps: torch.Tensor, mask: torch.Tensor | None = None) -> Composed:
    """The SENSE model A = M F S: image `(..., ny, nx)` -> k-space `(..., coils, ny, nx)`.

    Args:
        maps: coil sensitivities `(..., coils, ny, nx)`, complex.
        mask: sampling pattern broadcastable to `(..., coils, ny, nx)`, or None for full sampling.
    """
    ops: list[LinearOperator] = [CoilMultiply(maps), CenteredFFT((-2, -1))]
    if mask is not None:
        ops.append(Mask(mask))
    return Composed(ops)
