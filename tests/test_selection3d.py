"""engine.recon.selection3d: held-out samples in the 3D loop, the label-free choice, its record and resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny3d import make_tiny_store, tiny_config

from engine.config import ConfigError, load_config
from engine.io.hybrid_store import HybridStore
from engine.recon.fit3d import Recon3D, Recon3DConfig
from engine.recon.job3d import run_recon3d
from engine.recon.selection2d import split_holdout
from engine.recon.selection3d import (
    blend_weight,
    holdout_weights,
    one_standard_error_choice,
    scaled_config,
    select_regularisation,
)
from engine.runtime.bootstrap import init_distributed
from engine.runtime.context import DistContext
from engine.runtime.local_group import launch_local

pytestmark = pytest.mark.usefixtures("one_thread")

# prior off: the selection's candidates differ only in their regularisation weights
SELECTION = {"prior": {"mode": "off"}, "tv_weight": 0.01, "tv_x_weight": 0.005, "steps": 6,
             "slices": {"per_step": 2, "num_shards": 2, "seed": 3, "contiguous": True},
             "selection": {"enabled": True, "regularisation_scales": [0.0, 1.0, 30.0], "validate_every": 3,
                           "holdout_fraction": 0.2}}


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("store") / "tiny.zarr")


def single_process() -> DistContext:
    return init_distributed(device="cpu", env={})


def _holdout(store: HybridStore, weighting: str = "uniform") -> np.ndarray:
    mask = np.asarray(store.mask, np.float32)
    return holdout_weights(mask, split_holdout(mask, 0.2, 0)[1], weighting)


class _ChangedHeldOut:
    """The store with its k-space changed on the held-out samples only."""

    def __init__(self, store: HybridStore, holdout: np.ndarray):
        self.store, self.holdout = store, holdout

    def __getattr__(self, name):
        return getattr(self.store, name)

    def read_slab(self, x0, x1):
        slab = self.store.read_slab(x0, x1)
        slab.kspace = np.asarray(slab.kspace) + 5.0 * (self.holdout > 0)
        return slab


def test_the_fit_never_sees_held_out_samples_and_the_error_scores_them(tiny_store):
    """Changing the k-space on the held-out samples (by far more than the data) leaves the fit's
    losses and parameters alone up to float rounding (the intensity scale comes from all measured
    samples, so it is set equal here) and moves only the held-out error; without a holdout,
    heldout_error is refused. The error is the weighted sum it documents (density weights)."""
    store = HybridStore(tiny_store)
    holdout = _holdout(store, "density")
    cfg = tiny_config(**{k: v for k, v in SELECTION.items() if k != "selection"})
    plain = Recon3D(cfg, store, single_process(), holdout=holdout)
    changed = Recon3D(cfg, _ChangedHeldOut(store, holdout), single_process(), holdout=holdout)
    changed.kspace = changed.kspace * (changed.scale / plain.scale)
    changed.scale = plain.scale
    terms = [(plain.step().terms, changed.step().terms) for _ in range(3)]
    for a, b in terms:
        assert a == pytest.approx(b, rel=1e-6)
    for p, q in zip(plain.trunk.parameters(), changed.trunk.parameters()):
        # rounding of the rescaled data, grown by 3 Adam steps: <= 1e-6 measured; a leak of the held-out
        # change moves parameters by about the learning rate (1e-2)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6)
    error, changed_error = plain.heldout_error(), changed.heldout_error()
    # the same number from the output volume and the SENSE forward model, in the input's units
    from engine.physics.fft import fftc

    slab = store.read_slab(0, store.shape[0])
    predicted = fftc(torch.from_numpy(slab.maps * plain.evaluate_slab()[:, None]), dims=(-2, -1)).numpy()
    measured = np.asarray(slab.kspace) * (holdout > 0)
    want = np.sum(holdout * np.abs(predicted - measured) ** 2 * (holdout > 0)) / np.sum(holdout * np.abs(measured) ** 2)
    assert error == pytest.approx(want, rel=1e-4)
    assert abs(changed_error - error) > 0.05
    # a volume given in the input's units scores as the output it is
    output = plain.evaluate_slab()
    assert plain.heldout_error(output) == pytest.approx(error, rel=1e-5)
    # the Gram matrix scores every blend of the volumes it was given
    other = np.roll(output, 1, axis=1)
    gram = plain.heldout_gram([output, other])
    assert gram.shape == (2, 2, int((holdout > 0).sum()))  # per held-out location
    gram = gram.sum(-1)
    blend = np.array([0.7, 0.3])
    assert plain.heldout_error(0.7 * output + 0.3 * other) == pytest.approx(blend @ gram @ blend, rel=1e-5)
    with pytest.raises(ValueError, match="holdout"):
        Recon3D(cfg, store, single_process()).heldout_error()
    with pytest.raises(ValueError, match="part of the"):
        Recon3D(cfg, store, single_process(), holdout=np.ones((3, 3), np.float32))


def test_selection_runs_every_scale_and_chooses_the_lowest_held_out_error(tiny_store):
    cfg = tiny_config(**SELECTION)
    record = select_regularisation(cfg, HybridStore(tiny_store), single_process())
    scales = [c["scale"] for c in record["candidates"]]
    assert scales == [0.0, 1.0, 30.0]
    for candidate in record["candidates"]:
        assert [p["step"] for p in candidate["curve"]] == [3, 6]
        assert candidate["validation_error"] == candidate["curve"][-1]["validation_error"]
        assert "nrmse_percent" in candidate  # the tiny store has a reference (reported, not used)
        assert candidate["tv_weight"] == pytest.approx(0.01 * candidate["scale"])
    errors = [c["validation_error"] for c in record["candidates"]]
    assert len(set(errors)) == 3  # the scales really change the fits
    assert record["chosen"]["scale"] == scales[int(np.argmin(errors))]
    assert record["holdout_samples"] == int(_holdout(HybridStore(tiny_store)).sum())
    assert scaled_config(cfg, 2.0).tv_x_weight == pytest.approx(0.01)


REFINE = {"anchor_weight": 0.05, "iterations": 10}
BLEND = {**SELECTION, "selection": {**SELECTION["selection"], "blend_l1_wavelet": True}}


def test_the_refinement_of_a_holdout_fit_never_sees_held_out_samples(tiny_store):
    """refine_fit on a run with a holdout solves from the fit samples only: changing the k-space on the
    held-out ones leaves the refined volume alone (scales set equal, as above)."""
    from engine.recon.refine3d import Refine3DConfig, refine_fit

    store = HybridStore(tiny_store)
    holdout = _holdout(store)
    cfg = tiny_config(**{k: v for k, v in SELECTION.items() if k != "selection"})
    plain = Recon3D(cfg, store, single_process(), holdout=holdout)
    changed = Recon3D(cfg, _ChangedHeldOut(store, holdout), single_process(), holdout=holdout)
    changed.scale = plain.scale
    fit = plain.evaluate_slab()
    refined = refine_fit(plain, fit, Refine3DConfig(**REFINE), single_process())
    np.testing.assert_array_equal(refine_fit(changed, fit, Refine3DConfig(**REFINE), single_process()), refined)
    assert not np.allclose(refined, fit)


def test_selection_scores_every_output_and_takes_the_simplest_within_one_standard_error(tiny_store):
    """Each candidate's fit and refinement, then each blended with the 3D L1-wavelet of the fit samples at the
    weight the held-out samples choose; a candidate takes the first output whose held-out error is within one
    standard error of its lowest, and the lowest of the candidates' outputs wins."""
    record = select_regularisation(tiny_config(**BLEND, refine=REFINE), HybridStore(tiny_store), single_process())
    assert record["l1_wavelet_3d"]["validation_error"] > 0 and "nrmse_percent" in record["l1_wavelet_3d"]
    taken = []
    for candidate in record["candidates"]:
        outputs = candidate["outputs"]
        # the fit, its refinement, then their blends (a blend at w = 0 is the output alone, not listed again)
        assert [(o["refine"], o["l1_wavelet_weight"]) for o in outputs[:2]] == [(False, 0.0), (True, 0.0)]
        assert [o["refine"] for o in outputs[2:]] == [False, True]  # both blends have w > 0 on this case
        assert all(0 < o["l1_wavelet_weight"] <= 1 for o in outputs[2:]) and all("nrmse_percent" in o for o in outputs)
        assert outputs[0]["validation_error"] == pytest.approx(candidate["validation_error"], rel=1e-5)
        assert outputs[1]["validation_error"] != outputs[0]["validation_error"]
        for blended in outputs[2:]:
            plain = outputs[int(blended["refine"])]
            assert blended["validation_error"] <= plain["validation_error"] * (1 + 1e-9)  # w = 0 is in [0, 1]
        lowest = min(o["validation_error"] for o in outputs)
        assert min(o["standard_error"] for o in outputs) == 0.0  # the lowest against itself
        first = next(i for i, o in enumerate(outputs) if o["validation_error"] <= lowest + o["standard_error"])
        assert candidate["chosen_output"] == first
        taken.append((outputs[first]["validation_error"], candidate["scale"], outputs[first]))
    error, scale, output = min(taken, key=lambda t: t[0])
    assert record["chosen"] == {"scale": scale, "refine": output["refine"],
                                "l1_wavelet_weight": output["l1_wavelet_weight"], "validation_error": error}
    # choose_refine off: only the refined output (and its blend) can be chosen
    fixed = {**SELECTION, "selection": {**SELECTION["selection"], "regularisation_scales": [1.0],
                                        "choose_refine": False}}
    record = select_regularisation(tiny_config(**fixed, refine=REFINE), HybridStore(tiny_store), single_process())
    assert [o["refine"] for o in record["candidates"][0]["outputs"]] == [True]
    assert record["chosen"]["refine"] is True and "l1_wavelet_3d" not in record


