"""Implicit neural representations of complex MR images: encoding -> MLP trunk -> complex head.

- `ReadoutINR` (3D; docs/ARCHITECTURE.md, "Design"): phase-encode coordinates (y, z) -> D complex
  outputs, one per readout position x (the readout is discretised, not encoded). The head holds one row of
  weights per output position, `weight (D, 2, hidden)` (real / imag) and `bias (D, 2)`, so that
  `forward(coords, rows)` evaluates only the requested rows and a rank can own a slab of rows.
- `INR2D`: the same model with D = 1, returning one complex pixel per coordinate.

The trunk runs under whatever autocast is active (bf16 on GPU); the head output is cast to
float32 before `torch.complex`, which rejects bf16 halves.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from engine.models.encodings import FourierFeatures, HashGridEncoding

Rows = torch.Tensor | slice | Sequence[int] | None


@dataclass
class EncodingConfig:
    """Coordinate encoding of the INR."""

    kind: Literal["fourier", "hashgrid"] = "hashgrid"
    """'fourier': Gaussian Fourier features (the paper); 'hashgrid': multiresolution hash grid."""
    n_freq: int = 64
    """fourier: number of random frequencies (features = 2 n_freq: sin and cos)."""
    sigma: float = 9.0
    """fourier: standard deviation of the frequencies (coordinates in [0, 1])."""
    levels: int = 16
    """hashgrid: number of resolution levels."""
    features_per_level: int = 2
    """hashgrid: features stored per table entry."""
    log2_table_size: int = 16
    """hashgrid: log2 of the table size T per level; 0 = the smallest T with 2 entries per pixel of the image
    (resolved by the recon loop), so that the finest levels collide as often at any image size."""
    min_res: int = 16
    """hashgrid: coarsest grid resolution."""
    max_res: int = 512
    """hashgrid: finest grid resolution; 0 = twice the image's larger side (resolved by the recon loop)."""
    seed: int = 0
    """seed of the frequencies / table initialisation."""


@dataclass
class INRConfig:
    """INR architecture: encoding, trunk MLP, complex head."""

    encoding: EncodingConfig = field(default_factory=EncodingConfig)
    hidden: int = 64
    """width of the trunk's hidden layers."""
    layers: int = 2
    """number of hidden layers of the trunk (Linear + activation each)."""
    activation: Literal["relu", "silu", "gelu"] = "relu"
    """trunk nonlinearity (the paper: ReLU)."""
    seed: int = 0
    """seed of the trunk and head initialisation."""


def resolve_encoding(config: INRConfig, grid_shape: Sequence[int]) -> INRConfig:
    """`config` with an automatic hash-grid max_res (0) replaced by 2 x max(grid_shape) and an automatic
    log2_table_size (0) by ceil(log2(2 x the grid's pixel count))."""
    import dataclasses
    import math

    encoding = config.encoding
    if encoding.kind != "hashgrid":
        return config
    if encoding.max_res <= 0:
        encoding = dataclasses.replace(encoding, max_res=max(encoding.min_res, 2 * max(grid_shape)))
    if encoding.log2_table_size <= 0:
        encoding = dataclasses.replace(encoding, log2_table_size=math.ceil(math.log2(2 * math.prod(grid_shape))))
    return dataclasses.replace(config, encoding=encoding)


def build_encoding(config: EncodingConfig, in_dim: int) -> nn.Module:
    """The encoding module described by `config` (has `.out_dim`)."""
    if config.kind == "fourier":
        return FourierFeatures(in_dim, n_freq=config.n_freq, sigma=config.sigma, seed=config.seed)
    if config.kind == "hashgrid":
        if config.max_res <= 0:
            raise ValueError("hash-grid max_res 0 (automatic) must be resolved with resolve_encoding first")
        if config.log2_table_size <= 0:
            raise ValueError("hash-grid log2_table_size 0 (automatic) must be resolved with resolve_encoding first")
        return HashGridEncoding(in_dim, levels=config.levels, features_per_level=config.features_per_level,
                                log2_table_size=config.log2_table_size, min_res=config.min_res,
                                max_res=config.max_res, seed=config.seed)
    raise ValueError(f"unknown encoding kind {config.kind!r}")


