"""Convert a 3D multicoil case once into the hybrid-space Zarr store the 3D engine reads.

One centred 1D inverse FFT along the fully sampled readout gives hybrid space (x, coils, ky, kz);
the store is chunked along x so each rank reads only its slab, with the mask (ky, kz), coil maps
(x, coils, y, z) and acquisition attributes beside it (engine/io/hybrid_store.py).

Commands:
    python launch/prepare.py --demo --out demo.zarr                            # the bundled 3D example (R = 4)
    python launch/prepare.py your_case.h5 --out case.zarr                      # ESPIRiT maps, chunks of 8
    python launch/prepare.py your_case.h5 --out case.zarr --echo 1 --chunk-x 4 --maps-from file
    python launch/prepare.py your_ksp.cfl --out case.zarr --maps your_sens.cfl # BART k-space and maps
    python launch/prepare.py your_case.npy --out case.zarr --maps-from none --overwrite
    python launch/prepare.py your_full.npy --out case.zarr --mask your_mask_ky_kz.npy # retrospective mask
    python launch/prepare.py your_ksp.cfl --out case.zarr --voxel-size 1 1 1.5 # voxel size (mm) for the output

`--demo` (or the bundled file data/colin27_eval_volume_72x64x40.npz as input) writes the store that
`launch/recon3d.py --config configs/demo3d.yaml` builds for itself without --input: the bundled
72 x 64 x 40 x 8 case (real Colin27 anatomy, simulated coils and phase), Poisson-disc R = 4, voxel
size 3 x 3 x 2 mm.

Inputs: SKM-TEA-style .h5 (kspace [x, ky, kz, echo, coil], optional maps), BART .cfl/.hdr,
.npy (coils, kx, ky, kz) centred complex, MATLAB v7.3 .mat coil images. Exit code 2 with a
one-line error on bad input or an existing output (pass --overwrite to replace it).
"""
import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.io.errors import InputError
from engine.io.hybrid_store import HybridStore
from engine.io.prepare import MAPS_SOURCES, prepare_case


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare", description="Convert a 3D multicoil case to a hybrid-space Zarr store "
        "(1D iFFT along the readout, chunked along it) for the distributed 3D engine.")
    parser.add_argument("input", nargs="?", default=None,
                        help="3D case: SKM-TEA-style .h5, BART .cfl, .npy, .mat (v7.3), or the bundled "
                        "data/colin27_eval_volume_72x64x40.npz (same as --demo)")
    parser.add_argument("--demo", action="store_true",
                        help="the bundled 3D example undersampled as configs/demo3d.yaml's `bundled:` "
                        "section (Poisson-disc R = 4, chunks of 4): the store the 3D demo reads")
    parser.add_argument("--out", required=True, help="the Zarr store to create (e.g. case.zarr)")
    parser.add_argument("--echo", type=int, default=0, help="echo of a multi-echo file (default 0)")
    parser.add_argument("--chunk-x", type=int, default=None,
                        help="readout positions per chunk (default 8; 4 for the bundled example)")
    parser.add_argument("--maps-from", choices=MAPS_SOURCES, default="espirit",
                        help="coil maps: ESPIRiT estimate, the input file's maps, or none")
    parser.add_argument("--maps", default=None,
                        help="coil maps file (.npy (coils, x, y, z) or BART .cfl); implies file")
    parser.add_argument("--mask", default=None,
                        help="sampling mask (ky, kz) 0/1 (.npy, .npz or .h5 dataset 'mask') applied "
                        "to the input; default: the input's own sampling")
    parser.add_argument("--calib-width", type=int, default=24, help="ESPIRiT calibration width")
    parser.add_argument("--voxel-size", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="voxel size in mm, stored in the acquisition attributes and written as "
                        "the output volume's OME-Zarr scale (default: from the input's header, if any)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: prints the store summary; exit 2 with a one-line error on bad input."""
    from engine.runtime.validate import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(lambda: _prepare_and_summarise(args))


def _is_bundled_case(path: str) -> bool:
    from engine.io.examples import CASE_3D_PATH

    return Path(path).name == CASE_3D_PATH.name and path.endswith(".npz")


def _prepare_and_summarise(args: argparse.Namespace) -> int:
    if args.demo and args.input is not None:
        raise ValueError("give an input file or --demo, not both")
    if args.input is None and not args.demo:
        raise ValueError("no input: give a 3D case file, or --demo for the bundled example")
    if args.demo or _is_bundled_case(args.input):
        if args.maps or args.mask or args.voxel_size:
            raise ValueError("--demo (the bundled case) brings its own maps, mask and voxel size: "
                             "drop --maps, --mask and --voxel-size")
        from engine.io.examples import bundled_mask_3d, write_bundled_store_3d
        from engine.recon.config3d import BundledCaseConfig  # the demo's undersampling defaults

        demo = BundledCaseConfig()
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise InputError(out, "output exists; pass --overwrite to replace it")
        out = write_bundled_store_3d(out, bundled_mask_3d(demo.mask, demo.acceleration, demo.calib),
                                     demo.chunk_x if args.chunk_x is None else args.chunk_x,
                                     overwrite=args.overwrite)
    else:
        out = prepare_case(args.input, args.out, echo=args.echo, chunk_x=8 if args.chunk_x is None else args.chunk_x,
                           maps_from=args.maps_from, maps_path=args.maps, calib_width=args.calib_width,
                           overwrite=args.overwrite, mask_path=args.mask, voxel_size=args.voxel_size)
    store = HybridStore(out)
    mask = store.attrs["mask"]
    voxel = store.voxel_size_mm
    print(f"wrote {out}: (x, coils, ky, kz) = {store.shape}, chunk_x = {store.chunk_x}, "
          f"acceleration {mask['acceleration']:.2f} (mask {mask['origin']}), maps: "
          f"{store.attrs['maps']['origin'] or 'none'}, reference: "
          f"{store.attrs['reference']['kind'] or 'none'}, voxel size: "
          f"{' x '.join(f'{v:g}' for v in voxel) + ' mm' if voxel else 'not recorded (pass --voxel-size)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
