"""What a database failure means for the user: one line naming its real cause and the fix.

A read-only database file or a full disk is not a lost connection: waiting and retrying cannot cure
it, and "run the same command again" would be bad advice. Optuna wraps driver errors in its own
generic "an exception is raised during the commit"; the driver's message behind it says what
happened. No Optuna, no torch here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import text as sa_text

from autotune.errors import StorageError
from autotune.store.migrate import safe_url


def first_line(err: BaseException) -> str:
    orig = getattr(err, "orig", None) or err
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


#: Database errors that waiting or running again cannot cure, by a piece of their message
#: (SQLite's, PostgreSQL's and the OS's wording), with what the user must do.
_PERMANENT = {
    "readonly database": "the database is read-only",
    "read-only file system": "the database is on a read-only file system",
    "unable to open database file": "the database file cannot be opened for writing",
    "database or disk is full": "the disk holding the database is full",
    "no space left on device": "the disk holding the database is full",
    "could not extend file": "the disk holding the database is full",
    "disk quota exceeded": "the disk quota of the database's file system is used up",
    "in a read-only transaction": "the database only allows reading",  # PostgreSQL hot standby, read-only user
}


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def permanent_cause(exc: BaseException) -> str | None:
    """What makes a database write fail for good (a read-only file, a full disk), or None when a
    retry may help (a lost connection) or the error is not the database's."""
    for cur in error_chain(exc):
        text = str(getattr(cur, "orig", None) or cur).lower()
        for needle, what in _PERMANENT.items():
            if needle in text:
                return what
    return None


def storage_error(err: BaseException, url: str | None = None) -> StorageError:
    """A one-line StorageError for a database failure: its real cause and the fix when it is one
    that re-running cannot cure, else that the study is safe to resume."""
    where = f" ({safe_url(url)})" if url else ""
    cause = permanent_cause(err)
    if cause is None:
        return StorageError(
            f"lost the study database{where} ({first_line(_database_error(err))}); finished trials are "
            "stored: run the same command again to resume"
        )
    if "full" in cause or "quota" in cause:
        fix = "free some space, then run the same command again: finished trials are stored"
    else:
        path = sqlite_path(url) if url else None
        fix = (
            f"make {path} and its folder {path.parent} writable (SQLite writes a journal beside the file), "
            "or pass --storage with a database you can write"
            if path is not None
            else "use a database (and user) that may write, or pass another --storage"
        )
    return StorageError(f"{cause}{where}: {first_line(_database_error(err))}; {fix}")


def _database_error(exc: BaseException) -> BaseException:
    """The driver's error behind Optuna's generic "an exception is raised during the commit"."""
    for cur in error_chain(exc):
        if isinstance(cur, sa_exc.SQLAlchemyError):
            return cur
    return exc


def sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database.removeprefix("file:")).expanduser()


def is_storage_failure(exc: BaseException) -> bool:
    """A database error, raised as such or wrapped by Optuna (its StorageInternalError, named here so
    that the store needs no Optuna)."""
    wrapped = ("StorageInternalError",)
    return any(isinstance(cur, sa_exc.SQLAlchemyError) or type(cur).__name__ in wrapped for cur in error_chain(exc))


def check_storage(url: str, *, folder_may_be_created: bool = False) -> None:
    """Refuse a storage that cannot be used, without writing anything to it.

    ``autotune tune`` checks this before the (slow) preflight and before the study is created, so
    bad input or an unreachable database never leaves tables behind: SQLite's folder must exist (or,
    ``folder_may_be_created``, its nearest existing ancestor) and be writable, and so must the file;
    a server must accept a connection.
    """
    path = sqlite_path(url)
    if url.startswith("sqlite"):
        if path is None:
            return
        folder = path.parent
        while folder_may_be_created and not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise StorageError(f"cannot open storage {safe_url(url)}: folder {path.parent} does not exist")
        if path.is_dir():
            raise StorageError(f"cannot open storage {safe_url(url)}: {path} is a folder, not a database file")
        if (path.exists() and not os.access(path, os.W_OK)) or not os.access(folder, os.W_OK):
            readonly = sa_exc.OperationalError("", {}, Exception("attempt to write a readonly database"))
            raise storage_error(readonly, url)
        return
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    try:
        engine = create_engine(url, poolclass=NullPool, **engine_kwargs(url))
        try:
            with engine.connect() as conn:
                conn.execute(sa_text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as err:  # drivers and URL parsing raise many types; all mean "cannot use it"
        raise StorageError(f"cannot open storage {safe_url(url)}: {first_line(err)}") from None


def has_optuna_tables(url: str) -> bool:
    """Whether the database already holds Optuna's tables (read-only: opening Optuna's storage creates them)."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool, **engine_kwargs(url))
    try:
        return "studies" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 30}}
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 5}, "pool_pre_ping": True}
    return {}
