#!/usr/bin/env bash
# Three `autotune worker` processes with `sampler: gp` on one PostgreSQL study (tests/data/workers.yaml,
# 24 trials of about 0.3 s, so the workers' GP fits overlap): how many configs were measured twice.
#
#   bash bench/gp_workers.sh [DBNAME]        # drops and creates DBNAME (default autotune_gp_workers)
set -euo pipefail
cd "$(dirname "$0")/.."
db=${1:-autotune_gp_workers}
psql -q -h 127.0.0.1 -U postgres -c "drop database if exists $db" -c "create database $db" postgres 2>/dev/null
url="postgresql+psycopg://postgres@127.0.0.1:5432/$db"
spec=$(mktemp --suffix=.yaml)
trap 'rm -f "$spec"' EXIT
sed 's/^sampler: random/sampler: gp/' tests/data/workers.yaml > "$spec"
export AUTOTUNE_HEARTBEAT_S=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m autotune.cli tune "$spec" --storage "$url" --study w --trials 1 > /dev/null
for _ in 1 2 3; do python -m autotune.cli worker w --storage "$url" --trials 24 > /dev/null & done
wait
python - "$url" <<'PY'
import collections, sys

import optuna

optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="w", storage=sys.argv[1])
measured = [t for t in study.trials if t.user_attrs.get("measurement") and "duplicate_of" not in t.user_attrs]
keys = collections.Counter(t.user_attrs["config_key"] for t in measured)
print(f"{len(study.trials)} Optuna trials, {len(measured)} measured, {len(keys)} distinct configs, "
      f"{sum(n - 1 for n in keys.values() if n > 1)} measured twice or more")
PY