def test_one_standard_error_choice_takes_a_post_step_only_where_its_gain_stands_clear_of_the_noise():
    rng = np.random.default_rng(1)
    locations = 400
    noise = rng.normal(size=locations) ** 2  # the error every output shares at each held-out location

    def gram(gain_per_location):  # two volumes: the second's error lower by gain_per_location
        g = np.zeros((2, 2, locations))
        g[0, 0], g[1, 1] = noise + 1.0, noise + 1.0 - gain_per_location
        g[0, 1] = g[1, 0] = noise + 1.0 - gain_per_location / 2
        return g

    options = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    steady = gram(np.full(locations, 0.01))  # a small gain at every location: far beyond its standard error
    chosen, scores = one_standard_error_choice(steady, options)
    assert chosen == 1 and scores[0]["standard_error"] == pytest.approx(0.0, abs=1e-9)
    # the same mean gain, drowned in its spread: +-1 at alternate locations
    erratic = gram(0.01 + np.where(np.arange(locations) % 2 == 0, 1.0, -1.0))
    chosen, scores = one_standard_error_choice(erratic, options)
    assert scores[1]["validation_error"] < scores[0]["validation_error"]  # lower, but by chance
    assert chosen == 0 and scores[0]["standard_error"] == pytest.approx(np.sqrt(locations) * np.std(
        erratic[0, 0] - erratic[1, 1]))


