"""Server-side time and weight of every dashboard page and API call, for studies of 10,000 trials.

THE TRIAL DATA HERE IS SYNTHETIC: trials are written through Optuna's API and autotune's store with
the attributes the tuner writes (config, measurement, constraints, feasibility, failures), with made-up
but realistically shaped figures; beside it, a plain Optuna study (params and values only) of as many
trials. This measures the dashboard (queries + figures + template), not inference. Target (issue 25):
every page and API call under 300 ms (median of 5) at 10,000 trials, on the 2-core development
machine, with a page weight that does not grow with the study.

    python bench/dashboard_render.py [--trials 10000] [--runs 5] [--db PATH (fill once, reuse)]
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


def fill_optuna(url: str, name: str, trials: int, *, seed: int = 0) -> None:
    """A study made by plain Optuna (no autotune rows) with ``trials`` trials: params, values, states."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(seed)
    dists = {
        "lr": FloatDistribution(1e-5, 1e-1, log=True),
        "layers": IntDistribution(1, 8),
        "act": CategoricalDistribution(["relu", "gelu", "tanh"]),
    }
    study = optuna.create_study(study_name=name, storage=url, direction="minimize")
    frozen = []
    for _ in range(trials):
        lr, layers = 10 ** rng.uniform(-5, -1), rng.randint(1, 8)
        params: dict[str, Any] = {"lr": lr, "layers": layers, "act": rng.choice(["relu", "gelu", "tanh"])}
        if rng.random() < 0.05:
            frozen.append(create_trial(state=TrialState.FAIL, params=params, distributions=dists))
        else:
            value = abs(math.log10(lr) + 3) + 0.1 * layers + rng.random()
            frozen.append(create_trial(value=value, params=params, distributions=dists))
    study.add_trials(frozen)


#: Every page and API call of the dashboard, on the autotune study (A) and the plain Optuna study (O).
def _paths(n: int) -> list[str]:
    a, o, mid = "/studies/render-bench", "/studies/optuna-bench", n // 2
    api = "/api" + a
    return [
        "/",
        a,
        f"{a}?part=table&sort=output_tokens_per_s&order=desc&offset={mid}",
        f"{a}?q=int8&state=measured",
        f"{a}/trials/{mid}",
        "/compare?study=render-bench",
        "/docs",
        "/api/studies",
        api,
        f"{api}/status",
        f"{api}/trials?limit=500",
        f"{api}/trials?sort=output_tokens_per_s&order=desc&offset={mid}&limit=100",
        f"{api}/trials/{mid}",
        f"{api}/pareto",
        f"{api}/best",
        f"{api}/best?format=vllm",
        o,
        f"{o}?part=table&sort=value&offset={mid}",
        f"{o}/trials/{mid}",
        f"/api{o}/trials?sort=value&limit=100",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--db", type=Path, help="a database file to fill once and reuse (default: a temporary one)")
    ap.add_argument("--target-ms", type=float, default=300.0)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import header, machine, save, spread

    info = machine()
    header("dashboard pages and API calls (SYNTHETIC trial data, not an inference measurement)", info)
    from fastapi.testclient import TestClient

    from autotune.dashboard import create_app

    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "bench.db"
        url = f"sqlite:///{db}"
        if not db.exists():
            t0 = time.perf_counter()
            fill(url, "render-bench", args.trials)
            fill_optuna(url, "optuna-bench", args.trials)
            print(f"filled {args.trials} synthetic trials per study in {time.perf_counter() - t0:.1f} s")
        client = TestClient(create_app(url))
        results: dict[str, Any] = {}
        print(f"{'median ms':>10} {'min':>8} {'max':>8} {'bytes':>11}  path  ({args.runs} runs after one warm-up)")
        for page_url in _paths(args.trials):
            r = client.get(page_url)  # first request: template compile, connection pool
            assert r.status_code == 200, (page_url, r.text[:200])
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                r = client.get(page_url)
                times.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text[:200]
            results[page_url] = {**spread(times), "bytes": len(r.content)}
            s = results[page_url]
            print(f"{s['median']:10.1f} {s['min']:8.1f} {s['max']:8.1f} {s['bytes']:11,}  {page_url}")
    slowest = max(results, key=lambda k: results[k]["median"])
    heaviest = max(results, key=lambda k: results[k]["bytes"])
    worst = results[slowest]["median"]
    print(f"slowest: {slowest} {worst:.1f} ms median of {args.runs} (target < {args.target_ms:g} ms)")
    print(f"heaviest: {heaviest} {results[heaviest]['bytes']:,} bytes")
    print(
        f"{args.trials} trials: every page and API call under {args.target_ms:g} ms: "
        + ("yes" if worst < args.target_ms else "NO")
    )
    path = save(
        "dashboard_render",
        {"machine": info, "trials": args.trials, "runs": args.runs, "synthetic_data": True, "results_ms": results},
    )
    print(f"saved {path}")
    return 0 if not math.isnan(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
