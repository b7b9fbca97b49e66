"""Drift alerts on the host: rule engine, monitor with its tables, sinks, retrain policy.

The monitor runs on a real registry (SQLite and PostgreSQL) with a registered version
whose reference profile has ``N_FEATURES`` features; the webhook sink posts to a real
local HTTP server; the end-to-end test sends drift reports through a real Mosquitto
into the fleet service and reads the alert back on ``host/events``.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from agent_support import N_FEATURES, make_tflite, register_version
from fleet_support import make_host, running_service, wait_until
from mqtt_broker import MosquittoBroker
from mqtt_broker import mosquitto_fixture as mosquitto_fixture
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError
from sqlalchemy import func, select

from tinyfleet.agent.protocol import (
    DriftReport,
    HostEvent,
    ProtocolError,
    TelemetryBatch,
    Topics,
    decode,
    decode_message,
    encode,
)
from tinyfleet.host.db.tables import AlertRow, DriftCohortRow, DriftScoreRow, RetrainDecisionRow
from tinyfleet.host.errors import ConfigError
from tinyfleet.host.fleet.alert_sinks import AlertEvent, WebhookSink
from tinyfleet.host.fleet.drift import DriftMonitor, ProfileSource
from tinyfleet.host.fleet.drift_rules import (
    DriftSettings,
    RetrainSettings,
    RuleEngine,
    RuleSpec,
    WebhookSettings,
)
from tinyfleet.host.fleet.retrain import CohortKey, RetrainPolicy
from tinyfleet.host.registry import Registry
from tinyfleet.host.settings import load_settings

T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def report(
    window: int,
    ks: float = 0.1,
    *,
    features: int = N_FEATURES,
    model: str = "tiny",
    version: int = 1,
    session: int = 1,
    conf_shift: float = 0.0,
    jitter: float = 0.0,
) -> DriftReport:
    """A window whose KS on feature 0 is ``ks`` (the others stay at 0.1)."""
    ks_values = [0.1 + jitter * ((window + j) % 3 - 1) for j in range(features)]
    ks_values[0] = ks
    return DriftReport(
        session=session,
        seq=window,
        ts=T0 + timedelta(seconds=window),
        model=model,
        version=version,
        window=window,
        n=200,
        psi=[10 * v * v for v in ks_values],
        ks=ks_values,
        js_prediction=0.05,
        mean_confidence=0.9 + conf_shift,
        confidence_shift=conf_shift,
    )


def small_settings(**kw: Any) -> DriftSettings:
    values: dict[str, Any] = {
        "baseline_windows": 3,
        "rules": [
            RuleSpec(name="ks_shift", statistic="ks_shift", threshold=3.0, k=2, m=3, clear_after=2),
            RuleSpec(name="confidence_drop", statistic="confidence_drop", threshold=0.2, k=1, m=1),
        ],
        "cohort_fraction": 0.5,
        "cohort_min_devices": 2,
    }
    values.update(kw)
    return DriftSettings(**values)


# ---------------------------------------------------------------- the rule engine


def test_k_of_m_opens_once_and_clears_after_clean_windows() -> None:
    engine = RuleEngine(small_settings())
    kinds = []
    for w in range(3):  # baseline: ks 0.1 everywhere
        assert engine.observe("d1", report(w)) == []
    for w, ks in [(3, 0.1), (4, 0.5), (5, 0.1), (6, 0.5), (7, 0.5), (8, 0.5), (9, 0.1), (10, 0.1)]:
        kinds.append([(t.kind, t.rule) for t in engine.observe("d1", report(w, ks))])
    assert kinds[0] == [] and kinds[1] == [] and kinds[2] == []  # 1 of 3, then 1 of 3 again
    assert kinds[3] == [("opened", "ks_shift")]  # windows 4 and 6: 2 of the last 3
    assert kinds[4] == [("ongoing", "ks_shift")] and kinds[5] == [("ongoing", "ks_shift")]
    assert kinds[6] == [("ongoing", "ks_shift")]  # one clean window is not enough
    assert kinds[7] == [("cleared", "ks_shift")]
    st = engine.state("d1")
    assert st is not None and not st.rules["ks_shift"].open


def test_relative_rules_wait_for_the_baseline_and_absolute_ones_do_not() -> None:
    engine = RuleEngine(small_settings())
    # a huge KS during the baseline is part of the baseline, not an alert
    assert engine.observe("d1", report(0, 0.9)) == []
    out = engine.observe("d1", report(1, 0.9, conf_shift=-0.3))
    assert [(t.kind, t.rule) for t in out] == [("opened", "confidence_drop")]


def test_out_of_order_and_duplicate_windows_are_ignored() -> None:
    engine = RuleEngine(small_settings())
    for w in range(5):
        engine.observe("d1", report(w))
    assert engine.observe("d1", report(3, 0.9)) == []
    assert engine.observe("d1", report(4, 0.9)) == []
    assert engine.out_of_order == 2
    # a new session restarts the window count and is accepted
    engine.observe("d1", report(0, 0.9, session=2))
    out = engine.observe("d1", report(1, 0.9, session=2))
    assert [t.kind for t in out] == ["opened"]


def test_a_new_model_version_clears_open_alerts_and_starts_a_new_baseline() -> None:
    engine = RuleEngine(small_settings())
    for w in range(3):
        engine.observe("d1", report(w))
    engine.observe("d1", report(3, 0.9))
    assert [t.kind for t in engine.observe("d1", report(4, 0.9))] == ["opened"]
    out = engine.observe("d1", report(0, 0.9, version=2))
    assert [(t.kind, t.version, t.reason) for t in out] == [("cleared", 1, "model version changed")]
    st = engine.state("d1")
    assert st is not None and st.version == 2 and st.baseline.n == 1


def test_settings_are_strict_and_load_from_host_toml(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        RuleSpec(name="x", statistic="ks_shift", threshold=1, k=4, m=3)
    with pytest.raises(ValidationError):
        RuleSpec(name="x", statistic="psi_mean", threshold=1)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        DriftSettings(rules=[RuleSpec(name="cohort", statistic="ks_max", threshold=0.5)])
    (tmp_path / "host.toml").write_text(
        '[drift]\nbaseline_windows = 5\n[[drift.rules]]\nname = "psi"\nstatistic = "psi_max"\n'
        "threshold = 0.3\nk = 3\nm = 4\n[drift.retrain]\ncooldown_s = 60\n"
    )
    s = load_settings(tmp_path, environ={})
    assert s.drift.baseline_windows == 5
    assert s.drift.rules == [RuleSpec(name="psi", statistic="psi_max", threshold=0.3, k=3, m=4)]
    assert s.drift.retrain.cooldown_s == 60
    (tmp_path / "host.toml").write_text("[drift]\nbaseline_window = 5\n")
    with pytest.raises(ConfigError, match=r"drift\.baseline_window: Extra inputs"):
        load_settings(tmp_path, environ={})
    assert DriftSettings().rules  # sane defaults


# ---------------------------------------------------------------- the monitor on a database


@pytest.fixture(scope="module")
def tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tflite(tmp_path_factory.mktemp("drift-model") / "m.tflite", 1)


@pytest.fixture
def versioned(registry: Registry, signing_key: Any, tflite: Path) -> Registry:
    register_version(registry, signing_key, tflite)
    return registry


def _rows(registry: Registry, table: Any) -> list[Any]:
    with registry.engine.connect() as conn:
        t = table.__table__
        return [r._mapping for r in conn.execute(select(t).order_by(*t.primary_key.columns))]


class ListSink:
    def __init__(self) -> None:
        self.events: list[AlertEvent] = []

    def emit(self, event: AlertEvent) -> None:
        self.events.append(event)

    def close(self, timeout: float = 5.0) -> None:
        pass


def _monitor(registry: Registry, **kw: Any) -> tuple[DriftMonitor, ListSink]:
    sink = ListSink()
    mon = DriftMonitor(
        registry.engine,
        "f1",
        kw.pop("settings", small_settings()),
        profiles=ProfileSource(registry),
        sinks=[sink],
        **kw,
    )
    return mon, sink


def test_bad_reports_are_rejected_counted_and_never_scored(versioned: Registry) -> None:
    mon, sink = _monitor(versioned)
    mon.process(
        [
            ("d1", report(0, features=N_FEATURES - 1)),  # wrong feature count
            ("d1", report(1, features=N_FEATURES + 3)),
            ("d2", report(0, version=9)),  # the registry has no tiny@9
            ("d3", report(0, model="other")),
        ]
    )
    assert mon.stats.rejected == {"feature_count": 2, "unknown_version": 2}
    assert mon.stats.accepted == 0
    assert _rows(versioned, DriftScoreRow) == [] and _rows(versioned, DriftCohortRow) == []
    mon.process([("d1", report(0))])
    assert [r["device"] for r in _rows(versioned, DriftScoreRow)] == ["d1"]
    assert sink.events == []


def test_nan_and_negative_scores_are_refused_at_ingest() -> None:
    topics = Topics("f1")
    good = json.loads(encode(TelemetryBatch(device="d1", session=1, records=[report(0)])).decode())
    parsed = topics.parse(topics.telemetry("d1"))
    decode_message(parsed, json.dumps(good).encode())  # the baseline payload is fine
    for field, bad in (("psi", [float("nan")] * N_FEATURES), ("psi", [-0.1] * N_FEATURES)):
        body = json.loads(json.dumps(good))
        body["records"][0][field] = bad
        raw = json.dumps(body).encode()  # Python writes NaN, as a sloppy device might
        with pytest.raises(ProtocolError):
            decode_message(parsed, raw)
    body = json.loads(json.dumps(good))
    body["records"][0]["n"] = -5
    with pytest.raises(ProtocolError):
        decode_message(parsed, json.dumps(body).encode())


def test_alerts_are_stored_deduplicated_cleared_and_survive_a_restart(
    versioned: Registry,
) -> None:
    mon, sink = _monitor(versioned)
    for w in range(4):
        mon.process([("d1", report(w)), ("d2", report(w))])
    for w in (4, 5, 6):
        mon.process([("d1", report(w, 0.6)), ("d2", report(w))])
    alerts = _rows(versioned, AlertRow)
    device_alerts = [a for a in alerts if a["device"] == "d1"]
    assert len(device_alerts) == 1
    a = device_alerts[0]
    assert (a["state"], a["rule"], a["cohort"], a["windows"]) == ("open", "ks_shift", "*|tiny@1", 2)
    assert a["last_value"] > 3.0
    assert [(e.kind, e.device, e.rule) for e in sink.events] == [("drift_alert", "d1", "ks_shift")]
    # half of the cohort alerting = cohort alert (fraction 0.5, min 2 devices): not yet
    assert not [x for x in alerts if x["device"] is None]

    # a restart: the open alert is restored, not opened twice
    mon2, sink2 = _monitor(versioned)
    mon2.process([("d1", report(7, 0.6)), ("d2", report(7))])
    alerts = _rows(versioned, AlertRow)
    assert len([x for x in alerts if x["device"] == "d1"]) == 1
    assert sink2.events == []
    st = mon2.rules.state("d1")
    assert st is not None and st.baseline.n == 3  # the baseline came back from the database
    mon2.process([("d1", report(8)), ("d2", report(8))])
    mon2.process([("d1", report(9)), ("d2", report(9))])
    alerts = _rows(versioned, AlertRow)
    (a,) = [x for x in alerts if x["device"] == "d1"]
    assert a["state"] == "cleared" and a["open_key"] is None and a["cleared_at"] is not None
    assert [(e.kind, e.alert_id) for e in sink2.events] == [("drift_cleared", a["id"])]
    scores = {r["device"]: r for r in _rows(versioned, DriftScoreRow)}
    assert scores["d1"]["window"] == 9 and scores["d1"]["windows"] == 10

    # an alert of a rule taken out of the configuration is cleared on start
    for w in (10, 11):
        mon2.process([("d1", report(w, 0.6)), ("d2", report(w))])
    assert [a["state"] for a in _rows(versioned, AlertRow) if a["device"] == "d1"] == [
        "cleared",
        "open",
    ]
    only_confidence = small_settings(rules=[small_settings().rules[1]])
    mon3, _ = _monitor(versioned, settings=only_confidence)
    mon3.load()
    (last,) = [a for a in _rows(versioned, AlertRow) if a["device"] == "d1"][1:]
    assert (last["state"], last["reason"]) == ("cleared", "rule no longer configured")


def test_cohort_aggregates_and_cohort_alerts(versioned: Registry) -> None:
    from tinyfleet.host.db.tables import DeviceRow

    with versioned.engine.begin() as conn:
        for d, tags in (("d1", ["line-a"]), ("d2", ["line-a"]), ("d3", ["line-b"])):
            conn.execute(
                DeviceRow.__table__.insert(),
                {
                    "fleet": "f1",
                    "device": d,
                    "tags": tags,
                    "groups": [],
                    "session": 1,
                    "online": True,
                    "reported_generation": 0,
                    "desired_generation": 0,
                    "updated_at": T0,
                },
            )
    mon, sink = _monitor(versioned)
    devices = ("d1", "d2", "d3")
    for w in range(4):
        mon.process([(d, report(w)) for d in devices])
    for w in (4, 5):
        mon.process([("d1", report(w, 0.6)), ("d2", report(w, 0.7)), ("d3", report(w))])
    cohorts = {r["cohort"]: r for r in _rows(versioned, DriftCohortRow)}
    assert set(cohorts) == {"*|tiny@1", "line-a|tiny@1", "line-b|tiny@1"}
    assert (cohorts["line-a|tiny@1"]["devices"], cohorts["line-a|tiny@1"]["alerting"]) == (2, 2)
    assert (cohorts["*|tiny@1"]["devices"], cohorts["*|tiny@1"]["alerting"]) == (3, 2)
    assert cohorts["line-b|tiny@1"]["alerting"] == 0
    assert cohorts["line-a|tiny@1"]["mean_ks_max"] == pytest.approx(0.65)
    cohort_alerts = {a["cohort"]: a for a in _rows(versioned, AlertRow) if a["device"] is None}
    assert set(cohort_alerts) == {"*|tiny@1", "line-a|tiny@1"}
    assert all(a["rule"] == "cohort" and a["state"] == "open" for a in cohort_alerts.values())
    device_alert = next(a for a in _rows(versioned, AlertRow) if a["device"] == "d1")
    assert device_alert["cohort"] == "line-a|tiny@1"
    for w in (6, 7):
        mon.process([(d, report(w)) for d in devices])
    states = {(a["device"], a["cohort"]): a["state"] for a in _rows(versioned, AlertRow)}
    assert set(states.values()) == {"cleared"}
    kinds = [(e.kind, e.device is None) for e in sink.events]
    assert kinds.count(("drift_alert", True)) == 2 and kinds.count(("drift_cleared", True)) == 2


# ---------------------------------------------------------------- retrain policy


def test_retrain_policy_triggers_records_and_keeps_its_cooldown_across_restarts(
    versioned: Registry,
) -> None:
    calls: list[tuple[CohortKey, list[str]]] = []

    def trigger(cohort: CohortKey, devices: list[str]) -> str | None:
        calls.append((cohort, devices))
        return f"run-{len(calls)}"

    now = [T0]
    settings = RetrainSettings(
        min_devices=2, min_fraction=0.5, sustained_windows=2, cooldown_s=3600, decision_interval_s=0
    )

    def policy() -> RetrainPolicy:
        return RetrainPolicy(versioned.engine, "f1", settings, trigger, clock=lambda: now[0])

    p = policy()
    cohort = CohortKey("*", "tiny", 1)
    assert p.evaluate(cohort, 10, []) is None
    assert p.evaluate(cohort, 10, ["d1"]) == "too_few_devices"
    assert p.evaluate(cohort, 10, ["d1", "d2", "d3", "d4"]) == "too_few_devices"  # 40 %
    assert p.evaluate(cohort, 10, ["d1", "d2", "d3", "d4", "d5"]) == "triggered"
    assert calls == [(cohort, ["d1", "d2", "d3", "d4", "d5"])]
    now[0] = T0 + timedelta(minutes=30)
    # a restart (a new policy on the same database) still knows the last trigger,
    # and a tag cohort of the same version shares the cooldown
    p = policy()
    assert p.evaluate(CohortKey("line-a", "tiny", 1), 2, ["d1", "d2"]) == "cooldown"
    assert p.evaluate(cohort, 10, ["d1", "d2", "d3", "d4", "d5"]) == "cooldown"
    assert len(calls) == 1
    now[0] = T0 + timedelta(minutes=61)
    assert p.evaluate(cohort, 10, ["d1", "d2", "d3", "d4", "d5"]) == "triggered"
    rows = _rows(versioned, RetrainDecisionRow)
    assert [r["decision"] for r in rows] == [
        "too_few_devices",
        "too_few_devices",
        "triggered",
        "cooldown",
        "cooldown",
        "triggered",
    ]
    assert rows[2]["run_id"] == "run-1" and rows[2]["devices"] == ["d1", "d2", "d3", "d4", "d5"]
    assert rows[3]["cohort"] == "line-a|tiny@1" and "cooldown until" in rows[3]["detail"]


def test_retrain_policy_rate_limits_repeated_decisions_and_survives_a_failing_trigger(
    versioned: Registry,
) -> None:
    def boom(cohort: CohortKey, devices: list[str]) -> str | None:
        raise RuntimeError("superlink down")

    settings = RetrainSettings(min_devices=1, min_fraction=0.0, decision_interval_s=3600)
    p = RetrainPolicy(versioned.engine, "f1", settings, None)
    c = CohortKey("*", "tiny", 1)
    assert p.evaluate(c, 5, ["d1"]) == "no_trigger"
    assert p.evaluate(c, 5, ["d1"]) is None  # same outcome within the interval: not recorded
    p.trigger = boom
    assert p.evaluate(c, 5, ["d1"]) == "trigger_failed"
    rows = _rows(versioned, RetrainDecisionRow)
    assert [r["decision"] for r in rows] == ["no_trigger", "trigger_failed"]
    assert "superlink down" in rows[1]["detail"]


def test_monitor_asks_the_policy_once_alerts_are_sustained(versioned: Registry) -> None:
    calls: list[tuple[str, list[str]]] = []
    policy = RetrainPolicy(
        versioned.engine,
        "f1",
        RetrainSettings(min_devices=2, min_fraction=0.5, sustained_windows=2, cooldown_s=3600),
        lambda c, d: calls.append((c.key, d)) or "run-x",
    )
    mon, _ = _monitor(versioned, retrain=policy)
    for w in range(4):
        mon.process([(d, report(w)) for d in ("d1", "d2", "d3")])
    for w in range(4, 9):
        mon.process([("d1", report(w, 0.6)), ("d2", report(w, 0.7)), ("d3", report(w))])
    assert calls == [("*|tiny@1", ["d1", "d2"])]  # once: then cooldown
    decisions = [r["decision"] for r in _rows(versioned, RetrainDecisionRow)]
    assert decisions[0] == "triggered" and set(decisions[1:]) <= {"cooldown"}


# ---------------------------------------------------------------- webhook sink


class _Hook(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        with srv.lock:
            srv.calls += 1
            fail = srv.calls <= srv.fail_first
            code = srv.fail_code if fail else 204
            if not fail:
                srv.bodies.append((json.loads(body), self.headers.get("Authorization")))
        if srv.delay:
            time.sleep(srv.delay)
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook_server() -> Iterator[Any]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    srv.lock = threading.Lock()  # type: ignore[attr-defined]
    srv.calls, srv.fail_first, srv.fail_code, srv.delay = 0, 0, 503, 0.0  # type: ignore[attr-defined]
    srv.bodies = []  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _event(i: int = 1) -> AlertEvent:
    return AlertEvent(
        "drift_alert", i, "f1", "d1", "ks_shift", "*|tiny@1", "tiny", 1, 4.2, 2, ts=T0
    )


def _hook_settings(srv: Any, **kw: Any) -> WebhookSettings:
    values: dict[str, Any] = {
        "url": f"http://127.0.0.1:{srv.server_address[1]}/alerts",
        "backoff_base_s": 0.01,
        "backoff_cap_s": 0.05,
        "timeout_s": 2.0,
    }
    values.update(kw)
    return WebhookSettings(**values)


def test_webhook_retries_with_backoff_until_the_server_answers(hook_server: Any) -> None:
    hook_server.fail_first = 3
    sink = WebhookSink(_hook_settings(hook_server, max_attempts=5, bearer_token="t0k"))
    t0 = time.monotonic()
    sink.emit(_event())
    assert sink.flush(10)
    assert hook_server.calls == 4
    assert (sink.stats.delivered, sink.stats.retries, sink.stats.failed) == (1, 3, 0)
    body, auth = hook_server.bodies[0]
    assert auth == "Bearer t0k"
    assert body == {
        "kind": "drift_alert",
        "ts": "2026-11-26T09:00:00Z",
        "alert_id": 1,
        "fleet": "f1",
        "device": "d1",
        "rule": "ks_shift",
        "cohort": "*|tiny@1",
        "model": "tiny@1",
        "value": 4.2,
        "windows": 2,
        "reason": "",
    }
    assert time.monotonic() - t0 < 5
    sink.close()


def test_webhook_gives_up_after_max_attempts_and_on_a_client_error(hook_server: Any) -> None:
    hook_server.fail_first = 100
    sink = WebhookSink(_hook_settings(hook_server, max_attempts=3))
    sink.emit(_event(1))
    assert sink.flush(10)
    assert (hook_server.calls, sink.stats.failed, sink.stats.delivered) == (3, 1, 0)
    hook_server.calls, hook_server.fail_code = 0, 400
    sink.emit(_event(2))
    assert sink.flush(10)
    assert hook_server.calls == 1 and sink.stats.failed == 2  # 400 is final
    sink.close()
    dead = WebhookSink(
        WebhookSettings(
            url="http://127.0.0.1:9/x",
            max_attempts=2,
            backoff_base_s=0.01,
            backoff_cap_s=0.01,
            timeout_s=1,
        )
    )
    dead.emit(_event(3))
    assert dead.flush(10)
    assert dead.stats.failed == 1 and dead.stats.attempts == 2
    dead.close()


def test_webhook_queue_is_bounded_and_emit_never_blocks(hook_server: Any) -> None:
    hook_server.delay = 0.3
    sink = WebhookSink(_hook_settings(hook_server, queue_max=2))
    t0 = time.monotonic()
    for i in range(10):
        sink.emit(_event(i))
    assert time.monotonic() - t0 < 0.1
    assert sink.flush(10)
    # one in flight + two queued at most; the rest dropped and counted
    assert sink.stats.delivered + sink.stats.dropped == 10
    assert 2 <= sink.stats.delivered <= 3 and sink.stats.dropped >= 7
    sink.close()


# ---------------------------------------------------------------- end to end: MQTT in, MQTT out


@pytest.mark.mqtt
def test_service_turns_drift_telemetry_into_an_alert_on_host_events(
    tmp_path: Path, mosquitto: MosquittoBroker, tflite: Path, hook_server: Any
) -> None:
    host = make_host(tmp_path / "home", mosquitto, fleet="f1")
    register_version(host.registry, host.signer, tflite)
    drift = small_settings(webhook=_hook_settings(hook_server))
    host.settings = host.settings.model_copy(update={"drift": drift})
    topics = Topics("f1")
    events: list[HostEvent] = []
    online = threading.Event()
    subscribed = threading.Event()

    def on_message(c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        if m.topic == topics.host_events():
            events.append(decode(HostEvent, m.payload))
        elif b'"online"' in m.payload:
            online.set()  # the host subscribes before it announces itself

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"obs-{secrets.token_hex(4)}")
    client.on_connect = lambda c, *_: c.subscribe(
        [(topics.host_events(), 1), (topics.host_presence(), 1)]
    )
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = on_message
    client.connect(*mosquitto.address)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        with running_service(host) as service:
            assert online.wait(10)

            def send(device: str, records: list[DriftReport]) -> None:
                batch = TelemetryBatch(device=device, session=1, records=records)
                client.publish(topics.telemetry(device), encode(batch), qos=1).wait_for_publish(5)

            send("d1", [report(w) for w in range(4)])
            send("d1", [report(4, 0.7), report(5, 0.7)])
            send("d2", [report(0, features=N_FEATURES - 2)])  # rejected
            alert = wait_until(lambda: [e for e in events if e.kind == "drift_alert"], 20)[0]
            assert alert.payload["device"] == "d1" and alert.payload["rule"] == "ks_shift"
            assert alert.payload["cohort"] == "*|tiny@1" and alert.payload["value"] > 3
            wait_until(lambda: hook_server.bodies, 10)
            assert hook_server.bodies[0][0]["alert_id"] == alert.payload["alert_id"]
            assert service.drift.stats.rejected == {"feature_count": 1}
            send("d1", [report(6), report(7)])
            cleared = wait_until(lambda: [e for e in events if e.kind == "drift_cleared"], 20)
            assert cleared[0].payload["alert_id"] == alert.payload["alert_id"]
            with service.registry.engine.connect() as conn:
                n_scores = conn.execute(
                    select(func.count()).select_from(DriftScoreRow.__table__)
                ).scalar()
                # the rejected report is in telemetry (raw) but never a score
                assert n_scores == 1
    finally:
        client.loop_stop()
        client.disconnect()


# ---------------------------------------------------------------- the command line


def test_drift_and_alerts_commands(
    tmp_path: Path, tflite: Path, signing_key: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    from tinyfleet.host.cli.app import main

    home = tmp_path / "home"
    settings = load_settings(home, environ={})
    registry = Registry(settings.registry_dir, settings.database_url)
    register_version(registry, signing_key, tflite)
    mon = DriftMonitor(
        registry.engine, "default", small_settings(), profiles=ProfileSource(registry)
    )
    for w in range(4):
        mon.process([("d1", report(w)), ("d2", report(w))])
    for w in (4, 5):
        mon.process([("d1", report(w, 0.6)), ("d2", report(w))])
    RetrainPolicy(registry.engine, "default", RetrainSettings(min_devices=5)).evaluate(
        CohortKey("*", "tiny", 1), 2, ["d1"]
    )

    def cli(*args: str) -> tuple[int, Any, str]:
        capfd.readouterr()
        code = main(["--home", str(home), *args])
        cap = capfd.readouterr()
        out: Any = json.loads(cap.out) if "--json" in args and cap.out.strip() else cap.out
        return code, out, cap.err

    code, out, _ = cli("drift", "status", "--json")
    assert code == 0 and out["ok"]
    assert [d["device"] for d in out["devices"]] == ["d1", "d2"]
    d1 = out["devices"][0]
    assert d1["model"] == "tiny@1" and d1["window"] == 5 and d1["ks_max"] == pytest.approx(0.6)
    assert d1["stats"]["ks_shift"] > 3
    assert [(c["cohort"], c["devices"], c["alerting"]) for c in out["cohorts"]] == [
        ("*|tiny@1", 2, 1)
    ]
    code, text, _ = cli("drift", "status", "--cohort", "tiny@1")
    assert code == 0 and "d1" in text and "*|tiny@1" in text
    code, out, _ = cli("drift", "status", "--cohort", "line-z|tiny@1", "--json")
    assert code == 0 and out["devices"] == [] and out["cohorts"] == []
    code, out, err = cli("drift", "status", "--cohort", "tiny", "--json")
    assert code == 2 and out["ok"] is False and "TAG|MODEL@VERSION" in out["error"]["message"]

    code, out, _ = cli("alerts", "list", "--open", "--json")
    assert code == 0
    (alert,) = out["alerts"]
    assert (alert["device"], alert["rule"], alert["state"]) == ("d1", "ks_shift", "open")
    code, out, _ = cli("alerts", "clear", str(alert["id"]), "--json")
    assert code == 0 and out["cleared"] is True
    code, out, _ = cli("alerts", "clear", str(alert["id"]), "--json")
    assert code == 0 and out["cleared"] is False
    code, out, _ = cli("alerts", "list", "--open", "--json")
    assert out["alerts"] == []
    code, text, err = cli("alerts", "clear", "999")
    assert code == 12 and "no alert 999" in err and "Traceback" not in err
    code, text, _ = cli("alerts", "list")
    assert "cleared" in text and "d1" in text

    # the drift goes on: the monitor notices the hand-cleared alert and opens a new one
    mon.process([("d1", report(6, 0.6)), ("d2", report(6))])
    for w in (7, 8):
        mon.process([("d1", report(w, 0.6)), ("d2", report(w))])
    code, out, _ = cli("alerts", "list", "--open", "--json")
    assert [(a["device"], a["rule"]) for a in out["alerts"]] == [("d1", "ks_shift")]
    assert out["alerts"][0]["id"] != alert["id"]

    code, out, _ = cli("drift", "decisions", "--json")
    assert code == 0 and [d["decision"] for d in out["decisions"]] == ["too_few_devices"]
    registry.close()


def test_a_locked_database_is_retried_and_the_batch_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    from sqlalchemy import event

    from tinyfleet.host.db.engine import make_engine
    from tinyfleet.host.db.migrate import upgrade

    db = tmp_path / "d.db"
    upgrade(f"sqlite:///{db}")
    engine = make_engine(f"sqlite:///{db}")

    def short_busy_wait(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA busy_timeout = 100")  # fail fast instead of waiting 10 s

    event.listen(engine, "connect", short_busy_wait)
    engine.dispose()
    mon = DriftMonitor(engine, "f1", small_settings())
    mon.process([("d1", report(0))])
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock for a while
    timer = threading.Timer(0.8, other.rollback)
    timer.start()
    try:
        with caplog.at_level("WARNING"):
            mon.process([("d1", report(1))])
    finally:
        timer.join()
        other.close()
    assert "database error (attempt 1" in caplog.text
    assert mon.stats.errors == 0
    with engine.connect() as conn:
        assert conn.execute(select(DriftScoreRow.__table__.c.window)).scalar_one() == 1


def test_drift_on_a_tagged_cohort_retrains_that_cohort_not_the_whole_fleet(
    versioned: Registry,
) -> None:
    from tinyfleet.host.db.tables import DeviceRow

    tags = {"d1": ["line-a"], "d2": ["line-a"], "d3": ["line-b"], "d4": [], "d5": []}
    with versioned.engine.begin() as conn:
        for d, t in tags.items():
            conn.execute(
                DeviceRow.__table__.insert(),
                {
                    "fleet": "f1",
                    "device": d,
                    "tags": t,
                    "groups": [],
                    "session": 1,
                    "online": True,
                    "reported_generation": 0,
                    "desired_generation": 0,
                    "updated_at": T0,
                },
            )
    calls: list[tuple[str, list[str]]] = []

    def trigger(cohort: CohortKey, devices: list[str]) -> str | None:
        calls.append((cohort.key, devices))
        return f"run-{len(calls)}"

    policy = RetrainPolicy(
        versioned.engine,
        "f1",
        RetrainSettings(
            min_devices=2,
            min_fraction=0.2,
            sustained_windows=1,
            cooldown_s=0,
            decision_interval_s=0,
        ),
        trigger,
    )
    mon, _ = _monitor(versioned, retrain=policy)
    for w in range(4):
        mon.process([(d, report(w)) for d in tags])
    # the two line-a devices drift: 2 of 5 would also qualify the whole fleet (40 %)
    for w in (4, 5, 6):
        mon.process([(d, report(w, 0.7 if d in ("d1", "d2") else 0.1)) for d in tags])
    assert {key for key, _ in calls} == {"line-a|tiny@1"}
    assert calls[0][1] == ["d1", "d2"]
    # the untagged devices drift too: those the whole-fleet cohort retrains
    calls.clear()
    for w in (7, 8, 9):
        mon.process([(d, report(w, 0.1 if d == "d3" else 0.7)) for d in tags])
    assert ("*|tiny@1", ["d4", "d5"]) in calls


def test_shift_floors_scale_with_the_window_size() -> None:
    """A smaller window is noisier: the same deviation from the baseline counts for less."""
    from tinyfleet.host.fleet.drift_rules import Baseline, window_statistics

    settings = DriftSettings(baseline_windows=3)
    base = Baseline()
    for w in range(3):  # a flat baseline: its spread is 0, the floors decide
        base.add(report(w))
    big = report(3, 0.16)  # KS 0.06 above the baseline on feature 0
    at_200 = window_statistics(big, base, settings)["ks_shift"]
    at_50 = window_statistics(replace_n(big, 50), base, settings)["ks_shift"]
    assert at_200 == pytest.approx(0.06 / 0.03, rel=1e-3)
    assert at_50 == pytest.approx(at_200 / 2, rel=1e-3)  # floor x sqrt(200 / 50)
    # the floors are stated for floor_samples: a setting of 50 restores the unscaled value
    unscaled = DriftSettings(baseline_windows=3, floor_samples=50)
    assert window_statistics(replace_n(big, 50), base, unscaled)["ks_shift"] == pytest.approx(
        at_200, rel=1e-3
    )


def replace_n(r: DriftReport, n: int) -> DriftReport:
    return r.model_copy(update={"n": n})
