"""Alembic environment for autotune's own tables (``autotune_*``), never Optuna's.

Driven two ways:
- from code (``autotune.store.migrate``): the open connection arrives in
  ``config.attributes["connection"]``, already inside the migration transaction;
- from the ``alembic`` command line (``alembic.ini`` at the repository root): the URL comes from
  ``-x url=...`` or the ini's ``sqlalchemy.url``.

History is stamped in ``autotune_alembic_version`` (Optuna owns ``alembic_version``) and autogenerate
only compares ``autotune_`` tables, so Optuna's tables never show up as "to be dropped".
"""

from __future__ import annotations

import logging
from logging.config import fileConfig

from sqlalchemy import Connection

from alembic import context
from autotune.store.migrate import VERSION_TABLE, migration_connection, migration_options
from autotune.store.models import metadata

config = context.config
target_metadata = metadata

if config.config_file_name is not None and not logging.getLogger().handlers:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

_configured = config.get_main_option("version_table")
if _configured and _configured != VERSION_TABLE:
    raise RuntimeError(f"version_table is {_configured!r}; autotune's history lives in {VERSION_TABLE!r}")


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: pass `-x url=URL` or set sqlalchemy.url")
    return url


def _run(connection: Connection) -> None:
    context.configure(connection=connection, **migration_options())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL (``alembic upgrade head --sql``) instead of running it."""
    context.configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"}, **migration_options())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    with migration_connection(_url()) as conn:
        _run(conn)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
