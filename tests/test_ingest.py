"""Ingest of device traffic on a real SQLite file and a real PostgreSQL: idempotent telemetry,
presence sessions, reported state, rejected messages, database errors, flush and stop."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select, text, update

from tinyfleet.agent.protocol import (
    ActiveModel,
    ChunkRequest,
    DeviceEvent,
    DriftReport,
    Heartbeat,
    InferenceStats,
    Presence,
    ReportedError,
    ReportedState,
    TelemetryBatch,
    TelemetryRecord,
    Topics,
    encode,
)
from tinyfleet.host.db import make_engine, upgrade
from tinyfleet.host.db.tables import DeviceRow, EventRow, TelemetryRow
from tinyfleet.host.errors import StorageError
from tinyfleet.host.fleet.ingest import REJECT_REASONS, Ingest

FLEET = "plant-a"
T = Topics(FLEET)
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SHA_A = "3f2a" + "0" * 58 + "9c"
SHA_B = "77e1" + "0" * 58 + "42"
LOCK_WAIT_MS = 100  # how long the ingest's connections wait for a lock in the error tests


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def db_url(tmp_path: Path, database_url: str | None) -> str:
    """A SQLite file in the test's directory, or a fresh PostgreSQL database."""
    return database_url or f"sqlite:///{tmp_path / 'fleet.db'}"


