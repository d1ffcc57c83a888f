"""engine.recon.dc_solve: the final data-consistency solve of a 3D output, and its use by run_recon3d."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny3d import make_tiny_store, tiny_config

from engine.config import ConfigError, load_config
from engine.io.hybrid_store import HybridStore
from engine.io.ome_zarr import open_volume
from engine.physics import sense
from engine.recon.dc_solve import dc_solve
from engine.recon.fit3d import Recon3DConfig
from engine.recon.job3d import run_recon3d
from engine.runtime.bootstrap import init_distributed
from engine.runtime.context import DistContext
from engine.runtime.local_group import launch_local

pytestmark = pytest.mark.usefixtures("one_thread")

SOLVE = {"prior": {"mode": "off"}, "tv_weight": 0.05, "steps": 6, "slices": {"per_step": 2, "num_shards": 2, "seed": 3},
         "dc": {"solve_weight": 0.2, "solve_iterations": 200}}


def _case(planes: int = 2, coils: int = 3, height: int = 5, width: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def complex_normal(*shape):
        return torch.complex(torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator))

    maps = complex_normal(planes, coils, height, width)
    maps = maps / maps.abs().square().sum(1, keepdim=True).sqrt()  # sum_c |S_c|^2 = 1, as ESPIRiT's
    mask = (torch.rand(height, width, generator=generator) < 0.5).float()
    return complex_normal(planes, height, width), maps, mask, complex_normal(planes, coils, height, width)


def test_solve_equals_the_dense_normal_equations_of_each_plane():
    fit, maps, mask, kspace = _case()
    weight = 0.3
    got = dc_solve(fit, kspace * mask, maps, mask, weight, iterations=200)
    n = fit[0].numel()
    for b in range(fit.shape[0]):
        basis = torch.eye(n, dtype=torch.complex64).reshape(n, *fit.shape[1:])
        forward = sense.forward(basis, maps[b], mask).reshape(n, -1).T  # the dense M F S of plane b
        normal = forward.conj().T @ forward + weight * torch.eye(n, dtype=torch.complex64)
        rhs = forward.conj().T @ (kspace[b] * mask).flatten() + weight * fit[b].flatten()
        want = torch.linalg.solve(normal, rhs).reshape(fit.shape[1:])
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)


def test_consistent_planes_stay_and_each_plane_is_solved_on_its_own():
    truth, maps, mask, _ = _case(seed=1)
    noise_free = sense.forward(truth, maps, mask)
    torch.testing.assert_close(dc_solve(truth, noise_free, maps, mask, 0.1, 20), truth)
    fit, _, _, kspace = _case(seed=2)
    both = dc_solve(fit, kspace, maps, mask, 0.1, 20)
    alone = dc_solve(fit[1:], kspace[1:], maps[1:], mask, 0.1, 20)
    torch.testing.assert_close(both[1:], alone)  # a plane's answer does not depend on its neighbours


def test_weight_must_be_positive():
    fit, maps, mask, kspace = _case()
    with pytest.raises(ValueError, match="weight > 0"):
        dc_solve(fit, kspace, maps, mask, 0.0, 5)


@pytest.mark.parametrize("change, message", [("dc.solve_weight=-1", "solve_weight"),
                                             ("dc.solve_iterations=0", "solve_iterations")])
def test_bad_solve_settings_are_refused_at_load(change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Recon3DConfig, None, [change])


def test_solve_and_debias_together_are_refused():
    with pytest.raises(ConfigError, match="choose one"):
        load_config(Recon3DConfig, None, ["dc.solve_weight=0.1", "debias.enabled=true"])


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("store") / "tiny.zarr")


def single_process() -> DistContext:
    return init_distributed(device="cpu", env={})


def _run_worker(ctx: DistContext, store: str, out: str) -> dict:
    return run_recon3d(tiny_config(**SOLVE), store, out, ctx)


@pytest.mark.dist
def test_run_writes_the_solved_fit_and_two_ranks_equal_one_process(tiny_store, tmp_path):
    """The written volume is dc_solve of the plain run's volume (the same fit), the metrics carry both
    errors, and 2 gloo ranks (4 planes' chunks each) write the volume of one process."""
    metrics = run_recon3d(tiny_config(**SOLVE), tiny_store, tmp_path / "solved.zarr", single_process())
    without = {**SOLVE, "dc": {"solve_weight": 0.0}}
    plain = run_recon3d(tiny_config(**without), tiny_store, tmp_path / "plain.zarr", single_process())
    assert metrics["dc_solve"] == {"weight": 0.2, "iterations": 200}
    assert metrics["nrmse_percent_infusion_without_dc_solve"] == pytest.approx(plain["nrmse_percent_infusion"],
                                                                              rel=1e-6)
    assert metrics["nrmse_percent_infusion"] < plain["nrmse_percent_infusion"]  # the tiny fit is far from its data

    store = HybridStore(tiny_store)
    slab = store.read_slab(0, store.shape[0])
    mask = torch.from_numpy(np.asarray(store.mask, np.float32))
    kspace = torch.from_numpy(np.asarray(slab.kspace, np.complex64)) * mask
    fit = torch.from_numpy(np.asarray(open_volume(tmp_path / "plain.zarr").complex[...]))
    # the run solves in its intensity units; the solve is linear in (fit, data) together, so units do not matter
    want = dc_solve(fit, kspace, torch.from_numpy(np.asarray(slab.maps, np.complex64)), mask, 0.2, 200)
    solved = np.asarray(open_volume(tmp_path / "solved.zarr").complex[...])
    np.testing.assert_allclose(solved, want.numpy(), rtol=1e-4, atol=1e-4 * float(np.abs(solved).max()))

    launch_local(_run_worker, 2, args=(str(tiny_store), str(tmp_path / "two.zarr")), timeout_s=240)
    two = np.asarray(open_volume(tmp_path / "two.zarr").complex[...])
    np.testing.assert_allclose(two, solved, rtol=1e-4, atol=1e-4 * float(np.abs(solved).max()))
