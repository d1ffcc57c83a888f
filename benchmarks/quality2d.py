"""Quality of 2D INFusion against zero-filled, L1-wavelet, the plain INR and INR + TV.

Protocol (issue 4's Benchmark section): every fully sampled slice gets ESPIRiT maps from its centre
(calibration width 24); its reference is the ESPIRiT-combined image; metrics (magnitude, fastMRI
definitions, no rescaling) are taken inside the ESPIRiT support. Masks: 2D Poisson-disc R = 4, 6, 8
without a calibration region (the paper's setting), seeds 0 and 1. To fit 2 CPU cores, k-space is
centre-cropped to 128 x 128 (same field of view, half the resolution) except in the "256" part.

Cases (none is in the prior's training set, docs/ARCHITECTURE.md):
- real: 4h_GE and 4h_mpr (real 4-coil brain slices), 4h_Ph (real resolution phantom, own rows);
- sim: the bundled example (Colin27 evaluation part, z = 45 mm, 8 simulated coils) and an MNI152
  axial slice with 4 simulated coils (engine.physics.simulate, SNR 50);
- 256: 4h_GE, 4h_mpr and 4h_Ph at full 256 x 256 (all R and seeds);
- tune: cases for choosing fast_auto's settings (not among the goal's rows): dipy's real T1w coronal
  slice (evaluation-only, engine/assets/prior/SPLIT.md; magnitude, BSD-3) at 256 px with 4 simulated
  coils, smooth phase and SNR 50 (engine.physics.simulate); and a real 8-coil phantom scan at 256 px
  (GitHub marcsous/parallel's phantom.mat, coil images; k-space with the scanner's own noise); and
  dipy's slice scored against its noise-free truth (dipy_coronal_256_truth: the same noisy k-space, the
  simulation without noise as the reference), which a longer fit cannot approach by reproducing noise,
  and the same at SNR 200 (dipy_coronal_256_snr200_truth), nearer the real brain slices' noise.
Methods: zero_filled; l1_wavelet (engine.evaluation.baselines' rule, tuned once on a Colin27 training slice);
l1_wavelet_best (oracle: the best lambda of a grid, judged against the reference); inr
(configs/inr2d.yaml); inr_tv (configs/inr_tv2d.yaml); fast (configs/demo2d.yaml); fast_auto (configs/auto2d.yaml: the fast
mode with label-free choices of TV weight, prior weight and stop on 8 % held-out k-space, then a
refit on all samples; engine.recon.selection2d), which also logs `fast_auto_norefit` (the chosen
candidate's image before the refit) and every candidate's held-out validation curve with its NRMSE
(the reference only scores, it never steers the choice); reference
(configs/reference2d.yaml with --reference-steps iterations instead of 8000, only on the rows
named by --reference-rows, because one iteration costs seconds on CPU). On the 128 px crops the
two prior modes get `prior.upsample=2`: the crops' ~2 mm pixels are coarser than the prior's
training data, so the prior sees them at 256 px, as it would see the full slice.

Results are appended to a JSON-lines file (one line per case, R, seed, method) so the benchmark can
run in parts and resume; `report` turns them into benchmarks/results/quality2d.md.

Commands (repository root; the real slices stay in ../shared/data and are never committed):
    nice -n 5 python benchmarks/quality2d.py run --part real --methods zero_filled l1_wavelet l1_wavelet_best inr inr_tv fast
    nice -n 5 python benchmarks/quality2d.py run --part sim
    nice -n 5 python benchmarks/quality2d.py run --part 256 --methods l1_wavelet l1_wavelet_best inr_tv fast fast_auto
    nice -n 5 python benchmarks/quality2d.py run --part real --methods reference --reference-steps 500 --reference-rows 4h_GE:6:0
    # speed: one row, methods back to back on an otherwise idle machine, into their own file
    python benchmarks/quality2d.py run --part real --cases 4h_GE --rows 4h_GE:6:0 \
        --methods inr_tv fast reference --reference-rows 4h_GE:6:0 --runs benchmarks/results/quality2d_timing.jsonl
    # the tuning case: which prior-weight list fast_auto should have (its own table; not one of the goal's rows)
    nice -n 5 python benchmarks/quality2d.py run --part tune --rows dipy_coronal_256:4:0 dipy_coronal_256:6:0 \
        dipy_coronal_256:8:0 --methods inr_tv l1_wavelet_best fast_auto --auto-set "selection.prior_weights=[0.0,0.05,0.1,0.2,0.4]"
    # the tuning case scored against its noise-free truth (a variant's rows with --auto-set, as above)
    nice -n 5 python benchmarks/quality2d.py run --part tune --cases dipy_coronal_256_truth --rows dipy_coronal_256_truth:4:0 \
        dipy_coronal_256_truth:6:0 dipy_coronal_256_truth:8:0 --methods inr_tv l1_wavelet_best fast_auto
    # INR + TV with other INR settings (here the hash table sized with the image), beside its config's rows
    nice -n 5 python benchmarks/quality2d.py run --part 256 --methods inr_tv --set model.encoding.log2_table_size=0
    # a candidate prior's rows, beside the shipped prior's (keyed by its weights' hash)
    nice -n 5 python benchmarks/quality2d.py run --part 256 --methods fast_auto --prior CANDIDATE_DIR
    nice -n 5 python benchmarks/quality2d.py bart   # the real undersampled BART brain: bart_brain.png + .json
    python benchmarks/quality2d.py noise-floor      # what each 256 px reference's own noise lets no method beat
    # what a perfect label-free choice of fast_auto's settings could reach on the rows furthest from the goal
    nice -n 5 python benchmarks/quality2d.py settings-bound --rows 4h_mpr_256:4:1 4h_mpr_256:4:0
    python benchmarks/quality2d.py report
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = Path(os.environ.get("INFUSION_SHARED_DATA", REPO.parent / "shared" / "data"))
RUNS = REPO / "benchmarks" / "results" / "quality2d_runs.jsonl"
TIMING_RUNS = REPO / "benchmarks" / "results" / "quality2d_timing.jsonl"  # `run --runs` of the speed rows
REPORT = REPO / "benchmarks" / "results" / "quality2d.md"
NOISE_FLOOR = REPO / "benchmarks" / "results" / "quality2d_noise_floor.json"  # `noise-floor` subcommand
SETTINGS_BOUND = REPO / "benchmarks" / "results" / "quality2d_settings_bound.json"  # `settings-bound` subcommand
# the settings-bound grid: around fast_auto's lists and past their tops; the prior's noise levels as
# (t_high_start, t_high_end): the config's and a stronger pair
BOUND_TV = (5e-4, 1e-3, 2e-3)
BOUND_PRIOR = (0.1, 0.2, 0.4)
BOUND_NOISE = ((0.02, 0.01), (0.05, 0.02))
BOUND_STOPS = (325, 400, 500)
BOUND_GRID = {"tv_weight": list(BOUND_TV), "prior_weight": list(BOUND_PRIOR), "t_high": [list(n) for n in BOUND_NOISE],
              "stops": list(BOUND_STOPS)}  # recorded: rows of another grid are not mixed in
ACCELERATIONS = (4, 6, 8)
SEEDS = (0, 1)
CROP = 128
METHODS = ("zero_filled", "l1_wavelet", "l1_wavelet_best", "inr", "inr_tv", "fast", "fast_auto", "reference")
CONFIGS = {"inr": "inr2d.yaml", "inr_tv": "inr_tv2d.yaml", "fast": "demo2d.yaml", "fast_auto": "auto2d.yaml",
           "reference": "reference2d.yaml"}
# written by the fast_auto run itself: its chosen candidate's image before the refit on all samples
UNREFIT = "fast_auto_norefit"
REPORTED = (*METHODS[:7], UNREFIT, METHODS[7])
PARTS = {
    "real": ("4h_GE", "4h_mpr", "4h_Ph"),
    "sim": ("bundled_colin27_z45", "mni152_axial"),
    "256": ("4h_GE_256", "4h_mpr_256", "4h_Ph_256"),
    "tune": ("dipy_coronal_256", "marcsous_phantom_256", "dipy_coronal_256_truth", "dipy_coronal_256_snr200_truth"),
}
# dipy's slice with 4 simulated coils at these SNRs (engine.physics.simulate's definition)
DIPY_SNR = {"dipy_coronal_256": 50.0, "dipy_coronal_256_snr200": 200.0}
# a simulated case scored against its noise-free truth (the same simulation without noise, combined with the
# noisy case's maps) instead of the noisy fully sampled reference, whose own noise rewards reproducing it
TRUTH = "_truth"
NOTES_MARKER = "<!-- notes: kept when the tables are regenerated -->"
MNI_SLICE = 110  # axial voxel index of the 1 mm MNI152 volume (z = 38 mm: its evaluation part, engine.prior.data.trained_near)


def centre_crop(kspace: np.ndarray, size: int) -> np.ndarray:
    """k-space `(C, ny, nx)` -> `(C, size, size)` around the centre (DC at n // 2 stays at size // 2)."""
    _, ny, nx = kspace.shape
    top, left = ny // 2 - size // 2, nx // 2 - size // 2
    return np.ascontiguousarray(kspace[:, top:top + size, left:left + size])


def simulated_kspace(magnitude: np.ndarray, snr: float | None = 50.0) -> np.ndarray:
    """The simulated cases' k-space `(4, ny, nx)` complex64 of a magnitude image: 4 coils, smooth phase,
    SNR 50 (None: the same case without its noise), seed 0 (engine.physics.simulate)."""
    from engine.physics.simulate import simulate_multicoil

    return simulate_multicoil(magnitude, ncoils=4, snr=snr, seed=0).kspace.astype(np.complex64)


def dipy_kspace(snr: float | None = 50.0) -> np.ndarray:
    """The tuning case dipy_coronal_256's k-space (None: without its noise)."""
    magnitude = np.load(DATA / "volumes" / "dipy_t1_coronal_slice.npy").astype(np.float64)
    return simulated_kspace(magnitude / magnitude.max(), snr)


def case_reference(case: str, kspace: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ESPIRiT maps, the reference a case's rows are scored against, and its support (espirit_reference;
    a `_truth` case's reference is its noise-free truth)."""
    from engine.evaluation.baselines import espirit_reference, zero_filled

    maps, reference, support = espirit_reference(kspace)
    if case.endswith(TRUTH):
        if case.removesuffix(TRUTH) not in DIPY_SNR:
            raise ValueError(f"{case}: only the simulated cases {sorted(DIPY_SNR)} have a noise-free truth")
        reference = zero_filled(dipy_kspace(snr=None), maps)
    return maps, reference, support


def load_case(name: str) -> np.ndarray:
    """Fully sampled k-space `(C, ny, nx)` complex64 of a benchmark case."""
    if name.startswith("4h_"):
        base = name.removesuffix("_256")
        kspace = np.load(DATA / "real2d" / f"{base}_kspace_c4_256x256.npy").astype(np.complex64)
        return kspace if name.endswith("_256") else centre_crop(kspace, CROP)
    if name == "bundled_colin27_z45":
        from engine.io.examples import bundled_case_2d

        return centre_crop(np.asarray(bundled_case_2d()["kspace"], np.complex64), CROP)
    if name == "mni152_axial":
        import nibabel as nib

        from engine.prior.checkpoint import default_prior_path, read_arch
        from engine.prior.data import trained_near

        volume = nib.load(DATA / "volumes" / "mni152_2009a_t1_1mm.nii.gz")
        world_z = float(volume.affine[2, 3] + volume.affine[2, 2] * MNI_SLICE)  # 38 mm
        if trained_near(read_arch(default_prior_path()).get("training", {}).get("volumes", []),
                        "mni152_2009a_t1_1mm.nii.gz", world_z):
            raise RuntimeError(f"mni152_axial: z = {world_z} mm is in or within 10 mm of the shipped prior's "
                               "MNI152 training part (engine/assets/prior/SPLIT.md)")
        plane = np.asarray(volume.dataobj[:, :, MNI_SLICE], dtype=np.float64).T[::-1]
        magnitude = np.zeros((256, 256))
        top, left = (256 - plane.shape[0]) // 2, (256 - plane.shape[1]) // 2
        magnitude[top:top + plane.shape[0], left:left + plane.shape[1]] = plane / plane.max()
        return centre_crop(simulated_kspace(magnitude), CROP)
    if name == "marcsous_phantom_256":
        from engine.io.matlab import read_mat73

        return np.asarray(read_mat73(DATA / "real2d" / "marcsous_phantom_c8_256x256.mat").kspace, np.complex64)
    if name.removesuffix(TRUTH) in DIPY_SNR:
        return dipy_kspace(DIPY_SNR[name.removesuffix(TRUTH)])
    raise ValueError(f"unknown case {name!r}")


# rows of the prior methods written before rows recorded their prior used the prior of 2026-11-26
FIRST_PRIOR = "2c58283baaef (2026-11-26)"


def row_prior(row: dict) -> str | None:
    """The prior a row's method loaded (None: the method uses no prior)."""
    if row["method"] not in PRIOR_METHODS and row["method"] != UNREFIT:
        return None
    return row.get("prior", FIRST_PRIOR)


# the INR's hash-table size of the configs the rows before the automatic size (0) ran with; a row records it when it differs
INR_DEFAULTS = {"log2_table_size": 15}
SELECTION_DEFAULTS = {"extend_edges": 0, "search": "tv_then_prior", "holdout_weighting": "uniform", "debias": False,
                      "blend_l1_wavelet": False, "prior_weights": [0.0, 0.05, 0.1], "stronger_prior_weights": [],
                      "refit_steps": "chosen"}
VARIANT_DEFAULTS = {**INR_DEFAULTS, **SELECTION_DEFAULTS}


def table_label(log2_table_size: int) -> str:
    """How a report names an INR hash-table size (0: sized with the image)."""
    return "hash table 2 per pixel" if log2_table_size <= 0 else f"hash table 2^{log2_table_size}"


def run_variant(keys: dict) -> str:
    """What a row's run did differently from the first ones ("" for none): its INR keys that differ from
    INR_DEFAULTS and (fast_auto) its selection keys that differ from SELECTION_DEFAULTS (older rows have none)."""
    names = {"log2_table_size": table_label,
             "extend_edges": lambda value: "edges extended", "search": lambda value: value.replace("_", " "),
             "holdout_weighting": lambda value: f"{value}-weighted", "debias": lambda value: "debiased",
             "blend_l1_wavelet": lambda value: "blended with the L1-wavelet",
             "prior_weights": lambda value: "prior weights " + " / ".join(f"{w:g}" for w in value),
             "stronger_prior_weights": lambda value: "stronger prior " + " / ".join(f"{w:g}" for w in value)
             + " if clear of the held-out noise",
             "refit_steps": lambda value: "refit for all steps"}
    return ", ".join(names[key](keys[key]) for key, default in VARIANT_DEFAULTS.items()
                     if keys.get(key, default) != default)


def done_keys(path: Path) -> set[tuple]:
    """(case, R, seed, method, prior, run variant) of the rows already run (prior None for methods
    without one; the variant "" for rows run as their configs ship)."""
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            keys.add((row["case"], row["R"], row["seed"], row["method"], row_prior(row), run_variant(row)))
    return keys


def planned_variant(method: str, overrides: list[str]) -> dict:
    """The non-default INR and selection keys a run of `method` would record now (its config with
    `overrides`; {} for the methods without a config)."""
    if method not in CONFIGS:
        return {}
    from engine.config import load_config
    from engine.recon.fit2d import Recon2DConfig

    config = load_config(Recon2DConfig, REPO / "configs" / CONFIGS[method], overrides)
    values = {key: getattr(config.model.encoding, key) for key in INR_DEFAULTS}
    if method == "fast_auto":
        values |= {key: getattr(config.selection, key) for key in SELECTION_DEFAULTS}
    values = {key: list(value) if isinstance(value, tuple) else value  # rows hold JSON lists
              for key, value in values.items()}
    return {key: value for key, value in values.items() if value != VARIANT_DEFAULTS[key]}


def method_overrides(method: str, overrides: list[str], auto_overrides: list[str]) -> list[str]:
    """The config keys a run of `method` gets from `run --set` (every method with a config) and `--auto-set` (fast_auto)."""
    return [*overrides, *(auto_overrides if method == "fast_auto" else ())] if method in CONFIGS else []


def run_method(method: str, kspace, maps, mask, reference, support, reference_steps: int,
               overrides: list[str] = (), prior: Path | None = None) -> dict:
    """One method on one case: {"image", "seconds", "prior_evals", "steps"[, "stopped"]}; `overrides`:
    config keys for the method's config (method_overrides); `prior`: a prior folder instead of the shipped one."""
    from engine.config import load_config
    from engine.evaluation import baselines
    from engine.recon.fit2d import Recon2DConfig, reconstruct_2d

    if method in ("zero_filled", "l1_wavelet", "l1_wavelet_best"):
        result = baselines.run_baselines(kspace, maps, mask, (method,), reference, support)[method]
        return {"image": result["image"], "seconds": result["seconds"], "prior_evals": 0, "steps": None}
    overrides = ["progress=false", *overrides]
    if prior is not None and method in PRIOR_METHODS:
        overrides.append(f"prior.path={prior.resolve()}")
    if method == "reference":
        overrides.append(f"optim.steps={reference_steps}")
    if method in ("fast", "fast_auto", "reference") and kspace.shape[-1] == CROP:
        # the 128 px crops have ~2 mm pixels, coarser than the prior's training data: it sees them
        # at 2x (k-space zero-padding; engine.losses.prior_term), 256 px, as it would see the full slice
        overrides.append("prior.upsample=2")
    config = load_config(Recon2DConfig, REPO / "configs" / CONFIGS[method], overrides)
    if config.selection.enabled:  # the reference only adds NRMSE to the validation curves
        image, info = reconstruct_2d(kspace, maps, mask, config, reference, support)
        return {"image": image, "seconds": info["seconds"], "prior_evals": info["prior_evals"],
                "steps": info["steps"], "stopped": info["stopped"], "selection": info["selection"],
                "unrefit_image": info["unrefit_image"]} | {
                    key: info[key] for key in ("image_without_debias", "image_without_blend") if key in info}
    image, info = reconstruct_2d(kspace, maps, mask, config)
    return {"image": image, "seconds": info["seconds"], "prior_evals": info["prior_evals"],
            "steps": info["steps"], "stopped": info["stopped"]}


def run(part: str, methods: list[str], out: Path, reference_steps: int, reference_rows: list[str],
        cases: list[str] | None, only_rows: list[str] | None = None, auto_overrides: list[str] = (),
        prior_folder: Path | None = None, overrides: list[str] = ()) -> None:
    import torch

    from engine.evaluation.metrics import all_metrics
    from engine.physics.masks import poisson_disc_mask

    torch.set_num_threads(int(os.environ.get("INFUSION_THREADS", "2")))
    done = done_keys(out)
    # what each method's runs load and record: the same for every row of this invocation
    priors = {method: prior_id(prior_folder) if method in PRIOR_METHODS else None for method in methods}
    configured = {method: method_overrides(method, list(overrides), list(auto_overrides)) for method in methods}
    variants = {method: planned_variant(method, configured[method]) for method in methods}
    out.parent.mkdir(parents=True, exist_ok=True)
    for case in cases or PARTS[part]:
        kspace = load_case(case)
        maps, reference, support = case_reference(case, kspace)
        rows = [(r, s) for r in ACCELERATIONS for s in SEEDS]
        for acceleration, seed in rows:
            mask = poisson_disc_mask(kspace.shape[1:], acceleration, calib=(0, 0), seed=seed)
            if only_rows and f"{case}:{acceleration}:{seed}" not in only_rows:
                continue
            for method in methods:
                prior, variant = priors[method], variants[method]
                if (case, acceleration, seed, method, prior, run_variant(variant)) in done:
                    continue
                if method == "reference" and f"{case}:{acceleration}:{seed}" not in reference_rows:
                    continue
                result = run_method(method, kspace, maps, mask, reference, support, reference_steps,
                                    configured[method], prior_folder)
                unrefit = result.pop("unrefit_image", None)
                without_debias = result.pop("image_without_debias", None)
                if without_debias is not None:  # what the debias gains changed (engine.recon.selection2d)
                    result["without_debias_nrmse_percent"] = all_metrics(without_debias, reference,
                                                                         support)["nrmse_percent"]
                without_blend = result.pop("image_without_blend", None)
                if without_blend is not None:  # what the blend with the L1-wavelet changed
                    result["without_blend_nrmse_percent"] = all_metrics(without_blend, reference, support)["nrmse_percent"]
                row = {"case": case, "R": acceleration, "seed": seed, "method": method,
                       "size": int(kspace.shape[-1]), **all_metrics(result["image"], reference, support),
                       **{k: v for k, v in result.items() if k != "image"},
                       **({"prior": prior} if prior else {}), **variant,
                       "machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
                rows_out = [row]
                if unrefit is not None:
                    chosen = row["selection"]["chosen"]
                    rows_out.append({**{k: row[k] for k in ("case", "R", "seed", "size", "prior_evals", "prior")},
                                     **variant,
                                     "method": UNREFIT, **all_metrics(unrefit, reference, support),
                                     "seconds": row["seconds"] - row["selection"].get("refit_seconds", 0.0),
                                     "steps": chosen["steps"], "stopped": "selection",
                                     "machine": row["machine"], "date": row["date"]})
                with open(out, "a") as fh:
                    fh.writelines(json.dumps(written) + "\n" for written in rows_out)
                for written in rows_out:
                    print(f"{case} R={acceleration} seed={seed} {written['method']}: NRMSE "
                          f"{written['nrmse_percent']:.2f} % in {written['seconds']:.1f} s, "
                          f"{written['prior_evals']} prior evals", flush=True)


PRIOR_METHODS = ("fast", "fast_auto", "reference")  # the methods whose configs load the shipped prior


def prior_id(folder: Path | None = None) -> str:
    """The prior these runs loaded (the shipped one by default): the first 12 hex digits of
    sha256(weights.pt) and its date."""
    import hashlib

    from engine.prior.checkpoint import WEIGHTS_FILE, default_prior_path, read_arch

    folder = folder or default_prior_path()
    digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()[:12]
    return f"{digest} ({read_arch(folder).get('training', {}).get('date', '?')})"


BART_CASE = "raw/bart_brain_undersampled/ksp"  # real 8-coil ky-kz plane, already undersampled
BART_PNG = REPO / "benchmarks" / "results" / "bart_brain.png"
BART_LAMBDA = 0.005  # `bart pics -R W:7:0:0.005`, the BART workshop's setting for this case


def bart_brain(out_png: Path = BART_PNG, methods: tuple[str, ...] = ("fast",)) -> dict:
    """The real undersampled BART brain case (no ground truth): images side by side.

    ESPIRiT maps from the data's own fully sampled centre (engine.physics.coils, calibration width
    shrunk to that centre); zero-filled and the engine's L1-wavelet (engine.evaluation.baselines' rule); `bart
    pics -R W:7:0:0.005` with the same maps when `bart` is on PATH; the engine's fast mode
    (configs/demo2d.yaml). Each panel is scaled to its own 99th magnitude percentile inside the
    maps' support (the methods' overall scales differ). Writes `out_png` and a JSON beside it.
    """
    import shutil
    import subprocess
    import tempfile

    import torch

    from engine.evaluation import baselines
    from engine.evaluation.report import comparison_png
    from engine.io.bart import read_bart, write_cfl
    from engine.io.data import derive_mask
    from engine.physics.coils import espirit_maps, support_mask
    from engine.physics.masks import achieved_acceleration

    torch.set_num_threads(int(os.environ.get("INFUSION_THREADS", "2")))
    data = read_bart(DATA / BART_CASE)
    kspace = data.kspace.astype(np.complex64)
    mask = derive_mask(kspace, "2d", str(DATA / BART_CASE)).astype(np.float32)
    calib = min(24, baselines.fully_sampled_centre(mask)) or 24
    maps = espirit_maps(kspace * mask, calib)
    support = support_mask(maps).astype(bool)
    images, info = {}, {}
    for method in ("zero_filled", "l1_wavelet"):
        result = baselines.run_baselines(kspace, maps, mask, (method,), None, support)[method]
        images[method], info[method] = result["image"], {"seconds": round(result["seconds"], 1)}
    bart = shutil.which("bart")
    if bart:
        with tempfile.TemporaryDirectory() as tmp:
            # BART layout [READ, PHS1, PHS2, COIL]: this case is 1 x ny x nx x coils
            write_cfl(Path(tmp) / "ksp", np.moveaxis(kspace * mask, 0, -1)[None])
            write_cfl(Path(tmp) / "sens", np.moveaxis(maps, 0, -1)[None])
            command = [bart, "pics", "-d0", "-R", f"W:7:0:{BART_LAMBDA}", "ksp", "sens", "out"]
            start = time.time()
            subprocess.run(command, cwd=tmp, check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            from engine.io.bart import read_cfl

            images["bart_pics"] = np.asarray(read_cfl(Path(tmp) / "out")).reshape(kspace.shape[1:])
            version = subprocess.run([bart, "version"], check=False, capture_output=True, text=True).stdout.strip()
            info["bart_pics"] = {"seconds": round(time.time() - start, 1), "command": " ".join(command[1:]),
                                 "bart_version": version}
    for method in methods:
        result = run_method(method, kspace, maps, mask, None, support, 0)
        images[method] = result["image"]
        info[method] = {"seconds": round(result["seconds"], 1), "steps": result["steps"],
                        "stopped": result["stopped"], "prior_evals": result["prior_evals"],
                        "config": f"configs/{CONFIGS[method]}",
                        **({"prior": prior_id()} if method in PRIOR_METHODS else {})}
    scaled = {name: image / max(float(np.percentile(np.abs(image)[support], 99)), 1e-12)
              for name, image in images.items()}
    comparison_png(out_png, scaled, overwrite=True)
    summary = {"case": f"shared/data/{BART_CASE} (real 8-coil brain, ky-kz plane, no ground truth)",
               "kspace_shape": list(kspace.shape), "sampled_fraction": round(float(mask.mean()), 4),
               "achieved_acceleration": round(float(achieved_acceleration(mask)), 2),
               "maps": f"ESPIRiT (sigpy) from the data's fully sampled centre, calib_width {calib}",
               "display": "each panel scaled to its 99th magnitude percentile inside the maps' support",
               "methods": info, "png": out_png.name, "machine": machine(),
               "date": datetime.datetime.now().isoformat(timespec="seconds")}
    out_png.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


NOISE_CORNER_RADIUS = 1.25  # k-space beyond this radius (1 = the edge's midpoint) is taken as noise only


def kspace_noise_std(kspace: np.ndarray) -> float:
    """Std per real component of the white noise in fully sampled k-space `(C, ny, nx)`, from its corners
    (beyond NOISE_CORNER_RADIUS, where a slice holds almost no signal: an upper bound if it holds some)."""
    _, ny, nx = kspace.shape
    ky, kx = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    corners = kspace[:, np.hypot(ky, kx) > NOISE_CORNER_RADIUS]
    return float(np.sqrt(np.mean(np.abs(corners) ** 2) / 2))


def reference_noise_floor(sigma: float, maps: np.ndarray, reference: np.ndarray, support: np.ndarray,
                          mask: np.ndarray, seed: int = 0) -> float:
    """NRMSE % floor of a fully sampled case whose k-space holds white noise of std `sigma` (per real
    component, kspace_noise_std), scored on `mask`.

    The reference is combined from noisy samples; a reconstruction can reproduce the noise of the samples it
    measured but not of the ones it did not, so even the noise-free object plus the measured noise scores
    this NRMSE against the reference: that of the reference with a seeded draw of the noise on the
    unmeasured samples removed.
    """
    from engine.evaluation.baselines import zero_filled
    from engine.evaluation.metrics import nrmse_percent

    rng = np.random.default_rng(seed)
    shape = (maps.shape[0], *mask.shape)
    noise = sigma * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    unmeasured = zero_filled((noise * (1 - mask)).astype(np.complex64), maps)
    return nrmse_percent(reference - unmeasured, reference, support)


def noise_floor(cases: tuple[str, ...], out: Path = NOISE_FLOOR) -> dict:
    """reference_noise_floor of every case, R and mask seed of the 256 px part, into `out` (JSON)."""
    from engine.evaluation.baselines import espirit_reference
    from engine.physics.masks import poisson_disc_mask

    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
              "corner_radius": NOISE_CORNER_RADIUS, "cases": {}}
    for case in cases:
        kspace = load_case(case)
        maps, reference, support = espirit_reference(kspace)
        sigma, floors = kspace_noise_std(kspace), {}
        for acceleration in ACCELERATIONS:
            for seed in SEEDS:
                mask = poisson_disc_mask(kspace.shape[1:], acceleration, calib=(0, 0), seed=seed)
                floors[f"{acceleration}:{seed}"] = reference_noise_floor(sigma, maps, reference, support, mask, seed)
        result["cases"][case] = {"sigma_over_max": sigma / float(np.abs(kspace).max()), "floor_percent": floors}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


def noise_floor_section(path: Path) -> list[str]:
    """The `noise-floor` subcommand's table: what no reconstruction can score below against each reference."""
    if not path.is_file():
        return []
    info = json.loads(path.read_text())
    lines = ["## Noise in the references: the NRMSE floor", "",
             (f"`python benchmarks/quality2d.py noise-floor`, {info['date']}, {info['machine']}. The references are "
              "combined from noisy fully sampled k-space; a reconstruction can reproduce the noise of the samples "
              "it measured but not of the unmeasured ones, so even the noise-free object (plus the measured noise) "
              "scores the floor below. Noise: white, with the std of the k-space corners beyond radius "
              f"{info['corner_radius']} (1 = an edge's midpoint); NRMSE % of the reference with one draw of it on the "
              "unmeasured samples removed, mean over mask seeds."), "",
             "| case | corner noise std / max abs(k) | floor R = " + " | R = ".join(map(str, ACCELERATIONS)) + " |",
             "|---|---|" + "---|" * len(ACCELERATIONS)]
    for case, entry in info["cases"].items():
        floors = [np.mean([v for k, v in entry["floor_percent"].items() if k.startswith(f"{a}:")]) for a in ACCELERATIONS]
        lines.append(f"| {case} | {entry['sigma_over_max']:.1e} | " + " | ".join(f"{f:.2f}" for f in floors) + " |")
    return lines + [""]


# issue 12: fast_auto at least 10 % below the better of the two, as their configs and rule ship (method labels)
GOAL_PEERS = ("inr_tv", "l1_wavelet_best")


def goal_percent(peers: list[float]) -> float | None:
    """Issue 12's goal for a row from its GOAL_PEERS' NRMSEs: 10 % below the better (None without any)."""
    return 0.9 * min(peers) if peers else None


def settings_bound(rows: list[str], out: Path = SETTINGS_BOUND) -> dict:
    """fast_auto's fit on all samples (configs/auto2d.yaml's prior term) at every TV weight x prior weight x noise
    levels x stop of the BOUND_ grid, scored against the reference, into `out` (JSON, rewritten after each fit).

    The lowest is what a perfect label-free choice over these settings could reach: when it misses a row's goal,
    no choice of them meets it."""
    import dataclasses
    import itertools

    import torch

    from engine.config import load_config
    from engine.evaluation.metrics import nrmse_percent
    from engine.physics.masks import poisson_disc_mask
    from engine.recon.fit2d import INRFit2D, Recon2DConfig, _as_tensor, load_prior_for
    from engine.recon.selection2d import candidate_config

    torch.set_num_threads(int(os.environ.get("INFUSION_THREADS", "2")))
    config = load_config(Recon2DConfig, REPO / "configs" / CONFIGS["fast_auto"], ["progress=false"])
    device = torch.device("cpu")
    prior = load_prior_for(config.prior, device)
    result = {"machine": machine(), "prior": prior_id(), "rows": {}, "dates": {},
              "log2_table_size": config.model.encoding.log2_table_size}
    if out.is_file():  # other rows of the same prior and grid stay; rows run again are replaced
        previous = json.loads(out.read_text())
        if (previous.get("prior"), previous.get("grid"), table_size(previous)) == (
                result["prior"], BOUND_GRID, result["log2_table_size"]):
            result["rows"], result["dates"] = previous["rows"], previous["dates"]
    result["grid"] = BOUND_GRID
    for row in rows:
        result["dates"][row] = datetime.datetime.now().isoformat(timespec="seconds")
        case, acceleration, seed = row.split(":")
        kspace = load_case(case)
        maps, reference, support = case_reference(case, kspace)
        mask = poisson_disc_mask(kspace.shape[1:], int(acceleration), calib=(0, 0), seed=int(seed))
        tensors = (_as_tensor(kspace, "kspace", True, device), _as_tensor(maps, "maps", True, device),
                   _as_tensor(mask, "mask", False, device))
        fits = result["rows"][row] = []
        for tv_weight, prior_weight, (t_high_start, t_high_end) in itertools.product(BOUND_TV, BOUND_PRIOR, BOUND_NOISE):
            fit_config = candidate_config(config, tv_weight, prior_weight)
            fit_config = dataclasses.replace(fit_config, prior=dataclasses.replace(
                fit_config.prior, t_high_start=t_high_start, t_high_end=t_high_end))
            fit = INRFit2D(*tensors, fit_config, device, prior, None, None)
            entry = {"tv_weight": tv_weight, "prior_weight": prior_weight, "t_high": [t_high_start, t_high_end],
                     "nrmse_percent": {}}
            while fit.next_step < BOUND_STOPS[-1] and fit.stopped is None:
                fit.step()
                if fit.next_step in BOUND_STOPS:
                    entry["nrmse_percent"][str(fit.next_step)] = nrmse_percent(
                        fit.final_image().cpu().numpy(), reference, support)
            fits.append(entry)
            out.write_text(json.dumps(result, indent=1) + "\n")
            print(f"{row} TV {tv_weight:g} prior {prior_weight:g} t_high {t_high_start:g}->{t_high_end:g}: "
                  + " / ".join(f"{v:.3f}" for v in entry["nrmse_percent"].values()) + " %", flush=True)
    print(f"wrote {out}")
    return result


def table_size(info: dict) -> int:
    """The INR's log2_table_size a settings-bound file's fits used (files before the key: INR_DEFAULTS')."""
    return info.get("log2_table_size", INR_DEFAULTS["log2_table_size"])


def settings_bound_section(path: Path, rows: list[dict]) -> list[str]:
    """The `settings-bound` subcommand's table beside each row's goal and fast_auto (the shipped prior's)."""
    if not path.is_file():
        return []
    info = json.loads(path.read_text())
    grid = info["grid"]  # the grid the file was run with
    shipped = run_variant(planned_variant("fast_auto", []))  # configs/auto2d.yaml's rows
    lines = ["## The best settings by the reference: what a perfect label-free choice could reach", "",
             (f"`python benchmarks/quality2d.py settings-bound`, {min(info['dates'].values())} to "
              f"{max(info['dates'].values())}, {info['machine']}, prior {info['prior']}. "
              "fast_auto's fit on all measured samples at every TV weight " + " / ".join(f"{v:g}" for v in grid["tv_weight"])
              + " x prior weight " + " / ".join(f"{v:g}" for v in grid["prior_weight"]) + " x prior noise levels t_high "
              + " / ".join(f"{a:g} -> {b:g}" for a, b in grid["t_high"]) + " x stop " + " / ".join(map(str, grid["stops"]))
              + f" ({int(np.prod([len(values) for values in grid.values()]))} in all; "
              + table_label(table_size(info)) + "), scored "
              "against the reference: a choice no label-free rule can beat over these settings."), "",
             ("| case | R | seed | goal | fast_auto (refit) | best of the grid | its TV / prior / t_high / stop "
              "| best at the config's noise levels |"), "|---|---|---|---|---|---|---|---|"]
    for row, fits in info["rows"].items():
        case, acceleration, seed = row.split(":")
        scores = {(f["tv_weight"], f["prior_weight"], tuple(f["t_high"]), int(stop)): value
                  for f in fits for stop, value in f["nrmse_percent"].items()}
        best = min(scores, key=scores.get)
        at_config = min(value for key, value in scores.items() if key[2] == tuple(grid["t_high"][0]))
        peers = [r for r in rows if (r["case"], str(r["R"]), str(r["seed"])) == (case, acceleration, seed)
                 and method_label(r) in GOAL_PEERS]
        goal = (f"{goal_percent([r['nrmse_percent'] for r in peers]):.3f}"
                if {method_label(r) for r in peers} == set(GOAL_PEERS) else "-")
        auto = [r["nrmse_percent"] for r in rows if (r["case"], str(r["R"]), str(r["seed"]), r["method"])
                == (case, acceleration, seed, "fast_auto") and r.get("prior") == info["prior"]
                and run_variant(r) == shipped]
        lines.append(f"| {case} | {acceleration} | {seed} | {goal} | {f'{auto[-1]:.3f}' if auto else '-'} | "
                     f"{scores[best]:.3f} | {best[0]:g} / {best[1]:g} / {best[2][0]:g} -> {best[2][1]:g} / {best[3]} | "
                     f"{at_config:.3f} |")
    return lines + [""]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


PAPER_STEPS = 8000  # iterations of the paper's recipe (configs/reference2d.yaml)


def speed_section(rows: list[dict]) -> list[str]:
    """The timing runs: methods run one after another on one row with the machine otherwise idle."""
    if not rows:
        return []
    lines = ["## Speed: fast mode vs the paper's recipe (same engine, same row, run back to back)", "",
             (f"Machine: {rows[0]['machine']}; {rows[0]['date'][:10]}; nothing else running. The reference "
             f"recipe's cost per iteration is constant (10 U-Net evaluations, LPIPS-VGG, a 4 x 256 MLP), so its "
             f"{PAPER_STEPS}-iteration time is extrapolated from the iterations run."), "",
             ("| case | R | seed | method | steps | seconds | s / step | prior evals | NRMSE % | "
             f"time for the recipe's {PAPER_STEPS} steps | speed-up of fast |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fast = {(r["case"], r["R"], r["seed"]): r["seconds"] for r in rows if r["method"] == "fast"}
    for r in rows:
        per_step = r["seconds"] / r["steps"] if r.get("steps") else float("nan")
        full = per_step * PAPER_STEPS if r["method"] == "reference" else None
        base = fast.get((r["case"], r["R"], r["seed"]))
        speedup = "" if base is None or not full else (
            f"{r['seconds'] / base:.0f}x as run, {full / base:.0f}x for {PAPER_STEPS} steps")
        lines.append(f"| {r['case']} ({r['size']} px) | {r['R']} | {r['seed']} | {r['method']} | {r.get('steps') or '-'} | "
                     f"{r['seconds']:.1f} | {per_step:.3f} | {r['prior_evals']} | {r['nrmse_percent']:.2f} | "
                     f"{f'{full / 3600:.1f} h' if full else '-'} | {speedup} |")
    return lines + [""]


def summary_section(rows: list[dict]) -> list[str]:
    """Mean NRMSE per R over the brain cases (phantom apart) and how often fast beats each method."""
    brain = [r for r in rows if r["size"] == CROP and r["case"] != "4h_Ph"]
    if not brain:
        return []
    nrmse = {(r["case"], r["R"], r["seed"], r["method"]): r["nrmse_percent"] for r in brain}
    # the reference mode ran on one row only (its own line in the case table and the speed section)
    methods = [m for m in METHODS if m != "reference" and any(r["method"] == m for r in brain)]
    lines = [f"## Summary: brain slices at {CROP} px (phantom excluded), NRMSE % averaged over cases and seeds", "",
             "| R | " + " | ".join(methods) + " | rows where fast is lowest |",
             "|---|" + "---|" * (len(methods) + 1)]
    for acceleration in ACCELERATIONS:
        keys = sorted({k[:3] for k in nrmse if k[1] == acceleration})
        complete = [k for k in keys if all((*k, m) in nrmse for m in methods)]
        if not complete:
            continue
        means = [np.mean([nrmse[(*k, m)] for k in complete]) for m in methods]
        wins = sum(all(nrmse[(*k, "fast")] <= nrmse[(*k, m)] for m in methods if m != "reference")
                   for k in complete) if "fast" in methods else 0
        lines.append(f"| {acceleration} | " + " | ".join(f"{v:.2f}" for v in means) +
                     f" | {wins} of {len(complete)} |")
    cases = sorted({r["case"] for r in brain})
    return lines + ["", f"Cases: {', '.join(cases)}; only (case, R, seed) rows where every listed method ran.", ""]


def selection_sections(rows: list[dict], shipped: str | None = None) -> list[str]:
    """A label-free table for each fast_auto label (selection variant) of the shipped prior (`shipped`,
    its prior_id) if it has such rows, else of the prior with the most (ties: the newest): the label of
    configs/auto2d.yaml's variant first, then the others newest first; other priors' rows are columns of the prior section (a candidate prior run on
    a few rows does not displace the full tables)."""
    autos = [r for r in rows if r["method"].split(" (")[0] == "fast_auto"]
    if not autos:
        return []
    counts = {}
    for r in autos:
        count, newest = counts.get(r.get("prior"), (0, ""))
        counts[r.get("prior")] = (count + 1, max(newest, r["date"]))
    prior = shipped if shipped in counts else max(counts, key=lambda key: counts[key])
    ours = [r for r in autos if r.get("prior") == prior]
    newest: dict[str, str] = {}
    for r in ours:
        newest[r["method"]] = max(newest.get(r["method"], ""), r["date"])
    configured = run_variant(planned_variant("fast_auto", []))
    shipped_labels = {r["method"] for r in ours if run_variant(r) == configured}
    labels = sorted(newest, key=newest.get, reverse=True)
    labels.sort(key=lambda label: label not in shipped_labels)  # configs/auto2d.yaml's rows first, then newest first
    return [line for label in labels for line in selection_section(rows, label)]


def selection_section(rows: list[dict], label: str) -> list[str]:
    """Per (case, R, seed): INR + TV, fast, fast_auto under `label`, what was chosen, and the best
    candidate of the same list judged by the reference (the oracle), plus the seed spread."""
    auto = [r for r in rows if r["method"] == label]
    fast_label = method_label({"method": "fast", "prior": auto[0].get("prior")})
    variant = run_variant(auto[0])
    # rows whose refit ran past the chosen steps (refit_steps: all) show the refit's NRMSE there too
    refit_curves = any(r["selection"].get("refit_steps_run", 0) > r["selection"]["chosen"]["steps"]
                       and "refit_curve" in r["selection"] for r in auto)
    nrmse = {(r["case"], r["size"], r["R"], r["seed"], r["method"]): r["nrmse_percent"] for r in rows}
    keys = {(r["case"], r["size"], r["R"], r["seed"]) for r in auto}
    # INR + TV run with other INR settings (`run --set`) on these rows: shown beside the shipped config's
    other_tv = sorted({k[4] for k in nrmse if k[:4] in keys and k[4].startswith("inr_tv (")})
    lines = [f"## Label-free choices ({label}): per slice, R and mask seed, NRMSE %", "",
             "configs/auto2d.yaml" + (f" with the variant: {variant}." if variant else "."), "",
             ("Chosen on 8 % held-out measured samples (no reference); `candidate` is the chosen candidate's "
              "image (fit without the held-out samples), `refit` the same settings rerun on all samples "
              "(what fast_auto returns" + ("; `refit at the chosen steps`: the same refit at the held-out stop"
                                          if refit_curves else "") + "). Oracle: the candidate of the same runs with the lowest NRMSE at its "
              "own held-out stop (`any stop`: at any check). Within 2 %: chosen candidate <= 1.02 x oracle "
              f"(both fit without the held-out samples). `fast` is {fast_label}."), "",
             ("Goal (issue 12): fast_auto (refit) at least 10 % below the better of INR + TV and the oracle "
              "L1-wavelet (`l1_wavelet_best`) of the same row (INR + TV: configs/inr_tv2d.yaml"
              + (f"; {', '.join(other_tv)}: the same config with other INR settings, shown beside it and counted in the "
                 "strict goal at the end" if other_tv else "") + ")."), "",
             ("| case | R | seed | INR + TV | " + "".join(f"{m} | " for m in other_tv)
              + "L1 oracle | fast | fast_auto (refit) | goal | candidate | "
              "chosen TV / prior / steps | oracle of the list | oracle any stop | within 2 % | selection s |"
              + (" refit at the chosen steps |" if refit_curves else "")),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(other_tv)
             + ("---|" if refit_curves else "")]
    met, met_strict = 0, 0
    within, total = 0, 0
    for r in sorted(auto, key=lambda r: (r["size"], r["case"], r["seed"], r["R"])):
        key = (r["case"], r["size"], r["R"], r["seed"])
        selection, chosen = r["selection"], r["selection"]["chosen"]
        candidates = selection["candidates"]
        picked = next(c for c in candidates if c["tv_weight"] == chosen["tv_weight"]
                      and c["prior_weight"] == chosen["prior_weight"])
        oracle = min(candidates, key=lambda c: c["nrmse_percent"])
        any_stop = min(p["nrmse_percent"] for c in candidates for p in c["curve"])
        ok = picked["nrmse_percent"] <= 1.02 * oracle["nrmse_percent"]
        within, total = within + ok, total + 1

        def shown(method: str, key: tuple = key) -> str:
            value = nrmse.get((*key, method))
            return "-" if value is None else f"{value:.2f}"

        at_chosen = next((f"{p['nrmse_percent']:.2f}" for p in selection.get("refit_curve", [])
                          if p["step"] == chosen["steps"]), "-")
        goal = goal_percent([nrmse[(*key, m)] for m in GOAL_PEERS if (*key, m) in nrmse])
        met += goal is not None and r["nrmse_percent"] <= goal
        strict = goal_percent([nrmse[(*key, m)] for m in (*GOAL_PEERS, *other_tv) if (*key, m) in nrmse])
        met_strict += strict is not None and r["nrmse_percent"] <= strict
        goal_shown = "-" if goal is None else f"{goal:.2f} {'met' if r['nrmse_percent'] <= goal else 'not met'}"
        lines.append(f"| {r['case']} ({r['size']} px) | {r['R']} | {r['seed']} | {shown('inr_tv')} | "
                     + "".join(f"{shown(m)} | " for m in other_tv) + f"{shown('l1_wavelet_best')} | {shown(fast_label)} | {r['nrmse_percent']:.2f} | {goal_shown} | "
                     f"{picked['nrmse_percent']:.2f} | {chosen['tv_weight']:g} / "
                     f"{chosen['prior_weight']:g} / {chosen['steps']} | {oracle['nrmse_percent']:.2f} "
                     f"({oracle['tv_weight']:g} / {oracle['prior_weight']:g} / {oracle['stop_step']}) | "
                     f"{any_stop:.2f} | {'yes' if ok else 'no'} | {r['seconds']:.0f} |" + (f" {at_chosen} |" if refit_curves else ""))
    lines += ["", f"Chosen within 2 % of the oracle on {within} of {total} rows; goal met on {met} of {total}"
              + (f"; against the better of every INR + TV shown and the L1 oracle, on {met_strict} of {total}"
                 if other_tv else "") + ".", ""]
    spread = []
    for method in ("inr_tv", fast_label, label):
        gaps = [abs(nrmse[(c, z, a, 0, method)] - nrmse[(c, z, a, 1, method)])
                for (c, z, a, s, m) in nrmse if m == method and s == 0 and z != CROP and (c, z, a, 1, method) in nrmse]
        if gaps:
            spread.append(f"{method} mean {np.mean(gaps):.2f}, max {np.max(gaps):.2f} points over {len(gaps)} (case, R)")
    if spread:
        lines += ["Seed spread at 256 px (|seed 0 - seed 1| NRMSE): " + "; ".join(spread) + ".", ""]
    return lines


def method_label(row: dict) -> str:
    """Method label of a row: the method, with the prior's date when it is not the first prior and
    the run variant (run_variant: INR settings, and the selection of fast_auto rows; sections compare like with like)."""
    prior, notes = row_prior(row), []
    if prior is not None and prior != FIRST_PRIOR:
        notes.append(f"prior {prior.split('(')[-1].rstrip(')')}")
    variant = run_variant(row)
    if variant:
        notes.append(variant)
    return row["method"] + (f" ({', '.join(notes)})" if notes else "")


def prior_section(rows: list[dict]) -> list[str]:
    """fast with the first prior against fast with each later one, on the rows where both ran."""
    later = sorted({r["method"] for r in rows if " (prior " in r["method"]})  # rows already relabelled
    if not later:
        return []
    nrmse = {(r["case"], r["size"], r["R"], r["seed"], r["method"]): r["nrmse_percent"] for r in rows}
    lines = ["## fast with the later priors vs the first prior (engine/assets/prior: the shipped one; SPLIT.md there), NRMSE %", "",
             "| case | R | seed | INR + TV | fast, first prior (2026-11-26) | " + " | ".join(later) + " |",
             "|---|---|---|---|---|" + "---|" * len(later)]
    keys = sorted({k[:4] for k in nrmse if k[4] in later}, key=lambda k: (k[1], k[0], k[3], k[2]))
    for key in keys:
        case, size, acceleration, seed = key

        def shown(method: str, key: tuple = key) -> str:
            value = nrmse.get((*key, method))
            return "-" if value is None else f"{value:.2f}"

        lines.append(f"| {case} ({size} px) | {acceleration} | {seed} | {shown('inr_tv')} | {shown('fast')} | "
                     + " | ".join(shown(m) for m in later) + " |")
    return lines + [""]


def bart_section(path: Path) -> list[str]:
    """The real undersampled BART brain case (`bart` subcommand): images only, no scores."""
    if not path.is_file():
        return []
    info = json.loads(path.read_text())
    methods = ", ".join(f"{name} {m['seconds']:.1f} s" + (f" (`bart {m['command']}`, BART {m['bart_version']})"
                                                         if "command" in m else "")
                        + (f" ({m['config']}, {m['steps']} steps, prior {m['prior']})" if "config" in m else "")
                        for name, m in info["methods"].items())
    return ["## Real undersampled BART brain (images only, no ground truth)", "",
            (f"`python benchmarks/quality2d.py bart`, {info['date']}, {info['machine']}: "
             f"{info['kspace_shape'][0]} coils, {info['kspace_shape'][1]} x {info['kspace_shape'][2]}, "
             f"{100 * info['sampled_fraction']:.1f} % sampled (R = {info['achieved_acceleration']}); "
             f"{info['maps']}; {info['display']}. Methods: {methods}."), "",
            f"![BART brain]({info['png']})", ""]


def report(runs: Path, out: Path, timing_runs: Path | None = None) -> None:
    raw_rows = read_rows(runs)
    rows = [{**r, "method": method_label(r)} for r in raw_rows]
    timing = read_rows(timing_runs) if timing_runs is not None else []
    by_key: dict[tuple, list[dict]] = {}
    for row in rows:
        by_key.setdefault((row["case"], row["size"], row["R"], row["method"]), []).append(row)
    cases = sorted({(r["case"], r["size"]) for r in rows}, key=lambda c: (c[1], c[0]))
    dates = sorted(r["date"] for r in rows)
    lines = [
        "# 2D quality benchmark (benchmarks/quality2d.py)",
        "",
        f"Machine: {rows[0]['machine']}; runs between {dates[0]} and {dates[-1]} (UTC). Wall times were",
        "measured while other jobs shared the 2 cores, so they are noisy; compare methods within a row.",
        "",
        "Protocol: ESPIRiT maps and reference from the fully sampled slice, metrics on magnitudes inside",
        "the ESPIRiT support; Poisson-disc masks without calibration region; values are means over the",
        "mask seeds listed. k-space centre-cropped to 128 x 128 except rows marked 256.",
        "",
    ]
    lines += summary_section(rows)
    lines += selection_sections(rows, prior_id())
    lines += prior_section(rows)
    for case, size in cases:
        lines += [f"## {case} ({size} x {size})", "",
                  "| R | method | seeds | NRMSE % | PSNR dB | SSIM | seconds | prior evals | steps |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for acceleration in ACCELERATIONS:
            extra = sorted({m for (c, z, a, m) in by_key if (c, z, a) == (case, size, acceleration)} - set(REPORTED))
            for method in (*REPORTED, *extra):
                entries = by_key.get((case, size, acceleration, method))
                if not entries:
                    continue
                mean = {k: float(np.mean([e[k] for e in entries])) for k in ("nrmse_percent", "psnr_db", "ssim", "seconds")}
                evals = int(np.mean([e["prior_evals"] for e in entries]))
                steps = [e.get("steps") for e in entries if e.get("steps")]
                lines.append(f"| {acceleration} | {method} | {','.join(str(e['seed']) for e in entries)} | "
                             f"{mean['nrmse_percent']:.2f} | {mean['psnr_db']:.2f} | {mean['ssim']:.4f} | "
                             f"{mean['seconds']:.1f} | {evals} | {int(np.mean(steps)) if steps else '-'} |")
        lines.append("")
    lines += speed_section(timing)
    lines += bart_section(BART_PNG.with_suffix(".json"))
    lines += noise_floor_section(out.with_name(NOISE_FLOOR.name))  # NOISE_FLOOR beside REPORT
    lines += settings_bound_section(out.with_name(SETTINGS_BOUND.name), raw_rows)
    # hand-written notes (experiments, conclusions) below the marker survive a regeneration
    previous = out.read_text() if out.exists() else ""
    notes = previous[previous.index(NOTES_MARKER):] if NOTES_MARKER in previous else NOTES_MARKER + "\n"
    out.write_text("\n".join(lines) + "\n" + notes)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run (part of) the benchmark, appending to the runs file")
    run_parser.add_argument("--part", choices=sorted(PARTS), required=True)
    run_parser.add_argument("--cases", nargs="*", default=None, help="subset of the part's cases")
    run_parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "reference"],
                            choices=METHODS)
    run_parser.add_argument("--reference-steps", type=int, default=500,
                            help="iterations of the reference mode (the paper: 8000)")
    run_parser.add_argument("--reference-rows", nargs="*", default=["4h_GE:6:0"],
                            help="case:R:seed rows on which the reference mode runs")
    run_parser.add_argument("--rows", nargs="*", default=None, help="only these case:R:seed rows")
    run_parser.add_argument("--runs", type=Path, default=RUNS)
    run_parser.add_argument("--prior", type=Path, default=None,
                            help="a prior folder (weights.pt + arch.json) for the prior methods instead of the "
                                 "shipped one; its rows are keyed by its weights' hash")
    run_parser.add_argument("--auto-set", nargs="*", default=[], metavar="KEY=VALUE",
                            help="config keys for fast_auto's runs, e.g. selection.blend_l1_wavelet=true (a "
                                 "selection key that differs from SELECTION_DEFAULTS names the rows' variant)")
    run_parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                            help="config keys for the runs of every method with a config, e.g. "
                                 "model.encoding.log2_table_size=0 (a key of INR_DEFAULTS names the rows' variant)")
    bart_parser = sub.add_parser("bart", help="the real undersampled BART brain case: images side by side (PNG)")
    bart_parser.add_argument("--out", type=Path, default=BART_PNG)
    bart_parser.add_argument("--methods", nargs="+", default=["fast"], choices=["inr", "inr_tv", "fast", "fast_auto"])
    sub.add_parser("noise-floor", help="the NRMSE floor the noise of each 256 px reference sets (JSON beside the report)")
    bound_parser = sub.add_parser("settings-bound", help="the best of a grid of fast_auto's settings by the reference, "
                                  "per row (JSON beside the report): what a perfect label-free choice could reach")
    bound_parser.add_argument("--rows", nargs="+", required=True, help="case:R:seed rows, e.g. 4h_mpr_256:4:1")
    report_parser = sub.add_parser("report", help="write the markdown table from the runs file")
    report_parser.add_argument("--runs", type=Path, default=RUNS)
    report_parser.add_argument("--out", type=Path, default=REPORT)
    report_parser.add_argument("--timing-runs", type=Path, default=TIMING_RUNS)
    args = parser.parse_args(argv)
    if args.command == "bart":
        bart_brain(args.out, tuple(args.methods))
        return 0
    if args.command == "noise-floor":
        noise_floor(PARTS["256"])
        return 0
    if args.command == "settings-bound":
        settings_bound(args.rows)
        return 0
    if args.command == "run":
        start = time.time()
        run(args.part, args.methods, args.runs, args.reference_steps, args.reference_rows, args.cases, args.rows,
            args.auto_set, args.prior, args.overrides)
        print(f"part {args.part} took {time.time() - start:.0f} s")
    else:
        report(args.runs, args.out, args.timing_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
