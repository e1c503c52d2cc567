"""Alembic driven from code: create, upgrade, downgrade and check autotune's tables.

The migrations live in the repository's top-level ``alembic/`` folder; no ``alembic.ini`` is needed
at runtime. autotune's history is stamped in ``autotune_alembic_version``: Optuna stamps the default
``alembic_version`` in the same database and refuses revisions it does not know, so the two
histories must never share a table. Autogenerate only ever sees ``autotune_`` tables.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool
from sqlalchemy.types import TypeDecorator

from autotune import __version__
from autotune.errors import StorageError
from autotune.store.models import TABLE_PREFIX, metadata

#: The Alembic script folder (``env.py``, ``versions/``): the repository's ``alembic/``, which the
#: package links as ``autotune/data/alembic`` so wheels carry a copy of it.
ALEMBIC_DIR = (Path(__file__).parents[1] / "data" / "alembic").resolve()
VERSION_TABLE = "autotune_alembic_version"
SQLITE_BUSY_TIMEOUT_S = 30
PG_CONNECT_TIMEOUT_S = 5
#: Alembic keeps its running context in module globals: one migration per process at a time.
_ALEMBIC_LOCK = threading.Lock()
#: Key of the PostgreSQL advisory lock that serializes concurrent ``upgrade`` calls.
_PG_LOCK_KEY = 0x6175746F74756E65  # b"autotune" as a (positive) 64-bit integer


# -- engines ------------------------------------------------------------------------------------


def safe_url(url: str | URL) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return str(url)


def _finite(obj: Any) -> Any:
    """Replace NaN/inf (not JSON; PostgreSQL's json type rejects them) with null, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps_json(obj: Any) -> str:
    """The engines' JSON serializer: strict JSON, identical on SQLite and PostgreSQL."""
    try:  # the common case, without walking a trial's 2,000 latency samples twice
        return json.dumps(obj, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), allow_nan=False)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers (dashboard) run beside the writer; the busy timeout makes writers queue."""
    cur = dbapi_connection.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
        cur.execute("PRAGMA journal_mode = WAL")  # persistent in the file; ':memory:' stays 'memory'
        cur.execute("PRAGMA foreign_keys = ON")
    finally:
        cur.close()


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for the store: WAL + busy timeout + foreign keys on SQLite, pre-ping on PostgreSQL.

    ``kwargs`` go to :func:`sqlalchemy.create_engine` (e.g. ``poolclass``).
    """
    try:
        u = make_url(url)
    except ArgumentError:
        raise StorageError(f"cannot open storage {url!s}: not a SQLAlchemy database URL") from None
    backend, driver = u.get_backend_name(), u.get_driver_name()
    kwargs.setdefault("json_serializer", dumps_json)
    if backend == "sqlite":
        db = u.database or ""
        if db and db != ":memory:" and not db.startswith("file:"):
            parent = Path(db).expanduser().parent
            if not parent.is_dir():
                raise StorageError(f"cannot open storage {safe_url(u)}: folder {parent} does not exist")
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
        engine = create_engine(u, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if backend == "postgresql" and driver in ("psycopg", "psycopg2") and "connect_timeout" not in u.query:
        kwargs.setdefault("connect_args", {}).setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
    try:
        return create_engine(u, **kwargs)
    except ModuleNotFoundError as err:
        hint = " (pip install 'psycopg[binary]' and use postgresql+psycopg://)" if backend == "postgresql" else ""
        raise StorageError(f"cannot open storage {safe_url(u)}: driver {err.name!r} is not installed{hint}") from None


def _sqlite_file_missing(url: str | URL) -> bool:
    """True for a SQLite file URL whose file does not exist (reading it must not create it)."""
    try:
        u = make_url(url)
    except ArgumentError:
        return False
    db = u.database or ""
    if u.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return False
    return not Path(db).expanduser().exists()


@contextmanager
def _storage_errors(url: str | URL, doing: str) -> Iterator[None]:
    """Turn driver and Alembic errors into one-line :class:`StorageError`\\ s naming the storage."""
    from alembic.util import CommandError

    try:
        yield
    except (SQLAlchemyError, CommandError) as err:
        from autotune.store.failures import permanent_cause, storage_error

        if permanent_cause(err) is not None:  # a read-only file, a full disk: say so, and the fix
            raise storage_error(err, str(url)) from err
        text = str(getattr(err, "orig", None) or err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise StorageError(f"cannot {doing} storage {safe_url(url)}: {first}") from err


# -- Alembic configuration ------------------------------------------------------------------------


def include_name(name: str | None, type_: str, parent_names: dict[str, str | None]) -> bool:
    """Reflect only autotune's tables: Optuna's (and both version tables) are not ours to diff."""
    if type_ == "table":
        return bool(name) and name.startswith(TABLE_PREFIX) and name != VERSION_TABLE  # type: ignore[union-attr]
    return True


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Second guard for autogenerate: any table object outside the ``autotune_`` prefix is ignored."""
    if type_ == "table":
        return bool(name) and name.startswith(TABLE_PREFIX) and name != VERSION_TABLE  # type: ignore[union-attr]
    table = getattr(obj, "table", None)
    return table is None or table.name.startswith(TABLE_PREFIX)


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render custom column types (``UTCDateTime``) as their plain SQLAlchemy type in new migrations."""
    if type_ == "type" and isinstance(obj, TypeDecorator):
        return f"sa.{obj.impl!r}"  # script.py.mako imports sqlalchemy as sa
    return False


def migration_options() -> dict[str, Any]:
    """The ``context.configure`` options env.py uses; also what a test's MigrationContext needs."""
    return {
        "target_metadata": metadata,
        "version_table": VERSION_TABLE,
        "include_name": include_name,
        "include_object": include_object,
        "render_item": render_item,
        "render_as_batch": True,  # SQLite cannot ALTER most things: batch mode copies the table
        "compare_type": True,
    }


def alembic_config(url: str | URL | None = None) -> Any:
    """An ``alembic.config.Config`` for autotune's migrations (no ini file); ``url`` optional."""
    from alembic.config import Config

    if not (ALEMBIC_DIR / "env.py").is_file():
        raise StorageError(
            f"autotune's migrations folder {ALEMBIC_DIR} is missing: reinstall autotune "
            "(pip install autotune, or pip install -e . from its source tree)"
        )
    cfg = Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    cfg.set_main_option("version_table", VERSION_TABLE)
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        # ConfigParser interpolates '%': percent-encoded passwords must be escaped.
        text = url if isinstance(url, str) else url.render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", text.replace("%", "%%"))
    return cfg


def _script() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this code knows."""
    heads = _script().get_heads()
    if len(heads) != 1:
        raise StorageError(f"autotune's migrations have {len(heads)} heads ({', '.join(heads)}); expected one")
    return str(heads[0])


@contextmanager
def migration_connection(url: str | URL) -> Iterator[Connection]:
    """A connection inside one transaction, ready for migrations, serialized against other migrators.

    SQLite: foreign keys off (a batch migration drops and recreates tables, which would otherwise
    cascade-delete child rows), ``BEGIN IMMEDIATE`` so the whole migration is one transaction that
    a second migrator waits for, and a foreign key check before commit. PostgreSQL: DDL is
    transactional; an advisory lock makes a concurrent upgrade wait, then find nothing to do.
    """
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction
                conn.commit()
            with conn.begin():
                if sqlite:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                elif conn.dialect.name == "postgresql":
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
                yield conn
                if sqlite:
                    bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if bad:
                        raise StorageError(f"migration left rows with dangling foreign keys: {bad[:5]}")
    finally:
        engine.dispose()


def _run(command: Callable[..., None], url: str | URL, revision: str, doing: str) -> None:
    cfg = alembic_config(url)
    with _ALEMBIC_LOCK, _storage_errors(url, doing), migration_connection(url) as conn:
        cfg.attributes["connection"] = conn
        command(cfg, revision)


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Create or upgrade autotune's tables (idempotent; Optuna's tables are left alone)."""
    from alembic import command

    _run(command.upgrade, url, revision, "upgrade")


def downgrade(url: str | URL, revision: str) -> None:
    """Downgrade autotune's tables to ``revision`` (``"base"`` drops them all; Optuna's stay)."""
    from alembic import command

    _run(command.downgrade, url, revision, "downgrade")


def current_revision(url: str | URL) -> str | None:
    """The revision stamped in ``autotune_alembic_version``; None when autotune's tables were never created."""
    from alembic.runtime.migration import MigrationContext

    if _sqlite_file_missing(url):
        return None
    engine = make_engine(url, poolclass=NullPool)
    try:
        with _storage_errors(url, "open"), engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            rev = ctx.get_current_revision()
            return None if rev is None else str(rev)
    finally:
        engine.dispose()


def check_schema(url: str | URL) -> str:
    """Raise :class:`StorageError` unless the database is at this code's head revision; returns it.

    Behind (or never created): tells the user to run ``autotune db upgrade``. Ahead: the database
    was upgraded by a newer autotune, which this one must not write to.
    """
    head = head_revision()
    current = current_revision(url)
    if current == head:
        return head
    known = {rev.revision for rev in _script().walk_revisions()}
    if current is None or current in known:
        at = current or "base (no autotune tables)"
        raise StorageError(
            f"database schema is at revision {at}, autotune needs {head}: "
            f"run `autotune db upgrade --storage {safe_url(url)}`"
        )
    raise StorageError(
        f"database schema is at revision {current}, newer than autotune {__version__} knows (its newest is "
        f"{head}): the database was upgraded by a newer autotune; upgrade autotune or use another --storage"
    )
