"""Benchmark of the SENSE data-consistency step: torch composite vs the fused Triton kernels.

One step = forward + loss + adjoint (loss.backward() with respect to the image), the work the
reconstruction loops do per iteration. Paths:
  composite   torch autograd through engine.physics.sense.sense_operator (fftshift, fftn, ...)
  torch-ref   kernels.sense.dc_loss(backend="torch") = engine.physics.sense.residual_sum: modulation
              instead of shifts, plain autograd
  triton      dc_loss(backend="triton", fft="torch"): Triton kernels (1)-(3) around cuFFT
  triton-fft  dc_loss(backend="triton", fft="triton"): Triton FFT fused into (1)-(3)
              (power-of-two planes only: 256 x 256 here)
Cases: 16 coils; planes 256 x 256, 320 x 320, 512 x 160 (the 3D (ky, kz) plane); batch 1..16
planes, each with its own coil maps (the 3D loop's drawn readout positions).

Bandwidth: "bound" is the time to move the compulsory bytes once at the device's peak bandwidth
(read image, maps, measured data and mask, write the gradient: 8 P (2 B + 2 B C) + 4 P bytes);
"GB/s" is those bytes over the measured time. The L2 cache is flushed before every repetition.

Commands (repository root):
    python benchmarks/kernels.py                  # one GPU, < 3 minutes -> results/kernels-<gpu>.md
    python benchmarks/kernels.py --output /tmp/k.md --batches 1 16
On a machine without CUDA it prints that it needs CUDA and exits 0 (`--cpu-dry-run` runs the torch
paths on tiny CPU shapes to exercise the script itself; its timings mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.physics.sense import sense_operator
from kernels.sense import dc_loss, triton_fft_applies

RESULTS = Path(__file__).resolve().parent / "results"
COILS = 16
PLANES = [(256, 256), (320, 320), (512, 160)]
BATCHES = [1, 2, 4, 8, 16]
SAMPLING_DENSITY = 1 / 6  # the paper's R = 6; the kernels' cost does not depend on it
TIME_BUDGET_S = 150.0  # stop adding cases after this, so the script ends within 3 minutes


def composite_loss(image, maps, mask, kspace):
    residual = sense_operator(maps, mask)(image) - mask * kspace
    return torch.sum(torch.abs(residual) ** 2)


PATHS: dict[str, Callable[..., torch.Tensor]] = {
    "composite": composite_loss,
    "torch-ref": lambda *args: dc_loss(*args, backend="torch"),
    "triton": lambda *args: dc_loss(*args, backend="triton", fft="torch"),
    "triton-fft": lambda *args: dc_loss(*args, backend="triton", fft="triton"),
}


@dataclass
class Result:
    height: int
    width: int
    batch: int
    path: str
    coils: int = COILS
    milliseconds: float | None = None
    loss_error: float | None = None
    gradient_error: float | None = None
    failure: str | None = None


def compulsory_bytes(batch: int, height: int, width: int, coils: int = COILS) -> int:
    """Read x (B P), maps (B C P), data (B C P) as complex64, mask (P) float32; write grad (B P)."""
    plane = height * width
    return 8 * plane * (2 * batch + 2 * batch * coils) + 4 * plane


# Coil planes (B x C x height x width complex64) each path reads or writes per step, counted from the
# kernels (kernels/README.md); cuFFT is assumed to read and write once per 2D transform.
MODELLED_COIL_PLANES = {"triton": 11, "triton-fft": 7}


def modelled_bytes(path: str, batch: int, height: int, width: int, coils: int = COILS) -> int | None:
    """Bytes the path moves by the traffic model (None where no model: the torch paths)."""
    planes = MODELLED_COIL_PLANES.get(path)
    if planes is None:
        return None
    plane = height * width
    return 8 * plane * (planes * batch * coils + 2 * batch) + 4 * plane


def peak_bandwidth(device: torch.device) -> float | None:
    """Bytes/s from the memory clock and bus width (double data rate), or None if unknown."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2.0 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), median of 10."""
    source = torch.empty(2**28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    milliseconds = time_step(lambda: target.copy_(source), device, None, min_seconds=0.2)
    return 2 * source.numel() * 4 / (milliseconds * 1e-3)


def time_step(
    step: Callable[[], object],
    device: torch.device,
    flush: torch.Tensor | None,
    min_seconds: float = 0.3,
    max_repetitions: int = 200,
) -> float:
    """Median milliseconds of `step` after 3 warm-up calls (which also compile the kernels)."""
    for _ in range(3):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_repetitions and (
        len(times) < 5 or time.perf_counter() - started < min_seconds
    ):
        if flush is not None:
            flush.zero_()  # evict L2 so each repetition reads from device memory
        if cuda:
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            begin_s = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin_s) * 1e3)
    return statistics.median(times)


