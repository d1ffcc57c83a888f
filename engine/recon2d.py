"""2D reconstruction: fit an INR to undersampled multicoil k-space, optionally with a diffusion prior.

loss(step) = DC(x) + tv_weight TV(x) + wavelet_weight ||W x||_1 + prior term(x, step), where x is
the INR's image on the pixel grid, DC is engine.losses.DataConsistency and the prior term is
engine.losses.PriorTerm (modes "reference" = the paper's recipe, "tweedie", "off").

Units: the data are divided by the 99th percentile of the zero-filled magnitude (`info["scale"]`)
so the INR works on images of magnitude ~1 whatever the scanner's units; the result is scaled back.

Loop: Adam with a constant / cosine / linear learning-rate schedule (optional warm-up), optional
bf16 autocast of the INR and the prior (the DC runs in complex64), a guard that skips a step whose
loss or gradient is not finite and stops after `max_bad_steps` in a row, an early stop when the
window-mean loss stops changing (EarlyStopConfig), optional averaging of the last images,
tqdm with the loss terms. Everything random is seeded from `config.seed` (INR init from
`config.model.seed`). The reference image, when given, only feeds the history (NRMSE per logged
step); it never steers the reconstruction.
"""
from __future__ import annotations

import collections
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from engine.config import config_to_dict
from engine.losses.dc import DataConsistency
from engine.losses.prior_term import PriorTerm, PriorTermConfig
from engine.losses.tv import total_variation
from engine.losses.wavelet import wavelet_l1
from engine.models.inr import INR2D, INRConfig, resolve_encoding
from engine.physics.fft import ifftc


