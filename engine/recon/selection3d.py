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
   also refined (engine.recon.refine3d, from the same fit samples) and scored;
3. the factor, and refinement or none, whose output has the lowest held-out error wins (the runs keep
   their full schedule, so the end is what the final run returns);
4. run_recon3d then reconstructs from all measured samples with the chosen factor, and refines its
   output only if a refined candidate won (the refit).
Why the refinement is chosen per case: at 1 mm it lowered the error by 13 % on one head's slab and raised
it by 35 % on another's (benchmarks/results/quality3d.md), so no fixed choice suits every case.
A reference, when the store has one, only adds NRMSE to the curves (benchmarks); it never steers.
In a job (engine.recon.job3d) each candidate run has its own checkpoints (with its curve) and stops on a
preemption signal like the final run; their result is saved (selection.json beside the output) before
the final run starts, so a resumed run continues the candidates or skips them.
"""
from __future__ import annotations

import dataclasses
import math
import time
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
    validation_error, seconds, curve [{step, validation_error[, nrmse_percent]}]
    [, nrmse_percent][, refined {validation_error[, nrmse_percent], seconds}]}],
    chosen {scale, refine (whether the final output is refined), validation_error}.
    """
    from engine.recon.fit3d import Recon3D
    from engine.recon.refine3d import refine_fit
    from engine.recon.selection2d import split_holdout

    selection = cfg.selection
    mask = np.asarray(source.mask, np.float32)
    fit_mask, holdout = split_holdout(mask, selection.holdout_fraction, selection.holdout_seed)
    weights = holdout_weights(mask, holdout, selection.holdout_weighting)
    refines = cfg.refine.anchor_weight > 0
    scores_refine = refines and selection.choose_refine
    candidates, options = [], []  # options: (held-out error, scale, refined) of every scored output
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
        candidates.append({"scale": factor, **{key: getattr(run_cfg, key) for key in REGULARISER_KEYS},
                           "validation_error": final["validation_error"],
                           "seconds": state["seconds_before"] + time.perf_counter() - began, "curve": curve}
                          | ({"nrmse_percent": final["nrmse_percent"]} if "nrmse_percent" in final else {}))
        ctx.print0(f"[recon3d] selection: regularisation x{factor:g}: held-out error "
                   f"{final['validation_error']:.5g}")
        options.append((final["validation_error"], factor, refines and not scores_refine))
        if scores_refine:
            began = time.perf_counter()
            refined = _score(recon, refine_fit(recon, recon.evaluate_slab(), cfg.refine, ctx,
                                               progress=progress and ctx.is_main))
            del refined["step"]
            candidates[-1]["refined"] = refined | {"seconds": time.perf_counter() - began}
            ctx.print0(f"[recon3d] selection: regularisation x{factor:g} refined: held-out error "
                       f"{refined['validation_error']:.5g}")
            options.append((refined["validation_error"], factor, True))
        del recon
    error, scale, refine = min(options, key=lambda option: option[0])  # the first one on a tie
    return {"holdout_fraction": selection.holdout_fraction, "holdout_seed": selection.holdout_seed,
            "fit_samples": int(fit_mask.sum()), "holdout_samples": int(holdout.sum()),
            "candidates": candidates, "chosen": {"scale": scale, "refine": refine, "validation_error": error}}


__all__ = ["Selection3DConfig", "holdout_weights", "reference_nrmse_percent", "scaled_config", "select_regularisation"]
