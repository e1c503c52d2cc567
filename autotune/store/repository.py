"""Read and write autotune's own tables: studies, trial results, exports.

Plain data in, rows out: measurements arrive as ``Measurement.to_dict()``-shaped dicts, so the
store never imports torch or the engine (DESIGN: the store knows no torch). Every write is one
short transaction and is safe to retry: a trial is keyed by (study, trial number), an export
version is the study's next number, and a lost race is retried, never duplicated.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import Engine, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from autotune.errors import StorageError
from autotune.store.migrate import check_schema, make_engine
from autotune.store.models import (
    LATENCY_METRICS,
    LATENCY_STATS,
    STUDY_STATUSES,
    TRIAL_STATES,
    Export,
    Reference,
    Study,
    Trial,
    utcnow,
)

#: e2e samples kept per trial (the measurement already caps them; this guards other writers).
MAX_E2E_SAMPLES = 2000
#: Tail of a failed trial's log kept in ``log_excerpt``.
LOG_EXCERPT_CHARS = 4000
HISTOGRAM_BINS = 20
_RETRIES = 20
#: Dialects whose ``INSERT ... ON CONFLICT DO UPDATE`` writes a trial row in one statement.
_UPSERTS: dict[str, Callable[[Any], Any]] = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}

T = TypeVar("T")
When = datetime | float | None


def histogram(samples_ms: Sequence[float], bins: int = HISTOGRAM_BINS) -> dict[str, list[float] | list[int]]:
    """Equal-width histogram ``{"edges": bins + 1 floats, "counts": bins ints}`` (last bin closed).

    Non-finite samples are left out. All-equal samples give one bin ``[v, v]``; no samples give
    empty lists. Kept small and JSON-ready so the dashboard can draw it without the raw samples.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    xs = [float(x) for x in samples_ms if x is not None and math.isfinite(x)]
    if not xs:
        return {"edges": [], "counts": []}
    lo, hi = min(xs), max(xs)
    if lo == hi:
        return {"edges": [lo, hi], "counts": [len(xs)]}
    width = (hi - lo) / bins
    counts = [0] * bins
    for x in xs:
        counts[min(int((x - lo) / width), bins - 1)] += 1
    return {"edges": [lo + i * width for i in range(bins)] + [hi], "counts": counts}


def cap_samples(samples: Sequence[float], n: int = MAX_E2E_SAMPLES) -> list[float]:
    """At most ``n`` samples, evenly spaced over the run (a head cut would keep only the early ones)."""
    xs = list(samples)
    if len(xs) <= n:
        return xs
    if n <= 1:
        return xs[:n]
    return [xs[round(i * (len(xs) - 1) / (n - 1))] for i in range(n)]


def default_worker() -> str:
    """``hostname:pid`` of the writing process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _float(value: Any) -> float | None:
    """NaN is 'not measured': stored as NULL on every backend (SQLite would do it silently anyway)."""
    if value is None:
        return None
    f = float(value)
    return None if math.isnan(f) else f


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _when(value: When) -> datetime | None:
    """Accept aware datetimes or epoch seconds (what ``time.time()`` gives the tuner)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(float(value), timezone.utc)


