"""The bundled example cases: real anatomy (Colin27, evaluation part), simulated coils and phase.

Files live in `data/` at the repository root (see data/README.md; regenerate them with
scripts/make_bundled_example.py):
- 2D: a fastMRI-style h5 holding the simulated k-space itself.
- 3D: a small uint8 magnitude volume plus its simulation parameters; the multicoil k-space is
  simulated here, deterministically from the stored seed, and checked against the energy and
  probe values recorded when the file was made.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
CASE_2D_PATH = DATA_DIR / "colin27_axial_z45mm_8coil.h5"
CASE_3D_PATH = DATA_DIR / "colin27_eval_volume_72x64x40.npz"
LABEL = "real anatomy (Colin27 T1w, BSD-3), simulated coils and phase"


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"bundled example {path} is missing: it ships in the repository's data/ folder "
            "(run from a clone, or regenerate it with scripts/make_bundled_example.py)"
        )
    return path


def bundled_case_2d() -> dict:
    """The 2D bundled case.

    Returns:
        dict with kspace `(coils, ny, nx)` complex64 centred (fully sampled, noisy), maps
        `(coils, ny, nx)` complex64 (the simulation's birdcage maps), reference `(ny, nx)` complex64
        (noise-free ground truth), name (the case id, also the mask seed's source), path,
        description, snr, noise_std.
    """
    import h5py

    path = _require(CASE_2D_PATH)
    with h5py.File(path, "r") as f:
        for key in ("kspace", "maps", "reference"):
            if key not in f:
                raise ValueError(f"{path}: dataset {key!r} is missing")
        return {
            "kspace": f["kspace"][0],
            "maps": f["maps"][0],
            "reference": f["reference"][0],
            "name": str(f.attrs["case_id"]),
            "path": path,
            "description": str(f.attrs["description"]),
            "snr": float(f.attrs["snr"]),
            "noise_std": float(f.attrs["noise_std"]),
        }


def bundled_case_3d() -> dict:
    """The 3D bundled case, simulated from the stored magnitude volume (about a second).

    Returns:
        dict with kspace `(coils, kx, ky, kz)` complex64 centred (fully sampled, noisy), maps
        `(coils, x, y, z)` complex64, reference `(x, y, z)` complex64 (noise-free ground truth),
        name, path, description, snr, voxel_size_mm. x is the readout axis (anterior-posterior).
    """
    from engine.physics.simulate import simulate_multicoil

    path = _require(CASE_3D_PATH)
    with np.load(path) as archive:
        magnitude_uint8 = archive["magnitude_uint8"]
        params = json.loads(str(archive["params_json"]))
    simulation = params["simulation"]
    magnitude = magnitude_uint8.astype(np.float32) / float(magnitude_uint8.max())
    kspace, maps, image = simulate_multicoil(magnitude, **simulation)
    expected = params["check"]
    energy = float(np.sum(np.abs(kspace.astype(np.complex128)) ** 2))
    probes = kspace[tuple(np.array(expected["probe_index"]).T)]
    probes_expected = np.array(expected["probe_real"]) + 1j * np.array(expected["probe_imag"])
    # float32 FFTs differ between builds by ~1e-7 of the largest sample: compare to that scale.
    atol = 1e-5 * np.abs(probes_expected).max()
    if not (
        np.isclose(energy, expected["energy"], rtol=1e-4)
        and np.allclose(probes, probes_expected, rtol=1e-4, atol=atol)
    ):
        raise RuntimeError(
            f"{path}: the simulated k-space no longer matches the one recorded when the file was "
            f"made (energy {energy:.6g} vs {expected['energy']:.6g}): engine.physics.simulate "
            "changed; rerun scripts/make_bundled_example.py and commit the new data"
        )
    return {
        "kspace": kspace,
        "maps": maps,
        "reference": image,
        "name": params["case_id"],
        "path": path,
        "description": params["description"],
        "snr": float(simulation["snr"]),
        "voxel_size_mm": tuple(params["voxel_size_mm"]),
    }


def _case_3d_header() -> tuple[str, tuple[int, int, int]]:
    """(case id, image shape (x, y, z)) of the bundled 3D case, without simulating it."""
    with np.load(_require(CASE_3D_PATH)) as archive:
        return json.loads(str(archive["params_json"]))["case_id"], tuple(archive["magnitude_uint8"].shape)


def bundled_store_name(mask_kind: str, acceleration: float, calib: int | None, chunk_x: int) -> str:
    """File name of the bundled 3D case's hybrid store for these settings (reruns reuse it)."""
    case_id, _ = _case_3d_header()
    return f"{case_id}_{mask_kind}_R{acceleration:g}_calib{'none' if calib is None else calib}_cx{chunk_x}.zarr"


def bundled_mask_3d(mask_kind: str = "poisson", acceleration: float = 4.0, calib: int | None = None) -> np.ndarray:
    """The (ky, kz) mask `make_mask(mask_kind, ...)` of the bundled 3D case, seeded from the case.
    Raises ValueError (e.g. an acceleration out of reach) before anything is written."""
    from engine.physics.masks import make_mask, seed_from_case

    case_id, (_, ny, nz) = _case_3d_header()
    return make_mask(mask_kind, (ny, nz), acceleration, calib, seed=seed_from_case(case_id))


def write_bundled_store_3d(path: str | Path, mask: np.ndarray, chunk_x: int = 4, overwrite: bool = False) -> Path:
    """The bundled 3D case undersampled with `mask` (bundled_mask_3d) as the hybrid-space store
    the 3D engine reads (engine.io.hybrid_store), with its voxel size (3 x 3 x 2 mm) in the
    acquisition attributes. chunk_x 4 is configs/demo3d.yaml's."""
    from engine.io.data import MulticoilData
    from engine.io.hybrid_store import prepare_hybrid_store

    case = bundled_case_3d()
    data = MulticoilData(kspace=case["kspace"], maps=case["maps"], reference=case["reference"],
                         attrs={"description": case["description"],
                                "acquisition": {"voxel_size_mm": list(case["voxel_size_mm"])}},
                         source=str(case["path"]), layout="3d")
    return prepare_hybrid_store(data, path, mask=mask, chunk_x=chunk_x, overwrite=overwrite)
