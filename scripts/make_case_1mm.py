"""The realistic 3D case of issue 11: Colin27's evaluation part at 1 mm, 16 simulated coils.

    python scripts/make_case_1mm.py magnitude --nifti PATH/colin27_t1_1mm.nii.gz   # -> data/ (once)
    python scripts/make_case_1mm.py store --R 4 --out case_R4.zarr                  # hybrid store
    python scripts/make_case_1mm.py magnitude --part tuning --nifti PATH/colin27_t1_1mm.nii.gz
    python scripts/make_case_1mm.py magnitude --source mni152 --part tuning --nifti PATH/mni152_2009a_t1_1mm.nii.gz

`magnitude` reads the Colin27 T1 volume at 1 mm (`colin27_t1_1mm.nii.gz`, 181 x 217 x 181, RAS,
origin (-90, -125, -71) mm; Debian mricron-data packaging, BSD-3-Clause: data/colin27_COPYRIGHT.txt;
not shipped, its path is an argument) and writes data/colin27_eval_volume_1mm_217x181x80.npz:
the magnitude as uint8 plus the simulation parameters, as data/colin27_eval_volume_72x64x40.npz does.
`store` simulates the multicoil k-space from that file (deterministic: seeded by the case id,
checked against the energy and probe values recorded in it) and writes the engine's hybrid store
(engine.io.hybrid_store) undersampled with a Poisson (ky, kz) mask without calibration region,
seeded by the case (engine.physics.masks.seed_from_case), with the reference, the true maps and the
voxel size 1 x 1 x 1 mm in the acquisition attributes.

The case:
- slices k = 96..175 of the 1 mm volume, world z 25..104 mm: the evaluation part only (world
  z >= 25 mm from the NIfTI affine; the prior trains on z < 15 mm, engine/prior/data.py). A range
  reaching below 25 mm is refused. The same slab as the bundled 3D case, here not block-averaged.
- the full in-plane field of view of the volume, 217 x 181 (not cropped: the head with its skull
  spans 203 of the 217 A-P voxels and 177 of the 181 L-R voxels, so a crop would save < 10 %).
- axes (x, y, z) = (Colin y reversed: anterior -> posterior, Colin x: left -> right, Colin z:
  inferior -> superior). x is the readout: the longest in-plane axis, A-P, the usual
  readout of a sagittal or axial 3D T1w scan (MPRAGE); it is fully sampled, and the (ky, kz) =
  (L-R, S-I) phase-encode plane of 181 x 80 is undersampled.
- simulation (engine.physics.simulate.simulate_multicoil): 16 birdcage coils (2 rings of 8 around
  z, ring radius 1.5 x half the field of view), the bundled cases' smooth phase (cubic, +-pi) and
  SNR 40 (mean object magnitude / noise std of the fully sampled SENSE image), seed = CRC-32 of the
  case id.

`--part tuning` makes the 1 mm tuning case instead (data/colin27_tuning_volume_1mm_72x181x80.npz): the
80 slices right below the evaluation slab (k = 16..95, world z -55..24 mm, Colin27's training part:
temporal lobes, cerebellum, the base of the frontal lobe), simulated in the same way over the full
217 x 181 field of view, of which the store keeps the 72 central readout planes (x = 72..143; the
planes of a hybrid store are independent, so a crop is the same problem on fewer planes, at a third of
the cost). A 1 mm setting may be tuned on it; a slab reaching world z >= 25 mm is refused.

`--source mni152 --part tuning` makes a second tuning case from another head
(data/mni152_tuning_volume_1mm_72x197x80.npz): MNI152 2009a symmetric (`mni152_2009a_t1_1mm.nii.gz`,
197 x 233 x 189, origin (-98, -134, -72) mm, a skull-stripped population average, smoother than one
scan; as packaged in the nilearn wheel, BSD-3: data/mni152_COPYRIGHT.txt), slices k = 97..176 (world
z 25..104 mm: the slab of the evaluation case, in a head the 3D evaluation never uses, and the part of
MNI152 the prior never trained on, as it never trained on the evaluation slab), simulated in the same
way, the store keeping its 72 central readout planes (x = 80..151 of 233). Why a second tuning case:
Colin27's slab below the evaluation slab lies in the prior's training part, and the levers tuned on it
moved the evaluation case the other way more than once (benchmarks/results/quality3d.md). An MNI152
slab reaching below world z = 25 mm is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COLIN_FILE = "colin27_t1_1mm.nii.gz"
MNI_FILE = "mni152_2009a_t1_1mm.nii.gz"
EVALUATION_MIN_Z_MM = 25.0  # docs/ARCHITECTURE.md "Data split": evaluation is world z >= 25 mm
SLAB_K = (96, 176)  # world z 25 .. 104 mm in the 1 mm volume (the bundled 3D case's slab)
TUNING_SLAB_K = (16, 96)  # world z -55 .. 24 mm: the 80 slices below the evaluation slab
TUNING_X_PLANES = (72, 144)  # the central 72 of the 217 readout planes (as many as the bundled case has)
MNI_TUNING_SLAB_K = (97, 177)  # MNI152 world z 25 .. 104 mm: the evaluation slab's heights, never trained on
MNI_TUNING_X_PLANES = (80, 152)  # the central 72 of MNI152's 233 readout (A-P) planes
SIMULATION = {
    "ncoils": 16,
    "snr": 40.0,  # the bundled cases' SNR
    "max_phase_variation": float(np.pi),
    "phase_order": 3,
    "relative_radius": 1.5,
    "object_threshold": 0.05,
}
class Source(NamedTuple):
    """A head the 1 mm cases are made from."""

    nifti: str  # its file name
    licence: str
    label: str  # what the case is, for its description
    head: str  # its name in the description
    axis: str  # its name for the NIfTI's axes


SOURCES = {
    "colin27": Source(COLIN_FILE, "BSD-3-Clause (Colin27 via Debian mricron-data); see colin27_COPYRIGHT.txt",
                      "real anatomy (Colin27 T1w, BSD-3), simulated coils and phase", "Colin27", "Colin"),
    "mni152": Source(MNI_FILE, "BSD-3-Clause (MNI152 2009a as packaged in the nilearn wheel); see mni152_COPYRIGHT.txt",
                     "MNI152 2009a T1w population average (skull-stripped, BSD-3), simulated coils and phase",
                     "MNI152", "MNI152"),
}


PARTS = {"evaluation": "eval", "tuning": "tuning"}  # part -> the word in its file name and case id
# (source, part) -> (slab k, the readout planes its store keeps; None: all)
SLABS = {("colin27", "evaluation"): (SLAB_K, None), ("colin27", "tuning"): (TUNING_SLAB_K, TUNING_X_PLANES),
         ("mni152", "tuning"): (MNI_TUNING_SLAB_K, MNI_TUNING_X_PLANES)}


def case_file(shape: tuple[int, int, int], folder: Path | None = None, part: str = "evaluation",
              source: str = "colin27") -> Path:
    """The compact case file; `shape` is the stored (x, y, z) shape, a tuning case's readout planes cropped."""
    return (folder or REPO / "data") / f"{source}_{PARTS[part]}_volume_1mm_{shape[0]}x{shape[1]}x{shape[2]}.npz"


