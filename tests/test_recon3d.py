"""engine.recon.fit3d: 2 gloo ranks against 1 process on a tiny hybrid store, slab-local I/O, pieces."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny3d import NX, NY, NZ, TINY, make_tiny_store, tiny_config, tiny_prior

from engine.io.hybrid_store import HybridStore
from engine.physics.fft import fftc
from engine.recon.fit3d import Recon3D, global_percentile
from engine.recon.job3d import run_recon3d
from engine.runtime.bootstrap import init_distributed
from engine.runtime.context import DistContext
from engine.runtime.local_group import launch_local

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    return make_tiny_store(tmp_path_factory.mktemp("store") / "tiny.zarr")


def single_process() -> DistContext:
    return init_distributed(device="cpu", env={})


# ------------------------------------------------------------------ 2 ranks == 1 process


def _steps_with_trunk_grads(recon: Recon3D, steps: int) -> tuple[list, list]:
    """Run `steps` steps; return the drawn rows per step and the trunk gradients of step 0."""
    captured: list = []
    original_step = recon.sync.step

    def step_and_capture():
        if not captured:
            captured.extend(p.grad.clone() for p in recon.trunk.parameters())
        original_step()

    recon.sync.step = step_and_capture
    rows = [recon.step().rows.clone() for _ in range(steps)]
    return rows, captured


def _equivalence_worker(ctx: DistContext, store: str) -> dict:
    import importlib

    recon = Recon3D(tiny_config(), HybridStore(store), ctx, prior=tiny_prior())
    rows, grads = _steps_with_trunk_grads(recon, 4)
    out = {"rows": rows, "grads": grads, "slab": recon.evaluate_slab(), "x_start": recon.x_start}
    # DeepSpeed ZeRO-2 over the same trunk: its first step must give the allreduce trunk.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # skip a JIT build
    first = Recon3D(tiny_config(), HybridStore(store), ctx, prior=tiny_prior())
    first.step()
    ds = Recon3D(tiny_config(grad_sync="deepspeed"), HybridStore(store), ctx, prior=tiny_prior())
    ds.step()
    out["deepspeed_vs_allreduce"] = max(float((a - b).abs().max()) for a, b in
                                        zip(ds.trunk.parameters(), first.trunk.parameters()))
    # its checkpoint state (ZeRO partition per rank) survives a weights_only round trip exactly
    states = []
    for state in (ds.trunk_state(), ds.rank_state()):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        states.append(torch.load(buffer, weights_only=True))
    restored = Recon3D(tiny_config(grad_sync="deepspeed"), HybridStore(store), ctx, prior=tiny_prior())
    restored.load_state(1, *states)
    ds.step(), restored.step()
    out["deepspeed_restored_equal"] = all(torch.equal(a, b) for a, b in
                                          zip(ds.trunk.parameters(), restored.trunk.parameters()))
    return out


@pytest.mark.slow  # 20-40 s on 2 shared cores: a 2-rank launch with DeepSpeed, then one process
@pytest.mark.dist
def test_two_ranks_equal_one_process(tiny_store):
    """Same shards and seed: identical drawn slices, summed trunk gradients equal the
    single-process gradient of the global loss, equal volumes after 4 steps (DC on the drawn
    planes, a full-DC step, tweedie prior, TV); DeepSpeed's first step equals allreduce's, and
    its per-rank checkpoint state restores exactly."""
    pytest.importorskip("deepspeed")
    run = launch_local(_equivalence_worker, 2, args=(str(tiny_store),), timeout_s=240)
    single = Recon3D(tiny_config(), HybridStore(tiny_store), single_process(), prior=tiny_prior())
    rows, grads = _steps_with_trunk_grads(single, 4)
    for step in range(4):
        assert torch.equal(torch.cat([run.results[r]["rows"][step] for r in range(2)]), rows[step])
    assert run.results[0]["x_start"] == 0 and run.results[1]["x_start"] == NX // 2
    for rank in range(2):
        for got, want in zip(run.results[rank]["grads"], grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert run.results[rank]["deepspeed_vs_allreduce"] < 1e-5
        assert run.results[rank]["deepspeed_restored_equal"]
    volume = np.concatenate([run.results[r]["slab"] for r in range(2)])
    np.testing.assert_allclose(volume, single.evaluate_slab(), rtol=1e-4, atol=1e-4 * np.abs(volume).max())


# ------------------------------------------------------------------ slab-local I/O


def _record_chunk_io(log: list) -> None:
    """Record every chunk key this process reads or writes through zarr's LocalStore."""
    import zarr.storage

    store_cls = zarr.storage.LocalStore
    get, set_ = store_cls.get, store_cls.set

    async def logged_get(self, key, *args, **kwargs):
        log.append(("read", Path(str(self.root)).name, key))
        return await get(self, key, *args, **kwargs)

    async def logged_set(self, key, value, *args, **kwargs):
        log.append(("write", Path(str(self.root)).name, key))
        return await set_(self, key, value, *args, **kwargs)

    store_cls.get, store_cls.set = logged_get, logged_set


