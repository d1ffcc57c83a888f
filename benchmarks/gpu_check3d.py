"""GPU check of the 3D engine (one process, one GPU, under 5 minutes): per-step time and peak GPU
memory on a 256 x 256 x 80 x 16-coil case, K = 1 / 4 / 16 drawn slices, bf16 autocast on and off,
plus one full-DC step. Not a test; writes benchmarks/results/gpu_check3d-<gpu>.md.

    python benchmarks/gpu_check3d.py                         # on a machine with a CUDA GPU
    python benchmarks/gpu_check3d.py --out $OUT/gpu_check3d.md
    python benchmarks/gpu_check3d.py --cpu-smoke --out /tmp/g.md   # the same code path, tiny, on CPU

Without CUDA (and without --cpu-smoke) it says so and exits 0.

Case: the bundled Colin27 anatomy resampled to 256 x 256 x 80 with 16 simulated birdcage coils
(benchmarks/scale3d.make_case), Poisson-disc R = 4. Model as benchmarks/scale3d.py, with the
shipped prior (or a random prior of its architecture when the weights are absent: same cost).
Per-step memory = torch.cuda.max_memory_allocated during the timed steps minus the memory
allocated before them (data, model, prior); "peak" is the absolute maximum.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_one(case: Path, k: int, bf16: bool, full_dc: bool, steps: int, warmup: int, device: str) -> dict:
    import torch
    from scale3d import INR, PRIOR, ArraySource

    from engine.config import build_config
    from engine.prior import EDMPrior, UNetConfig, default_prior_path, load_prior
    from engine.recon.fit3d import Recon3D, Recon3DConfig
    from engine.runtime.bootstrap import init_distributed

    ctx = init_distributed(device=device, env={})
    cfg = build_config(Recon3DConfig, {"steps": 10_000, "inr": INR, "slices": {"per_step": k}, "prior": PRIOR,
                                       "bf16": bf16, "dc": {"full_every": 1 if full_dc else 0, "chunk": 16}})
    shipped = default_prior_path()
    if (shipped / "weights.pt").exists():
        prior = load_prior(shipped)
    else:
        torch.manual_seed(0)
        prior = EDMPrior(UNetConfig(base_channels=32, channel_mult=(1, 2, 2, 2), attention_levels=(3,)))
    recon = Recon3D(cfg, ArraySource(case, chunk_x=1), ctx, prior=prior)
    cuda = ctx.device.type == "cuda"
    for _ in range(warmup):
        recon.step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    for _ in range(steps):
        recon.step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    row = {"K": k, "bf16": bf16, "full_dc": full_dc, "ms_per_step": 1000 * seconds,
           "resident_gib": before / 2**30, "per_step_gib": (peak - before) / 2**30, "peak_gib": peak / 2**30}
    del recon
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="report path (default results/gpu_check3d-<gpu>.md)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny case on CPU: checks the script, not the GPU")
    args = parser.parse_args()
    import torch
    from scale3d import make_case

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_check3d: needs a CUDA GPU (run it on a GPU machine; --cpu-smoke checks the script on CPU)")
        return 0
    if args.cpu_smoke and args.out is None:
        parser.error("--cpu-smoke needs --out (its timings must not land in results/)")
    device = "cpu" if args.cpu_smoke else "cuda"
    shape, coils = ((8, 16, 8), 2) if args.cpu_smoke else ((256, 256, 80), 16)
    steps, warmup = (1, 1) if args.cpu_smoke else (20, 5)
    slice_counts = (1, 2) if args.cpu_smoke else (1, 4, 16)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check3d-") as tmp:
        case = make_case(shape, coils, Path(tmp))
        print(f"case {shape} x {coils} coils ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for bf16 in (False, True):
            for k in slice_counts:
                rows.append(run_one(case, k, bf16, False, steps, warmup, device))
                print(json.dumps(rows[-1]), flush=True)
            rows.append(run_one(case, slice_counts[-1] if args.cpu_smoke else 4, bf16, True, max(2, steps // 4), 1,
                                device))
            print(json.dumps(rows[-1]), flush=True)
    name = "cpu-smoke" if args.cpu_smoke else torch.cuda.get_device_name().replace(" ", "-")
    out = args.out or RESULTS_DIR / f"gpu_check3d-{name}.md"
    lines = [
        f"# 3D engine on {name} (benchmarks/gpu_check3d.py)",
        "",
        f"- Date: {started}; torch {torch.__version__}; total wall time {time.perf_counter() - t0:.0f} s.",
        (f"- Case: {'x'.join(map(str, shape))}, {coils} coils (Colin27 anatomy, simulated coils), Poisson R = 4;"
         f" one process; {steps} timed steps after {warmup} warm-up steps."),
        "- Model: hash grid 16 levels -> MLP 2 x 64 -> head; prior 'tweedie' (shipped architecture), L2.",
        "",
        "| K | bf16 | full DC every step | ms / step | resident GiB | per-step GiB | peak GiB |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['K']} | {r['bf16']} | {r['full_dc']} | {r['ms_per_step']:.1f} | {r['resident_gib']:.2f} | "
          f"{r['per_step_gib']:.3f} | {r['peak_gib']:.2f} |" for r in rows],
        "",
        "```",
        *[json.dumps(r) for r in rows],
        "```",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
