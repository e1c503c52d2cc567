"""autotune's own tables (``autotune_*``) beside Optuna's, migrated by Alembic.

Optuna keeps driving the search in its own tables; this store keeps what autotune reads back
(studies, per-trial measurements with explicit percentile columns, versioned exports) in a schema
it owns and migrates itself (version table ``autotune_alembic_version``). No torch here.
"""

from __future__ import annotations

from autotune.store.migrate import (
    VERSION_TABLE,
    alembic_config,
    check_schema,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    migration_options,
    upgrade,
)
from autotune.store.models import (
    STUDY_STATUSES,
    TABLE_PREFIX,
    TRIAL_STATES,
    Base,
    Export,
    Reference,
    Study,
    Trial,
    metadata,
)
from autotune.store.repository import (
    Repository,
    default_worker,
    histogram,
    measurement_columns,
    measurement_dict,
)

__all__ = [
    "STUDY_STATUSES",
    "TABLE_PREFIX",
    "TRIAL_STATES",
    "VERSION_TABLE",
    "Base",
    "Export",
    "Reference",
    "Repository",
    "Study",
    "Trial",
    "alembic_config",
    "check_schema",
    "current_revision",
    "default_worker",
    "downgrade",
    "head_revision",
    "histogram",
    "make_engine",
    "measurement_columns",
    "measurement_dict",
    "metadata",
    "migration_options",
    "upgrade",
]
