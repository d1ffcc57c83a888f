"""Tests of the prior trainer: data split and readers, patch sampler, exact resume, DDP, DeepSpeed."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from engine.config import load_config
from engine.prior import load_prior
from engine.prior.data import DataConfig, PatchSampler, VolumeSource, read_volume, training_part
from engine.prior.train import PriorTrainConfig, learning_rate, run_training

REPO = Path(__file__).resolve().parent.parent

TINY_MODEL = {"unet": {"base_channels": 8, "channel_mult": [1, 2], "attention_levels": [1], "attention_heads": 2,
                       "groupnorm_groups": 4, "noise_embedding_channels": 16, "embedding_mult": 2},
              "sigma_data": 0.4}


pytestmark = pytest.mark.usefixtures("one_thread")


def blob_volume(shape=(24, 24, 24), seed: int = 0) -> np.ndarray:
    """A few bright balls: a magnitude volume with structure, (X, Y, Z) float32."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    vol = np.zeros(shape, np.float32)
    for _ in range(6):
        centre = rng.uniform(4, np.array(shape) - 4)
        radius = rng.uniform(3, 7)
        inside = ((grid - centre[:, None, None, None]) ** 2).sum(0) < radius**2
        vol += rng.uniform(0.3, 1.0) * inside
    return vol


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vol") / "blobs.npy"
    np.save(path, blob_volume())
    return path


def tiny_config(volume: Path, out_dir: Path, **train) -> dict:
    base = {"out_dir": str(out_dir), "steps": 4, "batch_size": 2, "log_every": 1, "checkpoint_every": 2,
            "sample_png": False, "progress": False, "threads": 1, "lr_warmup_steps": 2}
    base.update(train)
    return {"model": TINY_MODEL,
            "data": {"volumes": [{"path": str(volume)}], "patch_size": 16, "zoom_range": [0.8, 1.2]},
            "train": base}


def write_config(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_world_z_split_follows_the_affine(tmp_path) -> None:
    nib = pytest.importorskip("nibabel")
    k = np.arange(220, dtype=np.float32)
    vol = np.broadcast_to(k, (3, 4, 220)).copy()  # value = voxel index k
    for name, affine in [("1mm", np.diag([1.0, 1.0, 1.0, 1.0])), ("half", np.diag([0.5, 0.5, 0.5, 1.0]))]:
        affine = affine.copy()
        affine[2, 3] = -71.0 if name == "1mm" else -69.5
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine), str(path))
        data, aff = read_volume(VolumeSource(str(path)))
        part = training_part(data, aff, VolumeSource(str(path), world_z_max_mm=15.0))
        kept = np.unique(part)
        world = aff[2, 3] + aff[2, 2] * kept
        assert world.max() < 15.0 and kept.min() == 0
        expected_last = 85 if name == "1mm" else 168  # ARCHITECTURE.md: k < 86 (1 mm), k < 169 (0.5 mm)
        assert kept.max() == expected_last
        evaluation = training_part(data, aff, VolumeSource(str(path), world_z_min_mm=25.0))
        assert (aff[2, 3] + aff[2, 2] * np.unique(evaluation)).min() >= 25.0
    with pytest.raises(ValueError, match="affine"):
        training_part(vol, None, VolumeSource("x.npy", world_z_max_mm=15.0))


def test_readers_agree(tmp_path, volume_file) -> None:
    h5py = pytest.importorskip("h5py")
    zarr = pytest.importorskip("zarr")
    vol = np.load(volume_file)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["image"] = vol
    zarr.save_array(str(tmp_path / "v.zarr"), vol)
    assert np.array_equal(read_volume(VolumeSource(str(tmp_path / "v.h5"), key="image"))[0], vol)
    assert np.array_equal(read_volume(VolumeSource(str(tmp_path / "v.zarr")))[0], vol)
    with pytest.raises(KeyError, match="key"):
        read_volume(VolumeSource(str(tmp_path / "v.h5"), key="nope"))
    np.save(tmp_path / "flat.npy", vol[0])
    with pytest.raises(ValueError, match="3D"):
        read_volume(VolumeSource(str(tmp_path / "flat.npy")))
    part = training_part(vol, None, VolumeSource("v", voxel_axis=2, voxel_start=0, voxel_stop=10))
    assert part.shape == (24, 24, 10)


def test_patch_sampler(volume_file) -> None:
    cfg = DataConfig(volumes=[VolumeSource(str(volume_file))], patch_size=16, zoom_range=(0.8, 2.0))
    sampler = PatchSampler(cfg)
    assert len(sampler) > 0
    a = sampler.sample(6, torch.Generator().manual_seed(3))
    b = sampler.sample(6, torch.Generator().manual_seed(3))
    assert a.shape == (6, 2, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)  # one generator drives every random choice
    assert torch.isfinite(a).all()
    assert a[:, 1].abs().max() > 0.05  # magnitude volumes get a random phase
    mag = a.norm(dim=1)
    assert 0.3 < mag.max() < 3.0  # slices scaled to p99 = 1, jitter within [1/1.25, 1.25]
    real_cfg = DataConfig(volumes=[VolumeSource(str(volume_file))], patch_size=16, phase_order=-1)
    real = PatchSampler(real_cfg).sample(4, torch.Generator().manual_seed(0))
    assert real[:, 1].abs().max() == 0


