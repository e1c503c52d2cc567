"""Recorded landscapes: recording resumes, bad files are refused, replay is deterministic and fair."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from autotune.config import TrialConfig
from autotune.errors import LandscapeError, TrialFailure
from autotune.landscape import build_order, builds, load_landscape, record, replay, summarize
from autotune.space import SearchSpace
from autotune.spec import StudySpec, load_spec, parse_spec

from .conftest import ROOT, make_hw

SPEC = parse_spec(
    {
        "name": "land",
        "model": "preset:llama-tiny",
        "device": "cpu",
        "slo": {"e2e_ms": {"p95": 100}},
        "space": {
            "batch_size": [1, 2, 4, 8, 16, 32],
            "precision": ["fp32"],
            "quantization": ["none", "int8-dynamic"],
            "streams": [1, 2],
            "backend": ["eager"],
            "max_queue_delay_ms": [0, 10],
        },
    }
)


def synthetic(spec: StudySpec, cfg: TrialConfig) -> tuple[float, list[float]]:
    """A made-up but structured landscape: throughput grows with batch, latency too (SLO at b16)."""
    tps = 100.0 * cfg.batch_size**0.8 * (1.4 if cfg.quantization == "int8-dynamic" else 1.0)
    tps *= 1.2 if cfg.streams == 2 else 1.0
    tps *= 1.05 if cfg.max_queue_delay_ms else 1.0
    latency = 6.0 * cfg.batch_size * (0.8 if cfg.quantization == "int8-dynamic" else 1.0)
    return tps, [(latency - 100) / 100]


@pytest.fixture
def space() -> SearchSpace:
    return SearchSpace.from_spec(SPEC, make_hw())


@pytest.fixture
def recorded(tmp_path: Path, space: SearchSpace) -> Path:
    path = tmp_path / "land.json"
    record(SPEC, space, path, synthetic, repeat_sample=4, repeats=2)
    return path


def test_record_measures_the_grid_once_and_resumes(tmp_path: Path, space: SearchSpace) -> None:
    path, calls = tmp_path / "land.json", []

    fresh: list[bool] = []

    def flaky(spec: StudySpec, cfg: TrialConfig) -> tuple[float, list[float]]:
        calls.append(cfg.key())
        fresh.append(not spec.budget.reuse_engine)
        if len(calls) == 10:
            raise KeyboardInterrupt  # the recording is interrupted mid-grid
        if cfg.batch_size == 32 and cfg.streams == 2:
            raise TrialFailure("oom", "CUDA out of memory")
        return synthetic(spec, cfg)

    with pytest.raises(KeyboardInterrupt):
        record(SPEC, space, path, flaky, repeat_sample=0)
    assert len(load_landscape(path).points) == 9  # everything before the interruption was kept
    started: list[tuple[int, int, int]] = []
    land = record(SPEC, space, path, flaky, repeat_sample=3, repeats=2, on_start=lambda *a: started.append(a))
    assert started == [(48, 2, 9)]  # 39 left, in the two builds (unquantized and int8)
    assert len(land.points) == 48 == land.grid_size and len(calls) == 48 + 1 + 3 * 2  # nothing measured twice
    oom = [p for p in land.points.values() if p.failure]
    assert len(oom) == 4 and all(not p.feasible and "out of memory" in (p.failure or "") for p in oom)
    assert sum(len(p.repeats) == 2 for p in land.points.values()) == 3
    assert fresh == [False] * 49 + [True] * 6  # the spread's repeats each run in a new process


def test_record_measures_the_configs_of_one_build_together(tmp_path: Path, space: SearchSpace) -> None:
    order: list[TrialConfig] = []

    def measure(spec: StudySpec, cfg: TrialConfig) -> tuple[float, list[float]]:
        order.append(cfg)
        return synthetic(spec, cfg)

    record(SPEC, space, tmp_path / "land.json", measure, repeat_sample=0)
    grid = [c for c in space.grid() if space.check(c) is None]
    assert sorted(c.key() for c in order) == sorted(c.key() for c in grid)
    # Two builds (unquantized and int8): one engine each, where grid order changed it at every config.
    assert builds(order) == 2 and builds(grid) == 48
    assert [c.quantization for c in order[:24]] == ["none"] * 24
    assert [c.batch_size for c in order[:8]] == [1] * 4 + [2] * 4  # grid order within a build


def test_bad_landscape_files_are_one_clear_error(tmp_path: Path, recorded: Path) -> None:
    text = recorded.read_text()
    cases = {
        "truncated.json": text[: len(text) // 2],
        "schema.json": json.dumps({**json.loads(text), "schema_version": 99}),
        "nothing.json": "[]",
    }
    for name, body in cases.items():
        (tmp_path / name).write_text(body)
        with pytest.raises(LandscapeError):
            load_landscape(tmp_path / name)
    with pytest.raises(LandscapeError, match="not this machine's"):
        load_landscape(recorded, fingerprint="0000000000000000")
    with pytest.raises(LandscapeError, match="not found"):
        load_landscape(tmp_path / "missing.json")


def test_replay_is_deterministic_and_every_strategy_finds_the_optimum_eventually(
    recorded: Path, space: SearchSpace
) -> None:
    land = load_landscape(recorded)
    best = land.best_feasible()
    assert best is not None and best.config.batch_size == 16 and best.config.quantization == "int8-dynamic"
    strategies = ["tpe", "random", "grid", "hill-climb"]
    a = replay(land, space, strategies, seeds=3, budget=48)
    b = replay(land, space, strategies, seeds=3, budget=48)
    assert [r.incumbent for r in a] == [r.incumbent for r in b]  # same seed, same answers
    rows = {r["strategy"]: r for r in summarize(a, best.tokens_per_s, 48)}
    assert rows["grid"]["reached_99"] == 1.0 and rows["random"]["reached_99"] == 1.0
    assert all(r["missing"] == 0 for r in rows.values())
    assert all(len(r["median_regret"]) == 48 for r in rows.values())


def test_gp_replay_is_deterministic_and_finds_the_optimum(recorded: Path, space: SearchSpace) -> None:
    """Optuna's GPSampler (``sampler: gp``, scipy) through the same replay: same seed, same answers."""
    land = load_landscape(recorded)
    best = land.best_feasible()
    assert best is not None
    a = replay(land, space, ["gp"], seeds=1, budget=10)
    b = replay(land, space, ["gp"], seeds=1, budget=10)
    assert [r.incumbent for r in a] == [r.incumbent for r in b]
    [row] = summarize(a, best.tokens_per_s, 10)
    assert row["reached_99"] == 1.0 and row["missing"] == 0


