"""The learning-rate schedule of the 2D and 3D fits (one rule, so a schedule means the same in both):
optional linear warm-up, then constant, cosine or linear decay to lr * lr_final_fraction at the
last step."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass
class AdamConfig:
    """Adam and its learning-rate schedule: the keys the 2D and 3D `optim` sections share (each
    adds its own: engine.recon.fit2d.OptimConfig, engine.recon.config3d.OptimConfig)."""

    lr: float = 1e-2
    """peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam betas."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """learning-rate decay after warm-up, down to lr * lr_final_fraction at the last step."""
    lr_final_fraction: float = 0.1
    """cosine / linear: final lr as a fraction of lr."""
    warmup_steps: int = 0
    """linear warm-up from 0 over this many steps."""


def lr_factor(step: int, steps: int, schedule: str, lr_final_fraction: float, warmup_steps: int = 0) -> float:
    """Multiplier of the peak lr at `step` of `steps` (warm-up, then `schedule`)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(steps - warmup_steps - 1, 1)
    low = lr_final_fraction
    if schedule == "cosine":
        return low + (1 - low) * (0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / span)))
    if schedule == "linear":
        return 1.0 - (1.0 - low) * ((step - warmup_steps) / span)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")