DEFAULT_CASE = case_file((217, 181, 80))
TUNING_CASE = case_file((TUNING_X_PLANES[1] - TUNING_X_PLANES[0], 181, 80), part="tuning")
MNI_TUNING_CASE = case_file((MNI_TUNING_X_PLANES[1] - MNI_TUNING_X_PLANES[0], 197, 80), part="tuning",
                            source="mni152")


def world_z_mm(affine: np.ndarray, k: np.ndarray) -> np.ndarray:
    """World z (mm) of voxel slices k of an axis-aligned volume (z may depend on k only)."""
    affine = np.asarray(affine, np.float64)
    if abs(affine[2, 0]) > 1e-6 or abs(affine[2, 1]) > 1e-6:
        raise ValueError("the volume's third voxel axis is not the world z axis (oblique affine)")
    return affine[2, 2] * np.asarray(k, np.float64) + affine[2, 3]


def case_slab(volume: np.ndarray, affine: np.ndarray, slab_k: tuple[int, int], part: str = "evaluation",
              source: str = "colin27") -> np.ndarray:
    """Slices [k0, k1) of `volume` (i, j, k), refused unless every one lies in `part`: an evaluation
    case at world z >= 25 mm, a Colin27 tuning case below it (Colin27 is the evaluation head), an
    MNI152 tuning case at world z >= 25 mm too (where the prior never trained)."""
    k0, k1 = slab_k
    if not 0 <= k0 < k1 <= volume.shape[2]:
        raise ValueError(f"slab k {k0}..{k1 - 1} is outside the volume's {volume.shape[2]} slices")
    z = world_z_mm(affine, np.arange(k0, k1))
    if part == "evaluation" and z.min() < EVALUATION_MIN_Z_MM:
        raise ValueError(f"slab k {k0}..{k1 - 1} reaches world z = {z.min():g} mm: only the evaluation "
                         f"part (world z >= {EVALUATION_MIN_Z_MM:g} mm) may enter an evaluation case")
    if source == "mni152" and z.min() < EVALUATION_MIN_Z_MM:
        raise ValueError(f"slab k {k0}..{k1 - 1} reaches world z = {z.min():g} mm: an MNI152 tuning case stays "
                         f"out of the prior's training part (world z >= {EVALUATION_MIN_Z_MM:g} mm)")
    if source == "colin27" and part == "tuning" and z.max() >= EVALUATION_MIN_Z_MM:
        raise ValueError(f"slab k {k0}..{k1 - 1} reaches world z = {z.max():g} mm: a tuning case must stay "
                         f"out of the evaluation part (world z >= {EVALUATION_MIN_Z_MM:g} mm)")
    return volume[:, :, k0:k1]


