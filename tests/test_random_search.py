"""Random search without repeats: every config once before any twice, other workers' running trials included."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial

from autotune import random_search
from autotune.random_search import DistinctRandomSampler

SPACE = {"batch_size_rank": IntDistribution(0, 2), "quantization": CategoricalDistribution(["none", "int8"])}


def _configs(study: optuna.Study) -> list[tuple[int, str]]:
    return [(t.params["batch_size_rank"], t.params["quantization"]) for t in study.trials]


def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_int("batch_size_rank", 0, 2) + len(trial.suggest_categorical("quantization", ["none", "int8"]))


@pytest.mark.parametrize("enumerate_max", [random_search.ENUMERATE_MAX, 1])  # enumerated, or drawn until free
def test_every_config_once_before_any_twice(monkeypatch: pytest.MonkeyPatch, enumerate_max: int) -> None:
    monkeypatch.setattr(random_search, "ENUMERATE_MAX", enumerate_max)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize", sampler=DistinctRandomSampler(SPACE, seed=3))
    study.optimize(_objective, n_trials=6)
    assert len(set(_configs(study))) == 6
    study.optimize(_objective, n_trials=1)  # all taken: a repeat, not an error
    assert len(set(_configs(study))) == 6 and len(study.trials) == 7


@pytest.mark.parametrize("seed", range(5))
def test_a_config_another_worker_is_measuring_or_that_failed_is_taken(seed: int) -> None:
    space: dict[str, BaseDistribution] = {"quantization": CategoricalDistribution(["none", "int8", "int4"])}
    study = optuna.create_study(sampler=DistinctRandomSampler(space, seed=seed))
    for value in ("int8", "int4"):
        study.enqueue_trial({"quantization": value})
    running = study.ask()  # RUNNING, as in another worker
    assert running.suggest_categorical("quantization", ["none", "int8", "int4"]) == "int8"
    failed = study.ask()
    failed.suggest_categorical("quantization", ["none", "int8", "int4"])
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    trial = study.ask()
    assert trial.suggest_categorical("quantization", ["none", "int8", "int4"]) == "none"


def test_the_same_seed_draws_the_same_order() -> None:
    orders = []
    for _ in range(2):
        study = optuna.create_study(direction="maximize", sampler=DistinctRandomSampler(SPACE, seed=7))
        study.optimize(_objective, n_trials=6)
        orders.append(_configs(study))
    assert orders[0] == orders[1]


def test_float_parameters_are_refused() -> None:
    with pytest.raises(TypeError, match="categorical or integer"):
        DistinctRandomSampler({"x": optuna.distributions.FloatDistribution(0, 1)})


DISTS = {"rank": IntDistribution(0, 4), "kind": CategoricalDistribution(["a", "b"])}


class _Stuck(optuna.samplers.BaseSampler):
    """A model that has converged: it proposes the same whole config every time."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return dict(DISTS)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return dict(self.params)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, name: str, dist: Any) -> Any:
        raise AssertionError("every parameter is relative here")


def test_no_repeat_sampler_moves_to_the_nearest_free_config_after_allowed_repeats() -> None:
    from autotune.random_search import NoRepeatSampler

    sampler = NoRepeatSampler(_Stuck({"rank": 2, "kind": "a"}), DistinctRandomSampler(DISTS, seed=0), allow=2)
    study = optuna.create_study(sampler=sampler)
    configs = []
    for _ in range(6):
        trial = study.ask()
        configs.append((trial.suggest_int("rank", 0, 4), trial.suggest_categorical("kind", ["a", "b"])))
        study.tell(trial, 1.0)
    # The model's pick, then two repeats allowed, then the nearest free config; and again.
    assert configs[:3] == [(2, "a")] * 3
    assert configs[3] in {(1, "a"), (3, "a")}  # one rank step away beats another kind (a full step)
    assert configs[4:6] == [(2, "a")] * 2


def test_configs_the_rules_refuse_are_drawn_only_when_nothing_else_is_free() -> None:
    def unquantized(params: dict[str, Any]) -> bool:
        return params["quantization"] == "none"

    study = optuna.create_study(sampler=DistinctRandomSampler(SPACE, seed=1, allowed=unquantized))
    study.optimize(
        lambda t: (
            t.suggest_int("batch_size_rank", 0, 2) + (t.suggest_categorical("quantization", ["none", "int8"]) == "int8")
        ),
        n_trials=6,
    )
    configs = _configs(study)
    assert {q for _, q in configs[:3]} == {"none"} and {q for _, q in configs[3:]} == {"int8"}


def test_no_repeat_sampler_replaces_a_refused_proposal_at_once() -> None:
    from autotune.random_search import NoRepeatSampler

    distinct = DistinctRandomSampler(DISTS, seed=0, allowed=lambda p: p["kind"] == "b")
    study = optuna.create_study(sampler=NoRepeatSampler(_Stuck({"rank": 2, "kind": "a"}), distinct, allow=None))
    trial = study.ask()
    assert (trial.suggest_int("rank", 0, 4), trial.suggest_categorical("kind", ["a", "b"])) == (2, "b")