def open_engine(url: str, *, short_lock_wait: bool = False) -> Engine:
    """A migrated engine; with ``short_lock_wait`` its connections give up on a lock quickly."""
    if not short_lock_wait:
        engine = make_engine(url)
    elif url.startswith("sqlite"):
        engine = make_engine(url, check=False)

        @event.listens_for(engine, "connect")
        def _short_busy_timeout(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute(f"PRAGMA busy_timeout = {LOCK_WAIT_MS}")

    else:
        engine = make_engine(url, connect_args={"options": f"-c lock_timeout={LOCK_WAIT_MS}"})
    upgrade(engine)
    return engine


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = open_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def ingest(engine: Engine) -> Iterator[Ingest]:
    ing = Ingest(engine, FLEET, flush_interval=0.01)
    ing.start()
    try:
        yield ing
    finally:
        ing.stop()


# ----------------------------------------------------------------------------- messages


def heartbeat(seq: int, session: int = 2, **kw: Any) -> Heartbeat:
    return Heartbeat(
        session=session,
        seq=seq,
        ts=T0 + timedelta(seconds=seq),
        uptime_s=float(seq),
        model="vibration@4",
        **kw,
    )


def telemetry(device: str, session: int, records: Sequence[TelemetryRecord]) -> tuple[str, bytes]:
    return T.telemetry(device), encode(
        TelemetryBatch(device=device, session=session, records=list(records))
    )


def presence(device: str, session: int, status: str = "online", **kw: Any) -> tuple[str, bytes]:
    msg = Presence(
        device=device,
        status=status,  # type: ignore[arg-type]
        session=session,
        ts=T0 + timedelta(minutes=session),
        agent_version="0.1.0",
        profile="rpi4",
        **kw,
    )
    return T.presence(device), encode(msg)


def reported(device: str, session: int, ts: datetime, generation: int, **kw: Any) -> ReportedState:
    return ReportedState(
        device=device, session=session, ts=ts, generation=generation, phase="active", **kw
    )


def active(version: int, sha: str = SHA_A) -> ActiveModel:
    return ActiveModel(name="vibration", version=version, sha256=sha, slot="b", since=T0)


def submit_all(ing: Ingest, msgs: list[tuple[str, bytes]]) -> None:
    for topic, payload in msgs:
        ing.submit(topic, payload)


def telemetry_rows(engine: Engine, device: str | None = None) -> list[Any]:
    q = select(
        TelemetryRow.device,
        TelemetryRow.session,
        TelemetryRow.seq,
        TelemetryRow.kind,
        TelemetryRow.model,
        TelemetryRow.body,
    ).order_by(TelemetryRow.id)
    if device is not None:
        q = q.where(TelemetryRow.device == device)
    with engine.connect() as conn:
        return list(conn.execute(q))


def device_row(engine: Engine, device: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(DeviceRow.__table__).where(DeviceRow.fleet == FLEET, DeviceRow.device == device)
        ).one()


# ----------------------------------------------------------------------------- telemetry


def test_telemetry_is_stored_once_in_order_across_resends(ingest: Ingest, engine: Engine) -> None:
    seen: list[tuple[str, list[int]]] = []
    ingest.on_telemetry.append(lambda dev, recs: seen.append((dev, [r.seq for r in recs])))
    first = telemetry("pump-1", 2, [heartbeat(s) for s in range(10, 15)])
    # the same batch twice in one writer batch, then again after it was stored
    submit_all(ingest, [first, first])
    assert ingest.flush()
    ingest.submit(*first)
    assert ingest.flush()
    s = ingest.stats
    assert (s.stored, s.duplicates) == (5, 10)
    assert [(r.session, r.seq) for r in telemetry_rows(engine)] == [(2, q) for q in range(10, 15)]

    # after a reconnect: session 3 re-sends the spooled session-2 records with new ones,
    # including a record of an older session (1) the host never got
    resent = telemetry(
        "pump-1",
        3,
        [heartbeat(1, session=1)]
        + [heartbeat(s) for s in range(12, 15)]
        + [heartbeat(s, session=3) for s in range(15, 18)],
    )
    ingest.submit(*resent)
    assert ingest.flush()
    rows = telemetry_rows(engine)
    assert [(r.session, r.seq) for r in rows] == [(2, q) for q in range(10, 15)] + [(1, 1)] + [
        (3, q) for q in range(15, 18)
    ]
    s = ingest.stats
    assert (s.stored, s.duplicates, s.received) == (9, 13, 4)
    # hooks get only what was stored, in order, once
    assert seen == [("pump-1", [10, 11, 12, 13, 14]), ("pump-1", [1, 15, 16, 17])]


def test_telemetry_rows_carry_kind_model_and_body(ingest: Ingest, engine: Engine) -> None:
    drift = DriftReport(
        session=2,
        seq=3,
        ts=T0,
        model="vibration",
        version=4,
        window=0,
        n=256,
        psi=[0.02, 0.31],
        ks=[0.04, 0.22],
        js_prediction=0.05,
        mean_confidence=0.94,
        confidence_shift=-0.01,
    )
    window = InferenceStats(
        session=2,
        seq=2,
        ts=T0,
        window=7,
        model="vibration@4",
        count=256,
        latency_p50_ms=0.4,
        latency_p99_ms=1.1,
        prediction_hist=[250, 4, 2],
    )
    ingest.submit(*telemetry("pump-1", 2, [heartbeat(1, prediction_hist=[9, 1]), window, drift]))
    assert ingest.flush()
    rows = telemetry_rows(engine)
    assert [(r.kind, r.model) for r in rows] == [
        ("heartbeat", "vibration@4"),
        ("inference", "vibration@4"),
        ("drift", "vibration@4"),
    ]
    assert rows[0].body["prediction_hist"] == [9, 1]
    assert rows[1].body["latency_p99_ms"] == 1.1 and rows[1].body["window"] == 7
    assert rows[2].body["psi"] == [0.02, 0.31] and rows[2].body["version"] == 4
    assert not {"kind", "session", "seq", "ts"} & set(rows[2].body)


def test_events_are_stored_once(ingest: Ingest, engine: Engine) -> None:
    ev = DeviceEvent(
        device="pump-1",
        session=2,
        seq=40,
        ts=T0,
        kind="activation_failed",
        detail="health check: accuracy 0.41 < 0.80",
        topic=T.desired("pump-1"),
    )
    submit_all(ingest, [(T.events("pump-1"), encode(ev))] * 3)
    assert ingest.flush()
    with engine.connect() as conn:
        rows = conn.execute(select(EventRow.kind, EventRow.detail, EventRow.topic)).all()
    assert rows == [("activation_failed", ev.detail, ev.topic)]
    assert (ingest.stats.events, ingest.stats.duplicate_events) == (1, 2)


# ----------------------------------------------------------------------------- presence


def test_presence_sessions_and_stale_wills(ingest: Ingest, engine: Engine) -> None:
    ingest.submit(*presence("pump-1", 4, tags=["line-1"], groups=["canary"]))
    assert ingest.flush()
    row = device_row(engine, "pump-1")
    assert (row.online, row.session, row.profile, row.agent_version) == (True, 4, "rpi4", "0.1.0")
    assert (row.tags, row.groups) == (["line-1"], ["canary"])
    assert row.last_seen is not None

    # reconnect: birth of session 5, then the late will of session 4
    submit_all(ingest, [presence("pump-1", 5), presence("pump-1", 4, "offline")])
    assert ingest.flush()
    row = device_row(engine, "pump-1")
    assert (row.online, row.session) == (True, 5)
    assert ingest.stats.stale == {"presence": 1}
    # a stale birth of session 3 changes nothing either
    ingest.submit(*presence("pump-1", 3))
    assert ingest.flush()
    assert device_row(engine, "pump-1").session == 5

    # the will of the current session: offline
    ingest.submit(*presence("pump-1", 5, "offline"))
    assert ingest.flush()
    row = device_row(engine, "pump-1")
    assert (row.online, row.session) == (False, 5)
    assert ingest.stats.presence == 3
    assert ingest.stats.stale == {"presence": 2}


# ----------------------------------------------------------------------------- reported state


def test_reported_state_updates_the_device_row_and_calls_hooks(
    ingest: Ingest, engine: Engine
) -> None:
    calls: list[tuple[str, int]] = []
    ingest.on_reported.append(lambda dev, rep: calls.append((dev, rep.generation)))
    ingest.submit(*presence("pump-1", 12))
    assert ingest.flush()
    # the rollout side owns the desired columns: ingest must not touch them
    with engine.begin() as conn:
        conn.execute(
            update(DeviceRow)
            .where(DeviceRow.device == "pump-1")
            .values(desired={"generation": 18}, desired_generation=18)
        )

    ok = reported("pump-1", 12, T0, 17, active=active(4), previous=active(3, SHA_B))
    failed = reported(
        "pump-1",
        12,
        T0 + timedelta(hours=1),
        18,
        active=active(4),
        error=ReportedError(code="health_check", message="accuracy 0.41 < 0.80", generation=18),
    )
    submit_all(ingest, [(T.reported("pump-1"), encode(ok)), (T.reported("pump-1"), encode(failed))])
    assert ingest.flush()
    row = device_row(engine, "pump-1")
    assert row.reported_generation == 18 and row.phase == "active"
    assert (row.active_model, row.active_version, row.active_sha256) == ("vibration", 4, SHA_A)
    assert row.error == {
        "code": "health_check",
        "message": "accuracy 0.41 < 0.80",
        "generation": 18,
    }
    assert row.reported["generation"] == 18 and row.reported["ts"] == "2025-03-01T13:00:00Z"
    assert (row.desired, row.desired_generation) == ({"generation": 18}, 18)
    assert (row.online, row.session) == (True, 12)
    assert calls == [("pump-1", 17), ("pump-1", 18)]

    # older reports are ignored: same session earlier ts, and an older session
    submit_all(
        ingest,
        [
            (T.reported("pump-1"), encode(ok)),
            (T.reported("pump-1"), encode(reported("pump-1", 11, T0 + timedelta(days=1), 30))),
        ],
    )
    # the retained report redelivered on a host reconnect is applied again (no change)
    ingest.submit(T.reported("pump-1"), encode(failed))
    assert ingest.flush()
    assert device_row(engine, "pump-1").reported_generation == 18
    assert ingest.stats.stale == {"reported": 2}
    assert ingest.stats.reported == 3
    assert calls[-1] == ("pump-1", 18) and len(calls) == 3

    # a newer session with no model and no error clears them
    ingest.submit(T.reported("pump-1"), encode(reported("pump-1", 13, T0, 18)))
    assert ingest.flush()
    row = device_row(engine, "pump-1")
    assert (row.active_model, row.active_version, row.error) == (None, None, None)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).where(DeviceRow.error.is_(None))) == 1


