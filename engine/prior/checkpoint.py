"""Prior checkpoint format: a folder with weights.pt (a state_dict of tensors, loaded with
``torch.load(weights_only=True)``) and arch.json (architecture, sigma_data, intensity convention,
and whatever the trainer records). Never pickled code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from engine.config import build_config, config_to_dict
from engine.prior.edm import EDMPrior
from engine.prior.intensity import INTENSITY_NORMALISATION
from engine.prior.unet import UNetConfig

WEIGHTS_FILE = "weights.pt"
ARCH_FILE = "arch.json"
FORMAT_VERSION = 1


def default_prior_path() -> Path:
    """engine/assets/prior: the prior shipped with the engine."""
    return Path(__file__).resolve().parent.parent / "assets" / "prior"


def save_prior(directory: str | Path, model: EDMPrior, arch: dict | None = None,
               extra: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model``'s weights and architecture to ``directory`` (created if needed).

    model: the EDMPrior whose state_dict is stored (pass the EMA copy for a trained prior).
    arch: architecture keys (default: model.config); extra: further JSON-serialisable facts
    (training data, steps, ...). dtype: storage dtype of floating tensors (float16 halves the
    file; :func:`load_prior` casts back to float32). Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
        for k, v in model.state_dict().items()
    }
    info = {
        "format_version": FORMAT_VERSION,
        "model": "EDMPrior",
        "unet": arch if arch is not None else config_to_dict(model.config),
        "sigma_data": model.sigma_data,
        "intensity_normalisation": INTENSITY_NORMALISATION,
        "input_layout": "(B, 2, H, W) float32, channels (real, imag)",
        "size_multiple": model.config.size_multiple,
        "weights_dtype": str(dtype).replace("torch.", ""),
    }
    if extra:
        info.update(extra)
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(directory / WEIGHTS_FILE)
    (directory / ARCH_FILE).write_text(json.dumps(info, indent=2, sort_keys=False) + "\n")
    return directory


def read_arch(directory: str | Path) -> dict:
    """The arch.json of a prior folder as a dict."""
    path = Path(directory) / ARCH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"read_arch: no {ARCH_FILE} in {directory}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"read_arch: {path} is not valid JSON: {err}") from err


def load_prior(directory: str | Path | None = None, device: str | torch.device = "cpu") -> EDMPrior:
    """Load a prior folder (default: the shipped one) as a float32 EDMPrior in eval mode."""
    directory = Path(directory) if directory is not None else default_prior_path()
    info = read_arch(directory)
    if info.get("model") != "EDMPrior":
        raise ValueError(f"load_prior: {directory / ARCH_FILE} describes {info.get('model')!r}, not EDMPrior")
    if "unet" not in info or "sigma_data" not in info:
        raise ValueError(f"load_prior: {directory / ARCH_FILE} lacks 'unet' or 'sigma_data'")
    model = EDMPrior(build_config(UNetConfig, info["unet"], source=str(directory / ARCH_FILE),
                                          prefix="unet"), sigma_data=float(info["sigma_data"]))
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"load_prior: no {WEIGHTS_FILE} in {directory}")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"load_prior: {weights} does not match {ARCH_FILE}: {err}") from err
    return model.to(device).eval()


def freeze(model: nn.Module) -> nn.Module:
    """Switch off gradients of every parameter (the prior is fixed during reconstruction)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


__all__ = ["ARCH_FILE", "WEIGHTS_FILE", "default_prior_path", "freeze", "load_prior", "read_arch", "save_prior"]
