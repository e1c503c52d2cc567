#!/usr/bin/env bash
# The GPU check of issue 3 as one command, for a machine with a GPU and no network.
#
#   bash bench/gpu_check.sh [--budget-s 450]      # result JSON in $OUT (if set) or bench/results/
#   GPU_DIAG=1 bash bench/gpu_check.sh             # first bench/gpu_diag.py (at most 75 s more):
#                                                  # time per new token by precision, batch and attention kernel
#
# The check itself (bench/gpu_check.py) fits in 8 minutes with the install. With device time left
# after it, `bash bench/gpu_landscape.sh SECONDS` records (or resumes) issue 8's GPU landscape.
#
# Packages the machine lacks (optuna, SQLAlchemy, Alembic, pydantic, torchao, ...) are installed
# from wheel files in .whl/ (see bench/README.md for the download command), never from a network.
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
if [ "${GPU_DIAG:-0}" = 1 ]; then
  timeout 75 python3 bench/gpu_diag.py --out "${OUT:-bench/results}" || echo "gpu_diag: failed or timed out (rc $?)"
fi
exec python3 bench/gpu_check.py --out "${OUT:-bench/results}" --budget-s 450 "$@"
