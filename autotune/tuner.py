"""The study loop: Optuna asks, a child process measures, the parent records.

The parent never loads a model. Constraints (one normalized value per SLO clause,
``<= 0`` feasible) go into the sampler so the search itself avoids SLO-breaking regions.
Trial counts are a study budget: re-running the same study resumes toward the same total.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import inspect
import json
import math
import os
import resource
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import exc as sa_exc
from sqlalchemy import text as sa_text

from autotune import __version__, load
from autotune.config import TrialConfig
from autotune.digest import model_digest
from autotune.engine_race import A_PROBE, EngineRace
from autotune.errors import SpecError, StorageError, TrialFailure
from autotune.hardware import Hardware
from autotune.measure import Measurement, overhead
from autotune.models import ModelInfo
from autotune.random_search import DistinctRandomSampler, NoRepeatSampler, Rank
from autotune.space import ORDINAL_KNOBS, SearchSpace
from autotune.spec import Constraint, StudySpec, check_study_name
from autotune.store.failures import (
    engine_kwargs,
    error_chain,
    first_line,
    permanent_cause,
    sqlite_path,
    storage_error,
)
from autotune.store.migrate import safe_url
from autotune.surrogate import Observation, Outlook, constrained_ei, outlook, space_candidates

# Optuna flags heartbeats and some sampler options as experimental; that is not the user's concern.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")

DEFAULT_STORAGE = "sqlite:///studies/autotune.db"
WAIT_FOR_OTHERS_S = 1.0
#: Failure kinds that say "this config cannot meet the SLO here" rather than "something broke".
INFEASIBLE_FAILURES = ("oom", "timeout")
HEARTBEAT_S = 30
#: How long a study waits for a database that went away before giving up (it resumes when re-run).
STORAGE_RETRY_S = float(os.environ.get("AUTOTUNE_STORAGE_RETRY_S", 120))
STORAGE_RETRY_PAUSE_S = 2.0

# Trial user-attribute keys (the store's vocabulary, read by best/export/dashboard).
A_CONFIG, A_MEASUREMENT, A_CONSTRAINTS, A_FEASIBLE = "config", "measurement", "constraints", "feasible"
A_FAILURE, A_REJECTED, A_DUPLICATE = "failure", "rejected", "duplicate_of"
#: Study attribute: config_key -> {"ok": bool, "runs": [...]} from re-measuring winners.
A_CONFIRMATIONS = "confirmations"
#: Would-be winners re-measured per run of :meth:`Tuner.confirm`; configs still ranked above every
#: re-measured one after that are passed over (never exported unmeasured), until a later run.
MAX_CONFIRM_CANDIDATES = 3
#: Trial attribute, present when a trial's first measurement was disturbed by other processes'
#: load: that measurement's load, the wait, the re-measurement and which of the two was kept.
A_DISTURBED = "disturbed"
A_ENGINE_PROBE, A_ENGINE_RACE = A_PROBE, "engine_race"
#: How long the tuner waits for other processes' load to pass before re-measuring a disturbed
#: trial. Once a wait ends with the machine still busy, the next waits are one check each (the
#: load persists: waiting again would cost every trial this long) until a check finds it quiet.
#: ``AUTOTUNE_QUIET_WAIT_S`` overrides it (read when a Tuner is made; the test suite waits less).
QUIET_WAIT_S = 20.0
QUIET_CHECK_S = 1.0
#: Study attribute prefix: per-worker ``{storage_s, storage_calls, trial_process_s, trials, wall_s}``.
A_WORKER_STATS = "worker_stats"


def _lost_connection(exc: BaseException) -> BaseException | None:
    """The database connection error behind ``exc``, if any (Optuna may raise another error while
    handling it, e.g. when it cannot record a trial's state), else None. A read-only database or a
    full disk is not a lost connection: waiting for it cannot help."""
    if permanent_cause(exc) is not None:
        return None
    for cur in error_chain(exc):
        if isinstance(cur, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return cur
        if isinstance(cur, sa_exc.DBAPIError) and cur.connection_invalidated:
            return cur
    return None


def _spent(t: FrozenTrial) -> bool:
    """Did this trial spend budget: measured, or failed with a verdict (not a repeat, not a lost worker)?"""
    if t.state not in (TrialState.COMPLETE, TrialState.FAIL) or A_DUPLICATE in t.user_attrs:
        return False
    return t.state == TrialState.COMPLETE or A_FAILURE in t.user_attrs


def count_spent(trials: Sequence[FrozenTrial]) -> int:
    """How many of ``trials`` spent the study's budget (see :func:`_spent`)."""
    return sum(_spent(t) for t in trials)


def _budget_free_without_reading(seen: list[FrozenTrial], number: int, budget: int) -> bool:
    """Whether trial ``number``'s budget check must pass, judged from ``seen``, a trial list read
    before the trial was created (so the objective can skip reading it again).

    The check yields when the spent trials plus the running ones numbered below this one reach
    the budget. From the old list that sum is at most: its spent trials, plus every trial it saw
    unfinished (each may finish, or be another worker's running one), plus every number below this
    one it did not see (created since by other workers). A trial created after this one cannot have
    finished a measurement by now. Below the budget, the check passes whatever happened since.
    """
    unfinished = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in seen if t.number != number)
    unseen_below = number - sum(t.number < number for t in seen)
    return sum(_spent(t) for t in seen) + unfinished + unseen_below < budget


