#!/usr/bin/env bash
# The GPU measurements of benchmarks/results/*-H200.md / *-h200.md and the quality3d rows "fit on one GPU",
# in one go on a one-GPU machine (about 9 minutes on an H200), from the repository root:
#   bash benchmarks/gpu_session.sh OUT_DIR
# 1. the 1 mm config's fit (no selection or post-steps: their 3D L1-wavelet solves run on the CPU) at R = 6
#    (slice seed 1), then R = 8 and 4 (seed 0), as 1 rank with the 2 CPU ranks' 2 readout shards;
# 2. benchmarks/gpu_check3d.py (256 x 256 x 80 x 16 coils); 3. benchmarks/kernels.py.
# Rows go to benchmarks/results/quality3d_runs.jsonl; the reports to OUT_DIR (copy them to results/).
set -o pipefail
out="${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 QUALITY3D_MACHINE="${QUALITY3D_MACHINE:-one-GPU machine}"
python=${PYTHON:-python3}
fit() {  # R slice-seed
  timeout 300 "$python" benchmarks/quality3d.py infusion --case colin27_1mm --nproc 1 --R "$1" \
    --label "colin27_1mm fit on one GPU (1 rank, 2 shards, bf16 autocast), slice seed $2" \
    --config configs/colin27_1mm.yaml \
    --set slices.seed="$2" slices.num_shards=2 selection.enabled=false refine.anchor_weight=0
}
fit 6 1 2>&1 | tee "$out/quality3d.log"
timeout 200 "$python" benchmarks/gpu_check3d.py --out "$out/gpu_check3d.md" 2>&1 | tee "$out/gpu_check3d.log"
timeout 200 "$python" benchmarks/kernels.py --output "$out/kernels.md" 2>&1 | tee "$out/kernels.log"
for R in 8 4; do fit "$R" 0 2>&1 | tee -a "$out/quality3d.log"; done
