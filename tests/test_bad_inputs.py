"""Issue #5: every class of bad input is refused before any long work, by every command line.

Each case makes its broken file in tmp_path, runs the launcher's `main(argv)` in-process and
checks: exit code 2, exactly one line on stderr that names the file, the dataset / array and the
problem, and no output created (or an existing one left byte for byte as it was). Then the
interrupted-write cases (nothing half-written may look complete) and the NaN/Inf guard of the
2D loop.
"""
from __future__ import annotations

import hashlib
import re
import runpy
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
import zarr

from engine.io import InputError
from engine.io.data import MulticoilData
from engine.io.hybrid_store import HybridStore, prepare_hybrid_store
from engine.io.ome_zarr import VolumeWriter, open_volume
from engine.physics.fft import fftc

REPO = Path(__file__).resolve().parents[1]
COILS, NY, NX = 4, 24, 24  # 2D case
NX3, NY3, NZ3, CHUNK_X = 8, 8, 6, 2  # 3D case: 4 chunks along the readout


def launcher(name: str):
    """`main` of launch/<name>.py, loaded without running its __main__ block."""
    return runpy.run_path(str(REPO / "launch" / f"{name}.py"))["main"]


@pytest.fixture(scope="module")
def mains() -> dict:
    return {name: launcher(name) for name in ("prepare", "baseline", "recon2d", "recon3d", "train_prior")}


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of `main(argv)` (a SystemExit from argparse counts as its code)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *patterns: str) -> str:
    """Exit 2 and one stderr line `error[ (rank r)]: ...` matching every regex pattern."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert re.match(r"error( \(rank \d+\))?: ", lines[0]), lines[0]
    for pattern in patterns:
        assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


def tree_digest(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `path` (or of `path` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def leftovers(folder: Path, before: set[str]) -> set[str]:
    """Names that appeared in `folder` since `before` was listed."""
    return {p.name for p in folder.iterdir()} - before


# ---------------------------------------------------------------------------- the broken files


def complex_normal(rng: np.random.Generator, shape) -> np.ndarray:
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def smooth_case_2d() -> np.ndarray:
    """Fully sampled (coils, ny, nx) k-space of a smooth object seen by 4 smooth coils."""
    y, x = np.meshgrid(np.linspace(-1, 1, NY), np.linspace(-1, 1, NX), indexing="ij")
    image = np.exp(-(x**2 + y**2) * 3) * (1 + 0.3 * (x > 0))
    maps = np.stack([np.exp(-((x - cx) ** 2 + (y - cy) ** 2)) for cx, cy in [(-1, 0), (1, 0), (0, 1), (0, -1)]])
    return fftc(torch.from_numpy((maps * image).astype(np.complex64)), dims=(-2, -1)).numpy()


def case_3d(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fully sampled k-space (coils, kx, ky, kz) and maps (coils, x, y, z) of a tiny 3D case."""
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in (NX3, NY3, NZ3)), indexing="ij")
    image = np.exp(-sum(g**2 for g in grid) * 2)
    maps = np.stack([np.exp(-((grid[0] - c) ** 2 + grid[1] ** 2)) * np.exp(1j * c * grid[2])
                     for c in (-0.5, 0.5)]).astype(np.complex64)
    kspace = fftc(torch.from_numpy((maps * image).astype(np.complex64)), dims=(1, 2, 3)).numpy()
    return kspace + 0.01 * complex_normal(rng, kspace.shape), maps


