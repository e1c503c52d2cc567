"""Recorded landscapes: every config of a spec's grid measured once, then search strategies replayed on it.

A tuner is judged by how few expensive trials it needs. ``record`` measures the whole grid (each
config in its own trial process, as the tuner would) and a sample of configs again, for the
run-to-run spread; the file is rewritten after every config, so an interrupted recording resumes.
``replay`` runs each strategy against the table: a suggested config is looked up (not measured),
and its throughput and latency get noise drawn from the recorded spread. The figure of merit is
the number of measured configs until the strategy's incumbent (its best *observed* feasible
config) is truly within 95% / 99% of the grid's best feasible throughput.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.config import MODEL_KNOBS, TrialConfig
from autotune.errors import AutotuneError, LandscapeError, SpecError, TrialFailure
from autotune.space import ORDINAL_KNOBS, SearchSpace
from autotune.spec import StudySpec
from autotune.surrogate import DEFAULT_NOISE, Observation, outlook

SCHEMA_VERSION = 1
STRATEGIES: tuple[str, ...] = ("tpe", "nsga2", "gp", "random", "grid", "hill-climb")
TARGETS = (0.95, 0.99)


# -- the file ------------------------------------------------------------------------------------------
@dataclass
class Point:
    """One grid config as recorded: the figures the search needs, plus repeats when sampled."""

    config: TrialConfig
    tokens_per_s: float
    constraints: list[float]  # (measured - bound) / bound per SLO clause, <= 0 feasible
    repeats: list[float]  # tokens/s of extra runs (empty unless this config was sampled)
    failure: str | None = None

    @property
    def feasible(self) -> bool:
        return self.failure is None and all(c <= 0 for c in self.constraints)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json"),
            "key": self.config.key(),
            "tokens_per_s": self.tokens_per_s,
            "constraints": self.constraints,
            "repeats": self.repeats,
            "failure": self.failure,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        return cls(
            TrialConfig.model_validate(d["config"]),
            float(d["tokens_per_s"]),
            list(d["constraints"]),
            list(d.get("repeats") or []),
            d.get("failure"),
        )


@dataclass
class Landscape:
    spec: StudySpec
    hardware: dict[str, Any]
    points: dict[str, Point]  # config key -> point
    grid_size: int
    recorded_s: float = 0.0

    @property
    def fingerprint(self) -> str:
        return str(self.hardware.get("fingerprint", ""))

    def best_feasible(self) -> Point | None:
        feasible = [p for p in self.points.values() if p.feasible]
        return max(feasible, key=lambda p: p.tokens_per_s) if feasible else None

    def spread(self) -> float:
        """The median relative run-to-run spread (std / mean) of the repeated configs."""
        rel = []
        for p in self.points.values():
            runs = [p.tokens_per_s, *p.repeats]
            if len(runs) > 1 and statistics.mean(runs) > 0:
                rel.append(statistics.pstdev(runs) / statistics.mean(runs))
        return statistics.median(rel) if rel else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "spec": self.spec.model_dump(mode="json"),
            "hardware": self.hardware,
            "grid_size": self.grid_size,
            "recorded_s": self.recorded_s,
            "points": [p.to_dict() for p in self.points.values()],
        }

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)  # atomic: a crash never leaves half a file


def load_landscape(path: str | Path, *, fingerprint: str | None = None) -> Landscape:
    """Read a landscape file, or one clear LandscapeError."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LandscapeError(f"landscape file not found: {p}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LandscapeError(f"{p}: not a landscape file (truncated or not JSON: {err})") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise LandscapeError(f"{p}: not a landscape file (no schema_version)")
    if data["schema_version"] != SCHEMA_VERSION:
        raise LandscapeError(f"{p}: landscape schema {data['schema_version']}, this autotune reads {SCHEMA_VERSION}")
    try:
        spec = StudySpec.model_validate(data["spec"])
        points = {pt["key"]: Point.from_dict(pt) for pt in data["points"]}
        land = Landscape(spec, dict(data["hardware"]), points, int(data["grid_size"]), float(data["recorded_s"]))
    except (KeyError, TypeError, ValueError) as err:
        raise LandscapeError(f"{p}: malformed landscape ({type(err).__name__}: {err})") from None
    stale = [k for k, pt in points.items() if pt.config.key() != k]
    if stale:
        raise LandscapeError(f"{p}: {len(stale)} point(s) whose key does not match their config (edited by hand?)")
    if fingerprint is not None and land.fingerprint != fingerprint:
        raise LandscapeError(
            f"{p}: recorded on hardware {land.fingerprint or '(none)'}, not this machine's {fingerprint}; "
            "a landscape only describes the hardware it was measured on"
        )
    return land


