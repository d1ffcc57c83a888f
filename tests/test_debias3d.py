"""engine.recon.debias3d: held-out band gains on the unmeasured (ky, kz) points of a 3D output."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny3d import make_tiny_store, tiny_config

from engine.config import ConfigError, load_config
from engine.io.hybrid_store import HybridStore
from engine.physics.fft import fftc
from engine.recon.debias3d import (
    apply_band_gains,
    estimate_band_gains,
    gain_map,
    heldout_band_sums,
    radial_bands,
)
from engine.recon.fit3d import Recon3D, Recon3DConfig
from engine.recon.job3d import run_recon3d
from engine.recon.selection2d import split_holdout
from engine.runtime.bootstrap import init_distributed
from engine.runtime.context import DistContext
from engine.runtime.local_group import launch_local

pytestmark = pytest.mark.usefixtures("one_thread")

# prior off: a few steps of the tiny case; the gains are measured on a holdout fit of the same config
DEBIAS = {"prior": {"mode": "off"}, "tv_weight": 0.05, "steps": 6,
          "slices": {"per_step": 2, "num_shards": 2, "seed": 3},
          "debias": {"enabled": True, "holdout_fraction": 0.25, "band_edges": [0.5]}}


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("store") / "tiny.zarr")


def single_process() -> DistContext:
    return init_distributed(device="cpu", env={})


def test_radial_bands_follow_the_nyquist_radius_of_each_axis():
    bands = radial_bands((8, 4), (0.5, 1.0))
    assert bands[4, 2] == 0  # the centre
    assert bands[4, 3] == 1  # one step of the 4-point axis: radius 0.5, the edge belongs to the outer band
    assert bands[6, 2] == 1  # two steps of the 8-point axis: radius 0.5
    assert bands[0, 0] == 2  # the corner: radius sqrt 2


def test_gains_change_only_the_unmeasured_points_of_each_band():
    rng = np.random.default_rng(0)
    planes = (rng.standard_normal((3, 8, 4)) + 1j * rng.standard_normal((3, 8, 4))).astype(np.complex64)
    mask = (rng.random((8, 4)) < 0.5).astype(np.float32)
    bands = radial_bands((8, 4), (0.5,))
    gains = gain_map([1.0, 2.0], bands, mask)
    before, after = (fftc(torch.from_numpy(p)).numpy() for p in (planes, apply_band_gains(planes, gains)))
    measured, outer = mask > 0, bands == 1
    np.testing.assert_allclose(after[:, measured], before[:, measured], atol=1e-5)
    np.testing.assert_allclose(after[:, ~measured & ~outer], before[:, ~measured & ~outer], atol=1e-5)
    np.testing.assert_allclose(after[:, ~measured & outer], 2 * before[:, ~measured & outer], atol=1e-5)
    np.testing.assert_allclose(apply_band_gains(planes, gain_map([1.0, 1.0], bands, mask)), planes, atol=1e-5)


def test_band_sums_recover_a_known_shrinkage_at_the_held_out_samples(tiny_store):
    """A fit that predicts the true volume divided by 2 in the outer band gets gain 2 there, 1 inside
    (with uniform coil maps, whose k-space bands are the image's)."""
    store = HybridStore(tiny_store)
    mask = np.asarray(store.mask, np.float32)
    _, holdout = split_holdout(mask, 0.3, 0)
    recon = Recon3D(tiny_config(prior={"mode": "off"}), store, single_process(), holdout=holdout)
    bands = radial_bands(recon.plane, (0.5,))
    truth = np.asarray(store.read_slab(0, recon.nx).reference)
    shrunk = apply_band_gains(truth, np.where(bands == 1, 0.5, 1.0).astype(np.float32))
    recon.evaluate_rows = lambda x0, x1: shrunk[x0:x1]  # the "fit" under test
    recon.maps = torch.ones_like(recon.maps)
    # noise-free data of the truth (the tiny store's own data carry noise)
    coil_kspace = fftc(recon.maps * torch.from_numpy(truth)[:, None])
    recon.kspace = coil_kspace * torch.from_numpy(mask) / recon.scale
    cross, power = heldout_band_sums(recon, bands, 2)
    np.testing.assert_allclose(cross / power, [1.0, 2.0], rtol=1e-4)


def test_run_applies_the_gains_reports_both_errors_and_resume_reuses_them(tiny_store, tmp_path, monkeypatch):
    cfg = tiny_config(**DEBIAS)
    out = tmp_path / "vol.zarr"
    metrics = run_recon3d(cfg, tiny_store, out, single_process())
    saved = json.loads((tmp_path / "vol_run" / "debias.json").read_text())
    assert metrics["debias"]["gains"] == saved["gains"] and len(saved["gains"]) == 2
    assert saved["holdout_samples"] > 0 and sum(saved["heldout_samples_per_band"]) == saved["holdout_samples"]
    assert "holdout_fit_nrmse_percent" in saved  # the tiny store has a reference (reported, not used)
    # the final run is the plain run of the config; the output is its volume with the gains applied
    plain = run_recon3d(_without_debias(cfg), tiny_store, tmp_path / "plain.zarr", single_process())
    assert metrics["nrmse_percent_infusion_without_debias"] == pytest.approx(plain["nrmse_percent_infusion"], rel=1e-6)
    from engine.io.ome_zarr import open_volume

    store = HybridStore(tiny_store)
    gains = gain_map(saved["gains"], radial_bands(tuple(store.shape[2:]), saved["band_edges"]), np.asarray(store.mask))
    expected = apply_band_gains(np.asarray(open_volume(tmp_path / "plain.zarr").complex[...]), gains)
    np.testing.assert_allclose(np.asarray(open_volume(out).complex[...]), expected, atol=1e-5)
    # a resumed run (here: after the volume was lost) reads the gains instead of fitting again
    import engine.recon.job3d as job

    def refuse(*args, **kwargs):
        raise AssertionError("the holdout fit ran again on resume")

    monkeypatch.setattr(job, "estimate_band_gains", refuse)
    shutil.rmtree(out)
    again = run_recon3d(cfg, tiny_store, out, single_process(), resume=True)
    assert again["debias"]["gains"] == saved["gains"]


def test_a_preempted_holdout_fit_checkpoints_requeues_and_resumes_bit_exactly(tiny_store, tmp_path):
    """A SIGTERM during debias's holdout fit: a checkpoint in checkpoints/debias and Preempted (exit 75,
    which the SLURM script requeues on); a plain rerun refuses to discard it; --resume continues the
    holdout fit and ends with the gains and the volume of an uninterrupted run, and removes the folder."""
    import os
    import signal

    from engine.io.ome_zarr import open_volume
    from engine.runtime.checkpoint import CheckpointManager
    from engine.runtime.preemption import Preempted

    cfg = tiny_config(**DEBIAS, checkpoint={"every": 2, "keep_last": 2})
    uninterrupted = run_recon3d(cfg, tiny_store, tmp_path / "uninterrupted.zarr", single_process())

    def signal_in_holdout_fit(recon, result):
        if recon.holdout is not None and recon.step_index == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # seen in step 4's all-reduce

    out, side = tmp_path / "run.zarr", tmp_path / "run_run"
    with pytest.raises(Preempted) as preempted:
        run_recon3d(cfg, tiny_store, out, single_process(), on_step_end=signal_in_holdout_fit)
    assert preempted.value.step == 4 and not (side / "debias.json").exists() and not out.exists()
    assert CheckpointManager(side / "checkpoints" / "debias", single_process()).complete_steps() == [2, 4]
    with pytest.raises(FileExistsError, match="checkpoints of an earlier run"):
        run_recon3d(cfg, tiny_store, out, single_process())
    resumed = run_recon3d(cfg, tiny_store, out, single_process(), resume=True)
    assert resumed["debias"]["gains"] == uninterrupted["debias"]["gains"]
    assert np.array_equal(open_volume(out).complex[...], open_volume(tmp_path / "uninterrupted.zarr").complex[...])
    assert not (side / "checkpoints" / "debias").exists()


def _without_debias(cfg: Recon3DConfig) -> Recon3DConfig:
    import dataclasses

    return dataclasses.replace(cfg, debias=dataclasses.replace(cfg.debias, enabled=False))


def _gains_worker(ctx: DistContext, store: str) -> dict:
    return estimate_band_gains(tiny_config(**DEBIAS), HybridStore(store), ctx)


@pytest.mark.slow  # about 10 s on 2 shared cores
@pytest.mark.dist
def test_gains_two_ranks_equal_one_process(tiny_store):
    """The band sums run over both ranks' planes: 2 gloo ranks give the gains of one process (same seeds)."""
    run = launch_local(_gains_worker, 2, args=(str(tiny_store),), timeout_s=240)
    single = estimate_band_gains(tiny_config(**DEBIAS), HybridStore(tiny_store), single_process())
    for rank in range(2):
        np.testing.assert_allclose(run.results[rank]["gains"], single["gains"], rtol=1e-4)
        assert run.results[rank]["holdout_fit_nrmse_percent"] == pytest.approx(single["holdout_fit_nrmse_percent"],
                                                                               rel=1e-4)
    assert single["gains"] != [1.0, 1.0]


@pytest.mark.parametrize("change, message", [("debias.holdout_fraction=0.6", "holdout_fraction"),
                                             ("debias.band_edges=[0.5, 0.25]", "band_edges"),
                                             ("debias.band_edges=[0]", "band_edges")])
def test_bad_debias_settings_are_refused_at_load(change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Recon3DConfig, None, [change])