def _io_worker(ctx: DistContext, store: str, out: str) -> list:
    log: list = []
    _record_chunk_io(log)
    run_recon3d(tiny_config(), store, out, ctx, prior=tiny_prior())
    return log


def _chunk_indices(log: list, action: str, store_name: str, array: str) -> set[int]:
    """Readout-chunk indices of `array` touched: keys 'kspace/c/i/...' (v3) or 'complex/i/...' (v2)."""
    found = set()
    for act, root, key in log:
        parts = key.split("/")
        if act == action and root == store_name and parts[0] == array and not parts[-1].startswith((".z", "zarr")):
            found.add(int(parts[2] if parts[1] == "c" else parts[1]))
    return found


@pytest.mark.dist
def test_ranks_read_and_write_only_their_chunks(tiny_store, tmp_path):
    out = tmp_path / "recon.zarr"
    run = launch_local(_io_worker, 2, args=(str(tiny_store), str(out)), timeout_s=240)
    own = {0: {0, 1}, 1: {2, 3}}  # 4 chunks of 4 readout positions, 2 ranks
    for rank, log in enumerate(run.results):
        for array in ("kspace", "maps", "reference"):
            assert _chunk_indices(log, "read", tiny_store.name, array) == own[rank], (rank, array)
        for array in ("complex", "magnitude"):
            assert _chunk_indices(log, "write", out.name, array) == own[rank], (rank, array)
    from engine.io.ome_zarr import open_volume

    single_out = tmp_path / "single.zarr"
    metrics = run_recon3d(tiny_config(), tiny_store, single_out, single_process(), prior=tiny_prior())
    two_ranks, one = open_volume(out), open_volume(single_out)
    np.testing.assert_allclose(two_ranks.complex[...], one.complex[...], rtol=1e-4,
                               atol=1e-4 * float(np.abs(one.complex[...]).max()))
    assert two_ranks.metrics["nrmse_percent_infusion"] == pytest.approx(metrics["nrmse_percent_infusion"], rel=1e-3)
    assert (tmp_path / "recon_run" / "montage.png").stat().st_size > 1000
    assert (tmp_path / "recon_run" / "log.csv").read_text().count("\n") == TINY["steps"] + 1
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_recon3d(tiny_config(), tiny_store, single_out, single_process(), prior=tiny_prior())


# ------------------------------------------------------------------ pieces


def test_global_percentile_matches_numpy():
    values = torch.rand(10_000, generator=torch.Generator().manual_seed(2)) ** 2
    got = global_percentile(values, 99.0, single_process())
    assert abs(got - float(np.percentile(values.numpy(), 99.0))) < 2 * float(values.max()) / 65536 + 1e-4