# -- recording ----------------------------------------------------------------------------------------
Measure = Callable[[StudySpec, TrialConfig], tuple[float, list[float]]]


def record(
    spec: StudySpec,
    space: SearchSpace,
    path: Path,
    measure: Measure,
    *,
    repeat_sample: int = 6,
    repeats: int = 2,
    seed: int = 0,
    on_point: Callable[[int, int, Point], None] = lambda i, n, p: None,
    on_start: Callable[[int, int, int], None] = lambda n, builds, done: None,
) -> Landscape:
    """Measure every runnable grid config once (resuming ``path`` if it holds a partial recording of
    the same spec on the same hardware), then ``repeats`` more runs of ``repeat_sample`` configs.

    The configs of one build (the model knobs) are measured one after another (:func:`build_order`).
    ``on_start``: the runnable configs, the builds they take, and how many are recorded already."""
    hw = space.hardware.model_dump(mode="json") | {"fingerprint": space.hardware.fingerprint()}
    configs = build_order(space, [c for c in space.grid() if space.check(c) is None])
    if path.exists():
        land = load_landscape(path, fingerprint=space.hardware.fingerprint())
        if land.spec.model_dump(exclude={"name", "budget"}) != spec.model_dump(exclude={"name", "budget"}):
            raise LandscapeError(f"{path}: recorded from another spec; pass a new --output")
    else:
        land = Landscape(spec, hw, {}, len(configs))
    todo = [c for c in configs if c.key() not in land.points]
    on_start(len(configs), builds(todo), len(configs) - len(todo))
    t0 = time.perf_counter() - land.recorded_s
    for i, cfg in enumerate(configs):
        if cfg.key() in land.points:
            continue
        try:
            tps, cons = measure(spec, cfg)
            point = Point(cfg, tps, cons, [])
        except (AutotuneError, TrialFailure) as err:  # failed or out of memory: infeasible, with the reason
            point = Point(cfg, 0.0, [1.0] * len(spec.slo), [], failure=str(err)[:300])
        land.points[cfg.key()] = point
        land.recorded_s = time.perf_counter() - t0
        land.save(path)
        on_point(i, len(configs), point)
    sampled = [p for p in land.points.values() if p.failure is None]
    random.Random(seed).shuffle(sampled)
    fresh = spec.in_fresh_processes()  # run-to-run spread: each repeat in its own process
    for p in sampled[:repeat_sample]:
        while len(p.repeats) < repeats:
            try:
                p.repeats.append(measure(fresh, p.config)[0])
            except (AutotuneError, TrialFailure):
                break
            land.recorded_s = time.perf_counter() - t0
            land.save(path)
    return land


def build_order(space: SearchSpace, configs: list[TrialConfig]) -> list[TrialConfig]:
    """``configs`` with those of one build (same model knobs) together, in grid order otherwise.

    A trial process keeps its built engine across configs that change only runtime knobs, and a GPU
    keeps one engine warm. Grid order varies the model knobs innermost, so a recording in that order
    rebuilt (loaded, quantized, compiled) the model for nearly every config.
    """

    def position(c: TrialConfig) -> tuple[int, ...]:
        return tuple(space.values[k].index(v) for k, v in zip(MODEL_KNOBS, _build(c), strict=True))

    return sorted(configs, key=position)