def test_blend_weight_minimises_the_held_out_error_of_the_blend():
    rng = np.random.default_rng(0)
    r0, r1 = rng.normal(size=50) + 0.3, rng.normal(size=50) - 0.2  # two volumes' residuals
    gram = np.array([[r0 @ r0, r0 @ r1], [r1 @ r0, r1 @ r1]])
    weights = np.linspace(0, 1, 1001)
    errors = [np.sum(((1 - w) * r0 + w * r1) ** 2) for w in weights]
    assert blend_weight(gram) == pytest.approx(weights[int(np.argmin(errors))], abs=1e-3)
    assert blend_weight(np.array([[1.0, 2.0], [2.0, 9.0]])) == 0.0  # the second only hurts: clipped at 0
    assert blend_weight(np.array([[9.0, 2.0], [2.0, 1.0]])) == 1.0
    assert blend_weight(np.ones((2, 2))) == 0.0  # equal residuals: keep the first


@pytest.mark.parametrize("refine, weight", [(False, 0.0), (True, 0.0), (True, 0.4)])
def test_the_final_run_writes_the_chosen_output(tiny_store, tmp_path, monkeypatch, refine, weight):
    """Refined only when a refined output won; blended with the 3D L1-wavelet of all samples at the chosen weight."""
    import engine.recon.job3d as run_module
    from engine.io.ome_zarr import open_volume

    chosen = {"scale": 1.0, "refine": refine, "l1_wavelet_weight": weight, "validation_error": 0.1}
    monkeypatch.setattr(run_module, "select_regularisation", lambda *args, **kwargs: {"candidates": [], "chosen": chosen})
    cfg = tiny_config(**SELECTION, refine=REFINE, checkpoint={"every": 0})
    metrics = run_recon3d(cfg, tiny_store, tmp_path / "vol.zarr", single_process())
    assert ("refine" in metrics) is refine
    assert ("nrmse_percent_infusion_without_refine" in metrics) is refine
    assert ("blend" in metrics) is (weight > 0)
    if weight > 0:
        assert metrics["blend"]["l1_wavelet_weight"] == weight
        unblended = (1 - weight) ** -1 * (np.asarray(open_volume(tmp_path / "vol.zarr").complex[...])
                                          - weight * _l1_wavelet_of_all_samples(tiny_store))
        written_without = metrics["nrmse_percent_infusion_without_blend"]
        from engine.recon.selection3d import reference_nrmse_percent

        recon = Recon3D(cfg, HybridStore(tiny_store), single_process())
        assert reference_nrmse_percent(recon, unblended) == pytest.approx(written_without, rel=1e-4)


