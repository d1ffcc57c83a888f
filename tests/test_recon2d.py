"""engine.recon.fit2d: the loop lowers DC, prior modes count U-Net calls, guards and early stop work."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import build_config
from engine.losses.prior_term import PriorTerm, PriorTermConfig
from engine.physics import sense_operator
from engine.recon.fit2d import (
    OptimConfig,
    Recon2DConfig,
    learning_rate_factor,
    reconstruct_2d,
)

N = 16


@pytest.fixture(scope="module")
def case():
    """A smooth complex 16 x 16 object, 3 smooth coils, ~45 % random sampling plus the centre."""
    y, x = np.meshgrid(np.linspace(-1, 1, N), np.linspace(-1, 1, N), indexing="ij")
    image = (np.exp(-(x ** 2 + y ** 2) * 2) * (1 + 0.5 * (x > 0.2)) * np.exp(1j * 0.5 * x)).astype(np.complex64)
    maps = np.stack([np.exp(-((x - cx) ** 2 + (y - cy) ** 2)) * np.exp(1j * (cx * y))
                     for cx, cy in [(-1, 0), (1, 0), (0, 1)]]).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    rng = np.random.default_rng(0)
    mask = (rng.random((N, N)) < 0.45).astype(np.float32)
    mask[N // 2 - 2:N // 2 + 2, N // 2 - 2:N // 2 + 2] = 1
    kspace = sense_operator(torch.from_numpy(maps), torch.from_numpy(mask))(torch.from_numpy(image)).numpy()
    return kspace, maps, mask, image


def small_config(**sections) -> Recon2DConfig:
    data = {
        "model": {"encoding": {"kind": "hashgrid", "levels": 4, "log2_table_size": 10, "min_res": 4, "max_res": 32},
                  "hidden": 16, "layers": 2},
        "optim": {"steps": 60, "lr": 1e-2},
        "progress": False,
        "log_every": 5,
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config(Recon2DConfig, data)


class TinyDenoiser(torch.nn.Module):
    """D(x; sigma) = x / (1 + sigma^2): Tweedie's estimate for a unit Gaussian prior; counts calls."""

    def __init__(self, nan_every: int = 0):
        super().__init__()
        self.calls = 0
        self.images = 0
        self.nan_every = nan_every

    def forward(self, x, sigma):
        self.calls += 1
        self.images += x.shape[0]
        out = x / (1 + torch.as_tensor(sigma).view(-1, 1, 1, 1) ** 2)
        if self.nan_every and self.calls % self.nan_every == 0:
            out = out * float("nan")
        return out


def test_loop_lowers_dc_and_returns_image(case):
    kspace, maps, mask, truth = case
    image, info = reconstruct_2d(kspace, maps, mask, small_config(), reference=truth)
    assert image.shape == (N, N) and image.dtype == np.complex64
    dc = [entry["dc"] for entry in info["history"]]
    assert dc[-1] < 0.05 * dc[0]
    assert info["steps"] == 60 and info["prior_evals"] == 0 and info["stopped"] == "steps"
    assert info["history"][-1]["nrmse_percent"] < info["history"][0]["nrmse_percent"]


def test_runs_are_seeded(case):
    kspace, maps, mask, _ = case
    cfg = small_config(optim={"steps": 10})
    a, _ = reconstruct_2d(kspace, maps, mask, cfg)
    b, _ = reconstruct_2d(kspace, maps, mask, cfg)
    assert np.array_equal(a, b)


def test_tv_and_wavelet_weights_act_on_the_image(case):
    """Each regulariser is logged and lowers its own measure of the result against the unregularised
    fit of the same seed (a weight that did nothing, or acted on something else, fails)."""
    from engine.losses import total_variation, wavelet_l1

    kspace, maps, mask, _ = case
    steps = {"steps": 30}
    plain, _ = reconstruct_2d(kspace, maps, mask, small_config(optim=steps))
    # weights where each term is felt but the image keeps > 85 % of its norm (measured 0.88 / 0.98)
    with_tv, tv_info = reconstruct_2d(kspace, maps, mask, small_config(optim=steps, regularisers={"tv_weight": 0.3}))
    with_wavelet, wavelet_info = reconstruct_2d(
        kspace, maps, mask, small_config(optim=steps, regularisers={"wavelet_weight": 1e-4, "wavelet_levels": 1}))
    assert "tv" in tv_info["history"][0] and "wavelet" in wavelet_info["history"][0]

    def tv(image):
        return float(total_variation(torch.from_numpy(image)))

    def wavelet(image):
        return float(wavelet_l1(torch.from_numpy(image), levels=1, include_approximation=False))

    assert tv(with_tv) < 0.75 * tv(plain)  # measured 0.58
    assert wavelet(with_wavelet) < 0.9 * wavelet(plain)  # measured 0.76
    for image in (with_tv, with_wavelet):  # a regulariser that wiped the image would pass the above
        assert np.linalg.norm(image) > 0.85 * np.linalg.norm(plain)