def write_h5(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as handle:
        for name, value in datasets.items():
            handle.create_dataset(name, data=value)
    return path


def truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good and broken inputs, made once: name -> path."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(5)
    kspace2d = smooth_case_2d()
    made = {}

    def save(name: str, array: np.ndarray) -> None:
        np.save(folder / name, array)
        made[name] = folder / name

    save("good2d.npy", kspace2d)
    save("real2d.npy", kspace2d.real.astype(np.float32))
    nan2d = kspace2d.copy()
    nan2d[1, 3, 4] = np.nan
    save("nan2d.npy", nan2d)
    save("mask_empty.npy", np.zeros((NY, NX), np.float32))
    save("mask_wrong_shape.npy", np.ones((NY, NX - 1), np.float32))
    made["mask_truncated.npy"] = folder / "mask_truncated.npy"
    made["mask_truncated.npy"].write_bytes(made["mask_wrong_shape.npy"].read_bytes()[:200])

    stack = kspace2d[None]  # fastMRI layout (slices, coils, kx, ky)
    made["good.h5"] = write_h5(folder / "good.h5", kspace=stack)
    made["truncated.h5"] = truncate(write_h5(folder / "truncated.h5", kspace=stack), 1500)
    made["no_kspace.h5"] = write_h5(folder / "no_kspace.h5", image=np.abs(kspace2d[0]))
    made["real.h5"] = write_h5(folder / "real.h5", kspace=stack.real.astype(np.float32))
    made["inf.h5"] = write_h5(folder / "inf.h5", kspace=np.where(np.arange(NX) == 3, np.inf, stack).astype(np.complex64))
    made["mask_empty.h5"] = write_h5(folder / "mask_empty.h5", kspace=stack, mask=np.zeros(NX, np.float32))
    made["mask_length.h5"] = write_h5(folder / "mask_length.h5", kspace=stack, mask=np.ones(NX + 2, np.float32))

    kspace3d, maps3d = case_3d(rng)
    save("good3d.npy", kspace3d)
    save("maps3d.npy", maps3d)
    nan3d = kspace3d.copy()
    nan3d[0, 2, 3, 1] = np.nan
    save("nan3d.npy", nan3d)
    nan_maps = maps3d.copy()
    nan_maps[1, 0, 0, 0] = np.inf
    save("nan_maps3d.npy", nan_maps)
    save("maps3d_wrong_shape.npy", maps3d[:, :, :-1])
    save("mask3d_wrong_shape.npy", np.ones((NY3, NZ3 + 1), np.float32))
    save("mask3d_empty.npy", np.zeros((NY3, NZ3), np.float32))
    save("zero3d.npy", np.zeros_like(kspace3d))
    return made


@pytest.fixture(scope="module")
def good_store(tmp_path_factory, files) -> Path:
    """A valid hybrid store (x, coils, ky, kz) = (8, 2, 8, 6) in chunks of 2, undersampled."""
    rng = np.random.default_rng(1)
    mask = (rng.random((NY3, NZ3)) < 0.5).astype(np.float32)
    mask[NY3 // 2 - 1:NY3 // 2 + 1, NZ3 // 2 - 1:NZ3 // 2 + 1] = 1
    data = MulticoilData(np.load(files["good3d.npy"]), maps=np.load(files["maps3d.npy"]), source="tiny", layout="3d")
    return prepare_hybrid_store(data, tmp_path_factory.mktemp("store") / "good.zarr", mask=mask, chunk_x=CHUNK_X)


# ---------------------------------------------------------------------------- launch/prepare.py

PREPARE_CASES = {
    # name: (input, extra arguments, regexes the one line must match)
    "missing file": ("absent.h5", [], [r"absent\.h5: file not found"]),
    "truncated hdf5": ("truncated.h5", [], [r"truncated\.h5: cannot be read as HDF5 \(truncated"]),
    "missing kspace": ("no_kspace.h5", [], [r"no_kspace\.h5: kspace: dataset not found \(file holds: image\)"]),
    "kspace not complex": ("real2d.npy", [], [r"real2d\.npy: kspace: must be complex, got float32"]),
    "2d input": ("good2d.npy", [], [r"good2d\.npy: kspace: prepare needs 3D k-space"]),
    "nan in kspace": ("nan3d.npy", [], [r"nan3d\.npy: kspace: contains 1 non-finite values \(NaN/Inf\)"]),
    "inf in maps": ("good3d.npy", ["--maps", "nan_maps3d.npy"],
                    [r"nan_maps3d\.npy: maps: contains 1 non-finite values"]),
    "maps shape": ("good3d.npy", ["--maps", "maps3d_wrong_shape.npy"],
                   [r"maps3d_wrong_shape\.npy: maps: shape \(2, 8, 7, 6\) disagrees with k-space"]),
    "mask shape": ("good3d.npy", ["--mask", "mask3d_wrong_shape.npy"],
                   [r"mask3d_wrong_shape\.npy: mask shape \(8, 7\) does not match k-space shape \(8, 6\)"]),
    "mask without samples": ("good3d.npy", ["--mask", "mask3d_empty.npy"],
                             [r"mask3d_empty\.npy: mask samples no k-space point"]),
    "all-zero kspace": ("zero3d.npy", ["--maps-from", "none"], [r"zero3d\.npy: kspace: k-space is all zero"]),
    "chunk_x 0": ("good3d.npy", ["--chunk-x", "0", "--maps-from", "none"], [r"chunk_x must be >= 1"]),
}


@pytest.mark.parametrize("case", sorted(PREPARE_CASES))
def test_prepare_refuses(case, files, mains, tmp_path, capsys):
    name, extra, patterns = PREPARE_CASES[case]
    source = files.get(name, tmp_path / name)
    extra = [str(files.get(a, a)) for a in extra]
    out = tmp_path / "case.zarr"
    code, err = run_main(mains["prepare"], [source, "--out", out, *extra], capsys)
    assert_refused(code, err, *patterns)
    assert list(tmp_path.iterdir()) == []  # neither the store nor a temporary one


def test_prepare_keeps_an_existing_store(files, good_store, mains, tmp_path, capsys):
    out = shutil.copytree(good_store, tmp_path / "case.zarr")
    before = tree_digest(out)
    code, err = run_main(mains["prepare"], [files["good3d.npy"], "--out", out, "--maps-from", "none"], capsys)
    assert_refused(code, err, r"case\.zarr: output exists; pass overwrite=True \(--overwrite\)")
    assert tree_digest(out) == before
    # a bad input with --overwrite is refused before the existing store is touched
    code, err = run_main(mains["prepare"], [files["nan3d.npy"], "--out", out, "--overwrite"], capsys)
    assert_refused(code, err, "nan3d.npy: kspace: contains 1 non-finite")
    assert tree_digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["case.zarr"]


# ---------------------------------------------------------------------------- launch/baseline.py

TWO_D_CASES = {
    # name: (input, extra arguments, regexes); shared by launch/baseline.py and launch/recon2d.py
    "missing file": ("absent.npy", [], [r"absent\.npy: file not found"]),
    "truncated hdf5": ("truncated.h5", ["--slice", "0"], [r"truncated\.h5: cannot be read as HDF5 \(truncated"]),
    "missing kspace": ("no_kspace.h5", ["--slice", "0"], [r"no_kspace\.h5: kspace: dataset not found"]),
    "kspace not complex": ("real.h5", ["--slice", "0"], [r"real\.h5: kspace: must be complex, got float32"]),
    "nan in kspace": ("nan2d.npy", [], [r"nan2d\.npy: kspace: contains 1 non-finite values"]),
    "inf in kspace": ("inf.h5", ["--slice", "0"], [r"inf\.h5: kspace: contains 96 non-finite values"]),
    "mask in file without samples": ("mask_empty.h5", ["--slice", "0"],
                                     [r"mask_empty\.h5: mask: has no sampled positions"]),
    "mask in file of the wrong length": ("mask_length.h5", ["--slice", "0"],
                                         [r"mask_length\.h5: mask: length 26 disagrees with k-space"]),
    "mask file without samples": ("good2d.npy", ["--mask", "file", "--mask-file", "mask_empty.npy"],
                                  [r"mask_empty\.npy: mask samples no k-space point"]),
    "mask file of the wrong shape": ("good2d.npy", ["--mask", "file", "--mask-file", "mask_wrong_shape.npy"],
                                     [r"mask_wrong_shape\.npy: mask shape \(24, 23\) does not match k-space shape"]),
    "truncated mask file": ("good2d.npy", ["--mask", "file", "--mask-file", "mask_truncated.npy"],
                            [r"mask file .*mask_truncated\.npy cannot be read \(truncated"]),
    "a stack without --slice": ("good.h5", [], [r"good\.h5: .*one 2D slice .*"]),
    # issue 16: an acceleration the mask generator cannot reach is refused at once (it used to hang)
    "acceleration 1": ("good2d.npy", ["--accel", "1"], [r"acceleration must be a finite number > 1, got 1\.0"]),
    "acceleration nan": ("good2d.npy", ["--accel", "nan"], [r"acceleration must be a finite number > 1, got nan"]),
    "acceleration inf": ("good2d.npy", ["--accel", "inf"], [r"acceleration must be a finite number > 1, got inf"]),
    "acceleration out of reach": ("good2d.npy", ["--accel", "12"],  # 24 x 24 points over 50 samples
                                  [r"acceleration 12 is out of reach for a 24 x 24 Poisson-disc mask",
                                   r"without calibration region: the largest is 11\.52"]),
    "line acceleration out of reach": ("good2d.npy", ["--mask", "equispaced1d", "--accel", "30"],
                                       [r"acceleration 30 is out of reach for a line mask of 24 columns",
                                        r"with one line, R = 24 at most"]),
}


def _two_d_argv(case: str, files: dict, tmp_path: Path) -> tuple[list, Path]:
    name, extra, _ = TWO_D_CASES[case]
    out = tmp_path / "run"
    return [files.get(name, tmp_path / name), "--out", out, "--calib-width", "12",
            *(files.get(a, a) for a in extra)], out


@pytest.mark.parametrize("case", sorted(TWO_D_CASES))
def test_baseline_refuses(case, files, mains, tmp_path, capsys):
    argv, _ = _two_d_argv(case, files, tmp_path)
    code, err = run_main(mains["baseline"], argv + ["--methods", "zero_filled"], capsys)
    assert_refused(code, err, *TWO_D_CASES[case][2])
    assert list(tmp_path.iterdir()) == []  # no output folder, not even an empty one


def test_baseline_keeps_an_existing_run(files, mains, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [files["good2d.npy"], "--out", out, "--calib-width", "12", "--methods", "zero_filled"]
    assert run_main(mains["baseline"], argv, capsys)[0] == 0
    before = tree_digest(out)
    code, err = run_main(mains["baseline"], argv, capsys)
    assert_refused(code, err, r"output folder .*run is not empty; pass --overwrite")
    code, err = run_main(mains["baseline"], [files["nan2d.npy"], *argv[1:], "--overwrite"], capsys)
    assert_refused(code, err, r"nan2d\.npy: kspace: contains 1 non-finite")
    assert tree_digest(out) == before


# ---------------------------------------------------------------------------- launch/recon2d.py


@pytest.mark.parametrize("case", sorted(TWO_D_CASES))
def test_recon2d_refuses_before_work(case, files, mains, tmp_path, capsys):
    argv, _ = _two_d_argv(case, files, tmp_path)
    code, err = run_main(mains["recon2d"], argv + ["--set", "progress=false"], capsys)
    assert_refused(code, err, *TWO_D_CASES[case][2])
    assert list(tmp_path.iterdir()) == []


def test_recon2d_exit_code_for_a_bad_input(files, mains, tmp_path, capsys):
    code, err = run_main(mains["recon2d"], [tmp_path / "absent.npy", "--out", tmp_path / "run"], capsys)
    assert_refused(code, err, r"absent\.npy: file not found")


RECON2D_CONFIG_CASES = {
    "unknown key": (["--set", "optim.stepz=3"], [r"unknown config key 'optim\.stepz'"]),
    "wrong type": (["--set", "optim.steps=many"], [r"config key 'optim\.steps' .*must be an integer, got 'many'"]),
    "wrong choice": (["--set", "prior.mode=sometimes"], [r"config key 'prior\.mode' .*must be one of"]),
    "yaml with an unknown key": (["--config", "{yaml}"], [r"unknown config key 'model\.hiden' in .*bad\.yaml"]),
    "missing yaml": (["--config", "{absent}"], [r"config file .*absent\.yaml does not exist"]),
}


@pytest.mark.parametrize("case", sorted(RECON2D_CONFIG_CASES))
def test_recon2d_refuses_a_bad_config(case, files, mains, tmp_path, capsys):
    extra, patterns = RECON2D_CONFIG_CASES[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"hiden": 16}}))
    extra = [a.format(yaml=bad, absent=tmp_path / "absent.yaml") for a in extra]
    out = tmp_path / "run"
    code, err = run_main(mains["recon2d"], [files["good2d.npy"], "--out", out, *extra], capsys)
    assert_refused(code, err, *patterns)
    assert not out.exists()


