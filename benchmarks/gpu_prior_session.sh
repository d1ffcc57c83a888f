#!/usr/bin/env bash
# Train a 2D prior on for a wall-time budget on a one-GPU machine, in one call (issue 12's lever: the
# 256 px rows of benchmarks/results/quality2d.md are limited by the prior), from the repository root:
#   bash benchmarks/gpu_prior_session.sh OUT_DIR [INIT_FROM]      (MINUTES=7 by default)
# INIT_FROM: a prior folder (default: the shipped prior, engine/assets/prior). The training
# volumes of configs/prior_train.yaml must be in data/volumes (ignored by git; that file says where they come
# from; the trainer names a missing one at start-up, in train.log, whose tail this prints). Batch 32 and
# lr 5e-4 as the shipped prior's stage 3; patches drawn by all but 2 CPU cores (train.loader_workers), which
# that stage, bound by one sampler process, did not have.
# A second call on the same machine resumes (runs/prior_gpu_session/checkpoint). OUT_DIR gets the new prior
# folder (prior/: weights.pt + arch.json), loss.csv, config.yaml, samples.png and train.log. Evaluate it on
# the CPU afterwards (engine.prior.evaluate --compare, as benchmarks/results/prior_eval.md says) and with
# `benchmarks/quality2d.py run --part 256 --methods fast_auto --prior DIR`.
set -o pipefail
out="${1:?usage: bash benchmarks/gpu_prior_session.sh OUT_DIR [INIT_FROM]}"
init="${2:-engine/assets/prior}"
python=${PYTHON:-python3}
mkdir -p "$out"
workers=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
export PYTHONUNBUFFERED=1
minutes=${MINUTES:-7}
timeout "$(awk "BEGIN { print int($minutes * 60 + 120) }")" "$python" launch/train_prior.py --config configs/prior_train.yaml --set \
  train.init_from="$init" train.out_dir=runs/prior_gpu_session train.batch_size=32 train.steps=1000000 \
  train.max_minutes="$minutes" train.loader_workers=$workers train.progress=false train.log_every=50 \
  train.checkpoint_every=1000 > "$out/train.log" 2>&1
status=$?
tail -n 20 "$out/train.log"
cp -r runs/prior_gpu_session/prior runs/prior_gpu_session/loss.csv runs/prior_gpu_session/config.yaml \
  runs/prior_gpu_session/samples.png "$out/" 2>/dev/null
echo "exit $status"
exit $status