def make_inputs(batch: int, height: int, width: int, device: torch.device, coils: int = COILS):
    generator = torch.Generator(device=device).manual_seed(batch * 100003 + height * 17 + width)
    image = torch.randn(batch, height, width, dtype=torch.complex64, device=device, generator=generator)
    maps = torch.randn(
        batch, coils, height, width, dtype=torch.complex64, device=device, generator=generator
    )
    mask = (torch.rand(height, width, device=device, generator=generator) < SAMPLING_DENSITY).float()
    kspace = torch.randn(
        batch, coils, height, width, dtype=torch.complex64, device=device, generator=generator
    )
    return image, maps, mask, kspace


def run_case(
    path: str, inputs, reference, device: torch.device, flush: torch.Tensor | None, result: Result
) -> Result:
    image, maps, mask, kspace = inputs
    loss_function = PATHS[path]
    x = image.clone().requires_grad_()

    def step():
        x.grad = None
        loss = loss_function(x, maps, mask, kspace)
        loss.backward()
        return loss

    try:
        loss = step()
        if reference is not None:
            reference_loss, reference_gradient = reference
            result.loss_error = abs(loss.item() - reference_loss) / abs(reference_loss)
            result.gradient_error = (
                (x.grad - reference_gradient).abs().max() / reference_gradient.abs().max()
            ).item()
        result.milliseconds = time_step(step, device, flush)
    except Exception as error:  # noqa: BLE001 (one failing path must not lose the others)
        result.failure = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return result


def run(
    device: torch.device, planes, batches, paths, coils: int = COILS
) -> tuple[list[Result], list[str]]:
    flush = (
        torch.empty(2**26, dtype=torch.float32, device=device) if device.type == "cuda" else None
    )
    results: list[Result] = []
    notes: list[str] = []
    started = time.perf_counter()
    for height, width in planes:
        for batch in batches:
            if time.perf_counter() - started > TIME_BUDGET_S:
                notes.append(f"skipped {height} x {width} batch {batch}: time budget {TIME_BUDGET_S} s")
                continue
            inputs = make_inputs(batch, height, width, device, coils)
            image = inputs[0].clone().requires_grad_()
            reference_loss = composite_loss(image, *inputs[1:])
            reference_loss.backward()
            reference = (reference_loss.item(), image.grad)
            for path in paths:
                if path == "triton-fft" and not triton_fft_applies(height, width):
                    continue  # would silently be the "triton" path (cuFFT) again
                result = Result(height, width, batch, path, coils)
                run_case(path, inputs, reference, device, flush, result)
                results.append(result)
                print(format_row(result, None), flush=True)
            del inputs, image, reference
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results, notes


def format_row(result: Result, peak: float | None, composite_ms: float | None = None) -> str:
    plane = f"{result.height} x {result.width}"
    if result.failure is not None:
        return f"| {plane} | {result.batch} | {result.path} | failed: {result.failure} |||||||"
    milliseconds = result.milliseconds
    moved = compulsory_bytes(result.batch, result.height, result.width, result.coils)
    gigabytes_per_s = moved / (milliseconds * 1e-3) / 1e9
    peak_share = f"{100 * gigabytes_per_s * 1e9 / peak:.0f}%" if peak else "n/a"
    times_bound = f"{milliseconds * 1e-3 / (moved / peak):.2f}" if peak else "n/a"
    speedup = f"{composite_ms / milliseconds:.2f}" if composite_ms else "n/a"
    model = modelled_bytes(result.path, result.batch, result.height, result.width, result.coils)
    times_own_bound = f"{milliseconds * 1e-3 / (model / peak):.2f}" if peak and model else "n/a"
    return (
        f"| {plane} | {result.batch} | {result.path} | {milliseconds:.3f} | {gigabytes_per_s:.0f} "
        f"| {peak_share} | {times_bound} | {times_own_bound} | {speedup} | {result.loss_error:.1e} "
        f"| {result.gradient_error:.1e} |"
    )


