"""engine.recon.selection2d: held-out split, choice by minimum held-out error, end-to-end on a tiny case."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.recon.selection2d import SelectionConfig, choose, edge_search, split_holdout
from tests.test_recon2d import TinyDenoiser, case, small_config  # noqa: F401 (case is a fixture)


def test_holdout_is_disjoint_seeded_and_of_the_requested_size():
    mask = (np.random.default_rng(3).random((40, 40)) < 0.3).astype(np.float32)
    fit, held = split_holdout(mask, 0.1, seed=7)
    assert np.all(fit * held == 0) and np.array_equal(fit + held, mask)
    assert held.sum() == round(0.1 * mask.sum()) and np.all(held <= mask)
    again, held_again = split_holdout(mask, 0.1, seed=7)
    assert np.array_equal(held, held_again) and np.array_equal(fit, again)
    assert not np.array_equal(held, split_holdout(mask, 0.1, seed=8)[1])
    with pytest.raises(ValueError, match="none to hold out"):
        split_holdout(np.eye(4, dtype=np.float32), 0.05, seed=0)


def test_choose_takes_the_lowest_held_out_error():
    candidates = [{"name": "a", "validation_error": 0.3}, {"name": "b", "validation_error": 0.1},
                  {"name": "c", "validation_error": 0.2}]
    assert choose(candidates)["name"] == "b"


def test_edge_search_grows_a_list_where_its_best_value_sits_at_an_end():
    scored = []

    def score(best):
        def f(value):
            scored.append(value)
            return abs(np.log(value / best))
        return f

    # the best value lies 4x above the list: two steps of the top pair's ratio (2) reach it
    assert edge_search(score(4e-3), [2.5e-4, 5e-4, 1e-3], 2) == pytest.approx(4e-3)
    assert scored == pytest.approx([2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3])
    scored.clear()
    # at most extend_edges steps: 16x above stops at 4x; 0 keeps the list as given
    assert edge_search(score(1.6e-2), [2.5e-4, 5e-4, 1e-3], 2) == pytest.approx(4e-3)
    assert edge_search(score(1.6e-2), [2.5e-4, 5e-4, 1e-3], 0) == pytest.approx(1e-3)
    # downwards by the bottom pair's ratio, unless told not to
    assert edge_search(score(6e-5), [2.5e-4, 5e-4, 1e-3], 2) == pytest.approx(6.25e-5)
    assert edge_search(score(6e-5), [2.5e-4, 5e-4, 1e-3], 2, downwards=False) == pytest.approx(2.5e-4)
    scored.clear()
    # a best value inside the list, or 0 at its bottom (the prior off), adds nothing
    assert edge_search(score(5e-4), [2.5e-4, 5e-4, 1e-3], 2) == pytest.approx(5e-4) and len(scored) == 3
    assert edge_search(lambda w: w, [0.0, 0.05, 0.1], 2, downwards=False) == 0.0
    with pytest.raises(ValueError, match="extend_edges"):
        SelectionConfig(extend_edges=2, search="grid")


def test_uniform_held_out_score_is_the_relative_dc_error_and_density_weights_the_periphery():
    import torch

    from engine.losses.dc import DataConsistency
    from engine.physics.masks import poisson_disc_mask
    from engine.recon.selection2d import _Scorer
    from engine.recon.selection3d import holdout_weights

    rng = np.random.default_rng(0)
    kspace = torch.tensor(rng.standard_normal((3, 48, 48)) + 1j * rng.standard_normal((3, 48, 48)), dtype=torch.complex64)
    maps = torch.tensor(rng.standard_normal((3, 48, 48)) + 1j * rng.standard_normal((3, 48, 48)), dtype=torch.complex64)
    image = torch.tensor(rng.standard_normal((48, 48)) + 1j * rng.standard_normal((48, 48)), dtype=torch.complex64)
    mask = poisson_disc_mask((48, 48), 4, calib=(0, 0), seed=0)
    _, held = split_holdout(mask, 0.2, seed=1)
    uniform = _Scorer(kspace, maps, torch.tensor(holdout_weights(mask, held, "uniform")), None, None)
    expected = DataConsistency(kspace * torch.tensor(held), maps, torch.tensor(held), "energy", "torch")(image)
    assert uniform(image, 0)["validation_error"] == pytest.approx(float(expected), rel=1e-4)
    weights = holdout_weights(mask, held, "density")
    radius = np.hypot(*np.meshgrid(np.arange(48) - 24, np.arange(48) - 24, indexing="ij"))
    outer, inner = (held > 0) & (radius > 16), (held > 0) & (radius < 8)
    assert weights[outer].mean() > 1.5 * weights[inner].mean()  # variable density: the centre is dense


def selection_config(**selection):
    return small_config(optim={"steps": 80}, regularisers={"tv_weight": 1e-4},
                        prior={"mode": "tweedie", "inject_noise": False, "start_step": 20, "every": 5,
                               "noise": "loguniform", "t_low": 0.005, "t_high_start": 0.02, "t_high_end": 0.01,
                               "distance": "l2", "weight_start": 0.1, "weight_end": 0.1, "weight_scale": 1.0},
                        selection={"enabled": True, "holdout_fraction": 0.1, "validate_every": 10,
                                   "patience": 2, "min_steps": 40, "warm_start_steps": 20, **selection})


def test_selection_end_to_end(case, monkeypatch):  # noqa: F811
    """Candidates fit without the held-out samples, the refit with all; the minimum wins; curves recorded."""
    from engine.recon import fit2d as recon2d

    kspace, maps, mask, image = case
    seen_masks = []
    original = recon2d.INRFit2D.__init__

    def recording_init(self, kspace_t, maps_t, mask_t, *args, **kwargs):
        seen_masks.append(mask_t.cpu().numpy().copy())
        original(self, kspace_t, maps_t, mask_t, *args, **kwargs)

    monkeypatch.setattr(recon2d.INRFit2D, "__init__", recording_init)
    # a TV weight of 5 flattens the image: the held-out samples must reject it
    config = selection_config(tv_weights=[1e-4, 5.0], prior_weights=[0.0, 0.1])
    denoiser = TinyDenoiser()
    result, info = recon2d.reconstruct_2d(kspace, maps, mask, config, reference=image, prior=denoiser)
    record = info["selection"]
    fit_mask, held = split_holdout(mask, 0.1, 0)
    # warm start, 2 TV candidates, 1 prior candidate, refit
    assert len(seen_masks) == 5 and len(record["candidates"]) == 3
    for seen in seen_masks[:-1]:
        assert np.array_equal(seen, fit_mask) and np.all(seen * held == 0)
    assert np.array_equal(seen_masks[-1], mask)
    errors = [c["validation_error"] for c in record["candidates"]]
    assert record["chosen"]["validation_error"] == min(errors)
    assert record["candidates"][1]["tv_weight"] == 5.0 and errors[1] > min(errors)
    assert record["chosen"]["tv_weight"] == 1e-4
    for candidate in record["candidates"]:
        curve = candidate["curve"]
        best = min(curve, key=lambda point: point["validation_error"])
        assert candidate["stop_step"] == best["step"] and "nrmse_percent" in best
        assert [p["step"] for p in curve] == list(range(30, candidate["steps_run"] + 1, 10))
        # patience: no more than 2 checks after the minimum once past min_steps
        assert candidate["steps_run"] <= max(candidate["stop_step"] + 20, 40)
    assert record["candidates"][2]["prior_weight"] == 0.1 and record["candidates"][2]["prior_evals"] > 0
    # the refit's NRMSE on the check grid (a reference was given), ending at the returned image's
    assert [p["step"] for p in record["refit_curve"]] == list(range(10, record["refit_steps_run"] + 1, 10))
    from engine.evaluation.metrics import nrmse_percent
    assert record["refit_curve"][-1]["nrmse_percent"] == pytest.approx(nrmse_percent(result, image, None), rel=1e-5)
    assert info["steps"] == record["chosen"]["steps"] and result.shape == mask.shape
    assert info["unrefit_image"].shape == mask.shape and not np.array_equal(info["unrefit_image"], result)
    json.dumps(record)  # plain values only


def test_selection_extends_the_prior_list_upwards_on_the_same_tv(case):  # noqa: F811
    """With extend_edges the candidates are distinct pairs; a prior weight beyond the list is tried
    only when the list's largest weight was best, and at the chosen TV weight."""
    from engine.recon.fit2d import reconstruct_2d

    kspace, maps, mask, _ = case
    config = selection_config(tv_weights=[1e-4, 2e-4], prior_weights=[0.0, 0.1], refit=False, extend_edges=1)
    _, info = reconstruct_2d(kspace, maps, mask, config, prior=TinyDenoiser())
    candidates = info["selection"]["candidates"]
    pairs = [(c["tv_weight"], c["prior_weight"]) for c in candidates]
    assert len(set(pairs)) == len(pairs) and info["selection"]["extend_edges"] == 1
    tv_stage = [c for c in candidates if c["prior_weight"] == 0.0]
    tv_best = min(tv_stage, key=lambda c: c["validation_error"])["tv_weight"]
    assert len(tv_stage) == 3 and {c["tv_weight"] for c in candidates if c["prior_weight"] > 0} == {tv_best}
    at_tv = {c["prior_weight"]: c["validation_error"] for c in candidates if c["tv_weight"] == tv_best}
    assert (0.2 in at_tv) == (at_tv[0.1] < at_tv[0.0])