def test_a_report_creates_the_device_row(ingest: Ingest, engine: Engine) -> None:
    ingest.submit(T.reported("pump-2"), encode(reported("pump-2", 1, T0, 0)))
    assert ingest.flush()
    row = device_row(engine, "pump-2")
    assert (row.online, row.session, row.tags, row.phase) == (False, 0, [], "active")
    assert row.last_seen is not None


def test_telemetry_moves_last_seen_at_most_every_step(ingest: Ingest, engine: Engine) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:  # a row created by someone else (e.g. the rollout side)
        conn.execute(
            insert(DeviceRow).values(
                fleet=FLEET,
                device="pump-3",
                tags=[],
                groups=[],
                session=0,
                online=False,
                reported_generation=0,
                desired_generation=0,
                updated_at=now,
            )
        )
    ingest.submit(*telemetry("pump-3", 1, [heartbeat(1, session=1)]))
    ingest.submit(*telemetry("pump-4", 1, [heartbeat(1, session=1)]))  # no row: not created
    assert ingest.flush()
    assert device_row(engine, "pump-3").last_seen >= now - timedelta(seconds=1)
    with engine.begin() as conn:
        conn.execute(update(DeviceRow).values(last_seen=T0))
    ingest.submit(*telemetry("pump-3", 1, [heartbeat(2, session=1)]))
    assert ingest.flush()
    assert device_row(engine, "pump-3").last_seen == T0  # within LAST_SEEN_STEP_S: not again
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(DeviceRow)) == 1


