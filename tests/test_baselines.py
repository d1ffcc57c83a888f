"""Classical baselines on tiny simulated cases, the report files, and the baseline CLI."""
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.evaluation import baselines
from engine.evaluation.metrics import nrmse_percent
from engine.evaluation.report import comparison_png, write_metrics_json
from engine.physics.coils import birdcage_maps
from engine.physics.fft import fftc
from engine.physics.masks import poisson_disc_mask

REPO = Path(__file__).resolve().parents[1]


def shepp_logan(size: int) -> np.ndarray:
    import sigpy

    return np.abs(sigpy.shepp_logan((size, size))).astype(np.float32)


def simulated_case(size: int = 32, coils: int = 4, normalise_maps: bool = True, noise: float = 0.0, seed: int = 0):
    """Shepp-Logan with a smooth phase ramp, birdcage maps, k-space (coils, size, size) complex64.

    Normalised maps have sum_c |S_c|^2 = 1; otherwise that sum ramps from 0.25 to 2.25 across x.
    """
    yy, xx = np.mgrid[:size, :size] / size
    image = (shepp_logan(size) * np.exp(1j * (xx - yy))).astype(np.complex64)
    maps = birdcage_maps(coils, (size, size)).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    if not normalise_maps:
        maps *= (0.5 + xx).astype(np.float32)
    kspace = fftc(torch.from_numpy(maps * image)).numpy()
    rng = np.random.default_rng(seed)
    kspace += (noise * (rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape))).astype(np.complex64)
    return kspace, maps, image


def test_zero_filled_full_sampling_is_the_image():
    kspace, maps, image = simulated_case()
    np.testing.assert_allclose(baselines.zero_filled(kspace, maps), image, atol=1e-5)
    # normalised maps: RSS of the coil images is |image|
    np.testing.assert_allclose(baselines.zero_filled_rss(kspace).real, np.abs(image), atol=1e-5)
    assert baselines.zero_filled(kspace, maps).dtype == np.complex64


def test_cg_sense_exact_solution_on_full_sampling():
    # unnormalised maps: A^H A = diag(sum |S_c|^2), so CG must really iterate to reach x = image
    kspace, maps, image = simulated_case(normalise_maps=False)
    mask = np.ones(image.shape, np.float32)
    x, residuals = baselines.cg_sense(kspace, maps, mask, max_iter=200, tol=1e-6, return_residuals=True)
    assert x.dtype == np.complex64 and x.shape == image.shape
    assert residuals[-1] <= 1e-6 < residuals[1]
    np.testing.assert_allclose(x, image, atol=1e-4 * np.abs(image).max())


def test_cg_sense_tikhonov_closed_form():
    # normalised maps, full sampling: (A^H A + lamda I) x = A^H y has x = image / (1 + lamda)
    kspace, maps, image = simulated_case()
    x = baselines.cg_sense(kspace, maps, np.ones(image.shape, np.float32), lamda=0.5, max_iter=5)
    np.testing.assert_allclose(x, image / 1.5, atol=1e-5)


def test_cg_sense_residual_falls_when_undersampled():
    kspace, maps, image = simulated_case()
    mask = poisson_disc_mask(image.shape, 2.0, calib=(8, 8), seed=0)
    x, residuals = baselines.cg_sense(kspace * mask, maps, mask, max_iter=40, tol=0, return_residuals=True)
    assert len(residuals) == 41
    assert residuals[-1] < 1e-3 and residuals[-1] < 0.2 * residuals[5] < residuals[0]
    # the data misfit ||M F S x - y|| falls far below that of the zero-filled image
    def misfit(candidate):
        return np.linalg.norm(fftc(torch.from_numpy(maps * candidate)).numpy() * mask - kspace * mask)
    assert misfit(x) < 0.05 * misfit(baselines.zero_filled(kspace * mask, maps))


