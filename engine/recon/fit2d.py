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
step); it never steers the reconstruction. Checkpoints (optional): the whole state of the fit
(INRFit2D) every `checkpoint.every` steps, at the end and on SIGTERM / SIGUSR1; a resumed fit is
bit-identical to an uninterrupted one. The job around it (read, undersample, compare, write) is
engine.recon.job2d.
"""
from __future__ import annotations

import collections
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from engine.config import config_to_dict
from engine.losses.dc import Backend, DataConsistency
from engine.losses.prior_term import PriorTerm, PriorTermConfig
from engine.losses.tv import total_variation
from engine.losses.wavelet import wavelet_l1
from engine.models.inr import INR2D, INRConfig, resolve_encoding
from engine.physics import sense
from engine.recon.schedule import AdamConfig, lr_factor
from engine.recon.selection2d import SelectionConfig
from engine.runtime.checkpoint import CheckpointConfig, capture_rng_state, restore_rng_state
from engine.runtime.preemption import Preempted, PreemptionFlag


@dataclass
class OptimConfig(AdamConfig):
    """Adam and its learning-rate schedule (the shared keys: engine.recon.schedule.AdamConfig)."""

    steps: int = 300
    """maximum number of Adam steps."""
    eps: float = 1e-15
    """Adam epsilon (hash-grid tables get tiny, sparse gradients; Instant-NGP uses 1e-15)."""
    grad_clip: float | None = None
    """clip the gradient norm to this value (null: no clipping)."""


@dataclass
class DCConfig:
    """Data-consistency term."""

    normalisation: Literal["samples", "energy", "none", "array"] = "samples"
    """'samples': mean over measured samples; 'array': mean over the whole k-space array (the
    paper's MSE); 'energy': relative to ||y||^2; 'none': plain sum (engine.losses.dc)."""
    backend: Backend = "auto"
    """kernels.sense backend: 'triton' (fused kernels, CUDA), 'torch' (engine.physics.sense) or 'auto'
    (Triton for CUDA tensors with even plane sizes, torch otherwise)."""


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
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """label-free per-case choice of TV weight, prior weight and stop on held-out k-space
    (engine.recon.selection2d); off by default, on in configs/auto2d.yaml."""
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=100))
    """checkpoints of launch/recon2d.py runs (every n steps, at the end and on SIGTERM / SIGUSR1);
    not part of the config hash a resumed run is checked against."""
    bf16: bool | None = None
    """run the INR trunk and the prior under bf16 autocast (DC and losses stay float32); null:
    on where the device supports it (CUDA with bf16; CPUs without bf16 units gain nothing)."""
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
    return sense.adjoint(kspace, maps)


def robust_scale(image: torch.Tensor, percentile: float = 99.0) -> float:
    """The `percentile` of |image| (the prior's intensity convention uses 99)."""
    value = float(torch.quantile(image.abs().flatten().float(), percentile / 100.0))
    if not value > 0:
        raise ValueError("the zero-filled image is zero: no data to reconstruct")
    return value


def learning_rate_factor(step: int, config: OptimConfig) -> float:
    """Multiplier of the peak lr at `step` (engine.recon.schedule, the rule 3D uses too)."""
    return lr_factor(step, config.steps, config.schedule, config.lr_final_fraction, config.warmup_steps)


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