def test_learning_rate_schedule() -> None:
    cfg = load_config(PriorTrainConfig, None, ["train.steps=100", "train.lr=0.01", "train.lr_warmup_steps=10",
                             "train.lr_final_fraction=0.1"]).train
    assert learning_rate(0, cfg) == pytest.approx(0.001)
    assert learning_rate(9, cfg) == pytest.approx(0.01)
    assert learning_rate(100, cfg) == pytest.approx(0.001)
    with pytest.raises(ValueError, match="must look like dotted.key=value"):  # engine.config parses --set
        load_config(PriorTrainConfig, None, ["train.steps"])
    with pytest.raises(ValueError, match=r"unknown config key 'train\.stepz'"):
        load_config(PriorTrainConfig, None, ["train.stepz=3"])


def _csv_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("loader_workers", [0, 2], ids=["one-stream", "workers"])
def test_resume_is_exact(tmp_path, volume_file, loader_workers) -> None:
    straight = run_training(load_config(PriorTrainConfig, write_config(
        tmp_path, tiny_config(volume_file, tmp_path / "a", loader_workers=loader_workers))))
    cfg_b = tiny_config(volume_file, tmp_path / "b", stop_at_step=2, loader_workers=loader_workers)
    first = run_training(load_config(PriorTrainConfig, write_config(tmp_path, cfg_b)))
    assert first.summary["steps"] == 2
    cfg_b["train"]["stop_at_step"] = 0
    resumed = run_training(load_config(PriorTrainConfig, write_config(tmp_path, cfg_b)))
    assert resumed.summary["start_step"] == 2
    for mine, theirs in [(resumed.model, straight.model), (resumed.ema, straight.ema)]:
        for (name, p), q in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(p, q), name
    a = torch.load(tmp_path / "a" / "checkpoint" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=True)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    def history(run: str) -> list[tuple]:
        return [(r["step"], r["loss"], r["lr"]) for r in _csv_rows(tmp_path / run / "loss.csv")]

    assert history("a") == history("b") and len(history("a")) == 4
    # The exported prior is the EMA and loads in the checkpoint format.
    prior = load_prior(tmp_path / "b" / "prior")
    torch.testing.assert_close(prior.state_dict()["unet.stem.weight"],
                               resumed.ema.state_dict()["unet.stem.weight"], rtol=1e-3, atol=1e-3)


def test_worker_batches_do_not_depend_on_the_number_of_workers(volume_file) -> None:
    """train.loader_workers: step s's batch is drawn from the generator of (seed, rank, s), so 1 or 2
    worker processes and the training process itself give the same batches; ranks and steps differ."""
    from engine.prior.loader import StepBatches, step_batches
    from engine.prior.train import TrainConfig, draw_batch

    sampler = PatchSampler(DataConfig(volumes=[VolumeSource(path=str(volume_file))], patch_size=16,
                                      zoom_range=(0.8, 1.2)))
    batches = StepBatches(sampler, 2, seed=0, rank=0, draw=draw_batch)
    here = [batches[step] for step in range(3, 6)]
    for workers in (1, 2):
        drawn = list(step_batches(batches, 3, 6, workers))
        assert len(drawn) == 3
        for mine, theirs in zip(drawn, here):
            for a, b in zip(mine, theirs):
                assert torch.equal(a, b)
    assert not torch.equal(here[0][0], here[1][0])  # steps differ
    other_rank = StepBatches(sampler, 2, seed=0, rank=1, draw=draw_batch)[3]
    assert not torch.equal(other_rank[0], here[0][0])
    with pytest.raises(ValueError, match="train.loader_workers must be >= 0"):
        TrainConfig(loader_workers=-1)


def test_init_from_a_prior_folder(tmp_path, volume_file) -> None:
    """train.init_from starts from an exported prior's weights (model and EMA), with a fresh
    optimiser; a folder whose arch.json differs from the model config is refused by name."""
    first = run_training(load_config(PriorTrainConfig, write_config(tmp_path, tiny_config(volume_file, tmp_path / "a"))))
    source = load_prior(tmp_path / "a" / "prior")
    cfg = tiny_config(volume_file, tmp_path / "b", steps=1, lr=0.0, init_from=str(tmp_path / "a" / "prior"))
    cont = run_training(load_config(PriorTrainConfig, write_config(tmp_path, cfg)))
    for name, value in source.state_dict().items():  # lr 0: the weights are the source's exactly
        assert torch.equal(cont.model.state_dict()[name], value), name
    # fresh optimiser: one step, so Adam's step count is 1 (not the 4 + 1 of a resumed run)
    state = torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=True)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {1.0}
    assert first.summary["steps"] == 4
    scratch = run_training(load_config(PriorTrainConfig, write_config(tmp_path, tiny_config(volume_file, tmp_path / "c", steps=1,
                                                                          lr=0.0))))
    assert not torch.equal(scratch.model.state_dict()["unet.stem.weight"], source.state_dict()["unet.stem.weight"])
    wider = tiny_config(volume_file, tmp_path / "d", init_from=str(tmp_path / "a" / "prior"))
    wider["model"] = {"unet": {**TINY_MODEL["unet"], "base_channels": 12}, "sigma_data": 0.4}
    with pytest.raises(ValueError, match=r"does not match the model config \(model.unet.base_channels: config 12"):
        run_training(load_config(PriorTrainConfig, write_config(tmp_path, wider)))
    with pytest.raises(FileNotFoundError, match="init_from"):
        run_training(load_config(PriorTrainConfig, write_config(tmp_path, tiny_config(volume_file, tmp_path / "e",
                                                                    init_from=str(tmp_path / "nope")))))