def builds(configs: Sequence[TrialConfig]) -> int:
    """How many engines measuring ``configs`` in this order builds with one kept warm."""
    keys = [_build(c) for c in configs]
    return sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])


def _build(cfg: TrialConfig) -> tuple[Any, ...]:
    """The values of ``cfg``'s model knobs: what its engine's build depends on."""
    return tuple(getattr(cfg, k) for k in MODEL_KNOBS)


# -- replay -------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One strategy, one seed: the incumbent's true throughput after each measured config."""

    strategy: str
    seed: int
    incumbent: list[float]  # true tokens/s of the incumbent (0 while none is feasible)
    missing: int = 0  # suggested configs the table does not hold (never silently skipped)
    observed: list[float] = field(default_factory=list)  # the best *observed* feasible tokens/s so far
    history: list[Observation] = field(default_factory=list)  # each measured config, as observed
    confirmations: int = 0  # re-measurements of would-be winners (``confirm_runs``), beyond the budget

    def patience_stop(
        self,
        patience: int,
        min_improvement_pct: float = 1.0,
        model: tuple[Sequence[TrialConfig], dict[str, list[Any]]] | None = None,
        noise: float = DEFAULT_NOISE,
    ) -> int:
        """How many measured configs the tuner's stopping rule (``budget.patience``) would have
        spent: it stops once ``patience`` configs in a row did not raise the observed best and, with
        ``model`` (the candidates and the space's values), the surrogate expects less than
        ``min_improvement_pct`` from any config not yet measured."""
        from autotune.tuner import plateau

        keep_going = None
        if model is not None:
            candidates, values = model

            def keep_going(i: int) -> bool:
                look = outlook(self.history[: i + 1], candidates, values, ORDINAL_KNOBS, noise)
                return look is not None and look.expected_gain_pct >= min_improvement_pct

        stop = plateau(self.observed, patience, min_improvement_pct, keep_going)
        return len(self.observed) if stop is None else stop[0] + 1

    def regret(self, best: float, budget: int) -> list[float]:
        """1 - incumbent / best after each of ``budget`` measured configs (the last one held if the run
        stopped early; 1 with no run at all)."""
        held = self.incumbent or [0.0]
        return [1 - (held[i] if i < len(held) else held[-1]) / best for i in range(budget)]

    def trials_to(self, fraction: float, best: float) -> int | None:
        for i, v in enumerate(self.incumbent):
            if v >= fraction * best:
                return i + 1
        return None


