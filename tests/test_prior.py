"""Tests of engine/prior: EDM formulas, U-Net shapes, samplers, checkpoint format, shipped prior."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine.prior import (
    EDMPrior,
    UNetConfig,
    channels_to_complex,
    complex_to_channels,
    default_prior_path,
    edm_coefficients,
    edm_loss,
    edm_loss_weight,
    edm_time_steps,
    load_prior,
    normalise,
    ode_to_x0,
    read_arch,
    sample,
    save_prior,
)

TINY = UNetConfig(base_channels=8, channel_mult=(1, 2), attention_levels=(1,), attention_heads=2,
                  groupnorm_groups=4, noise_embedding_channels=16, embedding_mult=2)


def tiny_prior(seed: int = 0, sigma_data: float = 0.5) -> EDMPrior:
    torch.manual_seed(seed)
    model = EDMPrior(TINY, sigma_data=sigma_data)
    # Give the zero-initialised output layers non-zero weights so F is not identically 0.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


class GaussianDenoiser:
    """Exact denoiser of x0 ~ N(0, sd^2 I): D(x; sigma) = x sd^2 / (sd^2 + sigma^2)."""

    def __init__(self, sigma_data: float):
        self.sd2 = sigma_data**2

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x * (self.sd2 / (self.sd2 + sigma.view(-1, 1, 1, 1) ** 2))


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.5, 2.0, 80.0])
@pytest.mark.parametrize("sigma_data", [0.5, 0.35])
def test_preconditioning_matches_edm_table_1(sigma: float, sigma_data: float) -> None:
    c = edm_coefficients(torch.tensor([sigma], dtype=torch.float64), sigma_data)
    s2, d2 = sigma**2, sigma_data**2
    assert c["c_skip"].item() == pytest.approx(d2 / (s2 + d2), rel=1e-12)
    assert c["c_out"].item() == pytest.approx(sigma * sigma_data / math.sqrt(s2 + d2), rel=1e-12)
    assert c["c_in"].item() == pytest.approx(1 / math.sqrt(s2 + d2), rel=1e-12)
    assert c["c_noise"].item() == pytest.approx(math.log(sigma) / 4, rel=1e-12, abs=1e-15)
    # Table 1's weighting makes the effective loss weight lambda * c_out^2 equal to 1.
    lam = edm_loss_weight(torch.tensor([sigma], dtype=torch.float64), sigma_data)
    assert (lam * c["c_out"] ** 2).item() == pytest.approx(1.0, rel=1e-12)


def test_denoiser_is_eq7_composition() -> None:
    model = tiny_prior()
    x = torch.randn(3, 2, 16, 16)
    sigma = torch.tensor([0.05, 0.7, 12.0])
    c = edm_coefficients(sigma, model.sigma_data)
    v = (-1, 1, 1, 1)
    expected = c["c_skip"].view(v) * x + c["c_out"].view(v) * model.unet(c["c_in"].view(v) * x, c["c_noise"])
    torch.testing.assert_close(model(x, sigma), expected)
    # Scalar sigma broadcasts; at huge sigma D ignores x's skip path (c_skip -> 0).
    torch.testing.assert_close(model(x, 0.7)[1], model(x, sigma)[1])


def test_denoiser_rejects_bad_input() -> None:
    model = tiny_prior()
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.zeros(1, 2, 15, 16), 1.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        model(torch.zeros(1, 2, 16, 16), 0.0)
    with pytest.raises(ValueError, match="expected input"):
        model(torch.zeros(1, 3, 16, 16), 1.0)


def test_unet_is_fully_convolutional() -> None:
    model = tiny_prior()
    for shape in [(2, 2, 16, 16), (1, 2, 24, 40)]:
        out = model(torch.randn(shape), 0.3)
        assert out.shape == shape and out.dtype == torch.float32


def test_time_steps_eq5() -> None:
    steps = edm_time_steps(18, 0.002, 80.0, 7.0)
    assert steps.shape == (19,)
    assert steps[0].item() == pytest.approx(80.0, rel=1e-12)
    assert steps[17].item() == pytest.approx(0.002, rel=1e-12)
    assert steps[18].item() == 0.0
    assert torch.all(steps[1:] < steps[:-1])
    i = 5  # Eq. 5 written out for one interior index
    expected = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert steps[i].item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        edm_time_steps(0)


def test_ode_to_x0_solves_gaussian_flow() -> None:
    """For x0 ~ N(0, sd^2) the probability-flow ODE maps x_t to x_t * sd / sqrt(sd^2 + t^2)."""
    sd = 0.5
    denoiser = GaussianDenoiser(sd)
    x_t = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    start = torch.tensor([0.2, 1.0, 5.0])
    exact = x_t * (sd / torch.sqrt(sd**2 + start**2)).view(-1, 1, 1, 1)
    scale = exact.abs().max().item()

    def error(steps: int, heun: bool) -> float:
        return (ode_to_x0(denoiser, x_t, start, steps=steps, heun=heun) - exact).abs().max().item() / scale

    # Euler converges with order 1, Heun (EDM Algorithm 1) with order 2 in the step count.
    assert 1.7 < error(20, False) / error(40, False) < 2.3
    assert 3.4 < error(20, True) / error(40, True) < 5.0
    assert error(40, True) < 5e-3
    assert error(10, True) < error(10, False)
    euler = ode_to_x0(denoiser, x_t, start, steps=10, heun=False)
    # Per-sample start levels: a batch equals its samples run one by one.
    one = ode_to_x0(denoiser, x_t[1:2], 1.0, steps=10)
    torch.testing.assert_close(one, euler[1:2])
    # sigma_start = 0 means already clean: unchanged.
    torch.testing.assert_close(ode_to_x0(denoiser, x_t, 0.0), x_t)


def test_sampler_draws_gaussian_with_right_scale() -> None:
    sd = 0.5
    x = sample(GaussianDenoiser(sd), (4, 2, 32, 32), steps=32, heun=True, seed=3)
    assert x.std().item() == pytest.approx(sd, rel=0.05)


def test_sampler_is_deterministic_with_seed() -> None:
    model = tiny_prior()
    a = sample(model, (2, 2, 16, 16), steps=4, heun=True, seed=7)
    b = sample(model, (2, 2, 16, 16), steps=4, heun=True, seed=7)
    c = sample(model, (2, 2, 16, 16), steps=4, heun=True, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def _smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = []
    for _ in range(n):
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.4]) + torch.tensor([-0.5, -0.5, 0.3]))
        disk = (((y - cy) ** 2 + (x - cx) ** 2) < r**2).float()
        phase = torch.rand((), generator=g) * 6.28 + x * torch.rand((), generator=g)
        imgs.append(torch.stack([disk * torch.cos(phase), disk * torch.sin(phase)]))
    return torch.stack(imgs)


def test_tiny_prior_training_lowers_loss() -> None:
    torch.manual_seed(0)
    model = EDMPrior(TINY, sigma_data=0.4)
    data = _smooth_images(8, 16, seed=0)
    g = torch.Generator().manual_seed(5)
    sigma = torch.exp(torch.randn(64, generator=g) * 1.2 - 1.2)
    noise = torch.randn(64, 2, 16, 16, generator=g)
    batch = data.repeat(8, 1, 1, 1)

    def eval_loss() -> float:
        with torch.no_grad():
            return edm_loss(model, batch, sigma=sigma, noise=noise).item()

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    train_gen = torch.Generator().manual_seed(9)
    for _ in range(40):
        loss = edm_loss(model, data, generator=train_gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_checkpoint_round_trip(tmp_path) -> None:
    model = tiny_prior(seed=3, sigma_data=0.35)
    save_prior(tmp_path / "p32", model, extra={"note": "test"})
    loaded = load_prior(tmp_path / "p32")
    x = torch.randn(2, 2, 16, 16)
    torch.testing.assert_close(loaded(x, 0.4), model(x, 0.4), rtol=0, atol=0)
    info = read_arch(tmp_path / "p32")
    assert info["sigma_data"] == 0.35 and info["note"] == "test"
    assert info["unet"]["channel_mult"] == [1, 2]
    assert info["intensity_normalisation"] == "magnitude_percentile_99_is_1"
    # The weights file holds plain tensors only: loads with weights_only=True.
    state = torch.load(tmp_path / "p32" / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    # float16 storage halves the file; loading casts back to float32.
    save_prior(tmp_path / "p16", model, dtype=torch.float16)
    half = load_prior(tmp_path / "p16")
    assert all(p.dtype == torch.float32 for p in half.parameters())
    torch.testing.assert_close(half(x, 0.4), model(x, 0.4), rtol=1e-2, atol=1e-2)
    size16 = (tmp_path / "p16" / "weights.pt").stat().st_size
    assert size16 < 0.7 * (tmp_path / "p32" / "weights.pt").stat().st_size


def test_checkpoint_errors_are_clear(tmp_path) -> None:
    model = tiny_prior()
    save_prior(tmp_path, model)
    info = json.loads((tmp_path / "arch.json").read_text())
    info["unet"]["base_channels"] = 16
    (tmp_path / "arch.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="does not match"):
        load_prior(tmp_path)
    info["unet"]["bogus"] = 1
    (tmp_path / "arch.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"unknown config key 'unet\.bogus' in .*arch\.json"):
        load_prior(tmp_path)
    with pytest.raises(FileNotFoundError, match="arch.json"):
        load_prior(tmp_path / "missing")


def test_normalise_and_channel_layout() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.complex(torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g)) * 7.0
    scaled, scale = normalise(image)
    assert isinstance(scale, float)
    assert torch.quantile(scaled.abs().flatten(), 0.99).item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(scaled * scale, image)
    arr, s_np = normalise(image.numpy())
    assert isinstance(arr, np.ndarray) and s_np == pytest.approx(scale, rel=1e-5)
    _, scales = normalise(torch.stack([image, 2 * image]))
    torch.testing.assert_close(scales, torch.tensor([scale, 2 * scale]))
    ch = complex_to_channels(image)
    assert ch.shape == (2, 32, 32)
    torch.testing.assert_close(channels_to_complex(ch), image)
    torch.testing.assert_close(channels_to_complex(ch.bfloat16()).real, image.real.bfloat16().float())
    with pytest.raises(ValueError, match="empty"):
        normalise(torch.zeros(8, 8))


def test_shipped_prior_loads_and_denoises() -> None:
    path = default_prior_path()
    assert (path / "weights.pt").is_file(), f"no shipped prior at {path}"
    info = read_arch(path)
    prior = load_prior(path)
    assert info["intensity_normalisation"] == "magnitude_percentile_99_is_1"
    assert sum(p.numel() for p in prior.parameters()) < 3_000_000
    x = _smooth_images(1, 64, seed=1)
    noisy = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        denoised = prior(noisy, 0.2)
    assert denoised.shape == x.shape and torch.isfinite(denoised).all()
    # A trained prior removes noise: closer to the clean image than its noisy input.
    assert (denoised - x).square().mean() < 0.7 * (noisy - x).square().mean()


def test_bf16_autocast_denoiser_stays_float32() -> None:
    model = tiny_prior()
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    reference = model(x, 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, 0.3)
        loss = edm_loss(model, x, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=5e-2, atol=5e-2)
    assert not torch.equal(out, reference)  # the U-Net really ran in bf16


def test_evaluate_compare_side_by_side(tmp_path) -> None:
    """engine.prior.evaluate --compare: every prior sees the same images and noise draws; the
    markdown lists each prior's denoised RMSE per image and sigma and their ratio."""
    nib = pytest.importorskip("nibabel")
    from engine.prior import evaluate

    # attention only at 1/8 resolution: the 256 px Colin27 slice stays cheap
    config = UNetConfig(base_channels=8, channel_mult=(1, 2, 2, 2), attention_levels=(3,), attention_heads=2,
                        groupnorm_groups=4, noise_embedding_channels=16, embedding_mult=2)
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        model = EDMPrior(config, sigma_data=0.5)
        with torch.no_grad():
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.05)
        save_prior(tmp_path / name, model.eval())
    volume = np.zeros((180, 200, 120), np.float32)
    volume[20:160, 20:180, :] = np.linspace(0.2, 1.0, 120)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[2, 3] = -71.0  # Colin27's: world z = 40 mm is k = 111
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "colin.nii.gz"))
    g = np.random.default_rng(0)
    y, x = np.mgrid[-1:1:32j, -1:1:32j]
    image = (np.hypot(x, y) < 0.7) * (1 + 0.3 * x)
    coils = np.stack([np.exp(-((x - cx) ** 2 + (y - cy) ** 2)) for cx, cy in ((1, 0), (-1, 0), (0, 1), (0, -1))])
    from engine.physics.fft import fftc

    kspace = fftc(torch.from_numpy((coils * image).astype(np.complex64)), dims=(-2, -1)).numpy()
    kspace += 1e-3 * (g.standard_normal(kspace.shape) + 1j * g.standard_normal(kspace.shape))
    np.save(tmp_path / "real_kspace_c4.npy", kspace.astype(np.complex64))
    out, md = tmp_path / "cmp.json", tmp_path / "cmp.md"
    argv = ["--colin27", str(tmp_path / "colin.nii.gz"), "--real", str(tmp_path / "real_kspace_c4.npy"),
            "--sigmas", "0.02", "0.2", "--seeds", "2", "--compare", f"old={tmp_path / 'a'}",
            f"new={tmp_path / 'b'}", f"same={tmp_path / 'a'}", "--out", str(out), "--markdown", str(md)]
    assert evaluate.main(argv) == 0
    result = json.loads(out.read_text())
    old, new, same = (result["priors"][k] for k in ("old", "new", "same"))
    for key in ("real_slices_espirit", "real_slices_rss"):
        rows_old, rows_new, rows_same = (p[key]["real_kspace_c4.npy"] for p in (old, new, same))
        assert [r["sigma"] for r in rows_old] == [0.02, 0.2]
        assert [r["rmse_noisy"] for r in rows_old] == [r["rmse_noisy"] for r in rows_new]  # same noise
        assert rows_old == rows_same  # the same folder gives the same numbers
        assert rows_old[1]["rmse_noisy"] == pytest.approx(0.2, rel=0.05)
        assert rows_old[0]["rmse_denoised"] != rows_new[0]["rmse_denoised"]
    text = md.read_text()
    assert "| real | 0.02 |" in text and "same / old" in text and "| 1.000 |" in text
    assert old["weights_sha256"] == same["weights_sha256"] != new["weights_sha256"]


