"""Anchored refinement of a 3D output: a 3D L1-wavelet solve that starts at the fit and stays near it
(and the plain 3D L1-wavelet of a run's slab, which the selection blends with the output).

    v = argmin 1/2 ||M F_yz S v - y||^2 + lamda ||W_xyz v||_1 + anchor_weight / 2 ||v - v_fit||^2

by FISTA from v_fit (engine.evaluation.baselines.l1_wavelet_3d with an anchor, over overlapping slabs;
lamda = lambda_factor x the volume's intensity scale, the 3D rule's form). This is prior-image compressed
sensing with the INR's volume as the prior image. Why: at 1 mm the INR's error and the 3D L1-wavelet's are only partly alike
(correlation 0.67-0.71 on the tuning and evaluation slabs, benchmarks/results/quality3d.md), so a solve
that keeps what both agree on lands below either.

Distributed: each rank solves its slab plus `L1_3D_HALO` planes on each side; the halo's k-space and maps
come from the input, its anchor planes from the ranks that hold them (`halo_planes`), so a rank's result
does not depend on how many ranks there are beyond that reach.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.evaluation.baselines import L1_3D_HALO, L1_3D_ITERATIONS, l1_wavelet_3d_slabs
from engine.runtime.context import DistContext


@dataclass
class Refine3DConfig:
    """The anchored L1-wavelet refinement of the output (engine.recon.refine3d)."""

    anchor_weight: float = 0.0
    """Weight of ||v - v_fit||^2 against the data term (0: off, the output is the fit). Small weights
    leave the fit's measured points to the data and its unmeasured ones to a compromise of the fit
    and the wavelet sparsity."""
    lambda_factor: float = 0.003
    """lamda = lambda_factor x the volume's intensity scale (the 3D L1-wavelet rule's form; the rule's
    own factor for the baseline is 0.004)."""
    iterations: int = L1_3D_ITERATIONS
    """FISTA iterations."""

    def __post_init__(self) -> None:
        if self.anchor_weight < 0 or self.lambda_factor <= 0 or self.iterations < 1:
            raise ValueError("refine.anchor_weight must be >= 0, refine.lambda_factor > 0 and "
                             "refine.iterations >= 1")


def halo_planes(slab: np.ndarray, x_start: int, nx: int, halo: int, ctx: DistContext) -> tuple[np.ndarray, np.ndarray]:
    """The `halo` planes of the whole volume before this rank's slab (n, ny, nz) and after it (fewer at the
    volume's ends), gathered from the ranks that hold them.

    Every rank shares only its first and last `halo` planes: a plane within `halo` of a slab's start
    is among the last `halo` planes of the slab that holds it (and symmetrically after the end).
    """
    n = slab.shape[0]
    edges = {x_start + i: slab[i] for i in [*range(min(halo, n)), *range(max(0, n - halo), n)]}
    shared: dict[int, np.ndarray] = {}
    for part in ctx.all_gather_object(edges):
        shared.update(part)
    empty = np.zeros((0, *slab.shape[1:]), slab.dtype)

    def planes(a: int, b: int) -> np.ndarray:
        return np.stack([shared[x] for x in range(a, b)]) if b > a else empty

    return planes(max(0, x_start - halo), x_start), planes(x_start + n, min(nx, x_start + n + halo))


def refine_slab(fit: np.ndarray, read_planes, mask: np.ndarray, x_start: int, nx: int, scale: float,
                cfg: Refine3DConfig, ctx: DistContext, halo: int = L1_3D_HALO, progress: bool = False) -> np.ndarray:
    """The refined planes [x_start, x_start + len(fit)) of the volume whose fit this rank holds.

    read_planes(a, b) -> (kspace (n, C, ky, kz) masked, maps (n, C, ny, nz)) of planes [a, b) of the input;
    scale: the whole volume's intensity scale (the 3D rule's s).
    progress: a tqdm bar over the iterations (the caller passes it on one rank only).
    """
    before, after = halo_planes(fit, x_start, nx, halo, ctx)  # the planes l1_wavelet_3d_slabs reads around the slab
    return l1_wavelet_3d_slabs(read_planes, mask, x_start, x_start + fit.shape[0], nx, scale, halo=halo,
                               factor=cfg.lambda_factor, max_iter=cfg.iterations,
                               anchor=np.concatenate([before, fit, after]), anchor_weight=cfg.anchor_weight,
                               progress="refine" if progress else None)


def refine_fit(recon, fit: np.ndarray, cfg: Refine3DConfig, ctx: DistContext, progress: bool = False) -> np.ndarray:
    """`refine_slab` of this rank's slab of an engine.recon.fit3d.Recon3D's output `fit`, from the samples
    that run fitted (a run with a holdout: without the held-out ones) and its intensity scale (collective)."""
    return refine_slab(fit, recon.input_planes, recon.mask.cpu().numpy(), recon.x_start, recon.nx, recon.scale,
                       cfg, ctx, progress=progress)


def l1_wavelet_3d_of(recon, progress: bool = False) -> np.ndarray:
    """engine.evaluation.baselines' 3D L1-wavelet of this rank's slab from the samples the run fits, with a
    halo of neighbouring planes read from the input (overlapping slabs) and the volume's intensity scale."""
    return l1_wavelet_3d_slabs(recon.input_planes, recon.mask.cpu().numpy(), recon.x_start, recon.x_stop,
                               recon.nx, recon.scale, progress="L1-wavelet 3D" if progress else None)
