"""Drift tables: latest scores per device, cohort aggregates, alerts, retrain decisions.

Revision ID: 0003
Revises: 0002
Created: 2026-11-26 09:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _utc(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _id() -> sa.Column[object]:
    return sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        autoincrement=True,
        nullable=False,
    )


def upgrade() -> None:
    op.create_table(
        "drift_scores",
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("session", sa.BigInteger(), nullable=False),
        sa.Column("window", sa.BigInteger(), nullable=False),
        _utc("ts"),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("psi_max", sa.Double(), nullable=False),
        sa.Column("ks_max", sa.Double(), nullable=False),
        sa.Column("js_prediction", sa.Double(), nullable=False),
        sa.Column("mean_confidence", sa.Double(), nullable=False),
        sa.Column("confidence_shift", sa.Double(), nullable=False),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.Column("baseline", sa.JSON(), nullable=True),
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        _utc("updated_at"),
        sa.PrimaryKeyConstraint("fleet", "device", name=op.f("pk_drift_scores")),
    )
    op.create_table(
        "drift_cohorts",
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("cohort", sa.String(length=200), nullable=False),
        sa.Column("tag", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("alerting", sa.Integer(), nullable=False),
        sa.Column("mean_psi_max", sa.Double(), nullable=False),
        sa.Column("max_psi_max", sa.Double(), nullable=False),
        sa.Column("mean_ks_max", sa.Double(), nullable=False),
        sa.Column("mean_js_prediction", sa.Double(), nullable=False),
        sa.Column("mean_confidence_shift", sa.Double(), nullable=False),
        _utc("updated_at"),
        sa.PrimaryKeyConstraint("fleet", "cohort", name=op.f("pk_drift_cohorts")),
    )
    op.create_table(
        "alerts",
        _id(),
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=True),
        sa.Column("rule", sa.String(length=32), nullable=False),
        sa.Column("cohort", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("open_key", sa.String(length=300), nullable=True),
        _utc("opened_at"),
        _utc("cleared_at", nullable=True),
        sa.Column("last_value", sa.Double(), nullable=False),
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(length=300), nullable=True),
        sa.CheckConstraint("state IN ('open', 'cleared')", name=op.f("ck_alerts_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        sa.UniqueConstraint("fleet", "open_key", name=op.f("uq_alerts_fleet_open_key")),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alerts_device"), ["device"], unique=False)
        batch_op.create_index(batch_op.f("ix_alerts_state"), ["state"], unique=False)
    op.create_table(
        "retrain_decisions",
        _id(),
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("cohort", sa.String(length=200), nullable=False),
        sa.Column("decision", sa.String(length=32), nullable=False),
        sa.Column("devices", sa.JSON(), nullable=False),
        sa.Column("cohort_size", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.String(length=1000), nullable=True),
        _utc("decided_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrain_decisions")),
    )
    with op.batch_alter_table("retrain_decisions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_retrain_decisions_cohort"), ["cohort"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("retrain_decisions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_retrain_decisions_cohort"))
    op.drop_table("retrain_decisions")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alerts_state"))
        batch_op.drop_index(batch_op.f("ix_alerts_device"))
    op.drop_table("alerts")
    op.drop_table("drift_cohorts")
    op.drop_table("drift_scores")
