"""Drift monitor of the fleet service: validates drift reports, scores, alerts, cohorts.

``DriftMonitor.on_telemetry`` is an ``Ingest.on_telemetry`` hook: it only queues the
``DriftReport`` records of a committed batch; the monitor's own thread then

1. **validates** each report against the reference profile of the version it names
   (the registry has one per version, cached per ``model@version``): a report whose
   feature count differs from the profile's, or that names a version the registry
   does not have, is rejected and counted per reason (``stats.rejected``) and never
   reaches the score tables.  NaN and negative scores never get this far: the
   protocol model refuses them at ingest (``allow_inf_nan=False``, ``ge=0``).  The raw
   record stays in ``telemetry`` like every record (ingest stores what is well formed;
   it cannot know the registry), but nothing reads drift from there;
2. feeds the accepted ones, per device, through the ``RuleEngine``
   (``drift_rules.py``);
3. writes in one transaction: the device's latest scores (``drift_scores``), the
   aggregates of its cohorts (``drift_cohorts``: tag × model@version and ``*`` ×
   model@version), alerts opened, updated and cleared (``alerts``, one open alert per
   device and rule) and cohort alerts (rule ``cohort``, ``device`` NULL) when at least
   ``cohort_fraction`` of a cohort's devices (and ``cohort_min_devices``) have an open
   alert;
4. after commit, hands each opened/cleared alert to the sinks (log, MQTT
   ``host/events``, webhook) and asks the ``RetrainPolicy`` about the cohorts touched.

On start it restores each device's baseline and open alerts from the database (the
k-of-m history starts afresh), so a restart neither loses an alert nor opens it twice.
A connection-level database error (locked, unreachable) is retried with backoff
(``WRITE_ATTEMPTS``); if it persists the batch's scores are lost (the raw records stay
in ``telemetry``), counted in ``stats.errors``, and the monitor goes on.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Table, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import InterfaceError, OperationalError

from tinyfleet.agent.drift import ReferenceBundle
from tinyfleet.agent.protocol import DriftReport, TelemetryRecord
from tinyfleet.host.db.engine import writer
from tinyfleet.host.db.tables import (
    AlertRow,
    DeviceRow,
    DriftCohortRow,
    DriftScoreRow,
)
from tinyfleet.host.errors import NotFoundError, TinyfleetError
from tinyfleet.host.fleet.alert_sinks import AlertEvent, AlertSink, LogSink, MqttSink, WebhookSink
from tinyfleet.host.fleet.drift_rules import Baseline, DriftSettings, RuleEngine, Transition
from tinyfleet.host.fleet.retrain import CohortKey, RetrainPolicy, RetrainTrigger

__all__ = [
    "COHORT_RULE",
    "REJECT_REASONS",
    "DriftMonitor",
    "DriftStats",
    "ProfileSource",
    "monitor_for_service",
]

COHORT_RULE = "cohort"
REJECT_REASONS = ("feature_count", "unknown_version", "not_finite", "internal")
_TAG_TTL_S = 30.0
_PROFILE_MISS_TTL_S = 30.0
_QUEUE_MAX = 100_000
WRITE_ATTEMPTS = 8
"""Attempts of a batch's transaction on connection-level database errors (~10 s in all)."""


@dataclass(frozen=True)
class DriftStats:
    received: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    out_of_order: int = 0
    dropped: int = 0
    alerts_opened: int = 0
    alerts_cleared: int = 0
    errors: int = 0
    queue_depth: int = 0


