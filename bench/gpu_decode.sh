#!/usr/bin/env bash
# bench/gpu_decode.py on the GPU machine (no network: packages from .whl/, like gpu_check.sh).
#
#   bash bench/gpu_decode.sh [--budget-s 150] [--batches 32,256]     # result JSON in $OUT or bench/results/
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
exec python3 bench/gpu_decode.py --out "${OUT:-bench/results}" "$@"
