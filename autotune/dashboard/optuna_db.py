"""Optuna's own tables, read directly with SQL (read-only, a handful of columns at a time).

Optuna's storage API loads every attribute of every trial (``get_all_trials``): seconds for a
10,000-trial study whose trials each carry a measurement. The dashboard needs a few columns of many
trials (number, state, first value) and everything of a few (one page, one trial), so it reads
Optuna's tables through these declarations of the columns it uses. They have been stable since
Optuna 3.0 (``trial_values.value_type``), the oldest schema the Optuna versions autotune admits write.
Single trials are still read through Optuna's storage API, which decodes params and attributes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from sqlalchemy import Column, Connection, DateTime, Float, Integer, MetaData, String, Table, Text, select

metadata = MetaData()
studies = Table("studies", metadata, Column("study_id", Integer, primary_key=True), Column("study_name", String(512)))
trials = Table(
    "trials",
    metadata,
    Column("trial_id", Integer, primary_key=True),
    Column("number", Integer),
    Column("study_id", Integer),
    Column("state", String(8)),
    Column("datetime_start", DateTime),
    Column("datetime_complete", DateTime),
)
trial_values = Table(
    "trial_values",
    metadata,
    Column("trial_id", Integer),
    Column("objective", Integer),
    Column("value", Float),
    Column("value_type", String(7)),
)
study_directions = Table(
    "study_directions",
    metadata,
    Column("study_id", Integer),
    Column("objective", Integer),
    Column("direction", String(8)),
)
trial_params = Table(
    "trial_params",
    metadata,
    Column("trial_id", Integer),
    Column("param_name", String(512)),
    Column("param_value", Float),
    Column("distribution_json", Text),
)
trial_user_attributes = Table(
    "trial_user_attributes",
    metadata,
    Column("trial_id", Integer),
    Column("key", String(512)),
    Column("value_json", Text),
)
trial_system_attributes = Table(
    "trial_system_attributes",
    metadata,
    Column("trial_id", Integer),
    Column("key", String(512)),
    Column("value_json", Text),
)
study_user_attributes = Table(
    "study_user_attributes",
    metadata,
    Column("study_id", Integer),
    Column("key", String(512)),
    Column("value_json", Text),
)
#: The tables whose presence says "Optuna has written here".
REQUIRED = ("studies", "trials", "trial_values", "study_directions")

#: Optuna's trial states as the dashboard names them for a study autotune did not make.
PLAIN_STATES = {
    "COMPLETE": "complete",
    "PRUNED": "pruned",
    "FAIL": "failed",
    "RUNNING": "running",
    "WAITING": "waiting",
}


def utc(when: datetime | None) -> datetime | None:
    """Optuna stores naive UTC times (since 4.x): mark them UTC."""
    return when.replace(tzinfo=timezone.utc) if when is not None and when.tzinfo is None else when


def value_of(value: float | None, value_type: str | None) -> float:
    """A stored objective value (Optuna keeps infinities as a type with a null value)."""
    if value_type == "INF_POS":
        return math.inf
    if value_type == "INF_NEG":
        return -math.inf
    return math.nan if value is None else float(value)


@lru_cache(maxsize=4096)
def _distribution(distribution_json: str) -> Any:
    from optuna.distributions import json_to_distribution

    return json_to_distribution(distribution_json)


def external_param(value: float, distribution_json: str) -> Any:
    """A stored (internal) param value as the user sees it: the category itself, an int for an int range."""
    try:
        return _distribution(distribution_json).to_external_repr(value)
    except (ValueError, KeyError, IndexError, TypeError):
        return value


def study_id(conn: Connection, name: str) -> int | None:
    return conn.scalar(select(studies.c.study_id).where(studies.c.study_name == name))


def directions(conn: Connection, sid: int) -> list[str]:
    rows = conn.execute(
        select(study_directions.c.direction)
        .where(study_directions.c.study_id == sid)
        .order_by(study_directions.c.objective)
    )
    return [str(d).lower() for (d,) in rows]


def study_attr(conn: Connection, sid: int, key: str) -> Any:
    """One user attribute of a study, decoded (None when absent)."""
    raw = conn.scalar(
        select(study_user_attributes.c.value_json).where(
            study_user_attributes.c.study_id == sid, study_user_attributes.c.key == key
        )
    )
    return None if raw is None else json.loads(raw)


def trial_attrs(
    conn: Connection, trial_ids: Sequence[int], keys: Iterable[str], *, system: bool = False
) -> dict[int, dict[str, Any]]:
    """``{trial_id: {key: value}}`` of the given user (or system) attributes of a few trials."""
    table = trial_system_attributes if system else trial_user_attributes
    out: dict[int, dict[str, Any]] = {}
    if not trial_ids:
        return out
    rows = conn.execute(
        select(table.c.trial_id, table.c.key, table.c.value_json).where(
            table.c.trial_id.in_(list(trial_ids)), table.c.key.in_(list(keys))
        )
    )
    for tid, key, raw in rows:
        out.setdefault(tid, {})[key] = json.loads(raw) if raw is not None else None
    return out


def params(conn: Connection, trial_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """``{trial_id: {name: value}}`` for a few trials, values as the user sees them."""
    out: dict[int, dict[str, Any]] = {tid: {} for tid in trial_ids}
    if not trial_ids:
        return out
    rows = conn.execute(
        select(
            trial_params.c.trial_id,
            trial_params.c.param_name,
            trial_params.c.param_value,
            trial_params.c.distribution_json,
        ).where(trial_params.c.trial_id.in_(list(trial_ids)))
    )
    for tid, name, value, dist in rows:
        out[tid][name] = external_param(value, dist) if dist else value
    return out


def values(conn: Connection, trial_ids: Sequence[int]) -> dict[int, list[float]]:
    """``{trial_id: [value per objective]}`` for a few trials (trials without values are absent)."""
    out: dict[int, dict[int, float]] = {}
    if not trial_ids:
        return {}
    rows = conn.execute(
        select(
            trial_values.c.trial_id, trial_values.c.objective, trial_values.c.value, trial_values.c.value_type
        ).where(trial_values.c.trial_id.in_(list(trial_ids)))
    )
    for tid, objective, value, vtype in rows:
        out.setdefault(tid, {})[objective] = value_of(value, vtype)
    return {tid: [v[k] for k in sorted(v)] for tid, v in out.items()}


def all_attrs(conn: Connection, trial_id: int) -> dict[str, Any]:
    """Every user attribute of one trial, decoded."""
    rows = conn.execute(
        select(trial_user_attributes.c.key, trial_user_attributes.c.value_json).where(
            trial_user_attributes.c.trial_id == trial_id
        )
    )
    return {key: json.loads(raw) if raw is not None else None for key, raw in rows}