def _ddp_worker(rank: int, world: int, config_path: str, rendezvous: str, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    result = run_training(load_config(PriorTrainConfig, config_path), init_method=rendezvous)
    torch.save(result.model.state_dict(), Path(out) / f"rank{rank}.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow
def test_ddp_two_ranks_gloo_equal_one_process_on_both_ranks_data(tmp_path, volume_file, monkeypatch) -> None:
    """DDP averages the two ranks' gradients: one process whose batch is both ranks' batches (each
    drawn from that rank's own stream, seed + 1 + 1000 r) must end with the same weights."""
    import torch.multiprocessing as mp

    import engine.prior.train as train_module

    cfg = tiny_config(volume_file, tmp_path / "ddp", steps=2, checkpoint_every=2)
    path = write_config(tmp_path, cfg)
    mp.spawn(_ddp_worker, args=(2, str(path), f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name  # every rank applied the same averaged step
    assert len(_csv_rows(tmp_path / "ddp" / "loss.csv")) == 2

    draw_one_rank = train_module.draw_batch
    seed = load_config(PriorTrainConfig, path).train.seed
    streams = [torch.Generator().manual_seed(seed + 1 + 1000 * rank) for rank in (0, 1)]

    def both_ranks_batches(sampler, batch_size, generator):
        parts = [draw_one_rank(sampler, batch_size, g) for g in streams]
        return tuple(torch.cat(tensors) for tensors in zip(*parts))

    monkeypatch.setattr(train_module, "draw_batch", both_ranks_batches)
    single = run_training(load_config(PriorTrainConfig, write_config(tmp_path, tiny_config(volume_file, tmp_path / "one", steps=2))))
    for name, weight in single.model.state_dict().items():
        torch.testing.assert_close(weight, r0[name], rtol=1e-5, atol=1e-6, msg=name)
    # and rank 0's data alone would have given other weights: the check above sees rank 1's data
    monkeypatch.setattr(train_module, "draw_batch", draw_one_rank)
    alone = run_training(load_config(PriorTrainConfig, write_config(tmp_path, tiny_config(volume_file, tmp_path / "alone", steps=2))))
    assert any(not torch.allclose(p, r0[n], rtol=1e-5, atol=1e-6) for n, p in alone.model.state_dict().items())


@pytest.mark.slow  # DeepSpeed JIT-compiles its CPU Adam / comm op on first use (about a minute)
def test_deepspeed_one_step(tmp_path, volume_file) -> None:
    """ZeRO-2 through launch/train_prior.py: one finite step, the exported prior loads, the
    DeepSpeed checkpoint exists. Skipped only where DeepSpeed or a C++ compiler is missing."""
    import shutil

    pytest.importorskip("deepspeed")
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("DeepSpeed JIT-compiles a C++ op on first use: no g++ / c++ on PATH")
    cfg = tiny_config(volume_file, tmp_path / "ds", steps=1, parallel="deepspeed",
                      deepspeed_config=str(REPO / "configs" / "deepspeed_zero2.json"))
    path = write_config(tmp_path, cfg)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train_prior.py"), "--config", str(path)],
                          check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _csv_rows(tmp_path / "ds" / "loss.csv")
    assert len(rows) == 1 and np.isfinite(float(rows[0]["loss"]))
    assert load_prior(tmp_path / "ds" / "prior") is not None
    assert (tmp_path / "ds" / "checkpoint" / "deepspeed").is_dir()


def test_deepspeed_missing_config_is_clear(tmp_path, volume_file) -> None:
    pytest.importorskip("deepspeed")
    from engine.prior.edm import EDMPrior
    from engine.prior.train import TrainConfig, _deepspeed_engine
    from engine.runtime.context import DistContext

    cfg = TrainConfig(parallel="deepspeed", deepspeed_config=str(tmp_path / "none.json"))
    with pytest.raises(FileNotFoundError, match="deepspeed_config"):
        _deepspeed_engine(EDMPrior(), cfg, DistContext(0, 1, 0, torch.device("cpu")))
