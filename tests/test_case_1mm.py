"""scripts/make_case_1mm.py on a tiny synthetic volume (no shared data): the evaluation-part rule
and a valid hybrid store with reference, true maps, mask and the 1 mm voxel size."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def make():
    spec = importlib.util.spec_from_file_location("make_case_1mm", REPO / "scripts" / "make_case_1mm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _volume() -> tuple[np.ndarray, np.ndarray]:
    """A 1 mm RAS volume (i, j, k) = (20, 24, 30) whose slices k lie at world z = k + 10 mm."""
    i, j, k = np.meshgrid(np.arange(20), np.arange(24), np.arange(30), indexing="ij")
    head = ((i - 10) / 8.0) ** 2 + ((j - 12) / 10.0) ** 2 + ((k - 20) / 12.0) ** 2 < 1
    volume = np.where(head, 100 + 50 * np.sin(i / 2.0) * np.cos(j / 3.0), 2).astype(np.uint8)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-10, -12, 10)
    return volume, affine


def test_refuses_slices_below_the_evaluation_part(make):
    volume, affine = _volume()
    with pytest.raises(ValueError, match="evaluation part"):
        make.make_magnitude(volume, affine, slab_k=(14, 30))  # k = 14: world z = 24 mm
    with pytest.raises(ValueError, match="1 mm"):
        make.make_magnitude(volume, np.diag([2.0, 2.0, 2.0, 1.0]) @ affine, slab_k=(15, 30))


def test_writes_a_valid_store(make, tmp_path):
    from engine.io.hybrid_store import HybridStore

    volume, affine = _volume()
    magnitude, params = make.make_magnitude(volume, affine, slab_k=(15, 31 - 1))  # world z 25 .. 39 mm
    assert magnitude.shape == (24, 20, 15) and params["world_z_mm"] == [25.0, 39.0]
    assert np.array_equal(magnitude[:, :, 0], volume[:, ::-1, 15].T)  # x = A-P (Colin y reversed)
    case_path = make.write_case(tmp_path / "case.npz", magnitude, params)
    case = make.load_case(case_path)
    assert case["kspace"].shape == (16, 24, 20, 15)  # 16 coils, (kx, ky, kz)
    store = HybridStore(make.write_store(case, tmp_path / "case.zarr", acceleration=4.0, chunk_x=8))
    assert store.shape[0] == 24 and store.voxel_size_mm == (1.0, 1.0, 1.0)
    slab = store.read_slab(0, 24)
    mask = np.asarray(store.mask)
    assert mask.shape == (20, 15) and 3.0 < mask.size / mask.sum() < 5.0
    assert np.allclose(slab.maps, case["maps"].transpose(1, 0, 2, 3))
    assert np.allclose(slab.reference, case["reference"])
    assert np.all(np.asarray(slab.kspace)[:, :, mask == 0] == 0)  # undersampled
    # the recorded check catches a changed simulation
    with np.load(case_path) as archive:
        changed = json.loads(str(archive["params_json"]))
        changed["check"]["energy"] *= 1.1
        np.savez(tmp_path / "changed.npz", magnitude_uint8=archive["magnitude_uint8"],
                 params_json=json.dumps(changed))
    with pytest.raises(RuntimeError, match="no longer matches"):
        make.load_case(tmp_path / "changed.npz")


def test_tuning_part_stays_below_the_evaluation_part_and_keeps_its_planes(make, tmp_path):
    from engine.io.hybrid_store import to_hybrid

    volume, affine = _volume()
    with pytest.raises(ValueError, match="out of the evaluation part"):
        make.make_magnitude(volume, affine, slab_k=(0, 16), part="tuning")  # k = 15: world z = 25 mm
    magnitude, params = make.make_magnitude(volume, affine, slab_k=(0, 15), part="tuning", x_planes=(6, 18))
    assert magnitude.shape == (24, 20, 15)  # simulated over the whole field of view
    assert params["case_id"].startswith("colin27_tuning_volume_1mm_12x20x15") and params["world_z_mm"] == [10.0, 24.0]
    with pytest.raises(ValueError, match="readout planes"):
        make.make_magnitude(volume, affine, slab_k=(0, 15), part="tuning", x_planes=(6, 30))
    kspace, maps, reference = make._simulate(magnitude, params["simulation"])
    case = make.load_case(make.write_case(tmp_path / "tuning.npz", magnitude, params))
    # the kept planes are the full acquisition's: the same hybrid planes, maps and reference
    assert case["kspace"].shape == (16, 12, 20, 15)
    assert np.allclose(to_hybrid(case["kspace"]), to_hybrid(kspace)[6:18], atol=1e-6)
    assert np.array_equal(case["maps"], maps[:, 6:18]) and np.array_equal(case["reference"], reference[6:18])


def test_mni152_tuning_case_stays_where_the_prior_never_trained(make):
    volume, affine = _volume()  # world z = 10 + k mm
    with pytest.raises(ValueError, match="prior's training part"):
        make.make_magnitude(volume, affine, slab_k=(14, 30), part="tuning", source="mni152")  # k = 14: 24 mm
    with pytest.raises(ValueError, match="no evaluation case is made from mni152"):
        make.make_magnitude(volume, affine, slab_k=(15, 30), source="mni152")
    magnitude, params = make.make_magnitude(volume, affine, slab_k=(15, 30), part="tuning", source="mni152",
                                            x_planes=(6, 18))
    assert magnitude.shape == (24, 20, 15)  # simulated over the whole field of view
    assert params["case_id"].startswith("mni152_tuning_volume_1mm_12x20x15") and params["world_z_mm"] == [25.0, 39.0]
    assert "MNI152" in params["licence"] and params["source"] == "MNI152 mni152_2009a_t1_1mm.nii.gz"
    # the shipped case file is the one the script names
    assert make.MNI_TUNING_CASE.name == "mni152_tuning_volume_1mm_72x197x80.npz" and make.MNI_TUNING_CASE.exists()


def test_quality3d_report_writes_the_1mm_tables(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("quality3d", REPO / "benchmarks" / "quality3d.py")
    quality3d = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality3d)
    for name in ("RUNS", "PROGRESS", "REPORT", "SCALE_REPORT"):
        monkeypatch.setattr(quality3d, name, tmp_path / f"{name}.txt")
    quality3d.SCALE_REPORT.write_text("# scaling\n")
    common = {"machine": "m", "date": "d", "commit": "c"}
    infusion = {"config": "configs/demo3d.yaml", "overrides": [], "seconds": 9.0}
    rows = [{"case": "bundled", "R": 4.0, "method": "zero_filled", "nrmse_percent": 30.0, "seconds": 1.0},
            {"case": "bundled", "R": 4.0, "method": "l1_wavelet_3d", "nrmse_percent": 6.0, "seconds": 1.0},
            # one setting at two slice seeds: judged by their mean (5.50 %), not by the luckier seed
            {"case": "bundled", "R": 4.0, "method": "infusion:a", "nrmse_percent": 5.2, "slice_seed": 0,
             "setting_hash": "h", **infusion},
            {"case": "bundled", "R": 4.0, "method": "infusion:a seed 1", "nrmse_percent": 5.8, "slice_seed": 1,
             "setting_hash": "h", **infusion},
            {"case": "bundled", "R": 4.0, "method": "infusion:b", "nrmse_percent": 5.45, **infusion,
             "debias": {"gains": [1.0, 1.25], "band_edges": [0.5], "without_debias_percent": 5.6,
                        "holdout_fit_percent": 5.9, "holdout_fit_seconds": 8.0}},
            # the peer given the same debias: reported beside the goal, not the peer the goal is set by
            {"case": "bundled", "R": 4.0, "method": "l1_wavelet_3d_debiased", "nrmse_percent": 5.0, "seconds": 2.0,
             "debias": {"gains": [1.0, 1.1], "band_edges": [0.5], "without_debias_percent": 6.0}},
            {"case": "colin27_1mm", "R": 4.0, "method": "zero_filled", "nrmse_percent": 23.0, "seconds": 2.0},
            {"case": "colin27_1mm", "R": 4.0, "method": "l1_wavelet_3d", "nrmse_percent": 6.0, "seconds": 9.0,
             "factor": 0.004, "lamda": 0.01},
            {"case": "colin27_1mm", "R": 4.0, "method": "infusion:x", "nrmse_percent": 5.0, "seconds": 60.0,
             "config": "configs/colin27_1mm.yaml", "overrides": ["steps=10"], "steps": 10, "seconds_per_step": 6.0,
             "wall_seconds": 70.0, "peak_rss_mib_all_ranks": 3000.0, "peak_rss_mib_one_rank": 1600.0},
            {"case": "colin27_1mm", "R": 4.0, "method": "infusion:on a GPU", "nrmse_percent": 5.1, "seconds": 1.0,
             "config": "configs/colin27_1mm.yaml", "overrides": ["steps=10"], "steps": 10, "seconds_per_step": 0.035,
             "wall_seconds": 9.0, "peak_rss_mib_all_ranks": 2000.0, "peak_rss_mib_one_rank": 2000.0,
             "peak_gpu_gib_max_rank": 1.53},
            {"case": "colin27_1mm_tuning", "R": 4.0, "method": "l1_wavelet_3d", "nrmse_percent": 7.0,
             "seconds": 3.0, "factor": 0.004, "lamda": 0.01}]
    quality3d.RUNS.write_text("".join(json.dumps({**r, **common}) + "\n" for r in rows))
    quality3d.PROGRESS.write_text(json.dumps({"case": "colin27_1mm", "store": "case_R4_x.zarr",
                                              "method": "inr_tv_2d_planes", "planes_done": 3, "planes": 217,
                                              "seconds_done": 30.0, "seconds_per_plane": 10.0, **common}) + "\n")
    report = quality3d.write_report().read_text()
    assert "## bundled, R = 4" in report and "### colin27_1mm, R = 4" in report
    assert report.index("## The 1 mm tuning case") < report.index("### colin27_1mm_tuning, R = 4")
    assert "Not run (time on 2 shared CPU cores): bart_W." in report
    assert "Not finished: inr_tv_2d_planes, 3 of 217 planes" in report
    assert "goal (10 % below it): 5.40 %" in report
    assert ("Slice seeds of one setting (infusion:a, infusion:a seed 1): seeds 0 / 1 give 5.20 / 5.80 %, "
            "mean 5.50 %, spread 0.60 points.") in report
    # b's single run is lower, but only a setting run at the most seeds is judged
    assert "at the most seeds): the mean of the 2 seeds of infusion:a, 5.50 %: goal NOT reached." in report
    assert ("The 3D L1-wavelet with the same debias (l1_wavelet_3d_debiased): 5.00 %; that INFusion score is "
            "10.0 % above it.") in report
    assert ("(debias gains 1.000 / 1.250 at band edges 0.5; without them 5.60 %; holdout fit 5.90 % in 8 s)"
            in report)
    # a GPU row gives its device memory and its step time in ms
    assert "steps=10 (10 steps, 35 ms per step; peak GPU memory 1.53 GiB, host RSS 2000 MiB)" in report
    scale = quality3d.SCALE_REPORT.read_text()
    assert scale.startswith("# scaling") and "| 4 | infusion:x | 10 | 6.000 |" in scale
    assert "| 4 | infusion:on a GPU | 10 | 0.035 | 1 | 9 | 2000 | 2000 | 1.53 | 5.10 |" in scale
    assert "| 4 | infusion:x | 10 | 6.000 | 60 | 70 | 3000 | 1600 | - | 5.00 |" in scale
    quality3d.write_report()  # the marked section is replaced, not appended again
    assert quality3d.SCALE_REPORT.read_text().count("infusion:x") == 1


def test_quality3d_montage_of_the_saved_volumes(make, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("quality3d", REPO / "benchmarks" / "quality3d.py")
    quality3d = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality3d)
    volume, affine = _volume()
    magnitude, params = make.make_magnitude(volume, affine, slab_k=(15, 30))
    case = make.load_case(make.write_case(tmp_path / "case.npz", magnitude, params))
    store = make.write_store(case, tmp_path / "case.zarr", acceleration=4.0)
    monkeypatch.setattr(quality3d, "RUNS", tmp_path / "runs.jsonl")
    monkeypatch.setattr(quality3d, "VOLUMES", tmp_path / "volumes")
    monkeypatch.setattr(quality3d, "REPO", tmp_path)
    monkeypatch.setattr(quality3d, "case_store", lambda name, r: store)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    common = {"case": "colin27_1mm", "R": 4.0, "seconds": 1.0, "machine": "m", "date": "d", "commit": "c"}
    with open(quality3d.RUNS, "w") as handle:
        for method, nrmse in (("zero_filled", 20.0), ("l1_wavelet_3d", 5.0), ("bart_W_0.01", 6.0), ("bart_W_0.1", 9.0)):
            quality3d.save_volume("colin27_1mm", 4.0, method, case["reference"] * (1 + nrmse / 100))
            handle.write(json.dumps({**common, "method": method, "nrmse_percent": nrmse}) + "\n")
    out = quality3d.write_montage("colin27_1mm", 4.0)
    assert out.name == "quality3d_colin27_1mm_R4.png" and out.stat().st_size > 1000