class INRFit2D:
    """The state of one 2D fit (model, optimiser, prior term, RNGs, counters) and its step.

    Split from `reconstruct_2d` so that the whole state can be checkpointed and restored
    (`state_dict` / `load_state_dict`) and a resumed run continues bit-identically.
    """

    def __init__(self, kspace_t: torch.Tensor, maps_t: torch.Tensor, mask_t: torch.Tensor,
                 config: Recon2DConfig, device: torch.device, prior: torch.nn.Module | None,
                 reference: np.ndarray | None, support: np.ndarray | None):
        self.config, self.device = config, device
        self.shape = tuple(kspace_t.shape[1:])
        measured = kspace_t * mask_t
        self.scale = robust_scale(zero_filled_image(measured, maps_t))
        self.dc = DataConsistency(measured / self.scale, maps_t, mask_t, config.dc.normalisation, config.dc.backend)
        self.model = INR2D(resolve_encoding(config.model, self.shape)).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                          eps=config.optim.eps, fused=True)  # one fused kernel per step
        self.generator = torch.Generator().manual_seed(config.seed)
        self.use_bf16 = (device.type == "cuda" and torch.cuda.is_bf16_supported()) if config.bf16 is None else config.bf16
        self.prior_term = None
        if config.prior.mode != "off":
            prior = prior if prior is not None else load_prior_for(config.prior, device)
            self.prior_term = PriorTerm(config.prior, prior, config.optim.steps, self.generator,
                                        torch.bfloat16 if self.use_bf16 else None, mask=mask_t).to(device)
        self.stopper = EarlyStopper(config.early_stop)
        self.guard = NonFiniteGuard(config.max_bad_steps)
        self.reference, self.support = reference, support
        self.history: list[dict[str, Any]] = []
        self.recent: collections.deque = collections.deque(maxlen=config.average_last or 1)
        self.prior_evals = 0
        self.next_step = 0
        self.stopped: str | None = None  # "steps" | "early_stop" | "non_finite" once finished
        self.seconds_before = 0.0  # wall time spent by earlier processes of a resumed run

    def step(self) -> dict[str, float] | None:
        """One Adam step at `self.next_step`; returns the loss terms, or None when it was skipped."""
        config, step = self.config, self.next_step
        self.next_step += 1
        for group in self.optimizer.param_groups:
            group["lr"] = config.optim.lr * learning_rate_factor(step, config.optim)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            image = self.model.image(self.shape)  # complex64 (the head casts to float32)
        terms = {"dc": self.dc(image)}
        reg = config.regularisers
        if reg.tv_weight:
            terms["tv"] = reg.tv_weight * total_variation(image, reg.tv_kind)
        if reg.wavelet_weight:
            terms["wavelet"] = reg.wavelet_weight * wavelet_l1(image, reg.wavelet_levels)
        if self.prior_term is not None and self.prior_term.active(step):
            terms["prior"], evals = self.prior_term(image.unsqueeze(0), step)
            self.prior_evals += evals
        total = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(total):
            return self._skip(step, "non-finite loss")
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(step, "non-finite gradient")
        self.guard.ok()
        self.optimizer.step()
        if config.average_last:
            self.recent.append(image.detach())
        values = {name: float(value.detach()) for name, value in terms.items()}
        if step % config.log_every == 0 or step == config.optim.steps - 1:
            entry = {"step": step, "lr": self.optimizer.param_groups[0]["lr"], "total": float(total.detach()), **values}
            if self.reference is not None:
                entry["nrmse_percent"] = _nrmse(image.detach() * self.scale, self.reference, self.support)
            self.history.append(entry)
        if self.stopper.update(step, float(total.detach())):
            self.stopped = "early_stop"
        elif self.next_step >= config.optim.steps:
            self.stopped = "steps"
        return values

    def _skip(self, step: int, why: str) -> None:
        self.history.append({"step": step, "skipped": why})
        if self.guard.bad():
            self.stopped = "non_finite"
        elif self.next_step >= self.config.optim.steps:
            self.stopped = "steps"

    def final_image(self) -> torch.Tensor:
        """The image in the units of the data (complex64), averaged over the last steps if configured."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            final = self.model.image(self.shape)
        if self.config.average_last and self.recent and self.stopped != "non_finite":
            final = (torch.stack(list(self.recent)).sum(0) + final) / (len(self.recent) + 1)
        return (final * self.scale).to(torch.complex64)

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self, seconds: float) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain values (torch.load weights_only)."""
        stopper, target = self.stopper, getattr(self.prior_term, "target", None)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "rng": capture_rng_state(),
            "prior_target": None if target is None else target.detach().cpu(),
            "stopper": {"window": list(stopper.window), "previous_mean": stopper.previous_mean,
                        "calm_checks": stopper.calm_checks, "last_change": stopper.last_change},
            "guard": {"consecutive": self.guard.consecutive, "total": self.guard.total},
            "recent": [image.cpu() for image in self.recent],
            "history": self.history,
            "prior_evals": self.prior_evals,
            "next_step": self.next_step,
            "stopped": self.stopped,
            "seconds": seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        restore_rng_state(state["rng"])
        if self.prior_term is not None and state["prior_target"] is not None:
            self.prior_term.target = state["prior_target"].to(self.device)
        for key, value in state["stopper"].items():
            setattr(self.stopper, key, value)
        self.guard.consecutive, self.guard.total = state["guard"]["consecutive"], state["guard"]["total"]
        self.recent.clear()
        self.recent.extend(image.to(self.device) for image in state["recent"])
        self.history = list(state["history"])
        self.prior_evals, self.next_step = state["prior_evals"], state["next_step"]
        self.stopped, self.seconds_before = state["stopped"], state["seconds"]


# Config keys that do not change the numbers a run produces: left out of the checkpoint hash.
_NOT_HASHED = ("progress", "checkpoint")


def fit_description(config: Recon2DConfig, kspace_t: torch.Tensor, mask_t: torch.Tensor) -> dict:
    """What a checkpoint must match to be resumed: the config and the data (shape and hashes)."""
    import hashlib

    def digest(tensor: torch.Tensor) -> str:
        return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]

    hashed = {key: value for key, value in config_to_dict(config).items() if key not in _NOT_HASHED}
    return {"config": hashed, "input": {"shape": list(kspace_t.shape), "kspace_sha256": digest(kspace_t * mask_t),
                                        "mask_sha256": digest(mask_t)}}


