"""Convert a 3D multicoil case once into the hybrid-space Zarr store the 3D engine reads.

One centred 1D inverse FFT along the fully sampled readout gives hybrid space (x, coils, ky, kz);
the store is chunked along x so each rank reads only its slab, with the mask (ky, kz), coil maps
(x, coils, y, z) and acquisition attributes beside it (engine/io/hybrid_store.py).

Commands:
    python launch/prepare.py case.h5 --out case.zarr                      # ESPIRiT maps, chunks of 8
    python launch/prepare.py case.h5 --out case.zarr --echo 1 --chunk-x 4 --maps-from file
    python launch/prepare.py ksp.cfl --out case.zarr --maps sens.cfl       # BART k-space and maps
    python launch/prepare.py case.npy --out case.zarr --maps-from none --overwrite
    python launch/prepare.py full.npy --out case.zarr --mask mask_ky_kz.npy   # retrospective mask

Inputs: SKM-TEA-style .h5 (kspace [x, ky, kz, echo, coil], optional maps), BART .cfl/.hdr,
.npy (coils, kx, ky, kz) centred complex, MATLAB v7.3 .mat coil images. Exit code 2 with a
one-line error on bad input or an existing output (pass --overwrite to replace it).
"""
import sys

from engine.io.prepare import main

if __name__ == "__main__":
    sys.exit(main())
