"""How a study that searches several engines spends its budget among them.

A study with ``engine: [builtin, vllm, ctranslate2]`` is a race between engines, and a plain
sampler runs it badly: on a 2-core CPU, TPE gave CTranslate2 3 of 21 trials (it came within 1%
of the winner at batch 32, a batch it never tried) and vLLM 6, each a 32-48 s server start, while
vLLM's best was 0.40x the others'. So before the sampler takes over, every engine is **probed**
near where throughput peaks under the SLO, ``budget.engine_probes`` trials each, round robin: the
first at a large batch (60% up the batch sizes it runs) in its lightest precision and
quantization (fewest bytes per weight), the next two batch sizes up if that one met the SLO, two
down if not, in the pair most unlike the earlier probes' (another quantization, else another
precision), the sampler drawing the other knobs. Once every engine's probes are measured, an
engine whose best measurement, feasible or not, is under ``budget.engine_keep`` of the best
feasible figure any engine reached is **dropped**: the sampler proposes only the engines still in
the race (a proposal of a dropped one is replaced by the nearest config of a kept one). An engine
can be dropped later too, as the leader improves. With it, on a 2-core CPU with AVX-512 bf16
(``python bench/engines.py``), the study gave CTranslate2 11 of 24 trials and vLLM 3, and its
winner (CTranslate2 b32 int8 x2) ran at 1.26x the best hand-picked peer config.

The plan is a function of the trial list alone (finished and running trials), so a resumed study
and several workers of one study follow the same plan, and the rule for a trial in progress is
the one its step computed: ``EngineRace.plan`` before each trial, ``EngineRace.allows`` from the
sampler. Samplers that enumerate (``grid``) do not race.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from autotune.config import TrialConfig
    from autotune.space import SearchSpace

#: Where an engine's first probe sits among the space's batch sizes (0: smallest, 1: largest).
FIRST_PROBE_AT = 0.6
#: How many batch-size ranks the next probe moves: up after a probe that met the SLO, else down.
PROBE_STEP = 2


#: The trial attribute that marks a probe (its description).
A_PROBE = "engine_probe"
#: What a probe fixes: engine, batch size, precision, quantization (the sampler draws the rest).
Point = tuple[str, int, str, str]


@dataclass(frozen=True)
class Standing:
    """One engine's trials so far."""

    engine: str
    spent: int  # trials measured or failed for good
    running: int
    best_feasible: float | None  # tokens/s of its best trial that met the SLO
    best_any: float  # tokens/s of its best measurement, feasible or not (0.0: none measured)
    best_trial: int | None  # the trial of best_feasible
    best_any_trial: int | None  # the trial of best_any (None: every trial failed)


@dataclass(frozen=True)
class Plan:
    """What the next trial may run: ``probe`` (an engine and batch size) or the ``kept`` engines."""

    kept: tuple[str, ...]
    dropped: dict[str, str] = field(default_factory=dict)  # engine -> why
    probe: Point | None = None
    probe_number: int = 0  # which of the engine's probes (1-based)

    def describe(self) -> str | None:
        if self.probe is None:
            return None
        engine, batch, precision, quantization = self.probe
        form = precision if quantization == "none" else f"{precision} {quantization}"
        return f"probe {self.probe_number} of engine {engine}: batch {batch}, {form}"


