"""A whole 3D run: the step loop with logging, checkpoints and preemption, the output volume with
metrics and a montage, the bundled example, and the command line of launch/recon3d.py.

The per-step mathematics is in engine.recon.fit3d (Recon3D); this module only drives it.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.config import config_to_dict
from engine.recon.config3d import BundledCaseConfig, Recon3DConfig, result_config
from engine.recon.debias3d import apply_band_gains, estimate_band_gains, gain_map, radial_bands
from engine.recon.fit3d import NonFiniteStop, Recon3D, StepResult
from engine.recon.refine3d import l1_wavelet_3d_of, refine_fit
from engine.recon.selection3d import scaled_config, select_regularisation
from engine.runtime.checkpoint import CheckpointManager
from engine.runtime.context import DistContext
from engine.runtime.preemption import (
    NON_FINITE_EXIT_CODE,
    REQUEUE_EXIT_CODE,
    Preempted,
    PreemptionFlag,
)


@dataclass
class RunPaths:
    """Where a run writes: the OME-Zarr volume and a side folder for everything else."""

    volume: Path
    side: Path

    @classmethod
    def for_output(cls, volume: str | Path) -> RunPaths:
        volume = Path(volume)
        stem = volume.name.removesuffix(".zarr")
        return cls(volume, volume.with_name(stem + "_run"))

    @property
    def checkpoints(self) -> Path:
        return self.side / "checkpoints"

    @property
    def log_csv(self) -> Path:
        return self.side / "log.csv"

    @property
    def montage(self) -> Path:
        return self.side / "montage.png"

    @property
    def metrics(self) -> Path:
        return self.side / "metrics.json"


class _CsvLog:
    """Rank 0's per-step CSV; on resume, rows after the resumed step are dropped first."""

    FIELDS = ("step", "seconds", "loss", "dc", "prior", "tv", "lr", "full_dc", "prior_evals", "skipped")

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if resume_step > 0 and path.is_file():
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) < resume_step]
        self.handle = open(path, "w", newline="")  # noqa: SIM115 - kept open for the whole run
        self.writer = csv.DictWriter(self.handle, fieldnames=self.FIELDS)
        self.writer.writeheader()
        self.writer.writerows(rows)

    def write(self, row: dict) -> None:
        self.writer.writerow({k: row.get(k, "") for k in self.FIELDS})
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _error_sums(volume: np.ndarray, reference: np.ndarray, support: np.ndarray | None) -> list[float]:
    """[sum (|x| - |r|)^2, sum |r|^2] over the support: NRMSE terms that add up over ranks."""
    diff = np.abs(volume).astype(np.float64) - np.abs(reference).astype(np.float64)
    ref = np.abs(reference).astype(np.float64)
    if support is not None:
        diff, ref = diff[support], ref[support]
    return [float(np.sum(diff**2)), float(np.sum(ref**2))]


