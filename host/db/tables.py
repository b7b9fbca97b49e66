"""ORM tables of the registry (SQLAlchemy 2.0, portable to SQLite and PostgreSQL).

The schema is created and changed only by the Alembic revisions in
``migrations/versions``; a test checks that the migrated schema matches these
classes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "VERSION_STATUSES",
    "AlertRow",
    "AliasRow",
    "ArtifactRow",
    "Base",
    "DeviceRow",
    "DriftCohortRow",
    "DriftScoreRow",
    "EventRow",
    "FLRunRow",
    "ModelRow",
    "RetrainDecisionRow",
    "RolloutDeviceRow",
    "RolloutRow",
    "TelemetryRow",
    "UTCDateTime",
    "VersionRow",
    "utcnow",
]

VERSION_STATUSES = ("ready", "rejected")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Now, in UTC, to the second (what the registry stores and signs)."""
    return datetime.now(UTC).replace(microsecond=0)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy's declared class attribute
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class ModelRow(Base):
    """A model name; its versions are numbered 1, 2, … in registration order."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]

    versions: Mapped[list[VersionRow]] = relationship(
        back_populates="model", order_by="VersionRow.number", passive_deletes=True
    )
    aliases: Mapped[list[AliasRow]] = relationship(back_populates="model", passive_deletes=True)


class VersionRow(Base):
    """One registered version: lineage, metrics, gate results and (if ready) its manifest."""

    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("model_id", "number"),
        CheckConstraint("status IN ('ready', 'rejected')", name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    number: Mapped[int]
    status: Mapped[str] = mapped_column(String(16))
    recipe: Mapped[str | None] = mapped_column(String(128))
    code_version: Mapped[str | None] = mapped_column(String(128))
    data_fingerprint: Mapped[str | None] = mapped_column(String(128))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    parent_version: Mapped[int | None]
    lineage: Mapped[dict[str, Any]]
    lineage_sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]]
    gates: Mapped[list[Any]]
    rejection_reasons: Mapped[list[Any]]
    preprocess: Mapped[str] = mapped_column(String(128))
    classes: Mapped[list[Any]]
    reference_sha256: Mapped[str] = mapped_column(String(64))
    reference_size: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[dict[str, Any] | None]
    manifest_sha256: Mapped[str | None] = mapped_column(String(64))
    expires_at: Mapped[datetime | None]
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]

    model: Mapped[ModelRow] = relationship(back_populates="versions")
    artifacts: Mapped[list[ArtifactRow]] = relationship(
        back_populates="version", order_by="ArtifactRow.id", passive_deletes=True
    )


class ArtifactRow(Base):
    """One model file of a version (a blob in the content-addressed store)."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", ondelete="CASCADE"), index=True
    )
    format: Mapped[str] = mapped_column(String(16))
    precision: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    role: Mapped[str] = mapped_column(String(32))
    runtime: Mapped[str] = mapped_column(String(64))
    input_spec: Mapped[dict[str, Any]]
    output_spec: Mapped[dict[str, Any]]
    chunk_size: Mapped[int]
    arena_bytes: Mapped[int | None] = mapped_column(BigInteger)
    min_ram_bytes: Mapped[int | None] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]]

    version: Mapped[VersionRow] = relationship(back_populates="artifacts")


class AliasRow(Base):
    """A movable name (``production``, ``canary``…) pointing at one version of a model."""

    __tablename__ = "aliases"

    model_id: Mapped[int] = mapped_column(
        ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    updated_at: Mapped[datetime]

    model: Mapped[ModelRow] = relationship(back_populates="aliases")
    version: Mapped[VersionRow] = relationship()


# ----------------------------------------------------------------------------- fleet


class DeviceRow(Base):
    """A device as the host knows it: presence, last reported state, desired state."""

    __tablename__ = "devices"

    fleet: Mapped[str] = mapped_column(String(64), primary_key=True)
    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    profile: Mapped[str | None] = mapped_column(String(64))
    tags: Mapped[list[Any]]
    groups: Mapped[list[Any]]
    agent_version: Mapped[str | None] = mapped_column(String(64))
    capabilities: Mapped[dict[str, Any] | None]
    session: Mapped[int] = mapped_column(BigInteger, default=0)
    online: Mapped[bool] = mapped_column(default=False)
    last_seen: Mapped[datetime | None]
    reported: Mapped[dict[str, Any] | None]
    reported_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    active_model: Mapped[str | None] = mapped_column(String(64))
    active_version: Mapped[int | None] = mapped_column(BigInteger)
    active_sha256: Mapped[str | None] = mapped_column(String(64))
    phase: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[dict[str, Any] | None]
    desired: Mapped[dict[str, Any] | None]
    desired_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime]


class TelemetryRow(Base):
    """One telemetry record; ``(fleet, device, session, seq)`` makes ingest idempotent."""

    __tablename__ = "telemetry"
    __table_args__ = (UniqueConstraint("fleet", "device", "session", "seq"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    fleet: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(64))
    session: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(96))
    body: Mapped[dict[str, Any]]
    received_at: Mapped[datetime]


Index(
    "ix_telemetry_device_kind_ts",
    TelemetryRow.fleet,
    TelemetryRow.device,
    TelemetryRow.kind,
    TelemetryRow.ts,
)


