"""Label-free, per-case choices for the 2D fit: a held-out part of the measured k-space decides.

Why: the fast mode's prior weight, TV weight and loss-plateau stop were tuned on two slices; on
slices from other scanners the prior can cost quality, and a user has no reference to tune
against. The measured samples are the only ground truth a user has, so a seeded random part of
them (`holdout_fraction`) is withheld from the fit, and the relative data-consistency error on it,
||M_h F S x - y_h||^2 / ||y_h||^2 (optionally density-weighted, `holdout_weighting`), scores each
candidate: k-space cross-validation, as in self-supervised MRI (SSDU).

Procedure (`select_and_reconstruct_2d`):
1. split the mask into fit and held-out samples (`split_holdout`: disjoint, seeded, union = mask);
2. warm start: the first `warm_start_steps` steps (at most prior.start_step, before which the
   prior is inactive anyway) run once on the fit samples with the config's TV weight and without
   the prior; every candidate continues from a copy of that state;
3. each candidate (TV weight, prior weight) runs on the fit samples; every `validate_every` steps
   the image the run would return (with average_last: the mean of the last images) is scored on
   the held-out samples; the run stops after `patience` checks without a new minimum (not before
   `min_steps`) or at optim.steps. Its score is the minimum, its stop the step of the minimum (the
   loss-plateau early stop of the config is replaced by this);
4. search "tv_then_prior": the TV weights with the prior off, then the non-zero prior weights at
   the chosen TV weight (|tv| + |prior| - 1 runs); "prior_then_tv": the prior weights at the
   config's TV weight, then the TV weights at the chosen prior weight (as many runs; TV is chosen
   beside the prior the image will have, rather than in its place); "grid": every pair
   (|tv| x |prior| runs); with `extend_edges` > 0 (not with grid), a list whose best value is at
   one of its ends grows a geometric step beyond that end (TV both ways, the prior upwards; at most
   `extend_edges` steps per end, `edge_search`): a list cannot know how much regularisation a
   case wants, and the held-out error says when it wanted more or less than the list offered;
5. the lowest score wins (`choose`); with `stronger_prior_weights`, when that is the list's largest prior
   weight, the weights above it are tried in order at the chosen TV weight, each taken only while its
   held-out gain exceeds one standard error over the held-out locations (a stronger prior helped some real
   slices and cost others by less than the held-out noise); with `refit` the chosen settings run again from scratch on
   all measured samples, for the chosen number of steps or (`refit_steps: all`) for optim.steps, and that image
   is returned, else the chosen candidate's image (fit without the held-out samples);
6. with `blend_l1_wavelet`, the returned image is blended with the L1-wavelet solve of all samples at
   the weight that minimises the held-out error of the chosen candidate blended with the L1-wavelet of
   the fit samples, if that gain exceeds its standard error over the held-out locations (the two
   methods' errors are partly unalike; how much of each a case wants is measured, not fixed).
A reference, when given, only adds NRMSE to the validation curves (for benchmarks); it never
steers a choice. The selection runs are not checkpointed (a resumed job starts them again).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch


@dataclass
class SelectionConfig:
    """Label-free choice of TV weight, prior weight and stop from held-out k-space (module docstring)."""

    enabled: bool = False
    """choose per case (launch/recon2d.py: --set selection.enabled=true or configs/auto2d.yaml)."""
    holdout_fraction: float = 0.08
    """fraction of the measured samples withheld from the candidate fits (0 < f < 0.5)."""
    holdout_seed: int = 0
    """seed of the held-out draw (independent of the mask seed)."""
    tv_weights: tuple[float, ...] = (2.5e-4, 5e-4, 1e-3)
    """candidate regularisers.tv_weight values."""
    prior_weights: tuple[float, ...] = (0.0, 0.05, 0.1)
    """candidate constant prior weights (replace prior.weight_start and weight_end; weight_scale is
    kept); 0 = prior off. Non-zero values are skipped when the config's prior.mode is 'off'."""
    search: Literal["tv_then_prior", "prior_then_tv", "grid"] = "tv_then_prior"
    """'tv_then_prior': TV weights with the prior off, then prior weights at the chosen TV weight;
    'prior_then_tv': prior weights at regularisers.tv_weight, then TV weights at the chosen prior weight;
    'grid': every (TV, prior) pair."""
    warm_start_steps: int = 100
    """steps run once and shared by all candidates (capped at prior.start_step and optim.steps - 1;
    0: none)."""
    validate_every: int = 25
    """steps between held-out checks (the stop is chosen on this grid)."""
    patience: int = 3
    """stop a candidate after this many checks without a new minimum of the held-out error."""
    min_steps: int = 200
    """never stop a candidate before this step (counted from 0, warm start included)."""
    refit: bool = True
    """rerun the chosen settings on all measured samples (held-out ones included) and return that."""
    refit_steps: Literal["chosen", "all"] = "chosen"
    """how long the refit runs: 'chosen', the chosen candidate's held-out stop; 'all', optim.steps. Past the
    held-out stop a refit reproduces more of the measured samples' noise: against a noisy fully sampled
    reference that looks better, against the noise-free truth it is not (benchmarks/results/quality2d.md)."""
    holdout_weighting: Literal["uniform", "density"] = "uniform"
    """'density': each held-out sample's error weighted by 1 / the mask's local sampling density
    (engine.recon.selection3d.holdout_weights): a variable-density mask holds out mostly central
    samples, and the weights make the score estimate the error over all of k-space, where the
    image's error lies, rather than over the densely sampled centre."""
    extend_edges: int = 0
    """tv_then_prior and prior_then_tv: when a list's best value is at its end, try up to this many
    geometric steps beyond it (the step: the ratio of the two values at that end; 0: the lists as given)."""
    stronger_prior_weights: tuple[float, ...] = ()
    """prior weights above the list, tried in order when the chosen prior weight is the list's largest
    (tv_then_prior and prior_then_tv, at the chosen TV weight); each is taken only while its held-out gain
    over the weight taken so far exceeds one standard error (engine.recon.selection3d.one_standard_error_choice):
    a stronger prior helps some slices and costs others by less than the held-out noise can resolve."""
    debias: bool = False
    """scale the returned image's unmeasured k-space, per radial band, by the gain that maps the chosen
    candidate's prediction onto the held-out samples (engine.recon.debias3d; no extra run)."""
    debias_band_edges: tuple[float, ...] = (0.25, 0.5, 0.75)
    """debias: inner edges of the radial bands in |k| over the Nyquist radius (as debias.band_edges in 3D)."""
    blend_l1_wavelet: bool = False
    """return (1 - w) x the image + w x the L1-wavelet (engine.evaluation.baselines.l1_wavelet, the rule's
    lamda) of all samples, w in [0, 1] minimising the held-out error of the chosen candidate blended with the
    L1-wavelet of the fit samples (closed form; engine.recon.selection3d.blend_weight, as the 3D selection);
    w = 0 unless that blend's gain exceeds its standard error (engine.recon.selection3d.one_standard_error_choice)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 0.5:
            raise ValueError(f"selection.holdout_fraction must be in (0, 0.5), got {self.holdout_fraction}")
        if not self.tv_weights or not self.prior_weights:
            raise ValueError("selection.tv_weights and selection.prior_weights must not be empty")
        if min(self.tv_weights) < 0 or min(self.prior_weights) < 0:
            raise ValueError("selection weights must be >= 0")
        if self.validate_every < 1 or self.patience < 1 or self.warm_start_steps < 0:
            raise ValueError("selection.validate_every and patience must be >= 1, warm_start_steps >= 0")
        if self.extend_edges < 0 or (self.extend_edges and self.search == "grid"):
            raise ValueError("selection.extend_edges must be >= 0, and 0 with search 'grid'")
        stronger = list(self.stronger_prior_weights)
        if stronger and (self.search == "grid" or stronger != sorted(set(stronger))
                         or stronger[0] <= max(self.prior_weights)):
            raise ValueError("selection.stronger_prior_weights must increase, start above the largest of "
                             f"selection.prior_weights ({max(self.prior_weights)}) and not be used with search "
                             f"'grid', got {stronger}")
        from engine.recon.debias3d import check_band_edges

        check_band_edges(self.debias_band_edges, "selection.debias_band_edges")


def split_holdout(mask: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the measured samples of `mask` `(ny, nx)` into (fit_mask, holdout_mask), float32 0/1.

    A uniform random `fraction` of the measured points (seeded by `seed`) is held out; the two
    masks are disjoint and their sum is the mask.
    """
    measured = np.flatnonzero(np.asarray(mask).ravel() > 0)
    count = round(fraction * measured.size)
    if count < 1 or count >= measured.size:
        raise ValueError(f"holding out {fraction} of {measured.size} measured samples leaves none to "
                         f"{'hold out' if count < 1 else 'fit'}")
    held = np.random.default_rng(seed).choice(measured, count, replace=False)
    holdout = np.zeros(np.asarray(mask).size, np.float32)
    holdout[held] = 1.0
    holdout = holdout.reshape(np.shape(mask))
    return (np.asarray(mask) > 0).astype(np.float32) - holdout, holdout


