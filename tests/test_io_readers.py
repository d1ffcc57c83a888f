"""Readers (engine.io): round trips on tiny files written here in the real layouts, the real BART
case of ../shared/data, and one test per class of bad input with its message."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from engine.io import (
    InputError,
    MulticoilData,
    derive_mask,
    read_bart,
    read_cfl,
    read_fastmri,
    read_input,
    read_mat73,
    read_nifti,
    read_npy,
    read_skmtea,
    write_cfl,
)
from engine.io.fastmri import parse_ismrmrd_header
from engine.io.skmtea import guess_readout_domain
from engine.physics.fft import fftc, ifftc

# Development data outside the repository (not shipped: no licence to redistribute); the test
# skips without it. INFUSION_SHARED_DATA overrides the default ../shared/data beside the clone.
DEV_DATA = Path(os.environ.get("INFUSION_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
REAL_BART = DEV_DATA / "raw" / "bart_brain_undersampled" / "ksp.cfl"

ISMRMRD_HEADER = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <acquisitionSystemInformation><systemModel>Skyra</systemModel>
    <systemFieldStrength_T>2.89362</systemFieldStrength_T></acquisitionSystemInformation>
  <encoding>
    <encodedSpace><matrixSize><x>12</x><y>10</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>240.0</x><y>200.0</y><z>5.0</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>6</x><y>10</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>120.0</x><y>200.0</y><z>5.0</z></fieldOfView_mm></reconSpace>
  </encoding>
</ismrmrdHeader>"""


