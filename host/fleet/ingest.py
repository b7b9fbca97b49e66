"""Ingest of device traffic: presence, reported state, telemetry and events into the database.

``Ingest.submit`` is called from the MQTT thread for every message on the host's
subscriptions; it only queues the topic and the raw bytes.  One writer thread takes
up to ``batch_max`` queued messages at a time, decodes and validates each with the
protocol module, and writes the whole batch in one transaction:

- telemetry records and events: ``INSERT … ON CONFLICT DO NOTHING`` on
  ``(fleet, device, session, seq)``, so a record re-sent after a reconnect is
  stored once.  A telemetry row's ``body`` is the record's JSON without the fields
  that are columns (``kind``, ``session``, ``seq``, ``ts``); ``model`` is
  ``name@version``;
- presence: upserts the device row under the session rule of the protocol
  (``classify_session``): a birth or will of an older session than the stored one
  is discarded, so a late last will cannot mark a reconnected device offline;
- reported state: upserts the device row unless it is older than the stored report
  (lower session, or same session and earlier ``ts``).  An equal one (the retained
  report redelivered when the host reconnects) is applied again, which changes
  nothing in the row and lets ``on_reported`` hooks resynchronise.

Chunk requests, desired state and host topics are not this module's business: they
are counted in ``stats.ignored``, like empty payloads (cleared retained messages).
Telemetry and events also move the device's ``last_seen`` forward, at most once per
``LAST_SEEN_STEP_S`` per device.  A message that fails validation is counted by
reason and logged at most once per device per minute.  A database error never ends
the writer thread: connection-level errors (locked, unreachable, read-only, disk
full) are retried with backoff, keeping the batch; an error caused by one message's
data isolates that message (counted as rejected ``storage``) and stores the rest.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import JSON, Engine, String, Table, bindparam, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from tinyfleet.agent.protocol import (
    DeviceEvent,
    DriftReport,
    ParsedTopic,
    Presence,
    ProtocolError,
    ReportedState,
    TelemetryBatch,
    TelemetryRecord,
    TopicKind,
    Topics,
    classify_session,
    decode_message,
    parse_topic,
)
from tinyfleet.host.db.engine import mask_url, writer
from tinyfleet.host.db.tables import DeviceRow, EventRow, TelemetryRow
from tinyfleet.host.errors import StorageError

__all__ = [
    "LAST_SEEN_STEP_S",
    "LOG_INTERVAL_S",
    "REJECT_REASONS",
    "Ingest",
    "IngestStats",
    "ReportedHook",
    "TelemetryHook",
]

LAST_SEEN_STEP_S = 30.0
"""Telemetry and events move a device's ``last_seen`` at most this often."""

LOG_INTERVAL_S = 60.0
"""A rejected message is logged at most once per device (or topic) per this period."""

BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 5.0
"""Retry delays after a database error: full jitter, doubling from base up to the cap."""

_ABORT_GRACE_S = 15.0
"""How long ``stop`` waits for a writer it told to give up (a SQLite busy wait is 10 s)."""

REJECT_REASONS = (
    "bad_topic",  # not a v1 topic name
    "other_fleet",  # a v1 topic of another fleet
    "oversized",  # payload above the protocol's size limit
    "not_utf8",
    "not_json",  # not JSON, or JSON that is not an object
    "schema_version",  # missing or unsupported ``schema``
    "unknown_field",
    "invalid",  # any other validation error
    "device_mismatch",  # payload names another device than its topic
    "storage",  # the database refused this message's data
    "internal",  # an unexpected error while handling it (a bug; logged with traceback)
)
"""Keys of ``IngestStats.rejected``."""

_DATA_ERRORS = (IntegrityError, DataError)
"""The database refused a value or row: the message concerned is isolated and rejected."""

_TRANSIENT = (DBAPIError, DisconnectionError, PoolTimeoutError)
"""Any other database error (locked, unreachable, read-only, disk full, not migrated):
retried with the batch kept, since the data is not at fault."""

_RECORD_COLUMNS: set[str] = {"kind", "session", "seq", "ts"}
_MODEL_TYPE = TelemetryRow.__table__.c.model.type
_MODEL_CHARS = _MODEL_TYPE.length if isinstance(_MODEL_TYPE, String) and _MODEL_TYPE.length else 80
_JSON_OR_NULL = JSON(none_as_null=True)
_LOG_KEYS_MAX = 10_000
_SEEN_MAX = 200_000
_TOPIC_CACHE_MAX = 50_000