def test_l1_wavelet_beats_zero_filled():
    kspace, maps, image = simulated_case(size=64, noise=1e-3)
    mask = poisson_disc_mask(image.shape, 3.0, calib=(0, 0), seed=1)
    measured = kspace * mask
    support = np.abs(image) > 0
    zf_error = nrmse_percent(baselines.zero_filled(measured, maps), image, support)
    l1 = baselines.l1_wavelet(measured, maps, mask, max_iter=50)
    assert l1.dtype == np.complex64 and l1.shape == image.shape
    l1_error = nrmse_percent(l1, image, support)
    assert l1_error < 0.5 * zf_error, (l1_error, zf_error)


def test_lamda_rule_is_deterministic_and_scale_invariant():
    kspace, maps, image = simulated_case()
    mask = poisson_disc_mask(image.shape, 2.0, seed=2)
    first = baselines.l1_wavelet_lamda(kspace, maps, mask)
    assert first == baselines.l1_wavelet_lamda(kspace, maps, mask)
    assert baselines.l1_wavelet_lamda(1000 * kspace, maps, mask) == pytest.approx(1000 * first, rel=1e-5)
    small = baselines.l1_wavelet(kspace * mask, maps, mask, max_iter=20)
    large = baselines.l1_wavelet(1000 * kspace * mask, maps, mask, max_iter=20)
    np.testing.assert_allclose(large / 1000, small, atol=1e-4 * np.abs(small).max())


def test_best_lambda_picks_the_grid_minimum():
    kspace, maps, image = simulated_case(noise=1e-3)
    mask = poisson_disc_mask(image.shape, 2.0, seed=3)
    grid = (1e-5, 1e-3, 1e-1)
    search = baselines.best_lambda_l1_wavelet(kspace * mask, maps, mask, image, grid=grid, refine=True,
                                              max_extensions=0, max_iter=20)
    # the grid plus one or two geometric midpoints next to the best grid value
    tried = set(search.nrmse_by_factor)
    assert set(grid) < tried and len(tried) in (4, 5)
    best_on_grid = min(grid, key=search.nrmse_by_factor.get)
    for midpoint in tried - set(grid):  # half-way (in log) between the best and a neighbour
        assert abs(np.log10(midpoint) - np.log10(best_on_grid)) == pytest.approx(1.0)
    assert search.factor == min(tried, key=search.nrmse_by_factor.get)
    assert nrmse_percent(search.image, image) == pytest.approx(search.nrmse_by_factor[search.factor])
    scale = baselines.l1_wavelet_lamda(kspace * mask, maps, mask, factor=1.0)
    assert search.lamda == pytest.approx(search.factor * scale)


def test_fully_sampled_centre():
    mask = np.zeros((40, 50), np.float32)
    mask[20 - 6 : 20 + 6, 25 - 6 : 25 + 6] = 1  # a 12 x 12 box around DC (20, 25)
    assert baselines.fully_sampled_centre(mask) == 12
    mask[20, 25] = 0
    assert baselines.fully_sampled_centre(mask) == 0


def test_best_lambda_extends_a_grid_whose_end_is_best():
    kspace, maps, image = simulated_case(noise=1e-3)
    mask = poisson_disc_mask(image.shape, 2.0, seed=3)
    # far too strong lambdas: the smallest must win, so the grid grows downwards by its step
    grid = (1.0, 10.0)
    search = baselines.best_lambda_l1_wavelet(kspace * mask, maps, mask, image, grid=grid, refine=False,
                                              max_extensions=2, max_iter=10)
    assert sorted(search.nrmse_by_factor) == pytest.approx([0.01, 0.1, 1.0, 10.0])
    assert search.factor == pytest.approx(0.01)


def test_run_baselines_methods_and_errors():
    kspace, maps, image = simulated_case()
    mask = poisson_disc_mask(image.shape, 2.0, seed=4)
    results = baselines.run_baselines(kspace, maps, mask, ("zero_filled", "cg_sense"))
    assert set(results) == {"zero_filled", "cg_sense"}
    assert all(r["image"].shape == image.shape and r["seconds"] >= 0 for r in results.values())
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.run_baselines(kspace, maps, mask, ("magic",))
    with pytest.raises(ValueError, match="reference"):
        baselines.run_baselines(kspace, maps, mask, ("l1_wavelet_best",))


