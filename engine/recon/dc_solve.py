"""The final data-consistency solve: the fit's output, made consistent with what the data determine well.

Why: every regulariser of the fit (TV, wavelets, the prior's denoiser) shrinks not only the content it
has to invent but also what the measured samples pin down, and the stochastic plane draws leave each
plane a little short of its data. The solve

    x = argmin_x ||M F S x - y||^2 + weight ||x - x_fit||^2

keeps the fit along the directions of A = M F S that the data barely see (eigenvalues of A^H A below
`weight`) and takes the data's least-squares answer where they see much. This is the data-consistency
step of unrolled and diffusion-based reconstructions (e.g. MoDL, Aggarwal et al. 2019), with the fit as
the prior mean. `weight` is dimensionless: A^H A has eigenvalues <= 1 for maps normalised to
sum_c |S_c|^2 <= 1 and a 0/1 mask. Too small a weight lets the noise of the weakly determined directions
through (on the 1 mm tuning case 0.03 is worse than no solve), too large changes nothing.

A is block-diagonal in the readout position x, so every plane is solved on its own by CG on
(A^H A + weight I) d = A^H (y - A x_fit), x = x_fit + d: the result does not depend on how the planes
are split over ranks or chunks.
"""
from __future__ import annotations

import torch

from engine.evaluation.baselines import conjugate_gradient
from engine.physics import sense


@torch.no_grad()
def dc_solve(planes: torch.Tensor, kspace: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor,
             weight: float, iterations: int) -> torch.Tensor:
    """planes (B, ny, nz) complex, their k-space and maps (B, coils, ny, nz), mask (ny, nz) 0/1 ->
    the solved planes (B, ny, nz), each one by `iterations` CG steps at most (module docstring)."""
    if weight <= 0:
        raise ValueError(f"dc_solve needs weight > 0, got {weight}")
    solved = []
    for plane, k, m in zip(planes, kspace, maps):
        operator = sense.sense_operator(m, mask)
        rhs = operator.adjoint(k - operator.forward(plane))
        step, _ = conjugate_gradient(lambda d: operator.normal(d) + weight * d, rhs, iterations)
        solved.append(plane + step)
    return torch.stack(solved)


__all__ = ["dc_solve"]
