#!/usr/bin/env bash
# Issue 8's GPU landscape: every config of studies/landscape-gpu.yaml measured once on this GPU
# (`autotune landscape record`, build by build), plus 4 configs measured again in fresh processes
# for the run-to-run spread. For a machine with a GPU and no network, after bench/gpu_check.sh.
#
#   bash bench/gpu_landscape.sh [SECONDS]     # default 240; stops after SECONDS (Ctrl-C), resumable
#
# Writes $OUT (if set, else bench/landscapes/) landscape-gpu-<device>.json and its .log. A partial
# recording committed in bench/landscapes/ is resumed (same spec, same hardware fingerprint), so
# sessions with a few minutes of GPU time each complete it together. The replays need no GPU:
# `autotune landscape replay bench/landscapes/landscape-gpu-<device>.json` on any machine.
# LANDSCAPE_SPEC=... records another spec the same way (the CPU test of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/gpu_env.sh
limit=${1:-240}
spec=${LANDSCAPE_SPEC:-studies/landscape-gpu.yaml}
device=$(python3 -c '
import re, torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))')
stem=$(basename "$spec" .yaml)-$device
out=${OUT:-bench/landscapes}
mkdir -p "$out"
if [ -f "bench/landscapes/$stem.json" ] && [ ! -f "$out/$stem.json" ]; then
  cp "bench/landscapes/$stem.json" "$out/$stem.json"
  echo "resuming the committed partial recording bench/landscapes/$stem.json"
fi
timeout --signal=INT --kill-after=30 "$limit" \
  python3 -m autotune landscape record "$spec" --output "$out/$stem.json" --repeat-sample 4 --repeats 1 \
  2>&1 | tee -a "$out/$stem.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] || [ "$rc" = 130 ] && echo "stopped after $limit s: run again to resume ($out/$stem.json)"
exit "$rc"
