"""Regenerate the bundled example cases in data/ from the Colin27 1 mm volume (mricron-data packaging).

    python scripts/make_bundled_example.py [--source FOLDER_WITH_COLIN27]   # default: the developers' data folder

Real anatomy, simulated coils and phase. Only the evaluation part of Colin27 is used (world
z >= 25 mm, voxel index k >= 96 in the 1 mm volume; docs/ARCHITECTURE.md), so the prior, which
trains on z < 15 mm, never sees it. Colin27 volume axes are (x: right, y: anterior, z: superior),
RAS, 1 mm, origin (-90, -125, -71) mm.

2D case (data/colin27_axial_z45mm_8coil.h5, fastMRI-style):
  axial slice k = 116 (world z = 45 mm), image rows = Colin y reversed (row 0 anterior, as
  radiology displays it), columns = Colin x, cropped (rows) / zero-padded (columns) to
  192 x 192 around the head's bounding box, scaled to max 1; simulate_multicoil with 8 birdcage
  coils (radius 1.5), smooth phase (cubic polynomial, variation +-pi), SNR 40,
  seed = seed_from_case(case id).
3D case (data/colin27_eval_volume_72x64x40.npz):
  slices k = 96..175 (world z 25..104 mm), axes reordered to (x: Colin y reversed, anterior ->
  posterior, the readout axis; y: Colin x; z: Colin z), trimmed to 216 x 180 x 80 voxels,
  block-averaged 3 x 3 x 2 (3 x 3 x 2 mm voxels) to 72 x 60 x 40, zero-padded to 72 x 64 x 40,
  stored as uint8 with the simulation parameters (8 coils in one ring, SNR 40, same phase
  model); engine.io.examples simulates the k-space from it and checks it against the energy and
  probe values stored here.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from engine.io.examples import CASE_2D_PATH, CASE_3D_PATH, DATA_DIR, LABEL
from engine.physics.masks import seed_from_case
from engine.physics.simulate import noise_std_for_snr, simulate_multicoil

COLIN_FILE = "colin27_t1_1mm.nii.gz"
COPYRIGHT_FILE = "colin27_COPYRIGHT.txt"
EVALUATION_FIRST_K = 96  # world z = 25 mm: the evaluation part starts here (docs/ARCHITECTURE.md)
HEAD_THRESHOLD = 10  # uint8 intensity above which a voxel counts as head (background is ~0-5)

SLICE_K_2D = 116  # world z = -71 + 116 = 45 mm: centrum semiovale, head fits 192 x 192
SIZE_2D = 192
SLAB_K_3D = (96, 176)  # world z 25 .. 104 mm; the head ends at k ~ 175
BLOCK_3D = (3, 3, 2)
SHAPE_3D = (72, 64, 40)
SIMULATION = {
    "ncoils": 8,
    "snr": 40.0,
    "max_phase_variation": float(np.pi),
    "phase_order": 3,
    "relative_radius": 1.5,
    "object_threshold": 0.05,
}


def fit_axis(array: np.ndarray, axis: int, size: int, centre: int) -> tuple[np.ndarray, int]:
    """Crop or zero-pad `array` along `axis` to `size` so that index `centre` lands at size // 2.

    Returns the array and the source index now at position 0 (negative when padded).
    """
    start = centre - size // 2
    n = array.shape[axis]
    pad_before, pad_after = max(-start, 0), max(start + size - n, 0)
    pad = [(0, 0)] * array.ndim
    pad[axis] = (pad_before, pad_after)
    padded = np.pad(array, pad)
    index = [slice(None)] * array.ndim
    index[axis] = slice(start + pad_before, start + pad_before + size)
    return padded[tuple(index)], start


def head_centre(image: np.ndarray, axis: int) -> int:
    """Centre of the head's bounding box along `axis`."""
    other = tuple(a for a in range(image.ndim) if a != axis)
    inside = np.flatnonzero(np.any(image > HEAD_THRESHOLD, axis=other))
    return int(inside[0] + inside[-1] + 1) // 2


def make_case_2d(volume: np.ndarray) -> Path:
    import h5py

    case_id = f"colin27_axial_z{SLICE_K_2D - 71}mm_8coil"
    image = volume[:, ::-1, SLICE_K_2D].T.astype(np.float32)  # (Colin y reversed, Colin x)
    offsets = []
    for axis in (0, 1):
        image, start = fit_axis(image, axis, SIZE_2D, head_centre(image, axis))
        offsets.append(start)
    if np.any(image[[0, -1], :] > HEAD_THRESHOLD) or np.any(image[:, [0, -1]] > HEAD_THRESHOLD):
        raise RuntimeError("the head does not fit the 2D field of view")
    magnitude = image / image.max()
    seed = seed_from_case(case_id)
    kspace, maps, reference = simulate_multicoil(magnitude, seed=seed, **SIMULATION)
    noise_std = noise_std_for_snr(reference, SIMULATION["snr"], SIMULATION["object_threshold"])
    ny, nx = magnitude.shape
    header = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
        f"<acquisitionSystemInformation><receiverChannels>{SIMULATION['ncoils']}</receiverChannels>"
        "</acquisitionSystemInformation><encoding>"
        f"<encodedSpace><matrixSize><x>{ny}</x><y>{nx}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{ny}</x><y>{nx}</y><z>1</z></fieldOfView_mm></encodedSpace>"
        f"<reconSpace><matrixSize><x>{ny}</x><y>{nx}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{ny}</x><y>{nx}</y><z>1</z></fieldOfView_mm></reconSpace>"
        "<trajectory>cartesian</trajectory>"
        f"<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{nx - 1}</maximum>"
        f"<center>{nx // 2}</center></kspace_encoding_step_1></encodingLimits>"
        "</encoding></ismrmrdHeader>"
    )
    params = {
        "source": f"Colin27 {COLIN_FILE}",
        "slice_k": SLICE_K_2D,
        "world_z_mm": SLICE_K_2D - 71,
        "crop_start_colin_y_x": offsets,
        "seed": seed,
        "simulation": SIMULATION,
    }
    path = CASE_2D_PATH
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace[None])  # noise does not compress
        compress = {"compression": "gzip", "compression_opts": 9, "shuffle": True}
        f.create_dataset("maps", data=maps[None], **compress)
        f.create_dataset("reference", data=reference[None], **compress)
        f.create_dataset("ismrmrd_header", data=header)
        f.attrs.update(
            case_id=case_id,
            description=f"{LABEL}: Colin27 axial slice at world z = {SLICE_K_2D - 71} mm, "
            f"{SIMULATION['ncoils']} birdcage coils, SNR {SIMULATION['snr']:g}",
            acquisition="simulated",
            licence="BSD-3-Clause (Colin27 via Debian mricron-data); see colin27_COPYRIGHT.txt",
            layout="kspace [slices, coils, ny, nx] centred orthonormal; maps same; "
            "reference [slices, ny, nx]",
            snr=SIMULATION["snr"],
            noise_std=noise_std,
            params_json=json.dumps(params),
        )
    return path


