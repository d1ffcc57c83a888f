"""Issue #5 in 2D: checkpoints of reconstruct_2d and launch/recon2d.py resume bit-identically.

In-process: a fit interrupted after a checkpoint and resumed gives the same image, history and
counters as an uninterrupted one (prior target, Polyak window, early-stop window, RNGs included);
a checkpoint of another config or other data is refused with a diff. Subprocess: launch/recon2d.py
killed with SIGKILL, or stopped with SIGTERM (exit 75), then rerun with --resume, writes the same
image as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import build_config
from engine.physics import sense_operator
from engine.recon.fit2d import Recon2DConfig, reconstruct_2d
from engine.runtime.checkpoint import CheckpointMismatch
from engine.runtime.preemption import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
N = 16


class Denoiser(torch.nn.Module):
    """A smooth stand-in for the prior: D(x; sigma) = x / (1 + sigma^2)."""

    def forward(self, x, sigma):
        return x / (1 + torch.as_tensor(sigma).view(-1, 1, 1, 1) ** 2)


@pytest.fixture(scope="module")
def case():
    y, x = np.meshgrid(np.linspace(-1, 1, N), np.linspace(-1, 1, N), indexing="ij")
    image = (np.exp(-(x ** 2 + y ** 2) * 2) * (1 + 0.5 * (x > 0.2)) * np.exp(1j * 0.5 * x)).astype(np.complex64)
    maps = np.stack([np.exp(-((x - c) ** 2 + y ** 2)) for c in (-1, 1)]).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    mask = (np.random.default_rng(0).random((N, N)) < 0.4).astype(np.float32)
    kspace = sense_operator(torch.from_numpy(maps), torch.from_numpy(mask))(torch.from_numpy(image)).numpy()
    return kspace, maps, mask


def config(**changes) -> Recon2DConfig:
    data = {
        "model": {"encoding": {"kind": "hashgrid", "levels": 3, "log2_table_size": 8, "min_res": 4, "max_res": 16},
                  "hidden": 8, "layers": 1},
        "optim": {"steps": 40, "schedule": "cosine"},
        "regularisers": {"tv_weight": 1e-3},
        "prior": {"mode": "tweedie", "every": 3, "start_step": 4, "reuse_target": True, "inject_noise": True,
                  "distance": "l2", "noise": "loguniform", "unmeasured_only": True},
        "early_stop": {"enabled": True, "check_every": 7, "tolerance": 1e-9, "min_steps": 1000},
        "average_last": 5, "log_every": 3, "progress": False, "device": "cpu",
        "checkpoint": {"every": 10, "keep_last": 2},
    }
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config(Recon2DConfig, data)


class Interrupt(Exception):
    pass


def interrupt_at(step: int):
    def hook(fit):
        if fit.next_step == step:
            raise Interrupt

    return hook


def test_resume_after_an_interruption_is_bit_identical(case, tmp_path):
    kspace, maps, mask = case
    plain, _plain_info = reconstruct_2d(kspace, maps, mask, config(), prior=Denoiser())
    whole, whole_info = reconstruct_2d(kspace, maps, mask, config(), prior=Denoiser(),
                                       checkpoint_dir=tmp_path / "whole")
    assert np.array_equal(plain, whole)  # checkpointing does not perturb the run
    folder = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        reconstruct_2d(kspace, maps, mask, config(), prior=Denoiser(), checkpoint_dir=folder,
                       on_step_end=interrupt_at(27))
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000010", "step-00000020"]
    torch.manual_seed(1234)  # the global RNG state is restored from the checkpoint, not inherited
    resumed, info = reconstruct_2d(kspace, maps, mask, config(), prior=Denoiser(), checkpoint_dir=folder,
                                   resume=True)
    assert info["resumed_from"] == 20
    assert np.array_equal(resumed, whole)
    assert info["history"] == whole_info["history"]
    assert (info["prior_evals"], info["steps"]) == (whole_info["prior_evals"], whole_info["steps"]) == (12, 40)  # prior at steps 4, 7, ..., 37


def test_resume_of_a_finished_fit_returns_its_image(case, tmp_path):
    kspace, maps, mask = case
    first, _ = reconstruct_2d(kspace, maps, mask, config(), prior=Denoiser(), checkpoint_dir=tmp_path)
    again, info = reconstruct_2d(kspace, maps, mask, config(), prior=Denoiser(), checkpoint_dir=tmp_path,
                                 resume=True)
    assert info["resumed_from"] == 40 and np.array_equal(first, again)


def test_a_fresh_fit_refuses_a_folder_with_checkpoints(case, tmp_path):
    kspace, maps, mask = case
    reconstruct_2d(kspace, maps, mask, config(optim={"steps": 10}), prior=Denoiser(), checkpoint_dir=tmp_path)
    with pytest.raises(FileExistsError, match="holds checkpoints of an earlier run"):
        reconstruct_2d(kspace, maps, mask, config(), prior=Denoiser(), checkpoint_dir=tmp_path)


def test_a_checkpoint_of_another_config_or_other_data_is_refused(case, tmp_path):
    kspace, maps, mask = case
    with pytest.raises(Interrupt):
        reconstruct_2d(kspace, maps, mask, config(), prior=Denoiser(), checkpoint_dir=tmp_path,
                       on_step_end=interrupt_at(12))
    with pytest.raises(CheckpointMismatch, match=r"config\.regularisers\.tv_weight: 0\.001 -> 0\.002"):
        reconstruct_2d(kspace, maps, mask, config(regularisers={"tv_weight": 2e-3}), prior=Denoiser(),
                       checkpoint_dir=tmp_path, resume=True)
    other_mask = mask.copy()
    other_mask[0, 0] = 1 - other_mask[0, 0]
    with pytest.raises(CheckpointMismatch, match=r"input\.mask_sha256"):
        reconstruct_2d(kspace, maps, other_mask, config(), prior=Denoiser(), checkpoint_dir=tmp_path, resume=True)
    # what is not part of the result may change: progress bar, checkpoint interval
    _, info = reconstruct_2d(kspace, maps, mask, config(checkpoint={"every": 5}), prior=Denoiser(),
                             checkpoint_dir=tmp_path, resume=True)
    assert info["resumed_from"] == 10


# ---------------------------------------------------------------------------- launch/recon2d.py processes

STEPS = 1500


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory):
    """A fully sampled 4-coil 32 x 32 slice as .npy (the launcher undersamples it)."""
    y, x = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
    image = np.exp(-(x ** 2 + y ** 2) * 3) * (1 + 0.3 * (x > 0))
    coils = np.stack([np.exp(-((x - cx) ** 2 + (y - cy) ** 2)) for cx, cy in [(-1, 0), (1, 0), (0, 1), (0, -1)]])
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coils * image, axes=(-2, -1)), norm="ortho"),
                             axes=(-2, -1)).astype(np.complex64)
    path = tmp_path_factory.mktemp("slice") / "slice.npy"
    np.save(path, kspace)
    return path


def launch(slice_file: Path, out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, str(REPO / "launch" / "recon2d.py"), str(slice_file), "--out", str(out),
            "--accel", "3", "--seed", "0", "--compare", "zero_filled", "--calib-width", "12",
            "--set", "progress=false", "--set", "prior.mode=off", "--set", "regularisers.tv_weight=1e-3",
            "--set", "early_stop.enabled=false", "--set", f"optim.steps={STEPS}", "--set", "checkpoint.every=25",
            "--set", "model.hidden=16", "--set", "model.encoding.log2_table_size=10", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(process: subprocess.Popen, folder: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if folder.is_dir() and any(p.name.startswith("step-") and not p.name.endswith(".partial")
                                   for p in folder.iterdir()):
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint: {process.communicate()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(slice_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    process = launch(slice_file, out)
    _stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert not (out / "checkpoints").exists()  # removed once the run is complete
    return np.load(out / "recon_infusion.npy")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_or_preempted_launch_resumes_bit_identically(how, slice_file, uninterrupted, tmp_path):
    out = tmp_path / "run"
    process = launch(slice_file, out)
    wait_for_checkpoint(process, out / "checkpoints" / "infusion")
    process.send_signal(getattr(signal, how))
    _, stderr = process.communicate(timeout=120)
    if how == "SIGKILL":
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == REQUEUE_EXIT_CODE, stderr
        assert "rerun the same command with --resume" in stderr
    assert not (out / "metrics.json").exists()  # an interrupted run never looks complete
    resumed = launch(slice_file, out, "--resume")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert np.array_equal(np.load(out / "recon_infusion.npy"), uninterrupted)
    metrics = json.loads((out / "metrics.json").read_text())["methods"]
    assert metrics["infusion"]["steps"] == STEPS and metrics["infusion"]["skipped_steps"] == 0
