"""A PNG of samples drawn from a prior (Heun sampler, EDM Algorithm 1), magnitude shown."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from engine.prior.edm import EDMPrior
from engine.prior.sampler import sample


@torch.no_grad()
def save_samples_png(model: EDMPrior, path: str | Path, small: int = 64, count_small: int = 6,
                     large: int = 128, steps: int = 18, seed: int = 0) -> dict:
    """Draw ``count_small`` samples of small x small and one of large x large; save their magnitude.

    Returns {"seconds": wall time of the sampling}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = model.eval()
    device = next(model.parameters()).device
    t0 = time.time()
    small_imgs = sample(model, (count_small, 2, small, small), steps=steps, heun=True, seed=seed, device=device)
    large_img = sample(model, (1, 2, large, large), steps=steps, heun=True, seed=seed + 1, device=device)
    seconds = time.time() - t0
    cols = (count_small + 1) // 2
    fig = plt.figure(figsize=(2.2 * cols + 4.4, 4.6))
    grid = fig.add_gridspec(2, cols + 2)
    for i in range(count_small):
        ax = fig.add_subplot(grid[i % 2, i // 2])
        ax.imshow(small_imgs[i].norm(dim=0).cpu(), cmap="gray", vmin=0, vmax=1.2)
        ax.set_title(f"{small}x{small}", fontsize=8)
        ax.axis("off")
    ax = fig.add_subplot(grid[:, cols:])
    ax.imshow(large_img[0].norm(dim=0).cpu(), cmap="gray", vmin=0, vmax=1.2)
    ax.set_title(f"{large}x{large}", fontsize=8)
    ax.axis("off")
    fig.suptitle(f"EDM prior samples, Heun {steps} steps, magnitude (seed {seed})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"seconds": seconds}


__all__ = ["save_samples_png"]