ReportedHook = Callable[[str, ReportedState], None]
TelemetryHook = Callable[[str, list[TelemetryRecord]], None]


@dataclass(frozen=True)
class IngestStats:
    """A snapshot of the ingest's counters.

    ``stored`` and ``duplicates`` count telemetry records (``duplicates`` = records
    received - records inserted); ``events``/``duplicate_events`` likewise for
    events.  ``presence`` and ``reported`` count messages applied to device rows,
    ``stale`` those discarded as older than what is stored.  ``ignored`` counts
    messages on topics the ingest does not store (chunk requests, desired state,
    host topics) and empty payloads (cleared retained messages).  ``queue_depth``
    is the number of messages submitted and not yet stored (queued or in the batch
    being written), ``lag_s`` the age of the oldest of them.
    """

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    events: int = 0
    duplicate_events: int = 0
    presence: int = 0
    reported: int = 0
    stale: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    db_errors: int = 0
    hook_errors: int = 0
    abandoned: int = 0
    queue_depth: int = 0
    max_queue_depth: int = 0
    lag_s: float = 0.0

    @property
    def rejected_total(self) -> int:
        """Messages rejected for any reason."""
        return sum(self.rejected.values())


_Stored = TelemetryBatch | DeviceEvent | Presence | ReportedState


@dataclass(slots=True)
class _Item:
    """One decoded message waiting to be written."""

    kind: TopicKind
    device: str
    msg: _Stored
    received: datetime
    seen: float  # monotonic submit time


@dataclass(slots=True)
class _Outcome:
    """What one transaction changed; applied to the counters and hooks after commit."""

    stored: int = 0
    records: int = 0
    events: int = 0
    event_msgs: int = 0
    presence: int = 0
    reported: int = 0
    stale: Counter[str] = field(default_factory=Counter)
    new_records: dict[str, list[TelemetryRecord]] = field(default_factory=dict)
    applied_reports: list[tuple[str, ReportedState]] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)


def _reject_reason(message: str) -> str:
    """The ``REJECT_REASONS`` key of a ``ProtocolError`` from ``decode``/``decode_message``."""
    if "bytes exceeds the" in message:
        return "oversized"
    if "not UTF-8" in message:
        return "not_utf8"
    if "not JSON" in message or "not a JSON object" in message:
        return "not_json"
    if "schema version" in message or "schema field is missing" in message:
        return "schema_version"
    if "unknown field" in message:
        return "unknown_field"
    if "arrived on the topic of" in message:
        return "device_mismatch"
    return "invalid"


def _db_reason(exc: BaseException) -> str:
    """One line for a database error: the driver's message without SQL or parameters."""
    inner = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = " ".join(str(inner).split()) or type(inner).__name__
    if not isinstance(exc, DBAPIError):
        text = f"{type(inner).__name__}: {text}"
    return text[:300]


def _model_label(record: TelemetryRecord) -> str | None:
    """``name@version`` of the model a record concerns (``None`` if none or too long)."""
    label = f"{record.model}@{record.version}" if isinstance(record, DriftReport) else record.model
    if label is not None and len(label) > _MODEL_CHARS:
        return None  # still in the body; the column is too narrow for it
    return label


def _key(row: Any) -> tuple[str, int, int]:
    return (row[0], row[1], row[2])


