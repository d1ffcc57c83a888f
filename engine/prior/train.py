"""Trainer of the EDM prior: EDM loss, EMA, Adam, bf16 autocast, DDP (torchrun) or DeepSpeed
ZeRO-1/2, checkpoint with exact resume, tqdm progress and a loss CSV.

A run is described by a YAML file with three sections (see configs/prior_train.yaml):
``model`` (``unet``: :class:`UNetConfig` keys, ``sigma_data``), ``data`` (:class:`DataConfig`)
and ``train`` (:class:`TrainConfig`). The resolved config is saved beside the outputs.

Output folder: config.yaml, loss.csv, checkpoint/ (training state), prior/ (EMA weights +
arch.json, the format of :func:`engine.prior.load_prior`), samples.png.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from engine.config import build_config, config_to_dict
from engine.prior.checkpoint import save_prior
from engine.prior.data import DataConfig, PatchSampler
from engine.prior.edm import EDMPrior, edm_loss, sample_training_sigma
from engine.prior.loader import StepBatches, step_batches
from engine.prior.unet import UNetConfig, count_parameters
from engine.runtime.bootstrap import init_distributed
from engine.runtime.checkpoint import atomic_torch_save
from engine.runtime.context import DistContext


@dataclass
class TrainConfig:
    """Optimisation, logging and parallelism of one training run."""

    out_dir: str = "runs/prior"
    """Output folder (checkpoint/, prior/, loss.csv, config.yaml, samples.png)."""
    steps: int = 3000
    """Optimiser steps in total (a resumed run continues up to this number)."""
    batch_size: int = 16
    """Patches per step and rank."""
    lr: float = 1e-3
    """Peak Adam learning rate."""
    lr_warmup_steps: int = 100
    """Linear warm-up from 0 to lr."""
    lr_final_fraction: float = 0.1
    """Cosine decay from lr to lr * this at the last step."""
    adam_betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    ema_halflife_steps: float = 150.0
    """EMA decay per step = 0.5 ** (1 / halflife); early steps use min(decay, (1+n)/(10+n))."""
    bf16: bool = False
    """Run the U-Net under bf16 autocast (loss, EMA and optimiser stay float32)."""
    seed: int = 0
    """Model initialisation seed; data/noise stream of rank r uses seed + 1 + 1000 r."""
    device: str = "auto"
    """'auto' (cuda:LOCAL_RANK if available, else cpu), 'cpu' or 'cuda'."""
    threads: int = 0
    """torch.set_num_threads (0: leave torch's default)."""
    loader_workers: int = 0
    """Processes drawing the patches ahead of the GPU (engine/prior/loader.py): each step's batch then
    comes from a generator of (seed, rank, step), the same for any number of workers; 0 draws them in
    the training process from one stream per rank (how the shipped prior was trained)."""
    log_every: int = 10
    """Steps per loss.csv row (mean loss over the window and ranks)."""
    checkpoint_every: int = 200
    """Steps between training-state checkpoints (and one at the end)."""
    resume: bool = True
    """Continue from out_dir/checkpoint if it exists."""
    parallel: Literal["ddp", "deepspeed"] = "ddp"
    """'ddp' (torch DDP when WORLD_SIZE > 1, plain otherwise) or 'deepspeed'."""
    deepspeed_config: str = "configs/deepspeed_zero2.json"
    """DeepSpeed JSON (ZeRO stage 1 or 2); batch size and lr are set from this config."""
    export_dtype: str = "float16"
    """Storage dtype of the exported prior weights (float16 or float32)."""
    sample_png: bool = True
    """Write samples.png (Heun sampler) at the end of the run."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    stop_at_step: int = 0
    """Stop (checkpoint, export) after this step although the schedule runs to ``steps`` (0: off);
    for runs split into chunks, e.g. preemptible jobs."""
    max_minutes: float = 0.0
    """Wall-time budget: stop (checkpoint and export) after this many minutes (0: none)."""
    init_from: str = ""
    """A prior folder (weights.pt + arch.json, e.g. engine/assets/prior) whose weights initialise
    the model and its EMA with a fresh optimiser ('': random initialisation); its arch.json must
    match ``model``. A checkpoint in out_dir that is resumed takes precedence."""
    max_bad_steps: int = 10
    """A step whose loss or gradient is NaN/Inf on some rank is skipped on every rank (no weight,
    optimiser or EMA update) and counted in loss.csv; this many in a row stop the run with
    NonFiniteTraining, the last checkpoint (written from good weights) kept. DDP path only:
    DeepSpeed steps are not checked."""

    def __post_init__(self) -> None:
        if self.loader_workers < 0:
            raise ValueError(f"train.loader_workers must be >= 0 (got {self.loader_workers})")


@dataclass
class PriorModelConfig:
    """The network: the U-Net's architecture and the EDM data standard deviation."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    sigma_data: float = 0.5
    """Standard deviation of the training patches (EDM preconditioning)."""


@dataclass
class PriorTrainConfig:
    """The whole run (configs/prior_train.yaml): model, data and training sections."""

    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def init_weights_from(model: EDMPrior, ema: EDMPrior, directory: str | Path) -> None:
    """Copy the weights of the prior folder ``directory`` into ``model`` and ``ema`` (in place);
    ValueError if its architecture (arch.json: unet, sigma_data) differs from the model's."""
    from engine.prior.checkpoint import load_prior, read_arch

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"train.init_from: {directory} is not a folder")
    arch = read_arch(directory)
    want = {"unet": config_to_dict(model.config), "sigma_data": model.sigma_data}
    have = {"unet": arch.get("unet"), "sigma_data": arch.get("sigma_data")}
    have_unet = (config_to_dict(build_config(UNetConfig, have["unet"], source=str(directory / "arch.json")))
                 if isinstance(have["unet"], dict) else None)
    problems = [f"model.unet.{k}: config {v!r}, arch.json {None if have_unet is None else have_unet.get(k)!r}"
                for k, v in want["unet"].items() if have_unet is None or have_unet.get(k) != v]
    if have["sigma_data"] != want["sigma_data"]:
        problems.append(f"model.sigma_data: config {want['sigma_data']!r}, arch.json {have['sigma_data']!r}")
    if problems:
        raise ValueError(f"train.init_from: {directory / 'arch.json'} does not match the model config "
                         f"({'; '.join(problems)})")
    source = load_prior(directory)
    model.load_state_dict(source.state_dict())
    ema.load_state_dict(source.state_dict())


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * lr_final_fraction at the last step."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    span = max(cfg.steps - cfg.lr_warmup_steps, 1)
    progress = min((step - cfg.lr_warmup_steps) / span, 1.0)
    floor = cfg.lr_final_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, halflife: float) -> None:
    """ema <- beta ema + (1 - beta) model, beta = min(0.5^(1/halflife), (1+step)/(10+step))."""
    beta = min(0.5 ** (1.0 / halflife), (1.0 + step) / (10.0 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - beta)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _saved_step(state_path: Path) -> int:
    return int(torch.load(state_path, map_location="cpu", weights_only=True)["step"])


class _LossCSV:
    """loss.csv on rank 0; on resume, rows after the resumed step are dropped (exact history)."""

    FIELDS = ("step", "loss", "lr", "images_per_s", "elapsed_s", "skipped")

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        rows = []
        if resume_step > 0 and path.is_file():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, self.FIELDS)
            w.writeheader()
            w.writerows(rows)

    def append(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.FIELDS).writerow(row)


