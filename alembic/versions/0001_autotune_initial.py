"""autotune's initial tables: studies, trials, exports.

Revision ID: 0001_autotune_initial
Revises:
Create Date: 2025-11-27

Written by hand and checked against ``autotune.store.models`` (autogenerate reports no difference
at this revision). Timestamps are ``timestamptz`` on PostgreSQL; the models read them back as UTC.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0001_autotune_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LATENCY_METRICS = ("e2e", "ttft", "tpot", "queue")
LATENCY_STATS = ("p50", "p90", "p95", "p99", "mean", "max")


def upgrade() -> None:
    op.create_table(
        "autotune_studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=512), nullable=False),
        sa.Column("optuna_study_id", sa.Integer(), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("hardware", sa.JSON(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("model_ref", sa.String(length=512), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('running', 'finished', 'failed')", name=op.f("ck_autotune_studies_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_autotune_studies")),
        sa.UniqueConstraint("name", name=op.f("uq_autotune_studies_name")),
    )

    latency_columns = [
        sa.Column(f"{metric}_{stat}_ms", sa.Float(), nullable=True)
        for metric in LATENCY_METRICS
        for stat in LATENCY_STATS
    ]
    op.create_table(
        "autotune_trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("trial_number", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("config_key", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("feasible", sa.Boolean(), nullable=True),
        sa.Column("constraints", sa.JSON(), nullable=True),
        sa.Column("duplicate_of", sa.Integer(), nullable=True),
        sa.Column("output_tokens_per_s", sa.Float(), nullable=True),
        sa.Column("requests_per_s", sa.Float(), nullable=True),
        sa.Column("requests", sa.Integer(), nullable=True),
        sa.Column("output_tokens", sa.Integer(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("mean_batch_rows", sa.Float(), nullable=True),
        sa.Column("stopped_by", sa.String(length=32), nullable=True),
        *latency_columns,
        sa.Column("peak_memory_mb", sa.Float(), nullable=True),
        sa.Column("memory_kind", sa.String(length=32), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("latency_histogram", sa.JSON(), nullable=True),
        sa.Column("e2e_samples", sa.JSON(), nullable=True),
        sa.Column("failure_kind", sa.String(length=32), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("log_excerpt", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("device", sa.String(length=64), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('measured', 'infeasible', 'failed', 'rejected', 'duplicate')",
            name=op.f("ck_autotune_trials_state"),
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["autotune_studies.id"],
            name=op.f("fk_autotune_trials_study_id_autotune_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_autotune_trials")),
        sa.UniqueConstraint("study_id", "trial_number", name=op.f("uq_autotune_trials_study_id_trial_number")),
    )
    with op.batch_alter_table("autotune_trials", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_autotune_trials_study_id"), ["study_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_autotune_trials_study_id_config_key"), ["study_id", "config_key"], unique=False
        )

    op.create_table(
        "autotune_exports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("trial_number", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["autotune_studies.id"],
            name=op.f("fk_autotune_exports_study_id_autotune_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_autotune_exports")),
        sa.UniqueConstraint("study_id", "version", name=op.f("uq_autotune_exports_study_id_version")),
    )
    with op.batch_alter_table("autotune_exports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_autotune_exports_study_id"), ["study_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("autotune_exports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_autotune_exports_study_id"))
    op.drop_table("autotune_exports")

    with op.batch_alter_table("autotune_trials", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_autotune_trials_study_id_config_key"))
        batch_op.drop_index(batch_op.f("ix_autotune_trials_study_id"))
    op.drop_table("autotune_trials")

    op.drop_table("autotune_studies")
