"""Sampling masks: density ~ 1/R, seeding (reproducible, case-dependent), ACS, file loading."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest

from engine.physics.masks import (
    MASK_KINDS,
    achieved_acceleration,
    equispaced_1d_mask,
    load_mask,
    make_mask,
    max_acceleration,
    poisson_disc_mask,
    random_1d_mask,
    seed_from_case,
)

SHAPE = (80, 96)


def test_seed_from_case_is_stable_and_case_dependent():
    # Pinned: Python's hash() is salted per process; CRC-32 is the same on every machine and run.
    assert seed_from_case("file1000001.h5") == 0x803FC76F
    seeds = {seed_from_case(f"case{i}") for i in range(50)}
    assert len(seeds) == 50
    assert all(0 <= s < 2**32 for s in seeds)
    with pytest.raises(ValueError, match="non-empty string"):
        seed_from_case("")


@pytest.mark.parametrize("acceleration", [4, 6])
@pytest.mark.parametrize("calib", [(0, 0), (16, 12)])
def test_poisson_density_calibration_and_variable_density(acceleration, calib):
    mask = poisson_disc_mask(SHAPE, acceleration, calib=calib, seed=seed_from_case("poisson"))
    assert mask.shape == SHAPE and mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}
    # sigpy stops its bisection within tol = 0.1 of the requested R.
    assert abs(achieved_acceleration(mask) - acceleration) < 0.1
    cy, cx = calib
    if cy:
        box = mask[
            SHAPE[0] // 2 - cy // 2 : SHAPE[0] // 2 + cy // 2,
            SHAPE[1] // 2 - cx // 2 : SHAPE[1] // 2 + cx // 2,
        ]
        assert box.shape == calib and box.all()
    # Variable density: the central quarter is sampled more densely than the periphery.
    y, x = np.mgrid[: SHAPE[0], : SHAPE[1]]
    radius = np.hypot((y - SHAPE[0] // 2) / SHAPE[0], (x - SHAPE[1] // 2) / SHAPE[1])
    assert mask[radius < 0.15].mean() > 2 * mask[radius > 0.35].mean()


def test_poisson_reproducible_case_dependent_and_leaves_global_rng_alone():
    state = np.random.get_state()[1].copy()
    a = poisson_disc_mask(SHAPE, 5, seed=seed_from_case("case-a"))
    b = poisson_disc_mask(SHAPE, 5, seed=seed_from_case("case-a"))
    c = poisson_disc_mask(SHAPE, 5, seed=seed_from_case("case-b"))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.05
    np.testing.assert_array_equal(np.random.get_state()[1], state)


@pytest.mark.parametrize(
    "maker", [random_1d_mask, equispaced_1d_mask], ids=["random", "equispaced"]
)
@pytest.mark.parametrize("acceleration, center_fraction", [(4, 0.08), (8, 0.04)])
def test_1d_masks_lines_acs_and_density(maker, acceleration, center_fraction):
    shape = (64, 368)
    masks = [maker(shape, acceleration, center_fraction, seed=s) for s in range(20)]
    for mask in masks:
        assert mask.shape == shape and mask.dtype == np.float32
        # Lines along the last axis: every selected column is fully sampled along ny.
        assert (mask == mask[:1]).all()
        num_low = round(shape[1] * center_fraction)
        start = (shape[1] - num_low + 1) // 2
        assert mask[:, start : start + num_low].all()
        assert start <= shape[1] // 2 < start + num_low
    mean_density = np.mean([m.mean() for m in masks])
    # Random: the expected density is exactly 1/R; 20 draws of 368 columns give a mean with
    # sd ~ 0.002 (1.6 % of 1/8).
    # Equispaced: rounding of the spacing and overlap with the ACS move it by a few lines.
    assert mean_density == pytest.approx(1 / acceleration, rel=0.03)
    assert maker is equispaced_1d_mask or not all((m == masks[0]).all() for m in masks[1:])


def test_equispaced_outer_lines_are_evenly_spaced():
    mask = equispaced_1d_mask((8, 320), 8, 0.04, seed=3)[0]
    num_low = round(320 * 0.04)
    start = (320 - num_low + 1) // 2
    outer = np.flatnonzero(mask)
    outer = outer[(outer < start) | (outer >= start + num_low)]
    gaps = np.diff(outer)
    gaps = gaps[gaps < 2 * gaps.min()]  # the gap that straddles the ACS block is not a spacing
    assert gaps.max() - gaps.min() <= 1


def test_1d_mask_rejects_acs_wider_than_budget():
    with pytest.raises(ValueError, match="ACS columns"):
        random_1d_mask((16, 100), 8, 0.2)


def test_make_mask_dispatch_and_calib_semantics(tmp_path):
    seed = seed_from_case("dispatch")
    np.testing.assert_array_equal(
        make_mask("poisson", SHAPE, 4, calib=12, seed=seed),
        poisson_disc_mask(SHAPE, 4, (12, 12), seed),
    )
    np.testing.assert_array_equal(
        make_mask("poisson", SHAPE, 4, seed=seed), poisson_disc_mask(SHAPE, 4, (0, 0), seed)
    )
    # 1D: calib is the number of ACS columns; None is fastMRI's 0.32 / R (0.08 at R = 4).
    np.testing.assert_array_equal(
        make_mask("random1d", SHAPE, 4, calib=10, seed=seed),
        random_1d_mask(SHAPE, 4, 10 / SHAPE[1], seed),
    )
    np.testing.assert_array_equal(
        make_mask("equispaced1d", SHAPE, 4, seed=seed), equispaced_1d_mask(SHAPE, 4, 0.08, seed)
    )
    path = tmp_path / "m.npy"
    np.save(path, make_mask("random1d", SHAPE, 4, seed=seed))
    np.testing.assert_array_equal(make_mask("file", SHAPE, path=path), np.load(path))
    assert set(MASK_KINDS) == {"poisson", "random1d", "equispaced1d", "file"}
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_mask("spiral", SHAPE, 4)
    with pytest.raises(ValueError, match="needs a path"):
        make_mask("file", SHAPE)
    with pytest.raises(ValueError, match="acceleration must be a finite number > 1"):
        make_mask("poisson", SHAPE, 1.0)


def test_load_mask_formats(tmp_path, rng):
    mask = (rng.uniform(size=SHAPE) < 0.3).astype(np.float32)
    np.save(tmp_path / "m.npy", mask.astype(bool))
    np.savez(tmp_path / "m.npz", mask=mask)
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["mask"] = mask.astype(np.uint8)
    for name in ("m.npy", "m.npz", "m.h5"):
        loaded = load_mask(tmp_path / name, SHAPE)
        assert loaded.dtype == np.float32
        np.testing.assert_array_equal(loaded, mask)
    # A 1D line mask (fastMRI's layout) broadcasts along ny.
    line = mask[0] > 0
    line[SHAPE[1] // 2] = True
    np.save(tmp_path / "line.npy", line)
    np.testing.assert_array_equal(
        load_mask(tmp_path / "line.npy", SHAPE), np.broadcast_to(line, SHAPE)
    )


def test_load_mask_clear_errors(tmp_path):
    np.save(tmp_path / "wrong_shape.npy", np.ones((10, 10)))
    np.save(tmp_path / "empty.npy", np.zeros(SHAPE))
    np.save(tmp_path / "weights.npy", np.full(SHAPE, 0.5))
    np.save(tmp_path / "cube.npy", np.ones((2, *SHAPE)))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["sampling"] = np.ones(SHAPE)
    (tmp_path / "mask.txt").write_text("1 0 1")
    cases = {
        "wrong_shape.npy": "does not match k-space shape",
        "empty.npy": "samples no k-space point",
        "weights.npy": "only 0 and 1",
        "cube.npy": "must be 2D",
        "other.h5": "no dataset 'mask'",
        "mask.txt": "unsupported format",
        "missing.npy": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
            load_mask(tmp_path / name, SHAPE)
        assert name in str(info.value)


def test_achieved_acceleration():
    mask = np.zeros((10, 10), np.float32)
    mask[:, ::4] = 1
    assert achieved_acceleration(mask) == pytest.approx(100 / 30)
    with pytest.raises(ValueError, match="samples no"):
        achieved_acceleration(np.zeros((4, 4)))


# ------------------------------------------------------------ issue 16: every R ends in bounded time


@pytest.mark.parametrize("shape, acceleration, seed, calib", [
    ((192, 192), 6, 123, (0, 0)), ((64, 40), 4, 5, (0, 0)), ((256, 256), 8, 1, (24, 24)), ((180, 230), 8, 3, (0, 0)),
])
def test_poisson_mask_is_sigpys_where_sigpy_returns(shape, acceleration, seed, calib):
    """The bounded search draws sigpy.mri.poisson's masks, so results measured before stay."""
    import sigpy.mri

    expected = sigpy.mri.poisson(shape, acceleration, calib=calib, dtype=np.float32, seed=seed, tol=0.1)
    np.testing.assert_array_equal(poisson_disc_mask(shape, acceleration, calib, seed), expected)