class _PerLocationScorer:
    """A held-out scorer whose per-location errors are set per image (engine.recon.selection2d._Scorer.gram)."""

    def __init__(self, errors: dict[float, np.ndarray]):
        self.errors = errors

    def gram(self, images):
        keys = [round(float(image.real.flatten()[0]), 6) for image in images]
        gram = np.zeros((len(keys), len(keys), len(self.errors[keys[0]])))
        for index, key in enumerate(keys):
            gram[index, index] = self.errors[key]
        return gram


def test_a_stronger_prior_is_taken_only_while_its_held_out_gain_exceeds_one_standard_error():
    from engine.recon.selection2d import _stronger_prior

    rng = np.random.default_rng(0)
    base = rng.uniform(1.0, 2.0, 400)
    # 0.2: lower at every location (clear gain); 0.4: lower in total, but by less than its spread
    errors = {0.1: base, 0.2: 0.9 * base, 0.4: 0.9 * base - 0.001 + np.resize([0.2, -0.2], 400)}
    candidates = [{"tv_weight": 1e-3, "prior_weight": 0.1, "validation_error": base.sum()}]
    images = [torch.full((2, 2), 0.1, dtype=torch.complex64)]

    def run(tv_weight, prior_weight):
        candidates.append({"tv_weight": tv_weight, "prior_weight": prior_weight,
                           "validation_error": errors[prior_weight].sum()})
        images.append(torch.full((2, 2), prior_weight, dtype=torch.complex64))

    chosen, tried = _stronger_prior(candidates[0], [0.2, 0.4, 0.8], run, candidates, images,
                                    _PerLocationScorer(errors))
    assert chosen["prior_weight"] == 0.2 and errors[0.4].sum() < errors[0.2].sum()
    assert [(t["prior_weight"], t["taken"]) for t in tried] == [(0.2, True), (0.4, False)]  # 0.8 never run
    assert len(candidates) == 3 and tried[1]["standard_error"] > errors[0.2].sum() - errors[0.4].sum()


