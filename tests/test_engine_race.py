"""The budget split between a study's engines: probes first, then no trials for an engine far behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from autotune.config import TrialConfig
from autotune.engine_race import EngineRace
from autotune.measure import Measurement
from autotune.models import resolve_model
from autotune.spec import parse_spec
from autotune.tuner import A_ENGINE_PROBE, A_ENGINE_RACE, Tuner

from .conftest import make_hw

SPEC: dict[str, Any] = {
    "name": "race",
    "model": "preset:llama-tiny",
    "engine": ["builtin", "vllm"],
    "slo": {"e2e_ms": {"p95": 1000}},
    "space": {
        "batch_size": [8, 16, 32, 64],
        "precision": ["fp32"],
        "quantization": ["none", "int8-dynamic"],
        "streams": [1, 2],
        "backend": ["eager"],
        "max_queue_delay_ms": [0],
    },
    "budget": {"trials": 10, "confirm_runs": 0},
}


@pytest.fixture(autouse=True)
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    import autotune.engines as engines

    monkeypatch.setitem(engines._PATHS, "vllm", "tests.test_space:FakeServerEngine")


def landscape(vllm_speed: float) -> Any:
    """Throughput grows with rows; latency too (feasible up to 32 rows at speed 1). The fake vLLM
    runs at ``vllm_speed`` times the built-in engine."""

    def run(spec: object, cfg: TrialConfig, hw: object) -> Measurement:
        speed = (vllm_speed if cfg.engine == "vllm" else 1.0) * (1.5 if cfg.quantization == "int8-dynamic" else 1.0)
        rows = cfg.batch_size * cfg.streams
        lat = {k: 30.0 * rows / speed for k in ("p50", "p90", "p95", "p99", "mean", "max")}
        return Measurement(
            output_tokens_per_s=10.0 * rows * speed,
            requests_per_s=1.0,
            requests=10,
            output_tokens=100,
            duration_s=1.0,
            e2e_ms=lat,
            ttft_ms=lat,
            tpot_ms=lat,
            queue_ms=lat,
            mean_batch_rows=cfg.batch_size,
            peak_memory_mb=100.0,
            memory_kind="synthetic",
        )

    return run


def run_study(tmp_path: Path, vllm_speed: float, **spec: Any) -> tuple[Tuner, list[Any]]:
    s = parse_spec({**SPEC, **spec})
    t = Tuner(
        s, make_hw(), resolve_model(s.model), storage_url=f"sqlite:///{tmp_path}/r.db", runner=landscape(vllm_speed)
    )
    study = t.run()
    measured = [x for x in study.get_trials() if "measurement" in x.user_attrs and "duplicate_of" not in x.user_attrs]
    return t, sorted(measured, key=lambda x: x.number)


def engines_of(trials: list[Any]) -> list[str]:
    return [x.user_attrs["config"]["engine"] for x in trials]


def test_every_engine_is_probed_first_then_one_far_behind_gets_no_more_trials(tmp_path: Path) -> None:
    t, trials = run_study(tmp_path, vllm_speed=0.3, space={**SPEC["space"], "streams": [1]})
    assert t.race is not None and t.race.probes == 2
    # probes first, round robin: 60% up each engine's batch sizes (the fake vLLM runs 8-64 here), the
    # lightest form first (int8), then the other quantization two sizes up (32 rows at int8 met the SLO)
    assert engines_of(trials[:4]) == ["builtin", "vllm", "builtin", "vllm"]
    assert all(A_ENGINE_PROBE in x.user_attrs for x in trials[:4])
    assert not any(A_ENGINE_PROBE in x.user_attrs for x in trials[4:])
    first, second = (x.user_attrs["config"] for x in trials[:3:2])
    assert (first["batch_size"], first["quantization"]) == (32, "int8-dynamic")
    assert (second["batch_size"], second["quantization"]) == (64, "none")
    assert trials[1].user_attrs["config"]["batch_size"] == 32
    assert trials[0].user_attrs[A_ENGINE_PROBE] == "probe 1 of engine builtin: batch 32, fp32 int8-dynamic"
    # vLLM's best (0.3x) is under 0.6x the built-in's: after its probes, no more trials
    assert engines_of(trials).count("vllm") == 2
    race = t.race.record([])  # plan from no trials: nothing dropped yet
    assert race["vllm"]["state"] == "probing"
    stored = t.open_study().user_attrs[A_ENGINE_RACE]
    assert stored["vllm"]["state"] == "dropped" and "budget.engine_keep" in stored["vllm"]["why"]
    assert stored["builtin"]["trials"] == len(trials) - 2


def test_a_close_engine_keeps_its_share_and_its_second_probe_follows_the_slo(tmp_path: Path) -> None:
    t, trials = run_study(tmp_path, vllm_speed=0.9)
    vllm = [x for x in trials if x.user_attrs["config"]["engine"] == "vllm"]
    probes = [x for x in vllm if A_ENGINE_PROBE in x.user_attrs]
    assert len(probes) == 2
    # The first probe (batch 32) ran 32 or 64 rows: feasible at 32 (864 ms), not at 64 -> up or down two ranks.
    first, second = probes
    up = first.user_attrs["feasible"]
    assert second.user_attrs["config"]["batch_size"] == (64 if up else 8)
    assert t.open_study().user_attrs[A_ENGINE_RACE]["vllm"]["state"] == "searched"


def test_probes_zero_or_one_engine_means_no_race(tmp_path: Path) -> None:
    s = parse_spec({**SPEC, "budget": {"trials": 4, "engine_probes": 0}})
    assert Tuner(s, make_hw(), resolve_model(s.model), storage_url=f"sqlite:///{tmp_path}/a.db").race is None
    one = parse_spec({**SPEC, "engine": "builtin"})
    assert Tuner(one, make_hw(), resolve_model(one.model), storage_url=f"sqlite:///{tmp_path}/b.db").race is None
    grid = parse_spec({**SPEC, "sampler": "grid"})
    assert Tuner(grid, make_hw(), resolve_model(grid.model), storage_url=f"sqlite:///{tmp_path}/c.db").race is None


def test_a_small_budget_gives_each_engine_one_probe(tmp_path: Path) -> None:
    s = parse_spec({**SPEC, "budget": {"trials": 6}})
    t = Tuner(s, make_hw(), resolve_model(s.model), storage_url=f"sqlite:///{tmp_path}/a.db")
    assert isinstance(t.race, EngineRace) and t.race.probes == 1


def test_an_engine_whose_trials_all_failed_is_dropped_once_another_meets_the_slo(tmp_path: Path) -> None:
    from autotune.errors import TrialFailure

    ok = landscape(1.0)

    def run(spec: object, cfg: TrialConfig, hw: object) -> Measurement:
        if cfg.engine == "vllm":
            raise TrialFailure("crash", "server exited with 1", "Traceback: ...")
        return ok(spec, cfg, hw)

    s = parse_spec(SPEC)
    t = Tuner(s, make_hw(), resolve_model(s.model), storage_url=f"sqlite:///{tmp_path}/f.db", runner=run)
    study = t.run()
    tried = [x.user_attrs["config"]["engine"] for x in study.get_trials() if "worker" in x.user_attrs]
    assert tried.count("vllm") == 2
    why = study.user_attrs[A_ENGINE_RACE]["vllm"]["why"]
    assert why.startswith("its 2 trial(s) measured nothing (failed), is under 0.6x engine builtin's")


def test_tune_says_how_each_engine_fared(tmp_path: Path) -> None:
    from autotune.cli import _race_summary

    t, _ = run_study(tmp_path, vllm_speed=0.3, space={**SPEC["space"], "streams": [1]})
    text = _race_summary(t.open_study().user_attrs[A_ENGINE_RACE])
    lines = text.splitlines()
    assert lines[1].startswith("  builtin: 8 trial(s), best ") and "within the SLO" in lines[1]
    assert lines[2].startswith("  vllm: 2 trial(s), ") and "; dropped: its best in 2 trial(s)" in lines[2]


def test_standings_rank_by_what_the_study_ranks_by_not_the_raw_measurement() -> None:
    """Under a load that did not pass, a trial's value is its quiet-machine estimate (3x here); the
    race compares engines by that, as the sampler and the winner do."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    race = EngineRace(["builtin", "vllm"], {"builtin": [8], "vllm": [8]}, {}, probes=1, keep=0.6)
    loaded = create_trial(
        values=[300.0],
        params={"engine": "builtin"},
        distributions={"engine": CategoricalDistribution(["builtin", "vllm"])},
        user_attrs={
            "config": {"engine": "builtin", "batch_size": 8},
            "feasible": True,
            "measurement": {"output_tokens_per_s": 100.0},
        },
    )
    assert race.standings([loaded])["builtin"].best_feasible == 300.0