@pytest.mark.parametrize("shape, calib, largest", [
    ((192, 192), None, 192 * 192 / 50),  # N / 50: R within 1 %
    ((64, 40), None, 51.2),
    ((16, 8), None, (0.2 * 128) ** 0.5),  # small planes: N / k spaced by more than 2 x 0.1 beyond sqrt(0.2 N)
    ((64, 40), 10, 2560 / 100),  # the calibration box alone
])
def test_poisson_refuses_beyond_the_bound_at_once_and_reaches_just_under_it(shape, calib, largest):
    assert max_acceleration("poisson", shape, calib) == pytest.approx(largest)
    for too_high in (largest * 1.01, 1000.0):
        started = time.perf_counter()
        with pytest.raises(ValueError, match=rf"acceleration {too_high:g} is out of reach .*the largest is "
                                             rf"{largest:.4g}"):
            make_mask("poisson", shape, too_high, calib, seed=0)
        assert time.perf_counter() - started < 1.0  # refused before any draw
    for seed in range(3):  # high R: the search jumps over the tolerance and the nearest denser draw is thinned
        mask = make_mask("poisson", shape, largest * 0.98, calib, seed=seed)
        assert achieved_acceleration(mask) == pytest.approx(largest * 0.98, rel=0.011)
        if calib:  # thinning never touches the fully sampled calibration box
            cy, cx = shape[0] // 2, shape[1] // 2
            assert mask[cy - calib // 2:cy + calib // 2, cx - calib // 2:cx + calib // 2].all()


def test_poisson_high_acceleration_that_used_to_hang_returns():
    """R = 50 at 192 x 192 never returned from sigpy (a float bisection that cannot end)."""
    started = time.perf_counter()
    mask = make_mask("poisson", (192, 192), 50.0, None, seed=0)
    assert time.perf_counter() - started < 10.0
    assert achieved_acceleration(mask) == pytest.approx(50.0, rel=0.01)


def test_poisson_refuses_below_the_densest_draw():
    with pytest.raises(ValueError, match=r"acceleration 1\.2 is out of reach .*the densest Poisson-disc mask has R = 1\.4"):
        make_mask("poisson", (64, 40), 1.2, None, seed=0)


@pytest.mark.parametrize("bad", [1.0, 0.5, -3.0, float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["poisson", "random1d", "equispaced1d"])
def test_every_kind_refuses_non_accelerations(kind, bad):
    with pytest.raises(ValueError, match=r"acceleration must be a finite number > 1"):
        make_mask(kind, SHAPE, bad, None, seed=0)


@pytest.mark.parametrize("kind", ["random1d", "equispaced1d"])
def test_line_masks_bound_by_the_lines(kind):
    assert max_acceleration(kind, SHAPE) == SHAPE[1]
    assert max_acceleration(kind, SHAPE, 8) == SHAPE[1] / 8
    assert make_mask(kind, SHAPE, SHAPE[1], None, seed=1)[0].sum() >= 1
    with pytest.raises(ValueError, match=rf"out of reach for a line mask of {SHAPE[1]} columns: with one line"):
        make_mask(kind, SHAPE, SHAPE[1] + 1, None, seed=0)
    with pytest.raises(ValueError, match=r"with 8 ACS columns, R must stay below 12"):
        make_mask(kind, SHAPE, 12, 8, seed=0)
