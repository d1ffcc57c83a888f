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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.io.prepare import main

if __name__ == "__main__":
    sys.exit(main())