@pytest.mark.parametrize("mode, every, batch, ode_steps, expected_calls", [
    ("tweedie", 3, 2, 10, 4),    # steps 0, 3, 6, 9: one batched call each
    ("reference", 1, 1, 2, 20),  # 10 steps x 2 Euler steps
])
def test_prior_modes_count_unet_evaluations(case, mode, every, batch, ode_steps, expected_calls):
    kspace, maps, mask, _ = case
    cfg = small_config(optim={"steps": 10}, prior={"mode": mode, "every": every, "batch": batch,
                                                   "ode_steps": ode_steps, "distance": "l2",
                                                   "noise": "loguniform"})
    denoiser = TinyDenoiser()
    _, info = reconstruct_2d(kspace, maps, mask, cfg, prior=denoiser)
    assert denoiser.calls == expected_calls
    assert info["prior_evals"] == denoiser.images
    assert "prior" in info["history"][0]


def test_reused_target_keeps_the_term_between_evaluations(case):
    kspace, maps, mask, _ = case
    cfg = small_config(optim={"steps": 6, "lr": 1e-3}, log_every=1,
                       prior={"mode": "tweedie", "every": 3, "reuse_target": True, "distance": "l2"})
    denoiser = TinyDenoiser()
    _, info = reconstruct_2d(kspace, maps, mask, cfg, prior=denoiser)
    assert denoiser.calls == 2 and all("prior" in entry for entry in info["history"])


def test_nan_guard_skips_bad_steps_and_stops_after_repeats(case):
    kspace, maps, mask, _ = case
    cfg = small_config(optim={"steps": 12}, max_bad_steps=3,
                       prior={"mode": "tweedie", "distance": "l2", "noise": "loguniform"})
    _, info = reconstruct_2d(kspace, maps, mask, cfg, prior=TinyDenoiser(nan_every=3))  # every 3rd step NaN
    assert info["stopped"] == "steps" and info["skipped_steps"] == 4 and info["steps"] == 12
    with pytest.warns(UserWarning, match="non-finite"):
        image, info = reconstruct_2d(kspace, maps, mask, cfg, prior=TinyDenoiser(nan_every=1))
    assert info["stopped"] == "non_finite" and info["skipped_steps"] == 3
    assert np.isfinite(image).all()  # the untouched INR is returned, not NaNs


def test_early_stop(case):
    kspace, maps, mask, _ = case
    cfg = small_config(optim={"steps": 200},
                       early_stop={"enabled": True, "check_every": 5, "tolerance": 10.0, "patience": 2,
                                   "min_steps": 20})
    _, info = reconstruct_2d(kspace, maps, mask, cfg)
    assert info["stopped"] == "early_stop" and info["steps"] == 20
    strict = small_config(optim={"steps": 30}, early_stop={"enabled": True, "check_every": 5, "tolerance": 0.0})
    _, info = reconstruct_2d(kspace, maps, mask, strict)
    assert info["stopped"] == "steps" and info["steps"] == 30


def test_early_stopper_uses_window_means():
    from engine.recon.fit2d import EarlyStopConfig, EarlyStopper

    stopper = EarlyStopper(EarlyStopConfig(enabled=True, check_every=2, tolerance=0.1, patience=2, min_steps=0))
    # windows: [10, 8] -> 9, [5, 5] -> 5 (change 0.8), [5, 5] -> 5 (0), [4.8, 5.2] -> 5 (0): stop at the 4th check
    losses = [10, 8, 5, 5, 5, 5, 4.8, 5.2]
    stops = [stopper.update(step, loss) for step, loss in enumerate(losses)]
    assert stops == [False] * 7 + [True]


def test_bf16_autocast_with_the_prior_follows_float32(case):
    """bf16 autocast of the INR and the U-Net, prior on: the same fit as float32 within bf16 rounding
    (measured after 20 steps: 0.3 % of the image norm, NRMSE 42.88 vs 42.88 %)."""
    from tiny3d import tiny_prior

    kspace, maps, mask, truth = case
    results = {}
    for bf16 in (False, True):
        cfg = small_config(optim={"steps": 20}, bf16=bf16,
                           prior={"mode": "tweedie", "every": 2, "distance": "l2", "noise": "loguniform"})
        results[bf16] = reconstruct_2d(kspace, maps, mask, cfg, reference=truth, prior=tiny_prior())
    (full, full_info), (half, half_info) = results[False], results[True]
    assert half.dtype == np.complex64 and half_info["prior_evals"] == full_info["prior_evals"] == 10
    assert 0 < np.linalg.norm(half - full) / np.linalg.norm(full) < 0.02
    assert abs(half_info["history"][-1]["nrmse_percent"] - full_info["history"][-1]["nrmse_percent"]) < 0.5