def _deepspeed_engine(model: EDMPrior, cfg: TrainConfig, info: DistContext):
    """Wrap the model in a DeepSpeed engine (ZeRO-1/2 from cfg.deepspeed_config)."""
    try:
        import deepspeed
    except Exception as err:
        raise RuntimeError(f"train.parallel=deepspeed but deepspeed cannot be imported: {err}") from err
    path = Path(cfg.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed_config: {path} does not exist")
    ds = json.loads(path.read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = cfg.batch_size * info.world_size
    ds.setdefault("optimizer", {"type": "Adam", "params": {}})
    ds["optimizer"].setdefault("params", {})
    ds["optimizer"]["params"].update({"lr": cfg.lr, "betas": list(cfg.adam_betas)})
    if info.device.type == "cpu":
        # DeepSpeed's fused/CPU Adam needs compiled ops; torch's Adam runs anywhere.
        ds["optimizer"]["params"]["torch_adam"] = True
    if cfg.grad_clip > 0:
        ds["gradient_clipping"] = cfg.grad_clip
    if cfg.bf16:
        ds["bf16"] = {"enabled": True}
    try:
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds)
    except Exception as err:
        raise RuntimeError(f"deepspeed.initialize failed with {path}: {type(err).__name__}: {err}") from err
    return engine, optimizer


def _ensure_process_group(info: DistContext, init_method: str | None) -> str | None:
    """DeepSpeed needs a process group even for one rank: start gloo on a temporary file."""
    import torch.distributed as dist

    # DeepSpeed reads these even for one rank; unlaunched runs are rank 0 of 1.
    for key, value in (("RANK", info.rank), ("LOCAL_RANK", info.local_rank), ("WORLD_SIZE", info.world_size)):
        os.environ.setdefault(key, str(value))
    if dist.is_initialized():
        return None
    tmp = tempfile.mkdtemp(prefix="infusion_ds_")
    method = init_method or ("env://" if "MASTER_ADDR" in os.environ else f"file://{tmp}/rendezvous")
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=method, rank=info.rank, world_size=info.world_size)
    return tmp


