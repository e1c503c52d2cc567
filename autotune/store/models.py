"""autotune's own tables, beside Optuna's in the same database.

Every table is prefixed ``autotune_`` and migrated by autotune's Alembic history (version table
``autotune_alembic_version``), so Optuna's tables and its ``alembic_version`` are never touched.
Nothing here references Optuna's tables: ``optuna_study_id`` is a plain integer, so either side can
be dropped or upgraded on its own.

Constraint names come from ``NAMING_CONVENTION``: deterministic names are what lets Alembic's
SQLite batch mode (copy-and-rename) find and recreate a constraint in a later migration.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

TABLE_PREFIX = "autotune_"

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

STUDY_STATUSES = ("running", "finished", "failed")
TRIAL_STATES = ("measured", "infeasible", "failed", "rejected", "duplicate")
LATENCY_METRICS = ("e2e", "ttft", "tpot", "queue")
#: Per latency metric: the SLO percentiles plus mean and max, so a stored measurement round-trips.
LATENCY_STATS = ("p50", "p90", "p95", "p99", "mean", "max")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL keeps the zone (``timestamptz``); SQLite drops it, so values are converted to UTC on
    the way in and marked UTC on the way out. Naive datetimes are refused: their zone is a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime (UTC)")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    """Declarative base whose metadata carries the naming convention (and only autotune_ tables)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Study(Base):
    """One tuning study: what was submitted, on which hardware, and how it ended."""

    __tablename__ = "autotune_studies"
    __table_args__ = (CheckConstraint(_in("status", STUDY_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(512), unique=True)  # Optuna allows 512
    optuna_study_id: Mapped[int | None] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON)
    fingerprint: Mapped[str] = mapped_column(String(64))
    model_ref: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16), default="running")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    trials: Mapped[list[Trial]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True, order_by="Trial.trial_number"
    )
    exports: Mapped[list[Export]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True, order_by="Export.version"
    )
    references: Mapped[list[Reference]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True
    )

    def __repr__(self) -> str:
        return f"Study(id={self.id}, name={self.name!r}, status={self.status!r})"


class Trial(Base):
    """One trial's result, as the tuner recorded it (one row per study and trial number)."""

    __tablename__ = "autotune_trials"
    __table_args__ = (
        UniqueConstraint("study_id", "trial_number"),
        CheckConstraint(_in("state", TRIAL_STATES), name="state"),
        Index(None, "study_id", "config_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("autotune_studies.id", ondelete="CASCADE"), index=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_key: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    feasible: Mapped[bool | None] = mapped_column(Boolean)
    #: Normalized SLO values ``(measured - limit) / limit`` per clause, ``<= 0`` feasible.
    constraints: Mapped[list[Any] | None] = mapped_column(JSON)
    #: For ``state == "duplicate"``: the trial whose measurement this one repeats.
    duplicate_of: Mapped[int | None] = mapped_column(Integer)

    output_tokens_per_s: Mapped[float | None] = mapped_column(Float)
    requests_per_s: Mapped[float | None] = mapped_column(Float)
    requests: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    duration_s: Mapped[float | None] = mapped_column(Float)
    mean_batch_rows: Mapped[float | None] = mapped_column(Float)
    stopped_by: Mapped[str | None] = mapped_column(String(32))

    e2e_p50_ms: Mapped[float | None] = mapped_column(Float)
    e2e_p90_ms: Mapped[float | None] = mapped_column(Float)
    e2e_p95_ms: Mapped[float | None] = mapped_column(Float)
    e2e_p99_ms: Mapped[float | None] = mapped_column(Float)
    e2e_mean_ms: Mapped[float | None] = mapped_column(Float)
    e2e_max_ms: Mapped[float | None] = mapped_column(Float)
    ttft_p50_ms: Mapped[float | None] = mapped_column(Float)
    ttft_p90_ms: Mapped[float | None] = mapped_column(Float)
    ttft_p95_ms: Mapped[float | None] = mapped_column(Float)
    ttft_p99_ms: Mapped[float | None] = mapped_column(Float)
    ttft_mean_ms: Mapped[float | None] = mapped_column(Float)
    ttft_max_ms: Mapped[float | None] = mapped_column(Float)
    tpot_p50_ms: Mapped[float | None] = mapped_column(Float)
    tpot_p90_ms: Mapped[float | None] = mapped_column(Float)
    tpot_p95_ms: Mapped[float | None] = mapped_column(Float)
    tpot_p99_ms: Mapped[float | None] = mapped_column(Float)
    tpot_mean_ms: Mapped[float | None] = mapped_column(Float)
    tpot_max_ms: Mapped[float | None] = mapped_column(Float)
    queue_p50_ms: Mapped[float | None] = mapped_column(Float)
    queue_p90_ms: Mapped[float | None] = mapped_column(Float)
    queue_p95_ms: Mapped[float | None] = mapped_column(Float)
    queue_p99_ms: Mapped[float | None] = mapped_column(Float)
    queue_mean_ms: Mapped[float | None] = mapped_column(Float)
    queue_max_ms: Mapped[float | None] = mapped_column(Float)

    peak_memory_mb: Mapped[float | None] = mapped_column(Float)
    memory_kind: Mapped[str | None] = mapped_column(String(32))
    #: Seconds spent outside the measured window: load, quantize, compile, warmup.
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: ``{"edges": [...], "counts": [...]}`` of the e2e latency samples (ms).
    latency_histogram: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    e2e_samples: Mapped[list[Any] | None] = mapped_column(JSON)
    #: Figures added later (``prefill_ms``, ``mean_prompt_tokens``, ``memory``, ``roofline``); NaN stored as null.
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    failure_kind: Mapped[str | None] = mapped_column(String(32))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    log_excerpt: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    device: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    study: Mapped[Study] = relationship(back_populates="trials")

    def __repr__(self) -> str:
        return f"Trial(study_id={self.study_id}, number={self.trial_number}, state={self.state!r})"


class Export(Base):
    """One exported config document; every export is kept, numbered per study."""

    __tablename__ = "autotune_exports"
    __table_args__ = (UniqueConstraint("study_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("autotune_studies.id", ondelete="CASCADE"), index=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16), default="json")
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="exports")

    def __repr__(self) -> str:
        return f"Export(study_id={self.study_id}, version={self.version}, trial={self.trial_number})"


class Reference(Base):
    """The reference model's outputs on a study's evaluation set (see :mod:`autotune.quality`),
    computed once and read by every trial and worker; ``key`` names what it depends on."""

    __tablename__ = "autotune_references"
    __table_args__ = (UniqueConstraint("study_id", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("autotune_studies.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(64))
    #: ``autotune.quality.Reference.to_bytes()``: compressed numpy arrays (top-k ids and log-probs).
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    perplexity: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="references")


metadata = Base.metadata
