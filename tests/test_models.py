"""engine.models: encodings, INR shapes and dtypes, head row slicing."""
from __future__ import annotations

import math

import pytest
import torch

from engine.models import (
    INR2D,
    ComplexRowHead,
    EncodingConfig,
    FourierFeatures,
    HashGridEncoding,
    INRConfig,
    ReadoutINR,
    coordinate_grid,
)
from engine.models.encodings import _HASH_PRIMES
from engine.models.inr import build_encoding, resolve_encoding

SMALL_HASH = EncodingConfig(kind="hashgrid", levels=4, features_per_level=2, log2_table_size=8,
                            min_res=4, max_res=32)


def test_coordinate_grid_layout():
    grid = coordinate_grid((3, 5))
    assert grid.shape == (15, 2) and grid.dtype == torch.float32
    assert torch.allclose(grid.view(3, 5, 2)[2, 4], torch.tensor([1.0, 1.0]))
    assert torch.allclose(grid.view(3, 5, 2)[1, 0], torch.tensor([0.5, 0.0]))
    assert coordinate_grid((1, 4))[:, 0].abs().max() == 0


def test_fourier_features_formula_and_seed():
    enc = FourierFeatures(2, n_freq=8, sigma=9.0, seed=3)
    coords = torch.rand(10, 2)
    phase = 2 * math.pi * coords @ enc.frequencies.t()
    assert torch.allclose(enc(coords), torch.cat([phase.sin(), phase.cos()], -1), atol=1e-5)
    assert torch.equal(enc.frequencies, FourierFeatures(2, 8, 9.0, seed=3).frequencies)
    assert not torch.equal(enc.frequencies, FourierFeatures(2, 8, 9.0, seed=4).frequencies)
    big = FourierFeatures(2, n_freq=4096, sigma=9.0, seed=0).frequencies
    assert abs(big.std().item() - 9.0) < 0.3  # Gaussian with the configured sigma


def test_hash_grid_levels_and_hash():
    enc = HashGridEncoding(2, levels=5, features_per_level=3, log2_table_size=8, min_res=4, max_res=64)
    growth = math.exp((math.log(64) - math.log(4)) / 4)
    assert enc.resolutions == [math.floor(4 * growth ** level) for level in range(5)]
    assert enc.out_dim == 15
    # (res+1)^2 <= 256 -> direct indexing, smaller tables; above -> hashed tables of 256 rows
    assert enc.hashed == [(r + 1) ** 2 > 256 for r in enc.resolutions]
    for level, res in enumerate(enc.resolutions):
        rows = enc.tables[level].shape[0]
        assert rows == (256 if enc.hashed[level] else (res + 1) ** 2)
    level = enc.hashed.index(True)
    rows = getattr(enc, f"vertex_rows_{level}")
    res = enc.resolutions[level]
    x, y = 3, 5  # vertex (3, 5) sits at row-major position 3 * (res + 1) + 5
    expected = ((x * _HASH_PRIMES[0]) ^ (y * _HASH_PRIMES[1])) % 256
    assert rows[x * (res + 1) + y] == expected


def test_hash_grid_interpolates_bilinearly_at_vertices_and_between():
    enc = HashGridEncoding(2, levels=1, features_per_level=1, log2_table_size=10, min_res=4, max_res=4)
    with torch.no_grad():
        enc.tables[0].copy_(torch.arange(25, dtype=torch.float32).view(25, 1))  # value = 5 i + j at vertex (i, j)
    coords = torch.tensor([[0.25, 0.5], [0.125, 0.0], [1.0, 1.0], [0.3, 0.7]])
    expected = torch.tensor([5 * 1 + 2, 5 * 0.5, 24.0, 5 * 1.2 + 2.8])  # the field is linear: exact
    assert torch.allclose(enc(coords)[:, 0], expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 12), (7, 5)])
def test_hash_grid_fast_grid_path_matches_generic_path(shape):
    enc = HashGridEncoding(2, levels=4, features_per_level=2, log2_table_size=8, min_res=3, max_res=40, init_scale=1.0)
    assert torch.allclose(enc.forward_grid(shape), enc(coordinate_grid(shape)), atol=1e-5)