def test_no_repeat_sampler_breaks_ties_by_its_rank() -> None:
    """Stuck on a repeat, the nearest free configs are (1, a) and (3, a); the rank picks between
    them (a coin did before, for every seed)."""
    from autotune.random_search import NoRepeatSampler

    calls: list[list[dict[str, Any]]] = []

    def rank(trials: object, candidates: list[dict[str, Any]]) -> list[float]:
        calls.append(candidates)
        return [float(c["rank"]) for c in candidates]  # prefers the larger rank

    for seed in range(6):
        stuck = _Stuck({"rank": 2, "kind": "a"})
        sampler = NoRepeatSampler(stuck, DistinctRandomSampler(DISTS, seed=seed), allow=0, rank=rank)
        study = optuna.create_study(sampler=sampler)
        first = study.ask()
        assert _suggest(first) == (2, "a")
        study.tell(first, 1.0)
        assert _suggest(study.ask()) == (3, "a")
    assert all(sorted(c["rank"] for c in cands) == [1, 3] for cands in calls) and len(calls) == 6


def _suggest(trial: optuna.Trial) -> tuple[int, str]:
    return trial.suggest_int("rank", 0, 4), trial.suggest_categorical("kind", ["a", "b"])


def test_no_repeat_sampler_skips_a_config_another_worker_is_measuring() -> None:
    """A running trial's config has no result to copy: proposing it again measures it twice."""
    from autotune.random_search import NoRepeatSampler

    sampler = NoRepeatSampler(_Stuck({"rank": 2, "kind": "a"}), DistinctRandomSampler(DISTS, seed=0), allow=2)
    study = optuna.create_study(sampler=sampler)
    assert _suggest(study.ask()) == (2, "a")  # left running, as another worker's trial
    assert _suggest(study.ask()) in {(1, "a"), (3, "a")}


def test_workers_with_the_studys_seed_start_from_different_configs() -> None:
    """Every worker seeds its sampler with the study's seed; Optuna's random start would then hand
    each of them the same configs while the others measure them."""
    from autotune.random_search import NoRepeatSampler

    def worker() -> NoRepeatSampler:
        tpe = optuna.samplers.TPESampler(seed=0, n_startup_trials=5, multivariate=True)
        return NoRepeatSampler(tpe, DistinctRandomSampler(DISTS, seed=0), allow=None)

    storage = optuna.storages.InMemoryStorage()
    one = optuna.create_study(storage=storage, study_name="shared", sampler=worker())
    two = optuna.load_study(study_name="shared", storage=storage, sampler=worker())
    running = [_suggest(one.ask()), _suggest(two.ask()), _suggest(one.ask())]
    assert len(set(running)) == 3


#: Six ordered values and three kinds: a 3-config Latin hypercube takes ranks from {0, 1}, {2, 3} and
#: {4, 5}, and every kind once.
DISTS3 = {"rank": IntDistribution(0, 5), "kind": CategoricalDistribution(["a", "b", "c"])}


def _start(seed: int, allowed: Any = None, n: int = 3) -> list[tuple[int, str]]:
    """The first ``n`` configs of a stratified start, as a model in its random start draws them."""
    from autotune.random_search import NoRepeatSampler

    distinct = DistinctRandomSampler(DISTS3, seed=seed, allowed=allowed, stratify=3)
    study = optuna.create_study(sampler=NoRepeatSampler(_Stuck({}), distinct, allow=2))
    drawn = []
    for _ in range(n):
        trial = study.ask()
        drawn.append((trial.suggest_int("rank", 0, 5), trial.suggest_categorical("kind", ["a", "b", "c"])))
        study.tell(trial, 1.0)
    return drawn


@pytest.mark.parametrize("seed", range(6))
def test_a_stratified_start_takes_another_stratum_of_every_knob(seed: int) -> None:
    drawn = _start(seed)
    assert sorted(rank // 2 for rank, _ in drawn) == [0, 1, 2]
    assert sorted(kind for _, kind in drawn) == ["a", "b", "c"]


def test_uniform_draws_repeat_strata() -> None:
    """What the test above guards against: without ``stratify`` some seed's start repeats a stratum."""
    from autotune.random_search import NoRepeatSampler

    def uniform(seed: int) -> list[int]:
        study = optuna.create_study(sampler=NoRepeatSampler(_Stuck({}), DistinctRandomSampler(DISTS3, seed=seed)))
        ranks = []
        for _ in range(3):
            trial = study.ask()
            ranks.append(trial.suggest_int("rank", 0, 5) // 2)
            trial.suggest_categorical("kind", ["a", "b", "c"])
            study.tell(trial, 1.0)
        return sorted(ranks)

    assert any(uniform(seed) != [0, 1, 2] for seed in range(6))


def test_each_config_of_a_stratified_start_is_alone_a_uniform_draw() -> None:
    """The strata are dealt at random, so no start config leans to small or large values: each is,
    on its own, what random search would draw (600 seeds: every rank 100 times, give or take 40)."""
    from collections import Counter

    starts = [_start(seed) for seed in range(600)]
    for k in range(3):
        counts = Counter(start[k][0] for start in starts)
        assert sorted(counts) == list(range(6)) and all(60 <= c <= 140 for c in counts.values()), (k, counts)


def test_a_stratified_start_keeps_to_the_rules() -> None:
    """A stratum whose configs the rules all refuse gives way to any allowed config, never a refused one."""

    def allowed(p: dict[str, Any]) -> bool:
        return p["kind"] != "a"

    for seed in range(6):
        drawn = _start(seed, allowed)
        assert all(kind != "a" for _, kind in drawn) and len(set(drawn)) == 3