def write_trial_attrs(
    trial: optuna.Trial, user: dict[str, Any], constraints: dict[str, float], *, durable: bool = True
) -> None:
    """Write a running trial's user attributes and named constraints in one transaction.

    ``durable=False`` (PostgreSQL) commits without waiting for the WAL flush (``synchronous_commit``
    off for this transaction only): for writes that a later flushed commit covers, or that nothing
    depends on. Only a database *server* crash can lose them (never corrupt); a worker's crash cannot.

    Optuna's public API commits once per attribute (a dozen commits per trial, the bulk of a tiny
    trial's storage time). On PostgreSQL and SQLite this writes each attribute table with one
    multi-row upsert into Optuna's own models, the statement Optuna itself issues per attribute,
    after Optuna's own updatable check. Any other storage or database, or an Optuna whose private
    modules moved, gets the public one-call-per-attribute path: same result, more round trips.
    """
    storage = trial.storage
    backend = getattr(storage, "_backend", storage)
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
        from optuna.trial._trial import _CONSTRAINTS_KEY
    except ImportError:
        backend = None
    dialect = backend.engine.name if isinstance(backend, optuna.storages.RDBStorage) else None
    if dialect not in ("postgresql", "sqlite"):
        for key, value in user.items():
            trial.set_user_attr(key, value)
        for name, value in constraints.items():
            trial.set_constraint(name, value)
        return
    assert isinstance(backend, optuna.storages.RDBStorage)  # what a dialect implies
    from sqlalchemy.dialects import postgresql, sqlite

    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    system = {f"{_CONSTRAINTS_KEY}:{name}": float(value) for name, value in constraints.items()}
    with _create_scoped_session(backend.scoped_session, True) as session:
        if not durable and dialect == "postgresql":
            session.execute(sa_text("SET LOCAL synchronous_commit TO OFF"))
        row = models.TrialModel.find_or_raise_by_id(trial._trial_id, session)
        backend.check_trial_is_updatable(trial._trial_id, row.state)
        for model, attrs in ((models.TrialUserAttributeModel, user), (models.TrialSystemAttributeModel, system)):
            if not attrs:
                continue
            stmt = insert(model).values(
                [{"trial_id": trial._trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
            )
            session.execute(
                stmt.on_conflict_do_update(
                    index_elements=[model.trial_id, model.key], set_={"value_json": stmt.excluded.value_json}
                )
            )
    cached = getattr(trial, "_cached_frozen_trial", None)  # what trial.user_attrs reads back
    if cached is not None:
        cached.user_attrs.update(user)
        cached.system_attrs.update(system)


def spec_differs(stored_raw: dict[str, Any], spec_json: dict[str, Any]) -> bool:
    """Whether a study's stored spec and this run's differ in what makes their trials comparable."""
    free = ("budget", "name", "sampler", "device", "warm_start")  # may differ per run or per worker
    try:  # a spec stored by an older version, with today's defaults for fields added since
        stored_spec = StudySpec.model_validate(stored_raw).model_dump(mode="json")
    except ValueError:
        stored_spec = stored_raw
    return {k: v for k, v in stored_spec.items() if k not in free} != {
        k: v for k, v in spec_json.items() if k not in free
    }


def write_study_attrs(study: optuna.Study, attrs: dict[str, Any]) -> None:
    """Set several study user attributes in one transaction: all of them are stored, or none.

    Optuna's ``set_user_attr`` commits each on its own. Through Optuna's RDB models the same rows
    are written in one session; a storage other than Optuna's RDB storage, or an Optuna whose private
    modules moved, gets the public calls in the dict's order (a creation record puts ``spec`` last).
    """
    storage: Any = study._storage
    backend = getattr(storage, "_backend", storage)
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
    except ImportError:
        backend = None
    if not isinstance(backend, optuna.storages.RDBStorage):
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return
    with _create_scoped_session(backend.scoped_session, True) as session:
        row = models.StudyModel.find_or_raise_by_id(study._study_id, session)
        for key, value in attrs.items():
            attr = models.StudyUserAttributeModel.find_by_study_and_key(row, key, session)
            if attr is None:
                session.add(
                    models.StudyUserAttributeModel(study_id=row.study_id, key=key, value_json=json.dumps(value))
                )
            else:
                attr.value_json = json.dumps(value)


def _peak_rss_mb() -> float:
    """This process's own peak resident memory: Linux's VmHWM, which starts anew at exec; getrusage's
    ru_maxrss is kept across exec, so a tuner started by a big process (a test runner holding models)
    would report that process's peak."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            lines = f.read().splitlines()
        for line in lines:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _KeptParams:
    """Stands in for a trial's storage while it suggests: parameter writes are kept, the rest passes."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self.kept: list[tuple[str, float, BaseDistribution]] = []

    def set_trial_param(self, trial_id: int, name: str, value: float, distribution: BaseDistribution) -> None:
        self.kept.append((name, value, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


@contextlib.contextmanager
def params_in_one_write(trial: optuna.Trial, timer: Callable[..., Any] | None = None) -> Iterator[None]:
    """Store the parameters suggested inside the block in one transaction at its end.

    Optuna commits each suggested parameter on its own (a session, a trial lookup and a commit
    apiece, 3-5 ms each here). Inside the block the trial's storage keeps them instead (the
    trial's in-memory copy, which suggest reads back, is updated as usual); at its end they go
    through the same per-parameter write Optuna uses (its distribution check included) in one
    transaction, called through ``timer`` (``StorageClock.call``) when given. A block that raises
    stores none of them (and the trial forgets them): the trial fails before it measured.
    Storages other than Optuna's cached RDB storage, or an Optuna whose private names moved, get
    the plain per-parameter path.
    """
    storage: Any = trial.storage  # its private names are checked here
    try:
        from optuna.storages._rdb.storage import _create_scoped_session  # noqa: F401 (checked here)

        storage._backend._set_trial_param_without_commit  # noqa: B018 (checked here)
        study_id, _ = storage._trial_id_to_study_id_and_number[trial._trial_id]
        storage._studies[study_id].param_distribution  # noqa: B018 (checked here)
    except (ImportError, AttributeError, KeyError):
        yield
        return
    kept = _KeptParams(storage)
    trial.storage = kept  # type: ignore[assignment]
    try:
        try:
            yield
        finally:
            trial.storage = storage
        if kept.kept:
            (timer or _call)(write_trial_params, storage, trial._trial_id, study_id, kept.kept)
    except BaseException:
        cached = trial._cached_frozen_trial  # forget the unstored picks, as if never suggested
        for name, _, _ in kept.kept:
            cached.params.pop(name, None)
            cached.distributions.pop(name, None)
        raise


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def write_trial_params(
    storage: Any, trial_id: int, study_id: int, params: list[tuple[str, float, BaseDistribution]]
) -> None:
    """Optuna's per-parameter write for each of ``params``, in one transaction (see :func:`params_in_one_write`)."""
    from optuna.storages._rdb.storage import _create_scoped_session

    backend = storage._backend
    known = storage._studies[study_id].param_distribution  # what Optuna's cache checks new ones against
    with storage._lock, _create_scoped_session(backend.scoped_session, True) as session:
        for name, value, distribution in params:
            backend._set_trial_param_without_commit(session, trial_id, name, value, distribution, known.get(name))
    for name, _, distribution in params:
        known.setdefault(name, distribution)


def _tolerant(beat: Callable[[int], None]) -> Callable[[int], None]:
    """A heartbeat that skips a beat while the database is away instead of killing its thread."""

    @functools.wraps(beat)
    def call(trial_id: int) -> None:
        with contextlib.suppress(sa_exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
            beat(trial_id)

    return call


class StorageClock:
    """Seconds this process spends inside storage calls (Optuna's RDB storage and autotune's tables).

    Wraps an object's public methods in place, so every caller (the study, the sampler, the
    heartbeat thread, the repository) is timed without a proxy Optuna would not accept. Calls
    on other threads than the one that made the clock (Optuna's heartbeat thread) are also
    summed apart, in ``background_s``: they overlap measuring instead of adding to a trial's time.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.background_s = 0.0
        self._owner = threading.get_ident()
        self.by_method: dict[str, list[float]] = {}  # name -> [calls, seconds]
        #: The slowest call: [seconds, method, when (s after the clock started)], to tell a stall from a cost.
        self.slowest: list[Any] = [0.0, "", 0.0]
        self._start = time.perf_counter()
        self._lock = threading.Lock()

    #: Private methods through which Optuna's trial cache (``_CachedStorage``) and its stale-trial
    #: check reach the database (untimed, about a fifth of a trial's storage time went uncounted).
    PRIVATE = ("_get_trials", "_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_stale_trial_ids")

    def wrap(self, obj: Any) -> Any:
        for name in dir(obj):
            if name.startswith("_") and name not in self.PRIVATE:
                continue
            attr = getattr(obj, name, None)
            if inspect.ismethod(attr):
                setattr(obj, name, self._timed(attr))
        return obj

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` as a timed storage call."""
        return self._timed(fn)(*args, **kwargs)

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                with self._lock:
                    self.seconds += dt
                    self.calls += 1
                    if threading.get_ident() != self._owner:
                        self.background_s += dt
                    entry = self.by_method.setdefault(fn.__name__, [0, 0.0])
                    entry[0] += 1
                    entry[1] += dt
                    if dt > self.slowest[0]:
                        self.slowest = [dt, fn.__name__, t - self._start]

        return call


def constraint_values(m: Measurement, slo: list[Constraint]) -> list[float]:
    """(measured - max) / max per clause: <= 0 is feasible, and the size says how far off."""
    out = []
    for c in slo:
        v = m.value(c.name)
        out.append(c.excess(v) if math.isfinite(v) else 1.0)
    return out


#: Optuna >= 5 takes constraints per trial (``Trial.set_constraint``); older releases take a
#: ``constraints_func`` on the sampler. Both receive the same values.
NATIVE_CONSTRAINTS = hasattr(optuna.trial.Trial, "set_constraint")


#: Random configs ``sampler: gp`` measures before its Gaussian process proposes any.
GP_STARTUP_TRIALS = 3


def surrogate_rank(space: SearchSpace) -> Rank:
    """Scores configs (Optuna parameters) by the numpy surrogate's constrained expected improvement
    on the measured trials: which of several equally near configs ``NoRepeatSampler`` measures when
    the model's own proposal is refused by the rules or already measured. None before 2 trials."""

    def rank(trials: Sequence[FrozenTrial], candidates: list[dict[str, Any]]) -> list[float] | None:
        seen = observations(trials)
        if len(seen) < 2:
            return None
        configs = [space.config_for(p) for p in candidates]
        return constrained_ei(seen, configs, space.values, ORDINAL_KNOBS).tolist()

    return rank


def make_sampler(name: str, seed: int, n_constraints: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    def cons(trial: FrozenTrial) -> list[float]:
        values = trial.user_attrs.get(A_CONSTRAINTS)
        return list(values) if values is not None else [1.0] * n_constraints

    kw: dict[str, Any] = {} if NATIVE_CONSTRAINTS else {"constraints_func": cons}
    # Every sampler proposes only configs the space's rules accept (onnxruntime takes no int8 or
    # bf16, say): a rejected trial costs no budget, but it is a trial, and Optuna's GP, which ignores
    # pruned trials, proposed 116 of them in the 16-trial quickstart on a CPU with bf16.
    # gp's random start is a Latin hypercube over the space, the others' uniform: see DistinctRandomSampler.
    stratify = GP_STARTUP_TRIALS if name == "gp" else 0
    distinct = DistinctRandomSampler(space.distributions(), seed=seed, allowed=space.runnable(), stratify=stratify)
    rank = surrogate_rank(space)
    if name == "tpe":
        tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True, **kw)
        return NoRepeatSampler(tpe, distinct, allow=None, rank=rank)
    if name == "nsga2":
        nsga2 = optuna.samplers.NSGAIISampler(seed=seed, population_size=8, **kw)
        return NoRepeatSampler(nsga2, distinct, allow=None, rank=rank)
    if name == "gp":
        from importlib.util import find_spec

        if find_spec("scipy") is None:
            raise SpecError("sampler 'gp' needs scipy (pip install scipy); or use tpe, nsga2, random, grid")
        # 3 random configs before the model, not Optuna's 10: replayed at 10% of three recorded CPU
        # landscapes, 3 reached 99% of the best in as many or more seeds than 2 or 6 on each.
        gp = optuna.samplers.GPSampler(seed=seed, n_startup_trials=GP_STARTUP_TRIALS, **kw)
        # Once converged, GP proposes its incumbent again and again: 170 Optuna trials and 6 of 12
        # measured on the tests' 24-config landscape. Two repeats in a row are allowed (each adds
        # the copied result to its data; replay: 83% of seeds at 99% either way), then the nearest
        # free config.
        return NoRepeatSampler(gp, distinct, allow=2, rank=rank)
    if name == "random":
        return distinct  # no repeats of measured configs
    if name == "grid":
        return optuna.samplers.GridSampler(space.optuna_grid(), seed=seed)
    raise SpecError(f"unknown sampler {name!r}; allowed: tpe, nsga2, gp, random, grid")


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Open (creating tables if needed) an RDB storage, with a clear error when it cannot be reached."""
    kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    if path is not None and not path.parent.is_dir():
        raise StorageError(f"cannot open storage {safe_url(url)}: folder {path.parent} does not exist")
    if url.startswith(("sqlite", "postgresql")):
        kwargs["engine_kwargs"] = engine_kwargs(url)
    try:
        beat = int(os.environ.get("AUTOTUNE_HEARTBEAT_S", HEARTBEAT_S))
        # A trial whose worker died (no heartbeat for 4 beats) is failed and queued again.
        if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters:
            kwargs["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
        else:  # Optuna < 4.9
            kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=2)
        return optuna.storages.RDBStorage(url, heartbeat_interval=beat, grace_period=beat * 4, **kwargs)
    except Exception as err:  # sqlalchemy/driver errors vary; all mean "cannot use this storage"
        if permanent_cause(err) is not None:
            raise storage_error(err, url) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StorageError(f"cannot open storage {safe_url(url)}: {first}") from None


def ensure_schema(url: str) -> None:
    """Create autotune's tables in a database that has none; refuse one whose schema is behind or ahead.

    Creating is safe to do implicitly (``autotune tune`` on a fresh machine just works); migrating
    existing tables is the user's decision (``autotune db upgrade``).
    """
    from autotune.store import check_schema, current_revision, upgrade

    if current_revision(url) is None:
        upgrade(url)
    check_schema(url)


def _aware(when: datetime | None) -> datetime | None:
    """Optuna stamps naive local times; the store wants aware ones."""
    return when.astimezone() if when is not None else None


def store_state(trial: FrozenTrial) -> str:
    """The row state of a finished Optuna trial in autotune's own table."""
    if A_REJECTED in trial.user_attrs:
        return "rejected"
    if A_DUPLICATE in trial.user_attrs:
        return "duplicate"
    if trial.state == TrialState.FAIL:
        return "failed"
    return "measured" if trial.user_attrs.get(A_MEASUREMENT) else "infeasible"


def trial_config(trial: FrozenTrial) -> TrialConfig | None:
    raw = trial.user_attrs.get(A_CONFIG)
    return TrialConfig.model_validate(raw) if raw else None


def trial_measurement(trial: FrozenTrial) -> Measurement | None:
    raw = trial.user_attrs.get(A_MEASUREMENT)
    return Measurement.from_dict(raw) if raw else None


def plateau(
    values: Sequence[float],
    patience: int,
    min_improvement_pct: float,
    keep_going: Callable[[int], bool] | None = None,
) -> tuple[int, int] | None:
    """The stopping rule shared by the tuner and landscape replay: the first index at which
    ``patience`` values in a row failed to beat the best so far by ``min_improvement_pct`` and
    ``keep_going(index)`` (the model's outlook, when given) does not object, with the index of that
    best; None while it has not happened (or nothing counted yet, -inf)."""
    best, best_at, since = -math.inf, None, 0
    for i, v in enumerate(values):
        bar = best * (1 + min_improvement_pct / 100) if best > 0 else best
        if v > bar:
            best, best_at, since = v, i, 0
        else:
            since += 1
        if best_at is not None and since >= patience and (keep_going is None or not keep_going(i)):
            return i, best_at
    return None


def observations(trials: Sequence[FrozenTrial]) -> list[Observation]:
    """Spent trials as the surrogate's data: measured ones with their SLO excess, failed ones as infeasible."""
    out = []
    for t in trials:
        if not _spent(t) or A_CONFIG not in t.user_attrs or A_CONSTRAINTS not in t.user_attrs:
            continue
        failed = t.state == TrialState.FAIL or not t.user_attrs.get(A_MEASUREMENT)
        tps = float(t.values[0]) if t.values and not failed else 0.0
        cfg = TrialConfig.model_validate(t.user_attrs[A_CONFIG])
        out.append(Observation(cfg, tps, list(t.user_attrs[A_CONSTRAINTS]), failed))
    return out


def trial_overhead(trials: list[FrozenTrial]) -> dict[str, float] | None:
    """:func:`autotune.measure.overhead` of the measured trials (repeats left out): time not spent
    in the measurement window (process start, model load, warm-up, fidelity, sampling, storage)."""
    spans = []
    for t in trials:
        m = t.user_attrs.get(A_MEASUREMENT)
        if not m or A_DUPLICATE in t.user_attrs or not (t.datetime_start and t.datetime_complete):
            continue
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        spans.append((wall, float(m.get("duration_s", 0.0)), bool((m.get("timings") or {}).get("engine_reused"))))
    return overhead(spans)


def trial_disturbed(trial: FrozenTrial) -> bool:
    """Whether the measurement a trial kept was disturbed by other processes' load."""
    return load.is_disturbed((trial.user_attrs.get(A_MEASUREMENT) or {}).get("background"))


def is_feasible(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE and bool(trial.user_attrs.get(A_FEASIBLE))


def figure(trial: FrozenTrial, confirmations: dict[str, Any]) -> float:
    """A feasible trial's throughput as shown: the median of its re-measurements when it was
    re-measured (a search keeps its luckiest windows), else what its search trial measured."""
    record = confirmations.get(trial.user_attrs.get("config_key", ""))
    if record is not None and record.get("remeasured_tokens_per_s") is not None:
        return float(record["remeasured_tokens_per_s"])
    return float(trial.values[0])


def best_feasible(
    study: optuna.Study,
    trials: list[FrozenTrial] | None = None,
    confirmations: dict[str, Any] | None = None,
) -> FrozenTrial | None:
    """The highest-throughput trial that met every SLO clause, and every re-measurement of it,
    ranked by :func:`figure` (re-measured configs by their re-measurement).

    ``trials`` and ``confirmations`` (the study attribute) save storage reads when already at hand.
    """
    if confirmations is None:
        confirmations = study.user_attrs.get(A_CONFIRMATIONS, {})
    failed = {k for k, v in confirmations.items() if not v["ok"]}
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    feasible = [t for t in trials if is_feasible(t) and t.user_attrs["config_key"] not in failed]
    return max(feasible, key=lambda t: figure(t, confirmations), default=None)


def confirmation(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any] | None:
    """The re-measurement record of ``trial``'s config, if it was re-measured."""
    return study.user_attrs.get(A_CONFIRMATIONS, {}).get(trial.user_attrs.get("config_key"))


def shown_measurement(study: optuna.Study, trial: FrozenTrial) -> Measurement | None:
    """The measurement shown and exported for a trial: its median re-measurement when it was
    re-measured (and met the SLO), else its search trial's."""
    record = confirmation(study, trial)
    if record is not None and record.get("ok") and record.get("median_run") is not None:
        run = record["runs"][record["median_run"]]
        if run.get(A_MEASUREMENT):
            return Measurement.from_dict(run[A_MEASUREMENT])
    return trial_measurement(trial)


def measured_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials that carry a measurement of their own (no repeats, no OOM/timeout placeholders)."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE and t.user_attrs.get(A_MEASUREMENT) and A_DUPLICATE not in t.user_attrs
    ]


def closest_to_feasible(study: optuna.Study, n: int = 3) -> list[FrozenTrial]:
    """Completed trials ordered by their worst SLO violation (smallest first)."""
    return sorted(measured_trials(study), key=lambda t: max(t.user_attrs.get(A_CONSTRAINTS) or [math.inf]))[:n]


def pareto_front(study: optuna.Study, latency: str) -> list[FrozenTrial]:
    """Measured trials no other trial beats on both output tokens/s (higher) and ``latency`` (lower).

    Computed from the stored measurements, so every study has its front whatever its objective mode;
    sorted by latency, feasible or not (the SLO is a line across this front).
    """
    points = [(t, trial_measurement(t)) for t in measured_trials(study)]
    pts = [(t, m.output_tokens_per_s, m.value(latency)) for t, m in points if m is not None]
    front = [
        (t, tps, lat)
        for t, tps, lat in pts
        if not any(o_tps >= tps and o_lat <= lat and (o_tps, o_lat) != (tps, lat) for _, o_tps, o_lat in pts)
    ]
    return [t for t, _, _ in sorted(front, key=lambda x: x[2])]


@dataclass
class TuneEvents:
    """Hooks the CLI uses for its progress bar; all optional."""

    on_start: Callable[[int, int], None] = lambda done, total: None
    on_trial_start: Callable[[int, TrialConfig], None] = lambda number, cfg: None
    on_trial_end: Callable[[optuna.Study, FrozenTrial, FrozenTrial | None], None] = lambda study, trial, best: None
    on_confirm: Callable[[FrozenTrial, dict[str, Any]], None] = lambda trial, record: None
    on_storage_lost: Callable[[str], None] = lambda message: None
    on_reference: Callable[[], None] = lambda: None
    on_warm_start: Callable[[int, list[str]], None] = lambda n, studies: None
    on_outlook: Callable[[str], None] = lambda message: None  # patience reached, but the model expects more
    #: A measurement was disturbed by other processes (what was measured, their load in words).
    on_disturbed: Callable[[str, str], None] = lambda what, load: None


@dataclass
class Tuner:
    """Run (or resume) one study of ``spec`` on ``storage``."""

    spec: StudySpec
    hardware: Hardware
    model: ModelInfo
    storage_url: str = DEFAULT_STORAGE
    study_name: str | None = None
    trials: int | None = None
    timeout_s: float | None = None
    sampler: str | None = None
    seed: int | None = None
    events: TuneEvents = field(default_factory=TuneEvents)
    runner: Callable[[StudySpec, TrialConfig, Hardware], Measurement] | None = None
    repository: Any = None  # autotune.store.Repository, opened by open_study()
    reference: str | None = None  # the quality reference (base64), set by ensure_reference()
    allow_heterogeneous: bool = False
    variants: dict[str, ModelInfo] = field(default_factory=dict)  # model variants' infos (preflight)
    #: How long a disturbed trial waits for the load to pass (:data:`QUIET_WAIT_S`).
    quiet_wait_s: float = field(default_factory=lambda: float(os.environ.get("AUTOTUNE_QUIET_WAIT_S", QUIET_WAIT_S)))

    def __post_init__(self) -> None:
        self.name = check_study_name(self.study_name or self.spec.name or "study")
        self.budget = self.trials or self.spec.budget.trials
        self.space = SearchSpace.from_spec(self.spec, self.hardware, self.model, self.variants)
        self.slo = list(self.spec.slo)
        self._unrecorded: dict[int, dict[str, Any]] = {}  # full measurements (with samples) until record()
        self.clock = StorageClock()
        self.spent = 0  # budget spent, as of the last finished trial
        self._fresh_trials: list[FrozenTrial] | None = None  # read after the last trial finished
        self._step_trials: list[FrozenTrial] | None = None  # the list the current step checked
        self._asked: int | None = None  # number of the trial the current step's objective was given
        self._requeued = False  # a stale trial was queued again since the step's read
        self.stop_reason: str | None = None  # set when the study stops before its budget
        self._candidates: list[TrialConfig] | None = None  # the space's runnable configs, for outlook()
        self.load_persists = False  # the last wait for other processes' load to pass ended busy
        b = self.spec.budget
        racing = (self.sampler or self.spec.sampler) != "grid"
        self.race = EngineRace.for_study(self.space, self.budget, b.engine_probes, b.engine_keep) if racing else None
        self._race_dropped: dict[str, str] | None = None  # the dropped engines last said and recorded

    # -- study set-up ---------------------------------------------------------------------------
    def open_study(self) -> optuna.Study:
        storage = self.clock.wrap(open_storage(self.storage_url))
        storage.record_heartbeat = _tolerant(storage.record_heartbeat)
        sampler_name = self.sampler or self.spec.sampler
        seed = self.spec.seed if self.seed is None else self.seed
        sampler = make_sampler(sampler_name, seed, len(self.slo), self.space)
        distinct = sampler.distinct if isinstance(sampler, NoRepeatSampler) else sampler
        if isinstance(distinct, DistinctRandomSampler):
            distinct.known_trials = lambda: self._step_trials  # read just before ask()
            if self.race is not None:  # the engines still in the race, on top of the space's rules
                rules, race = distinct.allowed, self.race
                distinct.allowed = lambda params: (rules is None or rules(params)) and race.allows(params)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=self.name,
                sampler=sampler,
                load_if_exists=True,
                directions=["maximize", "minimize"] if self.spec.objective == "pareto" else ["maximize"],
            )
        except Exception as err:
            if permanent_cause(err) is not None:
                raise storage_error(err, self.storage_url) from None
            raise StorageError(f"cannot create study {self.name!r} in {safe_url(self.storage_url)}: {err}") from None
        self._one_read_per_trial(study, storage)
        self._check_or_record(study)
        from autotune.store import Repository

        ensure_schema(self.storage_url)
        self.repository = self.clock.wrap(Repository.open(self.storage_url))
        self.repository.upsert_study(
            self.name,
            spec=self.spec.model_dump(mode="json"),
            hardware=self.hardware.model_dump(mode="json"),
            fingerprint=self.hardware.fingerprint(),
            model_ref=self.spec.model,
            optuna_study_id=study._study_id,
        )
        if self.spec.warm_start and not study.get_trials(deepcopy=False):
            self.warm_start(study)
        return study

    def _one_read_per_trial(self, study: optuna.Study, storage: optuna.storages.RDBStorage) -> None:
        """Let the trial list the step reads just before ``ask()`` stand in for Optuna's own reads.

        Besides the tuner's read, Optuna reads the trial list again in ``ask()`` (for queued
        trials) and the sampler once more (TPE, NSGA-II, GP): three reads a trial, the largest
        storage cost of a tiny trial. ``ask()`` now skips its read when the step's list holds no
        queued trial and this process queued none since (a stale trial's retry, in the stale
        check between the two), and hands the sampler that list as its per-trial cache; a trial
        another worker queues or finishes in that moment counts from the next ask, as it would
        had it come a moment later. Without Optuna's private names Optuna reads as before.
        """
        pop = getattr(study, "_pop_waiting_trial_id", None)
        names = ("get_heartbeat_stale_trial_callback", "get_failed_trial_callback")
        getters = [g for g in names if hasattr(storage, g)]
        if pop is None or not getters or not hasattr(study, "_thread_local"):
            return
        retry = getattr(storage, getters[0])()  # Optuna < 4.9 has only the second name

        def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
            self._requeued = True
            if retry is not None:
                retry(study, trial)

        def pop_waiting() -> int | None:
            trials = self._step_trials
            if trials is None or self._requeued or any(t.state == TrialState.WAITING for t in trials):
                return pop()
            study._thread_local.cached_all_trials = trials  # what the sampler reads (ask() just cleared it)
            return None

        for getter in getters:
            setattr(storage, getter, lambda: requeue)
        study._pop_waiting_trial_id = pop_waiting  # type: ignore[method-assign]

    def warm_start(self, study: optuna.Study, top: int = 3) -> list[TrialConfig]:
        """Enqueue the best feasible configs (``top`` per study) of earlier studies in this storage
        with the same model on the same hardware, best first, so they are measured before the
        sampler's own proposals. Configs outside this study's space are left out."""
        chosen: list[TrialConfig] = []
        sources = []
        for other in self.repository.list_studies():
            if other.name == self.name or other.model_ref != self.spec.model:
                continue
            if other.fingerprint != self.hardware.fingerprint():
                continue
            rows = [t for t in self.repository.list_trials(other.name) if t.feasible and t.output_tokens_per_s]
            rows.sort(key=lambda t: -(t.output_tokens_per_s or 0.0))
            for t in rows[:top]:
                cfg = TrialConfig.model_validate(t.config)
                if cfg.key() not in {c.key() for c in chosen} and self.space.check(cfg) is None:
                    params = self.space.params_for(cfg)
                    if params is not None:
                        study.enqueue_trial(params, user_attrs={"warm_start_from": f"{other.name}#{t.trial_number}"})
                        chosen.append(cfg)
                        sources.append(other.name)
        if chosen:
            self.events.on_warm_start(len(chosen), sorted(set(sources)))
        return chosen

    def record(self, trial: FrozenTrial) -> None:
        """Write a finished trial to autotune's own table (the parent is the only writer of results)."""
        if self.repository is None or A_CONFIG not in trial.user_attrs:
            return
        self.repository.record_trial(
            self.name,
            trial.number,
            config=trial.user_attrs[A_CONFIG],
            config_key=trial.user_attrs["config_key"],
            state=store_state(trial),
            feasible=trial.user_attrs.get(A_FEASIBLE),
            measurement=self._unrecorded.pop(trial.number, None) or trial.user_attrs.get(A_MEASUREMENT),
            constraints=trial.user_attrs.get(A_CONSTRAINTS),
            duplicate_of=trial.user_attrs.get(A_DUPLICATE),
            failure=trial.user_attrs.get(A_FAILURE),
            worker=trial.user_attrs.get("worker"),
            device=str(trial.user_attrs.get("device", self.hardware.device))[:64],
            started_at=_aware(trial.datetime_start),
            finished_at=_aware(trial.datetime_complete),
        )

    def _check_or_record(self, study: optuna.Study) -> None:
        """Check this run against the study's spec and hardware, or record them for a new study.

        The record is written in one transaction, so a study is either created whole or not at
        all (a full disk or a crash in between used to leave a spec without its hardware, refused
        on every later run). A study an older autotune left half-recorded is completed here.
        """
        attrs = study.user_attrs
        spec_json = self.spec.model_dump(mode="json")
        record = self._creation_record(spec_json)
        if "spec" in attrs and "fingerprint" not in attrs:  # half-recorded: check the spec, then complete it
            self._check_spec(attrs["spec"], spec_json)
            write_study_attrs(study, {k: v for k, v in record.items() if k not in attrs})
            return
        if "spec" in attrs:
            self._check_spec(attrs["spec"], spec_json)
            if attrs.get("fingerprint") != self.hardware.fingerprint() and not self.allow_heterogeneous:
                stored = {**attrs.get("hardware", {}), "fingerprint": attrs.get("fingerprint")}
                differ = self.hardware.differences(stored)
                raise SpecError(
                    f"study {self.name!r} was tuned on different hardware ({'; '.join(differ)}): "
                    "configs tuned on one device do not transfer; use --study NEW_NAME "
                    "(or --allow-heterogeneous for a worker)"
                )
            return
        write_study_attrs(study, record)

    def _check_spec(self, stored_raw: dict[str, Any], spec_json: dict[str, Any]) -> None:
        if spec_differs(stored_raw, spec_json):
            raise SpecError(
                f"study {self.name!r} already exists with a different spec; pass --study NEW_NAME "
                "to start a new study (nothing was changed)"
            )

    def _creation_record(self, spec_json: dict[str, Any]) -> dict[str, Any]:
        """The study attributes a new study is created with (``spec`` last: it marks a recorded study)."""
        return {
            "hardware": self.hardware.model_dump(mode="json"),
            "fingerprint": self.hardware.fingerprint(),
            "model": self.model.to_dict(),
            "space": self.space.values,
            "space_dropped": self.space.dropped,
            "objectives": ["output_tokens_per_s", self.spec.second_objective],
            # A clause names its one bound: "max" (the unused "min" is left out), or "min" for fidelity floors.
            "slo": [c.model_dump(mode="json", exclude={"min"} if c.min is None else {"max"}) for c in self.slo],
            "autotune_version": __version__,
            "created_at": time.time(),
            # What the weights and tokenizer were: an export carries it, a deployment checks it.
            "model_digests": {
                ref: model_digest(ref, self.spec.model_seed) for ref in (self.spec.model, *self.spec.variants)
            },
            "spec": spec_json,
        }

    # -- the loop -------------------------------------------------------------------------------
    def _measure(self, cfg: TrialConfig, *, fresh: bool = False) -> Measurement:
        """One trial; ``fresh``: in a new process even when the last trial's engine could be reused."""
        spec = self.spec.in_fresh_processes() if fresh else self.spec
        if self.runner is not None:
            return self.runner(spec, cfg, self.hardware)
        from autotune.runner import run_trial

        return run_trial(spec, cfg, self.hardware, reference=self.reference)

    def ensure_reference(self) -> None:
        """Load the study's quality reference from the store, or compute and store it (once per
        study: every worker reads the same one). Bad evaluation input fails here, before any trial."""
        if self.runner is not None or not self.spec.quality.enabled or self.reference is not None:
            return
        from autotune.quality import Reference
        from autotune.runner import compute_reference, reference_key

        key = reference_key(self.spec, self.hardware)
        payload = self.repository.get_reference(self.name, key) if self.repository is not None else None
        if payload is None:
            self.events.on_reference()
            b64 = compute_reference(self.spec, self.hardware)
            if self.repository is None:
                self.reference = b64
                return
            ref = Reference.from_b64(b64)
            # Another worker may have stored its reference first: every worker uses the stored one.
            payload = self.repository.save_reference(self.name, key, ref.to_bytes(), perplexity=ref.perplexity)
        self.reference = base64.b64encode(payload).decode()  # what Reference.to_b64 makes of those bytes

    def counted(self, study: optuna.Study, trials: list[FrozenTrial] | None = None) -> int:
        """Trials that spent the budget: measured or failed ones (``trials``: an already fetched list).

        Free: repeats of a known config, and trials whose process died or was interrupted without a
        verdict (a killed worker, Ctrl-C): those are failed by Optuna and run again.
        """
        return count_spent(study.get_trials(deepcopy=False) if trials is None else trials)

    @staticmethod
    def _ran_out_of_memory_below(trials: list[FrozenTrial], cfg: TrialConfig) -> FrozenTrial | None:
        """An earlier trial that ran out of memory with the same model, precision, quantization,
        attention and backend, and no more rows (batch size x streams) than ``cfg``: memory only
        grows with rows, so ``cfg`` would run out too (learned infeasibility)."""
        rows = cfg.batch_size * cfg.streams
        same = ("engine", "engine_args", "model", "precision", "quantization", "attention", "backend")
        for t in trials:
            if (t.user_attrs.get(A_FAILURE) or {}).get("kind") != "oom" or A_CONFIG not in t.user_attrs:
                continue
            other = TrialConfig.model_validate(t.user_attrs[A_CONFIG])
            if all(getattr(other, k) == getattr(cfg, k) for k in same) and other.batch_size * other.streams <= rows:
                return t
        return None

    def _duplicate_of(self, trials: list[FrozenTrial], cfg: TrialConfig, number: int) -> FrozenTrial | None:
        """An earlier trial that already ran this exact config (measured, or failed for good)."""
        key = cfg.key()
        for t in trials:
            if t.number != number and t.user_attrs.get("config_key") == key and _spent(t):
                return t
        return None

    def _write(self, trial: optuna.Trial, attrs: dict[str, Any], constraints: list[float] | None = None) -> None:
        """Set user attributes (and the SLO constraints) of a running trial in one storage transaction.

        Not flushed on its own (``durable=False``): every write here is followed by Optuna's commit
        of the trial's state (tell, prune or fail), and PostgreSQL flushing that commit flushes all
        WAL before it. A database crash in between loses the write and the state change together:
        the trial stays RUNNING and the heartbeat check retries it, as after a worker crash.
        """
        if constraints is not None:
            attrs = {**attrs, A_CONSTRAINTS: constraints}
        native = dict(zip((c.name for c in self.slo), constraints, strict=True)) if constraints is not None else {}
        self.clock.call(write_trial_attrs, trial, attrs, native if NATIVE_CONSTRAINTS else {}, durable=False)

    def _reject(self, trial: optuna.Trial, reason: str, attrs: dict[str, Any] | None = None) -> optuna.TrialPruned:
        self._write(trial, {**(attrs or {}), A_REJECTED: reason}, [1.0] * len(self.slo))
        return optuna.TrialPruned(reason)

    def objective(self, trial: optuna.Trial) -> tuple[float, ...]:
        self._asked = trial.number
        # Several workers may pass the budget check at the same moment; the running trials with the
        # highest numbers yield, so the study ends at exactly its budget.
        # One read of the trial list serves the budget check and the duplicate lookup; the step's
        # own read (just before ask) does when it proves no other worker can hold the budget.
        # The random sampler draws from the step's list too (in suggest), so it is released after that.
        trials = self._step_trials
        if trials is None or not _budget_free_without_reading(trials, trial.number, self.budget):
            trials = trial.study.get_trials(deepcopy=False)
        running = sorted(t.number for t in trials if t.state == TrialState.RUNNING)
        if trial.number in running and self.counted(trial.study, trials) + running.index(trial.number) >= self.budget:
            self._step_trials = None
            raise self._reject(trial, "budget already taken by other workers' trials")
        with params_in_one_write(trial, self.clock.call):
            cfg = self.space.suggest(trial)
        self._step_trials = None
        known = {A_CONFIG: cfg.model_dump(mode="json"), "config_key": cfg.key(), **self.space.ranked_values(cfg)}
        if self.race is not None and self.race.is_probe(cfg):
            known[A_ENGINE_PROBE] = self.race.plan_now.describe() if self.race.plan_now else None
        reason = self.space.check(cfg)
        if reason:
            raise self._reject(trial, reason, known)
        dup = self._duplicate_of(trials, cfg, trial.number)
        if dup is not None and dup.state == TrialState.FAIL:
            f = dup.user_attrs[A_FAILURE]
            raise self._reject(trial, f"same config failed in trial {dup.number} ({f['kind']}): {f['reason']}", known)
        oom = self._ran_out_of_memory_below(trials, cfg) if dup is None else None
        if oom is not None:
            other = TrialConfig.model_validate(oom.user_attrs[A_CONFIG])
            rows = f"{other.batch_size} x {other.streams}"
            raise self._reject(
                trial, f"trial {oom.number} ran out of memory with {rows} rows; this config has more", known
            )
        if dup is not None:
            copied = {
                k: dup.user_attrs[k] for k in (A_MEASUREMENT, A_FEASIBLE, A_FAILURE, A_DISTURBED) if k in dup.user_attrs
            }
            self._write(trial, {**known, **copied, A_DUPLICATE: dup.number}, list(dup.user_attrs[A_CONSTRAINTS]))
            return tuple(dup.values)
        worker = {"worker": f"{socket.gethostname()}:{os.getpid()}"}
        worker["device"] = f"{self.hardware.device} ({self.hardware.device_name})"
        self._write(trial, {**known, **worker})  # before measuring: a worker that dies leaves its config behind
        self.events.on_trial_start(trial.number, cfg)
        t0 = time.perf_counter()
        try:
            m = self._measure(cfg)
        except TrialFailure as err:
            failed = {
                "trial_process_s": time.perf_counter() - t0,
                A_FAILURE: {"kind": err.kind, "reason": err.reason, "log": err.log[-4000:]},
            }
            if err.kind not in INFEASIBLE_FAILURES:
                self._write(trial, failed)
                raise
            # Out of memory or too slow is an answer about this config: record it as infeasible so
            # the sampler learns to avoid the region, instead of a FAIL it would ignore.
            self._write(trial, {**failed, A_FEASIBLE: False}, [1.0] * len(self.slo))
            return self._values(0.0, math.inf)
        m, disturbed = self._settle(f"trial {trial.number}", cfg, m)
        # Time inside the trial process; the rest of a trial's wall time is the parent's (sampling, storage).
        process_s = time.perf_counter() - t0
        judged = _judged(m, disturbed)
        cons = constraint_values(judged, self.slo)
        full = m.to_dict()
        # The latency samples go to autotune's own table only: every later read of the trial list
        # (several per trial, in every worker) would otherwise parse them again.
        self._unrecorded[trial.number] = full
        result = {
            "trial_process_s": process_s,
            A_MEASUREMENT: {k: v for k, v in full.items() if k != "e2e_samples_ms"},
            A_FEASIBLE: all(c <= 0 for c in cons),
            **({A_DISTURBED: disturbed} if disturbed else {}),
        }
        self._write(trial, result, cons)
        return self._values(judged.output_tokens_per_s, judged.value(self.spec.second_objective))

    def _settle(
        self, what: str, cfg: TrialConfig, m: Measurement, *, fresh: bool = False
    ) -> tuple[Measurement, dict[str, Any] | None]:
        """:meth:`_wait_and_remeasure`; a measurement still disturbed after it gets its estimate for
        a quiet machine in the note (``quiet_estimate``, see :func:`autotune.load.quiet_factor`),
        which :func:`_judged` ranks it by when ``budget.load_estimate`` is on."""
        m, note = self._wait_and_remeasure(what, cfg, m, fresh=fresh)
        if note is not None and self.spec.budget.load_estimate:
            factor = load.quiet_factor(m.background)
            if factor is not None:
                est = m.scaled(factor)
                note["quiet_estimate"] = {
                    "factor": round(factor, 3),
                    "output_tokens_per_s": est.output_tokens_per_s,
                    "e2e_ms": est.e2e_ms,
                    "how": "rates times (own + other processes' cores) / own cores, latencies divided by it",
                }
        return m, note

    def _wait_and_remeasure(
        self, what: str, cfg: TrialConfig, m: Measurement, *, fresh: bool = False
    ) -> tuple[Measurement, dict[str, Any] | None]:
        """A measurement other processes disturbed is taken again once their load has passed.

        One window measured while something else took a core says little about the config (under
        load three would-be winners lost 40-60% on re-measurement): wait up to ``quiet_wait_s``
        for a quiet machine, measure once more, keep the quieter of the two (by other processes'
        cores) and say so. A load that does not pass leaves the measurement as it is, flagged.
        Returns the measurement kept and the note for the record (None: it was not disturbed).
        """
        if not load.is_disturbed(m.background):
            if m.background is not None:  # a quiet window: the next disturbance gets the full wait again
                self.load_persists = False
            return m, None
        assert m.background is not None
        self.events.on_disturbed(what, load.describe(m.background))
        note: dict[str, Any] = {"first": _load_summary(m.background), "first_tokens_per_s": m.output_tokens_per_s}
        waited = self._wait_for_quiet()
        note.update(waited_s=waited["waited_s"], quiet_after_wait=waited["quiet"], remeasured=False, kept="first")
        if not waited["quiet"]:
            return m, note
        try:
            again = self._measure(cfg, fresh=fresh)
        except TrialFailure as err:  # the first measurement stands, flagged
            note["remeasure_failure"] = f"{err.kind}: {err.reason}"
            return m, note
        note.update(remeasured=True, second_tokens_per_s=again.output_tokens_per_s)
        if again.background is not None:
            note["second"] = _load_summary(again.background)
        if _other_cores(again) <= _other_cores(m):
            note["kept"] = "re-measurement"
            return again, note
        return m, note

    def _wait_for_quiet(self) -> dict[str, Any]:
        """Wait (bounded, see :data:`QUIET_WAIT_S`) until other processes leave this machine's CPUs
        (and GPU) alone; the last window's load with ``waited_s`` and ``quiet``."""
        limit = QUIET_CHECK_S if self.load_persists else self.quiet_wait_s
        result = load.wait_for_quiet(limit, device=self.hardware.device, interval_s=min(QUIET_CHECK_S, max(limit, 0.2)))
        self.load_persists = not result["quiet"]
        return result

    def _values(self, tokens_per_s: float, latency_ms: float) -> tuple[float, ...]:
        """The study's objective values: throughput alone, or throughput and the SLO latency (pareto)."""
        return (tokens_per_s, latency_ms) if self.spec.objective == "pareto" else (tokens_per_s,)

    def run(self, study: optuna.Study | None = None) -> optuna.Study:
        """Run trials until the budget is spent; ``study`` may come from :meth:`open_study`."""
        study = study or self.open_study()
        self.ensure_reference()
        done = self.spent = self.counted(study)
        self.events.on_start(done, self.budget)
        max_attempts = self.budget * 10 + 50
        attempts = [0]
        grid_total = self.space.size()

        confirmations = study.user_attrs.get(A_CONFIRMATIONS, {})  # changes only in confirm(), after the loop

        def stop_when_spent(study: optuna.Study, trial: FrozenTrial, trials: list[FrozenTrial]) -> None:
            attempts[0] += 1
            self.record(trial)
            self._fresh_trials = trials  # the next step reuses this read
            self.spent = self.counted(study, trials)
            self.events.on_trial_end(study, trial, best_feasible(study, trials, confirmations))

        timeout = self.timeout_s or self.spec.budget.timeout_s
        deadline = time.monotonic() + timeout if timeout else math.inf
        t_run = time.perf_counter()
        lost_since: float | None = None
        while attempts[0] < max_attempts and time.monotonic() < deadline:
            try:
                if not self._step(study, deadline, grid_total, stop_when_spent):
                    break
                lost_since = None
            except Exception as exc:
                # The database went away (restart, network): wait for it. The trial in flight is
                # left RUNNING; the heartbeat check fails it and queues it again once we are back.
                err = _lost_connection(exc)
                if err is None:
                    raise
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > STORAGE_RETRY_S:
                    raise storage_error(err, self.storage_url) from None
                self.events.on_storage_lost(f"{first_line(err)} (retrying for up to {STORAGE_RETRY_S:g} s)")
                time.sleep(STORAGE_RETRY_PAUSE_S)
        if attempts[0] >= max_attempts and self.spent < self.budget and self.stop_reason is None:
            self.stop_reason = (
                f"stopped after {max_attempts} sampler proposals with {self.spent} of {self.budget} trials spent: "
                "the sampler kept proposing configs already measured (sampler: random never does)"
            )
        self._record_worker_stats(study, time.perf_counter() - t_run)
        if self.race is not None:
            trials = study.get_trials(deepcopy=False)
            self.clock.call(study.set_user_attr, A_ENGINE_RACE, self.race.record(trials))
        self.confirm(study)
        study.set_user_attr("updated_at", time.time())
        if self.repository is not None:
            spent = self.counted(study) >= self.budget
            self.repository.set_study_status(self.name, "finished" if spent else "running")
        # The parent's own peak memory: it never loads a model, so this stays flat however many trials run.
        study.set_user_attr("tuner_peak_rss_mb", _peak_rss_mb())
        return study

    def _step(self, study: optuna.Study, deadline: float, grid_total: int, callback: Callable[..., None]) -> bool:
        """Run one trial if the budget allows; False when the study is done."""
        trials, self._fresh_trials = self._fresh_trials or study.get_trials(deepcopy=False), None
        spent = self.counted(study, trials)
        if spent >= self.budget:
            return False
        reason = self.stagnation(trials)
        if reason is not None:
            self.stop_reason = reason
            return False
        distinct = {t.user_attrs.get("config_key") for t in trials}
        if len(distinct - {None}) >= grid_total:
            return False
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if spent + running >= self.budget:
            # Other workers hold the last slots of the budget: wait for them rather than overshoot.
            optuna.storages.fail_stale_trials(study)
            time.sleep(WAIT_FOR_OTHERS_S)
            return True
        if self.race is not None:
            self._plan_race(study, trials)
        # One trial per optimize() call: heartbeats and stale-trial recovery run as usual, and the
        # budget check above runs between trials, so several workers stop at exactly the budget.
        remaining = deadline - time.monotonic()
        self._step_trials, self._asked, self._requeued = trials, None, False
        study.optimize(
            self.objective,
            n_trials=1,
            catch=(TrialFailure,),
            timeout=None if remaining == math.inf else max(remaining, 0.0),
        )
        if self._asked is not None:
            # Instead of an optimize() callback: Optuna reads the trial back for callbacks, and
            # this list (which the next step needs anyway) already holds it, finished.
            trials = study.get_trials(deepcopy=False)
            ran = next((t for t in trials if t.number == self._asked), None)
            if ran is not None:
                callback(study, ran, trials)
        return True

    def _plan_race(self, study: optuna.Study, trials: list[FrozenTrial]) -> None:
        """The engines the next trial may run (:mod:`autotune.engine_race`); a change in the dropped
        ones is said and recorded with every engine's standing."""
        assert self.race is not None
        plan = self.race.plan(trials)
        if plan.dropped == self._race_dropped:
            return
        for engine, why in plan.dropped.items():
            if engine not in (self._race_dropped or {}):
                self.events.on_outlook(f"engine {engine} gets no more trials: {why}")
        self._race_dropped = dict(plan.dropped)
        self.clock.call(study.set_user_attr, A_ENGINE_RACE, self.race.record(trials))

    def stagnation(self, trials: list[FrozenTrial]) -> str | None:
        """Why the study should stop before its budget (``budget.patience``), or None: ``patience``
        measured trials in a row did not raise the best feasible tokens/s by ``min_improvement_pct``,
        and a model of every measured trial expects no unmeasured config to add that much either
        (:func:`autotune.surrogate.outlook`: constrained expected improvement)."""
        b = self.spec.budget
        if b.patience is None or self.spec.objective != "throughput":
            return None
        spent = sorted((t for t in trials if _spent(t)), key=lambda t: t.number)
        values = [t.values[0] if is_feasible(t) and t.values else -math.inf for t in spent]
        look: list[Outlook | None] = [None]

        def keep_going(i: int) -> bool:
            if i < len(values) - 1:  # earlier stalls: this study went on, so the model objected then
                return True
            look[0] = self.outlook(spent)
            going_on = look[0] is not None and look[0].expected_gain_pct >= b.min_improvement_pct
            if going_on and look[0] is not None:
                self.events.on_outlook(f"patience {b.patience} reached, going on: {look[0].describe()}")
            return going_on

        stop = plateau(values, b.patience, b.min_improvement_pct, keep_going)
        if stop is None:
            return None
        best = spent[stop[1]]
        because = f"; {look[0].describe()}" if look[0] is not None else ""
        return (
            f"stopped early: {b.patience} measured trials in a row did not beat trial {best.number}'s "
            f"{values[stop[1]]:,.1f} tok/s by {b.min_improvement_pct:g}% (budget.patience {b.patience}){because}"
        )

    def outlook(self, trials: Sequence[FrozenTrial]) -> Outlook | None:
        """What a model of ``trials`` expects from the best config not yet measured."""
        if self._candidates is None:
            self._candidates = space_candidates(self.space, self.spec.seed)
        return outlook(observations(trials), self._candidates, self.space.values, ORDINAL_KNOBS)

    def _record_worker_stats(self, study: optuna.Study, wall_s: float) -> None:
        """What this process spent where: in storage calls vs in trial processes (bench/workers.py reads it)."""
        me = f"{socket.gethostname()}:{os.getpid()}"
        mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == me]
        stats = {
            "storage_s": self.clock.seconds,
            "storage_calls": self.clock.calls,
            "storage_background_s": self.clock.background_s,
            "trial_process_s": sum(float(t.user_attrs.get("trial_process_s", 0.0)) for t in mine),
            "trials": len(mine),
            "wall_s": wall_s,
            "by_method": {k: [int(v[0]), round(v[1], 4)] for k, v in self.clock.by_method.items()},
            "slowest_call": self.clock.slowest,
        }
        study.set_user_attr(f"{A_WORKER_STATS}.{me}", stats)

    def confirm(self, study: optuna.Study) -> None:
        """Re-measure the winner ``confirm_runs`` times in fresh processes; the median is its figure.

        A search keeps the luckiest measurement of configs near the SLO edge and of noisy ones:
        re-measuring the winner before it is exported keeps one window from deciding what gets
        deployed and what figure is promised. A winner that misses the SLO on re-measurement is
        passed over; one whose re-measured figure falls below another config's search figure lets
        that config be re-measured next (up to :data:`MAX_CONFIRM_CANDIDATES` configs, more while
        none re-measured has met the SLO). After that, configs still ranked above every re-measured
        one are passed over unmeasured: the winner is always a re-measured config (under load, three
        would-be winners fell 40-60% and the fourth, never re-measured, was exported). A
        re-measurement disturbed by other processes is taken again once their load passes
        (:meth:`_settle`); one that stays disturbed does not confirm.
        ``confirm_runs: 0`` re-measures nothing: the export then says its figures are the search's.
        """
        runs = self.spec.budget.confirm_runs
        if not runs:
            return
        self._forget_passed_over(study)
        remeasured = 0
        while True:
            confirmations = study.user_attrs.get(A_CONFIRMATIONS, {})
            best = best_feasible(study, confirmations=confirmations)
            if best is None or best.user_attrs["config_key"] in confirmations:
                return
            # Enough would-be winners were re-measured once one of them met the SLO: the rest are
            # passed over. Until then the next is re-measured (an export needs a re-measured config).
            if remeasured >= MAX_CONFIRM_CANDIDATES and any(v.get("ok") for v in confirmations.values()):
                self._pass_over_unmeasured(study, confirmations)
                return
            remeasured += 1
            record = self._remeasure(best, runs)
            study.set_user_attr(A_CONFIRMATIONS, {**confirmations, best.user_attrs["config_key"]: record})
            self.events.on_confirm(best, record)

    def _remeasure(self, best: FrozenTrial, runs: int) -> dict[str, Any]:
        """``runs`` fresh measurements of ``best``'s config, as a confirmation record."""
        cfg = TrialConfig.model_validate(best.user_attrs[A_CONFIG])
        record: dict[str, Any] = {"ok": True, "trial": best.number, "runs": []}
        for _ in range(runs):
            try:
                m = self._measure(cfg, fresh=True)  # an independent run: not the search's process
            except TrialFailure as err:
                record["runs"].append({"failure": f"{err.kind}: {err.reason}"})
                record["ok"] = False
                break
            m, disturbed = self._settle(f"the re-measurement of trial {best.number}", cfg, m, fresh=True)
            judged = _judged(m, disturbed)
            cons = constraint_values(judged, self.slo)
            full = m.to_dict()
            run = {
                "output_tokens_per_s": judged.output_tokens_per_s,
                "constraints": cons,
                self.spec.second_objective: judged.value(self.spec.second_objective),
                A_MEASUREMENT: {k: v for k, v in full.items() if k != "e2e_samples_ms"},
                "disturbed": load.is_disturbed(m.background),
            }
            if disturbed:
                run[A_DISTURBED] = disturbed
            record["runs"].append(run)
            if any(c > 0 for c in cons):
                record["ok"] = False
                break
        loud = sum(bool(r.get("disturbed")) for r in record["runs"])
        if loud:
            record["disturbed_runs"] = loud
        if record["ok"]:
            record.update(agreement(best, record["runs"], self.spec.budget.confirm_tolerance_pct))
            if loud:  # a figure measured under other processes' load confirms nothing
                record["agrees"] = False
        return record

    def _pass_over_unmeasured(self, study: optuna.Study, confirmations: dict[str, Any]) -> None:
        """Record every config that still ranks above all re-measured ones as passed over, unmeasured,
        so that the best (here, in the dashboard, in the export) is a re-measured config."""
        passed = dict(confirmations)
        why = (
            f"not re-measured: {MAX_CONFIRM_CANDIDATES} would-be winners were re-measured already, and a config "
            "is exported only once re-measured; the next run of this study re-measures it"
        )
        over = []
        while (best := best_feasible(study, confirmations=passed)) is not None:
            key = best.user_attrs["config_key"]
            if key in passed:
                break
            passed[key] = {"ok": False, "trial": best.number, "runs": [], "not_remeasured": why}
            over.append(best)
        if over:
            study.set_user_attr(A_CONFIRMATIONS, passed)
            for t in over:
                self.events.on_confirm(t, passed[t.user_attrs["config_key"]])

    @staticmethod
    def _forget_passed_over(study: optuna.Study) -> None:
        """Configs an earlier run passed over unmeasured compete again: passing over is no verdict."""
        confirmations = study.user_attrs.get(A_CONFIRMATIONS, {})
        kept = {k: v for k, v in confirmations.items() if "not_remeasured" not in v}
        if len(kept) != len(confirmations):
            study.set_user_attr(A_CONFIRMATIONS, kept)


def _judged(m: Measurement, note: dict[str, Any] | None) -> Measurement:
    """What a trial is ranked and held to the SLO by: its measurement, or its estimate for a quiet
    machine where a load that did not pass disturbed it (``note['quiet_estimate']``)."""
    if note is None or "quiet_estimate" not in note:
        return m
    return m.scaled(float(note["quiet_estimate"]["factor"]))


def _load_summary(background: dict[str, Any]) -> dict[str, Any]:
    """The figures of a measurement's load worth keeping beside a trial (the full one is in its measurement)."""
    keys = ("other_cpu_cores", "cores", "loadavg_end", "top_other", "gpu_other_sm_pct", "reason")
    return {k: background[k] for k in keys if k in background}


def _other_cores(m: Measurement) -> float:
    """Other processes' cores during ``m`` (0 when it was not watched)."""
    return float((m.background or {}).get("other_cpu_cores", 0.0))


def agreement(trial: FrozenTrial, runs: list[dict[str, Any]], tolerance_pct: float) -> dict[str, Any]:
    """How a trial's re-measurements compare with its search figure: their median (the figure shown),
    the change, and whether that lies within the tolerance widened to the spread the runs show."""
    import statistics

    values = [float(r["output_tokens_per_s"]) for r in runs]
    median = statistics.median(values)
    search = float(trial.values[0])
    spread = 100 * (max(values) - min(values)) / median if len(values) > 1 and median > 0 else 0.0
    allowed = max(tolerance_pct, spread)
    change = 100 * (median - search) / search if search > 0 else 0.0
    return {
        "remeasured_tokens_per_s": median,
        "search_tokens_per_s": search,
        "change_pct": change,
        "tolerance_pct": allowed,
        "agrees": abs(change) <= allowed,
        # The run whose throughput is the median (the lower middle one for an even count): its
        # latencies and memory are the figures exported beside that throughput.
        "median_run": min(range(len(values)), key=lambda i: (abs(values[i] - median), values[i])),
    }


def describe_trial(trial: FrozenTrial) -> dict[str, Any]:
    """A JSON-friendly row for tables: number, state, config, key metrics, why it failed."""
    m = trial_measurement(trial)
    row: dict[str, Any] = {"number": trial.number, "state": trial.state.name, "config": trial.user_attrs.get(A_CONFIG)}
    if m:
        row.update(tokens_per_s=m.output_tokens_per_s, e2e_p95_ms=m.e2e_ms["p95"], feasible=is_feasible(trial))
        if load.is_disturbed(m.background):
            row["disturbed"] = load.describe(m.background)
    if A_FAILURE in trial.user_attrs:
        row["failure"] = trial.user_attrs[A_FAILURE]["reason"]
    if A_REJECTED in trial.user_attrs:
        row["rejected"] = trial.user_attrs[A_REJECTED]
    return row


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)