def test_bad_shapes_raise():
    kspace, maps, _image = simulated_case()
    with pytest.raises(ValueError, match="coil maps shape"):
        baselines.zero_filled(kspace, maps[:2])
    with pytest.raises(ValueError, match="mask shape"):
        baselines.cg_sense(kspace, maps, np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="complex"):
        baselines.zero_filled_rss(np.abs(kspace))


def test_report_files_and_refusal(tmp_path):
    path = write_metrics_json(tmp_path / "m.json", {"a": {"psnr_db": np.float64(np.inf), "ssim": np.float32(0.5)}},
                              metadata={"R": 4})
    document = json.loads(path.read_text())
    assert document == {"metadata": {"R": 4}, "methods": {"a": {"psnr_db": "inf", "ssim": 0.5}}}
    with pytest.raises(FileExistsError):
        write_metrics_json(path, {})
    write_metrics_json(path, {"b": {}}, overwrite=True)
    assert "b" in json.loads(path.read_text())["methods"]

    _, _maps, image = simulated_case()
    png = comparison_png(tmp_path / "c.png", {"x": image * 0.9, "y": image}, reference=image,
                         support=np.abs(image) > 0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError):
        comparison_png(png, {"x": image})
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_cli_on_a_fully_sampled_npy(tmp_path):
    kspace, _, _ = simulated_case(size=48, noise=1e-3)
    source = tmp_path / "case.npy"
    np.save(source, kspace)
    out = tmp_path / "run"
    main = runpy.run_path(str(REPO / "launch" / "baseline.py"))["main"]
    arguments = [str(source), "--out", str(out), "--accel", "2", "--calib-width", "16",
                 "--methods", "zero_filled", "cg_sense"]
    assert main(arguments) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metadata"]["fully_sampled_input"] is True
    entries = metrics["methods"]
    assert set(entries) == {"zero_filled", "cg_sense"}
    assert entries["cg_sense"]["nrmse_percent"] < entries["zero_filled"]["nrmse_percent"]
    for name in ("comparison.png", "recon_cg_sense.npy", "mask.npy", "reference.npy", "support.npy"):
        assert (out / name).exists(), name
    assert main(arguments) == 2  # an existing --out is refused with one line, exit 2
    assert main(arguments + ["--overwrite"]) == 0