def test_stronger_prior_weights_run_only_when_the_lists_top_wins(case):  # noqa: F811
    from engine.recon.fit2d import reconstruct_2d

    kspace, maps, mask, _ = case
    config = selection_config(tv_weights=[1e-4], prior_weights=[0.0, 0.1], refit=False,
                              stronger_prior_weights=[0.2])
    _, info = reconstruct_2d(kspace, maps, mask, config, prior=TinyDenoiser())
    record = info["selection"]
    at_list = {c["prior_weight"]: c["validation_error"] for c in record["candidates"][:2]}
    top_won = at_list[0.1] < at_list[0.0]
    assert ("stronger_prior" in record) == top_won == (len(record["candidates"]) == 3)
    if top_won:
        taken = record["stronger_prior"][0]["taken"]
        assert record["chosen"]["prior_weight"] == (0.2 if taken else 0.1)
    for bad in ([0.1], [0.3, 0.2]):
        with pytest.raises(ValueError, match="stronger_prior_weights"):
            selection_config(prior_weights=[0.0, 0.1], stronger_prior_weights=bad)
    with pytest.raises(ValueError, match="stronger_prior_weights"):
        selection_config(search="grid", stronger_prior_weights=[0.2])


def test_prior_then_tv_chooses_tv_beside_the_chosen_prior(case):  # noqa: F811
    from engine.recon.fit2d import reconstruct_2d

    kspace, maps, mask, _ = case
    config = selection_config(tv_weights=[5e-5, 1e-4, 2e-4], prior_weights=[0.0, 0.1], refit=False,
                              search="prior_then_tv")
    _, info = reconstruct_2d(kspace, maps, mask, config, prior=TinyDenoiser())
    pairs = [(c["tv_weight"], c["prior_weight"]) for c in info["selection"]["candidates"]]
    errors = {pair: c["validation_error"] for pair, c in zip(pairs, info["selection"]["candidates"])}
    # first every prior weight at the config's TV weight (1e-4), then the other TV weights at the winner
    assert pairs[:2] == [(1e-4, 0.0), (1e-4, 0.1)] and len(pairs) == 4
    prior_chosen = 0.0 if errors[(1e-4, 0.0)] <= errors[(1e-4, 0.1)] else 0.1
    assert pairs[2:] == [(5e-5, prior_chosen), (2e-4, prior_chosen)]
    assert info["selection"]["chosen"]["validation_error"] == min(errors.values())


