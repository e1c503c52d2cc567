"""Tuned vs naive: does the search find a config much faster than the baseline, within the SLO?

1. Runs the quickstart study (``studies/quickstart.yaml``: ~58M-parameter Llama preset, prompts
   of 64 tokens, 32 new tokens, SLO p95 e2e <= 2 s) with ``autotune tune`` into a fresh database,
   timing the whole study.
2. Measures, with the same workload and interleaved (baseline, best, baseline, best, ...), the
   naive baseline (batch 1, fp32, no quantization, eager, one stream) and the tuned best, each
   in its own trial process.
3. Prints the ratio of output tokens/s and both configs' SLO latencies, and writes
   ``bench/results/speedup.json``.

    python bench/speedup.py [--spec studies/quickstart.yaml] [--pairs 3] [--trials N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, machine, save, spread

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(ROOT / "studies" / "quickstart.yaml"))
    ap.add_argument("--pairs", type=int, default=3, help="interleaved baseline/best measurement pairs")
    ap.add_argument("--trials", type=int, default=None, help="override the spec's trial budget")
    args = ap.parse_args()

    from autotune.config import BASELINE, TrialConfig
    from autotune.runner import preflight, run_trial
    from autotune.spec import load_spec

    info = machine()
    header("speedup: quickstart study, then baseline vs tuned best (interleaved)", info)
    spec = load_spec(args.spec)
    tmp = Path(tempfile.mkdtemp(prefix="autotune-bench-"))
    export = tmp / "best.json"
    cmd = [
        sys.executable,
        "-m",
        "autotune.cli",
        "tune",
        args.spec,
        "--storage",
        f"sqlite:///{tmp}/bench.db",
        "--export",
        str(export),
    ] + (["--trials", str(args.trials)] if args.trials else [])
    print("study:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "COLUMNS": "120"})
    study_s = time.perf_counter() - t0
    if res.returncode != 0 or not export.exists():
        sys.exit(f"the study found no feasible config (exit {res.returncode}); nothing to compare")
    doc = json.loads(export.read_text())
    best = TrialConfig.model_validate(doc["config"])
    print(f"study took {study_s:.0f} s; best: {best.label()}", flush=True)

    hw, _ = preflight(spec)
    slo = spec.second_objective
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "best": []}
    for i in range(args.pairs):
        for name, cfg in (("baseline", BASELINE), ("best", best)):
            m = run_trial(spec.in_fresh_processes(), cfg, hw)  # each run in its own process
            runs[name].append({"tokens_per_s": m.output_tokens_per_s, slo: m.value(slo), "requests": m.requests})
            print(
                f"pair {i} {name:8s} {cfg.label():38s} {m.output_tokens_per_s:8.1f} tok/s  {slo} "
                f"{m.value(slo):8.1f} ms  ({m.requests} requests)",
                flush=True,
            )
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs["baseline"], runs["best"], strict=True)]
    limit = next(c.max for c in spec.slo if c.name == slo)
    assert limit is not None  # the SLO latency clause is an upper bound
    summary: dict[str, Any] = {
        "ratio": spread(ratios),
        "baseline_tokens_per_s": spread([r["tokens_per_s"] for r in runs["baseline"]]),
        "best_tokens_per_s": spread([r["tokens_per_s"] for r in runs["best"]]),
        f"baseline_{slo}": spread([r[slo] for r in runs["baseline"]]),
        f"best_{slo}": spread([r[slo] for r in runs["best"]]),
        "slo_limit_ms": limit,
        "study_wall_s": study_s,
    }
    slo_met = all(r[slo] <= limit for r in runs["best"])
    path = save(
        "speedup",
        {
            "machine": info,
            "spec": args.spec,
            "best_config": best.model_dump(),
            "runs": runs,
            "summary": summary,
            "slo_met_every_pair": slo_met,
        },
    )
    r = summary["ratio"]
    print(
        f"\nbaseline {summary['baseline_tokens_per_s']['median']:.1f} tok/s ({slo} "
        f"{summary[f'baseline_{slo}']['median']:.0f} ms) -> best {summary['best_tokens_per_s']['median']:.1f} tok/s "
        f"({slo} {summary[f'best_{slo}']['median']:.0f} ms, limit {limit:g})"
    )
    print(
        f"tuned/baseline output tokens/s: {r['median']:.2f}x (min {r['min']:.2f}x, max {r['max']:.2f}x over "
        f"{args.pairs} interleaved pairs); SLO met in every pair: {slo_met}; study wall time {study_s:.0f} s; "
        f"written to {path}"
    )


if __name__ == "__main__":
    main()