class NonFiniteTraining(RuntimeError):
    """`max_bad_steps` consecutive steps had a non-finite loss or gradient."""


def world_any(flag: bool, info: DistContext) -> bool:
    """True on every rank if ``flag`` is true on any rank (all ranks stop at the same step)."""
    if info.world_size == 1:
        return flag
    return mean_over_ranks(float(flag), info) > 0


def mean_over_ranks(value: float, info: DistContext) -> float:
    """Mean of a float over ranks (the value itself on one rank)."""
    total = info.all_reduce_sum(torch.tensor([value], dtype=torch.float64))
    return float(total) / info.world_size


def join_ranks(device: str, init_method: str | None) -> DistContext:
    """This rank's DistContext: torchrun / SLURM / MPI / unlaunched (engine.runtime.bootstrap), or an explicit
    rendezvous (tests: file://) with RANK and WORLD_SIZE from the environment."""
    if init_method is None:
        return init_distributed(device=device)
    return init_distributed(device=device, init_method=init_method, rank=int(os.environ.get("RANK", "0")),
                            world_size=int(os.environ.get("WORLD_SIZE", "1")))


@dataclass
class TrainResult:
    """What a run leaves in memory: its summary, the trained model and its EMA copy (this rank)."""

    summary: dict
    model: EDMPrior
    ema: EDMPrior


def train_prior(cfg: PriorTrainConfig, init_method: str | None = None) -> dict:
    """Run (or resume) a training run; returns a summary dict (steps, last loss, paths, seconds).

    init_method: process-group rendezvous (default env://, as torchrun sets); tests pass file://.
    """
    return run_training(cfg, init_method).summary


