"""Reference outputs for quality-aware tuning, one row per study and evaluation set.

Revision ID: 0003_autotune_references
Revises: 0002_autotune_trial_metrics
Create Date: 2026-11-27

The reference model's top-k log-probabilities and greedy continuations are computed once per
study and read by every worker; each trial's fidelity figures go to the trial's ``metrics``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003_autotune_references"
down_revision: str | None = "0002_autotune_trial_metrics"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "autotune_references",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("perplexity", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["autotune_studies.id"],
            name=op.f("fk_autotune_references_study_id_autotune_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_autotune_references")),
        sa.UniqueConstraint("study_id", "key", name=op.f("uq_autotune_references_study_id_key")),
    )
    op.create_index(op.f("ix_autotune_references_study_id"), "autotune_references", ["study_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_autotune_references_study_id"), table_name="autotune_references")
    op.drop_table("autotune_references")
