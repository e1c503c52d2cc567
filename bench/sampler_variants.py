"""Sampler variants replayed against the recorded landscapes and kept out of the tuner.

The figures behind `bench/FIGURES.md`'s "Tried on these replays and dropped": each variant below is a
sampler the tuner could use instead of ``sampler: gp``, replayed seed for seed against the same
table and noise as the committed one (``gp``, run alongside as the reference). A variant patches
``autotune.tuner.make_sampler`` in this process only; the replay and its summary are
``autotune landscape replay``'s own.

    python bench/sampler_variants.py bench/landscapes/cpu-quickstart.json [--seeds 100] [--budget N]
        [--variants gp,gp-uniform,...]   # the default: all of the variants below
        [--confirm-runs C]               # re-measure would-be winners, as the tuner does (default 1 there)

With ``random`` and ``hill-climb`` among the variants (the replay's own strategies), each other row
also says from which config on its median regret stays at or below both (issue 8's "better than
random search and coordinate hill-climbing at every budget").

Variants:
  cei        after gp's random start, the free runnable config with the largest constrained expected
             improvement under ``autotune/surrogate.py``'s numpy GP (no Optuna GP at all).
  gp-clip    gp, but Optuna's GP sees each infeasible trial's throughput cut to the best feasible
             one's, so a fast region past the SLO stops looking like a gold mine to its EI.
  gp-log     gp, but Optuna's GP is fitted on log throughput: knobs act on throughput by factors
             (a batch size doubled, a faster backend), which a log scale turns into sums.
  gp-learn   gp, but each proposal the rules refuse is shown to Optuna's GP as an infeasible trial at
             the proposed config (with the throughput of the config measured instead), so its
             constraint model learns the refused corner instead of proposing it again.
  gp-refine  gp, but the last REFINE (3) configs of the budget go to the incumbent's unmeasured
             neighbours (one knob one step away), largest constrained expected improvement first.
  gp-uniform gp with the random start of commit 7bd0783 and before: configs drawn uniformly among
             the free runnable ones (``DistinctRandomSampler(stratify=0)``).
  gp-maximin gp with the spread start of commits 95d6cf0 to e7242bc: after the first random config,
             each start config is one of the free runnable configs farthest from every config taken
             (ordered knobs by position scaled to 0-1, the others 0 or 1 apart). The variants below
             marked (maximin) build on it, as they were tried when it was the default.
  gp-first-smallest  (maximin) gp's spread start, but its first config is the space's smallest (every knob's
             first value, as the hill-climb starts), not drawn at random.
  gp-first-middle  the same with ordered knobs at their middle value (unordered ones first).
  gp-baseline  (maximin) gp's start of 3, but its first config is the smallest (the naive baseline: batch 1,
             no quantization, 1 stream...), and the other two are spread as if the baseline were not
             there (the second at random, the third far from it): the incumbent starts where the
             hill-climb's does, without fixing the rest of the start.
  gp-baseline4  the same with a start of 4: the baseline and three spread configs.
  gp-lhs-safe  gp's Latin-hypercube start, but its first config is the smallest (every knob's first value, where
             the hill-climb starts, the config most likely to meet a latency SLO), and it takes the first
             stratum of every knob: the other two start configs take the other strata.
  gp-rank-mean  gp, but a refused or repeated proposal's equally near replacements are ranked by the numpy
             surrogate's predicted throughput times the probability that the SLO holds (exploit) instead
             of its constrained expected improvement (which favours the uncertain ones: on a CPU with bf16
             the quickstart spent 4 of 16 trials on bf16 eager configs, each half as fast as the incumbent).
  gp-spread-kinds  (maximin) gp with a start spread over the unordered knobs only (backend, quantization,
             precision: maximin on those, ordered knobs at random).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import save

from autotune import landscape as L
from autotune import tuner as T
from autotune.hardware import Hardware
from autotune.random_search import ENUMERATE_MAX, DistinctRandomSampler, NoRepeatSampler
from autotune.space import ORDINAL_KNOBS, SearchSpace
from autotune.surrogate import _GP, DEFAULT_NOISE, Encoder, Observation, _norm_cdf, constrained_ei

VARIANTS = (
    "gp",
    "gp-uniform",
    "gp-spread-kinds",
    "cei",
    "gp-learn",
    "gp-refine",
    "gp-first-smallest",
    "gp-first-middle",
    "gp-clip",
    "gp-log",
    "gp-baseline",
    "gp-baseline4",
    "gp-maximin",
    "gp-lhs-safe",
    "gp-rank-mean",
)
#: Measured configs at the end of the budget that gp-refine spends on the incumbent's neighbours.
REFINE = 3


def _free(sampler: DistinctRandomSampler, study: optuna.Study, trial: FrozenTrial) -> tuple[list[str], set]:
    names = list(sampler._choices)
    return names, sampler.taken(study, trial, names)


class Maximin(DistinctRandomSampler):
    """The spread start (see gp-maximin), as ``DistinctRandomSampler(spread=True)`` drew it until e7242bc."""

    def _draw(
        self, names: Sequence[str], taken: set[tuple[Any, ...]], fixed: dict[str, Any] | None = None
    ) -> tuple[Any, ...]:
        columns = [[fixed[n]] if fixed and n in fixed else self._choices[n] for n in names]
        if not fixed and taken and math.prod(len(c) for c in columns) <= ENUMERATE_MAX:
            free = [combo for combo in itertools.product(*columns) if combo not in taken]
            pool = [combo for combo in free if self.ok(names, combo)] or free
            if pool:
                return self._rng.choice(self._farthest(names, pool, taken))
        return super()._draw(names, taken, fixed)

    def _farthest(
        self, names: Sequence[str], pool: list[tuple[Any, ...]], taken: set[tuple[Any, ...]]
    ) -> list[tuple[Any, ...]]:
        """The configs of ``pool`` whose distance to the nearest taken config is largest."""
        columns = [self._choices[n] for n in names]
        ordinal = [isinstance(self._distributions[n], IntDistribution) for n in names]
        span = [max(len(c) - 1, 1) for c in columns]
        where = [{v: i / s for i, v in enumerate(c)} for c, s in zip(columns, span, strict=True)]

        def apart(a: tuple[Any, ...], b: tuple[Any, ...]) -> float:
            return sum(
                abs(w[x] - w[y]) if o else float(x != y) for w, o, x, y in zip(where, ordinal, a, b, strict=True)
            )

        held = [t for t in taken if all(v in w for v, w in zip(t, where, strict=True))]
        if not held:
            return pool
        far = [min(apart(c, t) for t in held) for c in pool]
        top = max(far)
        return [c for c, d in zip(pool, far, strict=True) if d >= top - 1e-12]


class SpreadKinds(Maximin):
    """A spread start that counts only unordered knobs apart (see gp-spread-kinds)."""

    def _farthest(
        self, names: Sequence[str], pool: list[tuple[Any, ...]], taken: set[tuple[Any, ...]]
    ) -> list[tuple[Any, ...]]:
        kinds = [i for i, n in enumerate(names) if not isinstance(self._distributions[n], IntDistribution)]
        if not kinds:
            return pool
        far = [min(sum(c[i] != t[i] for i in kinds) for t in taken) for c in pool]
        return [c for c, d in zip(pool, far, strict=True) if d == max(far)]


class FirstFixed(Maximin):
    """gp's spread start, whose first config is fixed instead of drawn (see gp-first-*)."""

    def __init__(self, *args: Any, where: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.where = where

    def _draw(
        self, names: Sequence[str], taken: set[tuple[Any, ...]], fixed: dict[str, Any] | None = None
    ) -> tuple[Any, ...]:
        if taken or fixed:
            return super()._draw(names, taken, fixed)
        pick = []
        for n in names:
            values = self._choices[n]
            middle = self.where == "middle" and isinstance(self._distributions[n], IntDistribution)
            pick.append(values[(len(values) - 1) // 2] if middle else values[0])
        combo = tuple(pick)
        return combo if self.ok(names, combo) else super()._draw(names, taken, fixed)


class BaselineFirst(FirstFixed):
    """A start whose first config is the smallest (the naive baseline), the rest spread as if it were not
    there (see gp-baseline): the baseline anchors the incumbent without fixing the other start configs."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, where="smallest", **kw)

    def _farthest(
        self, names: Sequence[str], pool: list[tuple[Any, ...]], taken: set[tuple[Any, ...]]
    ) -> list[tuple[Any, ...]]:
        rest = taken - {tuple(self._choices[n][0] for n in names)}
        return super()._farthest(names, pool, rest) if rest else pool


class SafeFirst(DistinctRandomSampler):
    """gp's Latin-hypercube start with the smallest config first, in the first stratum of every knob
    (see gp-lhs-safe)."""

    def _draw(
        self, names: Sequence[str], taken: set[tuple[Any, ...]], fixed: dict[str, Any] | None = None
    ) -> tuple[Any, ...]:
        if not taken and not fixed and self.stratify:
            combo = tuple(self._choices[n][0] for n in names)
            if self.ok(names, combo):
                for n in names:
                    self._deal[n] = [0, *self._rng.sample(range(1, self.stratify), self.stratify - 1)]
                return combo
        return super()._draw(names, taken, fixed)


def predicted_feasible_throughput(
    seen: Sequence[Observation], configs: Sequence[Any], space: SearchSpace
) -> np.ndarray:
    """The numpy surrogate's mean throughput at ``configs`` times the probability every SLO clause holds."""
    encode = Encoder(space.values, ORDINAL_KNOBS)
    xs = encode(configs)
    ran = [o for o in seen if not o.failed]
    y = np.array([o.tokens_per_s for o in ran])
    mu, _ = _GP(encode([o.config for o in ran]), y, DEFAULT_NOISE * float(np.mean(y))).predict(xs)
    score = np.maximum(mu, 0.0)
    x_all = encode([o.config for o in seen])
    for j in range(len(seen[0].constraints)):
        c = np.array([min(float(o.constraints[j]), 1.0) for o in seen])
        c_mu, c_sd = _GP(x_all, c, DEFAULT_NOISE).predict(xs)
        score = score * _norm_cdf(-c_mu / np.maximum(c_sd, 1e-9))
    return score


def mean_rank(space: SearchSpace) -> Callable[[Sequence[FrozenTrial], list[dict[str, Any]]], list[float] | None]:
    """``tuner.surrogate_rank`` with :func:`predicted_feasible_throughput` in place of constrained EI."""

    def rank(trials: Sequence[FrozenTrial], candidates: list[dict[str, Any]]) -> list[float] | None:
        seen = T.observations(trials)
        if len(seen) < 2 or not [o for o in seen if not o.failed]:
            return None
        configs = [space.config_for(p) for p in candidates]
        return predicted_feasible_throughput(seen, configs, space).tolist()

    return rank


class CeiSampler(DistinctRandomSampler):
    """Random start as gp's, then the argmax of the numpy surrogate's constrained EI over free configs."""

    def __init__(self, space: SearchSpace, seed: int) -> None:
        super().__init__(space.distributions(), seed=seed, allowed=space.runnable())
        self.space = space

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        names, taken = _free(self, study, trial)
        seen = T.observations(study._get_trials(deepcopy=False, use_cache=True))
        free = [c for c in itertools.product(*self._choices.values()) if c not in taken and self.ok(names, c)]
        if len(seen) < T.GP_STARTUP_TRIALS or not free:
            return dict(zip(names, self._draw(names, taken), strict=True))
        configs = [self.space.config_for(dict(zip(names, c, strict=True))) for c in free]
        score = constrained_ei(seen, configs, self.space.values, ORDINAL_KNOBS)
        return dict(zip(names, free[int(np.argmax(score))], strict=True))


class _View:
    """A study as Optuna's GP reads it: everything the study's, except ``_get_trials`` in subclasses."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class _WithRefused(_View):
    """A study as Optuna's GP reads it, plus one infeasible pseudo-trial per refused proposal."""

    def __init__(self, study: optuna.Study, refused: Sequence[tuple[int, dict[str, Any]]]) -> None:
        self._study, self._refused = study, refused

    def _get_trials(self, deepcopy: bool = False, states: Any = None, use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        if states is not None and TrialState.COMPLETE not in states:
            return trials
        done = {t.number: t for t in trials if t.state == TrialState.COMPLETE}
        extra = [
            create_trial(
                value=t.value,
                params=params,
                distributions={k: t.distributions[k] for k in params},
                constraints={k: max(1.0, v) for k, v in t.constraints.items()},
            )
            for number, params in self._refused
            if (t := done.get(number)) is not None
        ]
        return list(trials) + extra


class _Clipped(_View):
    """A study as Optuna's GP reads it, each infeasible trial's throughput cut to the best feasible one."""

    def _get_trials(self, deepcopy: bool = False, states: Any = None, use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.constraints]
        feasible = [t.value for t in done if t.value is not None and all(c <= 0 for c in t.constraints.values())]
        if not feasible:
            return trials
        cap = max(feasible)
        over = {t.number for t in done if any(c > 0 for c in t.constraints.values())}
        out = []
        for t in trials:
            if t.number in over and t.value is not None and t.value > cap:
                t = create_trial(
                    value=cap, params=t.params, distributions=t.distributions, constraints=dict(t.constraints)
                )
            out.append(t)
        return out


class _Logged(_View):
    """A study as Optuna's GP reads it, each complete trial's throughput on a log scale."""

    def _get_trials(self, deepcopy: bool = False, states: Any = None, use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        floor = min((v for v in values if v > 0), default=1.0) / 2
        return [
            create_trial(
                value=float(np.log(max(t.value or 0.0, floor))),
                params=t.params,
                distributions=t.distributions,
                constraints=dict(t.constraints),
            )
            if t.state == TrialState.COMPLETE
            else t
            for t in trials
        ]


class _Wrapped(optuna.samplers.BaseSampler):
    """Optuna's GP (``base``) behind a variant that changes only what its ``sample_relative`` reads."""

    base: optuna.samplers.BaseSampler

    def reseed_rng(self) -> None:
        self.base.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.base.infer_relative_search_space(study, trial)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, name: str, dist: BaseDistribution) -> Any:
        return self.base.sample_independent(study, trial, name, dist)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self.base.after_trial(study, trial, state, values)


class OnView(_Wrapped):
    """``base`` (Optuna's GP) fitted on ``view(study)`` instead of the study (gp-clip, gp-log)."""

    def __init__(self, base: optuna.samplers.BaseSampler, view: Callable[[optuna.Study], Any]) -> None:
        self.base, self.view = base, view

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.base.sample_relative(self.view(study), trial, search_space)


class LearnRefused(_Wrapped):
    """``base`` (Optuna's GP) fitted on the trials plus the proposals the rules refused (see module doc)."""

    def __init__(self, base: optuna.samplers.BaseSampler, distinct: DistinctRandomSampler) -> None:
        self.base, self.distinct = base, distinct
        self.refused: list[tuple[int, dict[str, Any]]] = []

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        params = self.base.sample_relative(_WithRefused(study, self.refused), trial, search_space)  # type: ignore[arg-type]
        names = list(self.distinct._choices)
        if set(names) <= set(params) and not self.distinct.ok(names, tuple(params[n] for n in names)):
            self.refused.append((trial.number, {n: params[n] for n in names}))
        return params


class RefineSampler(NoRepeatSampler):
    """gp, except that the last :data:`REFINE` measured configs of ``budget`` are the incumbent's neighbours."""

    def __init__(self, gp: NoRepeatSampler, space: SearchSpace, budget: int) -> None:
        super().__init__(gp.base, gp.distinct, allow=gp.allow, rank=gp.rank)
        self.space, self.budget = space, budget

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        seen = T.observations(study._get_trials(deepcopy=False, use_cache=True))
        feasible = [o for o in seen if not o.failed and all(c <= 0 for c in o.constraints)]
        if len({o.config.key() for o in seen}) >= self.budget - REFINE and feasible:
            best = self.space.params_for(max(feasible, key=lambda o: o.tokens_per_s).config) or {}
            names, taken = _free(self.distinct, study, trial)
            near = []
            for n in names:
                values = self.distinct._choices[n]
                i = values.index(best[n])
                ordinal = isinstance(self.distinct._distributions[n], IntDistribution)
                for j in (i - 1, i + 1) if ordinal else range(len(values)):
                    combo = tuple({**best, n: values[j]}[m] for m in names) if 0 <= j < len(values) else None
                    if combo and j != i and combo not in taken and self.distinct.ok(names, combo):
                        near.append(combo)
            if near:
                configs = [self.space.config_for(dict(zip(names, c, strict=True))) for c in near]
                score = constrained_ei(seen, configs, self.space.values, ORDINAL_KNOBS)
                self._base_space = None
                return dict(zip(names, near[int(np.argmax(score))], strict=True))
        return super().sample_relative(study, trial, search_space)


def patch(budget: int) -> None:
    """Teach ``make_sampler`` (and the replay's strategy list) the variants, for this process."""
    committed = T.make_sampler

    def make_sampler(name: str, seed: int, n_constraints: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
        if name == "cei":
            return CeiSampler(space, seed)
        if name in ("gp-uniform", "gp-maximin", "gp-spread-kinds"):
            gp = committed("gp", seed, n_constraints, space)
            assert isinstance(gp, NoRepeatSampler)
            kind = {"gp-uniform": DistinctRandomSampler, "gp-maximin": Maximin, "gp-spread-kinds": SpreadKinds}[name]
            draws = kind(space.distributions(), seed=seed, allowed=space.runnable())
            return NoRepeatSampler(gp.base, draws, allow=gp.allow, rank=gp.rank)
        if name == "gp-rank-mean":
            gp = committed("gp", seed, n_constraints, space)
            assert isinstance(gp, NoRepeatSampler)
            return NoRepeatSampler(gp.base, gp.distinct, allow=gp.allow, rank=mean_rank(space))
        if name == "gp-lhs-safe":
            gp = committed("gp", seed, n_constraints, space)
            assert isinstance(gp, NoRepeatSampler)
            safe = SafeFirst(space.distributions(), seed=seed, allowed=space.runnable(), stratify=gp.distinct.stratify)
            return NoRepeatSampler(gp.base, safe, allow=gp.allow, rank=gp.rank)
        if name.startswith("gp-first-"):
            gp = committed("gp", seed, n_constraints, space)
            assert isinstance(gp, NoRepeatSampler)
            first = FirstFixed(space.distributions(), seed=seed, allowed=space.runnable(), where=name.split("-")[-1])
            return NoRepeatSampler(gp.base, first, allow=gp.allow, rank=gp.rank)
        if name in ("gp-baseline", "gp-baseline4"):
            startup = T.GP_STARTUP_TRIALS
            T.GP_STARTUP_TRIALS = 4 if name == "gp-baseline4" else startup
            try:
                gp = committed("gp", seed, n_constraints, space)
            finally:
                T.GP_STARTUP_TRIALS = startup
            assert isinstance(gp, NoRepeatSampler)
            first = BaselineFirst(space.distributions(), seed=seed, allowed=space.runnable())
            return NoRepeatSampler(gp.base, first, allow=gp.allow, rank=gp.rank)
        if name in ("gp-clip", "gp-log"):
            gp = committed("gp", seed, n_constraints, space)
            assert isinstance(gp, NoRepeatSampler)
            wrapped = OnView(gp.base, _Clipped if name == "gp-clip" else _Logged)
            return NoRepeatSampler(wrapped, gp.distinct, allow=gp.allow, rank=gp.rank)
        if name in ("gp-learn", "gp-refine"):
            gp = committed("gp", seed, n_constraints, space)
            assert isinstance(gp, NoRepeatSampler)
            if name == "gp-refine":
                return RefineSampler(gp, space, budget)
            return NoRepeatSampler(LearnRefused(gp.base, gp.distinct), gp.distinct, allow=gp.allow, rank=gp.rank)
        return committed(name, seed, n_constraints, space)

    T.make_sampler = make_sampler
    L.STRATEGIES = tuple(dict.fromkeys(L.STRATEGIES + VARIANTS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("landscape", type=Path)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--budget", type=int, help="measured configs per run [default: 10%% of the runnable grid]")
    ap.add_argument("--confirm-runs", type=int, default=0, help="as `autotune landscape replay --confirm-runs`")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    land = L.load_landscape(args.landscape)
    hw = Hardware.model_validate({k: v for k, v in land.hardware.items() if k != "fingerprint"})
    space = SearchSpace.from_spec(land.spec, hw, None)
    best = land.best_feasible()
    assert best is not None, "no feasible config recorded"
    budget = args.budget or max(1, round(0.1 * land.grid_size))
    patch(budget)
    runs, took = [], {}
    for variant in args.variants.split(","):
        start = time.perf_counter()
        mine = L.replay(land, space, [variant], args.seeds, budget, confirm_runs=args.confirm_runs)
        runs += mine
        took[variant] = round(time.perf_counter() - start, 1)
        row = L.summarize(mine, best.tokens_per_s, budget)[0]
        print(
            f"{args.landscape.name} {variant}: within 99% in {row['reached_99']:.0%} of {args.seeds} seeds "
            f"(median {row['median_to_99'] or f'>{budget}'}), within 95% in {row['reached_95']:.0%}; "
            f"median regret at the end {row['median_regret'][-1]:.3f} [{took[variant]:.0f} s]",
            flush=True,
        )
    rows = L.summarize(runs, best.tokens_per_s, budget)  # with random and hill-climb, compared with both
    for row in rows:
        row["replay_s"] = took[row["strategy"]]
        if "below_baselines_from" in row:
            print(
                f"{row['strategy']}: regret at or below random's and the hill-climb's from config "
                f"{row['below_baselines_from']} (median), {row['mean_below_baselines_from']} (mean); "
                f"worse than one beyond the seeds' spread at configs {row['worse_than_baselines_at'] or 'none'}"
            )
    path = save(
        "sampler-variants",
        {
            "landscape": str(args.landscape),
            "budget": budget,
            "seeds": args.seeds,
            "confirm_runs": args.confirm_runs,
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
