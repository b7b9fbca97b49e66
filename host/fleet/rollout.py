"""Rollouts: a version to a set of devices, in waves, gated on health, rolled back on abort.

The orchestrator keeps no state of its own: every rollout and every device's
part in it is a database row, and ``step()`` moves each active rollout forward
from what the rows and the devices' reported states say.  A host restart
therefore resumes a rollout where it stopped; operator commands (pause, resume,
abort, rollback) are written to the rollout's row by whoever issues them (CLI,
API) and applied at the next step.

Waves are cumulative targets: ``1,10%,50%,100%`` means one canary device, then
enough to reach 10 % of the targets, then 50 %, then all.  Each wave publishes
desired state to its devices, waits until each one reports success, failure or
times out, soaks for ``soak_s`` while telemetry arrives, checks the abort rules,
then goes on.  An abort sends every touched device its previous model back
(an explicit, signed rollback); devices never reached keep what they have.
"""

from __future__ import annotations

import logging
import re
import secrets
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from tinyfleet.agent.protocol import (
    DeviceRolloutStatus,
    RolloutEvent,
    RolloutPhase,
    rollout_transition,
)
from tinyfleet.host.db.engine import storage_errors, writer
from tinyfleet.host.db.tables import DeviceRow, RolloutDeviceRow, RolloutRow, TelemetryRow
from tinyfleet.host.errors import NotFoundError, RegistryError, UsageError
from tinyfleet.host.fleet.publish import ArtifactPublisher, DesiredPublisher
from tinyfleet.host.registry import Registry, VersionInfo

ACTIVE = (
    RolloutPhase.PENDING,
    RolloutPhase.RUNNING,
    RolloutPhase.SOAKING,
    RolloutPhase.PAUSED,
    RolloutPhase.ABORTING,
)
TOUCHED = (
    DeviceRolloutStatus.DESIRED_SENT,
    DeviceRolloutStatus.SUCCEEDED,
    DeviceRolloutStatus.FAILED,
    DeviceRolloutStatus.TIMED_OUT,
)
DONE = (DeviceRolloutStatus.SUCCEEDED, DeviceRolloutStatus.FAILED, DeviceRolloutStatus.TIMED_OUT)
COMMANDS = ("pause", "resume", "abort", "rollback", "cancel")
P99_CHECK_INTERVAL_S = 2.0
"""How often the latency-regression rule reads telemetry (inference windows arrive slowly)."""
LATENCY_WINDOWS = 20
"""Newest inference windows per device and version that the latency rule compares."""
RESYNC_AFTER_S = 5.0
"""A device that has not answered a desired state this long after it was sent has its
retained reported state asked for again (its report may have been dropped on the way:
a broker queue full while the host was slow)."""
RESYNC_INTERVAL_S = 10.0
"""At most this often per device."""
_WAVE = re.compile(r"^(?:(\d+)|(\d+(?:\.\d+)?)%)$")


def utcnow() -> datetime:
    return datetime.now(UTC)


class AbortRules(BaseModel):
    """When a rollout stops and rolls back."""

    model_config = ConfigDict(extra="forbid")

    max_failure_pct: float = Field(0.0, ge=0, le=100, description="Failed (and timed-out) share.")
    min_devices: int = Field(1, ge=1, description="Devices done before the failure rule applies.")
    count_timeouts: bool = True
    max_offline_pct: float = Field(50.0, ge=0, le=100, description="Touched devices offline.")
    offline_grace_s: float = Field(
        60.0,
        ge=0,
        description="A device counts as offline only after this long (a broker restart "
        "fires every device's last will for a moment).",
    )
    max_p99_regression: float | None = Field(
        2.0, gt=1.0, description="New p99 latency / previous version's on the same devices."
    )
    min_latency_windows: int = Field(2, ge=1)