def reconstruct_2d(kspace: Any, maps: Any, mask: Any, config: Recon2DConfig | None = None,
                   reference: Any = None, support: Any = None, prior: torch.nn.Module | None = None,
                   checkpoint_dir: str | Path | None = None, resume: bool = False,
                   on_step_end: Callable[[INRFit2D], None] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit the INR to `kspace` and return its image.

    Args:
        kspace: `(C, ny, nx)` complex64, centred, orthonormal; unsampled entries are ignored.
        maps: coil maps `(C, ny, nx)` complex64.
        mask: sampling mask `(ny, nx)` 0/1.
        config: Recon2DConfig (defaults if None).
        reference, support: optional `(ny, nx)` reference image and 0/1 support: only used to log
            NRMSE in the history.
        prior: an already loaded denoiser (else loaded from `config.prior.path` when the prior is on).
        checkpoint_dir: when given, the fit is checkpointed there every `config.checkpoint.every`
            steps, at the end, and on SIGTERM / SIGUSR1 (then `Preempted` is raised).
        resume: continue from the newest complete checkpoint in `checkpoint_dir` (refused with a
            diff when it was written with another config or other data; a fresh start if none).
        on_step_end: called with the fit after every step (tests use it to interrupt a run).
    Returns:
        image `(ny, nx)` complex64 NumPy in the units of `kspace`, and info: seconds, steps
        (iterations run, skipped ones included), prior_evals (U-Net evaluations), scale, stopped
        ("steps" | "early_stop" | "non_finite"), skipped_steps, history (list of dicts: step, lr,
        total, dc, tv, wavelet, prior[, nrmse_percent]; a skipped step logs {step, skipped: why}),
        resumed_from (step or None), config.
        With `config.selection.enabled` the work is done by
        engine.recon.selection2d.select_and_reconstruct_2d (its info adds `selection` and
        `unrefit_image`); those runs are not checkpointed, `checkpoint_dir` and `resume` are unused.
    """
    config = config or Recon2DConfig()
    if config.selection.enabled:
        from engine.recon.selection2d import select_and_reconstruct_2d

        return select_and_reconstruct_2d(kspace, maps, mask, config, reference, support, prior)
    device = resolve_device(config.device)
    kspace_t = _as_tensor(kspace, "kspace", True, device)
    maps_t = _as_tensor(maps, "maps", True, device)
    mask_t = _as_tensor(mask, "mask", False, device)
    if kspace_t.ndim != 3 or maps_t.shape != kspace_t.shape or mask_t.shape != kspace_t.shape[1:]:
        raise ValueError(f"expected kspace (C, ny, nx), maps of the same shape and mask (ny, nx); got "
                         f"{tuple(kspace_t.shape)}, {tuple(maps_t.shape)}, {tuple(mask_t.shape)}")
    start = time.perf_counter()
    fit = INRFit2D(kspace_t, maps_t, mask_t, config, device, prior,
                   None if reference is None else np.asarray(reference),
                   None if support is None else np.asarray(support))
    manager, description, resumed_from = None, None, None
    if checkpoint_dir is not None:
        from engine.runtime.checkpoint import CheckpointManager
        from engine.runtime.context import DistContext

        manager = CheckpointManager(checkpoint_dir, DistContext(), config.checkpoint.keep_last)
        description = fit_description(config, kspace_t, mask_t)
        if not resume:
            manager.start_fresh(False, "resume from them or remove the folder")
        loaded = manager.load_latest(description) if resume else None
        if loaded is not None:
            resumed_from, state, _ = loaded
            fit.load_state_dict(state)

    def elapsed() -> float:
        return fit.seconds_before + time.perf_counter() - start

    def save() -> Path:
        return manager.save(fit.next_step, fit.state_dict(elapsed()), {}, description)

    flag = PreemptionFlag().install() if manager is not None else None
    progress = _progress(config.optim.steps, config.progress, fit.next_step)
    try:
        while fit.stopped is None:
            values = fit.step()
            if progress is not None:
                if values is not None:
                    progress.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
                progress.update(1)
            if on_step_end is not None:
                on_step_end(fit)
            if manager is None:
                continue
            if flag.raised and fit.stopped is None:
                raise Preempted(fit.next_step, save())
            every = config.checkpoint.every
            if fit.stopped is not None or (every and fit.next_step % every == 0):
                save()
    finally:
        if flag is not None:
            flag.uninstall()
        if progress is not None:
            progress.close()
    if fit.stopped == "non_finite":
        warnings.warn(f"reconstruct_2d stopped at step {fit.next_step - 1}: {fit.guard.consecutive} consecutive "
                      f"steps had a non-finite loss or gradient (lower the learning rate or the prior weight)",
                      stacklevel=2)
    result = fit.final_image()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info = {
        "seconds": elapsed(),
        "steps": fit.next_step,
        "prior_evals": fit.prior_evals,
        "scale": fit.scale,
        "stopped": fit.stopped,
        "skipped_steps": fit.guard.total,
        "last_change": fit.stopper.last_change,
        "history": fit.history,
        "resumed_from": resumed_from,
        "config": config_to_dict(config),
    }
    return result.cpu().numpy(), info


def _nrmse(image: torch.Tensor, reference: np.ndarray, support: np.ndarray | None) -> float:
    """NRMSE (%) of magnitudes inside the support (engine.evaluation.metrics' definition)."""
    from engine.evaluation.metrics import nrmse_percent

    return nrmse_percent(image.cpu().numpy(), reference, support)


def _progress(total: int, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (batch logs stay free of carriage returns)
    return tqdm(total=total, initial=initial, desc="recon2d", leave=False, dynamic_ncols=True, disable=None)