def choose(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the lowest held-out error (the first one on a tie)."""
    return min(candidates, key=lambda c: c["validation_error"])


def edge_search(score: Callable[[float], float], values: Sequence[float], extend_edges: int,
                downwards: bool = True) -> float:
    """The value of lowest `score` among `values`, extended at the ends (SelectionConfig.extend_edges).

    `score` runs (or looks up) one candidate. While the best value tried is the largest (or, with
    `downwards`, the smallest non-zero one) and fewer than `extend_edges` steps were taken at that
    end, one more value a step beyond it is scored; the step is the ratio of the two values at that
    end (2 when there is no such pair). Ties go to the value scored first.
    """
    scores = {value: score(value) for value in values}
    steps = {"up": 0, "down": 0}
    while True:
        best = min(scores, key=scores.get)
        tried = sorted(scores)
        if best == tried[-1] and best > 0 and steps["up"] < extend_edges:
            ratio = tried[-1] / tried[-2] if len(tried) > 1 and tried[-2] > 0 else 2.0
            new, steps["up"] = best * ratio, steps["up"] + 1
        elif downwards and best == tried[0] and best > 0 and steps["down"] < extend_edges:
            ratio = tried[1] / tried[0] if len(tried) > 1 else 2.0
            new, steps["down"] = best / ratio, steps["down"] + 1
        else:
            return best
        scores[new] = score(new)


def candidate_config(config, tv_weight: float, prior_weight: float):
    """`config` with this TV weight, this constant prior weight (0: prior off) and no loss-plateau stop."""
    prior = (dataclasses.replace(config.prior, mode="off") if prior_weight == 0 else
             dataclasses.replace(config.prior, weight_start=prior_weight, weight_end=prior_weight))
    return dataclasses.replace(
        config, prior=prior, regularisers=dataclasses.replace(config.regularisers, tv_weight=tv_weight),
        early_stop=dataclasses.replace(config.early_stop, enabled=False),
        selection=dataclasses.replace(config.selection, enabled=False), progress=False)


class _Scorer:
    """sum w |F S x - y|^2 / sum w |y|^2 over the held-out samples (weights w; engine.recon.selection3d.
    holdout_weights), in the data's units, plus NRMSE when a reference is given."""

    def __init__(self, kspace_t, maps_t, weights_t, reference, support):
        self.kspace, self.maps, self.weights = kspace_t, maps_t, weights_t
        self.energy = float((weights_t * kspace_t.abs().square()).sum())
        self.reference, self.support = reference, support

    def __call__(self, image: torch.Tensor, step: int) -> dict[str, float]:
        from engine.physics.sense import forward

        residual = float((self.weights * (forward(image, self.maps) - self.kspace).abs().square()).sum())
        error = residual / self.energy
        point = {"step": step, "validation_error": error if np.isfinite(error) else float("inf")}
        if self.reference is not None:
            from engine.recon.fit2d import _nrmse

            point["nrmse_percent"] = _nrmse(image, self.reference, self.support)
        return point

    def gram(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """G[i, j, l] = Re w conj(r_i) r_j / sum w |y|^2 at the l-th held-out location, summed over coils, of
        the images' residuals r_i = F S x_i - y: a blend sum_i a_i x_i with sum_i a_i = 1 scores
        a^T G.sum(-1) a (as engine.recon.fit3d.Recon3D.heldout_gram)."""
        from engine.physics.sense import forward

        held = self.weights > 0
        residuals = [forward(image, self.maps) - self.kspace for image in images]
        return np.array([[(self.weights * a.conj() * b).real.sum(0)[held].double().cpu().numpy() / self.energy
                          for b in residuals] for a in residuals])


def _run_candidate(fit, selection: SelectionConfig, scorer: _Scorer) -> dict[str, Any]:
    """Step `fit` with held-out checks until the patience stop or optim.steps (module docstring, 3)."""
    curve, best, best_image, since_best = [], None, None, 0
    while fit.stopped is None:
        fit.step()
        if fit.next_step % selection.validate_every and fit.stopped is None:
            continue
        image = fit.final_image()
        point = scorer(image, fit.next_step)
        curve.append(point)
        if best is None or point["validation_error"] < best["validation_error"]:
            best, best_image, since_best = point, image, 0
        else:
            since_best += 1
        if since_best >= selection.patience and fit.next_step >= selection.min_steps:
            break
    result = {"validation_error": best["validation_error"], "stop_step": best["step"],
              "steps_run": fit.next_step, "prior_evals": fit.prior_evals, "skipped_steps": fit.guard.total,
              "curve": curve}
    if "nrmse_percent" in best:
        result["nrmse_percent"] = best["nrmse_percent"]
    return result | {"image": best_image}


def select_and_reconstruct_2d(kspace: Any, maps: Any, mask: Any, config, reference: Any = None,
                              support: Any = None, prior: torch.nn.Module | None = None
                              ) -> tuple[np.ndarray, dict[str, Any]]:
    """Choose TV weight, prior weight and stop on held-out k-space, then (optionally) refit.

    Args as engine.recon.fit2d.reconstruct_2d (`config.selection` holds the choices).
    Returns:
        image `(ny, nx)` complex64 in the units of `kspace` (the refit, or the chosen candidate's
        image without refit), and info: seconds, steps (of the returned image's run), prior_evals
        (all runs), stopped ("selection"), history (the refit's), scale, skipped_steps, config,
        unrefit_image (the chosen candidate's image, fit without the held-out samples) and
        selection: {holdout_fraction, holdout_seed, fit_samples, holdout_samples, search,
        warm_start_steps, candidates: [{tv_weight, prior_weight, validation_error, stop_step,
        steps_run, prior_evals, seconds, curve: [{step, validation_error[, nrmse_percent]}]
        [, nrmse_percent]}], chosen: {tv_weight, prior_weight, steps, validation_error}, refit
        [, refit_steps_run] [, refit_curve: [{step, nrmse_percent}] (with a reference)] [, blend:
        {l1_wavelet_weight (0 unless taken), best_weight, validation_error (of the candidate's blend at
        best_weight), standard_error (of its difference to the candidate's), candidate_validation_error,
        l1_wavelet_validation_error, seconds}]} [, image_without_blend].
    """
    from engine.config import config_to_dict
    from engine.recon.fit2d import INRFit2D, _as_tensor, _nrmse, load_prior_for, resolve_device

    selection = config.selection
    start = time.perf_counter()
    device = resolve_device(config.device)
    kspace_t = _as_tensor(kspace, "kspace", True, device)
    maps_t = _as_tensor(maps, "maps", True, device)
    mask_np = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, np.float32)
    fit_mask, holdout = split_holdout(mask_np, selection.holdout_fraction, selection.holdout_seed)
    fit_mask_t = _as_tensor(fit_mask, "mask", False, device)
    reference = None if reference is None else np.asarray(reference)
    support = None if support is None else np.asarray(support)
    from engine.recon.selection3d import holdout_weights

    weights_t = _as_tensor(holdout_weights(mask_np, holdout, selection.holdout_weighting), "mask", False, device)
    scorer = _Scorer(kspace_t, maps_t, weights_t, reference, support)

    prior_on = config.prior.mode != "off"
    prior_weights = [w for w in selection.prior_weights if prior_on or w == 0] or [0.0]
    if prior_on and any(w > 0 for w in prior_weights) and prior is None:
        prior = load_prior_for(config.prior, device)  # loaded once, shared by every candidate

    # the prior is inactive before prior.start_step, so a warm start up to it costs no candidate a prior step
    warm_steps = min(selection.warm_start_steps, config.prior.start_step if prior_on else config.optim.steps,
                     config.optim.steps - 1)
    warm_state = None
    if warm_steps > 0:
        trunk = INRFit2D(kspace_t, maps_t, fit_mask_t, candidate_config(config, config.regularisers.tv_weight, 0.0),
                         device, None, None, None)
        while trunk.next_step < warm_steps and trunk.stopped is None:
            trunk.step()
        warm_state = trunk.state_dict(0.0)
    warm_seconds = time.perf_counter() - start

    candidates: list[dict[str, Any]] = []
    images: list[torch.Tensor] = []

    def run(tv_weight: float, prior_weight: float) -> float:
        """The held-out error of one candidate (run once: a repeated pair is looked up)."""
        for candidate in candidates:
            if (candidate["tv_weight"], candidate["prior_weight"]) == (tv_weight, prior_weight):
                return candidate["validation_error"]
        began = time.perf_counter()
        fit = INRFit2D(kspace_t, maps_t, fit_mask_t, candidate_config(config, tv_weight, prior_weight),
                       device, prior, None, None)
        if warm_state is not None:
            fit.load_state_dict(copy.deepcopy(warm_state))
        result = _run_candidate(fit, selection, scorer)
        images.append(result.pop("image"))
        candidates.append({"tv_weight": tv_weight, "prior_weight": prior_weight, **result,
                           "seconds": time.perf_counter() - began})
        return result["validation_error"]

    if selection.search == "grid":
        for tv_weight in selection.tv_weights:
            for prior_weight in prior_weights:
                run(tv_weight, prior_weight)
    elif selection.search == "prior_then_tv":
        prior_chosen = edge_search(lambda weight: run(config.regularisers.tv_weight, weight), prior_weights,
                                   selection.extend_edges if prior_on else 0, downwards=False)
        edge_search(lambda tv: run(tv, prior_chosen), selection.tv_weights, selection.extend_edges)
    else:
        first_prior = 0.0 if 0.0 in prior_weights else prior_weights[0]
        tv_chosen = edge_search(lambda tv: run(tv, first_prior), selection.tv_weights, selection.extend_edges)
        # the prior list grows upwards only: its bottom is 0 (off) or the smallest weight worth a prior step;
        # first_prior leads so that a tie goes to the candidate the TV stage already ran
        edge_search(lambda weight: run(tv_chosen, weight), [first_prior, *prior_weights],
                    selection.extend_edges if prior_on else 0, downwards=False)
    chosen = choose(candidates)
    stronger = []
    if prior_on and selection.stronger_prior_weights and chosen["prior_weight"] == max(prior_weights):
        chosen, stronger = _stronger_prior(chosen, selection.stronger_prior_weights, run, candidates, images, scorer)
    unrefit_image = images[candidates.index(chosen)]
    record = {"holdout_fraction": selection.holdout_fraction, "holdout_seed": selection.holdout_seed,
              "fit_samples": int(fit_mask.sum()), "holdout_samples": int(holdout.sum()),
              "search": selection.search, "holdout_weighting": selection.holdout_weighting,
              "extend_edges": selection.extend_edges, "warm_start_steps": warm_steps,
              "warm_start_seconds": warm_seconds,
              "candidates": candidates,
              "chosen": {key: chosen[key] for key in ("tv_weight", "prior_weight", "validation_error")}
              | {"steps": chosen["stop_step"]},
              "refit": selection.refit}
    if stronger:
        record["stronger_prior"] = stronger
    prior_evals = sum(c["prior_evals"] for c in candidates)
    skipped = sum(c["skipped_steps"] for c in candidates)
    history: list[dict[str, Any]] = []
    image, scale, steps = unrefit_image, None, chosen["stop_step"]
    if selection.refit:
        began = time.perf_counter()
        mask_t = _as_tensor(mask_np, "mask", False, device)
        refit = INRFit2D(kspace_t, maps_t, mask_t, candidate_config(config, chosen["tv_weight"], chosen["prior_weight"]),
                         device, prior, reference, support)
        refit_stop = chosen["stop_step"] if selection.refit_steps == "chosen" else config.optim.steps
        curve = []  # with a reference (benchmarks): the refit's NRMSE on the held-out check grid
        while refit.next_step < refit_stop and refit.stopped is None:
            refit.step()
            if reference is not None and refit.next_step % selection.validate_every == 0:
                curve.append({"step": refit.next_step, "nrmse_percent": _nrmse(refit.final_image(), reference, support)})
        if curve:
            record["refit_curve"] = curve
        steps = record["refit_steps_run"] = refit.next_step
        image, history, prior_evals = refit.final_image(), refit.history, prior_evals + refit.prior_evals
        scale, skipped = refit.scale, skipped + refit.guard.total
        record["refit_seconds"] = time.perf_counter() - began
    image_without_debias = None
    if selection.debias:
        from engine.recon.debias3d import debiased

        image_without_debias = image
        corrected, gains = debiased(image[None], unrefit_image[None], kspace_t[None], maps_t[None], mask_np, holdout,
                                    selection.debias_band_edges)
        image = torch.from_numpy(corrected[0]).to(image.device)
        record["debias"] = {"gains": gains, "band_edges": list(selection.debias_band_edges)}
    image_without_blend = None
    if selection.blend_l1_wavelet:
        image_without_blend = image
        image, record["blend"] = _blended(image, unrefit_image, kspace_t, maps_t, mask_np, fit_mask, scorer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info = {"seconds": time.perf_counter() - start, "steps": steps, "prior_evals": prior_evals,
            "scale": scale, "stopped": "selection", "skipped_steps": skipped, "last_change": float("nan"),
            "history": history, "resumed_from": None, "config": config_to_dict(config),
            "unrefit_image": unrefit_image.cpu().numpy(), "selection": record}
    if image_without_debias is not None:
        info["image_without_debias"] = image_without_debias.cpu().numpy()
    if image_without_blend is not None:
        info["image_without_blend"] = image_without_blend.cpu().numpy()
    return image.cpu().numpy(), info


def _stronger_prior(chosen: dict[str, Any], weights: Sequence[float], run: Callable[[float, float], float],
                    candidates: list[dict[str, Any]], images: list[torch.Tensor], scorer: _Scorer
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """SelectionConfig.stronger_prior_weights: the candidate taken and, per weight tried, {prior_weight, taken,
    validation_error, standard_error (of its difference to the lower of the two)}."""
    from engine.recon.selection3d import one_standard_error_choice

    tried = []
    for weight in weights:
        run(chosen["tv_weight"], weight)
        stronger = next(c for c in candidates if (c["tv_weight"], c["prior_weight"]) == (chosen["tv_weight"], weight))
        gram = scorer.gram([images[candidates.index(chosen)], images[candidates.index(stronger)]])
        taken, scores = one_standard_error_choice(gram, [np.array([1.0, 0.0]), np.array([0.0, 1.0])])
        tried.append({"prior_weight": weight, "taken": taken == 1, "validation_error": scores[1]["validation_error"],
                      "standard_error": max(score["standard_error"] for score in scores)})
        if taken == 0:
            break
        chosen = stronger
    return chosen, tried


def _blended(image: torch.Tensor, candidate: torch.Tensor, kspace_t: torch.Tensor, maps_t: torch.Tensor,
             mask: np.ndarray, fit_mask: np.ndarray, scorer: _Scorer) -> tuple[torch.Tensor, dict[str, Any]]:
    """`image` blended with the L1-wavelet of all samples at the weight the chosen `candidate` (fit without the
    held-out samples) wants against the L1-wavelet of the fit samples (SelectionConfig.blend_l1_wavelet)."""
    from engine.evaluation.baselines import l1_wavelet
    from engine.recon.selection3d import blend_weight, one_standard_error_choice

    began = time.perf_counter()
    kspace, maps = kspace_t.cpu().numpy(), maps_t.cpu().numpy()
    l1_fit = torch.from_numpy(l1_wavelet(kspace, maps, fit_mask)).to(image.device)
    gram = scorer.gram([candidate, l1_fit])
    weight = blend_weight(gram.sum(-1))
    # the blend only where its gain stands clear of the held-out noise (as the 3D selection's post-steps)
    taken, scores = one_standard_error_choice(gram, [np.array([1.0, 0.0]), np.array([1 - weight, weight])])
    chosen_weight = weight if taken == 1 else 0.0
    l1_all = torch.from_numpy(l1_wavelet(kspace, maps, mask)).to(image.device) if chosen_weight > 0 else 0.0
    return (1 - chosen_weight) * image + chosen_weight * l1_all, {
        "l1_wavelet_weight": chosen_weight, "best_weight": weight,
        "validation_error": scores[1]["validation_error"], "standard_error": max(s["standard_error"] for s in scores),
        "candidate_validation_error": scores[0]["validation_error"],
        "l1_wavelet_validation_error": float(gram.sum(-1)[1, 1]),
        "seconds": time.perf_counter() - began}


__all__ = ["SelectionConfig", "candidate_config", "choose", "edge_search", "select_and_reconstruct_2d", "split_holdout"]
