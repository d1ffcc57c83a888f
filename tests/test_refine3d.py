"""engine.recon.refine3d: the anchored 3D L1-wavelet refinement of a 3D output and its halo exchange."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny3d import NX, make_tiny_store, tiny_config

from engine.config import ConfigError, load_config
from engine.evaluation.baselines import intensity_scale_3d, l1_wavelet_3d, zero_filled_3d
from engine.evaluation.metrics import nrmse_percent
from engine.io.hybrid_store import HybridStore
from engine.recon.job3d import run_recon3d
from engine.recon.refine3d import Refine3DConfig, halo_planes, refine_slab
from engine.runtime.bootstrap import init_distributed
from engine.runtime.context import DistContext
from engine.runtime.local_group import launch_local

pytestmark = pytest.mark.usefixtures("one_thread")

REFINE = {"prior": {"mode": "off"}, "steps": 4, "refine": {"anchor_weight": 0.05, "iterations": 10}}


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("store") / "tiny.zarr")


def single_process() -> DistContext:
    return init_distributed(device="cpu", env={})


def _case(store_path: Path):
    store = HybridStore(store_path)
    slab = store.read_slab(0, store.n_readout)
    mask = np.asarray(store.mask, np.float32)
    return slab.kspace * mask, slab.maps, mask, slab.reference


def test_the_anchor_weight_moves_the_solution_from_the_wavelet_solve_to_the_anchor(tiny_store):
    kspace, maps, mask, reference = _case(tiny_store)
    scale = intensity_scale_3d(zero_filled_3d(kspace, maps, mask))
    plain = l1_wavelet_3d(kspace, maps, mask, scale=scale, max_iter=30)
    anchor = zero_filled_3d(kspace, maps, mask)
    near = l1_wavelet_3d(kspace, maps, mask, scale=scale, max_iter=30, anchor=anchor, anchor_weight=1e4)
    assert nrmse_percent(near, anchor) < 0.1  # a heavy anchor holds the solution there
    weak = l1_wavelet_3d(kspace, maps, mask, scale=scale, max_iter=30, anchor=anchor, anchor_weight=1e-6)
    assert nrmse_percent(weak, plain) < 1.0  # a negligible one leaves the wavelet solve's fixed point
    # anchored at the truth, the solve lands nearer the truth than without an anchor
    truth = l1_wavelet_3d(kspace, maps, mask, scale=scale, max_iter=30, anchor=reference, anchor_weight=0.5)
    assert nrmse_percent(truth, reference) < 0.7 * nrmse_percent(plain, reference)
    with pytest.raises(ValueError, match="anchor shape"):
        l1_wavelet_3d(kspace, maps, mask, anchor=anchor[1:], anchor_weight=1.0)


def _halo_worker(ctx: DistContext, bounds: list[int], halo: int) -> tuple:
    volume = np.arange(bounds[-1] * 2 * 3, dtype=np.float32).reshape(bounds[-1], 2, 3)
    a, b = bounds[ctx.rank], bounds[ctx.rank + 1]
    before, after = halo_planes(volume[a:b], a, bounds[-1], halo, ctx)
    return before, after


@pytest.mark.dist
def test_halo_planes_come_from_every_rank_that_holds_them_even_past_a_thin_slab():
    """7 planes on 3 ranks as [0, 3), [3, 4), [4, 7), halo 2: rank 2's planes before are 2 (rank 0) and
    3 (rank 1, whose slab is thinner than the halo); the volume's ends clip the halo."""
    bounds = [0, 3, 4, 7]
    run = launch_local(_halo_worker, 3, args=(bounds, 2), timeout_s=120)
    volume = np.arange(7 * 2 * 3, dtype=np.float32).reshape(7, 2, 3)
    for rank in range(3):
        a, b = bounds[rank], bounds[rank + 1]
        before, after = run.results[rank]
        np.testing.assert_array_equal(before, volume[max(0, a - 2):a])
        np.testing.assert_array_equal(after, volume[b:min(7, b + 2)])