@pytest.fixture(scope="module")
def plain_selection(case):  # noqa: F811
    """One TV weight, prior off: the selection without debias or blend (the image, info) on the tiny case."""
    from engine.recon.fit2d import reconstruct_2d

    kspace, maps, mask, _ = case
    return reconstruct_2d(kspace, maps, mask, selection_config(tv_weights=[1e-4], prior_weights=[0.0]))


def test_selection_without_refit_returns_the_chosen_candidates_image(case):  # noqa: F811
    from engine.recon.fit2d import reconstruct_2d

    kspace, maps, mask, _ = case
    config = selection_config(tv_weights=[1e-4], prior_weights=[0.0, 0.1], refit=False)
    result, info = reconstruct_2d(kspace, maps, mask, config, prior=TinyDenoiser())
    assert np.array_equal(result, info["unrefit_image"]) and "refit_seconds" not in info["selection"]


def test_debias_scales_the_refits_unmeasured_bands_by_the_candidates_held_out_gains(case, plain_selection):  # noqa: F811
    """No extra run: the same candidates and refit as without debias; the returned image is the refit
    with gain_map applied, and the gains are what band_sums says of the chosen candidate's image."""
    import torch

    from engine.physics.fft import fftc
    from engine.recon.debias3d import (
        apply_band_gains,
        band_sums,
        gain_map,
        gains_from_sums,
        radial_bands,
    )
    from engine.recon.fit2d import reconstruct_2d

    kspace, maps, mask, _ = case
    plain_image, plain = plain_selection
    image, info = reconstruct_2d(kspace, maps, mask, selection_config(tv_weights=[1e-4], prior_weights=[0.0],
                                                                      debias=True, debias_band_edges=[0.5]))
    np.testing.assert_array_equal(info["image_without_debias"], plain_image)
    np.testing.assert_array_equal(info["unrefit_image"], plain["unrefit_image"])
    bands = radial_bands(mask.shape, [0.5])
    _, held = split_holdout(mask, 0.1, 0)
    as_t = lambda a: torch.from_numpy(np.asarray(a))
    gains = gains_from_sums(band_sums(as_t(plain["unrefit_image"])[None], as_t(kspace)[None], as_t(maps)[None],
                                      as_t(held > 0), as_t(bands), 2))
    assert info["selection"]["debias"] == {"gains": pytest.approx(gains), "band_edges": [0.5]}
    np.testing.assert_allclose(image, apply_band_gains(plain_image[None], gain_map(gains, bands, mask))[0], atol=1e-6)
    measured = mask > 0  # the data's points are left as the refit had them
    np.testing.assert_allclose(fftc(as_t(image))[measured], fftc(as_t(plain_image))[measured], atol=1e-5)
    with pytest.raises(ValueError, match="debias_band_edges"):
        SelectionConfig(debias_band_edges=(0.5, 0.5))