def _l1_wavelet_of_all_samples(store_path: Path) -> np.ndarray:
    from engine.recon.refine3d import l1_wavelet_3d_of

    return l1_wavelet_3d_of(Recon3D(tiny_config(prior={"mode": "off"}), HybridStore(store_path), single_process()))


def _selection_worker(ctx: DistContext, store: str) -> dict:
    return select_regularisation(tiny_config(**BLEND, refine=REFINE), HybridStore(store), ctx)


@pytest.mark.slow  # about 15 s on 2 shared cores
@pytest.mark.dist
def test_selection_two_ranks_equal_one_process(tiny_store):
    """The held-out error sums over both ranks' planes: 2 gloo ranks give the curves, the scores of the
    refined and blended outputs (the tiny volume lies within each rank's halo of the L1-wavelet solves)
    and the choice of one process (same seeds)."""
    run = launch_local(_selection_worker, 2, args=(str(tiny_store),), timeout_s=240)
    single = select_regularisation(tiny_config(**BLEND, refine=REFINE), HybridStore(tiny_store), single_process())
    for rank in range(2):
        got = run.results[rank]
        assert got["chosen"]["scale"] == single["chosen"]["scale"]
        for a, b in zip(got["candidates"], single["candidates"], strict=True):
            for p, q in zip(a["curve"], b["curve"], strict=True):
                assert p["validation_error"] == pytest.approx(q["validation_error"], rel=1e-4)
                assert p["nrmse_percent"] == pytest.approx(q["nrmse_percent"], rel=1e-4)
            for p, q in zip(a["outputs"], b["outputs"], strict=True):
                assert p["validation_error"] == pytest.approx(q["validation_error"], rel=1e-4)
                assert p["nrmse_percent"] == pytest.approx(q["nrmse_percent"], rel=1e-4)


def test_run_records_the_choice_refits_with_it_and_resume_reuses_it(tiny_store, tmp_path, monkeypatch):
    cfg = tiny_config(**SELECTION)
    out = tmp_path / "vol.zarr"
    metrics = run_recon3d(cfg, tiny_store, out, single_process())
    saved = json.loads((tmp_path / "vol_run" / "selection.json").read_text())
    assert metrics["selection"]["chosen"] == saved["chosen"]
    chosen = scaled_config(cfg, saved["chosen"]["scale"])
    # the final run is the plain run of the chosen weights on all samples
    plain = run_recon3d(dataclass_without_selection(chosen), tiny_store, tmp_path / "plain.zarr", single_process())
    assert metrics["nrmse_percent_infusion"] == pytest.approx(plain["nrmse_percent_infusion"], rel=1e-6)
    # a resumed run (here: after the volume was lost) reads the choice instead of running it again
    import engine.recon.job3d as run_module

    def refuse(*args, **kwargs):
        raise AssertionError("the selection ran again on resume")

    monkeypatch.setattr(run_module, "select_regularisation", refuse)
    import shutil

    shutil.rmtree(out)
    again = run_recon3d(cfg, tiny_store, out, single_process(), resume=True)
    assert again["selection"]["chosen"] == saved["chosen"]