def report(results: list[Result], notes: list[str], device: torch.device) -> str:
    peak = peak_bandwidth(device) if device.type == "cuda" else None
    measured_copy = copy_bandwidth(device) if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "absent"

    coils = results[0].coils if results else COILS
    bandwidth_line = (
        f"Peak bandwidth (memory clock x bus width): {peak / 1e9:.0f} GB/s; measured 1 GiB copy: "
        f"{measured_copy / 1e9:.0f} GB/s."
        if peak and measured_copy
        else "Peak bandwidth: unknown on this device."
    )
    lines = [
        f"# SENSE data-consistency kernels on {name}",
        "",
        (
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; torch "
            f"{torch.__version__}, triton {triton_version}; command: "
            "`python benchmarks/kernels.py`."
        ),
        bandwidth_line,
        (
            f"One step = forward + loss + backward to the image; {coils} coils, per-plane maps, "
            "L2 flushed before each repetition, median time. GB/s = compulsory bytes / time; "
            "x bound = time / (compulsory bytes / peak); x own = time / (bytes the path moves "
            "by the traffic model / peak), i.e. how far the path is from its own bandwidth limit; "
            "speedup = composite time / path time; "
            "errors relative to the composite (loss; max |grad| difference over max |grad|)."
        ),
        "",
        "| plane | batch | path | ms | GB/s | of peak | x bound | x own | speedup | loss err | grad err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    composite_ms = {(r.height, r.width, r.batch): r.milliseconds for r in results if r.path == "composite"}
    for result in results:
        lines.append(
            format_row(result, peak, composite_ms.get((result.height, result.width, result.batch)))
        )
    lines += ["", *[f"- {note}" for note in notes]]
    lines += ["", verdict(results, peak, composite_ms)]
    return "\n".join(lines) + "\n"


def verdict(results: list[Result], peak: float | None, composite_ms) -> str:
    """The issue's goal at 16 x 256 x 256, batch 1: >= 1.5x the composite, within 2x of the bound."""
    candidates = [
        r
        for r in results
        if (r.height, r.width, r.batch) == (256, 256, 1) and r.path.startswith("triton") and r.milliseconds
    ]
    baseline = composite_ms.get((256, 256, 1))
    if not candidates or not baseline or not peak:
        return "Goal check (16 x 256 x 256, batch 1): not measured in this run."
    best = min(candidates, key=lambda r: r.milliseconds)
    speedup = baseline / best.milliseconds
    times_bound = best.milliseconds * 1e-3 / (compulsory_bytes(1, 256, 256) / peak)
    met = speedup >= 1.5 and times_bound <= 2.0
    return (
        f"Goal check (16 x 256 x 256, batch 1): best Triton path `{best.path}` is {speedup:.2f}x "
        f"the composite and {times_bound:.2f}x the bandwidth bound: goal "
        f"{'met' if met else 'NOT met'} (needs >= 1.5x and <= 2x)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=Path, help="report path (default results/kernels-<gpu>.md)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument(
        "--cpu-dry-run", action="store_true", help="torch paths on tiny CPU shapes (script check)"
    )
    args = parser.parse_args(argv)

    if args.cpu_dry_run:
        if args.output is None:
            parser.error("--cpu-dry-run needs --output (its timings must not land in results/)")
        device = torch.device("cpu")
        results, notes = run(device, [(16, 16), (12, 8)], [1, 2], ["composite", "torch-ref"], 4)
        args.output.write_text(report(results, notes, device))
        print(f"wrote {args.output}")
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (Triton kernels); nothing to measure here.")
        return 0
    device = torch.device("cuda")
    results, notes = run(device, PLANES, args.batches, args.paths)
    text = report(results, notes, device)
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    output = args.output or RESULTS / f"kernels-{slug}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
