"""Server-side render time of the dashboard's study page for a study of 1,000 trials.

THE TRIAL DATA HERE IS SYNTHETIC: trials are written through Optuna's API and autotune's store with
the attributes the tuner writes (config, measurement, constraints, feasibility, failures), with made-up
but realistically shaped figures. This measures the dashboard (queries + figures + template), not
inference. Target (issue 5): under 300 ms on the 2-core development machine.

    python bench/dashboard_render.py [--trials 1000] [--runs 15]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TINY_SPEC = Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny.yaml"
SPACE: dict[str, list[Any]] = {
    "batch_size": [1, 2, 4, 8, 12, 16, 24, 32],
    "precision": ["fp32", "bf16"],
    "quantization": ["none", "int8-dynamic"],
    "streams": [1, 2],
    "backend": ["eager"],
    "max_queue_delay_ms": [0.0, 20.0, 50.0],
    "scheduler": ["static"],
}
HARDWARE = {
    "device": "cpu",
    "device_type": "cpu",
    "device_name": "Synthetic CPU",
    "device_memory_mb": 24000,
    "compute_capability": None,
    "cpu_model": "Synthetic CPU",
    "cpu_cores": 2,
    "host_memory_mb": 24000,
    "python_version": "3.11",
    "torch_version": "2.13.0+cpu",
    "transformers_version": "5.0",
}


def _dist(median: float, rng: random.Random) -> dict[str, float]:
    tail = 1.0 + rng.random()
    return {
        "p50": median,
        "p90": median * (1 + 0.4 * tail),
        "p95": median * (1 + 0.6 * tail),
        "p99": median * (1 + 0.9 * tail),
        "mean": median * 1.1,
        "max": median * (1 + 1.2 * tail),
    }


def synthetic_measurement(cfg: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A ``Measurement.to_dict()``-shaped dict whose figures follow the knobs roughly like the real ones."""
    b = cfg["batch_size"]
    speed = (2.5 if cfg["quantization"] != "none" else 1.0) * (1.2 if cfg["streams"] == 2 else 1.0)
    tokens_s = 40 * b**0.8 * speed * rng.uniform(0.7, 1.3)
    e2e = (120 + 35 * b + cfg["max_queue_delay_ms"]) / speed * rng.uniform(0.8, 1.4)
    samples = [max(1.0, rng.gauss(e2e, e2e * 0.25)) for _ in range(200)]
    return {
        "output_tokens_per_s": tokens_s,
        "requests_per_s": tokens_s / 32,
        "requests": 256,
        "output_tokens": 256 * 32,
        "duration_s": 6.0,
        "e2e_ms": _dist(e2e, rng),
        "ttft_ms": _dist(e2e * 0.2, rng),
        "tpot_ms": _dist(e2e / 40, rng),
        "queue_ms": _dist(cfg["max_queue_delay_ms"] * 0.5 + 1, rng),
        "mean_batch_rows": b * 0.9,
        "peak_memory_mb": 300 + 12 * b,
        "memory_kind": "process_peak_rss",
        "timings": {"load_s": rng.uniform(0.5, 2), "quantize_s": 0.1, "warmup_s": rng.uniform(0.2, 1)},
        "e2e_samples_ms": samples,
        "stopped_by": "requests",
        "prefill_ms": _dist(e2e * 0.15, rng),
        "mean_prompt_tokens": 64.0,
        "memory": {"rss_mb": 300 + 12 * b},
        "roofline": {"decode_bw_frac": rng.uniform(0.1, 0.6)},
    }