def test_recon2d_keeps_an_existing_run(files, mains, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}\n")
    before = tree_digest(out)
    capsys.readouterr()
    code, err = run_main(mains["recon2d"], [files["good2d.npy"], "--out", out], capsys)
    assert_refused(code, err, r"output folder .*run is not empty; pass --overwrite")
    code, err = run_main(mains["recon2d"], [files["nan2d.npy"], "--out", out, "--overwrite"], capsys)
    assert_refused(code, err, r"nan2d\.npy: kspace: contains 1 non-finite")
    assert tree_digest(out) == before


# ---------------------------------------------------------------------------- launch/recon3d.py

TINY3D = {
    "steps": 2,
    "inr": {"hidden": 8, "layers": 1,
            "encoding": {"kind": "hashgrid", "levels": 2, "log2_table_size": 8, "min_res": 2, "max_res": 8}},
    "slices": {"per_step": 1},
    "prior": {"mode": "off"},
    "device": "cpu",
    "output": {"progress": False, "montage": False},
    "baseline": {"l1_wavelet_3d": False},
}


@pytest.fixture
def recon3d(mains, tmp_path, monkeypatch, capsys):
    """Run launch/recon3d.py's main with the tiny config; -> (exit code, stderr)."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # keep this process's threads
    config = tmp_path / "tiny3d.yaml"
    config.write_text(yaml.safe_dump(TINY3D))

    def run(store: Path, out: Path, *extra) -> tuple[int, str]:
        return run_main(mains["recon3d"], ["--config", config, "--input", store, "--out", out, *extra], capsys)

    return run


def _edit_store(good: Path, folder: Path, edit) -> Path:
    store = shutil.copytree(good, folder / "broken.zarr")
    edit(store, zarr.open_group(store, mode="r+"))
    return store


def _first_chunk(store: Path, array: str) -> Path:
    return next(p for p in sorted((store / array / "c").rglob("*")) if p.is_file())


def _set(array: str, index: tuple, value) -> callable:
    def edit(store: Path, group: zarr.Group) -> None:
        group[array][index] = value
    return edit


def _replace(array: str, values: np.ndarray, chunks: tuple | None = None) -> callable:
    def edit(store: Path, group: zarr.Group) -> None:
        del group[array]
        group.create_array(array, data=values, chunks=chunks or values.shape)
    return edit


def _zero_mask(store: Path, group: zarr.Group) -> None:
    group["mask"][...] = 0


STORE_CASES = {
    # name: (edit(store, group) or None for a missing store, regexes)
    "missing store": (None, [r"absent\.zarr: Zarr store not found"]),
    "truncated metadata": (lambda s, g: truncate(s / "zarr.json", 40),
                           [r"broken\.zarr: cannot be read as a Zarr group"]),
    "truncated chunk": (lambda s, g: truncate(_first_chunk(s, "kspace"), 20),
                        [r"broken\.zarr \[x 0:8\]: kspace: read failed \(truncated or corrupt chunk"]),
    "missing chunk": (lambda s, g: _first_chunk(s, "maps").unlink(),
                      [r"broken\.zarr \[x 0:8\]: maps: no stored chunk for 2 readout positions \(x 0\.\.1\)"]),
    "missing kspace": (lambda s, g: g.__delitem__("kspace"),
                       [r"broken\.zarr: kspace: array not found"]),
    "kspace not complex": (lambda s, g: _replace("kspace", np.zeros((NX3, 2, NY3, NZ3), np.float32))(s, g),
                           [r"broken\.zarr: kspace: expected \(x, coils, ky, kz\) complex64, got .*float32"]),
    "nan in kspace": (_set("kspace", (5, 0, 4, 3), np.nan),
                      [r"broken\.zarr \[x 0:8\]: kspace: contains 1 non-finite values"]),
    "inf in maps": (_set("maps", (2, 1, 0, 0), np.inf), [r"broken\.zarr \[x 0:8\]: maps: contains 1 non-finite"]),
    "maps shape": (lambda s, g: _replace("maps", np.ones((NX3, 2, NY3, NZ3 - 1), np.complex64))(s, g),
                   [r"broken\.zarr: maps: shape \(8, 2, 8, 5\) disagrees with k-space"]),
    "mask shape": (lambda s, g: _replace("mask", np.ones((NY3 + 1, NZ3), np.float32))(s, g),
                   [r"broken\.zarr: mask: shape \(9, 6\) disagrees with k-space"]),
    "mask without samples": (_zero_mask, [r"broken\.zarr: mask: has no sampled positions"]),
    "no maps": (lambda s, g: g.__delitem__("maps"), [r"broken\.zarr: the hybrid store has no coil maps"]),
    "not prepared": (lambda s, g: g.attrs.__delitem__("infusion_hybrid"),
                     [r"broken\.zarr: not an engine hybrid store"]),
}


@pytest.mark.parametrize("case", sorted(STORE_CASES))
def test_recon3d_refuses_a_bad_store(case, good_store, recon3d, tmp_path):
    edit, patterns = STORE_CASES[case]
    store = tmp_path / "absent.zarr" if edit is None else _edit_store(good_store, tmp_path, edit)
    listed = {p.name for p in tmp_path.iterdir()}
    code, err = recon3d(store, tmp_path / "out.zarr")
    assert_refused(code, err, *patterns)
    assert leftovers(tmp_path, listed) == set()  # neither out.zarr nor out_run/


RECON3D_CONFIG_CASES = {
    "unknown key": (["--set", "slices.per_stepp=2"], [r"unknown config key 'slices\.per_stepp'"]),
    "wrong type": (["--set", "steps=[1, 2]"], [r"config key 'steps' .*must be an integer, got \[1, 2\]"]),
    "impossible value": (["--set", "steps=0"], [r"steps must be >= 1, got 0"]),
    "too many slices": (["--set", "slices.per_step=9"], [r"slices\.per_step: K=9 must be in \[1, 8\]"]),
    "acceleration 1": (["--set", "bundled.acceleration=1"], [r"acceleration must be a finite number > 1, got 1\.0"]),
    "acceleration nan": (["--set", "bundled.acceleration=.nan"], [r"acceleration must be a finite number > 1, got nan"]),
    "acceleration inf": (["--set", "bundled.acceleration=.inf"], [r"acceleration must be a finite number > 1, got inf"]),
}


@pytest.mark.parametrize("case", sorted(RECON3D_CONFIG_CASES))
def test_recon3d_refuses_a_bad_config(case, good_store, recon3d, tmp_path):
    extra, patterns = RECON3D_CONFIG_CASES[case]
    code, err = recon3d(good_store, tmp_path / "out.zarr", *extra)
    assert_refused(code, err, *patterns)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny3d.yaml"]


def test_recon3d_refuses_an_unreachable_bundled_acceleration(mains, tmp_path, monkeypatch, capsys):
    """The bundled (ky, kz) plane is 64 x 40: at most 2560 / 50 = 51.2 (issue 16: it used to hang)."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    monkeypatch.chdir(tmp_path)  # the bundled store would go to ./outputs/bundled
    config = tmp_path / "tiny3d.yaml"
    config.write_text(yaml.safe_dump(TINY3D))
    code, err = run_main(mains["recon3d"], ["--config", config, "--out", tmp_path / "out.zarr",
                                            "--set", "bundled.acceleration=60"], capsys)
    assert_refused(code, err, r"bundled\.acceleration .*acceleration 60 is out of reach for a 64 x 40 Poisson-disc "
                              r"mask without calibration region: the largest is 51\.2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny3d.yaml"]


