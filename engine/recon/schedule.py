"""The learning-rate schedule of the 2D and 3D fits (one rule, so a schedule means the same in both):
optional linear warm-up, then constant, cosine or linear decay to lr * lr_final_fraction at the
last step."""
from __future__ import annotations

import math


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
