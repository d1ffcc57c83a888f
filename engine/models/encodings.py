"""Coordinate encodings of the INR: Gaussian Fourier features and a multiresolution hash grid.

Both map coordinates `(N, in_dim)` float32 in [0, 1] to features `(N, out_dim)` float32.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# Instant-NGP spatial hash primes (Mueller et al. 2022, eq. 4); the first is 1 for cache coherence.
_HASH_PRIMES = (1, 2654435761, 805459861)


def coordinate_grid(shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Pixel coordinates in [0, 1] of a grid `shape` (ny, nx[, nz]) -> `(prod(shape), len(shape))` float32.

    Axis i takes linspace(0, 1, shape[i]) (0 if shape[i] == 1); row-major ('ij') order, so
    `out.view(*shape, d)` lays the coordinates out like the image.
    """
    axes = [torch.linspace(0.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device)
            for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh, dim=-1).reshape(-1, len(shape))


def level_resolutions(min_res: int, max_res: int, levels: int) -> list[int]:
    """Grid resolutions N_l = floor(min_res * b^l), b = exp((ln max_res - ln min_res)/(L-1)) of a
    multiresolution grid (Instant-NGP eq. 2-3)."""
    growth = math.exp((math.log(max_res) - math.log(min_res)) / max(levels - 1, 1))
    return [math.floor(min_res * growth ** level) for level in range(levels)]


class FourierFeatures(nn.Module):
    """Gaussian random Fourier features gamma(v) = [sin(2 pi B v), cos(2 pi B v)] (Tancik et al. 2020).

    B `(n_freq, in_dim)` ~ N(0, sigma^2), drawn from a seeded generator and kept as a buffer, so a
    checkpoint restores the same frequencies. The paper's INR uses 64 frequencies with sigma 9 on
    coordinates in [0, 1] (docs/ARCHITECTURE.md, "The reference recipe"). `coord_range` maps inputs in that range
    linearly to [0, 1] first.
    """

    def __init__(self, in_dim: int, n_freq: int = 64, sigma: float = 9.0, seed: int = 0,
                 coord_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        if n_freq < 1 or sigma <= 0:
            raise ValueError(f"FourierFeatures needs n_freq >= 1 and sigma > 0, got {n_freq}, {sigma}")
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("frequencies", torch.randn(n_freq, in_dim, generator=generator) * sigma)
        self.in_dim = in_dim
        self.out_dim = 2 * n_freq
        self.coord_range = (float(coord_range[0]), float(coord_range[1]))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """coords `(N, in_dim)` -> features `(N, 2 n_freq)`: sines then cosines."""
        low, high = self.coord_range
        unit = (coords - low) / (high - low)
        phase = 2 * math.pi * unit @ self.frequencies.t()
        return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)

    def forward_grid(self, shape: Sequence[int]) -> torch.Tensor:
        """Features `(prod(shape), out_dim)` at `coordinate_grid(shape)`."""
        return self.forward(coordinate_grid(shape, device=self.frequencies.device))