@pytest.mark.parametrize("ranks, pattern", [
    (16, r"good\.zarr: 8 readout positions for 16 ranks"),
    (5, r"good\.zarr: 8 readout positions in 4 chunks of 2 cannot be split over 5 shards"),
])
def test_recon3d_refuses_fewer_readout_positions_than_ranks(ranks, pattern, good_store, recon3d, tmp_path,
                                                           monkeypatch):
    """Rank 0 of `ranks`: the refusal comes before any collective, so no process group is needed."""
    import engine.runtime.bootstrap
    from engine.runtime.context import DistContext

    monkeypatch.setattr(engine.runtime.bootstrap, "init_distributed", lambda device="auto", **_: DistContext(0, ranks))
    code, err = recon3d(good_store, tmp_path / "out.zarr")
    assert_refused(code, err, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny3d.yaml"]


def test_recon3d_output_exists(good_store, recon3d, tmp_path):
    out = tmp_path / "out.zarr"
    writer = VolumeWriter(out, (NX3, NY3, NZ3), CHUNK_X)
    writer.write_slab(0, np.ones((NX3, NY3, NZ3), np.complex64))
    writer.finalize({"kept": 1})
    before = tree_digest(out)
    code, err = recon3d(good_store, out)
    assert_refused(code, err, r"out\.zarr exists; pass --overwrite to replace it or --resume to continue")
    code, _ = recon3d(good_store, out, "--resume")  # a complete output: nothing to do
    assert code == 0 and tree_digest(out) == before and open_volume(out).metrics == {"kept": 1}
    broken = _edit_store(good_store, tmp_path, _set("maps", (0, 0, 0, 0), np.nan))
    code, err = recon3d(broken, out, "--overwrite")  # refused before the old output is deleted
    assert_refused(code, err, r"maps: contains 1 non-finite")
    assert tree_digest(out) == before


def test_recon3d_keeps_the_checkpoints_of_an_interrupted_run(good_store, recon3d, tmp_path):
    """A run killed before its volume was written leaves checkpoints: a fresh start must not lose them."""
    out = tmp_path / "out.zarr"
    code, _ = recon3d(good_store, out, "--set", "steps=5", "checkpoint.every=1")  # keeps steps 3 and 4
    assert code == 0
    shutil.rmtree(out)  # as if killed after the checkpoints, before the volume
    checkpoints = tmp_path / "out_run" / "checkpoints"
    before = tree_digest(checkpoints)
    code, err = recon3d(good_store, out, "--set", "steps=3", "checkpoint.every=1", "tv_weight=0.5")
    assert_refused(code, err, r"out_run/checkpoints holds checkpoints of an earlier run; pass --resume")
    assert tree_digest(checkpoints) == before and not out.exists()
    code, _ = recon3d(good_store, out, "--set", "steps=3", "checkpoint.every=1", "tv_weight=0.5", "--overwrite")
    assert code == 0 and open_volume(out) is not None
    # the old steps 3 and 4 were removed: kept, they would have pruned this run's own 1 and 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000001", "step-00000002"]


# ---------------------------------------------------------------------------- launch/train_prior.py


@pytest.mark.parametrize("overrides, pattern", [
    (["train.stepz=3"], r"unknown config key 'train\.stepz' in .*prior_train\.yaml \+ overrides \('train\.stepz': did you mean 'steps'\?\)"),
    (["train.steps=ten"], r"config key 'train\.steps' in .*prior_train\.yaml \+ overrides must be an integer, got 'ten'"),
    (["model.unet.channel_mult=2"], r"config key 'model\.unet\.channel_mult' in .*prior_train\.yaml \+ overrides must be a list"),
    (["data.volumes=[{path: {absent}}]", "train.device=cpu"], r"absent\.nii\.gz"),
])
def test_train_prior_refuses(overrides, pattern, mains, tmp_path, capsys):
    out = tmp_path / "prior_run"
    overrides = [o.replace("{absent}", str(tmp_path / "absent.nii.gz")) for o in overrides]
    code, err = run_main(mains["train_prior"], ["--config", REPO / "configs" / "prior_train.yaml", "--set",
                                                *overrides, f"train.out_dir={out}"], capsys)
    assert_refused(code, err, pattern)
    assert not out.exists()


# ---------------------------------------------------------------------------- interrupted writes


def test_interrupted_prepare_never_looks_complete(files, tmp_path, monkeypatch):
    """A kill after the k-space array was written: the final path does not exist, and what a
    SIGKILL would leave (the temporary folder, copied at that moment) is refused by name."""
    from engine.io import hybrid_store

    real_write, written, snapshot = hybrid_store._write, [], tmp_path / "snapshot.zarr"

    def write_then_die(group, name, array, chunks):
        real_write(group, name, array, chunks)
        written.append(name)
        if len(written) == 2:
            shutil.copytree(Path(str(group.store.root)), snapshot)
            raise KeyboardInterrupt  # stands for the kill; BaseException, like SystemExit

    monkeypatch.setattr(hybrid_store, "_write", write_then_die)
    out = tmp_path / "case.zarr"
    data = MulticoilData(np.load(files["good3d.npy"]), maps=np.load(files["maps3d.npy"]), source="k", layout="3d")
    with pytest.raises(KeyboardInterrupt):
        prepare_hybrid_store(data, out, chunk_x=CHUNK_X)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot.zarr"]  # no output, no temporary
    with pytest.raises(InputError, match=r"snapshot\.zarr: not an engine hybrid store .*interrupted"):
        HybridStore(snapshot)


def test_interrupted_volume_never_looks_complete(tmp_path):
    out = tmp_path / "out.zarr"
    writer = VolumeWriter(out, (NX3, NY3, NZ3), CHUNK_X)
    writer.write_slab(0, np.ones((4, NY3, NZ3), np.complex64))  # rank 0's slab; rank 1 died
    with pytest.raises(InputError, match=r"out\.zarr: output is incomplete \(no completion marker\)"):
        open_volume(out)
    with pytest.raises(RuntimeError, match="only 4 of 8 chunks written"):
        writer.finalize()
    with pytest.raises(InputError, match="incomplete"):
        open_volume(out)


def test_interrupted_2d_run_folder_never_looks_complete(tmp_path, monkeypatch):
    """metrics.json is written last; rewriting a complete folder removes it first."""
    from engine.evaluation import report

    image = np.ones((NY, NX), np.complex64)
    results = {"zero_filled": {"image": image, "seconds": 0.1}}
    out = tmp_path / "run"
    report.write_run(out, results, image, None, {"run": 1})
    assert (out / "metrics.json").is_file()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "comparison_png", killed)
    with pytest.raises(KeyboardInterrupt):
        report.write_run(out, results, image, None, {"run": 2}, overwrite=True)
    assert not (out / "metrics.json").exists() and (out / "recon_zero_filled.npy").is_file()
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(KeyboardInterrupt):
        report.write_run(tmp_path / "fresh", results, image, None, {"run": 3})
    assert not (tmp_path / "fresh" / "metrics.json").exists()