def slab_of(source: str, part: str) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """SLABS' entry of a case, or a ValueError naming the cases there are."""
    if (source, part) not in SLABS:
        raise ValueError(f"no {part} case is made from {source}: one of {sorted(SLABS)}")
    return SLABS[source, part]


def make_magnitude(volume: np.ndarray, affine: np.ndarray, slab_k: tuple[int, int] | None = None,
                   nifti_name: str | None = None, part: str = "evaluation",
                   x_planes: tuple[int, int] | None = None, source: str = "colin27") -> tuple[np.ndarray, dict]:
    """(uint8 magnitude (x, y, z), parameters) of the case from a RAS 1 mm volume (i: left -> right,
    j: posterior -> anterior, k: inferior -> superior). `x_planes` (a tuning case's) is the range of
    readout planes its store keeps; the magnitude keeps the whole field of view for the simulation."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {sorted(PARTS)}, got {part!r}")
    default_slab_k = slab_of(source, part)[0]  # refuses a case the table does not make
    slab_k = slab_k or default_slab_k
    head = SOURCES[source]
    nifti_name = nifti_name or head.nifti
    voxel = np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(0))
    if not np.allclose(voxel, 1.0, atol=1e-3):
        raise ValueError(f"expected a 1 mm volume, got voxel size {voxel.tolist()} mm")
    slab = case_slab(np.asarray(volume), affine, slab_k, part, source)
    # (RAS j reversed, i, k): anterior first along the readout axis (as the bundled case)
    magnitude = np.ascontiguousarray(slab[:, ::-1, :].transpose(1, 0, 2))
    magnitude = np.clip(np.round(magnitude), 0, 255).astype(np.uint8)
    shape = list(magnitude.shape)
    if x_planes is not None:
        if not 0 <= x_planes[0] < x_planes[1] <= shape[0]:
            raise ValueError(f"x_planes {x_planes} is outside the {shape[0]} readout planes")
        shape[0] = x_planes[1] - x_planes[0]
    case_id = f"{source}_{PARTS[part]}_volume_1mm_{shape[0]}x{shape[1]}x{shape[2]}_{SIMULATION['ncoils']}coil"
    z = world_z_mm(affine, np.array(slab_k) - np.array([0, 1]))
    kept = ("full in-plane field of view" if x_planes is None else
            f"readout planes x = {x_planes[0]}..{x_planes[1] - 1} of {magnitude.shape[0]} kept")
    params = {
        "case_id": case_id,
        "description": f"{head.label}: {head.head} {part} slab world z {z[0]:g}..{z[1]:g} mm at 1 mm, {kept}, "
                       f"{SIMULATION['ncoils']} birdcage coils, SNR {SIMULATION['snr']:g}",
        "source": f"{head.head} {nifti_name}",
        "slab_k": list(slab_k),
        "world_z_mm": [float(z[0]), float(z[1])],
        "axes": f"x = {head.axis} y reversed (anterior->posterior, readout, fully sampled), y = {head.axis} x, "
                f"z = {head.axis} z (inferior->superior); (ky, kz) phase encodes",
        "readout_axis": "x (anterior-posterior, the longest in-plane axis)",
        "voxel_size_mm": [1.0, 1.0, 1.0],
        "simulation": {**SIMULATION, "seed": _seed(case_id)},
        "licence": head.licence,
        "part": part,
    }
    if x_planes is not None:
        params["x_planes"] = list(x_planes)
    return magnitude, params


def _seed(case_id: str) -> int:
    from engine.physics.masks import seed_from_case

    return seed_from_case(case_id)


def _simulate(magnitude_uint8: np.ndarray, simulation: dict):
    from engine.physics.simulate import simulate_multicoil

    magnitude = magnitude_uint8.astype(np.float32) / float(magnitude_uint8.max())
    return simulate_multicoil(magnitude, **simulation)


def _probe_index(shape: tuple[int, ...], ncoils: int) -> list[list[int]]:
    centre = [n // 2 for n in shape]
    return [[c, *centre] for c in range(ncoils)] + [[ncoils // 2, shape[0] // 3, shape[1] // 4, shape[2] // 3]]


def write_case(path: Path, magnitude_uint8: np.ndarray, params: dict) -> Path:
    """The compact case file: uint8 magnitude + parameters + a check of the simulated k-space."""
    kspace = _simulate(magnitude_uint8, params["simulation"]).kspace
    index = _probe_index(magnitude_uint8.shape, params["simulation"]["ncoils"])
    probes = kspace[tuple(np.array(index).T)]
    params = {**params, "check": {"energy": float(np.sum(np.abs(kspace.astype(np.complex128)) ** 2)),
                                  "probe_index": index, "probe_real": probes.real.tolist(),
                                  "probe_imag": probes.imag.tolist()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, magnitude_uint8=magnitude_uint8, params_json=json.dumps(params))
    return path


def load_case(path: Path = DEFAULT_CASE) -> dict:
    """Simulate the case stored in `path`; checked against the values recorded when it was made."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing: make it with `python scripts/make_case_1mm.py magnitude "
                                f"--nifti .../{COLIN_FILE}`")
    with np.load(path) as archive:
        magnitude_uint8 = archive["magnitude_uint8"]
        params = json.loads(str(archive["params_json"]))
    kspace, maps, reference = _simulate(magnitude_uint8, params["simulation"])
    check = params["check"]
    energy = float(np.sum(np.abs(kspace.astype(np.complex128)) ** 2))
    probes = kspace[tuple(np.array(check["probe_index"]).T)]
    expected = np.array(check["probe_real"]) + 1j * np.array(check["probe_imag"])
    if not (np.isclose(energy, check["energy"], rtol=1e-4)
            and np.allclose(probes, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())):
        raise RuntimeError(f"{path}: the simulated k-space no longer matches the one recorded when the file "
                           "was made (engine.physics.simulate changed): rerun scripts/make_case_1mm.py magnitude")
    if "x_planes" in params:
        kspace, maps, reference = crop_readout(kspace, maps, reference, params["x_planes"])
    return {"kspace": kspace, "maps": maps, "reference": reference, "params": params, "path": Path(path)}


