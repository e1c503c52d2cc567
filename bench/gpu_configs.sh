#!/usr/bin/env bash
# Measure chosen configs under the GPU check's workload (studies/gpu-llama-1b.yaml), each with
# `autotune measure` in its own trial process; for follow-ups to bench/gpu_check.sh when device
# time is short. Installs missing packages from .whl/ like gpu_check.sh.
#
#   [SPEC=file.yaml] bash bench/gpu_configs.sh NAME:TIMEOUT_S:CONFIG_JSON ...   # 'baseline' as CONFIG_JSON: the naive baseline
#
# Writes NAME.json (config + measurement) per config into $OUT (if set) or bench/results/gpu_configs-STAMP/,
# and prints one line per config: tokens/s, p95 e2e, decode ms/step and fraction of the bandwidth bound.
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
out="${OUT:-bench/results/gpu_configs-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
for item in "$@"; do
  name="${item%%:*}"; rest="${item#*:}"; limit="${rest%%:*}"; cfg="${rest#*:}"
  # The trial's own timeout must cover a compile: raise it to this item's limit.
  sed "s/trial_timeout_s: .*/trial_timeout_s: $limit/" "${SPEC:-studies/gpu-llama-1b.yaml}" >"/tmp/gpu-configs-spec.yaml"
  if [ "$cfg" = baseline ]; then args=(--baseline); else echo "$cfg" >"/tmp/gpu-configs-$name.json"; args=(--config "/tmp/gpu-configs-$name.json"); fi
  timeout $((limit + 60)) python3 -m autotune measure /tmp/gpu-configs-spec.yaml "${args[@]}" --json \
    >"$out/$name.json" 2>"$out/$name.log" || { echo "$name: failed (rc $?)"; tail -c 1500 "$out/$name.log"; continue; }
  python3 - "$out/$name.json" "$name" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
m, r = d["measurement"], d["measurement"].get("roofline") or {}
print(f"{sys.argv[2]}: {m['output_tokens_per_s']:,.0f} tok/s, p95 e2e {m['e2e_ms']['p95']:,.0f} ms, "
      f"decode {r.get('decode_step_ms')} ms/step = {r.get('decode_fraction')} of the bandwidth bound, "
      f"timings {({k: round(v, 1) for k, v in m['timings'].items()})}")
EOF
done
