"""The prepared GPU check keeps working between the rare sessions that have a GPU: its whole flow
(ceilings, baseline, a real study, repeats of the winner, the verdict) on a CPU, shrunk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT


def test_the_gpu_check_runs_its_whole_flow_on_a_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_check-smoke-*.json")
    doc = json.loads(path.read_text())
    assert doc["errors"] == {}
    assert set(doc["phase_s"]) == {"env", "hardware", "baseline", "study", "repeats"}
    assert doc["study"]["exit_code"] == 0 and doc["study"]["best_config"] is not None
    assert len(doc["repeats"]["runs"]) >= 2 and doc["verdict"]["speedup"] > 0


def test_the_gpu_landscape_script_records_and_resumes(tmp_path: Path) -> None:
    """bench/gpu_landscape.sh, on the tests' tiny spec shrunk to 4 configs (LANDSCAPE_SPEC)."""
    from .conftest import four_config_grid

    spec = four_config_grid(tmp_path)
    out = tmp_path / "out"
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    env = {**os.environ, "PATH": path, "LANDSCAPE_SPEC": str(spec), "OUT": str(out)}

    def script() -> subprocess.CompletedProcess[str]:
        cmd = ["bash", "bench/gpu_landscape.sh", "200"]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=260)

    first = script()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    land = json.loads((out / "grid-cpu.json").read_text())
    assert len(land["points"]) == 4 and (out / "grid-cpu.log").exists()
    again = script()  # everything recorded: nothing measured again
    assert again.returncode == 0 and "4 configs of 4 recorded" in again.stdout
    assert "[1/4]" not in again.stdout + again.stderr


def _engines_bench() -> Any:
    """bench/engines.py (not a package), imported from its path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_engines", ROOT / "bench" / "engines.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_engines_bench_parses_its_arguments() -> None:
    eng = _engines_bench()
    args = eng.parse_args([])
    assert args.rounds == 3 and args.batch_sizes == [1, 8, 16, 32, 64] and args.background_load == 0
    assert ("transformers", "bf16") in args.peer_groups and ("vllm", "bf16") in args.peer_groups
    assert {p for e, p in args.peer_groups if e == "ctranslate2"} == {"float32", "int8", "int8_float32"}
    quick = eng.parse_args(["--quick"])
    assert quick.rounds == 1 and quick.batch_sizes == [1, 8] and quick.trials == 2
    some = eng.parse_args(["--peers", "ctranslate2:int8,transformers:fp32", "--batches", "4,64", "--rounds", "2"])
    assert some.peer_groups == [("ctranslate2", "int8"), ("transformers", "fp32")] and some.batch_sizes == [4, 64]
    assert eng.parse_args(["--peers", ""]).peer_groups == []
    both = eng.parse_args(["--winner", "q.json", "--loaded-winner", "l.json", "--loaded-load", "2"])
    assert (both.winner, both.loaded_winner, both.loaded_load) == ("q.json", "l.json", 2)
    only_loaded = eng.parse_args(["--winner", "q.json", "--storage", "sqlite:///q.db", "--background-load", "2"])
    assert (only_loaded.winner, only_loaded.background_load) == ("q.json", 2)  # runs only the loaded study
    bad_args = (
        ["--peers", "vllm:int4"],
        ["--rounds", "0"],
        ["--background-load", "2", "--winner", "x.json", "--loaded-winner", "l.json"],
        ["--loaded-winner", "l.json"],
    )
    for bad in (*bad_args, ["--storage", "sqlite:///x.db"]):
        with pytest.raises(SystemExit):
            eng.parse_args(bad)


def test_the_engines_bench_summary_ratios_and_last_line() -> None:
    eng = _engines_bench()

    def row(kind: str, engine: str, tps: list[float], p95: list[float]) -> dict[str, Any]:
        runs = [{"tokens_per_s": t, "p95_ms": p} for t, p in zip(tps, p95, strict=True)]
        return {"engine": engine, "config": "c", "kind": kind, "runs": runs}

    runs = {
        "naive": row("naive", "builtin", [50, 60, 55], [600, 560, 580]),
        "autotune": row("autotune", "vllm", [1500, 1700, 1650], [1300, 1200, 1250]),
        "transformers:bf16:b64": row("peer", "transformers", [1400, 1450, 1500], [1500, 1450, 1400]),
        "ctranslate2:int8:b64": row("peer", "ctranslate2", [3000, 3100, 2900], [2500, 2600, 2400]),  # misses
        "vllm:bf16:b8": {
            **row("peer", "vllm", [400], [300]),
            "runs": [{"error": "exit 1"}, {"tokens_per_s": 400, "p95_ms": 300}],
        },
    }
    rows = eng.summarize(runs, 2000.0)
    assert eng.best_peer(rows) == "transformers:bf16:b64"  # the fastest peer that meets the SLO
    auto = rows["autotune"]
    assert auto["tokens_per_s"] == 1650 and (auto["tokens_per_s_min"], auto["tokens_per_s_max"]) == (1500, 1700)
    assert auto["meets_slo"] and auto["ratio_to_naive"] == pytest.approx(30.0)
    assert auto["ratio_to_best_peer"] == pytest.approx(1650 / 1450)
    assert not rows["ctranslate2:int8:b64"]["meets_slo"]
    assert rows["vllm:bf16:b8"]["rounds"] == 1 and rows["vllm:bf16:b8"]["errors"] == ["exit 1"]
    json.dumps(rows)  # the result file's rows
    lines = eng.table(rows)
    assert lines[2].startswith("| builtin |") and len(lines) == 2 + len(rows)
    assert eng.headline(rows) == "autotune/best-peer: 1.14x"
    assert eng.load_check(rows) is None
    rows["autotune-loaded"] = {**auto, "tokens_per_s": 1600}
    assert eng.load_check(rows)["within_10pct"]


def test_the_engines_bench_counts_trials_that_reused_an_engine() -> None:
    eng = _engines_bench()
    trials = [
        {"engine": "vllm", "startup_s": 70.0, "engine_reused": False},
        {"engine": "vllm", "startup_s": None, "engine_reused": True},
        {"engine": "ctranslate2", "startup_s": 2.0, "engine_reused": False},
        {"engine": "builtin", "startup_s": 0.0, "engine_reused": True},
    ]
    s = eng.trial_summary(trials)
    assert s["n_trials"] == 4 and s["n_engine_reused"] == 2 and s["startup_s_per_trial"] == 18.0
    assert s["by_engine"]["vllm"] == {
        "trials": 2,
        "reused": 1,
        "startup_s_total": 70.0,
        "startup_s_per_trial": 35.0,
        "startup_s_per_start": 70.0,
    }
    assert s["by_engine"]["builtin"]["startup_s_per_start"] is None
    assert "vllm 2 trials, 1 reused, 70.0 s a start" in eng._starts(s)


def test_the_engines_bench_times_batches_of_every_prompt() -> None:
    eng = _engines_bench()
    prompts = [[5] * 4 for _ in range(10)]
    calls: list[int] = []

    def generate(chunk: list[list[int]]) -> int:
        calls.append(len(chunk))
        return len(chunk) * 3

    r = eng.time_batches(generate, prompts, 4, 3, 0)
    assert calls == [2, 4, 4, 2] and r["prompts"] == 10 and r["batch"] == 4  # warm-up, then every prompt
    assert r["p95_ms"] >= r["p50_ms"] >= 0 and r["tokens_per_s"] > 0
    with pytest.raises(RuntimeError, match="new tokens"):
        eng.time_batches(lambda chunk: 1, prompts, 4, 3, 0)
    assert eng.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