class RolloutSpec(BaseModel):
    """What ``tinyfleet rollout start`` asks for."""

    model_config = ConfigDict(extra="forbid")

    ref: str
    targets: list[str] = Field(min_length=1)
    waves: list[str] = Field(default_factory=lambda: ["1", "10%", "50%", "100%"])
    soak_s: float = Field(30.0, ge=0)
    wave_timeout_s: float = Field(300.0, gt=0)
    artifact: str = "tflite-int8"
    rules: AbortRules = Field(default_factory=AbortRules)

    @field_validator("waves")
    @classmethod
    def _waves(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one wave")
        for w in v:
            m = _WAVE.match(w.strip())
            if m is None:
                raise ValueError(f"wave {w!r}: expected a device count (5) or a percentage (10%)")
            if m.group(1) is not None and int(m.group(1)) < 1:
                raise ValueError(f"wave {w!r}: at least one device")
            if m.group(2) is not None and not 0 < float(m.group(2)) <= 100:
                raise ValueError(f"wave {w!r}: a percentage in (0, 100]")
        return [w.strip() for w in v]

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        for t in v:
            kind, sep, value = t.partition(":")
            if sep and kind not in ("tag", "group", "device"):
                raise ValueError(f"target {t!r}: use a device id, tag:NAME, group:NAME or all")
            if sep and not value:
                raise ValueError(f"target {t!r}: empty name")
        return v


def plan_waves(devices: Sequence[str], waves: Sequence[str]) -> list[list[str]]:
    """Split ``devices`` (in rollout order) into waves of cumulative sizes; empty waves dropped."""
    n = len(devices)
    out: list[list[str]] = []
    done = 0
    for w in waves:
        m = _WAVE.match(w)
        assert m is not None
        target = int(m.group(1)) if m.group(1) else -(-int(float(m.group(2)) * n) // 100)
        target = min(n, max(target, done))
        if target > done:
            out.append(list(devices[done:target]))
            done = target
    if done < n:
        out.append(list(devices[done:]))
    return out


def resolve_targets(s: Session, fleet: str, targets: Sequence[str]) -> list[str]:
    """Device ids matching any target, in a stable order (by id)."""
    rows = s.execute(
        select(DeviceRow.device, DeviceRow.tags, DeviceRow.groups).where(DeviceRow.fleet == fleet)
    ).all()
    chosen: set[str] = set()
    for t in targets:
        kind, sep, value = t.partition(":")
        if t in ("all", "*"):
            chosen.update(r.device for r in rows)
        elif kind == "tag" and sep:
            chosen.update(r.device for r in rows if value in (r.tags or []))
        elif kind == "group" and sep:
            chosen.update(r.device for r in rows if value in (r.groups or []))
        else:
            name = value if kind == "device" and sep else t
            if any(r.device == name for r in rows):
                chosen.add(name)
            else:
                raise UsageError(f"target {t!r}: no such device in fleet {fleet}")
    return sorted(chosen)


def pick_artifact(version: VersionInfo, which: str) -> str:
    fmt, _, precision = which.partition("-")
    for a in version.artifacts:
        if a.format == fmt and a.precision == precision:
            return a.sha256
    have = ", ".join(f"{a.format}-{a.precision}" for a in version.artifacts)
    raise UsageError(f"{version.ref} has no {which} artifact (it has: {have})")


@dataclass
class RolloutView:
    """A rollout and its devices, for status displays."""

    row: dict[str, Any]
    devices: list[dict[str, Any]]
    counts: dict[str, int]


class Orchestrator:
    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        desired: DesiredPublisher,
        artifacts: ArtifactPublisher,
        fleet: str,
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.desired = desired
        self.artifacts = artifacts
        self.fleet = fleet
        self.log = logger or logging.getLogger("tinyfleet.host.rollout")
        self._versions: dict[str, VersionInfo] = {}
        # rollout id -> (when the latency rule last read telemetry, the ratio it found)
        self._p99_checked: dict[str, tuple[datetime, float | None]] = {}
        # device -> when its retained reported state was last asked for again
        self._resynced: dict[str, datetime] = {}

    # ------------------------------------------------------------------ commands

    def create(self, spec: RolloutSpec, created_by: str) -> str:
        """Check eligibility and store a pending rollout (the service starts it)."""
        version = self.registry.get(spec.ref)
        if version.status != "ready" or version.manifest is None:
            raise RegistryError(
                f"{version.ref} is {version.status}; only gate-passing versions roll out"
            )
        report = self.registry.verify(version.ref, self.desired.signer.public_key)
        if not report.ok:
            raise RegistryError(f"{version.ref} fails verification: {'; '.join(report.problems)}")
        sha = pick_artifact(version, spec.artifact)
        # writer(): read-then-insert takes SQLite's write lock at BEGIN and waits for the
        # ingest, instead of failing with "database is locked" when it commits in between.
        with (
            storage_errors(self.engine, "creating a rollout"),
            Session(writer(self.engine)) as s,
            s.begin(),
        ):
            devices = resolve_targets(s, self.fleet, spec.targets)
            if not devices:
                raise UsageError(
                    f"no device in fleet {self.fleet} matches {', '.join(spec.targets)}"
                )
            busy = s.execute(
                select(RolloutDeviceRow.device, RolloutRow.id)
                .join(RolloutRow)
                .where(
                    RolloutRow.fleet == self.fleet,
                    RolloutRow.state.in_([p.value for p in ACTIVE]),
                    RolloutDeviceRow.device.in_(devices),
                )
            ).first()
            if busy is not None:
                raise RegistryError(
                    f"device {busy[0]} is in rollout {busy[1]}, which is still active"
                )
            rid = f"r-{utcnow():%Y%m%d}-{secrets.token_hex(3)}"
            now = utcnow()
            s.add(
                RolloutRow(
                    id=rid,
                    fleet=self.fleet,
                    model=version.model,
                    version=version.number,
                    artifact_sha256=sha,
                    target=list(spec.targets),
                    waves=list(spec.waves),
                    soak_s=spec.soak_s,
                    wave_timeout_s=spec.wave_timeout_s,
                    rules=spec.rules.model_dump(),
                    state=RolloutPhase.PENDING.value,
                    wave=0,
                    created_by=created_by,
                    created_at=now,
                    updated_at=now,
                )
            )
        return rid

    def command(self, rollout_id: str, command: str) -> None:
        if command not in COMMANDS:
            raise UsageError(
                f"unknown rollout command {command!r}; use one of {', '.join(COMMANDS)}"
            )
        with (
            storage_errors(self.engine, f"{command} of rollout {rollout_id}"),
            Session(writer(self.engine)) as s,
            s.begin(),
        ):
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise NotFoundError(f"no rollout {rollout_id}")
            phase = RolloutPhase(row.state)
            allowed = {
                "pause": (RolloutPhase.PENDING, RolloutPhase.RUNNING, RolloutPhase.SOAKING),
                "resume": (RolloutPhase.PAUSED,),
                "abort": (
                    RolloutPhase.PENDING,
                    RolloutPhase.RUNNING,
                    RolloutPhase.SOAKING,
                    RolloutPhase.PAUSED,
                ),
                "rollback": (
                    RolloutPhase.RUNNING,
                    RolloutPhase.SOAKING,
                    RolloutPhase.PAUSED,
                    RolloutPhase.COMPLETED,
                ),
                "cancel": (
                    RolloutPhase.PENDING,
                    RolloutPhase.RUNNING,
                    RolloutPhase.SOAKING,
                    RolloutPhase.PAUSED,
                ),
            }[command]
            if phase not in allowed:
                raise RegistryError(f"rollout {rollout_id} is {phase.value}; cannot {command} it")
            row.command = command
            row.updated_at = utcnow()
            if command == "rollback" and phase is RolloutPhase.COMPLETED:
                row.state = (
                    RolloutPhase.ACTIVE.value if hasattr(RolloutPhase, "ACTIVE") else row.state
                )

    # ------------------------------------------------------------------ views

    def view(self, rollout_id: str) -> RolloutView:
        with Session(self.engine) as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise NotFoundError(f"no rollout {rollout_id}")
            return self._view(row)

    def list_rollouts(self, limit: int = 50) -> list[RolloutView]:
        with Session(self.engine) as s:
            rows = s.scalars(
                select(RolloutRow)
                .where(RolloutRow.fleet == self.fleet)
                .order_by(RolloutRow.created_at.desc())
                .limit(limit)
            ).all()
            return [self._view(r) for r in rows]

    @staticmethod
    def _view(row: RolloutRow) -> RolloutView:
        devices = [
            {
                "device": d.device,
                "wave": d.wave,
                "status": d.status,
                "generation": d.generation,
                "previous": d.previous,
                "error": d.error,
                "sent_at": d.sent_at,
                "done_at": d.done_at,
            }
            for d in row.devices
        ]
        counts: dict[str, int] = {}
        for d in row.devices:
            counts[d.status] = counts.get(d.status, 0) + 1
        r = {
            c: getattr(row, c)
            for c in (
                "id",
                "model",
                "version",
                "artifact_sha256",
                "target",
                "waves",
                "soak_s",
                "wave_timeout_s",
                "rules",
                "state",
                "wave",
                "command",
                "reason",
                "created_by",
                "created_at",
                "updated_at",
                "soak_until",
            )
        }
        r["waves_total"] = 1 + max((d.wave for d in row.devices), default=0)
        return RolloutView(r, devices, counts)

    # ------------------------------------------------------------------ the loop

    def step(self, now: datetime | None = None) -> None:
        """Move every active rollout forward once."""
        now = now or utcnow()
        with Session(self.engine) as s:
            ids = s.scalars(
                select(RolloutRow.id).where(
                    RolloutRow.fleet == self.fleet,
                    (RolloutRow.state.in_([p.value for p in ACTIVE]))
                    | RolloutRow.command.is_not(None),
                )
            ).all()
        for rid in ids:
            try:
                self._step_one(rid, now)
            except Exception:
                self.log.exception("rollout %s: step failed; will retry", rid)

    def _version(self, model: str, number: int) -> VersionInfo:
        key = f"{model}@{number}"
        if key not in self._versions:
            self._versions[key] = self.registry.get(key)
        return self._versions[key]

    def _step_one(self, rid: str, now: datetime) -> None:
        publish: list[tuple[str, bytes]] = []
        resync: list[str] = []
        # writer(): SQLite's write lock is taken at BEGIN, so a step waits for the ingest
        # instead of failing half-way on "database is locked".
        with Session(writer(self.engine)) as s, s.begin():
            row = s.get(RolloutRow, rid, with_for_update=True)
            if row is None:
                return
            phase = RolloutPhase(row.state)
            phase = self._apply_command(row, phase)
            if phase is RolloutPhase.PENDING:
                phase = self._plan(s, row, now)
            if phase in (RolloutPhase.RUNNING, RolloutPhase.SOAKING):
                version = self._version(row.model, row.version)
                self.artifacts.ensure(row.artifact_sha256)
                self.artifacts.ensure(version.reference.sha256)
            if phase is RolloutPhase.RUNNING:
                phase = self._run_wave(s, row, now, publish, resync)
            if phase in (RolloutPhase.RUNNING, RolloutPhase.SOAKING):
                reason = self._abort_reason(s, row, now)
                if reason is not None:
                    row.reason = reason
                    self.log.warning("rollout %s: aborting: %s", rid, reason)
                    phase = rollout_transition(phase, RolloutEvent.ABORT)
            if (
                phase is RolloutPhase.SOAKING
                and row.soak_until is not None
                and now >= row.soak_until
            ):
                last = max(d.wave for d in row.devices)
                if row.wave < last:
                    row.wave += 1
                    row.wave_started_at = now
                    row.soak_until = None
                    phase = rollout_transition(phase, RolloutEvent.NEXT_WAVE)
                    phase = self._run_wave(s, row, now, publish, resync)
                else:
                    phase = rollout_transition(phase, RolloutEvent.FINISH)
            if phase is RolloutPhase.ABORTING:
                phase = self._roll_back(s, row, publish)
            if row.state != phase.value:
                self.log.info(
                    "rollout %s: %s -> %s (wave %s)", rid, row.state, phase.value, row.wave
                )
                row.state = phase.value
                row.updated_at = now
        # publish only what the database now says (after commit)
        for device, payload in publish:
            self.desired.publish(device, payload)
        if resync:
            self.desired.resync_reported(resync)

    def _apply_command(self, row: RolloutRow, phase: RolloutPhase) -> RolloutPhase:
        cmd, row.command = row.command, None
        if cmd is None:
            return phase
        event = {
            "pause": RolloutEvent.PAUSE,
            "resume": RolloutEvent.RESUME,
            "abort": RolloutEvent.ABORT,
            "rollback": RolloutEvent.ABORT,
            "cancel": RolloutEvent.CANCEL,
        }[cmd]
        try:
            new = rollout_transition(phase, event)
        except Exception:
            self.log.info("rollout %s: ignored %s in %s", row.id, cmd, phase.value)
            return phase
        if event is RolloutEvent.ABORT:
            row.reason = f"{cmd} requested by an operator"
        return new

    def _plan(self, s: Session, row: RolloutRow, now: datetime) -> RolloutPhase:
        devices = resolve_targets(s, row.fleet, row.target)
        by_id = {
            d.device: d
            for d in s.scalars(
                select(DeviceRow).where(DeviceRow.fleet == row.fleet, DeviceRow.device.in_(devices))
            )
        }
        # canaries first: online devices, then by id
        order = sorted(devices, key=lambda d: (not by_id[d].online, d))
        for w, wave in enumerate(plan_waves(order, row.waves)):
            for dev in wave:
                d = by_id[dev]
                prev = None
                if d.active_model is not None and d.active_version is not None:
                    prev = {
                        "model": d.active_model,
                        "version": d.active_version,
                        "sha256": d.active_sha256,
                    }
                s.add(
                    RolloutDeviceRow(
                        rollout_id=row.id,
                        device=dev,
                        position=order.index(dev),
                        wave=w,
                        status=DeviceRolloutStatus.PENDING.value,
                        previous=prev,
                    )
                )
        s.flush()
        s.refresh(row)
        row.wave = 0
        row.wave_started_at = now
        return rollout_transition(RolloutPhase.PENDING, RolloutEvent.START)

    def _run_wave(
        self,
        s: Session,
        row: RolloutRow,
        now: datetime,
        publish: list[tuple[str, bytes]],
        resync: list[str],
    ) -> RolloutPhase:
        version = self._version(row.model, row.version)
        wave = [d for d in row.devices if d.wave == row.wave]
        ids = [d.device for d in wave]
        # only the columns the decision needs: full rows carry the reported and desired JSON
        states = {
            r.device: r
            for r in s.execute(
                select(
                    DeviceRow.device,
                    DeviceRow.reported_generation,
                    DeviceRow.active_sha256,
                    DeviceRow.error,
                ).where(DeviceRow.fleet == row.fleet, DeviceRow.device.in_(ids))
            )
        }
        timeout = timedelta(seconds=row.wave_timeout_s)
        for d in wave:
            status = DeviceRolloutStatus(d.status)
            if status is DeviceRolloutStatus.PENDING:
                gen, payload = self.desired.assign(
                    s, d.device, version, row.artifact_sha256, rollout_id=row.id
                )
                d.generation = gen
                d.status = DeviceRolloutStatus.DESIRED_SENT.value
                d.sent_at = now
                publish.append((d.device, payload))
                continue
            if status in (DeviceRolloutStatus.DESIRED_SENT, DeviceRolloutStatus.TIMED_OUT):
                dev = states.get(d.device)
                gen = d.generation or 0
                err = (dev.error or {}) if dev is not None else {}
                if (
                    dev is not None
                    and dev.reported_generation >= gen
                    and dev.active_sha256 == row.artifact_sha256
                ):
                    d.status = DeviceRolloutStatus.SUCCEEDED.value
                    d.done_at = now
                    d.error = None
                elif dev is not None and int(err.get("generation") or 0) >= gen:
                    # it processed this (or a later) desired state and reports why it failed
                    d.status = DeviceRolloutStatus.FAILED.value
                    d.done_at = now
                    d.error = f"{err.get('code', 'unknown')}: {err.get('message', '')}"[:1000]
                elif (
                    status is DeviceRolloutStatus.DESIRED_SENT
                    and d.sent_at is not None
                    and now - d.sent_at >= timeout
                ):
                    d.status = DeviceRolloutStatus.TIMED_OUT.value
                    d.done_at = now
                    d.error = f"no report within {row.wave_timeout_s:g} s"
                elif d.sent_at is not None and now - d.sent_at >= timedelta(seconds=RESYNC_AFTER_S):
                    last = self._resynced.get(d.device)
                    if last is None or now - last >= timedelta(seconds=RESYNC_INTERVAL_S):
                        self._resynced[d.device] = now
                        resync.append(d.device)
        if all(DeviceRolloutStatus(d.status) in DONE for d in wave):
            row.soak_until = now + timedelta(seconds=row.soak_s)
            return rollout_transition(RolloutPhase.RUNNING, RolloutEvent.WAVE_DONE)
        return RolloutPhase.RUNNING

    def _abort_reason(self, s: Session, row: RolloutRow, now: datetime) -> str | None:
        rules = AbortRules.model_validate(row.rules)
        touched = [d for d in row.devices if DeviceRolloutStatus(d.status) in TOUCHED]
        done = [d for d in touched if DeviceRolloutStatus(d.status) in DONE]
        bad_states = {DeviceRolloutStatus.FAILED.value}
        if rules.count_timeouts:
            bad_states.add(DeviceRolloutStatus.TIMED_OUT.value)
        bad = [d for d in done if d.status in bad_states]
        if len(done) >= rules.min_devices and done:
            pct = 100.0 * len(bad) / len(done)
            if pct > rules.max_failure_pct:
                first = bad[0] if bad else None
                detail = f" (e.g. {first.device}: {first.error})" if first is not None else ""
                return f"{len(bad)} of {len(done)} devices failed ({pct:.0f} % > {rules.max_failure_pct:g} %){detail}"
        if touched:
            ids = [d.device for d in touched]
            since = now - timedelta(seconds=rules.offline_grace_s)
            n_off = int(
                s.scalar(
                    select(func.count())
                    .select_from(DeviceRow)
                    .where(
                        DeviceRow.fleet == row.fleet,
                        DeviceRow.device.in_(ids),
                        DeviceRow.online.is_(False),
                        (DeviceRow.last_seen.is_(None)) | (DeviceRow.last_seen < since),
                    )
                )
                or 0
            )
            pct = 100.0 * n_off / len(touched)
            if n_off and pct > rules.max_offline_pct:
                return (
                    f"{n_off} of {len(touched)} touched devices offline for over "
                    f"{rules.offline_grace_s:g} s ({pct:.0f} % > {rules.max_offline_pct:g} %)"
                )
        if rules.max_p99_regression is not None:
            checked = self._p99_checked.get(row.id)
            if checked is None or (now - checked[0]).total_seconds() >= P99_CHECK_INTERVAL_S:
                checked = (now, self._p99_ratio(s, row, rules))
                self._p99_checked[row.id] = checked
            ratio = checked[1]
            if ratio is not None and ratio > rules.max_p99_regression:
                return f"p99 latency regressed {ratio:.2f}x against the previous version (limit {rules.max_p99_regression:g}x)"
        return None

    def _p99_ratio(self, s: Session, row: RolloutRow, rules: AbortRules) -> float | None:
        """Median over devices of (new p99 / previous version's p99), from inference windows.

        One query for the whole rollout: the newest ``LATENCY_WINDOWS`` inference windows
        of each succeeded device under the new and under its previous version.
        """
        label = f"{row.model}@{row.version}"
        previous: dict[str, str] = {}
        for d in row.devices:
            if d.status == DeviceRolloutStatus.SUCCEEDED.value and d.previous:
                previous[d.device] = f"{d.previous['model']}@{d.previous['version']}"
        if not previous:
            return None
        newest = (
            func.row_number()
            .over(
                partition_by=(TelemetryRow.device, TelemetryRow.model),
                order_by=TelemetryRow.id.desc(),
            )
            .label("newest")
        )
        windows = (
            select(TelemetryRow.device, TelemetryRow.model, TelemetryRow.body, newest)
            .where(
                TelemetryRow.fleet == row.fleet,
                TelemetryRow.kind == "inference",
                TelemetryRow.device.in_(list(previous)),
                TelemetryRow.model.in_({label, *previous.values()}),
            )
            .subquery()
        )
        p99s: dict[tuple[str, str], list[float]] = {}
        for device, model, body in s.execute(
            select(windows.c.device, windows.c.model, windows.c.body).where(
                windows.c.newest <= LATENCY_WINDOWS
            )
        ):
            if model == label or model == previous.get(device):
                p99s.setdefault((device, model), []).append(float(body["latency_p99_ms"]))
        ratios = []
        for device, prev_label in previous.items():
            new = p99s.get((device, label), [])
            old = p99s.get((device, prev_label), [])
            if len(new) >= rules.min_latency_windows and len(old) >= rules.min_latency_windows:
                base = statistics.median(old)
                if base > 0:
                    ratios.append(statistics.median(new) / base)
        return statistics.median(ratios) if ratios else None

    def _roll_back(
        self, s: Session, row: RolloutRow, publish: list[tuple[str, bytes]]
    ) -> RolloutPhase:
        for d in row.devices:
            if DeviceRolloutStatus(d.status) not in TOUCHED:
                continue
            prev = d.previous
            version = None if not prev else self._version(prev["model"], int(prev["version"]))
            sha = None if not prev else prev.get("sha256")
            gen, payload = self.desired.assign(
                s, d.device, version, sha, rollout_id=row.id, rollback=True
            )
            d.generation = gen
            d.status = DeviceRolloutStatus.ROLLED_BACK.value
            publish.append((d.device, payload))
        return rollout_transition(RolloutPhase.ABORTING, RolloutEvent.ROLLBACK_DONE)
