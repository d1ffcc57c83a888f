"""Train the 2D EDM diffusion prior (logic: engine/prior/train.py).

One process (CPU or one GPU):
    python launch/train_prior.py --config configs/prior_train.yaml
Override keys:
    python launch/train_prior.py --config configs/prior_train.yaml --set train.steps=100 train.out_dir=runs/try
One node, 4 GPUs (DDP; gloo on CPU):
    torchrun --standalone --nproc_per_node=4 launch/train_prior.py --config configs/prior_train.yaml
DeepSpeed ZeRO-2 (configs/deepspeed_zero2.json):
    torchrun --standalone --nproc_per_node=4 launch/train_prior.py --config configs/prior_train.yaml \
        --set train.parallel=deepspeed
Two nodes (SLURM): srun torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d \
        --rdzv_endpoint=$MASTER_ADDR:29500 launch/train_prior.py --config ...
A run resumes from <out_dir>/checkpoint when it exists (train.resume=true).
Exit codes: 0 done; 2 refused (unknown config key or wrong type, missing or unreadable volume);
3 stopped after train.max_bad_steps non-finite steps in a row (the last checkpoint is kept). Both
with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import add_override_option, load_config
from engine.prior.train import NonFiniteTraining, PriorTrainConfig, train_prior
from engine.runtime.preemption import NON_FINITE_EXIT_CODE
from engine.runtime.validate import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/prior_train.yaml", help="YAML run config")
    add_override_option(parser, "train.steps=100 train.out_dir=runs/try")
    args = parser.parse_args(argv)
    return run_cli(lambda: _train(args.config, args.set))


def _train(config: str, overrides: list[str]) -> int:
    try:
        summary = train_prior(load_config(PriorTrainConfig, config, overrides))
    except NonFiniteTraining as stopped:
        print(f"error: {stopped}", file=sys.stderr)
        return NON_FINITE_EXIT_CODE
    if summary["rank"] == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
