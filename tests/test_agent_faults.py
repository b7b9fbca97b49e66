"""Fault tests of the device agent on a real Mosquitto.

Crashes at every activation step, corrupt chunks, forged, expired, downgraded,
duplicate, stale and malformed messages, a broker restart and a host restart in
the middle of a rollout, and a broker outage with telemetry spooled meanwhile.

Everything is real: a private Mosquitto, a registry with signed versions, the
fleet service (ingest, desired-state and artifact publishers, orchestrator) and
the agent, in this process (``InProcessFleet``) or as ``tinyfleet-agent run``
processes where one must die.  A ``Spy`` (a plain paho client) records every
message of the fleet and publishes what the host never would.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from agent_support import N_FEATURES
from fleet_support import (
    Host,
    device_configs,
    make_host,
    running_fleet,
    running_service,
    start_rollout,
    tflites,
    wait_rollout,
    wait_until,
)
from mqtt_broker import MosquittoBroker
from mqtt_broker import mosquitto_fixture as mosquitto_fixture
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tinyfleet.agent.faults import CRASH_POINTS
from tinyfleet.agent.manifest import parse_signed_manifest
from tinyfleet.agent.protocol import (
    ChunkRequest,
    DesiredModel,
    DesiredState,
    ReportedState,
    SignedDesiredState,
    Topics,
    decode,
    encode,
)
from tinyfleet.agent.store import ModelStore
from tinyfleet.host.db.engine import writer
from tinyfleet.host.db.tables import DeviceRow, EventRow, TelemetryRow
from tinyfleet.host.fleet.service import FleetService
from tinyfleet.host.keys import SigningKey
from tinyfleet.sim.fleet import DeviceSpec

pytestmark = pytest.mark.mqtt

FLEET = "test"
MOSQUITTO_PUB = shutil.which("mosquitto_pub")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return tflites(tmp_path_factory.mktemp("models"))


# =============================================================================
# helpers
# =============================================================================


class Spy:
    """A plain MQTT client: records every message of the fleet, publishes anything."""

    def __init__(self, broker: MosquittoBroker, fleet: str = FLEET) -> None:
        self.topics = Topics(fleet)
        self.prefix = f"tinyfleet/v1/{fleet}/"
        self._lock = threading.Lock()
        self._log: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"spy-{secrets.token_hex(4)}")
        client.on_connect = lambda c, *_: c.subscribe(self.prefix + "#", 1)
        client.on_subscribe = lambda *_: self.ready.set()
        client.on_disconnect = lambda *_: self.ready.clear()
        client.on_message = self._on_message
        client.reconnect_delay_set(0.1, 1)
        client.connect(*broker.address)
        client.loop_start()
        self.client = client
        assert self.ready.wait(10), "the spy could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._log.append((msg.topic, bytes(msg.payload)))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        assert self.ready.wait(20), "the spy is not connected"
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def payloads(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p in self._log if t == topic]

    def reported(self, device: str) -> list[ReportedState]:
        return [decode(ReportedState, p) for p in self.payloads(self.topics.reported(device)) if p]

    def desired(self, device: str) -> list[SignedDesiredState]:
        out = []
        for p in self.payloads(self.topics.desired(device)):
            try:
                out.append(decode(SignedDesiredState, p))
            except Exception:  # garbage some tests publish there
                continue
        return out

    def chunk_requests(self, device: str) -> list[ChunkRequest]:
        topic = self.topics.chunk_request(device)
        return [decode(ChunkRequest, p) for p in self.payloads(topic)]


@pytest.fixture
def spy(mosquitto: MosquittoBroker) -> Iterator[Spy]:
    s = Spy(mosquitto)
    try:
        yield s
    finally:
        s.close()


def reference_sha(version: Any) -> str:
    return str(version.info.manifest.manifest.reference.sha256)


def publish_artifacts(service: FleetService, version: Any) -> None:
    """What the orchestrator does before it sends a version: its chunks, retained."""
    assert service.artifacts.ensure(version.sha256)
    assert service.artifacts.ensure(reference_sha(version))


def send(
    service: FleetService,
    device: str,
    version: Any,
    *,
    rollback: bool = False,
    artifacts: bool = True,
) -> int:
    """Assign, store and publish a desired state through the host's own publisher."""
    if artifacts:
        publish_artifacts(service, version)
    # BEGIN IMMEDIATE on SQLite: the ingest writes concurrently
    with Session(writer(service.registry.engine)) as s, s.begin():
        generation, payload = service.desired.assign(
            s, device, version.info, version.sha256, rollback=rollback
        )
    service.desired.publish(device, payload)
    return generation