def crop_readout(kspace: np.ndarray, maps: np.ndarray, reference: np.ndarray,
                 x_planes: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep readout planes [x0, x1): the k-space (coils, kx, ky, kz) through the hybrid space (the store's
    own transform, engine.io.hybrid_store.to_hybrid, and back), maps (coils, x, y, z), reference (x, y, z)."""
    import torch

    from engine.io.hybrid_store import to_hybrid
    from engine.physics.fft import fftc

    x0, x1 = x_planes
    hybrid = torch.from_numpy(to_hybrid(kspace)[x0:x1])  # (x, coils, ky, kz)
    cropped = fftc(hybrid, dims=(0,)).movedim(0, 1).contiguous().numpy()
    return cropped, maps[:, x0:x1], reference[x0:x1]


def case_mask(case_id: str, shape: tuple[int, int], acceleration: float) -> np.ndarray:
    """Poisson (ky, kz) mask without calibration region, seeded by the case."""
    from engine.physics.masks import make_mask

    return make_mask("poisson", shape, acceleration, None, seed=_seed(case_id))


def store_name(case_id: str, acceleration: float, chunk_x: int) -> str:
    return f"{case_id}_poisson_R{acceleration:g}_calibnone_cx{chunk_x}.zarr"


def write_store(case: dict, out: Path, acceleration: float, chunk_x: int = 8, overwrite: bool = False) -> Path:
    """`case` (load_case) undersampled at `acceleration` as the engine's hybrid store."""
    from engine.io.data import MulticoilData
    from engine.io.hybrid_store import prepare_hybrid_store

    params = case["params"]
    mask = case_mask(params["case_id"], case["kspace"].shape[2:], acceleration)
    data = MulticoilData(kspace=case["kspace"], maps=case["maps"], reference=case["reference"],
                         attrs={"description": params["description"],
                                "acquisition": {"voxel_size_mm": list(params["voxel_size_mm"])}},
                         source=str(case["path"]), layout="3d")
    return prepare_hybrid_store(data, out, mask=mask, chunk_x=chunk_x, overwrite=overwrite,
                                extra_attrs={"case_id": params["case_id"], "acceleration": acceleration,
                                             "mask": "poisson, no calibration region, seed_from_case(case_id)",
                                             "licence": params["licence"]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    mag = sub.add_parser("magnitude", help="the compact case file in data/ from a 1 mm NIfTI (Colin27 or MNI152)")
    mag.add_argument("--nifti", type=Path, required=True, help=f"path of {COLIN_FILE} (or {MNI_FILE})")
    mag.add_argument("--source", choices=sorted(SOURCES), default="colin27",
                     help="the head: colin27 (evaluation and tuning cases) or mni152 (a tuning case only)")
    mag.add_argument("--part", choices=sorted(PARTS), default="evaluation",
                     help="evaluation: the reported case; tuning: a slab to tune on, central readout planes")
    mag.add_argument("--out", type=Path, default=None,
                     help="default data/<source>_<eval|tuning>_volume_1mm_<shape>.npz")
    st = sub.add_parser("store", help="the hybrid store of the case at one acceleration")
    st.add_argument("--case", type=Path, default=DEFAULT_CASE, help=f"default {DEFAULT_CASE.name}; the tuning "
                    f"cases: data/{TUNING_CASE.name}, data/{MNI_TUNING_CASE.name}")
    st.add_argument("--R", type=float, default=4.0)
    st.add_argument("--chunk-x", type=int, default=8)
    st.add_argument("--out", type=Path, required=True)
    st.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "magnitude":
        import nibabel as nib

        try:
            x_planes = slab_of(args.source, args.part)[1]
        except ValueError as error:
            parser.error(str(error))
        image = nib.load(args.nifti)
        magnitude, params = make_magnitude(np.asarray(image.dataobj), image.affine, nifti_name=args.nifti.name,
                                           part=args.part, x_planes=x_planes, source=args.source)
        shape = (x_planes[1] - x_planes[0], *magnitude.shape[1:]) if x_planes else magnitude.shape
        path = write_case(args.out or case_file(shape, part=args.part, source=args.source), magnitude, params)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB), shape {magnitude.shape}, case {params['case_id']}")
    else:
        path = write_store(load_case(args.case), args.out, args.R, args.chunk_x, args.overwrite)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
