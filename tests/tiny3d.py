"""The tiny 3D case of the 3D tests: a hybrid store, a config and a random prior, shared by
test_recon3d, test_checkpoint and test_ome_zarr_output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.config import build_config
from engine.io.data import MulticoilData
from engine.io.hybrid_store import prepare_hybrid_store
from engine.physics.fft import fftc
from engine.recon.fit3d import Recon3DConfig

NX, COILS, NY, NZ, CHUNK_X = 16, 2, 16, 8, 4

TINY = {
    "steps": 4,
    "inr": {"hidden": 16, "layers": 1, "encoding": {"kind": "hashgrid", "levels": 4, "log2_table_size": 10,
                                                    "min_res": 4, "max_res": 16}},
    "slices": {"per_step": 2, "num_shards": 2, "seed": 3},
    "dc": {"full_every": 3, "chunk": 3},
    "prior": {"mode": "tweedie", "distance": "l2", "weight_start": 1.0, "weight_end": 0.5, "weight_scale": 0.1},
    "tv_weight": 0.01,
    "optim": {"lr": 0.01},
    "output": {"progress": False, "eval_rows": 4},
    "baseline": {"l1_wavelet_3d": False},
}


def tiny_config(**changes) -> Recon3DConfig:
    from engine.config import merge_dicts

    return build_config(Recon3DConfig, merge_dicts(TINY, changes))


def tiny_prior():
    """A small random EDM U-Net (seeded): the prior path without the shipped weights."""
    from engine.prior import EDMPrior, UNetConfig

    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    prior = EDMPrior(UNetConfig(base_channels=8, channel_mult=(1, 2), attention_levels=(), groupnorm_groups=4,
                                noise_embedding_channels=16, embedding_mult=2))
    torch.set_rng_state(generator_state)
    return prior.eval()


def make_tiny_store(path: Path) -> Path:
    """A smooth complex volume, 2 random smooth coils, a random mask with a centre: prepared with
    engine.io.prepare_hybrid_store, chunked by 4 along the readout."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (NX, NY, NZ)), indexing="ij")
    image = (np.exp(-(x**2 + 2 * y**2 + z**2) * 2) * np.exp(1j * (x + y))).astype(np.complex64)
    maps = np.stack([np.exp(-((x - c) ** 2 + y**2)) * np.exp(1j * c * z) for c in (-0.5, 0.5)]).astype(np.complex64)
    coil_kspace = fftc(torch.from_numpy(maps * image), dims=(1, 2, 3)).numpy()
    noise = 0.01 * (rng.standard_normal(coil_kspace.shape) + 1j * rng.standard_normal(coil_kspace.shape))
    mask = (rng.random((NY, NZ)) < 0.5).astype(np.float32)
    mask[NY // 2 - 2:NY // 2 + 2, NZ // 2 - 1:NZ // 2 + 1] = 1
    data = MulticoilData(kspace=(coil_kspace + noise).astype(np.complex64), maps=maps, reference=image,
                         source="tiny", layout="3d")
    return prepare_hybrid_store(data, path, mask=mask, chunk_x=CHUNK_X)
