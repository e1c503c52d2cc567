"""What measuring a landscape's configs build by build saves: `autotune landscape record` of one
grid in grid order (model knobs innermost, so nearly every config rebuilds) against build order
(``autotune.landscape.build_order``: the configs of one build together), interleaved.

    python bench/record_order.py [--spec bench/record_order.yaml] [--rounds 2]

Each arm is a fresh `autotune landscape record` process writing a new file (no spread repeats);
the grid-order arm is the same command with ``build_order`` replaced by the identity.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, machine, save, spread

ROOT = Path(__file__).resolve().parents[1]
GRID_ORDER = (
    "import sys, autotune.landscape as L; L.build_order = lambda space, configs: configs; "
    "from autotune.cli import main; sys.argv[0] = 'autotune'; main()"
)


def run(arm: str, spec: Path, out: Path) -> dict[str, float]:
    args = ["landscape", "record", str(spec), "--output", str(out), "--repeat-sample", "0"]
    cmd = [sys.executable, "-c", GRID_ORDER, *args] if arm == "grid" else [sys.executable, "-m", "autotune", *args]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    land = json.loads(out.read_text())
    best = max((p["tokens_per_s"] for p in land["points"]), default=0.0)
    return {"wall_s": wall, "recorded_s": land["recorded_s"], "configs": len(land["points"]), "best_tokens_per_s": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=ROOT / "bench" / "record_order.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    info = machine()
    header("landscape recording: grid order vs build order", info)
    runs: dict[str, list[dict[str, float]]] = {"grid": [], "build": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in ("grid", "build") if r % 2 == 0 else ("build", "grid"):
                res = run(arm, args.spec, Path(tmp) / f"{arm}-{r}.json")
                runs[arm].append(res)
                took = f"{res['recorded_s']:.1f} s recording, {res['wall_s']:.1f} s in all"
                print(f"round {r} {arm:>5} order: {took}", flush=True)
    summary = {arm: spread([r["recorded_s"] for r in rs]) for arm, rs in runs.items()}
    ratio = summary["grid"]["median"] / summary["build"]["median"]
    grid, build = summary["grid"]["median"], summary["build"]["median"]
    print(f"median recording: grid order {grid:.1f} s, build order {build:.1f} s ({ratio:.2f}x)")
    doc = {"machine": info, "spec": str(args.spec), "runs": runs, "summary": summary, "ratio": ratio}
    path = save("record-order", doc)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