# ---------------------------------------------------------------------------- NaN / Inf guard


class _NaNGradient(torch.autograd.Function):
    """Loss 0 (finite) whose gradient is NaN: the guard's gradient branch."""

    @staticmethod
    def forward(ctx, image):
        ctx.shape = image.shape
        return image.real.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, complex(float("nan"), float("nan")), dtype=torch.complex64)


def poisoned_tv(bad_calls: set[int], kind: str):
    """A TV stand-in that adds exactly 0, except on `bad_calls` (0-based): NaN loss or NaN gradient."""
    calls = []

    def tv(image, *args, **kwargs):
        calls.append(len(calls))
        if calls[-1] not in bad_calls:
            return image.real.sum() * 0
        return image.real.sum() * float("nan") if kind == "loss" else _NaNGradient.apply(image)

    return tv


def _recon2d_case():
    from engine.config import build_config
    from engine.recon.fit2d import Recon2DConfig

    kspace = smooth_case_2d()
    mask = (np.random.default_rng(0).random((NY, NX)) < 0.5).astype(np.float32)
    maps = np.ones_like(kspace) / np.sqrt(COILS)

    def config(steps: int, max_bad: int = 3) -> Recon2DConfig:
        return build_config(Recon2DConfig, {
            "model": {"hidden": 16, "layers": 1, "encoding": {"levels": 2, "log2_table_size": 8, "max_res": 24}},
            "optim": {"steps": steps}, "regularisers": {"tv_weight": 1.0}, "prior": {"mode": "off"},
            "progress": False, "max_bad_steps": max_bad, "device": "cpu"})
    return kspace * mask, maps, mask, config


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_2d_guard_skips_a_bad_step_and_stops_with_the_last_good_state(kind, monkeypatch):
    from engine.recon import fit2d as recon2d

    kspace, maps, mask, config = _recon2d_case()
    monkeypatch.setattr(recon2d, "total_variation", poisoned_tv(set(), kind))
    clean5, _ = recon2d.reconstruct_2d(kspace, maps, mask, config(5))
    clean8, _ = recon2d.reconstruct_2d(kspace, maps, mask, config(8))

    monkeypatch.setattr(recon2d, "total_variation", poisoned_tv({2}, kind))
    once, info = recon2d.reconstruct_2d(kspace, maps, mask, config(8))
    assert info["stopped"] == "steps" and info["skipped_steps"] == 1 and np.isfinite(once).all()
    assert not np.array_equal(once, clean8)  # the bad step changed nothing, the others ran

    monkeypatch.setattr(recon2d, "total_variation", poisoned_tv(set(range(5, 100)), kind))
    with pytest.warns(UserWarning, match="3 consecutive steps had a non-finite loss or gradient"):
        stopped, info = recon2d.reconstruct_2d(kspace, maps, mask, config(20, max_bad=3))
    assert info["stopped"] == "non_finite" and info["steps"] == 8 and info["skipped_steps"] == 3
    np.testing.assert_array_equal(stopped, clean5)  # exactly the state after the 5 good steps


