"""Ingest: telemetry messages/s into SQLite, CPU per message, paced 1,000 devices x 1 msg/s, lag.

Direct: 50,000 TelemetryBatch messages (one heartbeat or inference record each, as
an agent sends them) from 1,000 device ids, submitted as fast as possible into an
``Ingest`` on a SQLite file; compared with a bare stdlib ``sqlite3`` ``executemany``
of the same rows (the floor) in the same run, and split into decode and database
time.  Paced: 1,000 devices at 1 msg/s for 20 s; CPU share of one core, queue depth
and lag over time.  Broker: the same traffic through a private Mosquitto (one paho
publisher, one paho subscriber calling ``submit``), end to end.
Targets (docs DESIGN): >= 5,000 telemetry messages/s into SQLite on one core;
1,000 devices at 1 msg/s with < 25 % of a core and no growing lag.
"""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

N_DIRECT = 50_000
DEVICES = 1_000
PACED_S = 20.0
PACED_RATE = 1_000  # messages/s: 1,000 devices x 1 msg/s
N_BROKER = 20_000
FLEET = "bench"
FLOOR_BATCH = 2_000

TARGET_RATE = 5_000.0
TARGET_CPU_PCT = 25.0


def _messages(n: int, seq0: int = 0) -> list[tuple[str, bytes]]:
    """``n`` encoded TelemetryBatch messages round-robin over ``DEVICES`` devices."""
    from tinyfleet.agent.protocol import Heartbeat, InferenceStats, TelemetryBatch, Topics, encode

    topics = Topics(FLEET)
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    out = []
    for i in range(n):
        d = i % DEVICES
        device = f"pump-{d:04d}"
        seq = seq0 + i // DEVICES
        ts = start + timedelta(seconds=i // DEVICES)
        record: Heartbeat | InferenceStats
        if i % 4 == 0:
            record = Heartbeat(
                session=7,
                seq=seq,
                ts=ts,
                uptime_s=3600.0 + seq,
                model="vibration@4",
                inference_count=100_000 + 256 * seq,
                latency_p50_ms=0.41,
                latency_p99_ms=1.2,
                prediction_hist=[9500 + d, 300, 200],
                rejected_messages=0,
                spool_dropped=0,
                rss_bytes=61_865_984,
            )
        else:
            record = InferenceStats(
                session=7,
                seq=seq,
                ts=ts,
                window=seq,
                model="vibration@4",
                count=256,
                latency_p50_ms=0.43,
                latency_p99_ms=1.1 + (d % 7) / 100,
                prediction_hist=[250, 4, 2],
                mean_confidence=0.94,
            )
        batch = TelemetryBatch(device=device, session=7, records=[record])
        out.append((topics.telemetry(device), encode(batch)))
    return out


def _database(root: Path, name: str) -> Any:
    from tinyfleet.host.db import make_engine, upgrade

    engine = make_engine(f"sqlite:///{root / name}")
    upgrade(engine)
    return engine


def _decode_split(msgs: list[tuple[str, bytes]]) -> tuple[float, float, list[tuple[Any, ...]]]:
    """Seconds per message to parse+decode, and to build the row dicts; the rows as tuples."""
    from tinyfleet.agent.protocol import TelemetryBatch, Topics, decode_message

    topics = Topics(FLEET)
    t0 = time.process_time()
    decoded = [decode_message(topics.parse(topic), payload) for topic, payload in msgs]
    t1 = time.process_time()
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for msg in decoded:
        assert isinstance(msg, TelemetryBatch)
        for r in msg.records:
            rows.append(
                {
                    "device": msg.device,
                    "session": r.session,
                    "seq": r.seq,
                    "ts": r.ts,
                    "kind": r.kind,
                    "model": r.model,
                    "body": r.model_dump(
                        mode="json", exclude_none=True, exclude={"kind", "session", "seq", "ts"}
                    ),
                }
            )
    t2 = time.process_time()
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    received = now.replace(tzinfo=None).strftime(fmt)
    plain = [
        (
            FLEET,
            r["device"],
            r["session"],
            r["seq"],
            r["ts"].replace(tzinfo=None).strftime(fmt),
            r["kind"],
            r["model"],
            json.dumps(r["body"]),
            received,
        )
        for r in rows
    ]
    n = len(msgs)
    return (t1 - t0) / n, (t2 - t1) / n, plain


def _floor(path: Path, plain: list[tuple[Any, ...]]) -> float:
    """Seconds for a bare stdlib executemany of the rows, batches of ``FLOOR_BATCH``."""
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA synchronous = NORMAL")
        sql = (
            "INSERT INTO telemetry (fleet, device, session, seq, ts, kind, model, body, "
            "received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        t0 = time.perf_counter()
        for k in range(0, len(plain), FLOOR_BATCH):
            con.execute("BEGIN")
            con.executemany(sql, plain[k : k + FLOOR_BATCH])
            con.execute("COMMIT")
        return time.perf_counter() - t0
    finally:
        con.close()


def _direct(root: Path) -> dict[str, Any]:
    from tinyfleet.host.fleet.ingest import Ingest

    msgs = _messages(N_DIRECT)
    engine = _database(root, "direct.db")
    ingest = Ingest(engine, FLEET)
    ingest.start()
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        for topic, payload in msgs:
            ingest.submit(topic, payload)
        submitted = time.perf_counter()
        if not ingest.flush(timeout=300):
            raise RuntimeError("ingest did not drain within 300 s")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        stats = ingest.stats
    finally:
        ingest.stop()
        engine.dispose()
    if stats.stored != N_DIRECT:
        raise RuntimeError(f"stored {stats.stored} of {N_DIRECT} records: {stats}")

    decode_s, rows_s, plain = _decode_split(msgs)
    floor_engine = _database(root, "floor.db")
    floor_engine.dispose()
    floor_s = _floor(root / "floor.db", plain)

    rate = N_DIRECT / wall
    cpu_per_msg = cpu / N_DIRECT
    db_per_msg = max(0.0, cpu_per_msg - decode_s - rows_s)
    floor_per_row = floor_s / N_DIRECT
    print(f"\ndirect: {N_DIRECT} messages from {DEVICES} devices into SQLite")
    print(
        f"  ingest      {rate:>9,.0f} msg/s   wall {wall:.2f} s   "
        f"CPU {cpu:.2f} s = {cpu_per_msg * 1e6:.1f} us/msg   "
        f"(submit loop {submitted - t0:.2f} s, {stats.batches} batches)"
    )
    print(
        f"  where:      decode {decode_s * 1e6:.1f} us/msg, row dicts {rows_s * 1e6:.1f} us/msg, "
        f"database + queue {db_per_msg * 1e6:.1f} us/msg"
    )
    print(
        f"  floor       {N_DIRECT / floor_s:>9,.0f} rows/s  stdlib sqlite3 executemany "
        f"({floor_per_row * 1e6:.1f} us/row, rows prepared beforehand)"
    )
    print(f"  ratio       ingest wall / floor wall = {wall / floor_s:.2f}x")
    return {
        "messages": N_DIRECT,
        "devices": DEVICES,
        "msgs_per_s": rate,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_us_per_msg": cpu_per_msg * 1e6,
        "decode_us_per_msg": decode_s * 1e6,
        "rows_us_per_msg": rows_s * 1e6,
        "db_us_per_msg": db_per_msg * 1e6,
        "floor_rows_per_s": N_DIRECT / floor_s,
        "floor_us_per_row": floor_per_row * 1e6,
        "ratio_to_floor": wall / floor_s,
        "batches": stats.batches,
        "max_queue_depth": stats.max_queue_depth,
    }


def _paced(root: Path) -> dict[str, Any]:
    from tinyfleet.host.fleet.ingest import Ingest

    total = int(PACED_S * PACED_RATE)
    msgs = _messages(total)
    engine = _database(root, "paced.db")
    ingest = Ingest(engine, FLEET)
    ingest.start()
    tick = 0.01
    per_tick = int(PACED_RATE * tick)
    producer_cpu: list[float] = []

    def produce() -> None:
        c0 = time.thread_time()
        start = time.perf_counter()
        for k in range(0, total, per_tick):
            delay = start + (k // per_tick) * tick - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            for topic, payload in msgs[k : k + per_tick]:
                ingest.submit(topic, payload)
        producer_cpu.append(time.thread_time() - c0)

    samples: list[tuple[float, int, float]] = []
    try:
        producer = threading.Thread(target=produce, name="paced-producer")
        c0, t0 = time.process_time(), time.perf_counter()
        producer.start()
        while producer.is_alive():
            producer.join(0.25)
            s = ingest.stats
            samples.append((time.perf_counter() - t0, s.queue_depth, s.lag_s))
        end_depth = ingest.stats.queue_depth
        if not ingest.flush(timeout=60):
            raise RuntimeError("ingest did not drain within 60 s")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        stats = ingest.stats
    finally:
        ingest.stop()
        engine.dispose()
    if stats.stored != total:
        raise RuntimeError(f"stored {stats.stored} of {total} records: {stats}")
    ingest_cpu = cpu - producer_cpu[0]
    cpu_pct = 100.0 * ingest_cpu / wall
    depths = [d for _, d, _ in samples]
    lags = [lag for _, _, lag in samples]
    quarter = max(1, len(samples) // 4)
    first_q = statistics.mean(lags[:quarter])
    last_q = statistics.mean(lags[-quarter:])
    growing = last_q - first_q > 0.1 or end_depth > PACED_RATE
    print(f"\npaced: {DEVICES} devices x 1 msg/s for {PACED_S:g} s ({total} messages)")
    print(
        f"  CPU         {cpu_pct:.1f} % of one core for ingest "
        f"({ingest_cpu:.2f} s over {wall:.1f} s; the paced producer's own {producer_cpu[0]:.2f} s "
        f"excluded; whole process {100.0 * cpu / wall:.1f} %)"
    )
    print(
        f"  queue depth max {max(depths)}, median {statistics.median(depths):.0f}, "
        f"at end {end_depth}; lag max {max(lags) * 1000:.0f} ms, median "
        f"{statistics.median(lags) * 1000:.0f} ms, first quarter {first_q * 1000:.0f} ms, "
        f"last quarter {last_q * 1000:.0f} ms; {stats.batches} batches "
        f"({total / stats.batches:.0f} msgs each)"
    )
    over_time = [
        (round(t, 1), d, round(lag * 1000)) for t, d, lag in samples[:: max(1, len(samples) // 10)]
    ]
    print(f"  (t s, depth, lag ms) over time: {over_time}")
    return {
        "messages": total,
        "wall_s": wall,
        "ingest_cpu_s": ingest_cpu,
        "producer_cpu_s": producer_cpu[0],
        "cpu_pct": cpu_pct,
        "process_cpu_pct": 100.0 * cpu / wall,
        "max_queue_depth": max(depths),
        "median_queue_depth": statistics.median(depths),
        "end_queue_depth": end_depth,
        "max_lag_s": max(lags),
        "median_lag_s": statistics.median(lags),
        "lag_first_quarter_s": first_q,
        "lag_last_quarter_s": last_q,
        "growing_lag": growing,
        "batches": stats.batches,
        "samples": samples,
    }


def _broker(root: Path) -> dict[str, Any]:
    """End to end through a private Mosquitto: one paho publisher, one paho subscriber."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    try:
        from mqtt_broker import MosquittoBroker, mosquitto_path
    except ImportError as exc:
        print(f"\nbroker: skipped ({exc})")
        return {"skipped": str(exc)}
    if mosquitto_path() is None:
        print("\nbroker: skipped (mosquitto is not installed)")
        return {"skipped": "mosquitto is not installed"}
    import paho.mqtt.client as mqtt

    from tinyfleet.agent.protocol import Topics
    from tinyfleet.host.fleet.ingest import Ingest

    engine = _database(root, "broker.db")
    ingest = Ingest(engine, FLEET)
    ingest.start()
    broker = MosquittoBroker(
        root / "mosquitto",
        persistence=False,
        extra_config="max_queued_messages 0\nmax_inflight_messages 0\n",
    )
    broker.start()
    host, port = broker.address
    subscribed = threading.Event()
    host_client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="bench-host", clean_session=True
    )
    host_client.on_message = lambda _c, _u, m: ingest.submit(m.topic, m.payload)
    host_client.on_subscribe = lambda *_a: subscribed.set()
    host_client.max_inflight_messages_set(0)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    go = ctx.Event()
    publisher = ctx.Process(target=_publish, args=(host, port, N_BROKER, ready, go))
    try:
        host_client.connect(host, port)
        host_client.subscribe(Topics(FLEET).host_subscriptions())
        host_client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("subscription not acknowledged")
        publisher.start()
        if not ready.wait(60):
            raise RuntimeError("publisher did not start")
        c0, t0 = time.process_time(), time.perf_counter()
        go.set()
        deadline = time.monotonic() + 120
        while ingest.stats.received < N_BROKER and time.monotonic() < deadline:
            time.sleep(0.005)
        if not ingest.flush(timeout=120):
            raise RuntimeError("ingest did not drain within 120 s")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        stats = ingest.stats
        publisher.join(30)
    finally:
        if publisher.is_alive():
            publisher.terminate()
        host_client.loop_stop()
        host_client.disconnect()
        broker.stop()
        ingest.stop()
        engine.dispose()
    if stats.stored != N_BROKER:
        raise RuntimeError(f"stored {stats.stored} of {N_BROKER} records: {stats}")
    rate = N_BROKER / wall
    print(
        f"\nbroker: {N_BROKER} messages, paho publisher (own process) -> Mosquitto -> "
        f"paho subscriber -> ingest"
    )
    print(
        f"  end to end  {rate:>9,.0f} msg/s   wall {wall:.2f} s; host process CPU {cpu:.2f} s "
        f"= {cpu / N_BROKER * 1e6:.1f} us/msg (subscriber + ingest)"
    )
    return {
        "messages": N_BROKER,
        "msgs_per_s": rate,
        "wall_s": wall,
        "host_cpu_s": cpu,
        "host_cpu_us_per_msg": cpu / N_BROKER * 1e6,
    }


def _publish(host: str, port: int, n: int, ready: Any, go: Any) -> None:
    """Publisher process: ``n`` telemetry messages at QoS 1 from one paho client."""
    import paho.mqtt.client as mqtt

    msgs = _messages(n)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub")
    pub.max_inflight_messages_set(1000)
    pub.max_queued_messages_set(0)
    pub.connect(host, port)
    pub.loop_start()
    try:
        ready.set()
        go.wait(60)
        infos = [pub.publish(topic, payload, qos=1) for topic, payload in msgs]
        for info in infos:
            info.wait_for_publish(60)
    finally:
        pub.loop_stop()
        pub.disconnect()


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tinyfleet-bench-ingest-") as tmp:
        root = Path(tmp)
        direct = _direct(root)
        paced = _paced(root)
        broker = _broker(root)
    checks = {
        f"telemetry msgs/s into SQLite (>= {TARGET_RATE:,.0f})": (
            direct["msgs_per_s"],
            direct["msgs_per_s"] >= TARGET_RATE,
        ),
        f"CPU % of a core at 1,000 msg/s (< {TARGET_CPU_PCT:g})": (
            paced["cpu_pct"],
            paced["cpu_pct"] < TARGET_CPU_PCT,
        ),
        "lag growth, last - first quarter, s (no growth)": (
            paced["lag_last_quarter_s"] - paced["lag_first_quarter_s"],
            not paced["growing_lag"],
        ),
    }
    print()
    for label, (value, ok) in checks.items():
        print(f"  target {label:<48} {value:>10.3f}  {'met' if ok else 'NOT MET'}")
    return {
        "direct": direct,
        "paced": paced,
        "broker": broker,
        "targets": {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()},
    }