def test_single_process_run_is_reproducible_and_bf16_follows_float32(tiny_store):
    a = Recon3D(tiny_config(), HybridStore(tiny_store), single_process(), prior=tiny_prior())
    b = Recon3D(tiny_config(), HybridStore(tiny_store), single_process(), prior=tiny_prior())
    for _ in range(2):
        ra, rb = a.step(), b.step()
        assert torch.equal(ra.rows, rb.rows) and ra.terms == rb.terms
    assert np.array_equal(a.evaluate_slab(), b.evaluate_slab())
    # bf16 autocast of trunk, head and prior follows float32 within bf16 rounding (measured after 4
    # steps: DC and prior terms within 0.2 %, the slab within 0.7 % of its norm)
    half = Recon3D(tiny_config(bf16=True), HybridStore(tiny_store), single_process(), prior=tiny_prior())
    full = Recon3D(tiny_config(), HybridStore(tiny_store), single_process(), prior=tiny_prior())
    for _ in range(4):
        half_terms, full_terms = half.step().terms, full.step().terms
    assert half.bf16 and not full.bf16
    for term in ("dc", "prior"):
        assert half_terms[term] == pytest.approx(full_terms[term], rel=0.02)
    half_slab, full_slab = half.evaluate_slab(), full.evaluate_slab()
    assert half_slab.dtype == np.complex64
    assert 0 < np.linalg.norm(half_slab - full_slab) / np.linalg.norm(full_slab) < 0.03


def test_clear_errors_for_impossible_splits(tiny_store):
    with pytest.raises(ValueError, match=r"slices\.per_step: K=9 must be in \[1, 8\]"):
        Recon3D(tiny_config(slices={"per_step": 9}), HybridStore(tiny_store), single_process())
    with pytest.raises(ValueError, match="cannot be split over 8"):
        Recon3D(tiny_config(slices={"num_shards": 8}), HybridStore(tiny_store), single_process())