class ProfileSource:
    """Feature counts of reference profiles, per ``model@version``, from the registry."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self._cache: dict[tuple[str, int], int] = {}
        self._misses: dict[tuple[str, int], float] = {}

    def feature_count(self, model: str, version: int) -> int | None:
        key = (model, version)
        if key in self._cache:
            return self._cache[key]
        miss = self._misses.get(key)
        if miss is not None and time.monotonic() - miss < _PROFILE_MISS_TTL_S:
            return None
        try:
            info = self.registry.get(f"{model}@{version}")
            blob = self.registry.blob_path(info.reference.sha256).read_bytes()
            count = len(ReferenceBundle.from_bytes(blob).profile.features)
        except (NotFoundError, OSError, ValueError):
            self._misses[key] = time.monotonic()
            return None
        self._cache[key] = count
        return count


@dataclass
class _Latest:
    model: str
    version: int
    tags: list[str]
    stats: dict[str, float]


class DriftMonitor:
    """See the module docstring.  ``process`` runs a batch synchronously (tests, bench)."""

    def __init__(
        self,
        engine: Engine,
        fleet: str,
        settings: DriftSettings | None = None,
        *,
        profiles: ProfileSource | Any = None,
        sinks: Iterable[AlertSink] = (),
        retrain: RetrainPolicy | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.engine = engine
        self._writes = writer(engine)
        self.fleet = fleet
        self.settings = settings or DriftSettings()
        self.profiles = profiles
        self.sinks: list[AlertSink] = list(sinks)
        self.retrain = retrain
        self.log = logger or logging.getLogger("tinyfleet.host.drift")
        self.rules = RuleEngine(self.settings)
        dialect = engine.dialect.name
        self._insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[tuple[str, DriftReport]] = deque()
        self._busy = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._log_marks: dict[str, float] = {}

        self._latest: dict[str, _Latest] = {}
        self._tags: dict[str, tuple[float, list[str]]] = {}
        self._open: dict[str, int] = {}  # open_key -> alert id
        self._cohort_sizes: dict[str, int] = {}
        self._loaded = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.load()
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="drift-monitor", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for sink in self.sinks:
            try:
                sink.close(min(timeout, 3.0))  # a dead webhook must not hold up a stop
            except Exception:
                self.log.exception("closing alert sink %r failed", sink)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued report is processed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return not self._queue and not self._busy
                self._cond.wait(min(left, 0.05))
        return True

    def on_telemetry(self, device: str, records: list[TelemetryRecord]) -> None:
        """The ingest hook: queue the drift reports (cheap; runs in the ingest writer)."""
        reports = [r for r in records if isinstance(r, DriftReport)]
        if not reports:
            return
        with self._cond:
            for r in reports:
                if len(self._queue) >= _QUEUE_MAX:
                    self._counts["dropped"] += 1
                    continue
                self._queue.append((device, r))
            self._counts["received"] += len(reports)
            self._cond.notify()

    @property
    def stats(self) -> DriftStats:
        with self._lock:
            c = self._counts
            return DriftStats(
                received=c["received"],
                accepted=c["accepted"],
                rejected=dict(self._rejected),
                out_of_order=self.rules.out_of_order,
                dropped=c["dropped"],
                alerts_opened=c["opened"],
                alerts_cleared=c["cleared"],
                errors=c["errors"],
                queue_depth=len(self._queue),
            )

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(0.5)
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                self._busy = True
            try:
                self.process(batch)
            except Exception:  # the monitor must survive anything one batch does
                with self._lock:
                    self._counts["errors"] += 1
                self.log.exception("drift monitor: a batch of %d reports failed", len(batch))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    # ------------------------------------------------------------------ restore

    def load(self) -> None:
        """Restore baselines, latest scores and open alerts from the database."""
        if self._loaded:
            return
        s = DriftScoreRow.__table__.c
        a = AlertRow.__table__.c
        with self.engine.connect() as conn:
            scores = conn.execute(select(DriftScoreRow.__table__).where(s.fleet == self.fleet))
            rows = [r._mapping for r in scores]
            alerts = conn.execute(
                select(a.id, a.device, a.rule, a.cohort, a.windows, a.open_key).where(
                    a.fleet == self.fleet, a.state == "open"
                )
            ).all()
        open_rules: dict[str, dict[str, int]] = {}
        configured = {r.name for r in self.settings.rules}
        orphans = []  # open alerts of a rule no longer configured: nothing would clear them
        for alert in alerts:
            if alert.device is not None and alert.rule not in configured:
                orphans.append(alert.id)
                continue
            if alert.open_key:
                self._open[alert.open_key] = alert.id
            if alert.device is not None:
                open_rules.setdefault(alert.device, {})[alert.rule] = int(alert.windows)
        if orphans:
            with self._writes.begin() as conn:
                conn.execute(
                    update(AlertRow)
                    .where(a.id.in_(orphans))
                    .values(
                        state="cleared",
                        open_key=None,
                        cleared_at=datetime.now(UTC),
                        reason="rule no longer configured",
                    )
                )
            self.log.info("cleared %d open alerts of rules no longer configured", len(orphans))
        for row in rows:
            device = row["device"]
            self._latest[device] = _Latest(
                row["model"], int(row["version"]), list(row["tags"] or []), dict(row["stats"])
            )
            self.rules.restore(
                device,
                row["model"],
                int(row["version"]),
                session=int(row["session"]),
                window=int(row["window"]),
                baseline=Baseline.from_json(row["baseline"]),
                open_rules=open_rules.get(device, {}),
                windows_seen=int(row["windows"]),
            )
        self._loaded = True

    # ------------------------------------------------------------------ processing

    def _reject(self, reason: str, device: str, text: str) -> None:
        with self._lock:
            self._rejected[reason] += 1
        now = time.monotonic()
        if now - self._log_marks.get(device, -1e9) >= 60.0:
            self._log_marks[device] = now
            if len(self._log_marks) > 10_000:
                self._log_marks.clear()
            self.log.warning("rejected drift report of %s (%s): %s", device, reason, text)

    def validate(self, device: str, report: DriftReport) -> str | None:
        """The reject reason of a report, or ``None`` when it is acceptable."""
        values = [*report.psi, *report.ks, report.js_prediction, report.mean_confidence]
        if not all(math.isfinite(v) for v in values) or any(v < 0 for v in report.psi):
            return "not_finite"
        if self.profiles is None:
            return None
        expected = self.profiles.feature_count(report.model, report.version)
        if expected is None:
            return "unknown_version"
        if len(report.psi) != expected:
            return "feature_count"
        return None

    def process(self, items: list[tuple[str, DriftReport]]) -> list[AlertEvent]:
        """Validate, score and persist a batch; returns the alert events it emitted."""
        self.load()
        accepted: list[tuple[str, DriftReport]] = []
        for device, report in items:
            try:
                reason = self.validate(device, report)
            except Exception as exc:  # e.g. the registry is unreachable
                reason = "internal"
                self.log.warning("drift report of %s: validation failed: %s", device, exc)
            if reason is not None:
                expected = (
                    self.profiles.feature_count(report.model, report.version)
                    if reason == "feature_count"
                    else None
                )
                self._reject(
                    reason,
                    device,
                    f"{report.model}@{report.version} window {report.window}: "
                    + (
                        f"{len(report.psi)} features, the reference profile has {expected}"
                        if reason == "feature_count"
                        else reason.replace("_", " ")
                    ),
                )
                continue
            accepted.append((device, report))
        if not accepted:
            return []
        with self._lock:
            self._counts["accepted"] += len(accepted)
        tags = self._device_tags({d for d, _ in accepted})

        transitions: list[Transition] = []
        score_rows: dict[str, dict[str, Any]] = {}
        touched: set[str] = set()
        now = datetime.now(UTC)
        for device, report in accepted:
            before = self._latest.get(device)
            trans = self.rules.observe(device, report)
            st = self.rules.state(device)
            if st is None or (st.session, st.window) != (report.session, report.window):
                continue  # out of order: ignored
            transitions.extend(trans)
            dtags = tags.get(device, [])
            if before is not None:
                touched.update(self._cohorts(before.model, before.version, before.tags))
            self._latest[device] = _Latest(report.model, report.version, dtags, st.last_stats)
            touched.update(self._cohorts(report.model, report.version, dtags))
            score_rows[device] = {
                "fleet": self.fleet,
                "device": device,
                "model": report.model,
                "version": report.version,
                "session": report.session,
                "window": report.window,
                "ts": report.ts,
                "n": report.n,
                "psi_max": st.last_stats["psi_max"],
                "ks_max": st.last_stats["ks_max"],
                "js_prediction": report.js_prediction,
                "mean_confidence": report.mean_confidence,
                "confidence_shift": report.confidence_shift,
                "stats": {k: round(v, 6) for k, v in st.last_stats.items()},
                "baseline": st.baseline.to_json(),
                "windows": st.windows_seen,
                "tags": dtags,
                "updated_at": now,
            }

        events = self._write(score_rows, transitions, touched, now)
        with self._lock:
            self._counts["opened"] += sum(e.kind == "drift_alert" for e in events)
            self._counts["cleared"] += sum(e.kind == "drift_cleared" for e in events)
        for ev in events:
            for sink in self.sinks:
                try:
                    sink.emit(ev)
                except Exception:
                    self.log.exception("alert sink %r failed", sink)
        if self.retrain is not None:
            for key in sorted(touched):
                self._evaluate_retrain(key)
        return events

    def _write(
        self,
        score_rows: dict[str, dict[str, Any]],
        transitions: list[Transition],
        touched: set[str],
        now: datetime,
    ) -> list[AlertEvent]:
        """One transaction for a batch; a connection-level error (locked, unreachable) is
        retried with full-jitter backoff, up to ``WRITE_ATTEMPTS`` attempts."""
        attempt = 0
        while True:
            attempt += 1
            open_before = dict(self._open)
            events: list[AlertEvent] = []
            try:
                with self._writes.begin() as conn:
                    if score_rows:
                        stmt = self._insert(DriftScoreRow.__table__)
                        first = next(iter(score_rows.values()))
                        cols = [c for c in first if c not in ("fleet", "device")]
                        stmt = stmt.on_conflict_do_update(
                            index_elements=["fleet", "device"],
                            set_={c: getattr(stmt.excluded, c) for c in cols},
                        )
                        conn.execute(stmt, list(score_rows.values()))
                    for t in transitions:
                        ev = self._apply_transition(conn, t, now)
                        if ev is not None:
                            events.append(ev)
                    events.extend(self._update_cohorts(conn, touched, now))
                return events
            except (OperationalError, InterfaceError) as exc:
                self._open = open_before  # the rolled-back transaction's alert ids are void
                if attempt >= WRITE_ATTEMPTS or self._stop.is_set():
                    raise
                delay = random.uniform(0.0, min(2.0, 0.05 * 2**attempt))
                self.log.warning(
                    "drift monitor: database error (attempt %d, retrying in %.2f s): %s",
                    attempt,
                    delay,
                    " ".join(str(exc.orig or exc).split())[:300],
                )
                time.sleep(delay)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _cohorts(model: str, version: int, tags: list[str]) -> list[str]:
        return [CohortKey(t, model, version).key for t in ["*", *tags]]

    def _device_tags(self, devices: set[str]) -> dict[str, list[str]]:
        now = time.monotonic()
        stale = [d for d in devices if d not in self._tags or now - self._tags[d][0] > _TAG_TTL_S]
        if stale:
            d = DeviceRow.__table__.c
            with self.engine.connect() as conn:
                found = dict(
                    conn.execute(
                        select(d.device, d.tags).where(
                            d.fleet == self.fleet, d.device.in_(sorted(stale))
                        )
                    ).all()
                )
            if len(self._tags) > 200_000:
                self._tags.clear()
            for dev in stale:
                raw = found.get(dev) or []
                self._tags[dev] = (now, [str(t) for t in raw if isinstance(t, str)][:32])
        return {dev: self._tags[dev][1] for dev in devices}

    def _cohort_of(self, device: str, model: str, version: int) -> str:
        latest = self._latest.get(device)
        tags = latest.tags if latest is not None else []
        # the device's alert belongs to its most specific cohort (first tag) if any
        return CohortKey(tags[0] if tags else "*", model, version).key

    def _apply_transition(
        self, conn: Connection, t: Transition, now: datetime
    ) -> AlertEvent | None:
        a: Table = AlertRow.__table__  # type: ignore[assignment]
        key = f"{t.device}|{t.rule}"
        cohort = self._cohort_of(t.device, t.model, t.version)
        if t.kind == "opened":
            existing = self._open.get(key)
            if existing is not None:  # open already (e.g. restored): keep it
                return None
            alert_id = conn.execute(
                insert(a).returning(a.c.id),
                {
                    "fleet": self.fleet,
                    "device": t.device,
                    "rule": t.rule,
                    "cohort": cohort,
                    "model": t.model,
                    "version": t.version,
                    "state": "open",
                    "open_key": key,
                    "opened_at": now,
                    "cleared_at": None,
                    "last_value": t.value,
                    "windows": t.windows,
                    "reason": None,
                },
            ).scalar_one()
            self._open[key] = alert_id
            return self._event("drift_alert", alert_id, t.device, t, cohort)
        alert_id = self._open.get(key)
        if alert_id is None:
            return None
        if t.kind == "ongoing":
            res = conn.execute(
                update(a)
                .where(a.c.id == alert_id, a.c.state == "open")
                .values(last_value=t.value, windows=t.windows)
            )
            if res.rowcount == 0:  # cleared by hand (``tinyfleet alerts clear``): start over
                self._open.pop(key, None)
                self._reset_rule(t.device, t.rule)
            return None
        conn.execute(
            update(a)
            .where(a.c.id == alert_id)
            .values(
                state="cleared",
                open_key=None,
                cleared_at=now,
                last_value=t.value,
                windows=t.windows,
                reason=(t.reason or "scores back to normal")[:300],
            )
        )
        self._open.pop(key, None)
        return self._event("drift_cleared", alert_id, t.device, t, cohort)

    def _reset_rule(self, device: str, rule: str) -> None:
        st = self.rules.state(device)
        if st is not None and rule in st.rules:
            rs = st.rules[rule]
            rs.open, rs.windows, rs.clean_streak = False, 0, 0
            rs.hits.clear()

    def _event(
        self, kind: str, alert_id: int, device: str | None, t: Transition, cohort: str
    ) -> AlertEvent:
        return AlertEvent(
            kind=kind,  # type: ignore[arg-type]
            alert_id=alert_id,
            fleet=self.fleet,
            device=device,
            rule=t.rule,
            cohort=cohort,
            model=t.model,
            version=t.version,
            value=t.value,
            windows=t.windows,
            reason=t.reason,
        )

    def _alerting(self, device: str) -> bool:
        st = self.rules.state(device)
        return st is not None and any(rs.open for rs in st.rules.values())

    def _members(self, key: str) -> list[str]:
        ck = CohortKey.parse(key)
        return [
            dev
            for dev, lt in self._latest.items()
            if lt.model == ck.model
            and lt.version == ck.version
            and (ck.tag == "*" or ck.tag in lt.tags)
        ]

    def _update_cohorts(self, conn: Connection, keys: set[str], now: datetime) -> list[AlertEvent]:
        events: list[AlertEvent] = []
        rows = []
        a: Table = AlertRow.__table__  # type: ignore[assignment]
        for key in sorted(keys):
            ck = CohortKey.parse(key)
            members = self._members(key)
            self._cohort_sizes[key] = len(members)
            stats = [self._latest[d].stats for d in members]
            alerting = sum(self._alerting(d) for d in members)

            def mean(name: str, stats: list[dict[str, float]] = stats) -> float:
                return sum(s.get(name, 0.0) for s in stats) / len(stats) if stats else 0.0

            rows.append(
                {
                    "fleet": self.fleet,
                    "cohort": key,
                    "tag": ck.tag,
                    "model": ck.model,
                    "version": ck.version,
                    "devices": len(members),
                    "alerting": alerting,
                    "mean_psi_max": mean("psi_max"),
                    "max_psi_max": max((s.get("psi_max", 0.0) for s in stats), default=0.0),
                    "mean_ks_max": mean("ks_max"),
                    "mean_js_prediction": mean("js_prediction"),
                    "mean_confidence_shift": -mean("confidence_drop"),
                    "updated_at": now,
                }
            )
            s = self.settings
            firing = (
                bool(members)
                and alerting >= s.cohort_min_devices
                and alerting / len(members) >= s.cohort_fraction
            )
            okey = f"@{key}|{COHORT_RULE}"
            value = alerting / len(members) if members else 0.0
            t = Transition(
                "opened" if firing else "cleared",
                "",
                COHORT_RULE,
                value,
                alerting,
                ck.model,
                ck.version,
                0,
                "" if firing else "fewer devices alerting",
            )
            if firing and okey not in self._open:
                alert_id = conn.execute(
                    insert(a).returning(a.c.id),
                    {
                        "fleet": self.fleet,
                        "device": None,
                        "rule": COHORT_RULE,
                        "cohort": key,
                        "model": ck.model,
                        "version": ck.version,
                        "state": "open",
                        "open_key": okey,
                        "opened_at": now,
                        "cleared_at": None,
                        "last_value": value,
                        "windows": alerting,
                        "reason": None,
                    },
                ).scalar_one()
                self._open[okey] = alert_id
                events.append(self._event("drift_alert", alert_id, None, t, key))
            elif firing:
                conn.execute(
                    update(a)
                    .where(a.c.id == self._open[okey])
                    .values(last_value=value, windows=alerting)
                )
            elif okey in self._open:
                alert_id = self._open.pop(okey)
                conn.execute(
                    update(a)
                    .where(a.c.id == alert_id)
                    .values(
                        state="cleared",
                        open_key=None,
                        cleared_at=now,
                        last_value=value,
                        windows=alerting,
                        reason=t.reason,
                    )
                )
                events.append(self._event("drift_cleared", alert_id, None, t, key))
        if rows:
            stmt = self._insert(DriftCohortRow.__table__)
            stmt = stmt.on_conflict_do_update(
                index_elements=["fleet", "cohort"],
                set_={
                    c: getattr(stmt.excluded, c) for c in rows[0] if c not in ("fleet", "cohort")
                },
            )
            conn.execute(stmt, rows)
        return events

    def _evaluate_retrain(self, key: str) -> None:
        assert self.retrain is not None
        need = self.retrain.settings.sustained_windows
        sustained = []
        members = self._members(key)
        # The whole-fleet cohort (``*``) retrains only devices that no tag cohort covers:
        # drift on a tagged cohort is that cohort's to retrain (its own data, its rollout).
        tagged = set()
        if CohortKey.parse(key).tag == "*":
            tagged = {dev for dev in members if self._latest[dev].tags}
        for dev in members:
            st = self.rules.state(dev)
            if (
                dev not in tagged
                and st is not None
                and any(rs.open and rs.windows >= need for rs in st.rules.values())
            ):
                sustained.append(dev)
        try:
            self.retrain.evaluate(CohortKey.parse(key), len(members), sustained)
        except TinyfleetError as exc:
            self.log.warning("retrain policy for %s: %s", key, exc)
        except Exception:
            with self._lock:
                self._counts["errors"] += 1
            self.log.exception("retrain policy for %s failed", key)


def monitor_for_service(
    settings: DriftSettings,
    registry: Any,
    fleet: str,
    *,
    publish: Any = None,
    topic: str | None = None,
    trigger: RetrainTrigger | None = None,
    logger: logging.Logger | None = None,
) -> DriftMonitor:
    """The fleet service's monitor: registry profiles, log + MQTT + webhook sinks, retrain.

    ``publish(topic, payload, qos, retain)`` is the service link's publish; ``topic``
    its ``host/events`` topic.
    """
    log = logger or logging.getLogger("tinyfleet.host.drift")
    sinks: list[AlertSink] = [LogSink(log.getChild("alerts"))]
    if settings.mqtt_events and publish is not None and topic is not None:
        sinks.append(MqttSink(publish, topic, log.getChild("mqtt")))
    if settings.webhook.url:
        sinks.append(WebhookSink(settings.webhook, log.getChild("webhook")))
    policy = RetrainPolicy(
        registry.engine, fleet, settings.retrain, trigger, logger=log.getChild("retrain")
    )
    return DriftMonitor(
        registry.engine,
        fleet,
        settings,
        profiles=ProfileSource(registry),
        sinks=sinks,
        retrain=policy,
        logger=log,
    )