def test_shipped_prior_never_trained_near_the_evaluation_slices() -> None:
    """SPLIT.md's rule, read from the shipped arch.json: the evaluation slices (Colin27 z = 40 mm of
    the denoising check, z = 45 mm of the bundled example, MNI152 z = 38 mm of benchmarks/quality2d.py)
    are at least 10 mm away from every training part of the same file."""
    from engine.prior.data import VolumeSource, trained_near

    sources = [VolumeSource("x/mni.nii.gz", world_z_max_mm=15.0), {"path": "colin.nii.gz", "world_z_min_mm": 60.0}]
    assert trained_near(sources, "mni.nii.gz", 20.0) and not trained_near(sources, "mni.nii.gz", 25.0)
    assert trained_near(sources, "colin.nii.gz", 55.0) and not trained_near(sources, "colin.nii.gz", 45.0)
    assert trained_near([{"path": "/a/whole.npy"}], "whole.npy", 1e3) and not trained_near(sources, "other", 0.0)
    volumes = read_arch(default_prior_path())["training"]["volumes"]
    assert volumes, "the shipped arch.json lists no training volumes"
    for name, z in (("colin27_t1_1mm.nii.gz", 40.0), ("colin27_t1_1mm.nii.gz", 45.0),
                    ("colin27_t1_0p5mm.nii.gz", 40.0), ("mni152_2009a_t1_1mm.nii.gz", 38.0)):
        assert not trained_near(volumes, name, z), (name, z)


def test_every_training_source_of_the_shipped_prior_has_its_notice_beside_the_weights() -> None:
    folder = default_prior_path()
    names = {v["path"].rsplit("/", 1)[-1] for v in read_arch(folder)["training"]["volumes"]}
    notices = {"colin27": "colin27_COPYRIGHT.txt", "mni152": "mni152_COPYRIGHT.txt"}
    for name in names:
        source = next((k for k in notices if name.startswith(k)), None)
        assert source is not None, f"{name}: no licence notice is known for this training source"
        assert (folder / notices[source]).is_file(), notices[source]
        assert name in (folder / "SPLIT.md").read_text(), f"SPLIT.md does not name {name}"
