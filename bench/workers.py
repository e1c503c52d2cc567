"""Distributed tuning on one machine: trials/hour for 1, 2 and 4 workers sharing a PostgreSQL study,
and the storage overhead: time each worker spent inside storage calls (Optuna's RDB storage and
autotune's tables, timed by ``autotune.tuner.StorageClock``) against time spent measuring (inside
trial processes), in all and without the heartbeat thread's calls (those overlap measuring). Also
the whole parent-side share of each trial's wall time (storage + sampling + bookkeeping).

Each configuration gets a fresh PostgreSQL database and the same tiny-preset study
(``bench/workers.yaml``: 24 trials of 3-second windows; ``--spec tests/data/workers.yaml`` for the
tests' 0.3-s trials). Target: storage overhead under 2% of trial time.

    python bench/workers.py [--pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres] [--workers 1 2 4]
                            [--niceness N]   # override budget.trial_niceness (0: the A/B's "before")
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, machine, save

ROOT = Path(__file__).resolve().parents[1]
SPEC = Path(__file__).resolve().parent / "workers.yaml"


def run(admin_url: str, n: int, spec: Path) -> dict[str, Any]:
    import optuna
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    name = f"autotune_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    env = {**os.environ, "COLUMNS": "200"}
    try:
        t0 = time.perf_counter()
        first = subprocess.Popen(
            [sys.executable, "-m", "autotune.cli", "tune", str(spec), "--storage", url],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while True:  # the others join once the study exists
            try:
                optuna.load_study(study_name="workers", storage=url)
                break
            except KeyError:
                time.sleep(0.2)
        others = [
            subprocess.Popen(
                [sys.executable, "-m", "autotune.cli", "worker", "workers", "--storage", url],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(n - 1)
        ]
        for p in [first, *others]:
            p.wait()
        wall = time.perf_counter() - t0
        study = optuna.load_study(study_name="workers", storage=url)
        spans = [
            (t.user_attrs["trial_process_s"], (t.datetime_complete - t.datetime_start).total_seconds())
            for t in study.trials
            if "trial_process_s" in t.user_attrs and t.datetime_complete and t.datetime_start
        ]
        overhead = [1 - inside / wall_s for inside, wall_s in spans]
        stats = [v for k, v in study.user_attrs.items() if k.startswith("worker_stats.")]
        storage_s = sum(v["storage_s"] for v in stats)
        background_s = sum(v.get("storage_background_s", 0.0) for v in stats)
        by_method: dict[str, list[float]] = {}
        for v in stats:
            for name, (calls, secs) in v.get("by_method", {}).items():
                entry = by_method.setdefault(name, [0, 0.0])
                entry[0] += calls
                entry[1] += secs
        measuring_s = sum(v["trial_process_s"] for v in stats)
        return {
            "storage_s": storage_s,
            "storage_calls": sum(v["storage_calls"] for v in stats),
            "measuring_s": measuring_s,
            "storage_overhead_pct": 100 * storage_s / measuring_s if measuring_s else float("nan"),
            # Heartbeats run on Optuna's thread while the trial measures: DB time, but not trial time.
            "storage_background_s": background_s,
            "blocking_storage_overhead_pct": 100 * (storage_s - background_s) / measuring_s
            if measuring_s
            else float("nan"),
            "storage_ms_per_trial": 1000 * storage_s / max(len(spans), 1),
            "workers": n,
            "wall_s": wall,
            "trials": len(spans),
            "trials_per_hour": len(spans) / wall * 3600,
            "overhead_median_pct": 100 * statistics.median(overhead),
            "overhead_max_pct": 100 * max(overhead),
            "storage_by_method": dict(sorted(by_method.items(), key=lambda kv: -kv[1][1])),
            # Per worker: [seconds, method, seconds after that worker's clock started].
            "slowest_calls": [v["slowest_call"] for v in stats if "slowest_call" in v],
        }
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--spec", type=Path, default=SPEC, help="study spec [default: bench/workers.yaml, 3-s trials]")
    ap.add_argument(
        "--niceness", type=int, default=None, help="override budget.trial_niceness (0: trials at the tuner's priority)"
    )
    args = ap.parse_args()
    if args.niceness is not None:
        import tempfile

        import yaml

        doc = yaml.safe_load(args.spec.read_text())
        doc.setdefault("budget", {})["trial_niceness"] = args.niceness
        args.spec = Path(tempfile.mkdtemp(prefix="workers-spec-")) / args.spec.name
        args.spec.write_text(yaml.safe_dump(doc))
    info = machine()
    header("workers: trials/hour and parent-side overhead, tiny preset, one PostgreSQL study", info)
    rows = []
    for n in args.workers:
        r = run(args.pg, n, args.spec)
        rows.append(r)
        print(
            f"{n} worker(s): {r['trials']} trials in {r['wall_s']:.0f} s = {r['trials_per_hour']:.0f} trials/hour; "
            f"storage {r['storage_s']:.2f} s in {r['storage_calls']} calls vs measuring {r['measuring_s']:.1f} s "
            f"= {r['storage_overhead_pct']:.2f}% ({r['storage_ms_per_trial']:.0f} ms/trial), "
            f"{r['blocking_storage_overhead_pct']:.2f}% outside the heartbeat thread; "
            f"whole parent side per trial median {r['overhead_median_pct']:.2f}% (max {r['overhead_max_pct']:.2f}%)",
            flush=True,
        )
        top = list(r["storage_by_method"].items())[:8]
        print("  largest storage shares: " + ", ".join(f"{k} {c:.0f}x {s * 1000:.0f} ms" for k, (c, s) in top))
        slow = ", ".join(f"{name} {s * 1000:.0f} ms at {at:.0f} s" for s, name, at in r["slowest_calls"])
        print(f"  slowest call per worker: {slow}")
    spec = str(args.spec.resolve().relative_to(ROOT)) if args.spec.resolve().is_relative_to(ROOT) else str(args.spec)
    doc = {"machine": info, "spec": spec, "trial_niceness": args.niceness, "rows": rows}
    path = save("workers", doc)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
