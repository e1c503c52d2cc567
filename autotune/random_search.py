"""Random search without repeats over a study's finite space.

Optuna's ``RandomSampler`` draws with replacement: on a grid of 64 configs a 24-trial study spent
10 of its 34 trials on repeats of measured configs. A repeat is free for the budget (the tuner
copies the earlier measurement) but is still a trial: a sampler step and a dozen storage calls.
``BruteForceSampler`` avoids repeats but reads the trial list from the storage once per parameter.
This sampler draws one whole config per trial, uniformly among those no trial holds yet (finished
or running, in any worker), from a trial list already read: the tuner's own read before the trial
(``known_trials``), else the one Optuna caches for the trial. ``NoRepeatSampler`` puts the same
rule behind a model-based sampler (``sampler: gp``), after a few repeats in a row.

Both skip configs the space's rules reject (``allowed``, from :meth:`SearchSpace.runnable`): a
rejected trial is free for the budget, but Optuna's GP ignores pruned trials and proposed them
again and again (116 of the quickstart's 132 trials on a CPU with bf16, each a GP fit).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

#: Spaces up to this many configs are enumerated; larger ones are sampled until a free config turns up.
ENUMERATE_MAX = 20_000
_TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.FAIL)


class DistinctRandomSampler(optuna.samplers.BaseSampler):
    """Uniform random configs of ``distributions`` (parameter name -> distribution, as the space
    suggests them), none twice until every config has been drawn.

    ``known_trials``: returns a trial list the caller has just read (the tuner's step reads one
    before each trial), or None; the sampler then spares Optuna's own read of the list.
    ``allowed``: whether a config (parameter name -> value) may be proposed at all; while any
    allowed config is free, no other is drawn.
    ``stratify``: the first ``stratify`` configs (while fewer are taken) form a Latin hypercube, so
    a model's random start spans the space: each knob's values, in order, are cut into ``stratify``
    strata, and each of these configs takes another stratum of every knob, the strata dealt at
    random. Each config alone is still a uniform draw, as random search's are; together they cover
    small and large values of every knob without going to its corners. Replayed at 10% of the
    recorded CPU landscapes, 100 seeds each (``bench/sampler_variants.py``), ``sampler: gp``
    with this start came within 99% of the best in 66% / 88% / 17% / 74% of seeds on the
    quickstart's space, the 144- and 48-config grids and the quickstart's space with bf16,
    against 64% / 87% / 14% / 66% with a maximin start (each config farthest from those taken,
    which put the start in the corners, where the SLO is missed) and 49% / 91% / 10% / 75% with
    uniform draws; on the 48-config grid at 15 configs it lost (57% against maximin's 63%).
    """

    def __init__(
        self,
        distributions: dict[str, BaseDistribution],
        seed: int | None = None,
        known_trials: Callable[[], Sequence[FrozenTrial] | None] = lambda: None,
        allowed: Callable[[dict[str, Any]], bool] | None = None,
        stratify: int = 0,
    ) -> None:
        self.known_trials = known_trials
        self.allowed = allowed
        self.stratify = stratify
        self._deal: dict[str, list[int]] = {}
        self._distributions = distributions
        self._choices = {name: _choices(d) for name, d in distributions.items()}
        self._rng = random.Random(seed)
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._distributions)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        names = list(self._choices)
        return dict(zip(names, self._draw(names, self.taken(study, trial, names)), strict=True))

    def taken(self, study: optuna.Study, trial: FrozenTrial, names: Sequence[str]) -> set[tuple[Any, ...]]:
        """The configs (values of ``names``) other finished or running trials hold."""
        return self.holders(study, trial, names)[0]

    def holders(
        self, study: optuna.Study, trial: FrozenTrial, names: Sequence[str], fresh: bool = False
    ) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
        """The configs other trials hold: finished or running, and running only. ``fresh``: read
        from the storage now, not from the list read before the trial."""
        trials = None if fresh else self.known_trials()
        if trials is None:
            trials = study._get_trials(deepcopy=False, states=_TAKEN, use_cache=not fresh)
        taken: set[tuple[Any, ...]] = set()
        running: set[tuple[Any, ...]] = set()
        for t in trials:
            if t.number != trial.number and t.state in _TAKEN:
                combo = tuple(t.params.get(n) for n in names)
                taken.add(combo)
                if t.state == TrialState.RUNNING:
                    running.add(combo)
        return taken, running

    def ok(self, names: Sequence[str], combo: tuple[Any, ...]) -> bool:
        """``combo`` (values of ``names``) passes ``allowed``."""
        return self.allowed is None or self.allowed(dict(zip(names, combo, strict=True)))

    def _draw(
        self, names: Sequence[str], taken: set[tuple[Any, ...]], fixed: dict[str, Any] | None = None
    ) -> tuple[Any, ...]:
        """A config at random, free and allowed if one is; ``fixed``: values some parameters keep.
        In the start (``stratify``), one from the strata dealt to this start config if any is free
        and allowed there."""
        if not fixed and len(taken) < self.stratify:
            combo = self._pick(names, [self._stratum(n, len(taken)) for n in names], taken, strict=True)
            if combo is not None:
                return combo
        columns = [[fixed[n]] if fixed and n in fixed else self._choices[n] for n in names]
        combo = self._pick(names, columns, taken, strict=False)
        return combo if combo is not None else tuple(self._rng.choice(c) for c in columns)  # all taken: a repeat

    def _pick(
        self, names: Sequence[str], columns: list[list[Any]], taken: set[tuple[Any, ...]], strict: bool
    ) -> tuple[Any, ...] | None:
        """A free config of ``columns``' product at random: an allowed one if any (``strict``: only
        an allowed one), else any free one; None if there is none."""
        if math.prod(len(c) for c in columns) <= ENUMERATE_MAX:
            free = [combo for combo in itertools.product(*columns) if combo not in taken]
            pool = [combo for combo in free if self.ok(names, combo)] or ([] if strict else free)
            return self._rng.choice(pool) if pool else None
        for _ in range(1000):
            combo = tuple(self._rng.choice(c) for c in columns)
            if combo not in taken and self.ok(names, combo):
                return combo
        return None

    def _stratum(self, name: str, k: int) -> list[Any]:
        """The values of ``name`` in the stratum dealt to the ``k``-th start config (every value
        where the knob has fewer values than strata and this stratum got none)."""
        values = self._choices[name]
        if name not in self._deal:
            self._deal[name] = self._rng.sample(range(self.stratify), self.stratify)
        s = self._deal[name][k]
        return [v for i, v in enumerate(values) if i * self.stratify // len(values) == s] or values

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        """Parameters outside the space (none from :meth:`SearchSpace.suggest`): plain random."""
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)


def _choices(d: BaseDistribution) -> list[Any]:
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, optuna.distributions.IntDistribution):
        return list(range(d.low, d.high + 1, d.step))
    raise TypeError(f"DistinctRandomSampler needs categorical or integer parameters, not {type(d).__name__}")


#: Scores candidate configs (Optuna parameters) from the study's trials, higher first; None when
#: it cannot tell yet. See :func:`autotune.tuner.surrogate_rank`.
Rank = Callable[[Sequence[FrozenTrial], list[dict[str, Any]]], Sequence[float] | None]


class NoRepeatSampler(optuna.samplers.BaseSampler):
    """``base``'s proposals, except that after ``allow`` proposals in a row of configs some trial
    already holds (None: any number), the next one is replaced by the nearest config none holds
    (each parameter's position among its choices scaled to 0-1). A proposal ``distinct.allowed``
    refuses is replaced at once by the nearest allowed one. Ties go to ``rank``'s best, else to
    chance: Optuna's GP never sees a refused config measured, so on the quickstart's space it kept
    proposing onnxruntime with int8, whose nearest runnable configs tie (int8 on eager, unquantized
    on onnxruntime). Replayed over 300 seeds, ranking ties by the surrogate's constrained EI lifted
    the seeds within 99% of the best after 14 configs from 46% (a coin) to 56%.

    A repeat is not measured again (the tuner copies the earlier result), so a model that keeps
    proposing its incumbent spends trials, model fits and storage calls for nothing, and ends the
    study at the tuner's attempt cap with its budget unspent. The nearest free config keeps to
    where the model is looking.

    What the base leaves to chance (its random start, NSGA-II's mutations) is drawn by
    ``distinct`` among the free configs the rules allow: Optuna draws each parameter on its own,
    so half the quickstart's random start on a CPU with bf16 was configs the rules reject, and
    every worker of a shared study, seeded alike, drew the same ones.

    With other workers measuring (trials RUNNING in other processes), a config one of them holds is
    replaced at once: it would be measured twice, since nothing is copied from an unfinished trial.
    """

    def __init__(
        self,
        base: optuna.samplers.BaseSampler,
        distinct: DistinctRandomSampler,
        allow: int | None = 2,
        rank: Rank | None = None,
    ) -> None:
        self.base, self.distinct, self.allow, self.rank = base, distinct, allow, rank
        self._repeats = 0
        self._base_space: dict[str, BaseDistribution] | None = None  # the base's own, for this trial
        self._shared = False  # other trials are running: read the list again after the base's fit

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self.distinct.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        self._base_space = self.base.infer_relative_search_space(study, trial)
        names = list(self.distinct._choices)
        self._shared = bool(self.distinct.holders(study, trial, names)[1])
        # Every parameter is relative: what the base does not propose, ``distinct`` draws.
        return {**self._base_space, **self.distinct._distributions}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        own = self._base_space if self._base_space is not None else search_space
        self._base_space = None
        params = self.base.sample_relative(study, trial, own)
        names = list(self.distinct._choices)
        # Shared: read again, after the model's fit, for what the other workers took meanwhile.
        taken, running = self.distinct.holders(study, trial, names, fresh=self._shared)
        if not set(names) <= set(params):
            # What the base leaves to chance (its random start; NSGA-II's mutated parameters) is
            # drawn here among the free configs the rules allow, keeping what the base chose.
            fixed = {n: params[n] for n in names if n in params}
            params = {**params, **dict(zip(names, self.distinct._draw(names, taken, fixed), strict=True))}
        proposal = tuple(params[n] for n in names)
        if self.distinct.ok(names, proposal):
            if proposal not in taken:
                self._repeats = 0
                return params
            if proposal not in running and (self.allow is None or self._repeats < self.allow):
                self._repeats += 1
                return params
            self._repeats = 0
        nearest = self._nearest(names, proposal, taken, study)
        return params if nearest is None else {**params, **dict(zip(names, nearest, strict=True))}

    def _nearest(
        self, names: Sequence[str], proposal: tuple[Any, ...], taken: set[tuple[Any, ...]], study: optuna.Study
    ) -> tuple[Any, ...] | None:
        columns = [self.distinct._choices[n] for n in names]
        if math.prod(len(c) for c in columns) > ENUMERATE_MAX:
            return self.distinct._draw(names, taken)
        scale = [max(len(c) - 1, 1) for c in columns]
        where = [c.index(v) / s for c, v, s in zip(columns, proposal, scale, strict=True)]
        best: list[tuple[Any, ...]] = []
        best_d = math.inf
        for at in itertools.product(*(range(len(c)) for c in columns)):
            combo = tuple(c[i] for c, i in zip(columns, at, strict=True))
            if combo in taken or not self.distinct.ok(names, combo):
                continue
            d = sum(abs(i / s - w) for i, s, w in zip(at, scale, where, strict=True))
            if d < best_d - 1e-12:
                best, best_d = [combo], d
            elif abs(d - best_d) <= 1e-12:
                best.append(combo)
        if len(best) > 1 and self.rank is not None:
            trials = self.distinct.known_trials()
            if trials is None:
                trials = study._get_trials(deepcopy=False, states=_TAKEN, use_cache=True)
            scores = self.rank(trials, [dict(zip(names, combo, strict=True)) for combo in best])
            if scores is not None:
                return best[max(range(len(best)), key=lambda i: scores[i])]
        return self.distinct._rng.choice(best) if best else None

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.base.after_trial(study, trial, state, values)