def craft(
    signer: SigningKey,
    device: str,
    generation: int,
    version: Any,
    *,
    manifest: dict[str, Any] | None = None,
    rollback: bool = False,
) -> bytes:
    """A desired state built and signed outside the host's database (for hostile cases)."""
    desired = DesiredState(
        device=device,
        generation=generation,
        issued_at=datetime.now(UTC),
        model=DesiredModel(
            name=version.model,
            version=version.number,
            manifest=manifest if manifest is not None else json.loads(version.manifest_json),
            artifact_sha256=version.sha256,
            rollback=rollback,
        ),
    )
    return encode(signer.sign_desired(desired))


def db_events(host: Host, device: str, kind: str | None = None) -> list[Any]:
    with host.registry.engine.connect() as c:
        q = select(EventRow.kind, EventRow.detail, EventRow.topic, EventRow.session, EventRow.seq)
        q = q.where(EventRow.fleet == FLEET, EventRow.device == device)
        if kind is not None:
            q = q.where(EventRow.kind == kind)
        return list(c.execute(q.order_by(EventRow.id)).all())


def db_device(host: Host, device: str) -> Any:
    with Session(host.registry.engine) as s:
        row = s.get(DeviceRow, (FLEET, device))
        if row is not None:
            s.expunge(row)
        return row


def online(host: Host) -> int:
    with host.registry.engine.connect() as c:
        return int(
            c.execute(
                select(func.count())
                .select_from(DeviceRow)
                .where(DeviceRow.fleet == FLEET, DeviceRow.online.is_(True))
            ).scalar_one()
        )


def serving(agent: Any) -> str | None:
    s = agent.serving
    return None if s is None else str(s.label)


def converged(agent: Any, version: Any, generation: int) -> bool:
    st = agent.reported_state()
    return bool(
        st.generation == generation
        and st.active is not None
        and st.active.sha256 == version.sha256
        and st.phase.value == "active"
        and st.error is None
    )


def sample(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=N_FEATURES).astype(np.float32)


def check_infers(agent: Any, label: str) -> None:
    p = agent.infer(sample())
    assert p.model == label
    assert np.isfinite(p.probabilities).all() and abs(float(p.probabilities.sum()) - 1) < 1e-3


# =============================================================================
# 1. crash at each activation step (real agent processes)
# =============================================================================