class EventRow(Base):
    """A device event (activation, rejection …); idempotent like telemetry."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("fleet", "device", "session", "seq"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    fleet: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(64), index=True)
    session: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(String(1000))
    topic: Mapped[str | None] = mapped_column(String(256))
    received_at: Mapped[datetime]


class RolloutRow(Base):
    """A rollout of one version to a set of devices, in waves."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    target: Mapped[list[Any]]
    waves: Mapped[list[Any]]
    soak_s: Mapped[float]
    wave_timeout_s: Mapped[float]
    rules: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16), index=True)
    wave: Mapped[int] = mapped_column(default=0)
    wave_started_at: Mapped[datetime | None]
    soak_until: Mapped[datetime | None]
    command: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(1000))
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    devices: Mapped[list[RolloutDeviceRow]] = relationship(
        back_populates="rollout", order_by="RolloutDeviceRow.position", passive_deletes=True
    )


class RolloutDeviceRow(Base):
    """One device's part in a rollout."""

    __tablename__ = "rollout_devices"

    rollout_id: Mapped[str] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int]
    wave: Mapped[int]
    status: Mapped[str] = mapped_column(String(16))
    generation: Mapped[int | None] = mapped_column(BigInteger)
    previous: Mapped[dict[str, Any] | None]
    sent_at: Mapped[datetime | None]
    done_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(String(1000))

    rollout: Mapped[RolloutRow] = relationship(back_populates="devices")


# ----------------------------------------------------------------------------- drift


class DriftScoreRow(Base):
    """A device's latest drift window: scores, rule statistics and its baseline."""

    __tablename__ = "drift_scores"

    fleet: Mapped[str] = mapped_column(String(64), primary_key=True)
    device: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(BigInteger)
    session: Mapped[int] = mapped_column(BigInteger)
    window: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[datetime]
    n: Mapped[int] = mapped_column(BigInteger)
    psi_max: Mapped[float]
    ks_max: Mapped[float]
    js_prediction: Mapped[float]
    mean_confidence: Mapped[float]
    confidence_shift: Mapped[float]
    stats: Mapped[dict[str, Any]]
    baseline: Mapped[dict[str, Any] | None]
    windows: Mapped[int] = mapped_column(BigInteger)
    tags: Mapped[list[Any]]
    updated_at: Mapped[datetime]


class DriftCohortRow(Base):
    """Aggregate of a cohort's latest windows: ``tag`` × model@version, or ``*`` × model@version."""

    __tablename__ = "drift_cohorts"

    fleet: Mapped[str] = mapped_column(String(64), primary_key=True)
    cohort: Mapped[str] = mapped_column(String(200), primary_key=True)
    tag: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(BigInteger)
    devices: Mapped[int]
    alerting: Mapped[int]
    mean_psi_max: Mapped[float]
    max_psi_max: Mapped[float]
    mean_ks_max: Mapped[float]
    mean_js_prediction: Mapped[float]
    mean_confidence_shift: Mapped[float]
    updated_at: Mapped[datetime]


class AlertRow(Base):
    """A drift alert of one device (or, with ``device`` NULL, of a cohort) under one rule.

    ``open_key`` is ``device|rule`` (``@cohort|rule`` for cohort alerts) while the alert
    is open and NULL once cleared: the unique constraint keeps one open alert per
    device and rule.
    """

    __tablename__ = "alerts"
    __table_args__ = (
        UniqueConstraint("fleet", "open_key"),
        CheckConstraint("state IN ('open', 'cleared')", name="state"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    fleet: Mapped[str] = mapped_column(String(64))
    device: Mapped[str | None] = mapped_column(String(64), index=True)
    rule: Mapped[str] = mapped_column(String(32))
    cohort: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), index=True)
    open_key: Mapped[str | None] = mapped_column(String(300))
    opened_at: Mapped[datetime]
    cleared_at: Mapped[datetime | None]
    last_value: Mapped[float]
    windows: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(String(300))


class RetrainDecisionRow(Base):
    """One decision of the retrain policy about a cohort (triggered, cooldown, too few…)."""

    __tablename__ = "retrain_decisions"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    fleet: Mapped[str] = mapped_column(String(64))
    cohort: Mapped[str] = mapped_column(String(200), index=True)
    decision: Mapped[str] = mapped_column(String(32))
    devices: Mapped[list[Any]]
    cohort_size: Mapped[int]
    run_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(String(1000))
    decided_at: Mapped[datetime]


# ----------------------------------------------------------------------------- federated runs


class FLRunRow(Base):
    """A federated retraining run: cohort, settings, progress and outcome.

    ``state`` follows requested → enabling → training → evaluating → registered /
    rejected / failed (``tinyfleet.host.fl.coordinator``); ``devices`` are the eligible
    devices chosen when the run was requested, ``excluded`` those left out and why.
    """

    __tablename__ = "fl_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    model: Mapped[str] = mapped_column(String(64))
    parent_version: Mapped[int]
    cohort: Mapped[list[Any]]
    devices: Mapped[list[Any]]
    excluded: Mapped[dict[str, Any]]
    config: Mapped[dict[str, Any]]
    auto_rollout: Mapped[bool] = mapped_column(default=False)
    trigger: Mapped[str] = mapped_column(String(32))
    superlink: Mapped[str | None] = mapped_column(String(300))
    flower_run_id: Mapped[str | None] = mapped_column(String(64))
    result: Mapped[dict[str, Any] | None]
    new_version: Mapped[int | None]
    rollout_id: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(String(1000))
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