def test_3d_guard_skips_a_bad_step(good_store, tmp_path, monkeypatch):
    from engine.config import build_config, merge_dicts
    from engine.recon import fit3d as recon3d
    from engine.recon.job3d import run_recon3d
    from engine.runtime.bootstrap import init_distributed

    monkeypatch.setattr(recon3d, "total_variation", poisoned_tv({1}, "loss"))
    cfg = build_config(recon3d.Recon3DConfig, merge_dicts(TINY3D, {"steps": 4, "tv_weight": 1.0}))
    out = tmp_path / "out.zarr"
    run_recon3d(cfg, good_store, out, init_distributed(device="cpu", env={}))
    assert np.isfinite(open_volume(out).complex[...]).all()
    log = (tmp_path / "out_run" / "log.csv").read_text().splitlines()
    assert "skipped" in log[0] and [row.split(",")[-1] for row in log[1:]] == ["0", "1", "0", "0"]


def test_3d_guard_stops_after_repeated_failures_keeping_the_good_checkpoints(good_store, recon3d, tmp_path,
                                                                            monkeypatch):
    from engine.recon import fit3d as recon3d_module

    monkeypatch.setattr(recon3d_module, "total_variation", poisoned_tv(set(range(1, 100)), "gradient"))
    out = tmp_path / "out.zarr"
    code, err = recon3d(good_store, out, "--set", "steps=6", "tv_weight=1.0", "checkpoint.every=1",
                        "max_bad_steps=2")
    lines = err.strip().splitlines()
    assert code == 3 and len(lines) == 1, err
    assert re.search(r"stopped at step 2: 2 consecutive steps had a non-finite loss or gradient .*the last "
                     r"checkpoint \(step 2\) is kept", lines[0]), lines[0]
    assert not out.exists()  # no volume from a failed run
    checkpoints = sorted((tmp_path / "out_run" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-00000001", "step-00000002"]
    for checkpoint in checkpoints:  # step 2 came after the skipped step 1: still the good weights
        trunk = torch.load(checkpoint / "trunk.pt", weights_only=True)["trunk"]
        assert all(torch.isfinite(w).all() for w in trunk.values())
    first, second = (torch.load(c / "trunk.pt", weights_only=True)["trunk"] for c in checkpoints)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_2d_skipped_steps_are_logged(monkeypatch):
    from engine.recon import fit2d as recon2d

    kspace, maps, mask, config = _recon2d_case()
    monkeypatch.setattr(recon2d, "total_variation", poisoned_tv({2}, "gradient"))
    _, info = recon2d.reconstruct_2d(kspace, maps, mask, config(4))
    assert {"step": 2, "skipped": "non-finite gradient"} in info["history"]


# ---------------------------------------------------------------------------- NaN guard of the prior trainer

TINY_PRIOR_RUN = {
    "model": {"unet": {"base_channels": 8, "channel_mult": [1, 2], "attention_levels": [], "groupnorm_groups": 4,
                       "noise_embedding_channels": 16, "embedding_mult": 2}},
    "data": {"patch_size": 16, "zoom_range": [0.8, 1.2]},
    "train": {"batch_size": 2, "log_every": 1, "checkpoint_every": 2, "sample_png": False, "progress": False,
              "threads": 1, "lr_warmup_steps": 1, "device": "cpu"},
}


def poisoned_edm_loss(bad_steps: set[int]):
    """engine.prior.edm.edm_loss, NaN on the calls (= steps) in `bad_steps`."""
    from engine.prior.edm import edm_loss

    calls = []

    def loss(*args, **kwargs):
        calls.append(len(calls))
        value = edm_loss(*args, **kwargs)
        return value * float("nan") if calls[-1] in bad_steps else value

    return loss


@pytest.fixture
def prior_run(tmp_path, mains, monkeypatch, capsys):
    """Run launch/train_prior.py on a small blob volume; -> (exit code, stderr, out folder)."""
    from engine.prior import train

    grid = np.stack(np.meshgrid(*(np.arange(20),) * 3, indexing="ij"))
    volume = tmp_path / "blobs.npy"
    np.save(volume, (((grid - 10) ** 2).sum(0) < 36).astype(np.float32))
    threads = torch.get_num_threads()  # train.threads=1 changes it: restored after each run

    def run(bad_steps: set[int], name: str, **train_keys) -> tuple[int, str, Path]:
        monkeypatch.setattr(train, "edm_loss", poisoned_edm_loss(bad_steps))
        config = merge(TINY_PRIOR_RUN, {"data": {"volumes": [{"path": str(volume)}]},
                                        "train": {"out_dir": str(tmp_path / name), **train_keys}})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        try:
            code, err = run_main(mains["train_prior"], ["--config", path], capsys)
        finally:
            torch.set_num_threads(threads)
        return code, err, tmp_path / name

    return run


def merge(base: dict, update: dict) -> dict:
    from engine.config import merge_dicts

    return merge_dicts(base, update)


def test_prior_training_skips_a_non_finite_step(prior_run):
    code, _, out = prior_run({2}, "once", steps=5)
    assert code == 0
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0].endswith(",skipped") and [r.split(",")[-1] for r in rows[1:]] == ["0", "0", "1", "0", "0"]
    assert rows[3].split(",")[1] == "nan"  # the skipped step's window had no loss
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in (*state["model"].values(), *state["ema"].values()))


def test_prior_training_stops_after_repeated_failures_keeping_the_good_checkpoint(prior_run):
    code, err, out = prior_run(set(range(3, 100)), "stops", steps=20, max_bad_steps=2)
    lines = err.strip().splitlines()
    assert code == 3 and len(lines) == 1, err
    assert re.search(r"stopped at step 5: 2 consecutive steps had a non-finite loss or gradient .* keeps the "
                     r"checkpoint of step 4", lines[0]), lines[0]
    assert not (out / "prior").exists()  # nothing exported from a failed run
    kept = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    code, _, clean = prior_run(set(), "clean", steps=20, stop_at_step=3)  # 3 good steps, then stop
    assert code == 0
    good = torch.load(clean / "checkpoint" / "state.pt", weights_only=True)
    for name in good["model"]:  # step 3 was skipped: the weights at step 4 are those after 3 steps
        assert torch.equal(kept["model"][name], good["model"][name]), name
