"""The wire protocol: codec round trips and rejections, topics, state machines, signatures."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from itertools import product
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tinyfleet.agent import manifest as manifest_mod
from tinyfleet.agent.errors import SignatureError, TinyfleetError
from tinyfleet.agent.protocol import (
    AGENT_MACHINE,
    DEVICE_ROLLOUT_MACHINE,
    MAX_MESSAGE_BYTES,
    MAX_RECORDS,
    MESSAGE_TYPES,
    ROLLOUT_MACHINE,
    TOPIC_SPECS,
    ActiveModel,
    AgentEvent,
    AgentPhase,
    Capabilities,
    ChunkRequest,
    DesiredModel,
    DesiredState,
    DeviceEvent,
    DeviceRolloutEvent,
    DeviceRolloutStatus,
    DownloadProgress,
    DriftReport,
    ErrorCode,
    EventKind,
    FLSettings,
    Heartbeat,
    HostEvent,
    HostPresence,
    IllegalTransitionError,
    InferenceStats,
    Message,
    Presence,
    ProtocolError,
    ReportedError,
    ReportedState,
    RolloutEvent,
    RolloutPhase,
    SignedDesiredState,
    StateMachine,
    TelemetryBatch,
    TelemetrySettings,
    TopicKind,
    Topics,
    agent_transition,
    canonical_bytes,
    check_version,
    classify_desired,
    classify_session,
    decode,
    decode_message,
    device_rollout_transition,
    encode,
    key_id,
    parse_topic,
    rollout_transition,
    sign_desired,
    verify_desired,
)

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4


# ---------------------------------------------------------------- samples


def _desired(device: str = "dev-1", generation: int = 3, **changes: Any) -> DesiredState:
    fields: dict[str, Any] = {
        "device": device,
        "generation": generation,
        "issued_at": T0,
        "model": DesiredModel(
            name="vibration",
            version=4,
            manifest={
                "manifest": {"model": "vibration", "version": 4, "note": None, "é": [1, 2.5]},
                "signature": "c2ln",
            },
            artifact_sha256=SHA_A,
        ),
        "rollout_id": "ro-7",
        "telemetry": TelemetrySettings(heartbeat_s=30, window=128),
        "fl": FLSettings(enabled=True, superlink="fleet-host.local:9092"),
    }
    fields.update(changes)
    return DesiredState(**fields)


KEY = Ed25519PrivateKey.generate()


def samples() -> list[Message]:
    """One fully populated instance of every message type."""
    active = ActiveModel(name="vibration", version=4, sha256=SHA_A, slot="b", since=T0)
    previous = ActiveModel(name="vibration", version=3, sha256=SHA_B, slot="a", since=T0)
    return [
        _desired(),
        sign_desired(_desired(), KEY),
        ReportedState(
            device="dev-1",
            session=9,
            ts=T0,
            generation=3,
            phase=AgentPhase.DOWNLOADING,
            active=active,
            previous=previous,
            error=ReportedError(code=ErrorCode.DIGEST, message="chunk 3 bad", generation=2),
            rejected_messages=1,
            progress=DownloadProgress(sha256=SHA_A, received_chunks=2, total_chunks=7),
        ),
        Presence(
            device="dev-1",
            status="online",
            session=9,
            ts=T0,
            agent_version="0.1.0",
            profile="rpi4",
            capabilities=Capabilities(runtimes=["litert", "onnxruntime"], ram_bytes=2**32),
        ),
        TelemetryBatch(
            device="dev-1",
            session=9,
            records=[
                Heartbeat(
                    session=8,
                    seq=41,
                    ts=T0,
                    uptime_s=12.5,
                    model="vibration@4",
                    inference_count=1000,
                    latency_p50_ms=0.4,
                    latency_p99_ms=1.25,
                    prediction_hist=[900, 100],
                    rejected_messages=0,
                    spool_dropped=2,
                    rss_bytes=60_000_000,
                ),
                InferenceStats(
                    session=9,
                    seq=42,
                    ts=T0,
                    window=3,
                    count=256,
                    latency_p50_ms=0.5,
                    latency_p99_ms=2.0,
                    prediction_hist=[200, 56],
                    mean_confidence=0.93,
                ),
                DriftReport(
                    session=9,
                    seq=43,
                    ts=T0,
                    model="vibration",
                    version=4,
                    window=3,
                    n=256,
                    psi=[0.01, 0.3],
                    ks=[0.05, 0.4],
                    js_prediction=0.1,
                    mean_confidence=0.8,
                    confidence_shift=-0.1,
                ),
            ],
        ),
        DeviceEvent(
            device="dev-1",
            session=9,
            seq=44,
            ts=T0,
            kind=EventKind.MESSAGE_REJECTED,
            detail="invalid SignedDesiredState: unknown field 'x'",
            topic="tinyfleet/v1/f1/dev/dev-1/desired",
        ),
        ChunkRequest(device="dev-1", sha256=SHA_A, chunks=[0, 5, 6]),
        HostPresence(status="online", session=2, ts=T0, version="0.1.0"),
        HostEvent(kind="drift-alert", ts=T0, payload={"device": "dev-1", "psi": 0.4}),
    ]


def _json(msg: Message) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(encode(msg))
    return value


def _reason(kind: type[Message], payload: bytes | dict[str, Any], **kw: Any) -> str:
    raw = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    with pytest.raises(ProtocolError) as info:
        decode(kind, raw, **kw)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"invalid {kind.__name__}: ")
    return text


# ---------------------------------------------------------------- codec


def test_every_message_type_has_a_sample() -> None:
    assert {type(m) for m in samples()} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = encode(msg)
    assert decode(type(msg), data) == msg
    doc = json.loads(data)
    assert doc["schema"] == 1
    # compact, UTF-8, and re-encoding is stable
    assert data == json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    assert encode(decode(type(msg), data)) == data


def test_encoding_details() -> None:
    desired = _desired(
        issued_at=datetime(2025, 3, 1, 14, 0, 0, 250000, tzinfo=timezone(timedelta(hours=2)))
    )
    doc = _json(desired)
    assert doc["issued_at"] == "2025-03-01T12:00:00.250000Z"  # normalised to UTC
    assert _json(_desired())["issued_at"] == "2025-03-01T12:00:00Z"
    assert "note" in doc["model"]["manifest"]["manifest"]  # nulls inside the manifest are kept
    bare = _json(DesiredState(device="d", generation=1, issued_at=T0))
    assert bare == {
        "schema": 1,
        "device": "d",
        "generation": 1,
        "issued_at": "2025-03-01T12:00:00Z",
    }
    assert decode(DesiredState, json.dumps(bare).encode()).model is None


def test_messages_are_frozen_and_reject_naive_datetimes() -> None:
    msg = _desired()
    with pytest.raises(ValueError):
        msg.generation = 9  # type: ignore[misc]
    with pytest.raises(ValueError, match="timezone"):
        _desired(issued_at=datetime(2025, 1, 1))


def test_protocol_error_is_a_tinyfleet_error() -> None:
    assert issubclass(ProtocolError, TinyfleetError)
    assert ProtocolError.exit_code == 14
    assert issubclass(IllegalTransitionError, ProtocolError)


def test_reject_size_encoding_and_syntax() -> None:
    good = encode(_desired())
    assert "exceeds the 100 limit" in _reason(SignedDesiredState, good, max_bytes=100)
    huge = b'{"schema":1,"device":"' + b"x" * MAX_MESSAGE_BYTES + b'"}'
    assert "exceeds" in _reason(DesiredState, huge)
    assert "empty payload" in _reason(Presence, b"")
    assert "not UTF-8 (bad byte at offset 1)" in _reason(Presence, b'{\xff"schema":1}')
    assert "not JSON" in _reason(Presence, b'{"schema":1,')
    assert "not JSON" in _reason(Presence, b"\x00\x01")
    assert "not a JSON object" in _reason(Presence, b"[1, 2]")
    assert "not a JSON object" in _reason(Presence, b'"online"')


def test_reject_schema_versions() -> None:
    doc = _json(samples()[3])
    assert "unsupported schema version 2" in _reason(Presence, {**doc, "schema": 2})
    assert 'unsupported schema version "1"' in _reason(Presence, {**doc, "schema": "1"})
    # reported first even when the newer schema also brings unknown fields
    assert "unsupported schema version 2" in _reason(Presence, {**doc, "schema": 2, "new": 1})
    del doc["schema"]
    assert "schema field is missing" in _reason(Presence, doc)
    signed = _json(samples()[1])
    del signed["desired"]["schema"]
    assert "desired: the schema field is missing" in _reason(SignedDesiredState, signed)


def test_reject_unknown_fields() -> None:
    doc = _json(samples()[4])
    assert "unknown field 'extra'" in _reason(TelemetryBatch, {**doc, "extra": 1})
    doc["records"][0]["cpu"] = 3
    assert "unknown field 'records.0.heartbeat.cpu'" in _reason(TelemetryBatch, doc)


def test_reject_invalid_values() -> None:
    presence = _json(samples()[3])
    for bad in ("dev+1", "dev/1", "dev#", "", "-dev", "x" * 65, "dev\x00", "dev-1\n"):
        assert _reason(Presence, {**presence, "device": bad}).startswith(
            "invalid Presence: device: String should match pattern"
        )
    assert "status: Input should be 'online' or 'offline'" in _reason(
        Presence, {**presence, "status": "away"}
    )
    # strict types: no numbers as strings, no bools as numbers, no unix timestamps
    assert "session: Input should be a valid integer" in _reason(
        Presence, {**presence, "session": "9"}
    )
    assert "session" in _reason(Presence, {**presence, "session": True})
    assert "session: Input should be greater than or equal to 1" in _reason(
        Presence, {**presence, "session": 0}
    )
    assert "ts: " in _reason(Presence, {**presence, "ts": 1700000000})
    assert "ts: Input should have timezone info" in _reason(
        Presence, {**presence, "ts": "2025-03-01T12:00:00"}
    )
    assert "(+1 more)" in _reason(Presence, {**presence, "ts": 1, "session": 0})


def test_reject_nan_and_negative_telemetry() -> None:
    batch = _json(samples()[4])
    drift = batch["records"][2]
    text = encode(samples()[4]).decode()
    # Python's json writes NaN and Infinity; they are not JSON and never valid here
    for token in ("NaN", "Infinity", "-Infinity"):
        raw = text.replace('"js_prediction":0.1', f'"js_prediction":{token}').encode()
        assert raw != text.encode()
        assert _reason(TelemetryBatch, raw).endswith(
            "records.2.drift.js_prediction: Input should be a finite number"
        )
    raw = text.replace('"psi":[0.01,0.3]', '"psi":[0.01,NaN]').encode()
    assert "records.2.drift.psi.1" in _reason(TelemetryBatch, raw)
    cases: list[tuple[str, Any]] = [("psi", [0.1, -0.5]), ("ks", [0.1, 1.5]), ("n", 0)]
    for field, value in cases:
        bad = {**batch, "records": [{**drift, field: value}]}
        assert f"records.0.drift.{field}" in _reason(TelemetryBatch, bad)
    bad = {**batch, "records": [{**drift, "psi": [0.1]}]}
    assert "psi has 1 features, ks has 2" in _reason(TelemetryBatch, bad)
    beat = batch["records"][0]
    cases = [("inference_count", -1), ("prediction_hist", [3, -1])]
    for field, value in cases:
        bad = {**batch, "records": [{**beat, field: value}]}
        assert f"records.0.heartbeat.{field}" in _reason(TelemetryBatch, bad)
    sample = samples()[4]
    assert isinstance(sample, TelemetryBatch)
    with pytest.raises(ValueError, match="finite"):
        DriftReport(**{**sample.records[2].model_dump(), "js_prediction": float("nan")})


def test_reject_non_finite_numbers_in_free_form_objects() -> None:
    signed = encode(samples()[1]).decode()
    assert "2.5]" in signed
    raw = signed.replace("2.5]", "NaN]").encode()
    assert _reason(SignedDesiredState, raw).endswith(
        "desired.model.manifest: Value error, contains a non-finite number (NaN or infinity)"
    )
    event = _json(samples()[8])
    raw = json.dumps({**event, "payload": {"psi": float("inf")}}).encode()
    assert "payload: Value error, contains a non-finite number" in _reason(HostEvent, raw)
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    assert "nested deeper than 32 levels" in _reason(HostEvent, {**event, "payload": {"x": deep}})


def test_reject_unbounded_and_inconsistent_payloads() -> None:
    batch = _json(samples()[4])
    beat = batch["records"][0]
    many = {**batch, "records": [beat] * (MAX_RECORDS + 1)}
    assert "records: List should have at most 500 items" in _reason(TelemetryBatch, many)
    assert "records: List should have at least 1 item" in _reason(
        TelemetryBatch, {**batch, "records": []}
    )
    assert "records.0: session 10 is later" in _reason(
        TelemetryBatch, {**batch, "records": [{**beat, "session": 10}]}
    )
    assert "does not match any of the expected tags" in _reason(
        TelemetryBatch, {**batch, "records": [{**beat, "kind": "gps"}]}
    )
    request = _json(samples()[6])
    assert "chunks has repeated indexes" in _reason(ChunkRequest, {**request, "chunks": [1, 1]})
    assert "chunks.0" in _reason(ChunkRequest, {**request, "chunks": [70000]})
    assert "sha256" in _reason(ChunkRequest, {**request, "sha256": SHA_A.upper()})
    event = _json(samples()[5])
    assert "detail" in _reason(DeviceEvent, {**event, "detail": "x" * 1001})
    reported = _json(samples()[2])
    reported["progress"]["received_chunks"] = 8
    assert "received_chunks exceeds total_chunks" in _reason(ReportedState, reported)
    desired = _json(samples()[0])
    desired["fl"] = {"enabled": True}
    assert "superlink is required" in _reason(DesiredState, desired)


def test_decode_message_checks_the_topic_device() -> None:
    topics = Topics("f1")
    signed = encode(samples()[1])
    msg = decode_message(topics.parse(topics.desired("dev-1")), signed)
    assert isinstance(msg, SignedDesiredState)
    with pytest.raises(ProtocolError, match="names device dev-1 but arrived on the topic of dev-2"):
        decode_message(topics.parse(topics.desired("dev-2")), signed)
    with pytest.raises(ProtocolError, match="names device dev-1 but arrived on the topic of dev-2"):
        decode_message(topics.parse(topics.reported("dev-2")), encode(samples()[2]))
    with pytest.raises(ProtocolError, match="raw bytes"):
        decode_message(topics.parse(topics.chunk(SHA_A, 0)), b"\x00" * 10)
    host = decode_message(topics.parse(topics.host_presence()), encode(samples()[7]))
    assert isinstance(host, HostPresence)


# ---------------------------------------------------------------- topics


def test_topic_names_and_specs() -> None:
    t = Topics("f1")
    assert t.desired("dev-1") == "tinyfleet/v1/f1/dev/dev-1/desired"
    assert t.reported("dev-1") == "tinyfleet/v1/f1/dev/dev-1/reported"
    assert t.presence("dev-1") == "tinyfleet/v1/f1/dev/dev-1/presence"
    assert t.telemetry("dev-1") == "tinyfleet/v1/f1/dev/dev-1/telemetry"
    assert t.events("dev-1") == "tinyfleet/v1/f1/dev/dev-1/events"
    assert t.chunk_request("dev-1") == "tinyfleet/v1/f1/dev/dev-1/artifact/req"
    assert t.chunk(SHA_A, 12) == f"tinyfleet/v1/f1/art/{SHA_A}/12"
    assert t.chunk_filter(SHA_A) == f"tinyfleet/v1/f1/art/{SHA_A}/+"
    assert t.host_presence() == "tinyfleet/v1/f1/host/presence"
    assert t.host_events() == "tinyfleet/v1/f1/host/events"
    assert [f for f, _ in t.host_subscriptions()] == [
        "tinyfleet/v1/f1/dev/+/presence",
        "tinyfleet/v1/f1/dev/+/reported",
        "tinyfleet/v1/f1/dev/+/telemetry",
        "tinyfleet/v1/f1/dev/+/events",
        "tinyfleet/v1/f1/dev/+/artifact/req",
    ]
    assert t.device_subscriptions("dev-1") == [
        ("tinyfleet/v1/f1/dev/dev-1/desired", 1),
        ("tinyfleet/v1/f1/host/presence", 1),
    ]
    retained = {k for k, s in TOPIC_SPECS.items() if s.retain}
    assert retained == {
        TopicKind.DESIRED,
        TopicKind.REPORTED,
        TopicKind.PRESENCE,
        TopicKind.CHUNK,
        TopicKind.HOST_PRESENCE,
    }
    assert all(s.qos == 1 for s in TOPIC_SPECS.values())
    assert set(TOPIC_SPECS) == set(TopicKind)


def test_topic_parse_round_trip() -> None:
    t = Topics("f1")
    cases = {
        t.desired("d"): (TopicKind.DESIRED, "d", None, None),
        t.reported("d"): (TopicKind.REPORTED, "d", None, None),
        t.presence("d"): (TopicKind.PRESENCE, "d", None, None),
        t.telemetry("d"): (TopicKind.TELEMETRY, "d", None, None),
        t.events("d"): (TopicKind.EVENTS, "d", None, None),
        t.chunk_request("d"): (TopicKind.CHUNK_REQUEST, "d", None, None),
        t.chunk(SHA_B, 0): (TopicKind.CHUNK, None, SHA_B, 0),
        t.chunk(SHA_B, 65535): (TopicKind.CHUNK, None, SHA_B, 65535),
        t.host_presence(): (TopicKind.HOST_PRESENCE, None, None, None),
        t.host_events(): (TopicKind.HOST_EVENTS, None, None, None),
    }
    for topic, (kind, device, sha, index) in cases.items():
        parsed = t.parse(topic)
        assert (parsed.kind, parsed.device, parsed.sha256, parsed.index) == (
            kind,
            device,
            sha,
            index,
        )
        assert parsed.fleet == "f1"
        assert parsed.spec is TOPIC_SPECS[kind]


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "tinyfleet/v1/f1",
        "tinyfleet/v1/f1/dev/d",
        "tinyfleet/v2/f1/dev/d/desired",
        "other/v1/f1/dev/d/desired",
        "/tinyfleet/v1/f1/dev/d/desired",
        "tinyfleet/v1/f1/dev/d/desired/",
        "tinyfleet/v1/f1/dev//desired",
        "tinyfleet/v1/f1/dev/d/desire",
        "tinyfleet/v1/f1/dev/d/artifact",
        "tinyfleet/v1/f1/dev/d/artifact/req/x",
        "tinyfleet/v1/f1/dev/+/reported",
        "tinyfleet/v1/f1/dev/#",
        "tinyfleet/v1/f1/dev/d\x00/desired",
        "tinyfleet/v1/f 1/dev/d/desired",
        "tinyfleet/v1/f1/dev/.d/desired",
        f"tinyfleet/v1/f1/dev/{'x' * 65}/desired",
        f"tinyfleet/v1/f1/art/{SHA_A}",
        f"tinyfleet/v1/f1/art/{SHA_A.upper()}/0",
        f"tinyfleet/v1/f1/art/{SHA_A[:-1]}/0",
        f"tinyfleet/v1/f1/art/{SHA_A}/01",
        f"tinyfleet/v1/f1/art/{SHA_A}/-1",
        f"tinyfleet/v1/f1/art/{SHA_A}/65536",
        f"tinyfleet/v1/f1/art/{SHA_A}/1.0",
        "tinyfleet/v1/f1/host/status",
        "tinyfleet/v1/f1/host/presence/x",
        "tinyfleet/v1/f1/" + "x/" * 200,
    ],
)
def test_topic_parse_rejects_malformed(topic: str) -> None:
    with pytest.raises(ProtocolError, match="topic"):
        parse_topic(topic)


def test_topic_parse_checks_fleet_and_device() -> None:
    t = Topics("f1")
    with pytest.raises(ProtocolError, match="belongs to fleet f2, not f1"):
        t.parse(Topics("f2").desired("dev-1"))
    with pytest.raises(ProtocolError, match="belongs to device dev-2, not dev-1"):
        t.parse(t.desired("dev-2"), device="dev-1")
    assert t.parse(t.desired("dev-1"), device="dev-1").device == "dev-1"
    assert t.parse(t.chunk(SHA_A, 3), device="dev-1").index == 3  # not a device topic


@pytest.mark.parametrize("bad", ["a+b", "a#", "a/b", "a\x00", "", "_a", "x" * 65, "dev 1"])
def test_topic_builders_reject_wildcards_and_bad_ids(bad: str) -> None:
    with pytest.raises(ProtocolError, match="invalid fleet id"):
        Topics(bad)
    t = Topics("f1")
    for build in (t.desired, t.reported, t.presence, t.telemetry, t.events, t.chunk_request):
        with pytest.raises(ProtocolError, match="invalid device id"):
            build(bad)


def test_chunk_topic_bounds() -> None:
    t = Topics("f1")
    for bad_index in (-1, 65536, True):
        with pytest.raises(ProtocolError, match="chunk index"):
            t.chunk(SHA_A, bad_index)
    with pytest.raises(ProtocolError, match="sha256"):
        t.chunk("abc", 0)
    with pytest.raises(ProtocolError, match="sha256"):
        t.chunk_filter("+")


# ---------------------------------------------------------------- state machines

MACHINES: list[StateMachine[Any, Any]] = [AGENT_MACHINE, ROLLOUT_MACHINE, DEVICE_ROLLOUT_MACHINE]
STATE_ENUMS = {
    id(AGENT_MACHINE): AgentPhase,
    id(ROLLOUT_MACHINE): RolloutPhase,
    id(DEVICE_ROLLOUT_MACHINE): DeviceRolloutStatus,
}
EVENT_ENUMS = {
    id(AGENT_MACHINE): AgentEvent,
    id(ROLLOUT_MACHINE): RolloutEvent,
    id(DEVICE_ROLLOUT_MACHINE): DeviceRolloutEvent,
}


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.name)
def test_every_state_reachable_and_every_event_used(machine: StateMachine[Any, Any]) -> None:
    states = STATE_ENUMS[id(machine)]
    events = EVENT_ENUMS[id(machine)]
    assert machine.reachable() == frozenset(states)
    assert {e for _, e in machine.table} == set(events)


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.name)
def test_illegal_transitions_raise(machine: StateMachine[Any, Any]) -> None:
    states = STATE_ENUMS[id(machine)]
    events = EVENT_ENUMS[id(machine)]
    illegal = 0
    for state, event in product(states, events):
        if (state, event) in machine.table:
            assert machine.transition(state, event) == machine.table[(state, event)]
        else:
            illegal += 1
            with pytest.raises(IllegalTransitionError, match=f"'{event.value}' is not allowed"):
                machine.transition(state, event)
    assert illegal > 0
    with pytest.raises(TypeError):
        machine.table[(machine.initial, next(iter(events)))] = machine.initial  # type: ignore[index]


def test_agent_lifecycle() -> None:
    happy = [
        (AgentEvent.DESIRED_MODEL, AgentPhase.DOWNLOADING),
        (AgentEvent.DOWNLOADED, AgentPhase.VERIFYING),
        (AgentEvent.VERIFIED, AgentPhase.STAGING),
        (AgentEvent.STAGED, AgentPhase.ACTIVATING),
        (AgentEvent.ACTIVATED, AgentPhase.HEALTH_CHECK),
        (AgentEvent.HEALTHY, AgentPhase.ACTIVE),
    ]
    phase = AGENT_MACHINE.initial
    assert phase is AgentPhase.IDLE
    for event, expected in happy:
        phase = agent_transition(phase, event)
        assert phase is expected
    # no terminal phase: the agent can always take a new desired state or resume serving
    assert AGENT_MACHINE.terminal == frozenset()
    for p in AgentPhase:
        assert {AgentPhase.ACTIVE, AgentPhase.IDLE} & AGENT_MACHINE.reachable(p)
    # failures before the swap fail; after it, they roll back
    assert agent_transition(AgentPhase.VERIFYING, AgentEvent.ERROR) is AgentPhase.FAILED
    assert agent_transition(AgentPhase.ACTIVATING, AgentEvent.ERROR) is AgentPhase.ROLLED_BACK
    assert agent_transition(AgentPhase.HEALTH_CHECK, AgentEvent.UNHEALTHY) is AgentPhase.ROLLED_BACK
    assert agent_transition(AgentPhase.ROLLED_BACK, AgentEvent.RESUME_PREVIOUS) is AgentPhase.ACTIVE
    assert agent_transition(AgentPhase.FAILED, AgentEvent.RESUME_NONE) is AgentPhase.IDLE
    with pytest.raises(
        IllegalTransitionError,
        match="agent: event 'desired_model' is not allowed in state 'activating'",
    ):
        agent_transition(AgentPhase.ACTIVATING, AgentEvent.DESIRED_MODEL)


def test_rollout_lifecycle() -> None:
    phase = ROLLOUT_MACHINE.initial
    for event, expected in [
        (RolloutEvent.START, RolloutPhase.RUNNING),
        (RolloutEvent.WAVE_DONE, RolloutPhase.SOAKING),
        (RolloutEvent.NEXT_WAVE, RolloutPhase.RUNNING),
        (RolloutEvent.PAUSE, RolloutPhase.PAUSED),
        (RolloutEvent.RESUME, RolloutPhase.RUNNING),
        (RolloutEvent.WAVE_DONE, RolloutPhase.SOAKING),
        (RolloutEvent.FINISH, RolloutPhase.COMPLETED),
    ]:
        phase = rollout_transition(phase, event)
        assert phase is expected
    assert rollout_transition(RolloutPhase.SOAKING, RolloutEvent.ABORT) is RolloutPhase.ABORTING
    assert (
        rollout_transition(RolloutPhase.ABORTING, RolloutEvent.ROLLBACK_DONE)
        is RolloutPhase.ROLLED_BACK
    )
    assert ROLLOUT_MACHINE.terminal == {
        RolloutPhase.ROLLED_BACK,
        RolloutPhase.ABORTED,
        RolloutPhase.FAILED,
    }
    # a completed rollout can only be rolled back by an operator
    assert ROLLOUT_MACHINE.events(RolloutPhase.COMPLETED) == {RolloutEvent.ABORT}
    with pytest.raises(IllegalTransitionError, match="allowed: abort"):
        rollout_transition(RolloutPhase.COMPLETED, RolloutEvent.RESUME)
    with pytest.raises(IllegalTransitionError):
        rollout_transition(RolloutPhase.ABORTING, RolloutEvent.RESUME)


def test_device_rollout_status() -> None:
    s = DEVICE_ROLLOUT_MACHINE.initial
    s = device_rollout_transition(s, DeviceRolloutEvent.SEND)
    assert s is DeviceRolloutStatus.DESIRED_SENT
    assert device_rollout_transition(s, DeviceRolloutEvent.TIMEOUT) is DeviceRolloutStatus.TIMED_OUT
    assert (
        device_rollout_transition(DeviceRolloutStatus.TIMED_OUT, DeviceRolloutEvent.SUCCEED)
        is DeviceRolloutStatus.SUCCEEDED
    )
    assert (
        device_rollout_transition(DeviceRolloutStatus.SUCCEEDED, DeviceRolloutEvent.ROLLBACK)
        is DeviceRolloutStatus.ROLLED_BACK
    )
    assert DEVICE_ROLLOUT_MACHINE.terminal == {DeviceRolloutStatus.ROLLED_BACK}
    with pytest.raises(IllegalTransitionError):
        device_rollout_transition(DeviceRolloutStatus.PENDING, DeviceRolloutEvent.SUCCEED)
    with pytest.raises(IllegalTransitionError):
        device_rollout_transition(DeviceRolloutStatus.SUCCEEDED, DeviceRolloutEvent.FAIL)


def test_classify_desired() -> None:
    assert classify_desired(None, 1) == "new"
    assert classify_desired(4, 5) == "new"
    assert classify_desired(4, 400) == "new"
    assert classify_desired(4, 4) == "duplicate"
    assert classify_desired(4, 3) == "stale"
    assert classify_desired(4, 1) == "stale"
    with pytest.raises(ProtocolError):
        classify_desired(4, 0)


def test_check_version() -> None:
    assert check_version(None, 1, rollback=False) == "ok"
    assert check_version(3, 4, rollback=False) == "ok"
    assert check_version(3, 3, rollback=False) == "ok"
    assert check_version(3, 2, rollback=False) == "downgrade"
    assert check_version(3, 2, rollback=True) == "ok"


def test_classify_session() -> None:
    assert classify_session(None, 1) == "new"
    assert classify_session(5, 6) == "new"
    assert classify_session(5, 5) == "current"
    assert classify_session(5, 4) == "stale"
    with pytest.raises(ProtocolError):
        classify_session(5, 0)


def test_presence_will() -> None:
    birth = samples()[3]
    assert isinstance(birth, Presence)
    will = birth.as_will()
    assert will.status == "offline"
    assert (will.session, will.device, will.ts) == (birth.session, birth.device, birth.ts)
    assert decode(Presence, encode(will)) == will


# ---------------------------------------------------------------- signatures


def test_sign_and_verify_desired_state() -> None:
    key = Ed25519PrivateKey.generate()
    desired = _desired()
    signed = sign_desired(desired, key)
    assert signed.key_id == key_id(key.public_key())
    assert verify_desired(signed, key.public_key(), device="dev-1") == desired
    # survives the wire
    received = decode(SignedDesiredState, encode(signed))
    assert verify_desired(received, key.public_key(), device="dev-1") == desired
    # same key id as the manifest's for the same key
    assert key_id(key.public_key()) == manifest_mod.key_id(key.public_key())
    with pytest.raises(ProtocolError, match="addressed to dev-1, not dev-2"):
        verify_desired(signed, key.public_key(), device="dev-2")


def test_canonical_bytes() -> None:
    desired = _desired()
    raw = canonical_bytes(desired)
    doc = json.loads(raw)
    assert (
        raw == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    assert doc["schema"] == 1
    assert doc["issued_at"] == "2025-03-01T12:00:00Z"
    assert "é" in raw.decode("utf-8")
    # the same instant in another offset signs the same bytes
    shifted = _desired(issued_at=T0.astimezone(timezone(timedelta(hours=-5))))
    assert canonical_bytes(shifted) == raw
    # a round trip through the wire gives the same bytes
    assert canonical_bytes(decode(DesiredState, encode(desired))) == raw


@pytest.mark.parametrize(
    "change",
    [
        {"generation": 4},
        {"device": "dev-2"},
        {"issued_at": T0 + timedelta(microseconds=1)},
        {"rollout_id": None},
        {"telemetry": None},
    ],
    ids=lambda c: next(iter(c)),
)
def test_tampered_desired_state_is_rejected(change: dict[str, Any]) -> None:
    key = Ed25519PrivateKey.generate()
    signed = sign_desired(_desired(), key)
    forged = signed.model_copy(update={"desired": signed.desired.model_copy(update=change)})
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_desired(forged, key.public_key())


def test_tampered_wire_bytes_and_foreign_keys_are_rejected() -> None:
    key = Ed25519PrivateKey.generate()
    doc = _json(sign_desired(_desired(), key))
    doc["desired"]["model"]["artifact_sha256"] = SHA_B
    received = decode(SignedDesiredState, json.dumps(doc).encode())
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_desired(received, key.public_key())
    other = Ed25519PrivateKey.generate()
    signed = sign_desired(_desired(), other)
    with pytest.raises(SignatureError, match=r"names key .* the pinned key is"):
        verify_desired(signed, key.public_key())
    # a forged key id does not help
    forged = signed.model_copy(update={"key_id": key_id(key.public_key())})
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_desired(forged, key.public_key())
    bad_sig = signed.model_copy(
        update={
            "key_id": key_id(key.public_key()),
            "signature": base64.b64encode(b"\0" * 64).decode(),
        }
    )
    with pytest.raises(SignatureError):
        verify_desired(bad_sig, key.public_key())
    assert "signature" in _reason(SignedDesiredState, {**_json(signed), "signature": "abc"})


# ---------------------------------------------------------------- schemas and purity


def _gen_schemas() -> Any:
    spec = importlib.util.spec_from_file_location("gen_schemas", REPO / "tools" / "gen_schemas.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schema_files_are_up_to_date() -> None:
    gen = _gen_schemas()
    problems = gen.check(REPO / "docs" / "schemas")
    assert problems == [], f"{problems}; run: python tools/gen_schemas.py"
    rendered = gen.render()
    assert {f"{cls.__name__}.schema.json" for cls in MESSAGE_TYPES} < set(rendered)
    schema = json.loads(rendered["Presence.schema.json"])
    assert schema["required"][0] == "schema"
    assert schema["additionalProperties"] is False


def test_schema_check_notices_stale_and_stray_files(tmp_path: Path) -> None:
    gen = _gen_schemas()
    assert gen.main(["--dir", str(tmp_path)]) == 0
    assert gen.check(tmp_path) == []
    (tmp_path / "Presence.schema.json").write_text("{}\n")
    (tmp_path / "Old.schema.json").write_text("{}\n")
    (tmp_path / "HostEvent.schema.json").unlink()
    assert sorted(gen.check(tmp_path)) == [
        "HostEvent.schema.json: missing",
        "Old.schema.json: not generated by this tool (remove it)",
        "Presence.schema.json: out of date",
    ]
    assert gen.main(["--check", "--dir", str(tmp_path)]) == 1


def test_protocol_imports_no_transport() -> None:
    code = (
        "import sys, tinyfleet.agent.protocol\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'paho', 'tensorflow', 'numpy', 'sqlalchemy', 'tinyfleet.host'} or m.startswith('tinyfleet.host'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- the specification

PROTOCOL_MD = REPO / "docs" / "protocol.md"
MESSAGE_BY_NAME = {cls.__name__: cls for cls in MESSAGE_TYPES}


def test_spec_examples_decode() -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    examples = re.findall(r"<!-- example: (\w+) -->\n```json\n(.*?)\n```", text, re.S)
    assert {name for name, _ in examples} == set(MESSAGE_BY_NAME) - {"DesiredState"}
    for name, body in examples:
        msg = decode(MESSAGE_BY_NAME[name], body.encode("utf-8"))
        assert decode(type(msg), encode(msg)) == msg


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.name)
def test_spec_transition_tables_match_the_code(machine: StateMachine[Any, Any]) -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    match = re.search(
        rf"<!-- transitions: {machine.name} -->\n\| from \| event \| to \|\n\|---\|---\|---\|\n"
        r"((?:\|.*\|\n)+)",
        text,
    )
    assert match, f"no transition table for {machine.name} in docs/protocol.md"
    rows = {
        tuple(cell.strip().strip("`") for cell in line.strip("|").split("|"))
        for line in match.group(1).splitlines()
    }
    code = {(s.value, e.value, n.value) for (s, e), n in machine.table.items()}
    assert rows == code