class Ingest:
    """Decodes and stores device traffic: presence, reported state, telemetry, events.

    ``engine`` must be migrated (``tinyfleet.host.db.upgrade``); SQLite and
    PostgreSQL are supported.  Hooks run in the writer thread after the batch that
    concerns them is committed; an exception in a hook is logged and counted.
    """

    def __init__(
        self,
        engine: Engine,
        fleet: str,
        *,
        batch_max: int = 2000,
        flush_interval: float = 0.05,
        queue_max: int = 100_000,
        logger: logging.Logger | None = None,
    ) -> None:
        if batch_max < 1 or queue_max < 1 or flush_interval < 0:
            raise ValueError("batch_max and queue_max must be >= 1, flush_interval >= 0")
        self.topics = Topics(fleet)
        self.fleet = self.topics.fleet
        self.engine = engine
        self.batch_max = batch_max
        self.flush_interval = flush_interval
        self.queue_max = queue_max
        self.log = logger or logging.getLogger("tinyfleet.host.fleet.ingest")
        self.on_reported: list[ReportedHook] = []
        self.on_telemetry: list[TelemetryHook] = []

        dialect = engine.dialect.name
        if dialect == "sqlite":
            insert: Any = sqlite.insert
        elif dialect == "postgresql":
            insert = postgresql.insert
        else:
            raise StorageError(f"ingest supports SQLite and PostgreSQL, not {dialect}")
        self._writes = writer(engine)
        tel: Table = TelemetryRow.__table__  # type: ignore[assignment]
        ev: Table = EventRow.__table__  # type: ignore[assignment]
        dev: Table = DeviceRow.__table__  # type: ignore[assignment]
        unique = ["fleet", "device", "session", "seq"]
        self._insert_telemetry = (
            insert(tel)
            .on_conflict_do_nothing(index_elements=unique)
            .returning(tel.c.device, tel.c.session, tel.c.seq)
        )
        self._insert_events = (
            insert(ev)
            .on_conflict_do_nothing(index_elements=unique)
            .returning(ev.c.device, ev.c.session, ev.c.seq)
        )
        self._insert_devices = insert(dev).on_conflict_do_nothing(
            index_elements=["fleet", "device"]
        )
        self._device_columns = [
            dev.c.device,
            dev.c.session,
            dev.c.online,
            dev.c.profile,
            dev.c.agent_version,
            dev.c.capabilities,
            dev.c.tags,
            dev.c.groups,
            dev.c.last_seen,
            dev.c.reported,
            dev.c.reported_generation,
            dev.c.phase,
            dev.c.active_model,
            dev.c.active_version,
            dev.c.active_sha256,
            dev.c.error,
        ]
        self._select_devices = (
            select(*self._device_columns)
            .where(
                dev.c.fleet == bindparam("fleet"),
                dev.c.device.in_(bindparam("devices", expanding=True)),
            )
            .order_by(dev.c.device)
            .with_for_update()
        )
        owned = [c.name for c in self._device_columns if c.name != "device"] + ["updated_at"]
        self._update_devices = (
            update(dev)
            .where(dev.c.fleet == bindparam("k_fleet"), dev.c.device == bindparam("k_device"))
            .values(
                {
                    name: bindparam(name, type_=_JSON_OR_NULL)
                    if name in ("reported", "error", "capabilities")
                    else bindparam(name)
                    for name in owned
                }
            )
        )
        self._touch_devices = (
            update(dev)
            .where(
                dev.c.fleet == bindparam("k_fleet"),
                dev.c.device == bindparam("k_device"),
                or_(dev.c.last_seen.is_(None), dev.c.last_seen < bindparam("k_seen")),
            )
            .values(last_seen=bindparam("k_seen"))
        )

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the writer waits on it
        self._room = threading.Condition(self._lock)  # submitters wait on it when full
        self._done = threading.Condition(self._lock)  # flush() waits on it
        self._queue: deque[tuple[float, str, bytes | bytearray]] = deque()
        self._received = 0
        self._processed = 0
        self._flush_upto = 0
        self._inflight_oldest: float | None = None
        self._writer_idle = False
        self._stopping = False
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_db_error: str | None = None

        # Counters: changed and read under the lock.
        self._stored = 0
        self._duplicates = 0
        self._events = 0
        self._duplicate_events = 0
        self._presence = 0
        self._reported = 0
        self._batches = 0
        self._db_errors = 0
        self._hook_errors = 0
        self._abandoned = 0
        self._max_depth = 0
        self._rejected: Counter[str] = Counter()
        self._stale: Counter[str] = Counter()
        self._ignored: Counter[str] = Counter()

        # Writer-thread state.
        self._topic_cache: dict[str, ParsedTopic] = {}
        self._seen: dict[str, float] = {}
        self._log_marks: dict[str, tuple[float, int]] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the writer thread (messages submitted before are kept and stored)."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("this Ingest was stopped; create a new one")
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name=f"ingest-{self.fleet}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Store everything queued, then end the writer thread.

        Raises ``StorageError`` if that is not done within ``timeout`` (for instance
        the database stayed unreachable); the messages not stored are then counted
        in ``stats.abandoned``.
        """
        with self._lock:
            self._stopping = True
            thread = self._thread
            abandoned_before = self._abandoned
            pending = self._received - self._processed
            self._wake.notify_all()
            self._room.notify_all()
        if thread is None:
            if pending:
                self._abandon(pending)
                raise StorageError(
                    f"ingest stopped before it started: {pending} messages not stored"
                )
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._lock:
                self._abort.set()
                self._wake.notify_all()
            thread.join(_ABORT_GRACE_S)
        alive = thread.is_alive()
        with self._lock:
            pending = self._received - self._processed
            lost = pending + self._abandoned - abandoned_before
        if pending and not alive:
            self._abandon(pending)
        if lost or alive:
            reason = f" (last database error: {self._last_db_error})" if self._last_db_error else ""
            raise StorageError(
                f"ingest of fleet {self.fleet} did not drain within {timeout:g} s: "
                f"{lost} messages not stored{reason}"
            )

    def _abandon(self, count: int) -> None:
        with self._lock:
            self._abandoned += count
            self._processed += count
            self._queue.clear()
            self._done.notify_all()
        self.log.error("ingest of fleet %s: %d messages abandoned at stop", self.fleet, count)

    def __enter__(self) -> Ingest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ producer side

    def submit(self, topic: str, payload: bytes | bytearray) -> None:
        """Queue one received message; blocks while the queue holds ``queue_max`` messages."""
        with self._lock:
            while len(self._queue) >= self.queue_max:
                if self._stopping:
                    raise RuntimeError("ingest is stopped")
                self._room.wait()
            if self._stopping:
                raise RuntimeError("ingest is stopped")
            queue = self._queue
            queue.append((time.monotonic(), topic, payload))
            self._received += 1
            depth = self._received - self._processed
            if depth > self._max_depth:
                self._max_depth = depth
            if self._writer_idle or len(queue) == self.batch_max:
                self._wake.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every message submitted so far is handled; ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._received
            self._flush_upto = max(self._flush_upto, target)
            self._wake.notify()
            while self._processed < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._done.wait(remaining)
            return True

    @property
    def stats(self) -> IngestStats:
        """A consistent snapshot of the counters, queue depth and lag."""
        now = time.monotonic()
        with self._lock:
            oldest = self._inflight_oldest
            if oldest is None and self._queue:
                oldest = self._queue[0][0]
            return IngestStats(
                received=self._received,
                stored=self._stored,
                duplicates=self._duplicates,
                rejected=dict(self._rejected),
                events=self._events,
                duplicate_events=self._duplicate_events,
                presence=self._presence,
                reported=self._reported,
                stale=dict(self._stale),
                ignored=dict(self._ignored),
                batches=self._batches,
                db_errors=self._db_errors,
                hook_errors=self._hook_errors,
                abandoned=self._abandoned,
                queue_depth=self._received - self._processed,
                max_queue_depth=self._max_depth,
                lag_s=0.0 if oldest is None else max(0.0, now - oldest),
            )

    # ------------------------------------------------------------------ writer thread

    def _next_batch(self) -> list[tuple[float, str, bytes | bytearray]] | None:
        """Wait for a batch: full, or its oldest message ``flush_interval`` old, or urgent."""
        with self._lock:
            queue = self._queue
            while not queue:
                if self._stopping or self._abort.is_set():
                    return None
                self._writer_idle = True
                self._wake.wait()
                self._writer_idle = False
            while (
                len(queue) < self.batch_max
                and not self._stopping
                and self._flush_upto <= self._processed
            ):
                remaining = queue[0][0] + self.flush_interval - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.wait(remaining)
            if self._abort.is_set():
                return None
            n = min(len(queue), self.batch_max)
            batch = [queue.popleft() for _ in range(n)]
            self._inflight_oldest = batch[0][0]
            self._room.notify_all()
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            unstored = 0
            try:
                unstored = self._handle(batch)
            except Exception:  # pragma: no cover - a bug; the thread must survive it
                self.log.exception("ingest of fleet %s: unexpected error in a batch", self.fleet)
                with self._lock:
                    self._rejected["internal"] += len(batch)
            if unstored:
                self.log.error(
                    "ingest of fleet %s: %d messages abandoned at stop", self.fleet, unstored
                )
            with self._lock:
                self._abandoned += unstored
                self._processed += len(batch)
                self._inflight_oldest = None
                self._batches += 1
                self._done.notify_all()

    def _handle(self, batch: list[tuple[float, str, bytes | bytearray]]) -> int:
        """Decode and store one batch; the number of messages left unstored at abort."""
        offset = time.time() - time.monotonic()
        items: list[_Item] = []
        rejected: Counter[str] = Counter()
        ignored: Counter[str] = Counter()
        for seen, topic, payload in batch:
            item = self._decode(seen, offset, topic, payload, rejected, ignored)
            if item is not None:
                items.append(item)
        if rejected or ignored:
            with self._lock:
                self._rejected.update(rejected)
                self._ignored.update(ignored)
        return self._store(items) if items else 0

    def _decode(
        self,
        seen: float,
        offset: float,
        topic: str,
        payload: bytes | bytearray,
        rejected: Counter[str],
        ignored: Counter[str],
    ) -> _Item | None:
        parsed = self._topic_cache.get(topic)
        if parsed is None:
            try:
                parsed = self.topics.parse(topic)
            except ProtocolError as exc:
                reason = "bad_topic"
                try:
                    parse_topic(topic)
                    reason = "other_fleet"
                except ProtocolError:
                    pass
                rejected[reason] += 1
                self._log_reject(reason, None, topic, str(exc))
                return None
            except Exception as exc:  # a bug: counted, logged with its traceback
                rejected["internal"] += 1
                self._log_reject("internal", None, str(topic), repr(exc), exc_info=True)
                return None
            if len(self._topic_cache) >= _TOPIC_CACHE_MAX:
                self._topic_cache.clear()
            self._topic_cache[topic] = parsed
        kind = parsed.kind
        if kind not in (
            TopicKind.TELEMETRY,
            TopicKind.EVENTS,
            TopicKind.PRESENCE,
            TopicKind.REPORTED,
        ):
            ignored[kind.value] += 1
            return None
        if not payload:
            ignored["empty"] += 1
            return None
        device = parsed.device or ""
        try:
            msg = decode_message(parsed, payload)
        except ProtocolError as exc:
            text = str(exc)
            reason = _reject_reason(text)
            rejected[reason] += 1
            self._log_reject(reason, device, topic, text)
            return None
        except Exception as exc:  # a bug: counted, logged with its traceback
            rejected["internal"] += 1
            self._log_reject("internal", device, topic, repr(exc), exc_info=True)
            return None
        received = datetime.fromtimestamp(seen + offset, UTC)
        return _Item(kind, device, cast(_Stored, msg), received, seen)

    def _log_reject(
        self, reason: str, device: str | None, topic: str, text: str, *, exc_info: bool = False
    ) -> None:
        """Log a rejected message, at most once per device (or reason) per ``LOG_INTERVAL_S``."""
        key = device or f"<{reason}>"
        now = time.monotonic()
        mark = self._log_marks.get(key)
        if mark is not None and now - mark[0] < LOG_INTERVAL_S:
            self._log_marks[key] = (mark[0], mark[1] + 1)
            return
        if len(self._log_marks) >= _LOG_KEYS_MAX:
            self._log_marks = {
                k: v for k, v in self._log_marks.items() if now - v[0] < LOG_INTERVAL_S
            }
        suppressed = mark[1] if mark is not None else 0
        more = f" ({suppressed} more from it suppressed)" if suppressed else ""
        self.log.warning(
            "rejected message on %s (%s): %s%s", topic[:256], reason, text, more, exc_info=exc_info
        )
        self._log_marks[key] = (now, 0)

    # ------------------------------------------------------------------ storing

    def _store(self, items: list[_Item]) -> int:
        """Write decoded messages: retry the batch on database errors, isolate bad data.

        Returns how many were left unstored because ``stop()`` gave up (else 0).
        """
        pending: Sequence[_Item] = items
        isolate = False
        attempt = 0
        failing_since: float | None = None
        while pending:
            chunk = pending[:1] if isolate else pending
            try:
                outcome = self._write(chunk)
            except _DATA_ERRORS as exc:
                refused: Exception | None = exc
            except _TRANSIENT as exc:
                attempt += 1
                self._db_failed(exc, attempt)
                if failing_since is None:
                    failing_since = time.monotonic()
                if not self._backoff(attempt):
                    return len(pending)
                continue
            except Exception as exc:  # e.g. a value a column type cannot bind
                refused = exc
            else:
                refused = None
            if refused is not None:
                if len(chunk) > 1:
                    isolate = True
                    continue
                item = chunk[0]
                with self._lock:
                    self._rejected["storage"] += 1
                self._log_reject(
                    "storage",
                    item.device,
                    f"{item.kind.value} of {item.device}",
                    f"the database refused it: {_db_reason(refused)}",
                )
                pending = pending[1:]
                continue
            if failing_since is not None:
                self.log.warning(
                    "ingest of fleet %s: database writable again after %d attempts (%.1f s)",
                    self.fleet,
                    attempt + 1,
                    time.monotonic() - failing_since,
                )
                failing_since = None
                attempt = 0
            pending = pending[len(chunk) :]
            self._apply(outcome)
        return 0

    def _db_failed(self, exc: Exception, attempt: int) -> None:
        reason = _db_reason(exc)
        with self._lock:
            self._db_errors += 1
            self._last_db_error = reason
        # First failure, then every 20th attempt (about once a minute at the cap).
        if attempt == 1 or attempt % 20 == 0:
            self.log.warning(
                "ingest of fleet %s: database error on %s (attempt %d, batch kept, retrying): %s",
                self.fleet,
                mask_url(self.engine.url),
                attempt,
                reason,
            )

    def _backoff(self, attempt: int) -> bool:
        """Sleep before retry ``attempt``; ``False`` if ``stop()`` gave up meanwhile."""
        delay = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt, 16)))
        return not self._abort.wait(delay)

    def _write(self, items: Sequence[_Item]) -> _Outcome:
        """One transaction for the items; what it changed (not yet counted)."""
        out = _Outcome()
        fleet = self.fleet
        tel_rows: dict[tuple[str, int, int], dict[str, Any]] = {}
        tel_records: dict[tuple[str, int, int], TelemetryRecord] = {}
        ev_rows: dict[tuple[str, int, int], dict[str, Any]] = {}
        state_msgs: list[_Item] = []
        touch: dict[str, tuple[datetime, float]] = {}
        for item in items:
            msg = item.msg
            if isinstance(msg, TelemetryBatch):
                device = item.device
                for record in msg.records:
                    out.records += 1
                    key = (device, record.session, record.seq)
                    if key in tel_rows:
                        continue
                    tel_records[key] = record
                    tel_rows[key] = {
                        "fleet": fleet,
                        "device": device,
                        "session": record.session,
                        "seq": record.seq,
                        "ts": record.ts,
                        "kind": record.kind,
                        "model": _model_label(record),
                        "body": record.model_dump(
                            mode="json", exclude_none=True, exclude=_RECORD_COLUMNS
                        ),
                        "received_at": item.received,
                    }
                touch[device] = (item.received, item.seen)
            elif isinstance(msg, DeviceEvent):
                out.event_msgs += 1
                key = (item.device, msg.session, msg.seq)
                if key not in ev_rows:
                    ev_rows[key] = {
                        "fleet": fleet,
                        "device": item.device,
                        "session": msg.session,
                        "seq": msg.seq,
                        "ts": msg.ts,
                        "kind": msg.kind.value,
                        "detail": msg.detail,
                        "topic": msg.topic,
                        "received_at": item.received,
                    }
                touch[item.device] = (item.received, item.seen)
            else:
                state_msgs.append(item)

        with self._writes.begin() as conn:
            if tel_rows:
                inserted = {
                    _key(r) for r in conn.execute(self._insert_telemetry, list(tel_rows.values()))
                }
                out.stored = len(inserted)
                if inserted:
                    by_device = out.new_records
                    for key in tel_rows:
                        if key in inserted:
                            by_device.setdefault(key[0], []).append(tel_records[key])
            if ev_rows:
                out.events = len(conn.execute(self._insert_events, list(ev_rows.values())).all())
            if state_msgs:
                self._write_states(conn, state_msgs, out)
            self._touch(conn, touch, out)
        return out

    def _touch(
        self, conn: Connection, touch: dict[str, tuple[datetime, float]], out: _Outcome
    ) -> None:
        """Move ``last_seen`` of devices heard from by telemetry or events, rate-limited."""
        rows = []
        for device, (received, seen) in touch.items():
            if device in out.seen:
                continue  # its row was just written with a fresh last_seen
            last = self._seen.get(device)
            if last is None or seen - last >= LAST_SEEN_STEP_S:
                rows.append({"k_fleet": self.fleet, "k_device": device, "k_seen": received})
                out.seen[device] = seen
        if rows:
            conn.execute(self._touch_devices, rows)

    def _write_states(self, conn: Connection, items: list[_Item], out: _Outcome) -> None:
        """Apply presence and reported state to the device rows (created on first sight)."""
        now = datetime.now(UTC)
        devices = sorted({item.device for item in items})
        conn.execute(
            self._insert_devices,
            [
                {
                    "fleet": self.fleet,
                    "device": device,
                    "tags": [],
                    "groups": [],
                    "session": 0,
                    "online": False,
                    "reported_generation": 0,
                    "desired_generation": 0,
                    "updated_at": now,
                }
                for device in devices
            ],
        )
        rows = {
            row.device: dict(row._mapping)
            for row in conn.execute(self._select_devices, {"fleet": self.fleet, "devices": devices})
        }
        changed: dict[str, dict[str, Any]] = {}
        for item in items:
            row = rows[item.device]
            msg = item.msg
            if isinstance(msg, Presence):
                stored_session = row["session"] or None
                if classify_session(stored_session, msg.session) == "stale":
                    out.stale["presence"] += 1
                    continue
                row.update(
                    session=msg.session,
                    online=msg.status == "online",
                    profile=msg.profile,
                    agent_version=msg.agent_version,
                    capabilities=msg.capabilities.model_dump(mode="json"),
                    tags=list(msg.tags),
                    groups=list(msg.groups),
                    last_seen=item.received,
                )
                out.presence += 1
            elif isinstance(msg, ReportedState):
                if self._older_report(row["reported"], msg):
                    out.stale["reported"] += 1
                    continue
                active = msg.active
                version = active.version if active is not None else None
                row.update(
                    reported=msg.model_dump(mode="json", by_alias=True, exclude_none=True),
                    reported_generation=msg.generation,
                    phase=msg.phase.value,
                    active_model=active.name if active is not None else None,
                    active_version=version,
                    active_sha256=active.sha256 if active is not None else None,
                    error=(
                        msg.error.model_dump(mode="json", exclude_none=True)
                        if msg.error is not None
                        else None
                    ),
                    last_seen=item.received,
                )
                out.reported += 1
                out.applied_reports.append((item.device, msg))
            else:  # pragma: no cover - _write routes only presence and reported here
                continue
            changed[item.device] = row
            out.seen[item.device] = item.seen
        if changed:
            params = []
            for device, row in changed.items():
                values = {k: v for k, v in row.items() if k != "device"}
                values.update(k_fleet=self.fleet, k_device=device, updated_at=now)
                params.append(values)
            conn.execute(self._update_devices, params)

    @staticmethod
    def _older_report(stored: dict[str, Any] | None, incoming: ReportedState) -> bool:
        """Whether ``incoming`` is older than the stored report (session, then ``ts``)."""
        if not stored:
            return False
        try:
            session = int(stored["session"])
            ts = datetime.fromisoformat(str(stored["ts"]).replace("Z", "+00:00"))
        except (KeyError, TypeError, ValueError):
            return False  # an unreadable stored report is replaced
        if incoming.session != session:
            return incoming.session < session
        return incoming.ts < ts

    def _apply(self, out: _Outcome) -> None:
        """Count a committed transaction and run the hooks."""
        with self._lock:
            self._stored += out.stored
            self._duplicates += out.records - out.stored
            self._events += out.events
            self._duplicate_events += out.event_msgs - out.events
            self._presence += out.presence
            self._reported += out.reported
            self._stale.update(out.stale)
        if len(self._seen) + len(out.seen) > _SEEN_MAX:
            self._seen.clear()
        self._seen.update(out.seen)
        if out.applied_reports and self.on_reported:
            for hook in tuple(self.on_reported):
                for device, report in out.applied_reports:
                    self._call(hook, device, report)
        if out.new_records and self.on_telemetry:
            for thook in tuple(self.on_telemetry):
                for device, records in out.new_records.items():
                    self._call(thook, device, records)

    def _call(self, hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            with self._lock:
                self._hook_errors += 1
                count = self._hook_errors
            if count == 1 or count % 1000 == 0:
                self.log.exception(
                    "ingest of fleet %s: hook %r failed (%d hook errors so far)",
                    self.fleet,
                    hook,
                    count,
                )