class _Oracle:
    """Answers 'measure this config' from the table, with the recorded noise.

    With ``confirm_runs``, the incumbent after each measured config is the config the tuner would
    export at that point: the best observed feasible one whose ``confirm_runs`` re-measurements
    (fresh noise, drawn once per config from ``confirm_rng`` so the search's own draws do not
    change) all meet the SLO, however many configs that passes over: the tuner exports only a
    re-measured config, as ``Tuner.confirm`` does.
    """

    def __init__(
        self,
        land: Landscape,
        rng: random.Random,
        noise: float,
        confirm_runs: int = 0,
        confirm_rng: random.Random | None = None,
    ) -> None:
        self.land, self.rng, self.noise = land, rng, noise
        self.confirm_runs, self.confirm_rng = confirm_runs, confirm_rng or random.Random(0)
        self.seen: dict[str, tuple[float, list[float]]] = {}
        self.order: list[str] = []
        self.missing = 0
        self.best_observed = -math.inf
        self.incumbent: list[float] = []
        self.observed: list[float] = []
        self.history: list[Observation] = []
        self.confirmed: dict[str, bool] = {}
        self.confirmations = 0  # re-measurements spent

    def run(self, strategy: str, seed: int, budget: int) -> Run:
        """What the strategy driving this oracle got, up to ``budget`` measured configs."""
        n = budget
        return Run(
            strategy, seed, self.incumbent[:n], self.missing, self.observed[:n], self.history[:n], self.confirmations
        )

    def _noisy(self, constraints: list[float], rng: random.Random) -> list[float]:
        return [c if c >= 1.0 else (1 + c) * (1 + rng.gauss(0, self.noise)) - 1 for c in constraints]

    def _passes(self, key: str) -> bool:
        if key not in self.confirmed:
            p = self.land.points[key]
            ok = True
            for _ in range(self.confirm_runs):
                self.confirmations += 1
                if any(c > 0 for c in self._noisy(p.constraints, self.confirm_rng)):
                    ok = False
                    break
            self.confirmed[key] = ok
        return self.confirmed[key]

    def exported(self) -> str | None:
        """The config the tuner would export now (see the class docstring)."""
        feasible = [k for k, (_, cons) in self.seen.items() if all(c <= 0 for c in cons)]
        feasible.sort(key=lambda k: -self.seen[k][0])
        for key in feasible:
            if not self.confirm_runs or self._passes(key):
                return key
        return None

    def measure(self, cfg: TrialConfig) -> tuple[float, list[float]] | None:
        key = cfg.key()
        if key in self.seen:  # the tuner never measures a config twice: a repeat is free
            return self.seen[key]
        p = self.land.points.get(key)
        if p is None:
            self.missing += 1
            return None
        jitter = 1 + self.rng.gauss(0, self.noise)
        tps = p.tokens_per_s * jitter
        cons = self._noisy(p.constraints, self.rng)
        if p.failure is not None:
            tps, cons = 0.0, [1.0] * len(p.constraints)
        self.seen[key] = (tps, cons)
        self.order.append(key)
        self.history.append(Observation(cfg, tps, cons, failed=p.failure is not None))
        if all(c <= 0 for c in cons) and tps > self.best_observed:
            self.best_observed = tps
        chosen = self.exported()
        true = self.land.points[chosen] if chosen else None
        self.incumbent.append(true.tokens_per_s if true is not None and true.feasible else 0.0)
        self.observed.append(self.best_observed)
        return tps, cons


def _oracle(land: Landscape, seed: int, noise: float, confirm_runs: int) -> _Oracle:
    return _Oracle(land, random.Random(seed * 7919 + 1), noise, confirm_runs, random.Random(seed * 7919 + 2))


def _optuna_run(
    land: Landscape,
    space: SearchSpace,
    strategy: str,
    seed: int,
    budget: int,
    noise: float,
    warm: Sequence[TrialConfig] = (),
    confirm_runs: int = 0,
) -> Run:
    import optuna

    from autotune.tuner import A_CONFIG, A_CONSTRAINTS, A_MEASUREMENT, NATIVE_CONSTRAINTS, make_sampler

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    oracle = _oracle(land, seed, noise, confirm_runs)
    names = [c.name for c in land.spec.slo]
    study = optuna.create_study(direction="maximize", sampler=make_sampler(strategy, seed, len(names), space))
    for cfg in warm:  # as the tuner's warm start does: earlier winners first, then the sampler
        params = space.params_for(cfg)
        if params is not None:
            study.enqueue_trial(params)

    def constrain(trial: optuna.Trial, cons: list[float]) -> None:
        if NATIVE_CONSTRAINTS:
            for n, v in zip(names, cons, strict=True):
                trial.set_constraint(n, v)
        trial.set_user_attr(A_CONSTRAINTS, list(cons))  # as the tuner stores them

    def objective(trial: optuna.Trial) -> float:
        cfg = space.suggest(trial)
        got = oracle.measure(cfg) if space.check(cfg) is None else None
        if got is None:  # rejected by the rules (free in the live tuner too) or not in the table
            constrain(trial, [1.0] * len(names))
            raise optuna.TrialPruned()
        constrain(trial, got[1])
        # What the tuner stores and its samplers' tie-break reads (tuner.observations).
        trial.set_user_attr(A_CONFIG, cfg.model_dump(mode="json"))
        if not oracle.land.points[cfg.key()].failure:
            trial.set_user_attr(A_MEASUREMENT, {"output_tokens_per_s": got[0]})
        return got[0]

    attempts = 0
    while len(oracle.order) < budget and attempts < budget * 20:
        attempts += 1
        study.optimize(objective, n_trials=1)
        if strategy == "grid" and len(oracle.order) >= len(land.points):
            break
    return oracle.run(strategy, seed, budget)


