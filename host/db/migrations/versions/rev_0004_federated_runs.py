"""Federated runs: one row per run (cohort, settings, progress, outcome).

Revision ID: 0004
Revises: 0003
Created: 2026-11-26 09:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fl_runs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=False),
        sa.Column("cohort", sa.JSON(), nullable=False),
        sa.Column("devices", sa.JSON(), nullable=False),
        sa.Column("excluded", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("auto_rollout", sa.Boolean(), nullable=False),
        sa.Column("trigger", sa.String(length=32), nullable=False),
        sa.Column("superlink", sa.String(length=300), nullable=True),
        sa.Column("flower_run_id", sa.String(length=64), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("new_version", sa.Integer(), nullable=True),
        sa.Column("rollout_id", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.String(length=1000), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fl_runs")),
    )
    with op.batch_alter_table("fl_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_fl_runs_state"), ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("fl_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fl_runs_state"))
    op.drop_table("fl_runs")