@dataclass
class OptimConfig:
    """Adam and its learning-rate schedule."""

    steps: int = 300
    """maximum number of Adam steps."""
    lr: float = 1e-2
    """peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam betas."""
    eps: float = 1e-15
    """Adam epsilon (hash-grid tables get tiny, sparse gradients; Instant-NGP uses 1e-15)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """learning-rate decay after warm-up, down to lr * final_lr_fraction at the last step."""
    final_lr_fraction: float = 0.1
    """cosine / linear: final lr as a fraction of lr."""
    warmup_steps: int = 0
    """linear warm-up from 0 over this many steps."""
    grad_clip: float | None = None
    """clip the gradient norm to this value (null: no clipping)."""


@dataclass
class DCConfig:
    """Data-consistency term."""

    normalisation: Literal["samples", "energy", "none", "array"] = "samples"
    """'samples': mean over measured samples; 'array': mean over the whole k-space array (the
    paper's MSE); 'energy': relative to ||y||^2; 'none': plain sum (engine.losses.dc)."""
    backend: Literal["auto", "torch", "kernels"] = "auto"
    """'kernels': kernels.sense.dc_loss; 'torch': engine.losses.dc's own path; 'auto': kernels if present."""


@dataclass
class RegularisersConfig:
    """Hand-crafted regularisers on the image (in the working units, |x| ~ 1)."""

    tv_weight: float = 0.0
    """weight of total variation (0: off)."""
    tv_kind: Literal["isotropic", "anisotropic"] = "isotropic"
    """TV flavour."""
    wavelet_weight: float = 0.0
    """weight of the db3 wavelet L1 norm (the paper: 1e-8)."""
    wavelet_levels: int = 3
    """levels of the db3 transform (the paper: 3)."""


@dataclass
class EarlyStopConfig:
    """Stop when the loss has plateaued.

    Criterion: every `check_every` steps, the mean total loss of the last `check_every` steps is
    compared with the mean of the window before: |previous - current| / current < tolerance counts
    as a calm check (window means, because single-step losses jitter by tens of percent under Adam
    at a constant learning rate; a spike makes the check un-calm).
    """

    enabled: bool = False
    """use the criterion."""
    check_every: int = 50
    """window length and steps between checks."""
    tolerance: float = 0.02
    """relative change of the window-mean loss below which a check counts as calm."""
    patience: int = 2
    """consecutive calm checks needed to stop."""
    min_steps: int = 200
    """never stop before this step."""


@dataclass
class Recon2DConfig:
    """Everything that defines a 2D reconstruction run (configs/*2d.yaml)."""

    model: INRConfig = field(default_factory=INRConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dc: DCConfig = field(default_factory=DCConfig)
    regularisers: RegularisersConfig = field(default_factory=RegularisersConfig)
    prior: PriorTermConfig = field(default_factory=PriorTermConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    autocast_bf16: bool | Literal["auto"] = "auto"
    """run the INR trunk and the prior under bf16 autocast (DC and losses stay float32); 'auto':
    on CUDA only (CPUs without bf16 units gain nothing)."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    seed: int = 0
    """seed of the noise draws of the prior term."""
    progress: bool = True
    """tqdm progress bar with the loss terms."""
    log_every: int = 10
    """steps between history entries."""
    max_bad_steps: int = 10
    """stop after this many consecutive steps with a non-finite loss or gradient."""
    average_last: int = 0
    """return the mean of the images of the last N steps (Polyak averaging: removes the step-to-step
    jitter of Adam at a constant learning rate); 0 = the final image."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def zero_filled_image(kspace: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """sum_c conj(S_c) ifftc(y_c): `(C, ny, nx)` -> `(ny, nx)` complex."""
    return (maps.conj() * ifftc(kspace)).sum(0)


def robust_scale(image: torch.Tensor, percentile: float = 99.0) -> float:
    """The `percentile` of |image| (the prior's intensity convention uses 99)."""
    value = float(torch.quantile(image.abs().flatten().float(), percentile / 100.0))
    if not value > 0:
        raise ValueError("the zero-filled image is zero: no data to reconstruct")
    return value


def learning_rate_factor(step: int, config: OptimConfig) -> float:
    """Multiplier of the peak lr at `step` (warm-up, then the schedule)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps - 1, 1)
    low = config.final_lr_fraction
    if config.schedule == "cosine":
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - low) * progress


class EarlyStopper:
    """Window-mean loss plateau (EarlyStopConfig); `update(step, loss) -> True` when converged."""

    def __init__(self, config: EarlyStopConfig):
        self.config = config
        self.window: list[float] = []
        self.previous_mean: float | None = None
        self.calm_checks = 0
        self.last_change = float("nan")

    def update(self, step: int, loss: float) -> bool:
        c = self.config
        if not c.enabled:
            return False
        self.window.append(loss)
        if (step + 1) % c.check_every:
            return False
        current = sum(self.window) / len(self.window)
        self.window = []
        if self.previous_mean is not None:
            self.last_change = abs(self.previous_mean - current) / max(abs(current), 1e-30)
            self.calm_checks = self.calm_checks + 1 if self.last_change < c.tolerance else 0
        self.previous_mean = current
        return step + 1 >= c.min_steps and self.calm_checks >= c.patience


class NonFiniteGuard:
    """Counts consecutive bad steps; `bad()` returns True when the run must stop."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.consecutive = 0
        self.total = 0

    def ok(self) -> None:
        self.consecutive = 0

    def bad(self) -> bool:
        self.consecutive += 1
        self.total += 1
        return self.consecutive >= self.max_bad_steps


def _as_tensor(array: Any, name: str, complex_expected: bool, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array)
    if complex_expected and not tensor.is_complex():
        raise TypeError(f"{name} must be complex, got {tensor.dtype}")
    dtype = torch.complex64 if complex_expected else torch.float32
    tensor = tensor.to(device=device, dtype=dtype)
    if not torch.isfinite(torch.view_as_real(tensor) if tensor.is_complex() else tensor).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return tensor


def load_prior_for(config: PriorTermConfig, device: torch.device) -> torch.nn.Module:
    """The EDM prior named in the config (the shipped one when `path` is null), frozen."""
    from engine.prior import freeze, load_prior

    return freeze(load_prior(config.path, device=device))


def reconstruct_2d(kspace: Any, maps: Any, mask: Any, config: Recon2DConfig | None = None,
                   reference: Any = None, support: Any = None, prior: torch.nn.Module | None = None
                   ) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit the INR to `kspace` and return its image.

    Args:
        kspace: `(C, ny, nx)` complex64, centred, orthonormal; unsampled entries are ignored.
        maps: coil maps `(C, ny, nx)` complex64.
        mask: sampling mask `(ny, nx)` 0/1.
        config: Recon2DConfig (defaults if None).
        reference, support: optional `(ny, nx)` reference image and 0/1 support: only used to log
            NRMSE in the history.
        prior: an already loaded denoiser (else loaded from `config.prior.path` when the prior is on).
    Returns:
        image `(ny, nx)` complex64 NumPy in the units of `kspace`, and info: seconds, steps
        (iterations run, skipped ones included), prior_evals (U-Net evaluations), scale, stopped ("steps" | "early_stop" | "non_finite"), skipped_steps,
        history (list of dicts: step, lr, total, dc, tv, wavelet, prior[, nrmse_percent]), config.
    """
    config = config or Recon2DConfig()
    device = resolve_device(config.device)
    kspace_t = _as_tensor(kspace, "kspace", True, device)
    maps_t = _as_tensor(maps, "maps", True, device)
    mask_t = _as_tensor(mask, "mask", False, device)
    if kspace_t.ndim != 3 or maps_t.shape != kspace_t.shape or mask_t.shape != kspace_t.shape[1:]:
        raise ValueError(f"expected kspace (C, ny, nx), maps of the same shape and mask (ny, nx); got "
                         f"{tuple(kspace_t.shape)}, {tuple(maps_t.shape)}, {tuple(mask_t.shape)}")
    shape = tuple(kspace_t.shape[1:])
    start = time.perf_counter()

    measured = kspace_t * mask_t
    scale = robust_scale(zero_filled_image(measured, maps_t))
    dc = DataConsistency(measured / scale, maps_t, mask_t, config.dc.normalisation, config.dc.backend)

    model = INR2D(resolve_encoding(config.model, shape)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                 eps=config.optim.eps, fused=True)  # one fused kernel per step (CPU and CUDA)
    generator = torch.Generator().manual_seed(config.seed)
    use_bf16 = device.type == "cuda" if config.autocast_bf16 == "auto" else bool(config.autocast_bf16)
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    prior_term = None
    if config.prior.mode != "off":
        prior = prior if prior is not None else load_prior_for(config.prior, device)
        prior_term = PriorTerm(config.prior, prior, config.optim.steps, generator, autocast_dtype,
                               mask=mask_t).to(device)
    reg = config.regularisers
    stopper = EarlyStopper(config.early_stop)
    guard = NonFiniteGuard(config.max_bad_steps)
    reference_np = None if reference is None else np.asarray(reference)
    support_np = None if support is None else np.asarray(support)

    history: list[dict[str, float]] = []
    recent = collections.deque(maxlen=config.average_last or 1)  # images of the last steps
    prior_evals = 0
    stopped = "steps"
    steps_done = 0
    progress = _progress(config.optim.steps, config.progress)
    for step in range(config.optim.steps):
        steps_done = step + 1  # iterations run, skipped ones included
        for group in optimizer.param_groups:
            group["lr"] = config.optim.lr * learning_rate_factor(step, config.optim)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            image = model.image(shape)  # complex64 (the head casts to float32)
        terms = {"dc": dc(image)}
        if reg.tv_weight:
            terms["tv"] = reg.tv_weight * total_variation(image, reg.tv_kind)
        if reg.wavelet_weight:
            terms["wavelet"] = reg.wavelet_weight * wavelet_l1(image, reg.wavelet_levels)
        if prior_term is not None and prior_term.active(step):
            terms["prior"], evals = prior_term(image.unsqueeze(0), step)
            prior_evals += evals
        total = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(total):
            if guard.bad():
                stopped = "non_finite"
                break
            continue
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            if guard.bad():
                stopped = "non_finite"
                break
            continue
        guard.ok()
        optimizer.step()
        if config.average_last:
            recent.append(image.detach())
        values = {name: float(value.detach()) for name, value in terms.items()}
        if step % config.log_every == 0 or step == config.optim.steps - 1:
            entry = {"step": step, "lr": optimizer.param_groups[0]["lr"], "total": float(total.detach()), **values}
            if reference_np is not None:
                entry["nrmse_percent"] = _nrmse(image.detach() * scale, reference_np, support_np)
            history.append(entry)
        if progress is not None:
            progress.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
            progress.update(1)
        if stopper.update(step, float(total.detach())):
            stopped = "early_stop"
            break
    if progress is not None:
        progress.close()
    if stopped == "non_finite":
        warnings.warn(f"reconstruct_2d stopped at step {step}: {guard.consecutive} consecutive steps had a "
                      f"non-finite loss or gradient (lower the learning rate or the prior weight)", stacklevel=2)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        final = model.image(shape)
    if config.average_last and recent and stopped != "non_finite":
        final = (torch.stack(list(recent)).sum(0) + final) / (len(recent) + 1)
    result = (final * scale).to(torch.complex64)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info = {
        "seconds": time.perf_counter() - start,
        "steps": steps_done,
        "prior_evals": prior_evals,
        "scale": scale,
        "stopped": stopped,
        "skipped_steps": guard.total,
        "last_change": stopper.last_change,
        "history": history,
        "config": config_to_dict(config),
    }
    return result.cpu().numpy(), info


def _nrmse(image: torch.Tensor, reference: np.ndarray, support: np.ndarray | None) -> float:
    """NRMSE (%) of magnitudes inside the support (engine.metrics' definition)."""
    from engine.metrics import nrmse_percent

    return nrmse_percent(image.cpu().numpy(), reference, support)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="recon2d", leave=False, dynamic_ncols=True)


# --- a whole job: read, undersample, reconstruct, compare, write ------------------------------

COMPARISONS = ("zero_filled", "l1_wavelet", "inr")


def plain_inr_config(config: Recon2DConfig) -> Recon2DConfig:
    """The same run with the prior and every regulariser off: the unregularised INR."""
    import dataclasses

    return dataclasses.replace(config, prior=dataclasses.replace(config.prior, mode="off"),
                               regularisers=RegularisersConfig())


def recon2d_job(config: Recon2DConfig, out_dir: str, input_path: str | None = None,
                slice_index: int | None = None, mask_kind: str = "poisson", acceleration: float = 6.0,
                calib: int | None = None, seed: int | None = None, mask_file: str | None = None,
                sampling: str = "auto", calib_width: int = 24, compare: tuple[str, ...] = COMPARISONS,
                overwrite: bool = False) -> dict[str, dict]:
    """Reconstruct one 2D case with INFusion (and the comparisons) and write the run folder.

    Input: `input_path` (anything engine.io.readers.read_input reads; a fastMRI volume needs
    `slice_index`) or, when None, the bundled example (engine.examples.bundled_case_2d). A fully
    sampled input is undersampled with `make_mask(mask_kind, acceleration, calib, seed)` (seed None:
    derived from the case name) and scored against its coil-combined image (ESPIRiT maps from the
    centre unless the input carries maps) inside the maps' support; an undersampled input keeps its
    own mask and gets images only.
    Writes to `out_dir` (refused when not empty unless `overwrite`): recon_<method>.npy,
    mask/reference/support .npy, metrics.json (per method nrmse_percent, psnr_db, ssim, seconds,
    prior_evals), comparison.png, config.yaml (the resolved config) and history.json.
    Returns the per-method metrics.
    """
    import json
    from pathlib import Path

    from engine.baselines import FULLY_SAMPLED_FRACTION, espirit_reference, run_baselines, zero_filled
    from engine.config import save_config
    from engine.physics.coils import espirit_maps, support_mask
    from engine.physics.masks import achieved_acceleration, make_mask, seed_from_case
    from engine.report import prepare_output_dir, write_run

    unknown = set(compare) - set(COMPARISONS)
    if unknown:
        raise ValueError(f"unknown comparison methods {sorted(unknown)}; choose from {list(COMPARISONS)}")
    if sampling not in ("auto", "full", "undersampled"):
        raise ValueError(f"sampling must be 'auto', 'full' or 'undersampled', got {sampling!r}")
    out = prepare_output_dir(out_dir, overwrite)  # fail before any computation
    if input_path is None:
        from engine.examples import bundled_case_2d

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
        if file_maps is not None:
            maps = np.asarray(file_maps, dtype=np.complex64)
            reference, support = zero_filled(kspace, maps), support_mask(maps).astype(bool)
        else:
            maps, reference, support = espirit_reference(kspace, calib_width)
        mask_seed = seed_from_case(name) if seed is None else seed
        mask = make_mask(mask_kind, kspace.shape[1:], acceleration, calib, mask_seed, path=mask_file)
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
        image, info = reconstruct_2d(kspace, maps, mask, run_config, reference, support)
        results[method] = {"image": image, "seconds": info["seconds"], "prior_evals": info["prior_evals"],
                           "steps": info["steps"], "stopped": info["stopped"]}
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
    metrics = write_run(out, results, reference, support, metadata,
                        arrays={"mask": mask, "reference": reference, "support": support}, overwrite=True)
    save_config(config, out / "config.yaml")
    (out / "history.json").write_text(json.dumps(histories, indent=1) + "\n")
    return metrics