def measurement_columns(measurement: Mapping[str, Any] | None) -> dict[str, Any]:
    """Trial column values from a ``Measurement.to_dict()`` dict (all None when there is none)."""
    cols: dict[str, Any] = {f"{m}_{s}_ms": None for m in LATENCY_METRICS for s in LATENCY_STATS}
    names = ("output_tokens_per_s", "requests_per_s", "duration_s", "mean_batch_rows", "peak_memory_mb")
    cols.update(dict.fromkeys(names))
    cols.update(
        requests=None,
        output_tokens=None,
        stopped_by=None,
        memory_kind=None,
        timings=None,
        latency_histogram=None,
        e2e_samples=None,
        metrics=None,
    )
    if measurement is None:
        return cols
    m = measurement
    for name in names:
        cols[name] = _float(m.get(name))
    for metric in LATENCY_METRICS:
        dist = m.get(f"{metric}_ms") or {}
        for stat in LATENCY_STATS:
            cols[f"{metric}_{stat}_ms"] = _float(dist.get(stat))
    samples = [float(x) for x in m.get("e2e_samples_ms") or []]
    cols.update(
        requests=None if m.get("requests") is None else int(m["requests"]),
        output_tokens=None if m.get("output_tokens") is None else int(m["output_tokens"]),
        stopped_by=m.get("stopped_by"),
        memory_kind=m.get("memory_kind"),
        timings=dict(m.get("timings") or {}),
        latency_histogram=histogram(samples),
        e2e_samples=cap_samples(samples),
        metrics={k: _nan_to_none(m[k]) for k in EXTRA_METRICS if m.get(k) is not None},
    )
    return cols


#: Measurement fields kept in the ``metrics`` JSON column (revision 0002).
EXTRA_METRICS = (
    "prefill_ms",
    "mean_prompt_tokens",
    "memory",
    "roofline",
    "quality",
    "windows_tokens_per_s",
    "window_spread_pct",
    "niceness",
    "breakdown_ms",
    "background",  # the load from other processes (autotune.load); absent when not watched
)


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN (PostgreSQL rejects it): store null, read back NaN."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _none_to_nan(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _none_to_nan(v) for k, v in value.items()}
    return math.nan if value is None else value


def measurement_dict(trial: Trial) -> dict[str, Any] | None:
    """The ``Measurement.to_dict()`` shape back from a trial row (NULL -> NaN); None if it has none."""
    if trial.output_tokens_per_s is None:
        return None
    out: dict[str, Any] = {
        "output_tokens_per_s": trial.output_tokens_per_s,
        "requests_per_s": _nan(trial.requests_per_s),
        "requests": trial.requests or 0,
        "output_tokens": trial.output_tokens or 0,
        "duration_s": _nan(trial.duration_s),
    }
    for metric in LATENCY_METRICS:
        out[f"{metric}_ms"] = {s: _nan(getattr(trial, f"{metric}_{s}_ms")) for s in LATENCY_STATS}
    out.update(
        mean_batch_rows=_nan(trial.mean_batch_rows),
        peak_memory_mb=_nan(trial.peak_memory_mb),
        memory_kind=trial.memory_kind or "",
        timings=dict(trial.timings or {}),
        e2e_samples_ms=list(trial.e2e_samples or []),
        stopped_by=trial.stopped_by or "requests",
        background=None,  # stored only when the trial was watched
    )
    out.update({k: _none_to_nan(v) for k, v in (trial.metrics or {}).items() if k in EXTRA_METRICS})
    return out


