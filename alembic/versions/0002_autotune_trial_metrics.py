"""Trial metrics added with the GPU path: prefill latency, memory figures, roofline fractions.

Revision ID: 0002_autotune_trial_metrics
Revises: 0001_autotune_initial
Create Date: 2026-11-27

One JSON column rather than a column per figure: these are per-device (NVML exists on GPUs
only) and will keep growing; the dashboard reads them whole. Rows written before this revision
get NULL, which reads back as "not measured".
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002_autotune_trial_metrics"
down_revision: str | None = "0001_autotune_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("autotune_trials") as batch:
        batch.add_column(sa.Column("metrics", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("autotune_trials") as batch:
        batch.drop_column("metrics")
