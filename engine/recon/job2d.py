"""One 2D job: read a slice, undersample it, reconstruct with INFusion and the comparisons, write
the run folder (the work behind launch/recon2d.py).

The loop itself is engine.recon.fit2d.reconstruct_2d.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from engine.recon.fit2d import Recon2DConfig, RegularisersConfig, reconstruct_2d

COMPARISONS = ("zero_filled", "l1_wavelet", "inr")


def plain_inr_config(config: Recon2DConfig) -> Recon2DConfig:
    """The same run with the prior, every regulariser and the label-free selection off: the unregularised INR."""
    return dataclasses.replace(config, prior=dataclasses.replace(config.prior, mode="off"),
                               regularisers=RegularisersConfig(),
                               selection=dataclasses.replace(config.selection, enabled=False))


def recon2d_job(config: Recon2DConfig, out_dir: str, input_path: str | None = None,
                slice_index: int | None = None, mask_kind: str = "poisson", acceleration: float = 6.0,
                calib: int | None = None, seed: int | None = None, mask_file: str | None = None,
                sampling: str = "auto", calib_width: int = 24, compare: tuple[str, ...] = COMPARISONS,
                overwrite: bool = False, resume: bool = False) -> dict[str, dict]:
    """Reconstruct one 2D case with INFusion (and the comparisons) and write the run folder.

    Input: `input_path` (anything engine.io.readers.read_input reads; a fastMRI volume needs
    `slice_index`) or, when None, the bundled example (engine.io.examples.bundled_case_2d). A fully
    sampled input is undersampled with `make_mask(mask_kind, acceleration, calib, seed)` (seed None:
    derived from the case name) and scored against its coil-combined image (ESPIRiT maps from the
    centre unless the input carries maps) inside the maps' support; an undersampled input keeps its
    own mask and gets images only.
    Writes to `out_dir` (refused when not empty unless `overwrite`): recon_<method>.npy,
    mask/reference/support .npy, metrics.json (per method nrmse_percent, psnr_db, ssim, seconds,
    prior_evals, skipped_steps; with config.selection.enabled, infusion also gets `selection`: what
    the held-out samples chose and every candidate's validation curve), comparison.png, config.yaml (the resolved config) and
    history.json; metrics.json is written last, so a folder without it is incomplete. While the
    INR fits run, their checkpoints live in `out_dir/checkpoints/<method>` (deleted once the run is
    complete); `resume` continues an interrupted run from them (a SIGTERM / SIGUSR1 checkpoints
    and raises engine.runtime.preemption.Preempted).
    Returns the per-method metrics.
    """
    import json
    import shutil

    from engine.config import save_config
    from engine.evaluation.baselines import (
        FULLY_SAMPLED_FRACTION,
        espirit_reference,
        run_baselines,
        zero_filled,
    )
    from engine.evaluation.report import prepare_output_dir, write_run
    from engine.physics.coils import espirit_maps, support_mask
    from engine.physics.masks import achieved_acceleration, make_mask, seed_from_case

    unknown = set(compare) - set(COMPARISONS)
    if unknown:
        raise ValueError(f"unknown comparison methods {sorted(unknown)}; choose from {list(COMPARISONS)}")
    if sampling not in ("auto", "full", "undersampled"):
        raise ValueError(f"sampling must be 'auto', 'full' or 'undersampled', got {sampling!r}")
    out = Path(out_dir)
    if resume and (out / "metrics.json").is_file():
        print(f"[recon2d] {out} is already complete; nothing to resume")
        return json.loads((out / "metrics.json").read_text())["methods"]
    out = prepare_output_dir(out_dir, overwrite or (resume and (out / "checkpoints").is_dir()))  # fail early
    checkpoints = out / "checkpoints"
    if not resume and checkpoints.is_dir():  # --overwrite: a fresh run must not resume stale state
        shutil.rmtree(checkpoints)
    if input_path is None:
        from engine.io.examples import bundled_case_2d

        case = bundled_case_2d()
        kspace, file_maps, file_mask, name = case["kspace"], case["maps"], None, case["name"]
        source = f"bundled example {case['path']} ({case['description']})"
    else:
        from engine.io.data import derive_mask
        from engine.io.readers import read_input

        data = read_input(input_path, slice_index=slice_index)
        if data.layout != "2d":
            hint = " (pass --slice)" if data.layout == "2d-stack" else ""
            raise ValueError(f"{input_path}: recon2d reconstructs one 2D slice (coils, ny, nx); got layout "
                             f"{data.layout!r} with k-space {data.kspace.shape}{hint}")
        kspace, file_maps, name, source = data.kspace, data.maps, Path(input_path).name, str(input_path)
        file_mask = data.mask if data.mask is not None else derive_mask(data.kspace, "2d", str(input_path))
    kspace = np.asarray(kspace, dtype=np.complex64)
    fully_sampled = sampling == "full" or (sampling == "auto" and (
        file_mask is None or (float(np.mean(file_mask)) >= FULLY_SAMPLED_FRACTION and bool(np.all(file_mask)))))
    reference = None
    if fully_sampled:
        # the mask (an unreachable R or a user's file may be refused) before the ESPIRiT maps, the slow part
        mask_seed = seed_from_case(name) if seed is None else seed
        mask = make_mask(mask_kind, kspace.shape[1:], acceleration, calib, mask_seed, path=mask_file)
        if file_maps is not None:
            maps = np.asarray(file_maps, dtype=np.complex64)
            reference, support = zero_filled(kspace, maps), support_mask(maps).astype(bool)
        else:
            maps, reference, support = espirit_reference(kspace, calib_width)
    else:
        mask = np.asarray(file_mask, dtype=np.float32)
        maps = (np.asarray(file_maps, dtype=np.complex64) if file_maps is not None
                else espirit_maps(kspace * mask, calib_width))
        support = support_mask(maps).astype(bool)
        mask_seed = None

    baselines = tuple(m for m in ("zero_filled", "l1_wavelet") if m in compare)
    results = run_baselines(kspace, maps, mask, baselines, reference, support) if baselines else {}
    histories = {}
    runs = ([("inr", plain_inr_config(config))] if "inr" in compare else []) + [("infusion", config)]
    for method, run_config in runs:
        image, info = reconstruct_2d(kspace, maps, mask, run_config, reference, support,
                                     checkpoint_dir=checkpoints / method, resume=resume)
        results[method] = {"image": image, "seconds": info["seconds"], "prior_evals": info["prior_evals"],
                           "steps": info["steps"], "stopped": info["stopped"],
                           "skipped_steps": info["skipped_steps"]}
        if "selection" in info:  # what the held-out samples chose, with every candidate's validation curve
            results[method]["selection"] = info["selection"]
        histories[method] = info["history"]
    for result in results.values():
        result.setdefault("prior_evals", 0)
    metadata = {
        "input": source, "slice_index": slice_index, "kspace_shape": list(kspace.shape),
        "fully_sampled_input": bool(fully_sampled),
        "mask": {"kind": mask_kind if fully_sampled else "from input", "requested_acceleration":
                 acceleration if fully_sampled else None, "calib": calib, "seed": mask_seed,
                 "achieved_acceleration": achieved_acceleration(mask)},
        "maps": "from input" if file_maps is not None else f"ESPIRiT (sigpy), calib_width {calib_width}",
        "metrics": "magnitude, fastMRI definitions, inside the maps' support, no rescaling",
        "infusion_config": "config.yaml", "inr": "the same config with the prior and regularisers off",
    }
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    (out / "history.json").write_text(json.dumps(histories, indent=1) + "\n")
    metrics = write_run(out, results, reference, support, metadata,  # metrics.json last: the marker
                        arrays={"mask": mask, "reference": reference, "support": support}, overwrite=True)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the run is complete: they served their purpose
    return metrics


__all__ = ["COMPARISONS", "plain_inr_config", "recon2d_job"]
