"""Scaling of the distributed 3D engine on CPU: per-step time and memory versus the number of
drawn slices K and versus the volume size, 1 vs 2 ranks weak scaling, and a memory model for
512 x 512 x 160 x 16 coils on 1 and 8 GPUs. Not a test: writes benchmarks/results/scale3d.md.

    nice -n 5 python benchmarks/scale3d.py            # about 10 minutes on 2 cores
    nice -n 5 python benchmarks/scale3d.py --quick    # a smoke run of every measurement

Cases: the bundled Colin27 volume (real anatomy) resampled to each size, multicoil k-space
simulated from it (engine.physics.simulate: birdcage coils, smooth phase, SNR 40), Poisson-disc
R = 4 on the (ky, kz) plane, hybrid space in memory (no Zarr: I/O is not what is measured).

Each measurement runs in a fresh process (engine.runtime.local_group.launch_local, 1 thread per rank), so its
memory numbers are its own: "setup" is the resident set after the slab, model and prior are in
memory; "per step" is the peak resident set during the timed steps minus that (Linux VmHWM,
reset through /proc/self/clear_refs before the steps), i.e. what a step allocates on top.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "scale3d.md"
INR = {"hidden": 64, "layers": 2, "encoding": {"kind": "hashgrid", "levels": 16, "log2_table_size": 16,
                                               "min_res": 16, "max_res": 512}}
PRIOR = {"mode": "tweedie", "distance": "l2", "weight_start": 1.0, "weight_end": 0.0, "weight_scale": 0.01}


# ------------------------------------------------------------------ cases


def make_case(shape: tuple[int, int, int], coils: int, folder: Path, seed: int = 0) -> Path:
    """Simulated multicoil case of `shape` (x, y, z) from the bundled anatomy, saved as .npy files
    in hybrid space: kspace (x, coils, ky, kz) masked, maps (x, coils, y, z), mask (ky, kz)."""
    from scipy.ndimage import zoom

    from engine.io.examples import CASE_3D_PATH
    from engine.io.hybrid_store import to_hybrid
    from engine.physics.masks import make_mask
    from engine.physics.simulate import simulate_multicoil

    path = folder / f"case_{shape[0]}x{shape[1]}x{shape[2]}x{coils}"
    if (path / "mask.npy").exists():
        return path
    path.mkdir(parents=True)
    with np.load(CASE_3D_PATH) as archive:
        anatomy = archive["magnitude_uint8"].astype(np.float32)
    magnitude = zoom(anatomy, [s / a for s, a in zip(shape, anatomy.shape)], order=1).clip(min=0)
    kspace, maps, _ = simulate_multicoil(magnitude, ncoils=coils, snr=40.0, seed=seed)
    mask = make_mask("poisson", shape[1:], 4.0, None, seed=seed)
    np.save(path / "kspace.npy", to_hybrid(kspace) * mask)
    np.save(path / "maps.npy", np.ascontiguousarray(np.moveaxis(maps, 0, 1)))
    np.save(path / "mask.npy", mask)
    return path


class ArraySource:
    """The reading interface of engine.io.HybridStore over .npy files (memory-mapped)."""

    def __init__(self, path: Path, chunk_x: int):
        self.kspace = np.load(path / "kspace.npy", mmap_mode="r")
        self.maps_array = np.load(path / "maps.npy", mmap_mode="r")
        self.mask = np.load(path / "mask.npy")
        self.shape = tuple(int(s) for s in self.kspace.shape)
        self.chunk_x = chunk_x
        self.path = str(path)

    def read_slab(self, x0: int, x1: int):
        from engine.io.hybrid_store import HybridSlab

        return HybridSlab(x0, x1, np.array(self.kspace[x0:x1]), np.array(self.maps_array[x0:x1]), None)


# ------------------------------------------------------------------ one measurement (in its own process)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_worker(ctx, case: str, k: int, steps: int, warmup: int, prior_on: bool, bf16: bool) -> dict:
    """Time `steps` steps after `warmup` steps on this rank; report time and memory."""
    import torch

    from engine.config import build_config
    from engine.prior import EDMPrior, UNetConfig, default_prior_path, load_prior
    from engine.recon.fit3d import Recon3D, Recon3DConfig

    source = ArraySource(Path(case), chunk_x=1)
    cfg = build_config(Recon3DConfig, {"steps": 10_000, "inr": INR, "slices": {"per_step": k},
                                       "prior": PRIOR if prior_on else {"mode": "off"}, "bf16": bf16,
                                       "optim": {"lr": 0.01}})
    prior = None
    if prior_on:  # the shipped prior, or a random one of the same architecture (same cost)
        shipped = default_prior_path()
        if (shipped / "weights.pt").exists():
            prior = load_prior(shipped)
        else:
            torch.manual_seed(0)
            prior = EDMPrior(UNetConfig(base_channels=32, channel_mult=(1, 2, 2, 2), attention_levels=(3,)))
    recon = Recon3D(cfg, source, ctx, prior=prior)
    for _ in range(warmup):
        recon.step()
    ctx.barrier()
    setup_kib = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        recon.step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    ctx.barrier()
    # median: robust to the other jobs of a shared machine taking the core for a while
    return {"rank": ctx.rank, "step_s": float(np.median(wall)), "cpu_s": float(np.median(cpu)),
            "setup_mib": setup_kib / 1024, "step_mib": (_rss_kib("VmHWM") - setup_kib) / 1024,
            "slab": [recon.x_start, recon.x_stop]}


def measure(case: Path, ranks: int, k: int, steps: int, warmup: int, prior_on: bool = True,
            bf16: bool = False) -> list[dict]:
    from engine.runtime.local_group import launch_local

    run = launch_local(measure_worker, ranks, args=(str(case), k, steps, warmup, prior_on, bf16), timeout_s=1200)
    return run.results


# ------------------------------------------------------------------ memory model


def fit_memory_model(rows: list[dict]) -> np.ndarray:
    """Least squares of per-step MiB = a P + b K C P + c K P over the measured rows (P = ny nz)."""
    design = np.array([[r["P"], r["K"] * r["C"] * r["P"], r["K"] * r["P"]] for r in rows], dtype=float)
    target = np.array([r["step_mib"] for r in rows])
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    return coef


def gpu_model_lines(coef: np.ndarray, nx=512, ny=512, nz=160, coils=16, k=4) -> list[str]:
    """Memory per GPU from the fitted model; the full-DC pass has no prior term (c)."""
    p = ny * nz
    step_mib = coef[0] * p + coef[1] * k * coils * p + coef[2] * k * p
    header = ("| ranks (GPUs) | slab (readout positions) | k-space + maps of the slab | per-step (model, K = 4) | "
              "full-DC pass, 16 planes per chunk (model) | total |")
    lines = [header, "|---|---|---|---|---|---|"]
    for ranks in (1, 8):
        slab = nx // ranks
        data_gib = slab * coils * p * 8 * 2 / 2**30  # complex64 k-space and maps
        full_dc_mib = coef[0] * p + coef[1] * 16 * coils * p
        total = data_gib + max(step_mib, full_dc_mib) / 1024
        lines.append(f"| {ranks} | {slab} | {data_gib:.2f} GiB | {step_mib / 1024:.2f} GiB | "
                     f"{full_dc_mib / 1024:.2f} GiB | {total:.2f} GiB |")
    return lines


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    steps, warmup = (3, 1) if args.quick else (20, 3)
    sizes = [(32, 32, 16), (64, 64, 32)] if args.quick else [(64, 64, 32), (128, 128, 64), (256, 256, 80)]
    k_values = (1, 4) if args.quick else (1, 4, 16)
    k_shape = sizes[-1]
    weak = (32, 64, 32) if args.quick else (32, 128, 64)  # per-rank slab of 32 readout positions
    coils = 8
    # A fixed mmap threshold: every allocation of 64 KiB or more is its own mapping, returned to the
    # system when freed, so the peak RSS follows the live tensors (glibc otherwise raises the
    # threshold after the first large frees and keeps freed memory in its heap). Read by the
    # worker processes at start-up.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="scale3d-") as tmp:
        folder = Path(tmp)

        def record(kind: str, shape, c: int, k: int, ranks: int, prior_on: bool = True) -> dict:
            case = make_case(tuple(shape), c, folder)
            result = measure(case, ranks, k, steps, warmup, prior_on)
            row = {"kind": kind, "shape": list(shape), "C": c, "K": k, "ranks": ranks, "prior": prior_on,
                   "P": shape[1] * shape[2], "step_s": max(r["step_s"] for r in result),
                   "cpu_s": max(r["cpu_s"] for r in result),
                   "setup_mib": max(r["setup_mib"] for r in result), "step_mib": max(r["step_mib"] for r in result),
                   "load": round(os.getloadavg()[0], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            return row

        for k in k_values:
            record("K", k_shape, coils, k, 1)
        for shape in sizes[:-1]:
            record("size", shape, coils, 4, 1)
        record("coils", k_shape, 4, 4, 1)
        record("prior off", k_shape, coils, 4, 1, prior_on=False)
        one = record("weak", weak, coils, 4, 1)
        two = record("weak", (2 * weak[0], *weak[1:]), coils, 4, 2)
    coef = fit_memory_model([r for r in rows if r["prior"]])
    efficiency = {"wall": one["step_s"] / two["step_s"], "cpu": one["cpu_s"] / two["cpu_s"]}
    write_report(args.out, rows, coef, efficiency, started, load_before, steps, warmup, args.quick)
    print(f"weak-scaling efficiency 1 -> 2 ranks: wall {efficiency['wall']:.2f}, "
          f"CPU time {efficiency['cpu']:.2f}; wrote {args.out}")


def write_report(path: Path, rows: list[dict], coef: np.ndarray, efficiency: dict, started: str,
                 load_before: tuple, steps: int, warmup: int, quick: bool) -> None:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lines = [
        "# 3D engine scaling on CPU (benchmarks/scale3d.py)",
        "",
        (f"- Machine: {os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}, "
         f"torch {torch.__version__}, 1 thread per rank; shared with other jobs (load average at start "
         f"{load_before[0]:.1f}; per-row load in the table), so absolute times are noisy."),
        (f"- Date: {started}. {steps} timed steps after {warmup} warm-up steps per row"
         + (" (--quick smoke run: not the reported numbers)" if quick else "") + "."),
        ("- Model: hash grid (16 levels, T = 2^16, 16..512) -> MLP 2 x 64 -> complex head; prior term "
         "'tweedie' with the shipped prior's architecture (U-Net base 32, mult 1-2-2-2), L2 distance; "
         "float32 (bf16 is a GPU measurement: benchmarks/gpu_check3d.py)."),
        ("- Cases: Colin27 anatomy resampled, 8 birdcage coils (4 in the 'coils' row), SNR 40, "
         "Poisson-disc R = 4; per-step memory = peak RSS during the steps minus RSS after set-up."),
        "",
        ("| what | volume x*y*z | coils | K | ranks | prior | wall s / step | CPU s / step | set-up RSS MiB "
         "| per-step MiB | load |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {'x'.join(map(str, r['shape']))} | {r['C']} | {r['K']} | {r['ranks']} | "
                     f"{'on' if r['prior'] else 'off'} | {r['step_s']:.3f} | {r['cpu_s']:.3f} | "
                     f"{r['setup_mib']:.0f} | {r['step_mib']:.1f} | {r['load']} |")
    lines += [
        "",
        ("Weak scaling (32 readout positions and K = 4 per rank; 2 ranks = twice the volume): "
         f"efficiency t(1 rank) / t(2 ranks) = **{efficiency['wall']:.2f} in wall time** per step "
         f"(the slower rank counts) and **{efficiency['cpu']:.2f} in CPU time** per step of a rank. "
         "The CPU-time figure is the work of a rank, including its part of the trunk all-reduce; the "
         "wall-time figure also holds the waiting for a core: the 2 ranks compete with each other "
         "and with the other jobs of this 2-core machine (load column). On separate cores or GPUs "
         "the CPU-time figure is the one to expect. Step times are medians over the timed steps."),
        "",
        "## Memory model for 512 x 512 x 160, 16 coils",
        "",
        ("Fitted to the rows above (prior on): per-step MiB = a P + b K C P + c K P with P = ny nz: "
         f"a = {coef[0]:.3e}, b = {coef[1]:.3e}, c = {coef[2]:.3e} MiB (b is about "
         f"{coef[1] * 2**20 / 8:.1f} complex64 copies per coil-plane sample). The resident data is "
         "exact arithmetic (complex64 k-space and maps of the slab). CPU RSS stands in for GPU memory; "
         "cuFFT workspaces and the caching allocator add to it, so measure with "
         "benchmarks/gpu_check3d.py before sizing a job. DESIGN.md's estimate: a step touching k "
         "slices of 512 x 160 x 16 coils costs k x 10.5 MB per copy."),
        "",
        *gpu_model_lines(coef),
        "",
        ("With 1 GPU the whole volume's k-space and maps (10.0 GiB) fit an 80 GB card; "
         "`data_on_host: true` keeps them in host memory and moves only the drawn planes each step. "
         "Per-step memory does not depend on nx: only the resident slab does."),
        "",
        "Raw rows (JSON):",
        "",
        "```",
        *[json.dumps(r) for r in rows],
        "```",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