def draw_batch(sampler: PatchSampler, batch_size: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rank's batch, all drawn from `generator` in this order: clean patches `(B, 2, P, P)`,
    EDM training noise levels `(B,)` and unit noise like the patches."""
    clean = sampler.sample(batch_size, generator)
    sigma = sample_training_sigma(batch_size, generator)
    noise = torch.randn(clean.shape, generator=generator)
    return clean, sigma, noise


def run_training(cfg: PriorTrainConfig, init_method: str | None = None) -> TrainResult:
    """:func:`train_prior`, also returning this rank's model and EMA."""
    tc = cfg.train
    info = join_ranks(tc.device, None if tc.parallel == "deepspeed" else init_method)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    sampler = PatchSampler(cfg.data)  # reads the volumes: a bad one is refused before any output
    out = Path(tc.out_dir)
    ckpt_dir = out / "checkpoint"
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    info.barrier()

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = EDMPrior(cfg.model.unet, cfg.model.sigma_data).to(info.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    if tc.init_from:  # before any optimiser or engine sees the parameters; a resumed checkpoint overrides
        init_weights_from(model, ema, tc.init_from)
    data_gen = torch.Generator().manual_seed(tc.seed + 1 + 1000 * info.rank)

    engine = None
    if tc.parallel == "deepspeed":
        _ensure_process_group(info, init_method)
        engine, optimizer = _deepspeed_engine(model, tc, info)
        net = engine
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tc.adam_betas)
        net = model
        if info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)

    start = 0
    state_path = ckpt_dir / "state.pt"
    if tc.resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if engine is not None:
            engine.load_checkpoint(str(ckpt_dir / "deepspeed"), tag="latest_state")
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start = int(state["step"])
        rng = torch.load(ckpt_dir / f"rng_rank{info.rank}.pt", map_location="cpu", weights_only=True)
        data_gen.set_state(rng["data"])
        torch.set_rng_state(rng["torch"])

    def save_state(step: int) -> None:
        rng = {"data": data_gen.get_state(), "torch": torch.get_rng_state()}
        atomic_torch_save(rng, ckpt_dir / f"rng_rank{info.rank}.pt")
        if engine is not None:
            engine.save_checkpoint(str(ckpt_dir / "deepspeed"), tag="latest_state")
        if info.is_main:
            state = {"step": step, "ema": ema.state_dict()}
            if engine is None:
                state["model"] = model.state_dict()
                state["optimizer"] = optimizer.state_dict()
            atomic_torch_save(state, state_path)
        info.barrier()

    log = _LossCSV(out / "loss.csv", start, info.is_main)
    bar = None
    if info.is_main and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="prior", dynamic_ncols=True)
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=tc.bf16)
    batches = None  # the workers' batches of steps start.. (loader_workers > 0)
    if tc.loader_workers > 0:
        batches = step_batches(StepBatches(sampler, tc.batch_size, tc.seed, info.rank, draw_batch), start, tc.steps,
                               tc.loader_workers)
    t0, window, window_t0, last_loss = time.time(), [], time.time(), float("nan")
    stopped_at = 0  # step at which the wall-time budget ran out (0: not)
    skipped_in_window, bad_in_a_row = 0, 0
    for step in range(start, tc.steps):
        lr = learning_rate(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches) if batches is not None else draw_batch(sampler, tc.batch_size, data_gen)
        clean, sigma, noise = (t.to(info.device) for t in batch)
        with autocast:
            loss = edm_loss(net, clean, sigma=sigma, noise=noise, sigma_data=cfg.model.sigma_data)
        bad = False
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # max_norm inf only measures (the gradients are multiplied by exactly 1)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
            bad = world_any(not (torch.isfinite(loss.detach()) and torch.isfinite(norm)), info)
            if bad:
                optimizer.zero_grad(set_to_none=True)
            else:
                optimizer.step()
        done = step + 1
        bad_in_a_row = bad_in_a_row + 1 if bad else 0
        if bad:
            skipped_in_window += 1
            if bad_in_a_row >= tc.max_bad_steps:
                kept = (f"{ckpt_dir} keeps the checkpoint of step {_saved_step(state_path)}"
                        if state_path.is_file() else "no checkpoint was written yet")
                raise NonFiniteTraining(f"stopped at step {done}: {bad_in_a_row} consecutive steps had a "
                                        f"non-finite loss or gradient (lower train.lr); {kept}")
        else:
            update_ema(ema, model, step, tc.ema_halflife_steps)
            window.append(float(loss.detach()))
        out_of_time = tc.max_minutes > 0 and (time.time() - t0) > 60 * tc.max_minutes
        if world_any(out_of_time, info) or done == tc.stop_at_step:
            stopped_at = done
        if done % tc.log_every == 0 or done == tc.steps or stopped_at:
            # every rank skipped the same steps, so the windows agree in length
            last_loss = mean_over_ranks(sum(window) / len(window), info) if window else float("nan")
            rate = len(window) * tc.batch_size * info.world_size / max(time.time() - window_t0, 1e-9)
            log.append({"step": done, "loss": f"{last_loss:.6g}", "lr": f"{lr:.6g}",
                        "images_per_s": f"{rate:.4g}", "elapsed_s": f"{time.time() - t0:.1f}",
                        "skipped": skipped_in_window})
            window, window_t0, skipped_in_window = [], time.time(), 0
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
        if bar is not None:
            bar.update(1)
        if done % tc.checkpoint_every == 0 or done == tc.steps or stopped_at:
            save_state(done)
        if stopped_at:
            break
    if bar is not None:
        bar.close()

    prior_dir = out / "prior"
    if info.is_main:
        extra = {"training": {"steps": stopped_at or tc.steps, "scheduled_steps": tc.steps,
                              "batch_size_per_rank": tc.batch_size,
                              "world_size": info.world_size, "patch_size": cfg.data.patch_size,
                              "parameters": count_parameters(model),
                              "volumes": [asdict(v) for v in cfg.data.volumes],
                              "orientations": list(cfg.data.orientations),
                              "stopped_by_time_budget_at_step": stopped_at or None,
                              "initialised_from": tc.init_from or None}}
        save_prior(prior_dir, ema, extra=extra, dtype=getattr(torch, tc.export_dtype))
        if tc.sample_png and start < tc.steps:
            from engine.prior.visualise import save_samples_png

            save_samples_png(ema, out / "samples.png")
    info.barrier()
    summary = {"steps": stopped_at or tc.steps, "start_step": start, "last_loss": last_loss,
               "prior_dir": str(prior_dir), "seconds": time.time() - t0, "rank": info.rank,
               "world_size": info.world_size}
    return TrainResult(summary, model, ema)


__all__ = [
    "NonFiniteTraining",
    "PriorModelConfig",
    "PriorTrainConfig",
    "TrainConfig",
    "TrainResult",
    "init_weights_from",
    "learning_rate",
    "run_training",
    "train_prior",
    "update_ema",
]