def test_blend_mixes_in_the_l1_wavelet_at_the_weight_the_candidate_wants_on_held_out_samples(case, plain_selection):  # noqa: F811
    """No extra fit: the same candidates and refit as without the blend; the weight minimises the chosen
    candidate's held-out error blended with the L1-wavelet of the fit samples (checked on a grid), and the
    returned image is the refit blended at that weight with the L1-wavelet of all samples."""
    import torch

    from engine.evaluation.baselines import l1_wavelet
    from engine.physics.sense import forward
    from engine.recon.fit2d import reconstruct_2d

    kspace, maps, mask, _ = case
    plain_image, plain = plain_selection
    image, info = reconstruct_2d(kspace, maps, mask, selection_config(tv_weights=[1e-4], prior_weights=[0.0],
                                                                      blend_l1_wavelet=True))
    np.testing.assert_array_equal(info["image_without_blend"], plain_image)
    blend = info["selection"]["blend"]
    weight = blend["best_weight"]
    fit_mask, held = split_holdout(mask, 0.1, 0)
    candidate, l1_fit = plain["unrefit_image"], l1_wavelet(kspace, maps, fit_mask)

    def held_out_error(w: float) -> float:
        image = torch.from_numpy(((1 - w) * candidate + w * l1_fit).astype(np.complex64))
        residual = (forward(image, torch.from_numpy(maps)).numpy() - kspace) * (held > 0)
        return float(np.sum(np.abs(residual) ** 2) / np.sum(np.abs(kspace * (held > 0)) ** 2))

    assert 0 < weight < 1  # this case wants some of each, so the minimum is not a clipped end
    grid = np.linspace(0, 1, 201)
    assert weight == pytest.approx(grid[int(np.argmin([held_out_error(w) for w in grid]))], abs=0.01)
    assert blend["validation_error"] == pytest.approx(held_out_error(weight), rel=1e-4)
    assert blend["candidate_validation_error"] == pytest.approx(held_out_error(0.0), rel=1e-4)
    # taken only if the gain exceeds its standard error
    gain = blend["candidate_validation_error"] - blend["validation_error"]
    assert blend["l1_wavelet_weight"] == (weight if gain > blend["standard_error"] else 0.0)
    taken = blend["l1_wavelet_weight"]
    expected = (1 - taken) * plain_image + taken * l1_wavelet(kspace, maps, mask)
    np.testing.assert_allclose(image, expected, atol=1e-6 * np.abs(expected).max())


def fully_sampled_case(path):
    """A smooth 32 x 32 object with 4 coils, fully sampled, saved as .npy (as in test_recon2d)."""
    y, x = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
    image = (np.exp(-(x ** 2 + y ** 2) * 3) * (1 + 0.3 * (x > 0))).astype(np.complex64)
    maps = np.stack([np.exp(-((x - cx) ** 2 + (y - cy) ** 2)) for cx, cy in [(-1, 0), (1, 0), (0, 1), (0, -1)]])
    coil_images = (maps * image).astype(np.complex64)
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil_images, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    np.save(path, kspace.astype(np.complex64))
    return path