def test_replayed_trials_carry_what_the_samplers_tie_break_reads(
    recorded: Path, space: SearchSpace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay stores each trial as the tuner does, so ``NoRepeatSampler``'s surrogate ranks
    ties in replay as in a live study (it read nothing before, and chance decided)."""
    import autotune.tuner as tuner_module

    real, seen = tuner_module.surrogate_rank, []

    def spy(sp: SearchSpace) -> Any:
        rank = real(sp)

        def wrapped(trials: Any, candidates: list[dict[str, Any]]) -> Any:
            seen.append((len(tuner_module.observations(trials)), rank(trials, candidates)))
            return seen[-1][1]

        return wrapped

    monkeypatch.setattr(tuner_module, "surrogate_rank", spy)
    replay(load_landscape(recorded), space, ["gp"], seeds=1, budget=24)
    assert seen and all(n >= 2 and scores is not None for n, scores in seen)


def test_hill_climb_stops_at_a_local_optimum_instead_of_spending_the_budget(recorded: Path, space: SearchSpace) -> None:
    land = load_landscape(recorded)
    (run,) = replay(land, space, ["hill-climb"], seeds=1, budget=48)
    assert len(run.incumbent) < 48  # converged: no neighbour improved
    assert run.incumbent[-1] > 0  # and it holds a feasible incumbent


def test_unknown_strategy_is_refused(recorded: Path, space: SearchSpace) -> None:
    from autotune.errors import SpecError

    with pytest.raises(SpecError, match="unknown strategy 'annealing'"):
        replay(load_landscape(recorded), space, ["annealing"], seeds=1, budget=5)


def test_cli_records_a_real_grid_and_replays_it(tmp_path: Path) -> None:
    from .conftest import four_config_grid, run_cli

    spec = four_config_grid(tmp_path)
    res = run_cli(
        "landscape",
        "record",
        str(spec),
        "--output",
        "land.json",
        "--repeat-sample",
        "1",
        "--repeats",
        "1",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "4 configs of 4 recorded" in res.stdout
    assert "4 runnable configs, measured build by build (1 model build)" in res.stderr
    land = load_landscape(tmp_path / "land.json")
    assert (
        all(p.tokens_per_s > 0 for p in land.points.values())
        and sum(bool(p.repeats) for p in land.points.values()) == 1
    )
    res = run_cli(
        "landscape",
        "replay",
        "land.json",
        "--samplers",
        "random,hill-climb",
        "--seeds",
        "2",
        "--budget",
        "4",
        "--json",
        "--plot",
        "regret.html",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    rows = {r["strategy"]: r for r in json.loads(res.stdout)["rows"]}
    # Real measurements: two configs can lie within the recorded noise of each other, so a noisy
    # replay may crown the runner-up. What must hold: every config found, a feasible incumbent.
    assert set(rows) == {"random", "hill-climb"} and all(r["missing"] == 0 for r in rows.values())
    assert len(rows["random"]["median_regret"]) == 4 and 0 <= rows["random"]["median_regret"][-1] < 1
    assert (tmp_path / "regret.html").stat().st_size > 10_000
    assert "hill-climb (mean)" in (tmp_path / "regret.html").read_text()
    res = run_cli(
        "landscape",
        "replay",
        "land.json",
        "--samplers",
        "random",
        "--seeds",
        "2",
        "--confirm-runs",
        "2",
        cwd=tmp_path,
        env={"COLUMNS": "250"},
    )
    assert res.returncode == 0, res.stderr
    assert "winners re-measured 2x" in res.stdout and "re-measured (median)" in res.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    res = run_cli("landscape", "replay", str(bad), cwd=tmp_path)
    assert res.returncode == 2 and "not a landscape file" in res.stderr and "Traceback" not in res.stderr


def test_replay_evaluates_the_patience_stopping_rule(recorded: Path, space: SearchSpace) -> None:
    land = load_landscape(recorded)
    best = land.best_feasible()
    assert best is not None
    runs = replay(land, space, ["random"], seeds=5, budget=48)
    (row,) = summarize(runs, best.tokens_per_s, 48, patience=4)
    assert row["patience_median_measured"] < 48  # the rule spends fewer configs than the budget
    assert 0.0 <= row["patience_reached_99"] <= row["reached_99"]  # and cannot keep more than the full run
    run = runs[0]
    assert run.patience_stop(1000) == len(run.observed) == 48
    # The tuner's rule adds the surrogate's outlook: it can only postpone the stop, never advance it.
    (with_model,) = summarize(runs, best.tokens_per_s, 48, patience=4, space=space, noise=land.spread())
    assert row["patience_median_measured"] <= with_model["model_median_measured"] <= 48
    stops = [(r.patience_stop(4), r.patience_stop(4, model=(list(space.grid()), space.values))) for r in runs]
    assert all(alone <= both for alone, both in stops) and any(alone < both for alone, both in stops)


def test_replay_warm_starts_from_an_earlier_recording_of_the_same_hardware(
    tmp_path: Path, recorded: Path, space: SearchSpace
) -> None:
    """The tuner's warm start, replayed: the earlier recording's best configs are measured first."""
    from autotune.landscape import warm_configs

    land = load_landscape(recorded)
    best = land.best_feasible()
    assert best is not None
    warm = warm_configs(land, land, space)
    assert len(warm) == 3 and warm[0].key() == best.config.key()
    cold = summarize(replay(land, space, ["random", "hill-climb"], seeds=6, budget=5), best.tokens_per_s, 5)
    hot = summarize(replay(land, space, ["random", "hill-climb"], seeds=6, budget=5, warm=warm), best.tokens_per_s, 5)
    for c, h in zip(cold, hot, strict=True):
        assert h["reached_95"] == 1.0 and h["median_to_95"] == 1 and c["reached_95"] < 1.0
    other = json.loads(recorded.read_text())
    other["hardware"]["fingerprint"] = "0123456789abcdef"  # recorded on another machine
    moved = tmp_path / "other.json"
    moved.write_text(json.dumps(other))
    with pytest.raises(LandscapeError, match="other hardware"):
        warm_configs(land, load_landscape(moved), space)


class _Scripted(random.Random):
    """A random.Random whose gauss() returns scripted draws (then 0)."""

    def __init__(self, *draws: float) -> None:
        super().__init__(0)
        self.draws = list(draws)

    def gauss(self, mu: float = 0.0, sigma: float = 1.0) -> float:
        return self.draws.pop(0) if self.draws else 0.0


def test_confirmation_passes_over_a_winner_that_met_the_slo_by_luck() -> None:
    """A truly infeasible config observed feasible is credited as 0 without confirmation; with
    confirm_runs its re-measurement misses, and the incumbent is the next config, as the tuner exports."""
    from autotune.landscape import Landscape, Point, _Oracle

    lucky, solid = TrialConfig(batch_size=16), TrialConfig(batch_size=8)
    land = Landscape(
        SPEC,
        {},
        {lucky.key(): Point(lucky, 200.0, [0.05], []), solid.key(): Point(solid, 150.0, [-0.3], [])},
        grid_size=2,
    )
    for confirm_runs, credited in ((0, 0.0), (1, 150.0)):
        # The search's draws: lucky's throughput as recorded, its latency 10% under (feasible by luck).
        oracle = _Oracle(land, _Scripted(0.0, -0.1), 0.08, confirm_runs, _Scripted(0.0))
        oracle.measure(lucky)
        oracle.measure(solid)
        assert oracle.incumbent[-1] == credited
        assert oracle.confirmations == (2 if confirm_runs else 0)  # lucky failed, solid passed


def test_the_summary_says_from_which_budget_a_strategy_beats_both_baselines() -> None:
    from autotune.landscape import _compare_with_baselines

    def row(name: str, regret: list[float]) -> dict[str, object]:
        return {"strategy": name, "median_regret": regret}

    rows = [
        row("tpe", [1.0, 0.5, 0.7, 0.0]),  # worse than random at 3: counts from 4 on
        row("gp", [1.0, 0.5, 0.2, 0.0]),
        row("grid", [0.5, 0.5, 0.5, 0.5]),
        row("random", [0.9, 0.6, 0.3, 0.1]),
        row("hill-climb", [0.8, 0.8, 0.8, 0.8]),
    ]
    _compare_with_baselines(rows)
    got = {r["strategy"]: r.get("below_baselines_from", "-") for r in rows}
    assert got == {"tpe": 4, "gp": 2, "grid": None, "random": "-", "hill-climb": "-"}
    alone = [row("tpe", [0.1]), row("random", [0.2])]
    _compare_with_baselines(alone)  # no hill-climb replayed: nothing to say
    assert "below_baselines_from" not in alone[0]


def test_the_summary_compares_each_strategy_with_the_baselines_seed_for_seed() -> None:
    from autotune.landscape import Run, summarize

    best = 100.0

    def runs(name: str, per_seed: list[list[float]]) -> list[Run]:
        return [Run(name, seed, incumbent) for seed, incumbent in enumerate(per_seed)]

    seeds = range(20)
    # random: 50 tok/s then 60; the hill-climb: 40 throughout.
    base = runs("random", [[50.0, 60.0, 60.0] for _ in seeds]) + runs("hill-climb", [[40.0] * 3 for _ in seeds])
    # gp: the same first config as random, then 1 tok/s short of it at config 2 in every seed (a gap
    # no seed contradicts), then ahead; tpe: a noisy tie at config 2 (the gap changes sign by seed).
    gp = runs("gp", [[50.0, 59.0, 90.0] for _ in seeds])
    tpe = runs("tpe", [[50.0, 60.0 + (5.0 if s % 2 else -5.5), 95.0] for s in seeds])
    rows = {r["strategy"]: r for r in summarize(base + gp + tpe, best, 3)}
    assert rows["gp"]["mean_regret"] == pytest.approx([0.5, 0.41, 0.1])
    assert rows["gp"]["worse_than_baselines_at"] == [2]
    assert rows["gp"]["mean_below_baselines_from"] == 3
    mean, low, high = rows["gp"]["vs_random"][1]
    assert mean == pytest.approx(0.01) and low == pytest.approx(0.01) and high == pytest.approx(0.01)
    assert rows["tpe"]["worse_than_baselines_at"] == []  # 0.0025 worse in the mean, inside the spread
    assert rows["tpe"]["mean_below_baselines_from"] == 3
    assert rows["tpe"]["vs_hill-climb"][2][2] < 0  # clearly ahead of the hill-climb at config 3
    assert "vs_random" not in rows["random"] and "worse_than_baselines_at" not in rows["hill-climb"]


def test_the_gpu_landscape_spec_is_48_configs_in_two_builds() -> None:
    """studies/landscape-gpu.yaml, which bench/gpu_landscape.sh records on a GPU machine."""
    spec = load_spec(ROOT / "studies" / "landscape-gpu.yaml")
    space = SearchSpace.from_spec(spec, make_hw("cuda", cc=(9, 0), memory_mb=80_000))
    runnable = [c for c in space.grid() if space.check(c) is None]
    assert len(runnable) == 48 and builds(build_order(space, runnable)) == 2
