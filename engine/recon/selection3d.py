"""Label-free choice of the 3D run's regularisation strength from held-out measured samples.

Why: the 3D config's TV, wavelet and readout-TV weights were tuned on one case (the bundled one
at R = 4); their right strength moves with the acceleration, the resolution and the noise, and a
user has no reference to tune against. As in the 2D loop (engine.recon.selection2d), a seeded random
part of the measured (ky, kz) samples (the same part in every readout plane, since the mask is
shared by them) is withheld from the fit and scores it: the relative data-consistency error of
the output volume on those samples, summed over every plane of every rank (optionally weighted
by the inverse sampling density, `holdout_weighting`).

Procedure (`select_regularisation`, collective: every rank runs the same candidates):
1. split the (ky, kz) mask into fit and held-out samples (engine.recon.selection2d.split_holdout);
2. for each factor in `regularisation_scales`, a full run of the config (all its steps) with
   the regulariser weights (REGULARISER_KEYS) multiplied by the factor, on the fit samples; every
   `validate_every` steps and at the end its output is scored on the held-out samples;
   with `choose_refine` and a refinement in the config (refine.anchor_weight > 0), the run's output is
   also refined (engine.recon.refine3d, from the same fit samples) and scored; with `blend_l1_wavelet`,
   each of those outputs is also scored blended with the 3D L1-wavelet solve of the fit samples,
   (1 - w) x output + w x L1-wavelet, at the w in [0, 1] with the lowest held-out error (closed form
   from the held-out Gram matrix of the two);
3. per candidate, the output taken is the first (the fit first, then its refinement, then the blends)
   whose held-out error is within one standard error of the candidate's lowest (the standard error of
   the difference, from its spread over the held-out locations: a post-step must gain more than the
   held-out noise can fake; `one_standard_error_choice`); across candidates the lowest of those wins
   (the runs keep their full schedule, so the end is what the final run returns);
4. run_recon3d then reconstructs from all measured samples with the chosen factor, refines its output
   only if a refined output won, and blends it with the 3D L1-wavelet of all samples at the chosen w.
Why the refinement is chosen per case: at 1 mm it lowered the error by 13 % on one head's slab and raised
it by 35 % on another's (benchmarks/results/quality3d.md), so no fixed choice suits every case. Why the
blend: the INR's errors and the 3D L1-wavelet's differ (their complex mean was below either on two 1 mm
slabs), but not on every head (on a third the INR alone was best), so its weight too is chosen per case.
A reference, when the store has one, only adds NRMSE to the curves (benchmarks); it never steers.
In a job (engine.recon.job3d) each candidate run has its own checkpoints (with its curve) and stops on a
preemption signal like the final run; their result is saved (selection.json beside the output) before
the final run starts, so a resumed run continues the candidates or skips them.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch


@dataclass
class Selection3DConfig:
    """Label-free choice of the regularisation strength of a 3D run (module docstring)."""

    enabled: bool = False
    """choose per case (launch/recon3d.py: --set selection.enabled=true)."""
    holdout_fraction: float = 0.08
    """fraction of the measured (ky, kz) samples withheld from the candidate runs (0 < f < 0.5)."""
    holdout_seed: int = 0
    """seed of the held-out draw (independent of the mask's)."""
    regularisation_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    """candidate factors on the regulariser weights (REGULARISER_KEYS) together; each is one run."""
    validate_every: int = 100
    """steps between held-out checks of a candidate (the validation curve in metrics.json)."""
    holdout_weighting: Literal["uniform", "density"] = "uniform"
    """'density': each held-out sample's error weighted by 1 / the mask's local sampling density
    (variable-density masks hold out mostly central samples; the weights make the score estimate
    the error over all of k-space, i.e. the image error); 'uniform': unweighted."""
    choose_refine: bool = True
    """with refine.anchor_weight > 0: score each candidate with and without the refinement and refine the
    final output only if a refined candidate wins (false: the config's refinement always runs)."""
    blend_l1_wavelet: bool = False
    """also score each output blended with the 3D L1-wavelet solve of the same samples, (1 - w) x output +
    w x L1-wavelet, at the w in [0, 1] that minimises the held-out error (closed form); the final run
    writes the chosen blend (w = 0: the output alone). Costs two 3D L1-wavelet solves."""

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 0.5:
            raise ValueError(f"selection.holdout_fraction must be in (0, 0.5), got {self.holdout_fraction}")
        if not self.regularisation_scales or min(self.regularisation_scales) < 0:
            raise ValueError("selection.regularisation_scales must be a non-empty list of factors >= 0")
        if self.validate_every < 1:
            raise ValueError("selection.validate_every must be >= 1")


REGULARISER_KEYS = ("tv_weight", "wavelet_weight", "tv_x_weight", "wavelet_x_weight")


def scaled_config(cfg, factor: float):
    """`cfg` with its regulariser weights (REGULARISER_KEYS) multiplied by `factor`."""
    return dataclasses.replace(cfg, **{key: getattr(cfg, key) * factor for key in REGULARISER_KEYS})


def holdout_weights(mask: np.ndarray, holdout: np.ndarray, weighting: str) -> np.ndarray:
    """Weights of the held-out samples: 1 ('uniform') or 1 / local sampling density of `mask`
    ('density': the fraction of measured points in a window of about 3 sqrt(R) points a side,
    which holds about 9 samples on average), normalised to mean 1 over the held-out samples."""
    if weighting == "uniform":
        return holdout.astype(np.float32)
    from scipy.ndimage import uniform_filter

    measured = (mask > 0).astype(np.float64)
    side = max(5, 2 * round(1.5 * math.sqrt(measured.size / measured.sum())) + 1)
    inside = uniform_filter(np.ones_like(measured), side, mode="constant")
    density = np.maximum(uniform_filter(measured, side, mode="constant") / inside, 1.0 / side**2)
    weights = np.where(holdout > 0, 1.0 / density, 0.0)
    return (weights / weights[holdout > 0].mean()).astype(np.float32)


def _reference_sums(recon, volume: np.ndarray | None = None) -> torch.Tensor | None:
    """[error, energy] of this rank's output (or `volume`, its slab) against the reference (for NRMSE),
    or None."""
    if recon.reference is None:
        return None
    from engine.recon.job3d import _error_sums

    volume = recon.evaluate_slab() if volume is None else volume
    return torch.tensor(_error_sums(volume, recon.reference, recon.maps_support()), dtype=torch.float64)


def reference_nrmse_percent(recon, volume: np.ndarray | None = None) -> float | None:
    """NRMSE (%) of the whole output (or of `volume`, this rank's slab of another one) against the
    reference over every rank, or None without one (collective; reported only, never used for a choice)."""
    sums = _reference_sums(recon, volume)
    if sums is None:
        return None
    error, energy = recon.ctx.all_reduce_sum(sums).tolist()
    return 100.0 * math.sqrt(error / energy)


def _score(recon, volume: np.ndarray | None = None) -> dict[str, float]:
    """Held-out error (and NRMSE with a reference) of the run's output or of `volume`, this rank's slab."""
    point = {"step": recon.step_index, "validation_error": recon.heldout_error(volume)}
    nrmse = reference_nrmse_percent(recon, volume)
    if nrmse is not None:
        point["nrmse_percent"] = nrmse
    if not math.isfinite(point["validation_error"]):
        point["validation_error"] = float("inf")
    return point


def select_regularisation(cfg, source, ctx, prior=None, progress: bool = False, checkpoints=None) -> dict[str, Any]:
    """Run the candidates of cfg.selection on the fit samples (collective; module docstring).

    checkpoints: a function of the factor that returns the candidate's engine.recon.job3d.FitCheckpoints
    (resumes it, checkpoints it with its curve, stops it on a preemption signal), or None.

    Returns the record saved as selection.json and in metrics.json: holdout_fraction, holdout_seed,
    fit_samples, holdout_samples (per plane), candidates [{scale, the REGULARISER_KEYS' weights,
    validation_error, seconds, curve [{step, validation_error[, nrmse_percent]}][, nrmse_percent],
    outputs [{refine, l1_wavelet_weight, validation_error[, nrmse_percent]}] (every output the final
    run could write)}], [l1_wavelet_3d {validation_error[, nrmse_percent], seconds} with blend_l1_wavelet,]
    chosen {scale, refine, l1_wavelet_weight, validation_error} (the final run's output).
    """
    from engine.recon.fit3d import Recon3D
    from engine.recon.selection2d import split_holdout

    selection = cfg.selection
    mask = np.asarray(source.mask, np.float32)
    fit_mask, holdout = split_holdout(mask, selection.holdout_fraction, selection.holdout_seed)
    weights = holdout_weights(mask, holdout, selection.holdout_weighting)
    candidates, l1_wavelet = [], None
    for factor in selection.regularisation_scales:
        began = time.perf_counter()
        run_cfg = scaled_config(cfg, factor)
        recon = Recon3D(run_cfg, source, ctx, prior=prior, holdout=weights)
        state = {"curve": [], "seconds_before": 0.0}  # what a checkpoint keeps beside the fit
        fit_checkpoints = checkpoints(factor) if checkpoints is not None else None
        if fit_checkpoints is not None:
            state |= fit_checkpoints.start(recon, lambda state=state, began=began: {
                "curve": state["curve"], "seconds_before": state["seconds_before"] + time.perf_counter() - began})

        def after_step(fit, result, state=state, fit_checkpoints=fit_checkpoints) -> None:  # this candidate's
            if fit.step_index % selection.validate_every == 0 or fit.step_index == fit.cfg.steps:
                state["curve"].append(_score(fit))
            if fit_checkpoints is not None:
                fit_checkpoints.after_step(fit, result)

        recon.run_to_end(f"selection x{factor:g}" if progress else None, after_step=after_step)
        curve = state["curve"]
        final = curve[-1]
        ctx.print0(f"[recon3d] selection: regularisation x{factor:g}: held-out error "
                   f"{final['validation_error']:.5g}")
        if selection.blend_l1_wavelet and l1_wavelet is None:  # from the fit samples, the same for every candidate
            l1_began = time.perf_counter()
            from engine.recon.refine3d import l1_wavelet_3d_of

            l1_wavelet = {"volume": l1_wavelet_3d_of(recon, progress and ctx.is_main)}
            l1_wavelet["record"] = _score(recon, l1_wavelet["volume"]) | {"seconds": time.perf_counter() - l1_began}
            del l1_wavelet["record"]["step"]
        outputs, chosen = _scored_outputs(recon, cfg, None if l1_wavelet is None else l1_wavelet["volume"], progress)
        candidates.append({"scale": factor, **{key: getattr(run_cfg, key) for key in REGULARISER_KEYS},
                           "validation_error": final["validation_error"],
                           "seconds": state["seconds_before"] + time.perf_counter() - began, "curve": curve,
                           "outputs": outputs, "chosen_output": chosen}
                          | ({"nrmse_percent": final["nrmse_percent"]} if "nrmse_percent" in final else {}))
        del recon
    # each candidate's output as one_standard_error_choice took it; the lowest of those (the first on a tie)
    scale, best = min(((c["scale"], c["outputs"][c["chosen_output"]]) for c in candidates),
                      key=lambda pair: pair[1]["validation_error"])
    return {"holdout_fraction": selection.holdout_fraction, "holdout_seed": selection.holdout_seed,
            "fit_samples": int(fit_mask.sum()), "holdout_samples": int(holdout.sum()), "candidates": candidates,
            **({"l1_wavelet_3d": l1_wavelet["record"]} if l1_wavelet is not None else {}),
            "chosen": {"scale": scale, "refine": best["refine"], "l1_wavelet_weight": best["l1_wavelet_weight"],
                       "validation_error": best["validation_error"]}}


def blend_weight(gram: np.ndarray) -> float:
    """The weight w in [0, 1] of the second volume in (1 - w) v0 + w v1 that minimises the held-out error
    (1 - w)^2 G00 + 2 w (1 - w) G01 + w^2 G11 of their 2 x 2 held-out Gram matrix (summed over locations)."""
    curvature = gram[0, 0] - 2 * gram[0, 1] + gram[1, 1]  # |r0 - r1|^2 >= 0
    return float(np.clip((gram[0, 0] - gram[0, 1]) / curvature, 0.0, 1.0)) if curvature > 0 else 0.0


def one_standard_error_choice(gram: np.ndarray, options: Sequence[np.ndarray]) -> tuple[int, list[dict[str, float]]]:
    """The first of `options` (the simplest first) whose held-out error is within one standard error of the
    lowest, and each option's {validation_error, standard_error}.

    gram: (n, n, L) held-out Gram matrix per held-out location (Recon3D.heldout_gram); options: coefficient
    vectors over its n volumes (a blend's sum to 1). An option's standard error is that of its difference to
    the lowest option, from the spread of that difference over the L locations (sqrt(L) x their standard
    deviation; the locations are independent draws of the measurement noise). Why: the held-out samples
    carry the noise, so a small gain in held-out error can be chance, and a post-step (refinement, blend) is
    taken only where its gain stands clear of it: the one-standard-error rule of cross-validation.
    """
    per_location = np.array([np.einsum("i,ijl,j->l", a, gram, a) for a in options])
    totals = per_location.sum(1)
    best = int(np.argmin(totals))
    scores = []
    for index in range(len(options)):
        difference = per_location[index] - per_location[best]
        scores.append({"validation_error": float(totals[index]),
                       "standard_error": float(np.sqrt(difference.size) * difference.std())})
    chosen = next(i for i, score in enumerate(scores)
                  if score["validation_error"] <= totals[best] + score["standard_error"])
    return chosen, scores


def _scored_outputs(recon, cfg, l1_wavelet: np.ndarray | None, progress: bool) -> tuple[list[dict], int]:
    """Every output the final run could write from this candidate's fit, scored on the held-out samples,
    and the index of the one `one_standard_error_choice` takes: the fit (unless the config refines and
    choose_refine is off), its refinement (when the config refines), then, with `l1_wavelet` (this rank's
    slab of the fit samples' 3D L1-wavelet), each of those blended with it at the weight that minimises
    the held-out error (collective)."""
    from engine.recon.refine3d import refine_fit

    refines = cfg.refine.anchor_weight > 0
    fit = recon.evaluate_slab()
    bases = []  # (refine, this rank's slab)
    if not refines or cfg.selection.choose_refine:
        bases.append((False, fit))
    if refines:
        bases.append((True, refine_fit(recon, fit, cfg.refine, ctx=recon.ctx, progress=progress and recon.ctx.is_main)))
    volumes = [volume for _, volume in bases] + ([l1_wavelet] if l1_wavelet is not None else [])
    gram = recon.heldout_gram(volumes)
    total = gram.sum(-1)
    n = len(volumes)
    outputs, options = [], []
    for index, (refine, _) in enumerate(bases):
        outputs.append({"refine": refine, "l1_wavelet_weight": 0.0})
        options.append(np.eye(n)[index])
    if l1_wavelet is not None:
        for index, (refine, _) in enumerate(bases):
            weight = blend_weight(total[np.ix_([index, n - 1], [index, n - 1])])
            if weight == 0:  # the output alone, scored above
                continue
            outputs.append({"refine": refine, "l1_wavelet_weight": weight})
            options.append((1 - weight) * np.eye(n)[index] + weight * np.eye(n)[n - 1])
    chosen, scores = one_standard_error_choice(gram, options)
    for output, option, score in zip(outputs, options, scores):
        output |= score
        if recon.reference is not None:  # reported only
            output["nrmse_percent"] = reference_nrmse_percent(recon, sum(c * v for c, v in zip(option, volumes) if c))
        name = ("refined" if output["refine"] else "fit") + (
            f" + {output['l1_wavelet_weight']:.2f} x L1-wavelet" if output["l1_wavelet_weight"] > 0 else "")
        recon.ctx.print0(f"[recon3d] selection:   {name}: held-out error {output['validation_error']:.5g} "
                         f"(standard error of its difference to the lowest {output['standard_error']:.2g})")
    return outputs, chosen


__all__ = ["Selection3DConfig", "holdout_weights", "reference_nrmse_percent", "scaled_config", "select_regularisation"]