def test_run_writes_the_refined_fit_and_reports_the_fit_without_it(tiny_store, tmp_path):
    from engine.io.ome_zarr import open_volume

    metrics = run_recon3d(tiny_config(**REFINE), tiny_store, tmp_path / "refined.zarr", single_process())
    plain_cfg = tiny_config(**{**REFINE, "refine": {"anchor_weight": 0.0}})
    plain = run_recon3d(plain_cfg, tiny_store, tmp_path / "plain.zarr", single_process())
    assert metrics["nrmse_percent_infusion_without_refine"] == pytest.approx(plain["nrmse_percent_infusion"], rel=1e-6)
    assert metrics["refine"]["anchor_weight"] == 0.05 and metrics["refine"]["seconds_max_rank"] > 0
    assert "refine" not in plain and "nrmse_percent_infusion_without_refine" not in plain
    store = HybridStore(tiny_store)
    fit = np.asarray(open_volume(tmp_path / "plain.zarr").complex[...])
    kspace, maps, mask, _ = _case(tiny_store)
    expected = refine_slab(fit, lambda a, b: (kspace[a:b], maps[a:b]), mask, 0, store.n_readout,
                           _run_scale(tiny_store), Refine3DConfig(**REFINE["refine"]), single_process())
    np.testing.assert_allclose(np.asarray(open_volume(tmp_path / "refined.zarr").complex[...]), expected,
                               rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # nothing else moved: the refinement starts at the fit and ends elsewhere
    assert not np.allclose(expected, fit)


def _run_scale(store_path: Path) -> float:
    from engine.recon.fit3d import Recon3D

    return float(Recon3D(tiny_config(**REFINE), HybridStore(store_path), single_process()).scale)


def _run_worker(ctx: DistContext, store: str, out: str) -> None:
    run_recon3d(tiny_config(**REFINE), store, out, ctx)


@pytest.mark.slow  # a 2-rank run of the tiny case, then one process
@pytest.mark.dist
def test_refined_volume_two_ranks_equal_one_process(tiny_store, tmp_path):
    """The tiny volume (16 planes) is within the halo (8) of each rank's slab (8 planes): each rank solves
    the whole volume from its halo planes and keeps its part, so 2 ranks write what 1 process writes."""
    from engine.io.ome_zarr import open_volume

    assert NX <= 2 * 8
    launch_local(_run_worker, 2, args=(str(tiny_store), str(tmp_path / "two.zarr")), timeout_s=240)
    run_recon3d(tiny_config(**REFINE), tiny_store, tmp_path / "one.zarr", single_process())
    two = np.asarray(open_volume(tmp_path / "two.zarr").complex[...])
    one = np.asarray(open_volume(tmp_path / "one.zarr").complex[...])
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-4 * np.abs(one).max())


@pytest.mark.parametrize("change, message", [("refine.anchor_weight=-1", "anchor_weight"),
                                             ("refine.lambda_factor=0", "lambda_factor")])
def test_bad_refine_settings_are_refused_at_load(change, message):
    from engine.recon.config3d import Recon3DConfig

    with pytest.raises(ConfigError, match=message):
        load_config(Recon3DConfig, None, [change])


def test_quality3d_refine_row_scores_the_saved_fit_refined_and_refuses_a_refined_row(tiny_store, tmp_path):
    """benchmarks/quality3d.py refine: the logged row's saved fit, refined on the whole volume in one process,
    scored as the report scores; the row records the fit's own score and hashes the refine settings in."""
    import runpy

    from engine.io.ome_zarr import open_volume

    quality3d = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality3d.py"))
    fit_metrics = run_recon3d(tiny_config(prior={"mode": "off"}, steps=4), tiny_store, tmp_path / "fit.zarr",
                              single_process())
    row = {"case": "tiny", "R": 4.0, "method": "infusion:fit", "volume_zarr": "fit.zarr", "commit": "abc",
           "date": "today", "overrides": [], "config": "c.yaml", "seconds": 1.0,
           "nrmse_percent": fit_metrics["nrmse_percent_infusion"]}
    namespace = quality3d["refine_row"].__globals__
    namespace["REPO"] = tmp_path
    namespace["case_store"] = lambda case_name, acceleration: tiny_store
    namespace["read_rows"] = lambda: [row, {**row, "method": "infusion:done", "refine": {}}]
    refine = {"anchor_weight": 0.05, "lambda_factor": 0.003, "iterations": 10}
    result = quality3d["refine_row"]("tiny", 4.0, "infusion:fit", refine)

    case = quality3d["load_case"](tiny_store)
    fit = np.asarray(open_volume(tmp_path / "fit.zarr").complex[...])
    scale = intensity_scale_3d(zero_filled_3d(case["kspace"], case["maps"], case["mask"]))
    expected = refine_slab(fit, lambda a, b: (case["kspace"][a:b], case["maps"][a:b]), case["mask"], 0, NX, scale,
                           Refine3DConfig(**refine), single_process())
    np.testing.assert_array_equal(result["_volume"], expected)
    assert result["nrmse_percent"] == pytest.approx(quality3d["nrmse_percent"](expected, case))
    assert result["refine"]["without_refine_percent"] == row["nrmse_percent"]
    assert result["overrides"] == ["refine.anchor_weight=0.05", "refine.lambda_factor=0.003", "refine.iterations=10"]
    plain_hash = quality3d["setting_without_seed"](tmp_path / "fit_run" / "config.yaml")["setting_hash"]
    assert result["setting_hash"] != plain_hash
    with pytest.raises(SystemExit, match="not a plain fit"):
        quality3d["refine_row"]("tiny", 4.0, "infusion:done", refine)