class AgentProcess:
    """``tinyfleet-agent run`` in its own process, with a TOML configuration."""

    def __init__(self, root: Path, device: str, host: Host, **download: float) -> None:
        self.root = root
        self.device = device
        self.state = root / "state"
        self.socket = root / "agent.sock"
        self.config = root / "agent.toml"
        self.logfile = root / "agent.log"
        root.mkdir(parents=True, exist_ok=True)
        dl = {"chunk_timeout_s": 1.0, **download}
        self.config.write_text(
            "\n".join(
                [
                    "[device]",
                    f'id = "{device}"',
                    f'fleet = "{host.settings.fleet}"',
                    "[broker]",
                    f'url = "{host.settings.broker_url}"',
                    "[security]",
                    f"host_public_key = {json.dumps(str(host.public_key_path))}",
                    "[paths]",
                    f"state_dir = {json.dumps(str(self.state))}",
                    "[telemetry]",
                    "heartbeat_s = 1.0",
                    "window = 20",
                    "[download]",
                    *(f"{k} = {v}" for k, v in dl.items()),
                    "[inference]",
                    f"socket = {json.dumps(str(self.socket))}",
                ]
            )
            + "\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tinyfleet.agent.cli", *args, "--config", str(self.config)]

    def start(self, crash_at: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TINYFLEET_")}
        if crash_at is not None:
            env["TINYFLEET_AGENT_CRASH_AT"] = crash_at
        self.socket.unlink(missing_ok=True)
        with self.logfile.open("ab") as log:
            log.write(f"---- start (crash at {crash_at})\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self._cli("run"), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent still running; log:\n{self.log()}") from None

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def status(self) -> dict[str, Any]:
        out = subprocess.run(self._cli("status"), capture_output=True, check=True, timeout=30)
        value: dict[str, Any] = json.loads(out.stdout)
        return value

    def request(self, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """One request on the local inference socket (waits for the socket to appear)."""
        wait_until(self.socket.exists, timeout)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket))
            s.sendall(json.dumps(req).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                part = s.recv(65536)
                if not part:
                    break
                data += part
        value: dict[str, Any] = json.loads(data)
        return value

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")[-4000:]


def preinstall(state: Path, version: Any) -> None:
    """Provision a device with ``version`` committed in its A/B store (as an image would)."""
    store = ModelStore(state / "models")
    artifact = parse_signed_manifest(version.manifest_json).manifest.artifacts[0]
    store.commit(
        store.stage(version.manifest_json, artifact, version.model_path, version.reference_path)
    )


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_at_each_activation_step_recovers(
    point: str, tmp_path: Path, mosquitto: MosquittoBroker, spy: Spy, models: list[Path]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    v1, v2 = host.version(models[0]), host.version(models[1])
    device = "crash-dev"
    agent = AgentProcess(tmp_path / "agent", device, host)
    preinstall(agent.state, v1)
    try:
        with running_service(host) as service:
            agent.start(crash_at=point)
            wait_until(lambda: any(r.active for r in spy.reported(device)), 20)
            generation = send(service, device, v2)
            # the process dies at the crash point, like a power cut
            assert agent.wait(30) == 137, agent.log()
            status = agent.status()
            assert status["active"]["model"] == "tiny@1", status  # the committed model
            assert status["active"]["sha256"] == v1.sha256
            assert status["generation"] == generation
            assert status["last_failure"] is None
            sessions = {r.session for r in spy.reported(device)}

            agent.start()  # no crash point this time
            # right after the restart the old model serves ...
            first = wait_until(
                lambda: next((r for r in spy.reported(device) if r.session not in sessions), None),
                20,
            )
            assert first.active is not None and first.active.version == 1, first
            assert first.phase.value == "active"
            answer = agent.request({"op": "infer", "input": sample().tolist()})
            assert answer["ok"] and answer["model"] in ("tiny@1", "tiny@2"), answer
            # ... and the agent converges on the desired version from the retained state
            last = wait_until(
                lambda: (
                    (r := spy.reported(device)[-1]).active is not None
                    and r.active.version == 2
                    and r.phase.value == "active"
                    and r
                ),
                30,
            )
            assert last.generation == generation and last.error is None, last
            assert last.previous is not None and last.previous.version == 1
            answer = agent.request({"op": "infer", "input": sample().tolist()})
            assert answer["ok"] and answer["model"] == "tiny@2", answer
            assert abs(sum(answer["probabilities"]) - 1) < 1e-3
            assert agent.alive(), agent.log()
            assert agent.status()["active"]["model"] == "tiny@2"
            # generations reported never went back, across the crash
            gens = [r.generation for r in spy.reported(device)]
            assert gens == sorted(gens)
            # exactly one successful activation, after the restart
            activated = db_events(host, device, "activated")
            assert len(activated) == 1 and "tiny@2" in activated[0].detail, activated
    finally:
        agent.stop()


# =============================================================================
# 2-6. hostile or out-of-order messages (agents in this process)
# =============================================================================


def one_device(host: Host, root: Path, device: str = "dev-a", **overrides: Any) -> list[Any]:
    configs = device_configs(host, root, [DeviceSpec(device)])
    if overrides:
        configs = [c.model_copy(update=overrides) for c in configs]
    return configs


def install(service: FleetService, agent: Any, version: Any) -> int:
    generation = send(service, agent.device, version)
    wait_until(lambda: converged(agent, version, generation), 20)
    return generation


def test_corrupted_chunk_is_rejected_requested_again_and_replaced(
    tmp_path: Path, mosquitto: MosquittoBroker, spy: Spy, models: list[Path]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    v1, v2, v3 = (host.version(m) for m in models)
    with (
        running_service(host) as service,
        running_fleet(one_device(host, tmp_path / "devs")) as fleet,
    ):
        agent = fleet.agents["dev-a"]
        install(service, agent, v1)
        # The host has published a version's chunks; then chunk 0 is replaced by wrong bytes
        # of the right length (a broken relay, a hostile publisher): in the model (checked
        # per chunk), then in the reference bundle (no chunk hashes: checked as a whole).
        for version, blob, path, reason in (
            (v2, v2.sha256, v2.model_path, "fails its hash"),
            (v3, reference_sha(v3), v3.reference_path, "assembled blob fails its sha256"),
        ):
            previous = serving(agent)
            rejected = agent.rejected
            publish_artifacts(service, version)
            chunk_size = parse_signed_manifest(version.manifest_json).manifest.artifacts[0]
            good = path.read_bytes()[: chunk_size.chunk_size]
            bad = bytes(b ^ 0x5A for b in good)
            topic = spy.topics.chunk(blob, 0)
            wait_until(lambda: good in spy.payloads(topic), 10)  # noqa: B023 - the host's copy
            spy.publish(topic, bad, retain=True)
            sent = time.monotonic()
            generation = send(service, agent.device, version)

            wait_until(lambda: agent.rejected > rejected, 10)  # noqa: B023
            # the previous model serves meanwhile
            assert serving(agent) == previous
            check_infers(agent, str(previous))
            # the agent asks for the chunk again; the host's answer replaces the bad one
            wait_until(lambda: converged(agent, version, generation), 30)  # noqa: B023
            check_infers(agent, f"tiny@{version.number}")
            assert time.monotonic() - sent < 15
            requests = [r for r in spy.chunk_requests(agent.device) if r.sha256 == blob]
            assert requests and 0 in requests[0].chunks, requests
            assert spy.payloads(topic)[-1] == good  # republished by the host
            # a few rejections at most (the bad copy is fetched again with each request)
            assert 1 <= agent.rejected - rejected <= 3
            events = wait_until(lambda: db_events(host, agent.device, "message_rejected"), 10)
            assert any(e.topic == topic and reason in e.detail for e in events), events
            # the host sees the counter in the reported state
            wait_until(
                lambda: (
                    (r := db_device(host, agent.device)) is not None
                    and r.reported_generation == generation  # noqa: B023
                    and r.reported["rejected_messages"] == agent.rejected
                ),
                10,
            )


def test_wrong_signatures_are_refused_and_the_model_keeps_serving(
    tmp_path: Path, mosquitto: MosquittoBroker, spy: Spy, models: list[Path]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    v1, v2 = host.version(models[0]), host.version(models[1])
    other = SigningKey.generate()
    with (
        running_service(host) as service,
        running_fleet(one_device(host, tmp_path / "devs")) as fleet,
    ):
        agent = fleet.agents["dev-a"]
        g1 = install(service, agent, v1)
        publish_artifacts(service, v2)
        topic = spy.topics.desired(agent.device)

        # (a) the desired state itself is signed by another key, or altered after signing:
        # nothing in it is trusted, not even its generation
        rejected = agent.rejected
        altered = json.loads(craft(host.signer, agent.device, g1 + 5, v2))
        altered["desired"]["generation"] = g1 + 6
        for payload, reason in (
            (craft(other, agent.device, g1 + 5, v2), "the pinned key is"),
            (json.dumps(altered).encode(), "signature does not match"),
        ):
            spy.publish(topic, payload, retain=True)
            rejected += 1
            wait_until(lambda: agent.rejected == rejected, 10)  # noqa: B023
            events = wait_until(
                lambda: db_events(host, agent.device, "message_rejected")[rejected - 1 :],  # noqa: B023
                10,
            )
            assert reason in events[0].detail and events[0].topic == topic, events
            state = wait_until(lambda: (s := agent.reported_state()).error is not None and s, 10)
            assert state.error.code.value == "signature", state.error
            assert state.error.generation is None  # an unverified generation is not reported
            assert state.generation == g1 and agent.generation == g1  # nor recorded
            assert serving(agent) == "tiny@1"
            check_infers(agent, "tiny@1")
        row = wait_until(
            lambda: (r := db_device(host, agent.device)) is not None and r.error is not None and r,
            10,
        )
        assert row.error["code"] == "signature" and row.reported_generation == g1

        # (b) a desired state signed by the host carries a manifest signed by another key
        manifest = parse_signed_manifest(v2.manifest_json).manifest
        forged = other.sign_manifest(manifest.model_copy(update={"key_id": other.key_id}))
        g2 = g1 + 1
        spy.publish(
            topic,
            craft(host.signer, agent.device, g2, v2, manifest=forged.model_dump(mode="json")),
            retain=True,
        )
        wait_until(lambda: agent.generation == g2, 10)
        state = wait_until(
            lambda: (
                (s := agent.reported_state()).error is not None and s.error.generation == g2 and s
            ),
            10,
        )
        assert state.error.code.value == "signature", state.error
        assert state.active is not None and state.active.version == 1
        assert state.phase.value == "active" and state.progress is None  # nothing downloaded

        # (c) the host's own manifest, altered after signing (a version bump)
        tampered = json.loads(v2.manifest_json)
        tampered["manifest"]["version"] = 7
        g3 = g2 + 1
        spy.publish(topic, craft(host.signer, agent.device, g3, v2, manifest=tampered), retain=True)
        state = wait_until(
            lambda: (
                (s := agent.reported_state()).error is not None and s.error.generation == g3 and s
            ),
            10,
        )
        assert state.error.code.value == "signature", state.error
        assert serving(agent) == "tiny@1"
        check_infers(agent, "tiny@1")
        # the host sees the refusals in the retained report
        row = wait_until(
            lambda: (
                (r := db_device(host, agent.device)) is not None
                and r.reported_generation == g3
                and r
            ),
            10,
        )
        assert row.error["code"] == "signature" and row.active_version == 1
        failed = db_events(host, agent.device, "activation_failed")
        assert len(failed) == 2 and all("signature" in e.detail for e in failed), failed


def test_expired_manifest_is_refused(
    tmp_path: Path, mosquitto: MosquittoBroker, spy: Spy, models: list[Path]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    v1, v2 = host.version(models[0]), host.version(models[1])
    with (
        running_service(host) as service,
        running_fleet(one_device(host, tmp_path / "devs")) as fleet,
    ):
        agent = fleet.agents["dev-a"]
        g1 = install(service, agent, v1)
        publish_artifacts(service, v2)
        # v2's manifest, validly signed by the host, but its validity ended yesterday
        manifest = parse_signed_manifest(v2.manifest_json).manifest
        now = datetime.now(UTC)
        expired = host.signer.sign_manifest(
            manifest.model_copy(
                update={"created": now - timedelta(days=30), "expires": now - timedelta(days=1)}
            )
        )
        g2 = g1 + 1
        spy.publish(
            spy.topics.desired(agent.device),
            craft(host.signer, agent.device, g2, v2, manifest=expired.model_dump(mode="json")),
            retain=True,
        )
        state = wait_until(
            lambda: (
                (s := agent.reported_state()).error is not None and s.error.generation == g2 and s
            ),
            10,
        )
        assert state.error.code.value == "expired", state.error
        assert "expired" in state.error.message
        assert state.generation == g2 and state.phase.value == "active"
        assert serving(agent) == "tiny@1"
        check_infers(agent, "tiny@1")
        row = wait_until(
            lambda: (
                (r := db_device(host, agent.device)) is not None
                and r.reported_generation == g2
                and r
            ),
            10,
        )
        assert row.error["code"] == "expired" and row.active_version == 1
        # a valid desired state afterwards is still taken
        g3 = send(service, agent.device, v2)
        wait_until(lambda: converged(agent, v2, g3), 20)


def test_downgrade_needs_an_explicit_rollback(
    tmp_path: Path, mosquitto: MosquittoBroker, spy: Spy, models: list[Path]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    v1, v2 = host.version(models[0]), host.version(models[1])
    with (
        running_service(host) as service,
        running_fleet(one_device(host, tmp_path / "devs")) as fleet,
    ):
        agent = fleet.agents["dev-a"]
        install(service, agent, v1)
        install(service, agent, v2)
        # v1 again, without rollback: refused, v2 keeps serving
        g3 = send(service, agent.device, v1)
        state = wait_until(
            lambda: (
                (s := agent.reported_state()).error is not None and s.error.generation == g3 and s
            ),
            10,
        )
        assert state.error.code.value == "downgrade", state.error
        assert state.generation == g3 and serving(agent) == "tiny@2"
        check_infers(agent, "tiny@2")
        # with rollback=True: accepted, from the other slot (no download)
        requests = len(spy.chunk_requests(agent.device))
        g4 = send(service, agent.device, v1, rollback=True)
        wait_until(lambda: converged(agent, v1, g4), 20)
        check_infers(agent, "tiny@1")
        assert len(spy.chunk_requests(agent.device)) == requests
        events = wait_until(lambda: db_events(host, agent.device, "rolled_back"), 10)
        assert "tiny@1" in events[-1].detail
        failed = db_events(host, agent.device, "activation_failed")
        assert len(failed) == 1 and "downgrade" in failed[0].detail


def test_duplicate_and_stale_desired_states_change_nothing(
    tmp_path: Path, mosquitto: MosquittoBroker, spy: Spy, models: list[Path]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    v1, v2 = host.version(models[0]), host.version(models[1])
    configs = one_device(host, tmp_path / "devs")
    device = "dev-a"
    topic = spy.topics.desired(device)
    with running_service(host) as service:
        with running_fleet(configs) as fleet:
            agent = fleet.agents[device]
            g1 = install(service, agent, v1)
            old = spy.payloads(topic)[-1]  # the retained desired state of generation g1
            before = agent.serving
            wait_until(lambda: spy.reported(device)[-1].phase.value == "active", 10)
            reports = len(spy.reported(device))
            rejected = agent.rejected

            # duplicate: the same generation again, twice -> re-reported, not re-activated
            spy.publish(topic, old, retain=True)
            spy.publish(topic, old, retain=True)
            wait_until(lambda: len(spy.reported(device)) >= reports + 2, 10)
            time.sleep(0.5)
            assert agent.serving is before  # the same loaded model object: no re-activation
            assert agent.generation == g1 and agent.rejected == rejected
            again = spy.reported(device)[reports:]
            assert all(r.generation == g1 and r.phase.value == "active" for r in again), again
            assert len(db_events(host, device, "activated")) == 1

            # a newer generation is taken
            g2 = send(service, device, v2)
            wait_until(lambda: converged(agent, v2, g2), 20)
            newer = agent.serving
            # stale: the old desired state published again (retained) after the newer one
            spy.publish(topic, old, retain=True)
            wait_until(lambda: agent.rejected == rejected + 1, 10)
            events = wait_until(lambda: db_events(host, device, "message_rejected"), 10)
            assert "stale" in events[-1].detail and events[-1].topic == topic
            time.sleep(0.5)
            assert agent.serving is newer and agent.generation == g2
            assert converged(agent, v2, g2)
            assert len(db_events(host, device, "activated")) == 2
        # the device restarts with the stale state retained: it keeps g2 and v2
        state_file = tmp_path / "devs" / device / "agent.json"
        assert json.loads(state_file.read_text())["generation"] == g2
        with running_fleet(configs) as fleet:
            agent = fleet.agents[device]
            assert serving(agent) == "tiny@2"
            wait_until(lambda: agent.rejected >= 1, 10)  # the retained stale one, on subscribe
            assert converged(agent, v2, g2)
            check_infers(agent, "tiny@2")
        assert len(db_events(host, device, "activated")) == 2
        # the generation a device reports never goes back
        gens = [r.generation for r in spy.reported(device)]
        assert gens == sorted(gens) and gens[-1] == g2


# =============================================================================
# 7-8. broker and host restarts in the middle of a rollout
# =============================================================================


def desired_per_rollout(spy: Spy, devices: list[str], rid: str) -> dict[str, set[bytes]]:
    """Every distinct desired document each device was sent for rollout ``rid``."""
    out: dict[str, set[bytes]] = {}
    for device in devices:
        docs = {encode(d) for d in spy.desired(device) if d.desired.rollout_id == rid}
        out[device] = docs
    return out


def assert_generations_monotonic(spy: Spy, devices: list[str]) -> None:
    for device in devices:
        reported = [r.generation for r in spy.reported(device)]
        assert reported == sorted(reported), (device, reported)
        sent = [d.desired.generation for d in spy.desired(device)]
        assert sent == sorted(sent), (device, sent)


def test_broker_restart_mid_rollout_completes(
    tmp_path: Path, mosquitto: MosquittoBroker, spy: Spy, models: list[Path]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    v1 = host.version(models[0])
    specs = [DeviceSpec(f"dev-{i}") for i in range(5)]
    devices = [s.device for s in specs]
    with (
        running_service(host) as service,
        running_fleet(device_configs(host, tmp_path / "devs", specs)) as fleet,
    ):
        wait_until(lambda: online(host) == len(specs), 20)
        rid = start_rollout(service, "tiny@1", ["all"], waves=["1", "100%"], soak_s=1.0)
        # restart the broker as soon as the canary has its desired state
        wait_until(
            lambda: any(d["status"] != "pending" for d in service.orchestrator.view(rid).devices),
            20,
        )
        mosquitto.restart()
        view = wait_rollout(service, rid, ("completed", "rolled_back", "failed", "aborted"), 90)
        assert view.row["state"] == "completed", view.row["reason"]
        assert view.counts == {"succeeded": len(specs)}
        for agent in fleet.agents.values():
            wait_until(lambda: converged(agent, v1, agent.generation or 0), 20)  # noqa: B023
            check_infers(agent, "tiny@1")
        # the restart cost nothing but a reconnect: one desired state per device
        assert all(len(docs) == 1 for docs in desired_per_rollout(spy, devices, rid).values())
        assert_generations_monotonic(spy, devices)


def test_host_restart_mid_rollout_resumes_from_the_database(
    tmp_path: Path, mosquitto: MosquittoBroker, spy: Spy, models: list[Path]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    v1 = host.version(models[0])
    specs = [DeviceSpec(f"dev-{i}") for i in range(6)]
    devices = [s.device for s in specs]
    with running_fleet(device_configs(host, tmp_path / "devs", specs)) as fleet:
        first = FleetService(
            host.settings, registry=host.registry, signer=host.signer, step_interval=0.1
        )
        first.start()
        try:
            assert first.wait_connected(10)
            wait_until(lambda: online(host) == len(specs), 20)
            rid = start_rollout(first, "tiny@1", ["all"], waves=["1", "50%", "100%"], soak_s=1.5)
            # stop the host while the rollout is between waves, soaking after the canary
            wait_until(lambda: first.orchestrator.view(rid).row["state"] == "soaking", 30)
        finally:
            first.stop()
        view = first.orchestrator.view(rid)
        assert view.row["state"] == "soaking" and view.row["wave"] == 0
        sent_before = {d["device"]: d["generation"] for d in view.devices if d["generation"]}
        assert len(sent_before) == 1
        time.sleep(1.0)
        # a new host process: its own registry connection and key, read from the home folder
        second = FleetService(host.settings, step_interval=0.1)
        second.start()
        try:
            assert second.wait_connected(10)
            view = wait_rollout(second, rid, ("completed", "rolled_back", "failed", "aborted"), 60)
        finally:
            second.stop()
            second.registry.close()
        assert view.row["state"] == "completed", view.row["reason"]
        assert view.counts == {"succeeded": len(specs)}
        assert sorted(d["wave"] for d in view.devices) == [0, 1, 1, 2, 2, 2]
        # the canary kept the generation sent before the restart: nothing was sent twice
        after = {d["device"]: d["generation"] for d in view.devices}
        for device, generation in sent_before.items():
            assert after[device] == generation
        for device, agent in fleet.agents.items():
            assert agent.generation == after[device]
            wait_until(lambda: converged(agent, v1, agent.generation or 0), 20)  # noqa: B023
        docs = desired_per_rollout(spy, devices, rid)
        assert all(len(d) == 1 for d in docs.values()), {k: len(v) for k, v in docs.items()}
        assert_generations_monotonic(spy, devices)


# =============================================================================
# 9. broker unreachable: telemetry spooled, then delivered once, in order
# =============================================================================


def db_telemetry(host: Host, device: str) -> list[Any]:
    with host.registry.engine.connect() as c:
        q = select(TelemetryRow.id, TelemetryRow.session, TelemetryRow.seq, TelemetryRow.kind)
        q = q.where(TelemetryRow.fleet == FLEET, TelemetryRow.device == device)
        return list(c.execute(q.order_by(TelemetryRow.id)).all())


def run_outage(
    tmp_path: Path,
    broker: MosquittoBroker,
    models: list[Path],
    outage_s: float,
    spool_max_records: int | None = None,
) -> None:
    host = make_host(tmp_path / "home", broker)
    v1 = host.version(models[0])
    config = one_device(host, tmp_path / "devs")[0]
    if spool_max_records is not None:
        telemetry = config.telemetry.model_copy(update={"spool_max_records": spool_max_records})
        config = config.model_copy(update={"telemetry": telemetry})
    with running_service(host) as service, running_fleet([config]) as fleet:
        agent = fleet.agents["dev-a"]
        install(service, agent, v1)
        n = 0

        def infer_for(seconds: float) -> None:
            nonlocal n
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for _ in range(20):
                    agent.infer(sample(n))
                    n += 1
                time.sleep(0.1)

        def delivered() -> bool:
            rows = db_telemetry(host, agent.device)
            return agent.spool.pending == 0 and bool(rows) and rows[-1].seq >= mark

        infer_for(1.0)
        mark = agent.spool.last_seq
        wait_until(delivered, 20)
        before = agent.spool.last_seq
        session = agent.session

        broker.stop()
        wait_until(lambda: not agent.link.connected and not service.link.connected, 10)
        infer_for(outage_s)  # inference windows and heartbeats pile up in the spool
        mark = agent.spool.last_seq
        produced = mark - before
        assert produced >= outage_s * 5 and agent.spool.pending > 0
        broker.start()
        wait_until(delivered, outage_s + 60)

        rows = db_telemetry(host, agent.device)
        seqs = [r.seq for r in rows]
        # none stored twice: (device, session, seq) is unique, and so is seq per device
        assert len({(r.session, r.seq) for r in rows}) == len(rows) == len(set(seqs))
        # stored in seq order: the host inserted them as the device produced them
        assert seqs == sorted(seqs)
        # no gap but the records the spool bound dropped (the oldest of the outage)
        last = agent.spool.last_seq
        missing = sorted(set(range(1, last + 1)) - set(seqs))
        assert len(missing) == agent.spool.dropped, (missing, agent.spool.dropped, before, mark)
        if spool_max_records is None:
            assert missing == []
        else:
            assert missing and missing == list(range(before + 1, before + 1 + len(missing)))
        outage = [r for r in rows if before < r.seq <= mark]
        assert len(outage) == produced - len(missing)
        # each keeps the session it was produced in (the agent counts a session per
        # connection attempt), earlier than the one that delivered it
        sessions = [r.session for r in outage]
        assert sessions == sorted(sessions) and session <= sessions[0]
        assert sessions[-1] < agent.session
        kinds = {r.kind for r in outage}
        assert kinds == {"heartbeat", "inference", "drift"}, kinds


@pytest.mark.slow
def test_broker_unreachable_30s_telemetry_is_delivered_once_in_order(
    tmp_path: Path, mosquitto: MosquittoBroker, models: list[Path]
) -> None:
    run_outage(tmp_path, mosquitto, models, 30.0)


def test_broker_unreachable_5s_telemetry_is_delivered_once_in_order(
    tmp_path: Path, mosquitto: MosquittoBroker, models: list[Path]
) -> None:
    run_outage(tmp_path, mosquitto, models, 5.0, spool_max_records=30)


# =============================================================================
# 10. malformed payloads on every topic the agent subscribes to (mosquitto_pub)
# =============================================================================


def mosquitto_pub(
    broker: MosquittoBroker, topic: str, payload: bytes | None, *, retain: bool = False
) -> None:
    """Publish with the real ``mosquitto_pub``; ``None`` sends an empty (null) message."""
    assert MOSQUITTO_PUB is not None
    host, port = broker.address
    cmd = [MOSQUITTO_PUB, "-h", host, "-p", str(port), "-q", "1", "-t", topic]
    cmd += ["-r"] if retain else []
    cmd += ["-n"] if payload is None else ["-s"]
    subprocess.run(cmd, input=payload or b"", check=True, capture_output=True, timeout=20)


@pytest.mark.skipif(MOSQUITTO_PUB is None, reason="mosquitto_pub is not installed")
def test_malformed_payloads_are_counted_reported_and_survived(
    tmp_path: Path, mosquitto: MosquittoBroker, spy: Spy, models: list[Path]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    v1, v2 = host.version(models[0]), host.version(models[1])
    device = "dev-m"
    # a long chunk timeout: no re-request (and re-delivery of retained garbage) mid-test
    agent = AgentProcess(tmp_path / "agent", device, host, chunk_timeout_s=60.0)
    topics = spy.topics
    valid = json.loads(craft(host.signer, device, 1, v2))
    big = b'{"schema":1,"pad":"' + b"x" * (300 * 1024) + b'"}'
    presence = {
        "schema": 1,
        "status": "online",
        "session": 1,
        "ts": "2025-03-01T08:00:00Z",
        "version": "0.1.0",
    }
    expected = 0

    def rejected_events() -> list[Any]:
        return db_events(host, device, "message_rejected")

    def hostile(topic: str, payload: bytes | None, reason: str, *, retain: bool = False) -> None:
        nonlocal expected
        mosquitto_pub(mosquitto, topic, payload, retain=retain)
        if payload is None:  # a cleared retained message: ignored, not counted
            time.sleep(0.3)
        else:
            expected += 1
            wait_until(lambda: len(rejected_events()) >= expected, 10)
            event = rejected_events()[expected - 1]
            assert event.topic == topic and reason in event.detail, (reason, event)
        assert len(rejected_events()) == expected
        assert agent.alive(), agent.log()

    try:
        with running_service(host) as service:
            agent.start()
            wait_until(lambda: online(host) == 1, 20)
            g1 = send(service, device, v1)
            wait_until(
                lambda: (
                    (r := db_device(host, device)).reported_generation == g1
                    and r.active_version == 1
                ),
                20,
            )

            desired = topics.desired(device)
            hostile(desired, b"not json {", "not JSON")
            hostile(desired, b"[1, 2, 3]", "not a JSON object")
            hostile(desired, json.dumps({**valid, "schema": 2}).encode(), "schema version 2")
            hostile(desired, json.dumps({**valid, "priority": 9}).encode(), "unknown field")
            hostile(desired, big, "exceeds the 262144 limit")
            other = craft(host.signer, "dev-other", g1 + 1, v2)  # validly signed, for another
            hostile(desired, other, "addressed to dev-other")
            hostile(desired, b"\xff\xfegarbage", "not UTF-8", retain=True)
            hostile(desired, None, "", retain=True)  # clears the retained garbage

            host_presence = topics.host_presence()
            hostile(host_presence, b"\x00\x01", "not JSON")
            hostile(host_presence, json.dumps({**presence, "status": "maybe"}).encode(), "status")
            hostile(host_presence, json.dumps({**presence, "cpu": 1}).encode(), "unknown field")
            hostile(host_presence, big, "exceeds the 262144 limit")
            hostile(host_presence, b"{}", "Field required", retain=True)

            # nothing of that changed what the device runs or the generation it processed
            row = wait_until(
                lambda: (
                    (r := db_device(host, device)).reported["rejected_messages"] == expected and r
                ),
                10,
            )
            assert row.reported_generation == g1 and row.active_version == 1
            assert row.error["code"] == "bad_message"  # the misaddressed desired state
            assert agent.request({"op": "infer", "input": sample().tolist()})["model"] == "tiny@1"

            # a good desired state; its chunks are not published yet, so the agent waits for
            # them subscribed to their topics, and garbage arrives there first
            g2 = send(service, device, v2, artifacts=False)
            wait_until(lambda: db_device(host, device).phase == "downloading", 10)
            chunk = topics.chunk(v2.sha256, 0)
            size = v2.model_path.stat().st_size
            hostile(chunk, b"short", "5 bytes, expected")
            hostile(chunk, os.urandom(size), "fails its hash", retain=True)
            hostile(chunk, big, "bytes, expected")
            hostile(chunk, None, "")  # an empty chunk: ignored
            assert agent.alive()
            row = wait_until(
                lambda: (
                    (r := db_device(host, device)).reported["rejected_messages"] == expected and r
                ),
                10,
            )
            assert row.phase == "downloading" and row.active_version == 1
            # the host publishes the chunks: the good copy replaces the retained garbage
            publish_artifacts(service, v2)
            row = wait_until(lambda: (r := db_device(host, device)).active_version == 2 and r, 20)
            assert row.reported_generation == g2 and row.error is None
            assert row.reported["rejected_messages"] == expected
            answer = agent.request({"op": "infer", "input": sample().tolist()})
            assert answer["ok"] and answer["model"] == "tiny@2", answer
            assert agent.alive(), agent.log()
            assert len(rejected_events()) == expected == 15
    finally:
        assert agent.stop() == 0, agent.log()