# ----------------------------------------------------------------------------- bad messages


def test_bad_messages_are_counted_by_reason_and_logged_sparingly(
    ingest: Ingest, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    good_batch = TelemetryBatch(device="pump-1", session=2, records=[heartbeat(1)])
    good = encode(good_batch)
    bad: dict[str, tuple[str, bytes]] = {
        "bad_topic": ("tinyfleet/v1/plant-a/dev/pump-1/nonsense", good),
        "other_fleet": (Topics("plant-b").telemetry("pump-1"), good),
        "oversized": (T.telemetry("pump-1"), b" " * 300_000),
        "not_utf8": (T.telemetry("pump-1"), b'{"schema":1,\xff}'),
        "not_json": (T.telemetry("pump-1"), b'{"schema": 1, "device": '),
        "schema_version": (T.telemetry("pump-1"), good.replace(b'"schema":1', b'"schema":2')),
        "unknown_field": (T.telemetry("pump-1"), good.replace(b'"schema":1', b'"schema":1,"x":0')),
        "invalid": (T.telemetry("pump-1"), good.replace(b'"session":2,"rec', b'"session":0,"rec')),
        "device_mismatch": (T.telemetry("pump-9"), good),
    }
    assert set(bad) | {"storage", "internal"} == set(REJECT_REASONS)
    with caplog.at_level(logging.WARNING, logger="tinyfleet.host.fleet.ingest"):
        for _ in range(3):
            submit_all(ingest, list(bad.values()))
        ingest.submit(T.presence("pump-1"), b"")  # a cleared retained message
        ingest.submit(
            T.chunk_request("pump-1"),
            encode(ChunkRequest(device="pump-1", sha256=SHA_A, chunks=[1])),
        )
        ingest.submit(T.telemetry("pump-1"), good)
        assert ingest.flush()
    s = ingest.stats
    assert s.rejected == {reason: 3 for reason in bad}
    assert s.ignored == {"empty": 1, "chunk_request": 1}
    assert s.stored == 1 and s.received == 3 * len(bad) + 3
    assert telemetry_rows(engine)[0].seq == 1
    # at most one log line per device (or per reason without a device) per minute
    lines = [r.getMessage() for r in caplog.records if "rejected message" in r.getMessage()]
    assert len(lines) == 4, lines  # pump-1, pump-9, <bad_topic>, <other_fleet>
    # still alive
    ingest.submit(*telemetry("pump-1", 2, [heartbeat(2)]))
    assert ingest.flush()
    assert ingest.stats.stored == 2


def test_a_failing_hook_is_counted_and_the_writer_goes_on(ingest: Ingest, engine: Engine) -> None:
    def broken(device: str, records: list[TelemetryRecord]) -> None:
        raise ValueError("hook bug")

    ingest.on_telemetry.append(broken)
    ingest.submit(*telemetry("pump-1", 2, [heartbeat(1)]))
    ingest.submit(*telemetry("pump-1", 2, [heartbeat(2)]))
    assert ingest.flush()
    assert ingest.stats.hook_errors >= 1 and ingest.stats.stored == 2


# ----------------------------------------------------------------------------- database errors


def hold_write_lock(url: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """(take, release) of an exclusive lock another connection holds on the telemetry table."""
    if url.startswith("sqlite"):
        con = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)

        def take() -> None:
            con.execute("BEGIN EXCLUSIVE")

        def release() -> None:
            con.execute("ROLLBACK")
            con.close()

        return take, release
    import psycopg

    pg = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))

    def take_pg() -> None:
        pg.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")

    def release_pg() -> None:
        pg.rollback()
        pg.close()

    return take_pg, release_pg


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_locked_database_loses_nothing(db_url: str) -> None:
    engine = open_engine(db_url, short_lock_wait=True)
    ing = Ingest(engine, FLEET, flush_interval=0.01, batch_max=50)
    ing.start()
    take, release = hold_write_lock(db_url)
    try:
        ing.submit(*telemetry("pump-1", 2, [heartbeat(0)]))
        assert ing.flush()
        take()
        for seq in range(1, 201):
            ing.submit(*telemetry(f"pump-{seq % 7}", 2, [heartbeat(seq)]))
        wait_for(lambda: ing.stats.db_errors >= 3)  # retried past several lock waits
        assert not ing.flush(timeout=0.3)
        assert ing.stats.stored == 1 and ing.stats.queue_depth == 200
        assert ing.stats.lag_s > 0.3
        release()
        assert ing.flush(timeout=30)
        s = ing.stats
        assert (s.stored, s.duplicates, s.rejected, s.queue_depth) == (201, 0, {}, 0)
        assert len(telemetry_rows(engine)) == 201
    finally:
        ing.stop()
        engine.dispose()