def test_job_reports_bad_config_and_existing_output_with_exit_code_2(tiny_store, tmp_path, capsys):
    import yaml

    from engine.recon.job3d import recon3d_job

    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 2\nnot_a_key: 1\n")
    assert recon3d_job(bad) == 2
    assert "not_a_key" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**TINY, "prior": {"mode": "off"}}))
    existing = tmp_path / "exists.zarr"
    existing.mkdir()
    assert recon3d_job(good, [], tiny_store, existing) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_a_non_finite_step_is_skipped_on_every_shard(tiny_store, monkeypatch):
    """A NaN loss on one step changes no parameter; the next steps update again."""
    import engine.recon.fit3d as recon3d_module

    original = recon3d_module.total_variation
    calls = []

    def nan_on_third_call(image, *args, **kwargs):  # 2 shards: call 2 is step 1, shard 0
        calls.append(1)
        value = original(image, *args, **kwargs)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(recon3d_module, "total_variation", nan_on_third_call)
    recon = Recon3D(tiny_config(prior={"mode": "off"}), HybridStore(tiny_store), single_process())
    assert not recon.step().skipped
    before = [p.detach().clone() for p in [*recon.trunk.parameters(), *recon.head.parameters()]]
    result = recon.step()
    assert result.skipped and recon.step_index == 2
    after = [p.detach() for p in [*recon.trunk.parameters(), *recon.head.parameters()]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not recon.step().skipped
    assert not all(torch.equal(a, b) for a, b in zip(before, recon.trunk.parameters()))


@pytest.mark.parametrize("min_k_radius", [0.0, 0.5])
def test_prior_on_unmeasured_frequencies_only_leaves_measured_ones_alone(tiny_store, min_k_radius):
    """unmeasured_only in 3D: the prior term's gradient has no component on the measured (ky, kz), nor,
    with min_k_radius, below that radius (cross slices, which have no mask, compare every point)."""
    from engine.physics.fft import kspace_radius

    cfg = tiny_config(prior={"mode": "tweedie", "distance": "l2", "every": 1, "start_step": 0,
                             "inject_noise": False, "unmeasured_only": True, "min_k_radius": min_k_radius},
                      slices={"per_step": 3, "cross_per_step": 1})
    recon = Recon3D(cfg, HybridStore(tiny_store), single_process(), prior=tiny_prior())
    term = recon.prior_terms[0]
    assert recon.cross_terms[0][0].compared is None
    planes = torch.randn(2, *recon.plane, dtype=torch.complex64, requires_grad=True)
    loss, evals = term(planes, 0)
    loss.backward()
    left_out = recon.mask.bool() | (kspace_radius(recon.plane) < min_k_radius)
    assert evals == 2 and float(loss.detach()) > 0 and bool((~left_out).any())
    assert min_k_radius == 0 or bool((left_out & ~recon.mask.bool()).any())
    spectrum = fftc(planes.grad).abs()
    assert spectrum[:, left_out].max() < 1e-5 * spectrum[:, ~left_out].max()


def test_reused_prior_targets_are_refused_in_3d(tiny_store):
    cfg = tiny_config(prior={"mode": "tweedie", "distance": "l2", "reuse_target": True})
    with pytest.raises(ValueError, match=r"prior\.reuse_target: not available in 3D"):
        Recon3D(cfg, HybridStore(tiny_store), single_process(), prior=tiny_prior())


# ------------------------------------------------------------------ per-plane grids


# with contiguous draws and TV along the readout (rank-local: neighbour pairs never cross a shard)
PLANE_GRIDS = {"plane_grids": {"enabled": True, "levels": 3, "min_res": 4, "max_res": 16, "hidden": 8,
                               "layers": 1, "init_scale": 0.05},
               "slices": {"per_step": 3, "num_shards": 2, "seed": 3, "contiguous": True, "prior_per_step": 2,
                          "cross_per_step": 1, "cross_upsample_x": 2},
               "tv_x_weight": 0.05,
               "wavelet_x_weight": 0.05, "optim": {"lr": 0.01, "ema": 0.5}}


def _first_step_and_volume(recon: Recon3D, steps: int) -> dict:
    """Loss terms and every gradient (trunk with the shared decoder, head rows, plane grids) of
    step 0, then the slab after `steps` steps."""
    captured: dict = {}
    original_step = recon.head_optimizer.step

    def step_and_capture(*args, **kwargs):
        if not captured:
            captured["trunk"] = [p.grad.clone() for p in recon.trunk.parameters()]
            captured["head"] = [p.grad.clone() for p in recon.head.parameters()]
            captured["grids"] = [p.grad.clone() for p in recon.plane_grids.parameters()]
        return original_step(*args, **kwargs)

    recon.head_optimizer.step = step_and_capture
    terms = [recon.step().terms for _ in range(steps)]
    return {**captured, "terms": terms[0], "slab": recon.evaluate_slab(), "x_start": recon.x_start}


def _plane_grid_worker(ctx: DistContext, store: str) -> dict:
    return _first_step_and_volume(Recon3D(tiny_config(**PLANE_GRIDS), HybridStore(store), ctx, prior=tiny_prior()), 4)


@pytest.mark.slow  # about 20 s on 2 shared cores
@pytest.mark.dist
def test_plane_grids_two_ranks_equal_one_process(tiny_store):
    """Per-plane grids (rank-local) with their shared decoder (summed with the trunk), contiguous
    draws, TV and wavelet L1 along the readout, the prior on 2 of the 3 drawn planes, a cross
    slice per shard (assembled across ranks) and the parameter average (optim.ema): 2 gloo ranks
    and 1 process give the same loss, trunk / decoder / head / grid gradients after one step and
    the same volume after 4 steps (a full-DC step included)."""
    run = launch_local(_plane_grid_worker, 2, args=(str(tiny_store),), timeout_s=240)
    single = _first_step_and_volume(Recon3D(tiny_config(**PLANE_GRIDS), HybridStore(tiny_store), single_process(),
                                            prior=tiny_prior()), 4)
    for rank in range(2):
        got = run.results[rank]
        for name in ("dc", "prior", "tv"):
            assert got["terms"][name] == pytest.approx(single["terms"][name], rel=1e-5, abs=1e-9)
        for a, b in zip(got["trunk"], single["trunk"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        rows = slice(got["x_start"], got["x_start"] + NX // 2)
        for a, b in zip(got["head"] + got["grids"], single["head"] + single["grids"]):
            torch.testing.assert_close(a, b[rows], rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in single["grids"])  # the grids are really trained
    volume = np.concatenate([run.results[r]["slab"] for r in range(2)])
    np.testing.assert_allclose(volume, single["slab"], rtol=1e-4, atol=1e-4 * np.abs(volume).max())


def test_plane_grids_refuse_ddp_and_tv_x_needs_contiguous_draws(tiny_store):
    with pytest.raises(ValueError, match="needs grad_sync allreduce"):
        Recon3D(tiny_config(grad_sync="ddp", **PLANE_GRIDS), HybridStore(tiny_store), single_process())
    for key in ("tv_x_weight", "wavelet_x_weight"):
        with pytest.raises(ValueError, match=f"{key} needs slices.contiguous"):
            Recon3D(tiny_config(**{key: 0.1}), HybridStore(tiny_store), single_process())


def test_plane_grid_lines_are_the_planes_pixels_there(tiny_store):
    recon = Recon3D(tiny_config(**PLANE_GRIDS), HybridStore(tiny_store), single_process(), prior=tiny_prior())
    rows = torch.tensor([1, 6, 9])
    with torch.no_grad():
        planes = recon.plane_grids(rows, recon.plane).view(3, *recon.plane, -1)  # (B, ny, nz, features)
        for axis, index in ((0, 0), (0, 5), (0, NY - 1), (1, 0), (1, 3), (1, NZ - 1)):
            line = recon.plane_grids.line(rows, axis, index, recon.plane)
            expected = planes[:, index] if axis == 0 else planes[:, :, index]
            torch.testing.assert_close(line, expected, rtol=1e-5, atol=1e-6)


def test_cross_slices_give_every_row_the_gradient_of_the_prior_on_the_whole_slice(tiny_store):
    """The assembled-slice term (rows rendered per rank, the prior on the whole slice, its gradient
    handed back) equals autograd through the prior on slices cut from the full volume."""
    cfg = tiny_config(plane_grids=PLANE_GRIDS["plane_grids"],
                      slices={"cross_per_step": 2, "cross_upsample_x": 2, "cross_weight": 0.7})
    recon = Recon3D(cfg, HybridStore(tiny_store), single_process(), prior=tiny_prior())
    step = next(s for s in range(20) if {axis for _, axis, _ in recon.cross_slices(s)} == {0, 1})
    draws = recon.cross_slices(step)
    assert len(draws) == 4 and draws == recon.cross_slices(step)  # 2 shards x 2, the same on every call
    streams = [term.generator.get_state() for term in recon.prior_terms]
    params = [*recon.head.parameters(), *recon.plane_grids.parameters(), *recon.trunk.plane_decoder.parameters()]

    def gradients(loss_of_leaf):
        leaf = recon.trunk(recon.plane).detach().requires_grad_(True)
        for p in params:
            p.grad = None
        for term, state in zip(recon.prior_terms, streams):
            term.generator.set_state(state)
        loss = loss_of_leaf(leaf)
        return float(loss.detach()), [leaf.grad.clone()] + [p.grad.clone() for p in params]

    def assembled(leaf):
        loss, surrogate, evals = recon._cross_prior(leaf, step)
        assert evals == 4
        surrogate.backward()
        return loss

    def direct(leaf):
        volume = recon._planes(leaf, torch.arange(NX))
        loss = 0.0
        for shard, axis, index in draws:
            whole = volume[:, index] if axis == 0 else volume[:, :, index]
            term, _ = recon.cross_terms[shard][axis](whole.unsqueeze(0), step)
            loss = loss + 0.7 / len(draws) * term
        loss.backward()
        return loss

    got_loss, got = gradients(assembled)
    want_loss, want = gradients(direct)
    assert got_loss == pytest.approx(want_loss, rel=1e-5) and want_loss > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert float(got[0].abs().max()) > 0


def test_cross_slices_need_the_prior(tiny_store):
    with pytest.raises(ValueError, match="slices.cross_per_step: cross slices need the prior"):
        Recon3D(tiny_config(prior={"mode": "off"}, slices={"cross_per_step": 1}), HybridStore(tiny_store),
                single_process())
    with pytest.raises(ValueError, match="cross_upsample_x"):
        tiny_config(slices={"cross_upsample_x": 0})


def test_prior_per_step_shows_the_prior_a_subset_of_the_drawn_planes(tiny_store):
    evals = {}
    for seen in (0, 2, 3, 5):
        cfg = tiny_config(slices={"per_step": 3, "num_shards": 2, "seed": 3, "prior_per_step": seen})
        evals[seen] = Recon3D(cfg, HybridStore(tiny_store), single_process(), prior=tiny_prior()).step().prior_evals
    assert evals == {0: 6, 2: 4, 3: 6, 5: 6}  # per shard (2 of them): all 3 planes, 2 of them, all 3, all 3
    with pytest.raises(ValueError, match=r"slices.prior_per_step: -1 must be >= 0"):
        Recon3D(tiny_config(slices={"per_step": 3, "prior_per_step": -1}), HybridStore(tiny_store), single_process())


def test_wavelet_l1_of_planes_penalises_the_approximation_only_when_asked():
    """A constant plane has no wavelet detail; as a readout difference it is all approximation,
    which wavelet_x_weight penalises: |c| per pixel (orthogonal transform, 3 levels: 2^3 gain)."""
    from engine.recon.fit3d import wavelet_detail_l1

    constant = torch.full((2, 32, 16), 0.3 + 0.4j, dtype=torch.complex64)
    assert float(wavelet_detail_l1(constant)) == pytest.approx(0.0, abs=1e-6)
    # the coarsest band holds 32 x 16 / 64 coefficients of magnitude 0.5 x 8 each
    assert float(wavelet_detail_l1(constant, include_approximation=True)) == pytest.approx(0.5 * 8 / 64, rel=1e-3)


def test_contiguous_draws_are_neighbours_inside_the_shard():
    from engine.recon.slices import ShardSampler, split_readout

    shard = split_readout(16, 4, 2)[1]  # positions 8..15
    sampler = ShardSampler(shard, 5, seed=1, contiguous=True)
    counts = torch.zeros(16)
    for _ in range(400):
        rows = sampler.draw()
        assert rows.min() >= 8 and rows.max() < 16 and len(set(rows.tolist())) == 5
        pairs = ShardSampler.neighbour_pairs(rows)
        wrapped = rows[0] == 8 and rows[-1] == 15 and rows[-1] - rows[0] != 4
        assert len(pairs) == (3 if wrapped else 4)  # a block that wraps loses the pair across the wrap
        assert torch.all(rows[pairs + 1] - rows[pairs] == 1)
        counts[rows] += 1
    assert counts[:8].sum() == 0 and counts[8:].min() > 0.8 * 400 * 5 / 8  # uniform over the shard


def test_ema_output_averages_the_iterates_and_leaves_the_live_parameters(tiny_store):
    recon = Recon3D(tiny_config(prior={"mode": "off"}, optim={"lr": 0.01, "ema": 0.5}), HybridStore(tiny_store),
                    single_process())
    live = Recon3D(tiny_config(prior={"mode": "off"}), HybridStore(tiny_store), single_process())
    for _ in range(3):
        recon.step(), live.step()
    before = [p.clone() for p in recon.trunk.parameters()]
    averaged = recon.evaluate_slab()
    assert all(torch.equal(a, b) for a, b in zip(before, recon.trunk.parameters()))
    # same iterates (EMA does not touch the optimisation); the output is their average, not the last
    assert all(torch.equal(a, b) for a, b in zip(live.trunk.parameters(), recon.trunk.parameters()))
    assert not np.allclose(averaged, live.evaluate_slab())
    expected = {name: p.detach().clone() for name, p in recon._named_parameters()}
    assert set(recon.ema) == set(expected) and all(recon.ema[n].shape == expected[n].shape for n in expected)