def test_bad_inputs(case):
    kspace, maps, mask, _ = case
    with pytest.raises(ValueError, match=r"kspace \(C, ny, nx\)"):
        reconstruct_2d(kspace, maps, mask[:8], small_config())
    with pytest.raises(TypeError, match="kspace must be complex"):
        reconstruct_2d(np.abs(kspace), maps, mask, small_config())
    bad = kspace.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="kspace contains NaN"):
        reconstruct_2d(bad, maps, mask, small_config())


def test_learning_rate_schedules():
    cfg = OptimConfig(steps=11, schedule="cosine", lr_final_fraction=0.1, warmup_steps=0)
    assert learning_rate_factor(0, cfg) == pytest.approx(1.0)
    assert learning_rate_factor(10, cfg) == pytest.approx(0.1)
    assert learning_rate_factor(5, cfg) == pytest.approx(0.55)
    warm = OptimConfig(steps=10, warmup_steps=4, schedule="constant")
    assert [learning_rate_factor(s, warm) for s in (0, 3, 4)] == [0.25, 1.0, 1.0]


def test_noise_level_schedules():
    generator = torch.Generator().manual_seed(0)
    ref = PriorTerm(PriorTermConfig(mode="tweedie", distance="l2", noise="reference", t_min_start=1.0,
                                    t_min_end=0.0), TinyDenoiser(), 101, generator)
    assert torch.all(ref.noise_levels(1000, 0, torch.device("cpu")) == 1.0)  # t_min = 1 at the start
    late = ref.noise_levels(1000, 50, torch.device("cpu"))
    assert late.min() >= 0.5 and late.max() <= 1.0 and (late == 0.5).float().mean() > 0.4
    logu = PriorTerm(PriorTermConfig(mode="tweedie", distance="l2", noise="loguniform", t_low=0.05,
                                     t_high_start=0.5, t_high_end=0.1), TinyDenoiser(), 11, generator)
    last = logu.noise_levels(1000, 10, torch.device("cpu"))
    assert last.min() >= 0.05 and last.max() <= 0.1 + 1e-6
    assert logu.weight(0) == pytest.approx(1 / 500) and logu.weight(10) == pytest.approx(0.0)


def test_job_writes_the_run_folder(tmp_path, case):
    """recon2d_job on a small fully sampled .npy: retrospective mask, scores, config saved, refusal."""
    import json

    from engine.config import load_config
    from engine.recon.job2d import recon2d_job

    y, x = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
    image = (np.exp(-(x ** 2 + y ** 2) * 3) * (1 + 0.3 * (x > 0))).astype(np.complex64)
    maps = np.stack([np.exp(-((x - cx) ** 2 + (y - cy) ** 2)) for cx, cy in [(-1, 0), (1, 0), (0, 1), (0, -1)]])
    coil_images = (maps * image).astype(np.complex64)
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil_images, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    source = tmp_path / "case.npy"
    np.save(source, kspace.astype(np.complex64))
    config = small_config(optim={"steps": 3})
    out = tmp_path / "run"
    metrics = recon2d_job(config, str(out), str(source), acceleration=3.0, seed=0, calib_width=12,
                          compare=("zero_filled", "inr"))
    assert set(metrics) == {"zero_filled", "inr", "infusion"}
    for method in metrics.values():
        assert {"nrmse_percent", "psnr_db", "ssim", "seconds", "prior_evals"} <= set(method)
    written = json.loads((out / "metrics.json").read_text())
    assert written["metadata"]["fully_sampled_input"] is True
    assert (out / "comparison.png").is_file() and np.load(out / "recon_infusion.npy").shape == (32, 32)
    from engine.recon.fit2d import Recon2DConfig

    assert load_config(Recon2DConfig, out / "config.yaml") == config
    with pytest.raises(FileExistsError, match="not empty"):
        recon2d_job(config, str(out), str(source))