def _hill_climb(
    land: Landscape,
    space: SearchSpace,
    seed: int,
    budget: int,
    noise: float,
    warm: Sequence[TrialConfig] = (),
    confirm_runs: int = 0,
) -> Run:
    """Coordinate hill-climbing in the style of Model Analyzer's quick search: start at the smallest
    config, measure every neighbour (one knob one step away; any other value for unordered knobs),
    move to the best feasible improvement, stop when none improves."""
    oracle = _oracle(land, seed, noise, confirm_runs)
    knobs = [k for k, v in space.values.items() if len(v) > 1]
    rng = random.Random(seed)
    current = {k: v[0] for k, v in space.values.items()}
    if warm:  # start from the earlier winner instead of the smallest config
        current = {k: getattr(warm[0], k) for k in space.values}
    cur_val = -math.inf

    def value(c: dict[str, Any]) -> float | None:
        cfg = TrialConfig(**c)
        if space.check(cfg) is not None:
            return None
        got = oracle.measure(cfg)
        if got is None or any(x > 0 for x in got[1]):
            return None
        return got[0]

    first = value(current)
    cur_val = first if first is not None else -math.inf
    while len(oracle.order) < budget:
        neighbours = []
        for k in knobs:
            vals = space.values[k]
            i = vals.index(current[k])
            steps = [i - 1, i + 1] if k in ("batch_size", "streams", "max_queue_delay_ms") else range(len(vals))
            neighbours += [{**current, k: vals[j]} for j in steps if 0 <= j < len(vals) and j != i]
        rng.shuffle(neighbours)
        best_n, best_v = None, cur_val
        for n in neighbours:
            if len(oracle.order) >= budget:
                break
            v = value(n)
            if v is not None and v > best_v:
                best_n, best_v = n, v
        if best_n is None:
            break
        current, cur_val = best_n, best_v
    return oracle.run("hill-climb", seed, budget)