def test_a_preempted_candidate_checkpoints_and_resumes_to_the_same_choice_and_volume(tiny_store, tmp_path):
    """A SIGTERM during the second candidate run: the first keeps its final checkpoint (with its curve),
    the second checkpoints where it stopped and Preempted is raised (exit 75: requeue); --resume
    rebuilds the first from its checkpoint, continues the second, runs the third, and ends with the
    record and the volume of an uninterrupted run; the candidates' checkpoint folders are removed."""
    import os
    import signal

    from engine.io.ome_zarr import open_volume
    from engine.runtime.checkpoint import CheckpointManager
    from engine.runtime.preemption import Preempted

    cfg = tiny_config(**SELECTION, checkpoint={"every": 0})
    uninterrupted = run_recon3d(cfg, tiny_store, tmp_path / "uninterrupted.zarr", single_process())

    def signal_in_second_candidate(recon, result):
        if recon.holdout is not None and recon.cfg.tv_weight == pytest.approx(0.01) and recon.step_index == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # seen in step 4's all-reduce

    out, side = tmp_path / "run.zarr", tmp_path / "run_run"
    with pytest.raises(Preempted) as preempted:
        run_recon3d(cfg, tiny_store, out, single_process(), on_step_end=signal_in_second_candidate)
    assert preempted.value.step == 4 and not (side / "selection.json").exists()
    folders = {f: CheckpointManager(side / "checkpoints" / f"selection-x{f:g}", single_process()) for f in (0, 1, 30)}
    assert [folders[f].complete_steps() for f in (0, 1, 30)] == [[6], [4], []]
    resumed = run_recon3d(cfg, tiny_store, out, single_process(), resume=True)
    for got, expected in zip(resumed["selection"]["candidates"], uninterrupted["selection"]["candidates"], strict=True):
        assert got["curve"] == expected["curve"] and got["validation_error"] == expected["validation_error"]
    assert resumed["selection"]["chosen"] == uninterrupted["selection"]["chosen"]
    assert np.array_equal(open_volume(out).complex[...], open_volume(tmp_path / "uninterrupted.zarr").complex[...])
    assert not any((side / "checkpoints" / f"selection-x{f:g}").exists() for f in (0, 1, 30))


def dataclass_without_selection(cfg: Recon3DConfig) -> Recon3DConfig:
    import dataclasses

    return dataclasses.replace(cfg, selection=dataclasses.replace(cfg.selection, enabled=False))


@pytest.mark.parametrize("change, message", [("selection.holdout_fraction=0.6", "holdout_fraction"),
                                             ("selection.regularisation_scales=[]", "regularisation_scales"),
                                             ("selection.validate_every=0", "validate_every")])
def test_bad_selection_settings_are_refused_at_load(change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Recon3DConfig, None, [change])


def test_density_weights_favour_the_sparse_periphery_of_a_variable_density_mask():
    from engine.physics.masks import poisson_disc_mask

    mask = poisson_disc_mask((64, 40), 6.0, seed=0)
    _, held = split_holdout(mask, 0.1, 0)
    assert np.array_equal(holdout_weights(mask, held, "uniform"), held)
    weights = holdout_weights(mask, held, "density")
    assert np.array_equal(weights > 0, held > 0) and weights[held > 0].mean() == pytest.approx(1.0)
    y, z = np.meshgrid(np.arange(64) - 32, np.arange(40) - 20, indexing="ij")
    radius = np.hypot(y / 32, z / 20)[held > 0]
    centre, edge = weights[held > 0][radius < 0.3], weights[held > 0][radius > 0.7]
    assert edge.mean() > 3 * centre.mean()