def test_launcher_rejects_a_bad_override(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "launch" / "recon2d.py"
    spec = importlib.util.spec_from_file_location("launch_recon2d", path)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    assert launcher.main(["--out", str(tmp_path / "x"), "--set", "optim.stepz=3"]) == 2
    assert "'optim.stepz'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_resample_kspace_and_prior_upsampling():
    from engine.losses.prior_term import resample_kspace

    x = torch.randn(2, 8, 10, dtype=torch.complex64)
    up = resample_kspace(x, (16, 20))
    assert up.shape == (2, 16, 20)
    assert torch.allclose(resample_kspace(up, (8, 10)), x, atol=1e-5)
    assert torch.isclose(up.abs().square().mean(), x.abs().square().mean(), rtol=1e-4)

    seen = []

    class Recorder(TinyDenoiser):
        def forward(self, x, sigma):
            seen.append(tuple(x.shape))
            return super().forward(x, sigma)

    term = PriorTerm(PriorTermConfig(mode="tweedie", distance="l2", upsample=2), Recorder(), 10,
                     torch.Generator().manual_seed(0))
    loss, evals = term(torch.randn(1, 8, 8, dtype=torch.complex64), step=0)
    assert seen == [(1, 2, 16, 16)] and evals == 1 and loss.ndim == 0
    # anisotropic pixels (3 x 2 mm planes): one factor per axis
    term = PriorTerm(PriorTermConfig(mode="tweedie", distance="l2", upsample=(3, 2)), Recorder(), 10,
                     torch.Generator().manual_seed(0))
    term(torch.randn(1, 8, 8, dtype=torch.complex64), step=0)
    assert seen[-1] == (1, 2, 24, 16)
    with pytest.raises(ValueError, match="upsample must be >= 1"):
        PriorTermConfig(mode="tweedie", upsample=(2, 0))


def test_average_last_returns_the_mean_of_the_last_images(case):
    kspace, maps, mask, _ = case
    cfg = small_config(optim={"steps": 8})
    final, _ = reconstruct_2d(kspace, maps, mask, cfg)
    averaged, _ = reconstruct_2d(kspace, maps, mask, small_config(optim={"steps": 8}, average_last=3))
    assert not np.allclose(final, averaged)  # jitter removed: differs from the last iterate
    assert np.linalg.norm(averaged - final) < 0.5 * np.linalg.norm(final)


def test_unmeasured_only_restricts_the_prior_to_unsampled_frequencies():
    planes = torch.randn(1, 8, 8, dtype=torch.complex64)
    config = PriorTermConfig(mode="tweedie", distance="l2", unmeasured_only=True, weight_scale=1.0,
                             weight_start=1.0, weight_end=1.0)
    nothing = PriorTerm(config, TinyDenoiser(), 4, torch.Generator().manual_seed(0), mask=torch.zeros(8, 8))
    plain = PriorTerm(PriorTermConfig(mode="tweedie", distance="l2", weight_scale=1.0, weight_start=1.0,
                                      weight_end=1.0), TinyDenoiser(), 4, torch.Generator().manual_seed(0))
    assert torch.isclose(nothing(planes, 0)[0], plain(planes, 0)[0], rtol=1e-4)  # Parseval
    everything = PriorTerm(config, TinyDenoiser(), 4, torch.Generator().manual_seed(0), mask=torch.ones(8, 8))
    assert everything(planes, 0)[0] == 0
    with pytest.raises(ValueError, match="needs the sampling mask"):
        PriorTerm(config, TinyDenoiser(), 4, torch.Generator())


def test_min_k_radius_leaves_the_low_frequencies_out_of_the_prior():
    from engine.physics.fft import kspace_radius

    planes = torch.randn(2, 8, 10, dtype=torch.complex64)
    mask = (torch.rand(8, 10, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    low = (kspace_radius((8, 10)) < 0.5).float()
    assert 0 < low.sum() < low.numel() and bool(((low > 0) & (mask == 0)).any())

    def loss(term_mask, **extra):  # each term draws the same noise (same seed)
        config = PriorTermConfig(mode="tweedie", distance="l2", unmeasured_only=True, weight_scale=1.0,
                                 weight_start=1.0, weight_end=1.0, **extra)
        return PriorTerm(config, TinyDenoiser(), 4, torch.Generator().manual_seed(0), mask=term_mask)(planes, 0)[0]

    narrowed = loss(mask, min_k_radius=0.5)
    # the same as declaring the low frequencies measured, and less than comparing them too
    assert torch.isclose(narrowed, loss(torch.maximum(mask, low)), rtol=1e-5)
    assert narrowed < loss(mask)
    with pytest.raises(ValueError, match="min_k_radius needs unmeasured_only"):
        PriorTermConfig(mode="tweedie", distance="l2", min_k_radius=0.5)
    with pytest.raises(ValueError, match="min_k_radius must be in"):
        PriorTermConfig(mode="tweedie", distance="l2", unmeasured_only=True, min_k_radius=-0.1)