class HashGridEncoding(nn.Module):
    """Multiresolution hash encoding (Instant-NGP, Mueller et al. 2022), in plain torch.

    Level l has resolution N_l = floor(min_res * b^l), b = exp((ln max_res - ln min_res)/(L-1))
    (paper eq. 2-3), i.e. (N_l + 1)^d grid vertices at positions i / N_l. The vertices index a
    table of `2^log2_table_size` feature vectors: directly (row-major) when they fit in the table,
    else through the spatial hash XOR_i(x_i * pi_i) mod T (eq. 4). A coordinate's feature is the
    d-linear interpolation of its cell's vertex features; levels are concatenated, so
    out_dim = levels * features_per_level.

    Implementation: each level's vertex features are gathered into a dense (N_l + 1)^d grid (a
    view for direct levels, one gather for hashed ones) and interpolated with `grid_sample`
    (any coordinates, `forward`) or `interpolate(align_corners=True)` (the full pixel grid of
    `coordinate_grid(shape)`, `forward_grid`; several times faster on CPU). Both give the same
    values. The dense vertex grid costs (max_res + 1)^d entries, fine for the 2D coordinates of
    INR2D / ReadoutINR; keep max_res small for in_dim = 3.
    """

    def __init__(self, in_dim: int = 2, levels: int = 16, features_per_level: int = 2,
                 log2_table_size: int = 16, min_res: int = 16, max_res: int = 512,
                 init_scale: float = 1e-4, seed: int = 0):
        super().__init__()
        if in_dim not in (2, 3):
            raise ValueError(f"HashGridEncoding supports in_dim 2 or 3, got {in_dim}")
        if levels < 1 or min_res < 1 or max_res < min_res:
            raise ValueError(f"HashGridEncoding needs levels >= 1 and 1 <= min_res <= max_res, got "
                             f"levels={levels}, min_res={min_res}, max_res={max_res}")
        self.in_dim = in_dim
        self.levels = levels
        self.features_per_level = features_per_level
        self.table_size = 2 ** log2_table_size
        self.out_dim = levels * features_per_level
        self.resolutions = level_resolutions(min_res, max_res, levels)
        self.hashed = [(res + 1) ** in_dim > self.table_size for res in self.resolutions]
        generator = torch.Generator().manual_seed(seed)
        # Level l stores min(T, (N_l+1)^d) vectors (as Instant-NGP does); one Parameter per level so
        # a level's gradient never touches the others. Small uniform init U(-1e-4, 1e-4) (paper).
        self.tables = nn.ParameterList()
        for level, res in enumerate(self.resolutions):
            rows = self.table_size if self.hashed[level] else (res + 1) ** in_dim
            table = torch.rand(rows, features_per_level, generator=generator) * 2 - 1
            self.tables.append(nn.Parameter(table * init_scale))
            if self.hashed[level]:
                self.register_buffer(f"vertex_rows_{level}", self._hash_rows(res), persistent=False)

    def _hash_rows(self, res: int) -> torch.Tensor:
        """Table rows `((res+1)^d,)` of the vertices of a hashed level, row-major vertex order."""
        axis = torch.arange(res + 1, dtype=torch.int64)
        vertex = torch.stack(torch.meshgrid(*([axis] * self.in_dim), indexing="ij"), -1).reshape(-1, self.in_dim)
        index = torch.zeros(vertex.shape[0], dtype=torch.int64)
        for i in range(self.in_dim):  # int64 products never overflow here; mod 2^k equals uint32 wrap
            index = index ^ (vertex[:, i] * _HASH_PRIMES[i])
        return index % self.table_size

    def level_grid(self, level: int) -> torch.Tensor:
        """Vertex features of one level as an image `(1, F, res+1, res+1[, res+1])`."""
        res = self.resolutions[level]
        table = self.tables[level]
        if self.hashed[level]:
            table = table.index_select(0, getattr(self, f"vertex_rows_{level}"))
        return table.t().reshape(1, self.features_per_level, *([res + 1] * self.in_dim))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """coords `(N, in_dim)` in [0, 1] -> features `(N, levels * features_per_level)`."""
        if coords.ndim != 2 or coords.shape[1] != self.in_dim:
            raise ValueError(f"coords must be (N, {self.in_dim}), got {tuple(coords.shape)}")
        n = coords.shape[0]
        # grid_sample's last axis is (x = last image axis, y, ...): reverse our (axis0, axis1, ...)
        grid = (coords.to(self.tables[0].dtype) * 2 - 1).flip(-1).view(1, n, *([1] * (self.in_dim - 1)), self.in_dim)
        feats = [nn.functional.grid_sample(self.level_grid(level), grid, mode="bilinear",
                                           padding_mode="border", align_corners=True)
                 for level in range(self.levels)]
        return torch.cat(feats, dim=1).reshape(self.out_dim, n).t()

    def forward_grid(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Features `(prod(shape), out_dim)` at `coordinate_grid(shape)`: same values as
        `forward(coordinate_grid(shape))`, computed by separable interpolation."""
        if len(shape) != self.in_dim:
            raise ValueError(f"grid shape must have {self.in_dim} axes, got {tuple(shape)}")
        mode = "bilinear" if self.in_dim == 2 else "trilinear"
        feats = [nn.functional.interpolate(self.level_grid(level), size=tuple(shape), mode=mode,
                                           align_corners=True)
                 for level in range(self.levels)]
        return torch.cat(feats, dim=1).reshape(self.out_dim, -1).t()