def test_job_records_the_choice_in_metrics_json(tmp_path):
    from engine.recon.job2d import recon2d_job

    source = fully_sampled_case(tmp_path / "case.npy")
    config = small_config(optim={"steps": 60}, selection={"enabled": True, "tv_weights": [1e-4, 1e-3],
                                                          "validate_every": 10, "min_steps": 30})
    recon2d_job(config, str(tmp_path / "run"), str(source), acceleration=3.0, seed=0, calib_width=12,
                compare=("inr",))
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())["methods"]
    selection = written["infusion"]["selection"]
    assert selection["chosen"]["prior_weight"] == 0.0  # the config's prior is off: non-zero weights skipped
    assert [c["tv_weight"] for c in selection["candidates"]] == [1e-4, 1e-3]
    assert all(c["curve"] for c in selection["candidates"]) and "selection" not in written["inr"]


def test_auto2d_is_demo2d_plus_the_selection_section():
    """configs/auto2d.yaml must not drift from the fixed fast mode it chooses around."""
    import dataclasses
    from pathlib import Path

    from engine.config import load_config
    from engine.recon.fit2d import Recon2DConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    auto = load_config(Recon2DConfig, configs / "auto2d.yaml", [])
    fixed = load_config(Recon2DConfig, configs / "demo2d.yaml", [])
    assert auto.selection.enabled and dataclasses.replace(auto, selection=fixed.selection) == fixed
    assert fixed.regularisers.tv_weight in auto.selection.tv_weights
    assert fixed.prior.weight_start in auto.selection.prior_weights and 0.0 in auto.selection.prior_weights


def test_launcher_turns_the_selection_on_with_set(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    import yaml

    from engine.config import config_to_dict

    path = Path(__file__).resolve().parents[1] / "launch" / "recon2d.py"
    spec = importlib.util.spec_from_file_location("launch_recon2d", path)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    config_file = tmp_path / "small.yaml"
    config_file.write_text(yaml.safe_dump(config_to_dict(small_config(optim={"steps": 40}))))
    source = fully_sampled_case(tmp_path / "case.npy")
    code = launcher.main([str(source), "--out", str(tmp_path / "run"), "--config", str(config_file), "--accel", "3",
                          "--calib-width", "12", "--compare", "--set", "selection.enabled=true",
                          "--set", "selection.tv_weights=[1e-4, 1e-3]", "--set", "selection.min_steps=20"])
    assert code == 0 and "chosen on held-out k-space" in capsys.readouterr().out
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())["methods"]["infusion"]
    assert len(written["selection"]["candidates"]) == 2


def test_refit_for_all_steps_runs_optim_steps_after_the_same_choice(case):  # noqa: F811
    """refit_steps 'all': the candidates and the choice are those of 'chosen'; only the refit runs on, to optim.steps."""
    from engine.config import load_config
    from engine.recon.fit2d import Recon2DConfig, reconstruct_2d

    kspace, maps, mask, _ = case
    rng = np.random.default_rng(1)  # noise, so that the held-out error turns up before optim.steps (80)
    noise = rng.standard_normal(kspace.shape) + 1j * rng.standard_normal(kspace.shape)
    kspace = (kspace + 0.3 * np.abs(kspace).std() * noise * mask).astype(np.complex64)
    runs = {steps: reconstruct_2d(kspace, maps, mask, selection_config(tv_weights=[1e-4], prior_weights=[0.0],
                                                                       refit_steps=steps))
            for steps in ("chosen", "all")}
    (chosen_image, chosen), (image, info) = runs["chosen"], runs["all"]
    assert chosen["steps"] == chosen["selection"]["refit_steps_run"] == chosen["selection"]["chosen"]["steps"] < 80
    np.testing.assert_array_equal(info["unrefit_image"], chosen["unrefit_image"])
    assert info["selection"]["chosen"] == chosen["selection"]["chosen"]
    assert info["steps"] == info["selection"]["refit_steps_run"] == 80 and not np.array_equal(image, chosen_image)
    with pytest.raises(ValueError, match="refit_steps"):
        load_config(Recon2DConfig, None, ["selection.refit_steps=longest"])
