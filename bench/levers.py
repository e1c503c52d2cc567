"""Each lever's worth on this machine: the best throughput under the SLO with and without it, in one run.

Records the lever grid of ``bench/levers.yaml`` (the quickstart workload and SLO; batch sizes x
quantization x streams x backend x pipeline depth, every runnable config measured once in its own trial process,
with ``autotune landscape record``), then reads off, for each lever, the best feasible tokens/s
of the configs that leave it at its "off" value against the best of all configs. Levers that do
not apply to the workload (length bucketing with one prompt length) are listed with the reason.

    python bench/levers.py [--spec bench/levers.yaml] [--landscape FILE]   # an existing FILE is resumed
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, header, machine, save

ROOT = Path(__file__).resolve().parents[1]
#: lever -> (knob, the value that means "lever off")
LEVERS: dict[str, tuple[str, Any]] = {
    "exported-graph backends": ("backend", "eager"),
    "quantization int8-dynamic": ("quantization", "none"),
    "2 streams": ("streams", 1),
    "length-bucketed batching": ("scheduler", "static"),
    "pipelined stream (depth 2)": ("pipeline_depth", 1),
}


def best(points: list[Any]) -> Any:
    feasible = [p for p in points if p.feasible]
    return max(feasible, key=lambda p: p.tokens_per_s) if feasible else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(Path(__file__).resolve().parent / "levers.yaml"))
    ap.add_argument("--landscape", default=None, help="landscape file to write (or resume)")
    args = ap.parse_args()
    info = machine()
    header("levers: best feasible tokens/s with and without each lever (quickstart workload)", info)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = Path(args.landscape or RESULTS / f"levers-{stamp}.landscape.json")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "autotune.cli", "landscape", "record", args.spec, "--output", str(path)]
    subprocess.run([*cmd, "--repeat-sample", "4", "--repeats", "1"], cwd=ROOT, check=True)
    wall = time.perf_counter() - t0

    from autotune.landscape import load_landscape

    land = load_landscape(path)
    points = list(land.points.values())
    top = best(points)
    if top is None:
        sys.exit("no config met the SLO: nothing to compare")
    rows = []
    print(f"\nbest of all {len(points)} configs: {top.config.label()} at {top.tokens_per_s:,.0f} tok/s")
    print(f"run-to-run spread of repeated configs: {land.spread():.1%}\n")
    print(f"{'lever':28} {'without':>12} {'with':>12} {'gain':>8}  best without it")
    for lever, (knob, off) in LEVERS.items():
        values = set(getattr(p.config, knob) for p in points)
        if values == {off}:
            why = "not in the grid"
            if knob == "scheduler" and land.spec.workload.prompt_tokens.distribution == "fixed":
                why = "not applicable: every prompt of this workload has one length"
            rows.append({"lever": lever, "applicable": False, "reason": why})
            print(f"{lever:28} {why}")
            continue
        without = best([p for p in points if getattr(p.config, knob) == off])
        w = without.tokens_per_s if without else 0.0
        gain = top.tokens_per_s / w if w else float("inf")
        used = getattr(top.config, knob) != off
        rows.append(
            {
                "lever": lever,
                "applicable": True,
                "without_tokens_per_s": w,
                "without_config": without.config.label() if without else None,
                "with_tokens_per_s": top.tokens_per_s,
                "best_uses_it": used,
                "gain": gain,
            }
        )
        label = without.config.label() if without else "none feasible"
        print(f"{lever:28} {w:>12,.0f} {top.tokens_per_s:>12,.0f} {gain:>7.2f}x  {label}")
    backends = sorted({p.config.backend for p in points} - {"eager"})
    for be in backends:  # each runtime on its own: eager or it, nothing else
        alone = best([p for p in points if p.config.backend in ("eager", be)])
        eager = best([p for p in points if p.config.backend == "eager"])
        if alone is not None and eager is not None:
            rows.append(
                {
                    "lever": f"backend {be}",
                    "applicable": True,
                    "without_tokens_per_s": eager.tokens_per_s,
                    "with_tokens_per_s": alone.tokens_per_s,
                    "with_config": alone.config.label(),
                    "gain": alone.tokens_per_s / eager.tokens_per_s,
                }
            )
            lever, gain = f"backend {be} alone", rows[-1]["gain"]
            figures = f"{eager.tokens_per_s:>12,.0f} {alone.tokens_per_s:>12,.0f} {gain:>7.2f}x"
            print(f"{lever:28} {figures}  best with it: {alone.config.label()}")
    doc = {
        "machine": info,
        "spec": str(Path(args.spec).resolve().relative_to(ROOT)),
        "landscape": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "wall_s": wall,
        "spread": land.spread(),
        "best": {"config": top.config.label(), "tokens_per_s": top.tokens_per_s},
        "configs": {p.config.label(): {"tokens_per_s": p.tokens_per_s, "feasible": p.feasible} for p in points},
        "levers": rows,
    }
    print(f"\nwritten to {save('levers', doc)} ({wall:,.0f} s)")


if __name__ == "__main__":
    main()