def test_cli_on_an_undersampled_npy_gives_images_without_scores(tmp_path):
    kspace, _, _ = simulated_case(size=48, noise=1e-3)
    mask = poisson_disc_mask((48, 48), 2.0, calib=(20, 20), seed=5)
    source = tmp_path / "undersampled.npy"
    np.save(source, kspace * mask)
    out = tmp_path / "run"
    main = runpy.run_path(str(REPO / "launch" / "baseline.py"))["main"]
    assert main([str(source), "--out", str(out), "--calib-width", "16", "--methods", "zero_filled", "cg_sense"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metadata"]["fully_sampled_input"] is False
    assert metrics["metadata"]["mask"]["achieved_acceleration"] == pytest.approx(48 * 48 / mask.sum())
    assert "nrmse_percent" not in metrics["methods"]["cg_sense"]
    np.testing.assert_array_equal(np.load(out / "mask.npy"), mask)
    assert not (out / "reference.npy").exists()


def _hybrid_case(nx: int = 8, size: int = 16, coils: int = 4):
    """A smooth complex volume (nx, size, size), birdcage maps per plane, hybrid k-space, Poisson-like mask."""
    rng = np.random.default_rng(1)
    x = np.linspace(-1, 1, nx)[:, None, None]
    image = np.stack([shepp_logan(size)] * nx) * (1 - 0.5 * x**2) * np.exp(1j * x)
    maps2d = birdcage_maps(coils, (size, size)).astype(np.complex64)
    maps2d /= np.sqrt((np.abs(maps2d) ** 2).sum(0, keepdims=True))
    maps = np.broadcast_to(maps2d, (nx, coils, size, size)).astype(np.complex64)
    kspace = fftc(torch.from_numpy(maps * image[:, None].astype(np.complex64))).numpy()
    mask = (rng.random((size, size)) < 0.4).astype(np.float32)
    mask[size // 2 - 2:size // 2 + 2, size // 2 - 2:size // 2 + 2] = 1
    return kspace * mask, maps, mask, image.astype(np.complex64)


def test_l1_wavelet_3d_beats_zero_filled_and_scales_with_the_data():
    kspace, maps, mask, image = _hybrid_case()
    zero = baselines.zero_filled_3d(kspace, maps, mask)
    l1 = baselines.l1_wavelet_3d(kspace, maps, mask, max_iter=30)
    assert nrmse_percent(l1, image) < 0.8 * nrmse_percent(zero, image)
    # the rule's lambda follows the data's intensity: 1000 x the data gives 1000 x the volume
    big = baselines.l1_wavelet_3d(1000 * kspace, maps, mask, max_iter=30)
    np.testing.assert_allclose(big, 1000 * l1, rtol=1e-3, atol=1e-3 * np.abs(big).max())


def test_l1_wavelet_3d_slab_with_halo_is_the_whole_volume_inside():
    kspace, maps, mask, _ = _hybrid_case(nx=12)
    scale = baselines.intensity_scale_3d(baselines.zero_filled_3d(kspace, maps, mask))
    whole = baselines.l1_wavelet_3d(kspace, maps, mask, scale=scale, max_iter=20)
    part = baselines.l1_wavelet_3d_slabs(lambda a, b: (kspace[a:b], maps[a:b]), mask, 0, 12, 12, scale,
                                         max_iter=20)
    np.testing.assert_array_equal(part, whole)  # the halo is clipped at the volume's ends
    slab = baselines.l1_wavelet_3d_slabs(lambda a, b: (kspace[a:b], maps[a:b]), mask, 4, 8, 12, scale,
                                         halo=4, max_iter=20)
    assert slab.shape == (4, 16, 16)
    assert nrmse_percent(slab, whole[4:8]) < 5.0  # overlapping slabs: close to the whole solve


def test_l1_wavelet_3d_in_chunks_of_planes_is_the_whole_solve(monkeypatch):
    """The SENSE operators applied a few readout planes at a time (to bound memory) change nothing."""
    kspace, maps, mask, image = _hybrid_case(nx=12)
    anchor = image + 0.05
    whole = baselines.l1_wavelet_3d(kspace, maps, mask, max_iter=10, anchor=anchor, anchor_weight=0.1)
    plane_bytes = kspace[0].nbytes
    for planes in (1, 5):  # 5: a shorter last chunk
        monkeypatch.setattr(baselines, "L1_3D_CHUNK_BYTES", planes * plane_bytes)
        chunked = baselines.l1_wavelet_3d(kspace, maps, mask, max_iter=10, anchor=anchor, anchor_weight=0.1)
        np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-6 * np.abs(whole).max())


def test_volume_montage_draws_planes_at_the_true_voxel_shape(tmp_path):
    from engine.evaluation.report import volume_montage_figure, volume_montage_png

    nx, ny, nz = 6, 5, 4
    volume = np.random.default_rng(0).random((nx, ny, nz))
    planes = (volume[nx // 2], volume[:, ny // 2, :], volume[:, :, nz // 2])
    figure = volume_montage_figure({"INFusion": planes, "reference": planes}, (3.0, 3.0, 2.0), nrmse={"INFusion": 5.0})
    extents = [tuple(axis.get_images()[0].get_extent()) for axis in figure.axes[:3]]
    # (left, right, bottom, top) in mm; yz and xz drawn with z upwards: yz 5 x 3 mm wide by 4 x 2 mm
    # high, xz 6 x 3 by 4 x 2, xy (rows x) 5 x 3 by 6 x 3
    assert extents == [(0, 15.0, 8.0, 0), (0, 18.0, 8.0, 0), (0, 15.0, 18.0, 0)]
    np.testing.assert_array_equal(figure.axes[0].get_images()[0].get_array(), planes[0].T[::-1])
    assert figure.axes[0].get_title().startswith("INFusion 5.00 %")
    assert volume_montage_png(tmp_path / "m.png", {"reference": planes}, (3.0, 3.0, 2.0)).stat().st_size > 0


def test_quality3d_cfl_files_are_column_major(tmp_path):
    """BART reads .cfl with the first dimension fastest; the benchmark's writer and reader agree with that."""
    quality3d = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality3d.py"))
    array = (np.arange(24).reshape(2, 3, 4) + 1j * np.arange(24).reshape(2, 3, 4)).astype(np.complex64)
    quality3d["write_cfl"](tmp_path / "a", array)
    raw = np.fromfile(tmp_path / "a.cfl", np.complex64)
    assert raw[1] == array[1, 0, 0] and raw[2] == array[0, 1, 0]  # x fastest, then y
    assert (tmp_path / "a.hdr").read_text().splitlines()[1].split()[:4] == ["2", "3", "4", "1"]
    np.testing.assert_array_equal(quality3d["read_cfl"](tmp_path / "a"), array)


def test_quality3d_error_spectrum_puts_an_error_where_it_is():
    """An error at one (ky, kz) frequency the mask left out lands wholly on the unmeasured side and in
    the radial band of that frequency; the shares sum to one."""
    quality3d = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality3d.py"))
    nx, ny, nz = 3, 16, 8
    reference = np.full((nx, ny, nz), 2.0, np.complex64)
    mask = np.zeros((ny, nz), np.float32)
    mask[ny // 2, nz // 2] = 1  # only DC measured
    iy, iz = np.meshgrid(np.arange(ny), np.arange(nz), indexing="ij")
    ripple = 0.1 * np.cos(2 * np.pi * (7 * iy / ny + 3 * iz / nz))  # |k| = hypot(7/8, 3/4) > 0.75
    case = {"reference": reference, "mask": mask, "support": np.ones((nx, ny, nz), bool)}
    spectrum = quality3d["error_spectrum"](reference + ripple[None], case)
    assert spectrum["measured_share"] < 1e-12
    shares = [band["share"] for band in spectrum["bands"]]
    assert sum(shares) == pytest.approx(1.0)
    assert shares[-1] == pytest.approx(1.0)
    assert spectrum["bands"][0]["sampled_fraction"] > 0 and spectrum["bands"][-1]["sampled_fraction"] == 0
    # the bands' powers over the reference's add up to NRMSE^2 (Parseval)
    powers = sum(band["relative_power"] for band in spectrum["bands"])
    assert powers == pytest.approx((quality3d["nrmse_percent"](reference + ripple[None], case) / 100) ** 2)


def test_quality3d_rehash_updates_only_the_last_row_of_a_label_with_its_run_config(tmp_path):
    """A row logged with a stale hash gets the hash of its run's saved config; an earlier row of the same
    label (its run folder since overwritten) and a row whose run is absent keep theirs; lines stay in order."""
    quality3d = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality3d.py"))
    run = tmp_path / "out" / "a_run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("steps: 7\nslices:\n  seed: 3\n")
    rows = [{"case": "c", "R": 4.0, "method": "infusion:a", "setting_hash": "old", "slice_seed": 3,
             "volume_zarr": "out/a.zarr"},
            {"case": "c", "R": 4.0, "method": "infusion:b", "setting_hash": "keep", "slice_seed": 0,
             "volume_zarr": "out/b.zarr"},
            {"case": "c", "R": 4.0, "method": "infusion:a", "setting_hash": "stale", "slice_seed": 3,
             "volume_zarr": "out/a.zarr"}]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    namespace = quality3d["rehash_rows"].__globals__
    namespace["RUNS"], namespace["REPO"] = runs, tmp_path
    quality3d["rehash_rows"]()
    after = [json.loads(line) for line in runs.read_text().splitlines()]
    expected = quality3d["setting_without_seed"](run / "config.yaml")
    assert expected["slice_seed"] == 3 and expected["setting_hash"] not in ("old", "stale")
    assert [row["setting_hash"] for row in after] == ["old", "keep", expected["setting_hash"]]
    assert [row["method"] for row in after] == [row["method"] for row in rows]