def test_data_the_database_refuses_is_isolated(db_url: str, engine: Engine) -> None:
    """One poisonous message (refused by a trigger) is rejected; the rest of its batch is stored."""
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER poison BEFORE INSERT ON telemetry WHEN NEW.device = 'poison' "
                    "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN "
                    "IF NEW.device = 'poison' THEN RAISE EXCEPTION 'poisoned row' "
                    "USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER poison BEFORE INSERT ON telemetry "
                    "FOR EACH ROW EXECUTE FUNCTION poison()"
                )
            )
    ing = Ingest(engine, FLEET, flush_interval=0.5)
    ing.start()
    try:
        msgs = [telemetry(f"pump-{i}", 2, [heartbeat(i)]) for i in range(6)]
        msgs.insert(3, telemetry("poison", 2, [heartbeat(99)]))
        submit_all(ing, msgs)
        assert ing.flush()
        s = ing.stats
        assert s.rejected == {"storage": 1} and s.stored == 6 and s.batches == 1
        assert [r.device for r in telemetry_rows(engine)] == [f"pump-{i}" for i in range(6)]
    finally:
        ing.stop()


# ----------------------------------------------------------------------------- queue


def test_flush_and_stop_drain_the_queue(engine: Engine) -> None:
    ing = Ingest(engine, FLEET, batch_max=300, flush_interval=10.0)
    msgs = [telemetry(f"pump-{i % 50}", 2, [heartbeat(i)]) for i in range(1000)]
    submit_all(ing, msgs[:500])  # before start: kept
    ing.start()
    assert ing.flush(timeout=10)  # does not wait for the 10 s flush interval
    assert ing.stats.stored == 500
    submit_all(ing, msgs[500:])
    ing.stop()
    assert ing.stats.stored == 1000 and ing.stats.queue_depth == 0
    assert len(telemetry_rows(engine)) == 1000
    with pytest.raises(RuntimeError):
        ing.submit(*msgs[0])


def test_a_full_queue_blocks_the_producer_and_drops_nothing(engine: Engine) -> None:
    ing = Ingest(engine, FLEET, queue_max=5, flush_interval=0.0)
    msgs = [telemetry("pump-1", 2, [heartbeat(i)]) for i in range(20)]
    producer = threading.Thread(target=submit_all, args=(ing, msgs))
    producer.start()
    wait_for(lambda: ing.stats.received == 5)
    time.sleep(0.1)
    assert producer.is_alive() and ing.stats.received == 5
    ing.start()
    producer.join(10)
    assert not producer.is_alive()
    assert ing.flush()
    assert ing.stats.stored == 20 and ing.stats.max_queue_depth >= 5
    ing.stop()


def test_stop_gives_up_on_a_dead_database_with_an_error(db_url: str) -> None:
    engine = open_engine(db_url, short_lock_wait=True)
    ing = Ingest(engine, FLEET, flush_interval=0.0)
    ing.start()
    take, release = hold_write_lock(db_url)
    take()
    try:
        submit_all(ing, [telemetry("pump-1", 2, [heartbeat(i)]) for i in range(10)])
        wait_for(lambda: ing.stats.db_errors >= 1)
        with pytest.raises(StorageError, match="10 messages not stored"):
            ing.stop(timeout=0.5)
        assert ing.stats.abandoned == 10 and ing.stats.queue_depth == 0
    finally:
        release()
        engine.dispose()
