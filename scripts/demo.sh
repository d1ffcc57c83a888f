#!/usr/bin/env bash
# Command one of the README: set up whatever is missing (idempotent), then run the main job on the
# bundled example (real Colin27 anatomy, simulated coils and phase; no download, no GPU needed).
#   bash scripts/demo.sh        # 3D INFusion, 2 CPU processes (torchrun, gloo), about 7 minutes
#   bash scripts/demo.sh 2d     # 2D INFusion on the bundled slice, with baselines and metrics
# Outputs land in outputs/ with a time stamp, so earlier results are never overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh dist
export PYTHONUNBUFFERED=1
stamp="$(date +%Y%m%d-%H%M%S)"
case "${1:-3d}" in
  3d)
    exec torchrun --standalone --nproc-per-node 2 launch/recon3d.py --config configs/demo3d.yaml \
      --out "outputs/demo3d-$stamp.zarr" ;;
  2d)
    exec python launch/recon2d.py --config configs/demo2d.yaml --out "outputs/demo2d-$stamp" ;;
  *)
    echo "usage: bash scripts/demo.sh [3d|2d]" >&2; exit 2 ;;
esac