def _l1_wavelet_slab(kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """engine.evaluation.baselines.l1_wavelet on every readout plane of a slab: (n, ny, nz) complex64."""
    from engine.evaluation.baselines import l1_wavelet

    return np.stack([l1_wavelet(kspace[i], maps[i], mask) for i in range(kspace.shape[0])])


def gather_planes(slab: np.ndarray, x_start: int, nx: int, ctx: DistContext) -> tuple | None:
    """Rank 0 gets the three central orthogonal planes of the volume assembled from the ranks'
    slabs (n, ny, nz): (yz at x=nx//2, xz at y=ny//2, xy at z=nz//2); None elsewhere."""
    ny, nz = slab.shape[1:]
    x_mid = nx // 2
    mine = {
        "x0": x_start,
        "yz": slab[x_mid - x_start] if x_start <= x_mid < x_start + slab.shape[0] else None,
        "xz": slab[:, ny // 2, :],
        "xy": slab[:, :, nz // 2],
    }
    parts = ctx.all_gather_object(mine)
    if not ctx.is_main:
        return None
    parts.sort(key=lambda p: p["x0"])
    yz = next(p["yz"] for p in parts if p["yz"] is not None)
    return yz, np.concatenate([p["xz"] for p in parts]), np.concatenate([p["xy"] for p in parts])


def write_montage(path: Path, rows: dict[str, tuple], title: str,
                  voxel_size_mm: tuple[float, float, float] | None = None,
                  nrmse: dict[str, float] | None = None) -> None:
    """PNG: one row per volume (name -> its yz / xz / xy planes) at the true voxel aspect ratio
    (engine.evaluation.report.volume_montage_png)."""
    from engine.evaluation.report import volume_montage_png

    volume_montage_png(path, rows, voxel_size_mm, title, nrmse)


def checkpoint_after_step(manager: CheckpointManager, recon: Recon3D, result: StepResult,
                          rank_state: Callable[[Recon3D], dict], hashed: dict, ctx: DistContext, what: str,
                          at_last_step: bool) -> None:
    """Collective, after each step of a fit: after a preemption signal, checkpoint and raise Preempted
    (exit 75: launch/slurm/recon3d.sbatch requeues the job); else checkpoint every checkpoint.every
    steps before the last, and at the last when `at_last_step`. `what` names the fit in the message."""
    step = recon.step_index
    if result.stop_requested:
        folder = manager.save(step, recon.trunk_state(), rank_state(recon), hashed)
        ctx.print0(f"[recon3d] preemption signal: checkpoint{what} at step {step} in {folder}")
        raise Preempted(step, folder)
    every = recon.cfg.checkpoint.every
    if (at_last_step and step == recon.cfg.steps) or (every and step % every == 0 and step < recon.cfg.steps):
        manager.save(step, recon.trunk_state(), rank_state(recon), hashed)


class FitCheckpoints:
    """Checkpoints and preemption for a fit that runs before the final one (selection's candidates,
    debias's holdout fit), in its own folder under the run's checkpoints. A preemption signal there writes a checkpoint and raises
    Preempted as the final run's loop does (exit 75: launch/slurm/recon3d.sbatch requeues the job), a
    periodic checkpoint follows checkpoint.every, and --resume continues the fit from its newest
    checkpoint (bit-exact, as the final run). The caller removes the folder once the fit's record is saved.
    """

    def __init__(self, folder: Path, name: str, ctx: DistContext, flag: PreemptionFlag, resume: bool,
                 overwrite: bool, on_step_end: Callable[[Recon3D, StepResult], None] | None = None):
        self.folder, self.name, self.ctx, self.flag = folder, name, ctx, flag
        self.resume, self.overwrite, self.on_step_end = resume, overwrite, on_step_end
        self.manager: CheckpointManager | None = None
        self.hashed: dict = {}
        self.extra_state: Callable[[], dict] | None = None

    def start(self, recon: Recon3D, extra_state: Callable[[], dict] | None = None) -> dict:
        """Collective: resume `recon` from the newest checkpoint of the folder (with --resume), or
        refuse / clear an earlier run's checkpoints there (as the final run's). `extra_state()` is saved
        with every checkpoint (e.g. a validation curve); returns what the resumed checkpoint saved ({})."""
        self.manager = CheckpointManager(self.folder, self.ctx, recon.cfg.checkpoint.keep_last)
        self.hashed = result_config(recon.cfg, recon.input_description())
        self.extra_state = extra_state
        restored: dict = {}
        if not self.resume:
            self.manager.start_fresh(self.overwrite, "pass --resume to continue it or --overwrite to start over")
        elif (loaded := self.manager.load_latest(self.hashed)) is not None:
            step, trunk_state, rank_state = loaded
            recon.load_state(step, trunk_state, rank_state)
            restored = rank_state.get("fit_extra", {})
            self.ctx.print0(f"[recon3d] {self.name} fit resumed from step {step} ({self.folder})")
        recon.request_stop = self.flag.raised
        return restored

    def after_step(self, recon: Recon3D, result: StepResult) -> None:
        """Collective: checkpoint and raise Preempted after a signal; checkpoint every checkpoint.every
        steps and at the last (a finished fit is not repeated before its record is saved)."""
        if self.on_step_end is not None:
            self.on_step_end(recon, result)
        checkpoint_after_step(self.manager, recon, result, self._rank_state, self.hashed, self.ctx,
                              f" of the {self.name} fit", at_last_step=True)
        recon.request_stop = self.flag.raised  # a signal during the next step is seen in the one after

    def _rank_state(self, recon: Recon3D) -> dict:
        rank_state = recon.rank_state()
        if self.extra_state is not None:
            rank_state["fit_extra"] = self.extra_state()
        return rank_state

    def remove(self) -> None:
        """Collective: delete the folder (the fit's record is saved; its checkpoints are no longer needed)."""
        self.ctx.barrier()
        if self.ctx.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.ctx.barrier()


def run_recon3d(
    cfg: Recon3DConfig,
    input_path: str | Path,
    output_path: str | Path,
    ctx: DistContext,
    overwrite: bool = False,
    resume: bool = False,
    prior: nn.Module | None = None,
    store=None,
    on_step_end: Callable[[Recon3D, StepResult], None] | None = None,
) -> dict:
    """Reconstruct the hybrid store at `input_path` into the OME-Zarr `output_path` (collective).

    Args:
        cfg: the run's config.
        input_path: a store from launch/prepare.py (engine.io.prepare_hybrid_store).
        output_path: the output volume `*.zarr`; side files go to `<stem>_run/` beside it.
        ctx: from engine.runtime.bootstrap.init_distributed.
        overwrite: replace an existing output.
        resume: continue from the newest complete checkpoint in `<stem>_run/checkpoints` (a fresh
            start when there is none).
        prior: use this EDMPrior instead of loading cfg.prior.path.
        store: a zarr Store to read instead of opening `input_path` (tests count chunk reads).
        on_step_end: called after each step of the final run and of the fits before it (selection's
            candidates, debias's holdout fit; their Recon3D has a `holdout`); tests use it to kill or
            signal the process.
    Returns:
        the metrics dict (on every rank). Raises Preempted after a SIGTERM/SIGUSR1 checkpoint.
    """
    from engine.io.hybrid_store import HybridStore
    from engine.io.ome_zarr import VolumeWriter

    paths = RunPaths.for_output(output_path)
    if paths.volume.exists() and not (overwrite or resume):  # every rank checks: no rank waits alone
        raise FileExistsError(f"{paths.volume} exists; pass --overwrite to replace it or --resume to continue")
    if resume and paths.volume.exists():
        from engine.io.errors import InputError
        from engine.io.ome_zarr import open_volume

        try:
            finished = open_volume(paths.volume)
        except InputError:  # incomplete: the run is to be continued and the volume rewritten
            finished = None
        if finished is not None:
            ctx.print0(f"[recon3d] {paths.volume} is already complete; nothing to resume")
            return finished.metrics
    source = HybridStore(store if store is not None else input_path)
    if source.shape[0] < ctx.world_size:
        raise ValueError(f"{input_path}: {source.shape[0]} readout positions for {ctx.world_size} ranks")
    shards = cfg.slices.num_shards or ctx.world_size
    chunks = -(-int(source.shape[0]) // int(source.chunk_x))
    if chunks < shards:
        raise ValueError(f"{input_path}: {source.shape[0]} readout positions in {chunks} chunks of "
                         f"{source.chunk_x} cannot be split over {shards} shards (one per rank unless "
                         f"slices.num_shards is set): use fewer ranks, or prepare the store with a smaller chunk_x")
    manager = CheckpointManager(paths.checkpoints, ctx, cfg.checkpoint.keep_last)
    if not resume:
        manager.start_fresh(overwrite, "pass --resume to continue it or --overwrite to start over")
    flag = PreemptionFlag().install()  # before the fits that precede the final one: they stop on it too
    try:
        selection = None
        if cfg.selection.enabled:
            def candidate_checkpoints(factor: float) -> FitCheckpoints:
                return FitCheckpoints(paths.checkpoints / f"selection-x{factor:g}", f"selection x{factor:g}", ctx,
                                      flag, resume, overwrite, on_step_end)

            selection = choose_regularisation(cfg, source, paths, ctx, resume, prior, candidate_checkpoints)
            cfg = scaled_config(cfg, selection["chosen"]["scale"])
            if not selection["chosen"]["refine"]:
                cfg = replace(cfg, refine=replace(cfg.refine, anchor_weight=0.0))
        debias = None
        if cfg.debias.enabled:
            checkpoints = FitCheckpoints(paths.checkpoints / "debias", "debias holdout", ctx, flag, resume, overwrite,
                                         on_step_end)
            debias = debias_gains(cfg, source, paths, ctx, resume, prior, checkpoints)
    except BaseException:
        flag.uninstall()
        raise
    recon = Recon3D(cfg, source, ctx, prior=prior)
    hashed = result_config(cfg, recon.input_description())
    if ctx.is_main:
        paths.side.mkdir(parents=True, exist_ok=True)
        from engine.config import save_config

        save_config(cfg, paths.side / "config.yaml")
    ctx.barrier()
    start_step, seconds_before = 0, 0.0  # seconds_before: training time of earlier segments of a resumed run
    if resume:
        loaded = manager.load_latest(hashed)
        if loaded is None:
            ctx.print0(f"[recon3d] --resume: no checkpoint in {paths.checkpoints}, starting fresh")
        else:
            start_step, trunk_state, rank_state = loaded
            recon.load_state(start_step, trunk_state, rank_state)
            seconds_before = float(rank_state.get("train_seconds", 0.0))
            ctx.print0(f"[recon3d] resumed from step {start_step} ({paths.checkpoints})")

    log = _CsvLog(paths.log_csv, start_step) if ctx.is_main else None
    bar = None
    if ctx.is_main and cfg.output.progress:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (a batch log gets the CSV-like lines below)
        bar = tqdm(total=cfg.steps, initial=start_step, desc="recon3d", dynamic_ncols=True, disable=None)
    plain_progress_every = max(cfg.steps // 10, 1) if bar is not None and bar.disable else 0
    t_start = time.perf_counter()

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - t_start

    def rank_state(recon: Recon3D) -> dict:
        return {**recon.rank_state(), "train_seconds": elapsed()}

    bad_in_a_row, skipped_steps = 0, 0
    try:
        while recon.step_index < cfg.steps:
            recon.request_stop = flag.raised  # a signal during this step is seen in the next one
            result = recon.step()
            if on_step_end is not None:
                on_step_end(recon, result)
            step_done = recon.step_index
            bad_in_a_row = bad_in_a_row + 1 if result.skipped else 0
            skipped_steps += int(result.skipped)
            if ctx.is_main and (result.step % cfg.output.log_every == 0 or step_done == cfg.steps
                                or result.skipped):
                t = result.terms
                log.write({"step": result.step, "seconds": f"{elapsed():.3f}",
                           "loss": t["dc"] + t["prior"] + t["tv"], **t,
                           "lr": cfg.optim.lr * recon.lr_factor(result.step), "full_dc": int(result.full_dc),
                           "prior_evals": result.prior_evals, "skipped": int(result.skipped)})
                if bar is not None:
                    bar.set_postfix(dc=f"{t['dc']:.3g}", prior=f"{t['prior']:.3g}", tv=f"{t['tv']:.3g}",
                                    refresh=False)
            if bar is not None:
                bar.update(1)
            if plain_progress_every and (step_done % plain_progress_every == 0 or step_done == cfg.steps):
                t = result.terms
                print(f"[recon3d] step {step_done}/{cfg.steps}, {elapsed():.1f} s: dc {t['dc']:.4g}, "
                      f"prior {t['prior']:.4g}, tv {t['tv']:.4g}", flush=True)
            if bad_in_a_row >= cfg.max_bad_steps:
                steps = manager.complete_steps()
                raise NonFiniteStop(result.step, bad_in_a_row, steps[-1] if steps else None)
            # not at the last step: finish_run writes the output next
            checkpoint_after_step(manager, recon, result, rank_state, hashed, ctx, "", at_last_step=False)
    finally:
        flag.uninstall()
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    train_seconds = elapsed()  # summed over every segment of a resumed run
    return finish_run(cfg, recon, paths, ctx, overwrite or resume, train_seconds, VolumeWriter,
                      {"skipped_steps": skipped_steps, "resumed_from_step": start_step}
                      | ({"selection": selection} if selection is not None else {}),
                      voxel_size=source.voxel_size_mm, debias=debias,
                      l1_wavelet_weight=0.0 if selection is None else selection["chosen"]["l1_wavelet_weight"])


def choose_regularisation(cfg: Recon3DConfig, source, paths: RunPaths, ctx: DistContext, resume: bool,
                          prior: nn.Module | None,
                          candidate_checkpoints: Callable[[float], FitCheckpoints] | None = None) -> dict:
    """engine.recon.selection3d's record for this run: read from `<stem>_run/selection.json` when resuming
    a run that already made its choice with the same selection settings, else the candidate runs
    (collective; each checkpointed and preemptible with `candidate_checkpoints(factor)`, whose folders
    are removed once the record is saved there)."""
    settings = config_to_dict(cfg.selection)
    if cfg.selection.choose_refine and cfg.refine.anchor_weight > 0:  # the choice depends on the refinement too
        settings["refine"] = config_to_dict(cfg.refine)
    settings = json.loads(json.dumps(settings))  # as it reads back from the file
    announce = (f"[recon3d] selection: {len(cfg.selection.regularisation_scales)} candidate runs on "
                f"{1 - cfg.selection.holdout_fraction:.0%} of the measured samples, then the final run on all")
    record = _saved_or_computed(paths.side / "selection.json", settings, resume, ctx, announce,
                                lambda: select_regularisation(cfg, source, ctx, prior, progress=cfg.output.progress,
                                                              checkpoints=candidate_checkpoints))
    if candidate_checkpoints is not None:
        for factor in cfg.selection.regularisation_scales:
            candidate_checkpoints(factor).remove()
    post_steps = " and the refinement" if record["chosen"]["refine"] and cfg.refine.anchor_weight > 0 else ""
    if record["chosen"]["l1_wavelet_weight"] > 0:
        post_steps += f", blended with {record['chosen']['l1_wavelet_weight']:.2f} x the 3D L1-wavelet,"
    ctx.print0(f"[recon3d] selection: regularisation x{record['chosen']['scale']:g}{post_steps} chosen (held-out error "
               f"{record['chosen']['validation_error']:.5g}); {paths.side / 'selection.json'}")
    return record


def debias_gains(cfg: Recon3DConfig, source, paths: RunPaths, ctx: DistContext, resume: bool,
                 prior: nn.Module | None, checkpoints: FitCheckpoints | None = None) -> dict:
    """engine.recon.debias3d's record for this run: read from `<stem>_run/debias.json` when resuming a
    run of the same config, else the holdout fit (collective; checkpointed and preemptible with
    `checkpoints`, whose folder is removed once the record is saved there)."""
    settings = json.loads(json.dumps(result_config(cfg, {})))  # the holdout fit depends on every result key
    announce = (f"[recon3d] debias: a holdout fit on {1 - cfg.debias.holdout_fraction:.0%} of the measured "
                "samples measures the shrinkage of unmeasured (ky, kz) bands, then the final run on all")
    record = _saved_or_computed(paths.side / "debias.json", settings, resume, ctx, announce,
                                lambda: estimate_band_gains(cfg, source, ctx, prior, progress=cfg.output.progress,
                                                            checkpoints=checkpoints))
    if checkpoints is not None:
        checkpoints.remove()
    gains = ", ".join(f"{g:.3f}" for g in record["gains"])
    ctx.print0(f"[recon3d] debias: gains per band (edges {record['band_edges']}) {gains}; "
               f"{paths.side / 'debias.json'}")
    return record


def _saved_or_computed(saved: Path, settings: dict, resume: bool, ctx: DistContext, announce: str,
                       compute: Callable[[], dict]) -> dict:
    """A label-free record of this run: `saved` when resuming with the same settings, else `compute()`
    (collective), written to `saved` by rank 0 before the final run starts."""
    record = json.loads(saved.read_text()) if resume and saved.is_file() else None
    if record is not None and record.get("settings") == settings:
        ctx.print0(f"[recon3d] {saved.stem}: reusing {saved}")
        return record
    ctx.print0(announce)
    record = {"settings": settings, **compute()}
    if ctx.is_main:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(record, indent=1))
    ctx.barrier()
    return record


def finish_run(cfg: Recon3DConfig, recon: Recon3D, paths: RunPaths, ctx: DistContext, overwrite: bool,
               train_seconds: float, writer_cls, extra_metrics: dict | None = None,
               voxel_size: tuple[float, float, float] | None = None, debias: dict | None = None,
               l1_wavelet_weight: float = 0.0) -> dict:
    """Write the volume (each rank its chunks), compute metrics over ranks, montage, marker.
    voxel_size: (x, y, z) mm of the input store, for the OME-Zarr scale (None: not recorded).
    debias: debias_gains' record, whose gains the written volume carries (recorded in the metrics).
    l1_wavelet_weight: w of the written (1 - w) x output + w x the 3D L1-wavelet (the selection's blend)."""
    attrs = {"config": config_to_dict(cfg), "input": recon.input_description()}
    writer = writer_cls(paths.volume, (recon.nx, *recon.plane), recon.chunk_x, overwrite=overwrite,
                        rank=0, attrs=attrs, voxel_size=voxel_size) if ctx.is_main else None
    ctx.barrier()
    if not ctx.is_main:
        writer = writer_cls(paths.volume, (recon.nx, *recon.plane), recon.chunk_x, rank=ctx.rank)
    gains = None if debias is None else gain_map(debias["gains"], radial_bands(recon.plane, debias["band_edges"]),
                                                 np.asarray(recon.source.mask))
    pieces, raw_pieces = [], []
    for x0, x1 in recon.output_chunks():
        piece = raw = recon.evaluate_rows(x0, x1)
        if gains is not None:
            piece = apply_band_gains(raw, gains)
            raw_pieces.append(raw)
        pieces.append(piece)
    volume = fit = np.concatenate(pieces)
    refine_seconds = None
    if cfg.refine.anchor_weight > 0:
        t0 = time.perf_counter()
        volume = refine_fit(recon, fit, cfg.refine, ctx, progress=cfg.output.progress and ctx.is_main)
        refine_seconds = time.perf_counter() - t0
    l1_wavelet, l1_wavelet_seconds, unblended = None, None, volume
    if l1_wavelet_weight > 0 or (cfg.baseline.l1_wavelet_3d and recon.reference is not None):
        t0 = time.perf_counter()
        l1_wavelet = l1_wavelet_3d_of(recon, progress=cfg.output.progress and ctx.is_main)
        l1_wavelet_seconds = time.perf_counter() - t0
    if l1_wavelet_weight > 0:
        volume = (1 - l1_wavelet_weight) * unblended + l1_wavelet_weight * l1_wavelet
    for x0, x1 in recon.output_chunks():
        writer.write_slab(x0, volume[x0 - recon.x_start : x1 - recon.x_start])

    metrics: dict = {"steps": cfg.steps, "train_seconds": train_seconds, "ranks": ctx.world_size,
                     "slices_per_step": cfg.slices.per_step, "prior_mode": cfg.prior.mode,
                     "prior_distance": cfg.prior.distance, **(extra_metrics or {})}
    if debias is not None:
        metrics["debias"] = debias
    if refine_seconds is not None:
        metrics["refine"] = {**config_to_dict(cfg.refine), "seconds_max_rank": float(
            ctx.all_reduce_max(torch.tensor([refine_seconds], dtype=torch.float64)).item())}
    if l1_wavelet_weight > 0:
        metrics["blend"] = {"l1_wavelet_weight": l1_wavelet_weight, "seconds_max_rank": float(
            ctx.all_reduce_max(torch.tensor([l1_wavelet_seconds], dtype=torch.float64)).item())}
    if ctx.device.type == "cuda":  # the whole run's peak (fit, selection, post-steps) on the busiest rank
        peak = torch.tensor([torch.cuda.max_memory_allocated(ctx.device) / 2**30], dtype=torch.float64)
        metrics["peak_gpu_gib_max_rank"] = float(ctx.all_reduce_max(peak).item())
    evals = torch.tensor([float(recon.prior_evals)], dtype=torch.float64)
    metrics["prior_evals"] = int(ctx.all_reduce_sum(evals).item())
    images = {"INFusion": volume}
    if recon.reference is not None:
        support = recon.maps_support()
        candidates = {"infusion": volume, "zero_filled": recon.zero_filled}
        if raw_pieces:  # what the debias gains changed, measured in every run that has a reference
            candidates["infusion_without_debias"] = np.concatenate(raw_pieces)
        if refine_seconds is not None:  # what the refinement changed
            candidates["infusion_without_refine"] = fit
        if l1_wavelet_weight > 0:  # what the blend changed
            candidates["infusion_without_blend"] = unblended
        baseline_seconds = {}
        if cfg.baseline.l1_wavelet_3d:
            candidates["l1_wavelet_3d"] = l1_wavelet
            baseline_seconds["l1_wavelet_3d"] = l1_wavelet_seconds
            images["L1-wavelet 3D"] = candidates["l1_wavelet_3d"]
        if cfg.baseline.l1_wavelet:
            t0 = time.perf_counter()
            candidates["l1_wavelet"] = _l1_wavelet_slab((recon.kspace * recon.scale).cpu().numpy(),
                                                        recon.maps.cpu().numpy(), recon.mask.cpu().numpy())
            baseline_seconds["l1_wavelet"] = time.perf_counter() - t0
            images["L1-wavelet 2D"] = candidates["l1_wavelet"]
        sums = torch.tensor([s for img in candidates.values() for s in _error_sums(img, recon.reference, support)],
                            dtype=torch.float64)
        ctx.all_reduce_sum(sums)
        for i, name in enumerate(candidates):
            err, ref = sums[2 * i].item(), sums[2 * i + 1].item()
            metrics[f"nrmse_percent_{name}"] = 100.0 * math.sqrt(err / ref)
        for name, seconds in baseline_seconds.items():
            metrics[f"{name}_seconds_max_rank"] = float(
                ctx.all_reduce_max(torch.tensor([seconds], dtype=torch.float64)).item())
        images["reference"] = recon.reference
    planes = {name: gather_planes(img, recon.x_start, recon.nx, ctx) for name, img in images.items()}
    ctx.barrier()
    if ctx.is_main:
        writer.finalize(metrics)
        paths.metrics.write_text(json.dumps(metrics, indent=1, sort_keys=True))
        if cfg.output.montage:
            scores = {"INFusion": "infusion", "L1-wavelet 3D": "l1_wavelet_3d", "L1-wavelet 2D": "l1_wavelet"}
            nrmse = {name: metrics[f"nrmse_percent_{key}"] for name, key in scores.items()
                     if f"nrmse_percent_{key}" in metrics}
            title = "NRMSE vs the reference (magnitude, inside the maps' support)" if nrmse else "INFusion 3D"
            write_montage(paths.montage, planes, title, recon.voxel_size_mm, nrmse)
    ctx.barrier()
    return metrics


# ================================================================================== bundled case


def prepare_bundled_store(cfg: BundledCaseConfig, folder: str | Path, ctx: DistContext) -> Path:
    """The bundled 3D case undersampled as `cfg` says, as a hybrid store in `folder` (collective).

    Rank 0 prepares it once (the store name encodes the settings, so a rerun reuses it); the
    others wait at a barrier and then open it.
    """
    from engine.io.examples import bundled_mask_3d, bundled_store_name, write_bundled_store_3d

    folder = Path(folder)
    path, refusal = None, None
    if ctx.is_main:
        path = folder / bundled_store_name(cfg.mask, cfg.acceleration, cfg.calib, cfg.chunk_x)
        if path.exists() and _without_voxel_size(path):  # made by an engine before voxel sizes: remake it
            shutil.rmtree(path)
        if not path.exists():
            try:  # e.g. an unreachable acceleration: refused before anything is written
                mask = bundled_mask_3d(cfg.mask, cfg.acceleration, cfg.calib)
            except ValueError as error:
                refusal = f"config key bundled.acceleration / bundled.mask: {error}"
            else:
                folder.mkdir(parents=True, exist_ok=True)
                write_bundled_store_3d(path, mask, cfg.chunk_x)
    # every rank learns of rank 0's refusal, so none waits at the barrier for a store never made
    path, refusal = ctx.broadcast_object((str(path) if path is not None else None, refusal))
    if refusal is not None:
        raise ValueError(refusal)
    ctx.barrier()
    return Path(path)


def _without_voxel_size(store: Path) -> bool:
    """True for a readable hybrid store that records no voxel size (older engines wrote none)."""
    from engine.io.errors import InputError
    from engine.io.hybrid_store import HybridStore

    try:
        return HybridStore(store).voxel_size_mm is None
    except InputError:  # unreadable: left for the run's own check to name the problem
        return False


# ================================================================================== the job


def default_output(config_path: str | Path | None, ctx: DistContext, root: str | Path = "outputs") -> Path:
    """outputs/recon3d-<config stem>-<UTC time>.zarr, the time taken on rank 0 and shared."""
    stamp = ctx.broadcast_object(time.strftime("%Y%m%d-%H%M%S", time.gmtime()) if ctx.is_main else None)
    stem = Path(config_path).stem if config_path else "default"
    return Path(root) / f"recon3d-{stem}-{stamp}.zarr"


def recon3d_job(config_path: str | Path | None, overrides: Sequence[str] = (), input_path: str | Path | None = None,
                output_path: str | Path | None = None, overwrite: bool = False, resume: bool = False) -> int:
    """The whole command of launch/recon3d.py on this rank; returns the process exit code.

    0: done; REQUEUE_EXIT_CODE: preempted after a checkpoint (rerun with resume); 2: bad input,
    config or output path (one line on stderr naming what is wrong).
    """
    import sys

    from engine.config import ConfigError, load_config
    from engine.io.errors import InputError
    from engine.runtime.bootstrap import init_distributed, set_cpu_threads, shutdown
    from engine.runtime.checkpoint import CheckpointMismatch

    try:
        cfg = load_config(Recon3DConfig, config_path, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ctx = init_distributed(device=cfg.device)
    threads = set_cpu_threads(ctx)
    ctx.print0(f"[recon3d] {ctx.world_size} rank(s) via {ctx.launcher}, backend {ctx.backend or 'none'}, "
               f"device {ctx.device}" + (f", {threads} CPU threads per rank" if ctx.device.type == "cpu" else ""))
    try:
        if input_path is None:
            input_path = prepare_bundled_store(cfg.bundled, Path("outputs") / "bundled", ctx)
            ctx.print0(f"[recon3d] no --input: the bundled 3D example (real Colin27 anatomy, simulated "
                       f"coils and phase), {cfg.bundled.mask} R={cfg.bundled.acceleration:g}: {input_path}")
        if output_path is None:
            output_path = default_output(config_path, ctx)
        metrics = run_recon3d(cfg, input_path, output_path, ctx, overwrite=overwrite, resume=resume)
    except Preempted as preempted:
        ctx.print0(f"[recon3d] {preempted}: exit {REQUEUE_EXIT_CODE} (requeue, then rerun with --resume)")
        return REQUEUE_EXIT_CODE
    except NonFiniteStop as stop:
        if ctx.is_main:
            print(f"error: {stop}", file=sys.stderr)
        return NON_FINITE_EXIT_CODE
    except (InputError, ConfigError, CheckpointMismatch, FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"error (rank {ctx.rank}): {error}", file=sys.stderr)
        return 2
    paths = RunPaths.for_output(output_path)
    if ctx.is_main:
        print(f"[recon3d] volume: {paths.volume} (OME-Zarr; open with zarr or napari)")
        print(f"[recon3d] montage {paths.montage}, log {paths.log_csv}, metrics {paths.metrics}")
        if "nrmse_percent_infusion" in metrics:
            line = f"NRMSE vs the fully sampled reference: INFusion {metrics['nrmse_percent_infusion']:.2f} %"
            if "nrmse_percent_l1_wavelet_3d" in metrics:
                line += f", 3D L1-wavelet {metrics['nrmse_percent_l1_wavelet_3d']:.2f} %"
            if "nrmse_percent_l1_wavelet" in metrics:
                line += f", per-plane L1-wavelet {metrics['nrmse_percent_l1_wavelet']:.2f} %"
            line += f", zero-filled {metrics['nrmse_percent_zero_filled']:.2f} %"
            print(line + f" ({metrics['train_seconds']:.1f} s, {metrics['steps']} steps)")
    shutdown(ctx)
    return 0


__all__ = [
    "RunPaths",
    "default_output",
    "finish_run",
    "gather_planes",
    "prepare_bundled_store",
    "recon3d_job",
    "run_recon3d",
    "write_montage",
]