class Repository:
    """autotune's tables through one engine; each method is its own short transaction.

    Rows come back detached (``expire_on_commit=False``): their columns are readable after the
    call, their relationships (``study.trials``) are not loaded; use :meth:`list_trials`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._session = sessionmaker(engine, expire_on_commit=False)
        self._upserts: dict[tuple[str, tuple[str, ...]], Any] = {}

    @classmethod
    def open(cls, url: str, *, check: bool = True) -> Repository:
        """Open ``url``; with ``check`` (default) refuse a database not at this code's schema head."""
        if check:
            check_schema(url)
        return cls(make_engine(url))

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------
    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in a transaction; on a unique-key race (another writer won), retry from scratch."""
        for attempt in range(_RETRIES):
            try:
                with self._session.begin() as session:
                    return fn(session)
            except IntegrityError:
                if attempt == _RETRIES - 1:
                    raise
                time.sleep(random.uniform(0.0, 0.01 * (attempt + 1)))
        raise AssertionError("unreachable")

    def _trial_upsert(self, columns: tuple[str, ...]) -> Any:
        """``INSERT ... ON CONFLICT (study, number) DO UPDATE ... RETURNING`` for these columns, built
        once: building it per call cost more than the database did (about 3 of 8 ms per trial)."""
        dialect = self.engine.dialect.name
        if dialect not in _UPSERTS:
            return None
        key = (dialect, columns)
        if key not in self._upserts:
            stmt = _UPSERTS[dialect](Trial)
            stmt = stmt.on_conflict_do_update(
                index_elements=[Trial.study_id, Trial.trial_number], set_={c: stmt.excluded[c] for c in columns}
            )
            self._upserts[key] = stmt.returning(Trial.id)
        return self._upserts[key]

    @staticmethod
    def _study(session: Session, name: str) -> Study:
        study = session.scalar(select(Study).where(Study.name == name))
        if study is None:
            raise StorageError(f"study {name!r} is not in autotune's tables (upsert_study first)")
        return study

    # -- studies -------------------------------------------------------------------------------
    def upsert_study(
        self,
        name: str,
        *,
        spec: Mapping[str, Any],
        hardware: Mapping[str, Any],
        fingerprint: str,
        model_ref: str,
        optuna_study_id: int | None = None,
        status: str = "running",
    ) -> Study:
        """Create the study row, or refresh it (spec as last submitted, status) when resuming."""
        if status not in STUDY_STATUSES:
            raise ValueError(f"study status {status!r}; allowed: {', '.join(STUDY_STATUSES)}")

        def write(session: Session) -> Study:
            study = session.scalar(select(Study).where(Study.name == name))
            if study is None:
                study = Study(name=name)
                session.add(study)
            study.spec, study.hardware = dict(spec), dict(hardware)
            study.fingerprint, study.model_ref = fingerprint, model_ref
            if optuna_study_id is not None:
                study.optuna_study_id = optuna_study_id
            self._set_status(study, status)
            return study

        return self._write(write)

    @staticmethod
    def _set_status(study: Study, status: str) -> None:
        study.status = status
        study.updated_at = utcnow()
        if status == "running":
            study.finished_at = None
        elif study.finished_at is None:
            study.finished_at = study.updated_at

    def set_study_status(self, name: str, status: str) -> Study:
        """Mark a study running / finished / failed (``finished_at`` set when it ends)."""
        if status not in STUDY_STATUSES:
            raise ValueError(f"study status {status!r}; allowed: {', '.join(STUDY_STATUSES)}")

        def write(session: Session) -> Study:
            study = self._study(session, name)
            self._set_status(study, status)
            return study

        return self._write(write)

    def get_study(self, name: str) -> Study | None:
        with self._session() as session:
            return session.scalar(select(Study).where(Study.name == name))

    def list_studies(self) -> list[Study]:
        with self._session() as session:
            return list(session.scalars(select(Study).order_by(Study.created_at, Study.id)))

    # -- trials --------------------------------------------------------------------------------
    def record_trial(
        self,
        study_name: str,
        trial_number: int,
        *,
        config: Mapping[str, Any],
        config_key: str,
        state: str,
        feasible: bool | None = None,
        measurement: Mapping[str, Any] | Any | None = None,
        constraints: Sequence[float] | None = None,
        duplicate_of: int | None = None,
        failure: Mapping[str, Any] | None = None,
        worker: str | None = None,
        device: str | None = None,
        started_at: When = None,
        finished_at: When = None,
    ) -> int:
        """Write trial ``trial_number``'s result and return its row id; writing it again replaces the
        row (never a second one). :meth:`list_trials` reads rows back.

        ``measurement``: a ``Measurement.to_dict()`` dict (or anything with ``to_dict()``).
        ``failure``: ``{"kind", "reason", "log"}`` as the tuner keeps it (log tail kept).
        ``worker`` defaults to this process (``hostname:pid``); times: aware datetimes or epoch s.
        """
        if state not in TRIAL_STATES:
            raise ValueError(f"trial state {state!r}; allowed: {', '.join(TRIAL_STATES)}")
        if measurement is not None and not isinstance(measurement, Mapping):
            measurement = measurement.to_dict()
        failure = failure or {}
        log = failure.get("log") or None
        values: dict[str, Any] = {
            "config": dict(config),
            "config_key": config_key,
            "state": state,
            "feasible": feasible,
            "constraints": None if constraints is None else [float(c) for c in constraints],
            "duplicate_of": duplicate_of,
            **measurement_columns(measurement),
            "failure_kind": failure.get("kind"),
            "failure_reason": failure.get("reason"),
            "log_excerpt": log[-LOG_EXCERPT_CHARS:] if log else None,
            "worker": worker or default_worker(),
            "device": device,
            "started_at": _when(started_at),
            "finished_at": _when(finished_at),
        }

        upsert = self._trial_upsert(tuple(values))

        def write(session: Session) -> int:
            # Touching the study row first also finds its id: one statement for both.
            touched = update(Study).where(Study.name == study_name).values(updated_at=utcnow()).returning(Study.id)
            study_id = session.scalar(touched)
            if study_id is None:
                self._study(session, study_name)  # raises the clear error
            row = {"study_id": study_id, "trial_number": trial_number, **values}
            if upsert is not None:  # one round trip instead of a read and an insert or update
                return int(session.scalars(upsert, [row]).one())
            trial = session.scalar(select(Trial).where(Trial.study_id == study_id, Trial.trial_number == trial_number))
            if trial is None:
                trial = Trial(study_id=study_id, trial_number=trial_number)
                session.add(trial)
            for key, value in values.items():
                setattr(trial, key, value)
            session.flush()
            return trial.id

        return self._write(write)

    def list_trials(self, study_name: str) -> list[Trial]:
        """The study's trial rows by trial number."""
        with self._session() as session:
            study = self._study(session, study_name)
            return list(session.scalars(select(Trial).where(Trial.study_id == study.id).order_by(Trial.trial_number)))

    # -- exports -------------------------------------------------------------------------------
    def record_export(
        self, study_name: str, trial_number: int, document: Mapping[str, Any], *, format: str = "json"
    ) -> int:
        """Keep ``document`` as the study's next export version (1, 2, ...) and return that version."""

        def write(session: Session) -> int:
            study = self._study(session, study_name)
            last = session.scalar(select(func.max(Export.version)).where(Export.study_id == study.id))
            version = (last or 0) + 1
            session.add(
                Export(
                    study_id=study.id,
                    trial_number=trial_number,
                    version=version,
                    format=format,
                    document=dict(document),
                )
            )
            return version

        return self._write(write)

    # -- quality references --------------------------------------------------------------------
    def get_reference(self, study_name: str, key: str) -> bytes | None:
        """The stored reference payload for ``key``, or None."""
        with self._session() as session:
            study = self._study(session, study_name)
            return session.scalar(select(Reference.payload).where(Reference.study_id == study.id, Reference.key == key))

    def save_reference(self, study_name: str, key: str, payload: bytes, *, perplexity: float | None = None) -> bytes:
        """Store a reference unless another worker stored one first; returns the stored payload."""

        def write(session: Session) -> None:
            study = self._study(session, study_name)
            stored = select(Reference.id).where(Reference.study_id == study.id, Reference.key == key)
            if session.scalar(stored) is None:  # a worker beside us may have stored it first: keep theirs
                session.add(Reference(study_id=study.id, key=key, payload=payload, perplexity=perplexity))

        self._write(write)  # a unique-key race with that worker retries, then finds theirs
        return self.get_reference(study_name, key) or payload

    def latest_export(self, study_name: str) -> Export | None:
        """The study's newest export, or None."""
        with self._session() as session:
            study = self._study(session, study_name)
            return session.scalar(
                select(Export).where(Export.study_id == study.id).order_by(Export.version.desc()).limit(1)
            )

    def get_export(self, study_name: str, version: int) -> Export | None:
        with self._session() as session:
            study = self._study(session, study_name)
            return session.scalar(select(Export).where(Export.study_id == study.id, Export.version == version))
