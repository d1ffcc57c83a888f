#!/usr/bin/env bash
# Command two of the README: set up whatever is missing (idempotent), then run the test suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k physics`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh dev
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
if [ "$#" -eq 0 ]; then ruff check --quiet . ; fi  # lint the whole tree on a full run (pyproject.toml [tool.ruff])
exec python -m pytest -q --timeout=900 --durations=15 "$@"  # the slowest tests listed: the suite aims at ~15 min on 2 cores