def replay(
    land: Landscape,
    space: SearchSpace,
    strategies: Sequence[str],
    seeds: int,
    budget: int,
    warm: Sequence[TrialConfig] = (),
    confirm_runs: int = 0,
) -> list[Run]:
    """Every strategy against the table, ``seeds`` times, up to ``budget`` measured configs each;
    ``warm`` configs (see :func:`warm_configs`) are measured first, as the tuner's warm start does;
    with ``confirm_runs`` the incumbent is what the tuner would export after re-measuring
    would-be winners that many times (``budget.confirm_runs``; see ``_Oracle``)."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SpecError(f"unknown strategy {unknown[0]!r}; allowed: {', '.join(STRATEGIES)}")
    noise = land.spread()
    runs = []
    for strategy in strategies:
        for seed in range(seeds):
            if strategy == "hill-climb":
                runs.append(_hill_climb(land, space, seed, budget, noise, warm, confirm_runs))
            else:
                runs.append(_optuna_run(land, space, strategy, seed, budget, noise, warm, confirm_runs))
    return runs


def warm_configs(land: Landscape, earlier: Landscape, space: SearchSpace, top: int = 3) -> list[TrialConfig]:
    """The tuner's warm start, for replay: the ``top`` best feasible configs of an ``earlier``
    recording of the same model on the same hardware, best first, that this space can run."""
    if earlier.spec.model != land.spec.model:
        raise LandscapeError(f"warm start from another model ({earlier.spec.model}, not {land.spec.model})")
    if earlier.fingerprint != land.fingerprint:
        raise LandscapeError(
            f"warm start from other hardware ({earlier.fingerprint or '(none)'}, not {land.fingerprint}); "
            "the tuner only warm-starts from studies on the same hardware"
        )
    ranked = sorted((p for p in earlier.points.values() if p.feasible), key=lambda p: -p.tokens_per_s)
    return [p.config for p in ranked if space.check(p.config) is None and space.params_for(p.config)][:top]


def summarize(
    runs: list[Run],
    best: float,
    budget: int,
    patience: int | None = None,
    space: SearchSpace | None = None,
    noise: float = DEFAULT_NOISE,
) -> list[dict[str, Any]]:
    """Per strategy: median and 90th-percentile measured configs to reach each target (None: not
    reached within the budget in that share of seeds), the share of seeds reaching it, and median regret.
    With ``patience``, also what the stopping rule would have spent and kept: median configs measured
    before it stops, and the share of seeds whose incumbent at that point is within 99% of the best;
    with ``space`` as well, the same for the rule the tuner runs: patience *and* the surrogate's
    expected improvement below ``min_improvement_pct`` (``model_*`` keys)."""
    from autotune.surrogate import space_candidates

    model = (space_candidates(space), space.values) if space is not None and patience is not None else None
    rows = []
    curves: dict[str, dict[int, list[float]]] = {}
    for strategy in dict.fromkeys(r.strategy for r in runs):
        mine = [r for r in runs if r.strategy == strategy]
        row: dict[str, Any] = {"strategy": strategy, "seeds": len(mine), "missing": sum(r.missing for r in mine)}
        row["median_confirmations"] = statistics.median(r.confirmations for r in mine)
        for target in TARGETS:
            hits = sorted(math.inf if (t := r.trials_to(target, best)) is None else t for r in mine)
            pct = f"{round(target * 100)}"
            row[f"median_to_{pct}"] = _quantile(hits, 0.5)
            row[f"p90_to_{pct}"] = _quantile(hits, 0.9)
            row[f"reached_{pct}"] = sum(h != math.inf for h in hits) / len(hits)
        if patience is not None:
            stops = [r.patience_stop(patience) for r in mine]
            kept = [_kept(r, s, best) for r, s in zip(mine, stops, strict=True)]
            row["patience"] = patience
            row["patience_median_measured"] = statistics.median(stops)
            row["patience_reached_99"] = sum(k >= 0.99 for k in kept) / len(kept)
            if model is not None:
                stops = [r.patience_stop(patience, model=model, noise=noise) for r in mine]
                kept = [_kept(r, s, best) for r, s in zip(mine, stops, strict=True)]
                row["model_median_measured"] = statistics.median(stops)
                row["model_reached_99"] = sum(k >= 0.99 for k in kept) / len(kept)
        curves[strategy] = {r.seed: r.regret(best, budget) for r in mine}
        row["median_regret"] = [statistics.median(c[i] for c in curves[strategy].values()) for i in range(budget)]
        row["mean_regret"] = [statistics.fmean(c[i] for c in curves[strategy].values()) for i in range(budget)]
        rows.append(row)
    _compare_with_baselines(rows)
    _paired_with_baselines(rows, curves)
    return rows


#: The strategies issue 8's target is judged against: a model-based search must do better than these.
BASELINES = ("random", "hill-climb")


def _compare_with_baselines(rows: list[dict[str, Any]]) -> None:
    """With both baselines replayed, add to every other row the first budget from which its median
    regret stays at or below both baselines' (``below_baselines_from``; None: not even at the end)."""
    base = [r["median_regret"] for r in rows if r["strategy"] in BASELINES]
    if len(base) < len(BASELINES):
        return
    for row in rows:
        if row["strategy"] not in BASELINES:
            row["below_baselines_from"] = _stays_below(row["median_regret"], base)