def block_mean(volume: np.ndarray, block: tuple[int, ...]) -> np.ndarray:
    shape = [n // b for n, b in zip(volume.shape, block)]
    trimmed = volume[tuple(slice(0, n * b) for n, b in zip(shape, block))].astype(np.float64)
    split = [d for n, b in zip(shape, block) for d in (n, b)]
    return trimmed.reshape(split).mean(axis=tuple(range(1, 2 * volume.ndim, 2)))


def make_case_3d(volume: np.ndarray) -> Path:
    case_id = "colin27_eval_volume_72x64x40_8coil"
    # (Colin y reversed, Colin x, Colin z): anterior first along the readout axis
    slab = volume[:, ::-1, SLAB_K_3D[0] : SLAB_K_3D[1]].transpose(1, 0, 2)
    small = block_mean(slab, BLOCK_3D)  # (72, 60, 40)
    small, start = fit_axis(small, 1, SHAPE_3D[1], small.shape[1] // 2)
    if small.shape != SHAPE_3D:
        raise RuntimeError(f"3D case has shape {small.shape}, expected {SHAPE_3D}")
    magnitude_uint8 = np.round(small).astype(np.uint8)
    seed = seed_from_case(case_id)
    simulation = {**SIMULATION, "seed": seed}
    magnitude = magnitude_uint8.astype(np.float32) / float(magnitude_uint8.max())
    kspace = simulate_multicoil(magnitude, **simulation).kspace
    centre = tuple(n // 2 for n in SHAPE_3D)
    probe_index = [[c, *centre] for c in range(SIMULATION["ncoils"])] + [
        [3, 40, 30, 25],
        [5, 10, 50, 5],
    ]
    probes = kspace[tuple(np.array(probe_index).T)]
    params = {
        "case_id": case_id,
        "description": f"{LABEL}: Colin27 evaluation slab world z 25..104 mm, 3 x 3 x 2 mm, "
        f"{SIMULATION['ncoils']} birdcage coils, SNR {SIMULATION['snr']:g}",
        "source": f"Colin27 {COLIN_FILE}",
        "slab_k": list(SLAB_K_3D),
        "axes": "x = Colin y reversed (anterior->posterior, readout), y = Colin x, "
        "z = Colin z (inferior->superior)",
        "block": list(BLOCK_3D),
        "voxel_size_mm": [3.0, 3.0, 2.0],
        "pad_start_y": start,
        "simulation": simulation,
        "check": {
            "energy": float(np.sum(np.abs(kspace.astype(np.complex128)) ** 2)),
            "probe_index": probe_index,
            "probe_real": probes.real.tolist(),
            "probe_imag": probes.imag.tolist(),
        },
        "licence": "BSD-3-Clause (Colin27 via Debian mricron-data); see colin27_COPYRIGHT.txt",
    }
    np.savez_compressed(
        CASE_3D_PATH, magnitude_uint8=magnitude_uint8, params_json=json.dumps(params)
    )
    return CASE_3D_PATH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_source = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "volumes"
    parser.add_argument(
        "--source", type=Path, default=default_source, help="folder with the Colin27 files"
    )
    args = parser.parse_args()
    import nibabel as nib

    image = nib.load(args.source / COLIN_FILE)
    if image.shape != (181, 217, 181) or not np.allclose(image.affine[:3, 3], (-90, -125, -71)):
        raise ValueError(f"{args.source / COLIN_FILE}: not the expected Colin27 1 mm volume")
    volume = np.asarray(image.dataobj)
    # The bundled cases are evaluation data: nothing below world z = 25 mm may enter them.
    assert SLICE_K_2D >= EVALUATION_FIRST_K and SLAB_K_3D[0] >= EVALUATION_FIRST_K
    DATA_DIR.mkdir(exist_ok=True)
    for path in (make_case_2d(volume), make_case_3d(volume)):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    shutil.copyfile(args.source / COPYRIGHT_FILE, DATA_DIR / COPYRIGHT_FILE)
    print(f"copied {COPYRIGHT_FILE}")


if __name__ == "__main__":
    main()