@dataclass
class EngineRace:
    """The budget split between a study's engines (see the module docstring)."""

    engines: list[str]
    batches: dict[str, list[int]]  # engine -> the batch sizes it runs in this space, ascending
    forms: dict[str, list[tuple[str, str]]]  # engine -> the (precision, quantization) pairs it runs here
    probes: int
    keep: float
    space: SearchSpace | None = None  # maps Optuna parameters to configs in :meth:`allows`
    plan_now: Plan | None = None
    _keys: dict[tuple[Any, ...], Point] = field(default_factory=dict)

    @classmethod
    def for_study(cls, space: SearchSpace, budget: int, probes: int, keep: float) -> EngineRace | None:
        """The race for ``space``'s engines, or None when it searches one engine (or probes is 0).
        With a budget too small for every engine's probes and a search after them, each gets one."""
        engines = list(space.values.get("engine", ["builtin"]))
        if len(engines) < 2 or probes < 1:
            return None
        probes = min(probes, max(1, budget // (2 * len(engines))))
        every = sorted(space.values.get("batch_size", [1]))
        batches: dict[str, set[int]] = {e: set() for e in engines}
        forms: dict[str, set[tuple[str, str]]] = {e: set() for e in engines}
        for cfg in space.grid():
            if space.check(cfg) is None:
                batches[cfg.engine].add(cfg.batch_size)
                forms[cfg.engine].add((cfg.precision, cfg.quantization))
        return cls(
            engines,
            {e: sorted(batches[e]) or every for e in engines},
            {e: sorted(forms[e], key=_weight_bytes) for e in engines},
            probes,
            keep,
            space,
        )

    # -- what happened --------------------------------------------------------------------------
    def standings(self, trials: Sequence[FrozenTrial]) -> dict[str, Standing]:
        out: dict[str, Standing] = {}
        for engine in self.engines:
            mine = [t for t in trials if _engine_of(t) == engine]
            spent = [t for t in mine if _spent(t)]
            measured = [(t, _tokens_per_s(t)) for t in spent if t.state == TrialState.COMPLETE]
            feasible = [(t, v) for t, v in measured if t.user_attrs.get("feasible")]
            top = max(feasible, key=lambda tv: tv[1], default=None)
            top_any = max(measured, key=lambda tv: tv[1], default=None)
            out[engine] = Standing(
                engine,
                len(spent),
                sum(t.state == TrialState.RUNNING for t in mine),
                top[1] if top is not None else None,
                top_any[1] if top_any is not None else 0.0,
                top[0].number if top is not None else None,
                top_any[0].number if top_any is not None else None,
            )
        return out

    # -- what comes next ------------------------------------------------------------------------
    def plan(self, trials: Sequence[FrozenTrial]) -> Plan:
        """The rule for the next trial, from every trial so far (held as :attr:`plan_now`)."""
        self.plan_now = self._plan(trials)
        return self.plan_now

    def _plan(self, trials: Sequence[FrozenTrial]) -> Plan:
        stand = self.standings(trials)
        dropped = self._dropped(stand, probing=any(s.spent < self.probes for s in stand.values()))
        kept = tuple(e for e in self.engines if e not in dropped)
        probe: Point | None = None
        number = 0
        # Round robin: every engine's first probe before any engine's second.
        for e in sorted(kept, key=lambda e: (stand[e].spent + stand[e].running, self.engines.index(e))):
            held = stand[e].spent + stand[e].running
            if held < self.probes:
                probe, number = self._probe(e, trials), held + 1
                break
        return Plan(kept, dropped, probe, number)

    def _dropped(self, stand: dict[str, Standing], probing: bool) -> dict[str, str]:
        if probing:
            return {}
        leader = max(stand.values(), key=lambda s: s.best_feasible or 0.0)
        if not leader.best_feasible:
            return {}  # nothing met the SLO yet: no engine is known to be behind
        why: dict[str, str] = {}
        for s in stand.values():
            if s.engine == leader.engine or s.best_any >= self.keep * leader.best_feasible:
                continue
            best = (
                f"its best in {s.spent} trial(s), {s.best_any:,.1f} tok/s (trial {s.best_any_trial}),"
                if s.best_any_trial is not None
                else f"its {s.spent} trial(s) measured nothing (failed),"
            )
            why[s.engine] = (
                f"{best} is under {self.keep:g}x engine {leader.engine}'s "
                f"{leader.best_feasible:,.1f} within the SLO (trial {leader.best_trial}); budget.engine_keep"
            )
        return why

    def _probe(self, engine: str, trials: Sequence[FrozenTrial]) -> Point:
        """``engine``'s next probe. Batch size: 60% up its batch sizes first, then two ranks up from
        its last measured probe if that met the SLO, two down if it did not. Precision and
        quantization: the pair that differs most from its earlier probes' (quantization first,
        then precision), the fewest bytes per weight among those: a first probe at fp32 only
        would judge CTranslate2 by its slowest compute type."""
        sizes = self.batches[engine]
        rank = round(FIRST_PROBE_AT * (len(sizes) - 1))
        probes = [t for t in trials if _engine_of(t) == engine and t.user_attrs.get(A_PROBE)]
        measured = [t for t in probes if _spent(t)]
        if measured:
            t = max(measured, key=lambda t: t.number)
            batch = _config(t).get("batch_size", sizes[rank])
            at = sizes.index(batch) if batch in sizes else rank
            rank = at + PROBE_STEP if t.user_attrs.get("feasible") else at - PROBE_STEP
        batch = sizes[max(0, min(rank, len(sizes) - 1))]
        before = [(_config(t).get("precision"), _config(t).get("quantization")) for t in probes]
        forms = self.forms[engine] or [("fp32", "none")]
        precision, quantization = min(
            forms,
            key=lambda f: (sum(q == f[1] for _, q in before), sum(p == f[0] for p, _ in before), forms.index(f)),
        )
        return engine, batch, precision, quantization

    def allows(self, params: dict[str, Any]) -> bool:
        """Whether the sampler may propose these Optuna parameters under :attr:`plan_now`."""
        plan = self.plan_now
        if plan is None:
            return True
        point = self._point(params)
        if plan.probe is not None:
            return point == plan.probe
        return point[0] in plan.kept

    def is_probe(self, cfg: TrialConfig) -> bool:
        """Whether ``cfg`` is the probe the plan asked for."""
        point = (cfg.engine, cfg.batch_size, cfg.precision, cfg.quantization)
        return self.plan_now is not None and self.plan_now.probe == point

    def _point(self, params: dict[str, Any]) -> Point:
        key = tuple(sorted(params.items()))
        if key not in self._keys:
            assert self.space is not None
            cfg = self.space.config_for(params)
            self._keys[key] = (cfg.engine, cfg.batch_size, cfg.precision, cfg.quantization)
        return self._keys[key]

    def record(self, trials: Sequence[FrozenTrial]) -> dict[str, Any]:
        """Each engine's standing and verdict, for the study record (``engine_race``)."""
        plan = self._plan(trials)
        stand = self.standings(trials)
        return {
            e: {
                "trials": s.spent,
                "best_feasible_tokens_per_s": s.best_feasible,
                "best_tokens_per_s": s.best_any,
                "best_trial": s.best_trial,
                "best_any_trial": s.best_any_trial,
                "state": "dropped" if e in plan.dropped else "probing" if s.spent < self.probes else "searched",
                **({"why": plan.dropped[e]} if e in plan.dropped else {}),
            }
            for e, s in stand.items()
        }


def _weight_bytes(form: tuple[str, str]) -> tuple[float, float]:
    """Bytes per weight, then per activation, of a (precision, quantization) pair: fewer first."""
    from autotune.space import weight_bytes

    precision, quantization = form
    return weight_bytes(precision, quantization), weight_bytes(precision, "none")


def _config(t: FrozenTrial) -> dict[str, Any]:
    cfg = t.user_attrs.get("config")
    return cfg if isinstance(cfg, dict) else {}


def _engine_of(t: FrozenTrial) -> str | None:
    cfg = t.user_attrs.get("config")
    return cfg.get("engine", "builtin") if isinstance(cfg, dict) else None


def _spent(t: FrozenTrial) -> bool:
    """Measured or failed for good: a repeat copies a measurement and a rejected config runs nothing."""
    if "duplicate_of" in t.user_attrs or "rejected" in t.user_attrs:
        return False
    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "failure" in t.user_attrs)


def _tokens_per_s(t: FrozenTrial) -> float:
    """What the study ranks a complete trial by (its first objective: tokens/s as measured, or its
    estimate for a quiet machine under a load that did not pass); 0.0 for one that ran out of
    memory or time."""
    return float(t.values[0]) if t.values else 0.0