def complex_normal(rng: np.random.Generator, shape) -> np.ndarray:
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def smooth_kspace_3d(rng: np.random.Generator, coils=3, shape=(16, 10, 8)) -> np.ndarray:
    """Centred k-space (coils, kx, ky, kz) of a smooth blob that fills about half the field of view."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = np.exp(-sum(g ** 2 for g in grids) / 0.3).astype(np.complex64)
    images = blob * (1 + 0.1 * complex_normal(rng, (coils,) + shape))
    return fftc(torch.from_numpy(images), dims=(1, 2, 3)).numpy()


# ---------------------------------------------------------------- writers in the real layouts
def write_fastmri(path: Path, kspace: np.ndarray, mask_1d=None, header=ISMRMRD_HEADER) -> Path:
    """fastMRI multicoil file: kspace [slices, coils, kx, ky] complex64, header, mask, RSS, attrs."""
    with h5py.File(path, "w") as handle:
        handle.create_dataset("kspace", data=kspace)
        if header is not None:
            handle.create_dataset("ismrmrd_header", data=header.encode())
        if mask_1d is not None:
            handle.create_dataset("mask", data=mask_1d)
        rss = np.abs(kspace).sum(axis=1)[:, :4, :4].astype(np.float32)
        handle.create_dataset("reconstruction_rss", data=rss)
        handle.attrs["acquisition"] = "CORPD_FBK"
        handle.attrs["max"] = np.float64(0.5)
    return path


def write_skmtea(path: Path, kspace_k: np.ndarray, domain: str, maps=None, target=None,
                 mask=None, declare: bool = True) -> Path:
    """SKM-TEA file from true k-space (coils, kx, ky, kz) of echo 0 (echo 1 = 2 x echo 0).

    domain "image" stores the readout inverse-FFT'd, as the released SKM-TEA files do.
    """
    stored = kspace_k if domain == "kspace" else ifftc(torch.from_numpy(kspace_k), dims=(1,)).numpy()
    file_layout = np.stack([stored, 2 * stored], axis=-1).transpose(1, 2, 3, 4, 0)  # x,ky,kz,echo,coil
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset("kspace", data=file_layout)
        if declare:
            dataset.attrs["readout_domain"] = domain
        if maps is not None:
            handle.create_dataset("maps", data=maps)
        if target is not None:
            handle.create_dataset("target", data=target)
        if mask is not None:
            handle.create_dataset("masks/poisson_2.0x", data=mask)
    return path


def write_mat73(path: Path, images_matlab_order: np.ndarray, name: str = "data") -> Path:
    """MATLAB v7.3: 512-byte user block, array stored column-major (h5py sees reversed axes),
    complex as a compound (real, imag) of float32."""
    compound = np.dtype([("real", "<f4"), ("imag", "<f4")])
    stored = np.empty(images_matlab_order.shape[::-1], dtype=compound)
    stored["real"] = images_matlab_order.real.transpose()
    stored["imag"] = images_matlab_order.imag.transpose()
    with h5py.File(path, "w", userblock_size=512) as handle:
        dataset = handle.create_dataset(name, data=stored)
        dataset.attrs["MATLAB_class"] = np.bytes_(b"single")
    with open(path, "r+b") as handle:
        handle.write(b"MATLAB 7.3 MAT-file, written by the engine's tests".ljust(128))
    return path


# ---------------------------------------------------------------- fastMRI
def test_fastmri_one_slice_and_all(tmp_path, rng):
    kspace = complex_normal(rng, (3, 2, 12, 10))  # slices, coils, kx, ky
    mask_1d = (rng.random(10) < 0.5).astype(bool)
    mask_1d[5] = True
    path = write_fastmri(tmp_path / "file1000.h5", kspace, mask_1d)

    one = read_fastmri(path, slice_index=1)
    assert one.layout == "2d" and one.kspace.dtype == np.complex64
    np.testing.assert_array_equal(one.kspace, kspace[1])
    assert one.mask.shape == (12, 10) and one.mask.dtype == np.float32
    np.testing.assert_array_equal(one.mask, np.broadcast_to(mask_1d[None, :], (12, 10)))
    assert one.reference.shape == (4, 4)
    assert one.attrs["ismrmrd_header"] == ISMRMRD_HEADER
    assert one.attrs["acquisition"]["encoded_matrix"] == [12, 10, 1]
    assert one.attrs["acquisition"]["recon_fov_mm"] == [120.0, 200.0, 5.0]
    assert one.attrs["file_attrs"]["acquisition"] == "CORPD_FBK"

    stack = read_input(path)  # dispatched by the 4D kspace; no slice -> all
    assert stack.layout == "2d-stack" and stack.kspace.shape == (3, 2, 12, 10)
    np.testing.assert_array_equal(stack.kspace, kspace)
    assert read_input(path, slice_index=-1).kspace.shape == (2, 12, 10)


def test_ismrmrd_header_parse_tolerates_garbage():
    assert parse_ismrmrd_header("<not xml") == {}
    parsed = parse_ismrmrd_header(ISMRMRD_HEADER)
    assert parsed["system_model"] == "Skyra" and parsed["field_strength_t"] == pytest.approx(2.89362)


# ---------------------------------------------------------------- SKM-TEA
@pytest.mark.parametrize("domain,declare", [("kspace", True), ("image", True), ("kspace", False),
                                            ("image", False)])
def test_skmtea_roundtrip_both_readout_domains(tmp_path, rng, domain, declare):
    kspace = smooth_kspace_3d(rng)  # (coils 3, kx 16, ky 10, kz 8)
    maps_file = complex_normal(rng, (16, 10, 8, 3, 1))  # x, y, z, coil, maps
    target = complex_normal(rng, (16, 10, 8, 2, 1))  # x, y, z, echo, maps
    small_mask = np.ones((4, 4), np.float32)
    path = write_skmtea(tmp_path / "case.h5", kspace, domain, maps_file, target, small_mask, declare)

    data = read_skmtea(path, echo=1, mask_name="poisson_2.0x")
    assert data.layout == "3d" and data.kspace.shape == (3, 16, 10, 8)
    assert data.attrs["readout_domain_in_file"] == domain
    np.testing.assert_allclose(data.kspace, 2 * kspace, atol=2e-5 * np.abs(kspace).max())
    np.testing.assert_array_equal(data.maps, maps_file[..., 0].transpose(3, 0, 1, 2))
    np.testing.assert_array_equal(data.reference, target[:, :, :, 1, 0])
    # the 4 x 4 mask is zero-padded about the centre of the (10, 8) plane: DC stays at n // 2
    assert data.mask.shape == (10, 8) and data.mask.sum() == 16
    assert data.mask[5, 4] == 1 and data.mask[3:7, 2:6].all()


def test_guess_readout_domain(rng):
    kspace = smooth_kspace_3d(rng)
    assert guess_readout_domain(kspace) == "kspace"
    assert guess_readout_domain(ifftc(torch.from_numpy(kspace), dims=(1,)).numpy()) == "image"


# ---------------------------------------------------------------- BART
def test_cfl_roundtrip_is_fortran_ordered(tmp_path, rng):
    array = complex_normal(rng, (3, 4, 5, 2))
    base = write_cfl(tmp_path / "tiny.v1", array)  # a dot in the base name must survive
    assert Path(str(base) + ".hdr").read_text().startswith("# Dimensions\n3 4 5 2")
    raw = np.fromfile(str(base) + ".cfl", dtype=np.complex64)
    np.testing.assert_array_equal(raw[:4], [array[0, 0, 0, 0], array[1, 0, 0, 0], array[2, 0, 0, 0],
                                            array[0, 1, 0, 0]])
    np.testing.assert_array_equal(read_cfl(str(base) + ".cfl"), array)
    data = read_bart(base)  # READ, PHS1, PHS2, COIL -> (coils, kx, ky, kz)
    assert data.layout == "3d"
    np.testing.assert_array_equal(data.kspace, np.moveaxis(array, 3, 0))


def test_bart_plane_becomes_2d(tmp_path, rng):
    array = complex_normal(rng, (1, 6, 7, 3))
    write_cfl(tmp_path / "plane", array)
    data = read_input(tmp_path / "plane")  # base name without suffix
    assert data.layout == "2d" and data.kspace.shape == (3, 6, 7)
    np.testing.assert_array_equal(data.kspace, np.moveaxis(array[0], 2, 0))


@pytest.mark.skipif(not REAL_BART.exists(), reason=f"needs the real BART case {REAL_BART} (set INFUSION_SHARED_DATA)")
def test_real_bart_case():
    data = read_input(REAL_BART)
    assert data.layout == "2d" and data.kspace.shape == (8, 180, 230)
    assert data.kspace.dtype == np.complex64 and np.isfinite(data.kspace).all()
    mask = derive_mask(data.kspace, data.layout)
    assert mask.mean() == pytest.approx(0.127, abs=0.001)  # data README: 12.7 % sampled
    # every coil has the same pattern, and the fully sampled centre holds the peak (centred data)
    assert all(np.array_equal(coil != 0, mask > 0) for coil in data.kspace)
    peak = np.unravel_index(np.abs(data.kspace).sum(axis=0).argmax(), mask.shape)
    assert abs(peak[0] - 90) <= 3 and abs(peak[1] - 115) <= 3
    assert mask[85:96, 110:121].all()


# ---------------------------------------------------------------- npy, mat, nifti
@pytest.mark.parametrize("shape,layout", [((4, 6, 5), "2d"), ((2, 6, 5, 3), "3d")])
def test_npy_roundtrip(tmp_path, rng, shape, layout):
    kspace = complex_normal(rng, shape).astype(np.complex128)
    np.save(tmp_path / "k.npy", kspace)
    data = read_npy(tmp_path / "k.npy")
    assert data.layout == layout and data.kspace.dtype == np.complex64
    np.testing.assert_allclose(data.kspace, kspace, rtol=1e-6)


def test_mat73_coil_images_to_kspace(tmp_path, rng):
    images = complex_normal(rng, (6, 5, 3))  # MATLAB order: rows, cols, coils (non-square on purpose)
    path = write_mat73(tmp_path / "phantom.mat", images)
    data = read_input(path)
    assert data.layout == "2d" and data.kspace.shape == (3, 6, 5)
    expected = fftc(torch.from_numpy(np.moveaxis(images, 2, 0).copy())).numpy()
    np.testing.assert_allclose(data.kspace, expected, atol=1e-5)
    assert data.attrs["variable"] == "data"


def test_mat_v5_refused(tmp_path):
    path = tmp_path / "old.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file".ljust(256, b"\0"))
    with pytest.raises(InputError, match="not a MATLAB v7.3"):
        read_mat73(path)


def test_nifti_volume(tmp_path, rng):
    import nibabel

    volume = rng.integers(0, 255, (5, 6, 4)).astype(np.uint8)
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    affine[:3, 3] = [-10, 3, 7]
    nibabel.save(nibabel.Nifti1Image(volume, affine), tmp_path / "t1.nii.gz")
    read = read_nifti(tmp_path / "t1.nii.gz")
    assert read.data.dtype == np.float32 and read.data.shape == (5, 6, 4)
    np.testing.assert_array_equal(read.data, volume)
    np.testing.assert_allclose(read.affine, affine)
    assert read.attrs["voxel_size_mm"] == [0.5, 0.5, 2.0]
    with pytest.raises(InputError, match="magnitude image, not multicoil k-space"):
        read_input(tmp_path / "t1.nii.gz")


def test_dispatch_by_content_and_unknown(tmp_path, rng):
    kspace = complex_normal(rng, (1, 2, 6, 4))
    write_fastmri(tmp_path / "case.dat", kspace)  # HDF5 content, odd suffix
    assert read_input(tmp_path / "case.dat", slice_index=0).kspace.shape == (2, 6, 4)
    np.save(tmp_path / "arr.npy", complex_normal(rng, (2, 4, 4)))
    (tmp_path / "arr.npy").rename(tmp_path / "arr.bin")
    assert read_input(tmp_path / "arr.bin").layout == "2d"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="unknown format"):
        read_input(tmp_path / "notes.txt")


# ---------------------------------------------------------------- bad inputs, one per class
def _h5(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as handle:
        for name, value in datasets.items():
            handle.create_dataset(name, data=value)
    return path


def _truncated(path: Path, rng) -> Path:
    _h5(path, kspace=complex_normal(rng, (2, 2, 32, 32)))
    path.write_bytes(path.read_bytes()[:1500])
    return path


def _nan_kspace(path: Path, rng) -> Path:
    kspace = complex_normal(rng, (1, 2, 6, 4))
    kspace[0, 1, 2, 3] = np.nan
    return _h5(path, kspace=kspace)


def _skmtea_bad_maps(path: Path, rng) -> Path:
    return write_skmtea(path, smooth_kspace_3d(rng), "kspace", maps=complex_normal(rng, (16, 10, 7, 3)))


BAD_INPUTS = {
    # name: (maker(path, rng) -> path, dataset named in the message or None, problem pattern)
    "missing file": (lambda p, rng: p, None, "file not found"),
    "truncated hdf5": (_truncated, None, r"cannot be read as HDF5 \(truncated"),
    "missing kspace": (lambda p, rng: _h5(p, image=np.zeros((2, 2))), "kspace",
                       r"dataset not found \(file holds: image\)"),
    "kspace not complex": (lambda p, rng: _h5(p, kspace=np.zeros((1, 2, 6, 4), np.float32)), "kspace",
                           "must be complex, got float32"),
    "nan in kspace": (_nan_kspace, "kspace", r"1 non-finite values \(NaN/Inf\)"),
    "wrong ndim": (lambda p, rng: _h5(p, kspace=complex_normal(rng, (2, 6, 4))), "kspace",
                   "expected 4 dims .* or 5 dims .* got 3"),
    "mask length": (lambda p, rng: write_fastmri(p, complex_normal(rng, (1, 2, 6, 4)), np.ones(5)),
                    "mask", "length 5 disagrees with k-space: expected 4"),
    "mask without samples": (lambda p, rng: write_fastmri(p, complex_normal(rng, (1, 2, 6, 4)),
                                                          np.zeros(4)),
                             "mask", r"has no sampled positions"),
    "maps shape": (_skmtea_bad_maps, "maps", r"shape \(3, 16, 10, 7\) disagrees with k-space"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_message(tmp_path, rng, case):
    make, dataset, problem = BAD_INPUTS[case]
    path = make(tmp_path / "bad_case.h5", rng)
    with pytest.raises(InputError) as caught:
        read_input(path, slice_index=0)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    assert caught.value.dataset == dataset
    if dataset:
        assert f": {dataset}: " in message
    assert caught.value.problem and re.search(problem, message), message
    assert isinstance(caught.value, ValueError)


def test_bart_bad_files(tmp_path, rng):
    base = write_cfl(tmp_path / "k", complex_normal(rng, (4, 4, 1, 2)))
    data = Path(str(base) + ".cfl")
    data.write_bytes(data.read_bytes()[:-8])
    with pytest.raises(InputError, match=r"k\.cfl: holds 248 bytes, .* need 256 \(truncated\?\)"):
        read_cfl(base)
    write_cfl(tmp_path / "maps2", complex_normal(rng, (4, 4, 1, 2, 2)))
    with pytest.raises(InputError, match="kspace: unsupported BART dims .*MAPS=2"):
        read_bart(tmp_path / "maps2")
    Path(str(base) + ".hdr").unlink()
    with pytest.raises(InputError, match=r"k\.hdr: file not found"):
        read_bart(base)


def test_npy_bad_files(tmp_path, rng):
    np.save(tmp_path / "real.npy", np.ones((2, 4, 4), np.float32))
    with pytest.raises(InputError, match="real.npy: kspace: must be complex, got float32"):
        read_npy(tmp_path / "real.npy")
    np.save(tmp_path / "flat.npy", complex_normal(rng, (4, 4)))
    with pytest.raises(InputError, match=r"kspace: expected 3 dims .* got 2"):
        read_npy(tmp_path / "flat.npy")
    (tmp_path / "cut.npy").write_bytes((tmp_path / "flat.npy").read_bytes()[:90])
    with pytest.raises(InputError, match="cannot be read as .npy"):
        read_npy(tmp_path / "cut.npy")


def test_validate_in_memory_and_derive_mask(rng):
    kspace = complex_normal(rng, (2, 6, 5, 4))
    with pytest.raises(InputError, match=r"mask: shape \(5, 5\) disagrees"):
        MulticoilData(kspace, mask=np.ones((5, 5)), source="mem").validate()
    with pytest.raises(InputError, match="must contain only 0 and 1"):
        MulticoilData(kspace, mask=np.full((5, 4), 0.5), source="mem").validate()
    pattern = rng.random((5, 4)) < 0.5
    pattern[2, 2] = True
    undersampled = kspace * pattern
    np.testing.assert_array_equal(derive_mask(undersampled, "3d"), pattern.astype(np.float32))
    undersampled[:, 3, 0, 0] = 0 if pattern[0, 0] else 1  # one readout position breaks the pattern
    with pytest.raises(InputError, match="differs between readout positions"):
        derive_mask(undersampled, "3d", "mem")


def test_input_error_pickles():
    error = InputError("case.h5", "must be complex, got float32", "kspace")
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) == "case.h5: kspace: must be complex, got float32"
    assert again.dataset == "kspace"
