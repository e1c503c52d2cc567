"""Print every recorded speedup run (bench/results/speedup-*.json) as a Markdown table.

python bench/summarize.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    print(
        "| run (UTC) | commit | machine | study wall | best config found | baseline tok/s | best tok/s "
        "| best p95 e2e | tuned/baseline (min-max) | SLO met in every re-measurement |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(RESULTS.glob("speedup-*.json")):
        d = json.loads(path.read_text())
        s, c, m = d["summary"], d["best_config"], d["machine"]
        lat = next(k for k in s if k.startswith("best_") and k != "best_tokens_per_s")
        label = (
            f"b{c['batch_size']} {c['precision']} {c['quantization']} x{c['streams']} {c['backend']} "
            f"{c['max_queue_delay_ms']:g}ms"
        )
        r = s["ratio"]
        commit = d.get("commit", "-")  # "~abc1234": the uncommitted work tree just before that commit
        if len(commit) >= 40:  # a full sha, maybe with +dirty: the work tree had uncommitted changes
            commit = commit[:7] + commit[40:]
        print(
            f"| {d['recorded_at']} | {commit} | "
            f"{m['cpu_model']}, {m['cpu_cores']} cores, torch {m['torch']} | "
            f"{s['study_wall_s']:.0f} s | {label} | {s['baseline_tokens_per_s']['median']:.1f} | "
            f"{s['best_tokens_per_s']['median']:.1f} | {s[lat]['median']:.0f} ms | "
            f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) | {'yes' if d['slo_met_every_pair'] else 'no'} |"
        )


if __name__ == "__main__":
    main()