def _stays_below(values: list[float], bases: list[list[float]]) -> int | None:
    """The first budget (1-based) from which ``values`` stay at or below every one of ``bases``."""
    ok = [all(v <= b[i] for b in bases) for i, v in enumerate(values)]
    first = len(ok)
    while first > 0 and ok[first - 1]:
        first -= 1
    return first + 1 if first < len(ok) else None


#: Two-sided z for the paired comparison's 95% interval.
_Z95 = 1.96


def _paired_with_baselines(rows: list[dict[str, Any]], curves: dict[str, dict[int, list[float]]]) -> None:
    """With both baselines replayed, compare every other row with each, seed for seed (a seed draws the
    same noise, and the random starts the same first configs, in every strategy): the mean regret
    difference at each budget and its 95% interval (``vs_<baseline>``: [mean, low, high]), the budgets
    at which the row is worse than a baseline beyond that interval (``worse_than_baselines_at``), and
    the first budget from which its mean regret stays at or below both (``mean_below_baselines_from``).

    The median regret of a few configs is a coin: where half the grid misses the SLO, one random
    config has median regret 1 and the hill-climb's safe first config wins; the mean is the expected
    regret, and the interval says whether a gap is more than the seeds' spread."""
    if any(b not in curves for b in BASELINES):
        return
    base_means = [r["mean_regret"] for r in rows if r["strategy"] in BASELINES]
    for row in rows:
        if row["strategy"] in BASELINES:
            continue
        mine = curves[row["strategy"]]
        budget = len(row["mean_regret"])
        worse: set[int] = set()
        for base in BASELINES:
            theirs = curves[base]
            seeds = sorted(mine.keys() & theirs.keys())
            diffs = []
            for i in range(budget):
                d = [mine[s][i] - theirs[s][i] for s in seeds]
                mean = statistics.fmean(d)
                half = _Z95 * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.inf
                diffs.append([mean, mean - half, mean + half])
                if mean - half > 0:
                    worse.add(i + 1)
            row[f"vs_{base}"] = diffs
        row["worse_than_baselines_at"] = sorted(worse)
        row["mean_below_baselines_from"] = _stays_below(row["mean_regret"], base_means)


def _kept(run: Run, stop: int, best: float) -> float:
    """The share of the best that ``run``'s incumbent holds after ``stop`` measured configs."""
    return run.incumbent[stop - 1] / best if stop and run.incumbent else 0.0


def _quantile(sorted_values: list[float], q: float) -> float | None:
    v = sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]
    return None if v == math.inf else v


#: Plotly's default colours, so a strategy's median and mean lines share one.
_COLOURS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880")


def regret_figure(rows: list[dict[str, Any]], title: str) -> dict[str, Any]:
    """Plotly figure: regret (1 - incumbent / best) against measured configs, per strategy: the median
    over seeds solid, the mean dotted (the two part where a few configs decide feasibility by chance)."""
    data = []
    for n, r in enumerate(rows):
        x = list(range(1, len(r["median_regret"]) + 1))
        colour = _COLOURS[n % len(_COLOURS)]
        for stat, dash in (("median", "solid"), ("mean", "dot")):
            if f"{stat}_regret" in r:
                data.append(
                    {
                        "type": "scatter",
                        "mode": "lines",
                        "name": f"{r['strategy']} ({stat})",
                        "legendgroup": r["strategy"],
                        "line": {"color": colour, "dash": dash},
                        "x": x,
                        "y": r[f"{stat}_regret"],
                    }
                )
    return {
        "data": data,
        "layout": {
            "title": {"text": title},
            "xaxis": {"title": {"text": "measured configs"}},
            "yaxis": {"title": {"text": "regret (1 - incumbent / best feasible)"}, "rangemode": "tozero"},
        },
    }