def test_hash_grid_gradient_reaches_tables():
    enc = HashGridEncoding(2, levels=3, log2_table_size=6, min_res=2, max_res=20)
    enc.forward_grid((6, 6)).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in enc.tables)


@pytest.mark.parametrize("encoding", [SMALL_HASH, EncodingConfig(kind="fourier", n_freq=8)])
def test_inr2d_shapes_and_dtypes(encoding):
    model = INR2D(INRConfig(encoding=encoding, hidden=16, layers=2))
    coords = coordinate_grid((6, 4))
    pixels = model(coords)
    assert pixels.shape == (24,) and pixels.dtype == torch.complex64
    image = model.image((6, 4))
    assert image.shape == (6, 4) and torch.allclose(image.reshape(-1), pixels, atol=1e-6)
    image.abs().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_inr_init_is_seeded():
    a, b = INR2D(INRConfig(encoding=SMALL_HASH, seed=1)), INR2D(INRConfig(encoding=SMALL_HASH, seed=1))
    c = INR2D(INRConfig(encoding=SMALL_HASH, seed=2))
    assert torch.equal(a.image((4, 4)), b.image((4, 4)))
    assert not torch.equal(a.image((4, 4)), c.image((4, 4)))


def test_bf16_autocast_gives_complex64_close_to_float32():
    model = INR2D(INRConfig(encoding=SMALL_HASH, hidden=16))
    full = model.image((8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image = model.image((8, 8))
    assert image.dtype == torch.complex64
    # bf16 keeps 8 bits of mantissa (2^-8 = 0.4 % per rounding); measured 0.15 % of the peak
    error = float(((image - full).abs().max() / full.abs().max()).detach())
    assert 0 < error < 0.01


def test_inrz_row_slicing_matches_full_head():
    model = ReadoutINR(INRConfig(encoding=SMALL_HASH, hidden=16, layers=1), out_rows=7)
    full = model.forward_grid((5, 6))
    assert full.shape == (7, 5, 6) and full.dtype == torch.complex64
    for rows in ([4, 1], torch.tensor([6]), slice(2, 5)):
        part = model.forward_grid((5, 6), rows=rows)
        assert torch.allclose(part, full[rows], atol=1e-6)
    coords = coordinate_grid((5, 6))
    assert torch.allclose(model(coords, rows=[3]), full[3].reshape(1, -1), atol=1e-6)


def test_row_slice_gradient_touches_only_its_rows():
    head = ComplexRowHead(hidden=4, rows=5)
    features = torch.randn(10, 4)
    head(features, rows=[1, 3]).abs().sum().backward()
    touched = head.weight.grad.abs().sum(dim=(1, 2)) > 0
    assert touched.tolist() == [False, True, False, True, False]
    assert head.bias.grad[[0, 2, 4]].abs().sum() == 0


def test_bad_coordinates_are_rejected():
    model = INR2D(INRConfig(encoding=SMALL_HASH))
    with pytest.raises(ValueError, match=r"coords must be \(N, 2\)"):
        model(torch.rand(5, 3))
    with pytest.raises(ValueError, match="in_dim 2 or 3"):
        HashGridEncoding(1)


def test_automatic_hash_grid_sizes_follow_the_image():
    """max_res 0 -> twice the larger side; log2_table_size 0 -> 2 table entries per pixel (128 px: 2^15,
    256 px: 2^17); explicit values stay; an unresolved automatic size is refused."""
    auto = INRConfig(encoding=EncodingConfig(kind="hashgrid", log2_table_size=0, max_res=0))
    at_128 = resolve_encoding(auto, (128, 128)).encoding
    assert (at_128.log2_table_size, at_128.max_res) == (15, 256)
    assert resolve_encoding(auto, (256, 256)).encoding.log2_table_size == 17
    assert resolve_encoding(auto, (100, 60)).encoding.log2_table_size == 14  # 2 x 6000 -> 2^14
    fixed = INRConfig(encoding=EncodingConfig(kind="hashgrid", log2_table_size=12, max_res=64))
    assert resolve_encoding(fixed, (256, 256)) == fixed
    with pytest.raises(ValueError, match="log2_table_size 0"):
        build_encoding(EncodingConfig(kind="hashgrid", log2_table_size=0, max_res=64), 2)
    model = INR2D(resolve_encoding(auto, (256, 256)))
    assert model.encoding.table_size == 2 ** 17
