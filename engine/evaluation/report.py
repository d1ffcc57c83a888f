"""Outputs of a reconstruction run: a metrics JSON and a comparison PNG.

Both are written to a temporary file in the target folder and renamed into place, so a reader
never sees a half-written file, and both refuse to replace an existing file unless asked.
In a run folder (`write_run`) metrics.json is written last: it marks the folder complete.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine.evaluation.metrics import nrmse_percent
from engine.io._paths import new_file_mode

ERROR_GAIN = 5  # error maps are shown x5 on the reference's grey scale, a common MRI convention


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (or --overwrite) to replace it")


def _write_atomically(path: Path, write: Callable[[Any], None], binary: bool) -> None:
    """Write through `write(file)` into a temporary sibling of `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, new_file_mode())  # mkstemp's 0600 would make outputs private
        with os.fdopen(handle, "wb" if binary else "w") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _json_ready(value: Any) -> Any:
    """NumPy scalars/arrays -> Python; non-finite floats -> "inf"/"-inf"/"nan" (strict JSON has none)."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_metrics_json(
    path: str | os.PathLike,
    per_method: dict[str, dict],
    overwrite: bool = False,
    metadata: dict | None = None,
) -> Path:
    """Write `{"metadata": {...}, "methods": {method: {metric: value}}}` to `path` atomically.

    Args:
        path: target .json file.
        per_method: e.g. `{"cg_sense": {"nrmse_percent": 7.1, "psnr_db": 33.0, "ssim": 0.9,
            "seconds": 1.2}}`. Non-finite floats (PSNR of a perfect match) are written as strings.
        overwrite: replace an existing file; otherwise FileExistsError.
        metadata: run description (input, mask, acceleration, ...), stored as given.
    """
    path = Path(path)
    _refuse_existing(path, overwrite)
    document = _json_ready({"metadata": metadata or {}, "methods": per_method})
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    _write_atomically(path, lambda file: file.write(text), binary=False)
    return path


def comparison_png(
    path: str | os.PathLike,
    images: dict[str, np.ndarray],
    reference: np.ndarray | None = None,
    support: np.ndarray | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a montage: top row the magnitude images, bottom row |(|x| - |ref|)| x ERROR_GAIN.

    Args:
        path: target .png file.
        images: method name -> image `(ny, nx)`, real or complex.
        reference: image `(ny, nx)` or None; when given it is shown first, each title carries the
            method's NRMSE (%) inside `support`, and an error-map row is added.
        support: boolean-like `(ny, nx)`; error maps are zero outside it.
        overwrite: replace an existing file; otherwise FileExistsError.
    """
    # the object-oriented Figure renders with Agg and leaves pyplot's global backend alone
    from matplotlib.figure import Figure

    path = Path(path)
    _refuse_existing(path, overwrite)
    if not images:
        raise ValueError("comparison_png needs at least one image")
    if reference is not None and "reference" in images:
        raise ValueError("an image is named 'reference'; pass it as `reference` instead")
    panels = ({"reference": reference} if reference is not None else {}) | dict(images)
    magnitudes = {name: np.abs(np.asarray(image)) for name, image in panels.items()}
    shapes = {image.shape for image in magnitudes.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"comparison_png needs 2D images of one shape, got {sorted(shapes)}")
    # one grey scale for all panels, clipped at a high percentile so a few hot pixels don't dim it
    scale_source = magnitudes["reference"] if reference is not None else np.stack(list(magnitudes.values()))
    vmax = float(np.percentile(scale_source, 99.5)) or 1.0

    rows = 2 if reference is not None else 1
    columns = len(panels)
    figure = Figure(figsize=(2.6 * columns, 3.0 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    inside = np.ones(next(iter(shapes)), bool) if support is None else np.asarray(support, bool)
    for column, (name, magnitude) in enumerate(magnitudes.items()):
        title = name
        if reference is not None and name != "reference":
            title += f"\nNRMSE {nrmse_percent(magnitude, reference, support):.2f} %"
        axes[0, column].imshow(magnitude, cmap="gray", vmin=0, vmax=vmax)
        axes[0, column].set_title(title, fontsize=9)
        if reference is not None and name != "reference":
            error = np.abs(magnitude - magnitudes["reference"]) * inside
            axes[1, column].imshow(ERROR_GAIN * error, cmap="inferno", vmin=0, vmax=vmax)
            axes[1, column].set_title(f"|error| x{ERROR_GAIN}", fontsize=9)
    for axis in axes.ravel():
        axis.set_axis_off()
    figure.tight_layout()
    _write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=110), binary=True)
    return path


def prepare_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check, before any work, that `out_dir` may be written; returns it as a Path.

    Refuses (FileExistsError) a path that is not a folder, and a folder that already holds files
    unless `overwrite`. Creates nothing: `write_run` creates the folder once there are results,
    so a run refused or failed later (bad input) leaves no output behind.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out_dir} is not empty; pass --overwrite to write into it")
    return out_dir


def write_run(
    out_dir: str | os.PathLike,
    results: dict[str, dict],
    reference: np.ndarray | None = None,
    support: np.ndarray | None = None,
    metadata: dict | None = None,
    arrays: dict[str, np.ndarray | None] | None = None,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Write one run's outputs into `out_dir` and return the per-method metrics written.

    Files: `recon_<method>.npy` (complex64 (ny, nx)) per method, `<name>.npy` per entry of
    `arrays` (e.g. mask, reference, support; None entries skipped), `comparison.png`
    (`comparison_png`) and, last, `metrics.json` (`write_metrics_json`): a folder without it is
    incomplete. Each file is written under a temporary name and renamed; when overwriting, the
    old metrics.json is deleted first, so an interrupted rewrite never looks complete.

    Args:
        results: method -> {"image": (ny, nx), "seconds": float, other scalars (e.g. lamda)},
            as returned by engine.evaluation.baselines.run_baselines.
        reference, support: when a reference is given, each method also gets
            `engine.evaluation.metrics.all_metrics` inside the support; otherwise only its scalars are kept.
    """
    from engine.evaluation.metrics import all_metrics

    out_dir = prepare_output_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / "metrics.json"
    if overwrite and marker.exists():
        marker.unlink()  # from here until the new one is written the folder reads as incomplete
    per_method: dict[str, dict] = {}
    images: dict[str, np.ndarray] = {}
    for method, result in results.items():
        image = np.asarray(result["image"])
        images[method] = image
        _save_npy(out_dir / f"recon_{method}.npy", image)
        scalars = {key: value for key, value in result.items() if key != "image"}
        scores = all_metrics(image, reference, support) if reference is not None else {}
        per_method[method] = scores | scalars
    for name, array in (arrays or {}).items():
        if array is not None:
            _save_npy(out_dir / f"{name}.npy", np.asarray(array))
    comparison_png(out_dir / "comparison.png", images, reference, support, overwrite)
    write_metrics_json(marker, per_method, overwrite, metadata)
    return per_method


def _save_npy(path: Path, array: np.ndarray) -> None:
    _write_atomically(path, lambda file: np.save(file, array, allow_pickle=False), binary=True)


VOLUME_PLANE_LABELS = ("y-z (x = mid)", "x-z (y = mid)", "x-y (z = mid)")


def _upright(plane: np.ndarray, column: int) -> np.ndarray:
    """The yz and xz planes with z running upwards (superior at the top); xy as stored."""
    return plane.T[::-1] if column < 2 else plane


def volume_montage_png(
    path: str | os.PathLike,
    planes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    voxel_size_mm: tuple[float, float, float] | None = None,
    title: str = "",
    nrmse: dict[str, float] | None = None,
) -> Path:
    """Three orthogonal central planes of 3D volumes, one row per volume, at the true voxel shape
    (the PNG of `volume_montage_figure`).

    Args:
        planes: name -> (yz, xz, xy) planes of a volume (x, y, z), e.g. INFusion, the 3D
            baseline and the reference (its row is the grey-scale source: 99.5th percentile).
        voxel_size_mm: (dx, dy, dz); each plane is drawn over its physical extent in mm, so a
            3 x 3 x 2 mm volume is not squashed into square pixels; None = isotropic.
        nrmse: name -> NRMSE (%) shown in the row's titles.
    Replaces an existing file (a run writes its montage once, at the end).
    """
    path = Path(path)
    figure = volume_montage_figure(planes, voxel_size_mm, title, nrmse)
    _write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=110), binary=True)
    return path


def volume_montage_figure(planes: dict, voxel_size_mm: tuple[float, float, float] | None = None,
                          title: str = "", nrmse: dict[str, float] | None = None):
    """The matplotlib Figure of `volume_montage_png` (each image spans its extent in mm)."""
    from matplotlib.figure import Figure

    dx, dy, dz = voxel_size_mm or (1.0, 1.0, 1.0)
    names = list(planes)
    source = planes.get("reference", planes[names[0]])[0]
    vmax = float(np.percentile(np.abs(source), 99.5)) or 1.0
    first = planes[names[0]]
    (ny, nz), nx = first[0].shape, first[1].shape[0]
    # (row spacing, column spacing) per column as drawn: yz rows z cols y, xz rows z cols x,
    # xy rows x cols y
    spacing = ((dz, dy), (dz, dx), (dx, dy))
    widths = [ny * dy, nx * dx, ny * dy]
    height = max(nz * dz, nx * dx)
    figure = Figure(figsize=(1.0 + sum(widths) / 45.0, len(names) * (0.6 + height / 45.0)))
    axes = figure.subplots(len(names), 3, squeeze=False, gridspec_kw={"width_ratios": widths})
    for r, name in enumerate(names):
        for c, (plane, label) in enumerate(zip(planes[name], VOLUME_PLANE_LABELS)):
            plane = _upright(np.asarray(plane), c)
            rows, columns = plane.shape
            row_mm, column_mm = spacing[c]
            axis = axes[r][c]
            axis.imshow(np.abs(plane), cmap="gray", vmin=0, vmax=vmax, interpolation="nearest",
                        extent=(0, columns * column_mm, rows * row_mm, 0), aspect="equal")
            score = f" {nrmse[name]:.2f} %" if nrmse and name in nrmse else ""
            axis.set_title(f"{name}{score}: {label}", fontsize=8)
            axis.set_axis_off()
    figure.suptitle(title + f"  (voxel {dx:g} x {dy:g} x {dz:g} mm; z up)", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    return figure