def fill(url: str, name: str, trials: int, *, seed: int = 0, slo_ms: float = 1500.0, status: str = "finished") -> None:
    """Create study ``name`` in ``url`` (autotune's tables and Optuna's) with ``trials`` synthetic trials.

    About 5% fail (with a reason and a log), 5% are rejected; the rest are measured against the SLO.
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    from autotune.store import Repository, upgrade

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    upgrade(url)
    rng = random.Random(seed)
    slo = [{"metric": "e2e_ms", "percentile": "p95", "max": slo_ms}]
    spec: dict[str, Any] = {
        "name": name,
        "model": "preset:llama-small",
        "device": "cpu",
        "workload": {"requests": 256, "prompt_tokens": 64, "output_tokens": 32},
        "slo": slo,
        "space": SPACE,
        "budget": {"trials": trials, "timeout_s": None, "trial_timeout_s": 180, "confirm_runs": 1},
        "objective": "throughput",
        "sampler": "tpe",
    }
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    for key, value in {
        "spec": spec,
        "hardware": HARDWARE,
        "fingerprint": "synthetic000000",
        "slo": slo,
        "objectives": ["output_tokens_per_s", "e2e_ms.p95"],
        "confirmations": {},
    }.items():
        study.set_user_attr(key, value)
    with Repository.open(url) as repo:
        repo.upsert_study(
            name, spec=spec, hardware=HARDWARE, fingerprint="synthetic000000", model_ref=spec["model"], status=status
        )
        frozen = []
        for n in range(trials):
            cfg = {k: rng.choice(v) for k, v in SPACE.items()}
            key = "k" + "".join(str(SPACE[k].index(cfg[k])) for k in SPACE)
            roll = rng.random()
            attrs: dict[str, Any] = {"config": cfg, "config_key": key}
            m = None
            if roll < 0.05:
                failure = {"kind": "crash", "reason": "worker exited with signal 11", "log": "Traceback ...\nSIGSEGV"}
                attrs["failure"] = failure
                frozen.append(create_trial(state=TrialState.FAIL, user_attrs=attrs))
                repo.record_trial(name, n, config=cfg, config_key=key, state="failed", failure=failure)
                continue
            if roll < 0.10:
                attrs["rejected"] = "estimated memory exceeds the device"
                frozen.append(create_trial(state=TrialState.PRUNED, user_attrs=attrs))
                repo.record_trial(name, n, config=cfg, config_key=key, state="rejected")
                continue
            m = synthetic_measurement(cfg, rng)
            cons = [(m["e2e_ms"]["p95"] - slo_ms) / slo_ms]
            feasible = cons[0] <= 0
            stored = {k: v for k, v in m.items() if k != "e2e_samples_ms"}
            attrs.update(measurement=stored, constraints=cons, feasible=feasible)
            frozen.append(
                create_trial(
                    state=TrialState.COMPLETE,
                    value=m["output_tokens_per_s"],
                    user_attrs=attrs,
                    system_attrs={"constraints": cons},
                )
            )
            repo.record_trial(
                name, n, config=cfg, config_key=key, state="measured", feasible=feasible, measurement=m,
                constraints=cons,
            )  # fmt: skip
        study.add_trials(frozen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import header, machine, save, spread

    info = machine()
    header("dashboard study-page render (SYNTHETIC trial data, not an inference measurement)", info)
    from fastapi.testclient import TestClient

    from autotune.dashboard import create_app

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        t0 = time.perf_counter()
        fill(url, "render-bench", args.trials)
        print(f"filled {args.trials} synthetic trials in {time.perf_counter() - t0:.1f} s")
        client = TestClient(create_app(url))
        results: dict[str, Any] = {}
        for page_url in ("/studies/render-bench", "/", "/api/studies/render-bench/trials?limit=500"):
            client.get(page_url)  # first request: template compile, connection pool
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                r = client.get(page_url)
                times.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text[:200]
            results[page_url] = {**spread(times), "bytes": len(r.content)}
            s = results[page_url]
            took = f"median {s['median']:.1f} ms (min {s['min']:.1f}, max {s['max']:.1f})"
            print(f"{page_url}: {took}, {s['bytes']:,} bytes")
    page = results["/studies/render-bench"]["median"]
    print(f"study page, {args.trials} trials: {page:.1f} ms median of {args.runs} (target < 300 ms)")
    path = save(
        "dashboard_render",
        {"machine": info, "trials": args.trials, "runs": args.runs, "synthetic_data": True, "results_ms": results},
    )
    print(f"saved {path}")
    return 0 if not math.isnan(page) else 1


if __name__ == "__main__":
    sys.exit(main())