class MLP(nn.Module):
    """Trunk: `layers` x (Linear + activation); `(N, in_dim)` -> `(N, hidden)`."""

    def __init__(self, in_dim: int, hidden: int, layers: int, activation: str = "relu"):
        super().__init__()
        acts = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"unknown activation {activation!r}; choose from {list(acts)}")
        if layers < 1:
            raise ValueError(f"MLP needs at least one hidden layer, got {layers}")
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks += [nn.Linear(in_dim if i == 0 else hidden, hidden), acts[activation]()]
        self.net = nn.Sequential(*blocks)
        self.out_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ComplexRowHead(nn.Module):
    """Linear head with D complex outputs; each output row can be evaluated on its own.

    weight `(D, 2, hidden)`, bias `(D, 2)`: row d gives real = w[d,0].h + b[d,0], imag = w[d,1].h + b[d,1].
    Initialised like nn.Linear (uniform +-1/sqrt(hidden)).
    """

    def __init__(self, hidden: int, rows: int):
        super().__init__()
        bound = hidden ** -0.5
        self.weight = nn.Parameter(torch.empty(rows, 2, hidden).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(rows, 2).uniform_(-bound, bound))
        self.rows = rows

    def forward(self, features: torch.Tensor, rows: Rows = None) -> torch.Tensor:
        """features `(N, hidden)` -> complex64 `(R, N)`, R = number of selected rows (all D if None).

        `rows`: None, a slice, a sequence of ints or an int64 tensor of row indices.
        """
        weight, bias = self.weight, self.bias
        if rows is not None:
            if not isinstance(rows, slice):
                rows = torch.as_tensor(rows, dtype=torch.long, device=weight.device)
            weight, bias = weight[rows], bias[rows]
        r = weight.shape[0]
        # (R*2, hidden) @ (hidden, N) -> (R, 2, N): each output plane is contiguous
        out = (weight.reshape(r * 2, -1).to(features.dtype) @ features.t()).view(r, 2, -1)
        out = out.float() + bias.float().unsqueeze(-1)  # torch.complex rejects bf16 halves
        return torch.complex(out[:, 0], out[:, 1])


class ReadoutINR(nn.Module):
    """Coordinates `(N, in_dim)` -> D complex values per coordinate, one per readout position x.

    `trunk_features(coords)` (encoding + MLP) is shared by every row; `forward(coords, rows)`
    returns complex64 `(R, N)`; `forward_grid(shape, rows)` evaluates the whole pixel grid
    `coordinate_grid(shape)` (the fast path of the hash grid) and returns `(R, *shape)`.
    """

    def __init__(self, config: INRConfig, out_rows: int, in_dim: int = 2):
        super().__init__()
        self.config = config
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)  # trunk/head init reproducible from the config alone
        try:
            self.encoding = build_encoding(config.encoding, in_dim)
            self.trunk = MLP(self.encoding.out_dim, config.hidden, config.layers, config.activation)
            self.head = ComplexRowHead(config.hidden, out_rows)
        finally:
            torch.random.set_rng_state(generator_state)
        self.in_dim = in_dim

    def trunk_features(self, coords: torch.Tensor) -> torch.Tensor:
        """coords `(N, in_dim)` float32 in [0, 1] -> trunk features `(N, hidden)` (autocast dtype)."""
        if coords.ndim != 2 or coords.shape[1] != self.in_dim:
            raise ValueError(f"coords must be (N, {self.in_dim}), got {tuple(coords.shape)}")
        return self.trunk(self.encoding(coords))

    def trunk_features_grid(self, shape: Sequence[int]) -> torch.Tensor:
        """Trunk features `(prod(shape), hidden)` on `coordinate_grid(shape)`."""
        return self.trunk(self.encoding.forward_grid(tuple(shape)))

    def forward(self, coords: torch.Tensor, rows: Rows = None) -> torch.Tensor:
        """coords `(N, in_dim)` -> complex64 `(R, N)` for the selected head rows (all if None)."""
        return self.head(self.trunk_features(coords), rows)

    def forward_grid(self, shape: Sequence[int], rows: Rows = None) -> torch.Tensor:
        """complex64 `(R, *shape)`: the selected rows on the full grid `coordinate_grid(shape)`."""
        out = self.head(self.trunk_features_grid(shape), rows)
        return out.view(out.shape[0], *shape)


class INR2D(ReadoutINR):
    """Coordinates `(N, 2)` -> one complex pixel each: `forward` returns complex64 `(N,)`."""

    def __init__(self, config: INRConfig):
        super().__init__(config, out_rows=1, in_dim=2)

    def forward(self, coords: torch.Tensor, rows: Rows = None) -> torch.Tensor:
        """coords `(N, 2)` -> complex64 `(N,)` (`rows` is accepted for API symmetry and ignored)."""
        return super().forward(coords)[0]

    def image(self, shape: Sequence[int]) -> torch.Tensor:
        """The image complex64 `shape` (ny, nx) on `coordinate_grid(shape)`."""
        return self.forward_grid(shape)[0]
