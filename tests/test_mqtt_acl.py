"""docs/mosquitto/acl.example on a real Mosquitto: devices are confined to their own topics.

Negative checks never sleep-and-hope: after the publish that must be dropped comes one
that must arrive (a sentinel, published once the first was acknowledged); Mosquitto
routes in order, so once the sentinel is in, the dropped one would have been in before.
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import BrokerFactory, MosquittoBroker, free_port, mosquitto_path
from mqtt_broker import mosquitto_factory_fixture as mosquitto_factory_fixture
from mqtt_broker import mosquitto_fixture as mosquitto_fixture
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from tinyfleet.agent.protocol import (
    AgentPhase,
    Presence,
    ReportedState,
    Topics,
    decode,
    decode_message,
    encode,
)

pytestmark = pytest.mark.mqtt

REPO = Path(__file__).resolve().parent.parent
ACL_EXAMPLE = REPO / "docs" / "mosquitto" / "acl.example"
USERS = {"dev-1": "pw-dev-1", "dev-2": "pw-dev-2", "host": "pw-host"}
T = Topics("f1")
SHA = "ab" * 32
TIMEOUT = 5.0
V311 = MQTTProtocolVersion.MQTTv311
V5 = MQTTProtocolVersion.MQTTv5


class Peer:
    """A paho client (its own network thread) that records what it receives and its acks."""

    def __init__(
        self,
        address: tuple[str, int],
        user: str | None,
        password: str | None,
        protocol: int = V311,
        *,
        tls_ca: Path | None = None,
    ) -> None:
        self.address = address
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{user or 'anon'}-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion(protocol),
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.seen: list[mqtt.MQTTMessage] = []
        self._acks: dict[int, ReasonCode | list[ReasonCode]] = {}
        self._cond = threading.Condition()
        self._connack: queue.Queue[ReasonCode | None] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, f, rc, p: self._connack.put(None)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_publish = lambda c, u, mid, rc, p: self._ack(mid, rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._ack(mid, rcs)

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: ReasonCode, props: object
    ) -> None:
        if rc.is_failure:
            client.disconnect()  # no automatic retries
        self._connack.put(rc)

    def _ack(self, mid: int, value: ReasonCode | list[ReasonCode]) -> None:
        with self._cond:
            self._acks[mid] = value
            self._cond.notify_all()

    def _wait_ack(self, mid: int) -> ReasonCode | list[ReasonCode]:
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, TIMEOUT), f"no ack for {mid}"
            return self._acks.pop(mid)

    def connect(self) -> ReasonCode:
        """Connect and return the CONNACK reason code; ``ConnectionError`` if closed before it."""
        self.client.connect(*self.address, keepalive=30)
        self.client.loop_start()
        rc = self._connack.get(timeout=TIMEOUT)
        if rc is None:
            raise ConnectionError(f"{self.address} closed the connection before CONNACK")
        return rc

    def subscribe(self, topic: str) -> list[ReasonCode]:
        """Subscribe at QoS 1 and return the SUBACK reason codes."""
        rc, mid = self.client.subscribe(topic, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None
        acks = self._wait_ack(mid)
        assert isinstance(acks, list)
        return acks

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK reason code (always Success before MQTT 5)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        ack = self._wait_ack(info.mid)
        assert isinstance(ack, ReasonCode)
        return ack

    def expect(self, topic: str, payload: bytes | None = None) -> mqtt.MQTTMessage:
        """Wait for a message on ``topic`` (and with ``payload``); earlier ones go to ``seen``."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"nothing on {topic}; seen {[m.topic for m in self.seen]}"
            try:
                msg = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(msg)
            if msg.topic == topic and (payload is None or msg.payload == payload):
                return msg

    def topics_seen(self) -> set[str]:
        return {m.topic for m in self.seen}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


PeerFactory = Callable[..., Peer]


@pytest.fixture(name="acl_broker")
def acl_broker_fixture(mosquitto_factory: BrokerFactory) -> MosquittoBroker:
    """Mosquitto with allow_anonymous false, dev-1, dev-2 and host, and the example ACL."""
    broker = mosquitto_factory(users=USERS, acl_file=ACL_EXAMPLE)
    assert "allow_anonymous false" in broker.config_path.read_text()
    return broker


@pytest.fixture(name="peers")
def peers_fixture(acl_broker: MosquittoBroker) -> Iterator[PeerFactory]:
    """``peers(user, protocol=V311)`` -> a connected ``Peer``; all closed after the test."""
    made: list[Peer] = []

    def make(user: str, protocol: int = V311) -> Peer:
        peer = Peer(acl_broker.address, user, USERS[user], protocol)
        rc = peer.connect()
        assert rc == "Success", f"{user} could not connect: {rc}"
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def _reported(device: str, session: int = 1) -> bytes:
    return encode(
        ReportedState(
            device=device,
            session=session,
            ts=datetime.now(UTC),
            generation=0,
            phase=AgentPhase.IDLE,
        )
    )


def test_device_publishes_its_own_reported_state(peers: PeerFactory) -> None:
    host, dev1 = peers("host"), peers("dev-1")
    assert host.subscribe(T.reported_filter())[0] == "Granted QoS 1"
    assert dev1.publish(T.reported("dev-1"), _reported("dev-1"), retain=True) == "Success"
    msg = host.expect(T.reported("dev-1"))
    parsed = T.parse(msg.topic)
    report = decode_message(parsed, msg.payload)
    assert isinstance(report, ReportedState)
    assert report.device == "dev-1"


@pytest.mark.parametrize("protocol", [V311, V5], ids=["mqtt311", "mqtt5"])
def test_device_cannot_publish_as_another_device_or_as_the_host(
    peers: PeerFactory, protocol: int
) -> None:
    host, dev1 = peers("host"), peers("dev-1", protocol)
    host.subscribe("tinyfleet/v1/#")
    forged = [
        T.reported("dev-2"),  # another device's state
        T.presence("dev-2"),
        T.telemetry("dev-2"),
        T.events("dev-2"),
        T.chunk_request("dev-2"),
        T.desired("dev-1"),  # only the host assigns desired state
        T.chunk(SHA, 0),  # only the host publishes artifact chunks
        T.host_presence(),
        Topics("f2").reported("dev-2"),  # another fleet, another device
    ]
    for topic in forged:
        rc = dev1.publish(topic, b"forged", retain=True)
        # MQTT 3.1.1 has no way to say no: Mosquitto acks and drops; MQTT 5 says why.
        assert rc == ("Not authorized" if protocol == V5 else "Success"), topic
    sentinel = _reported("dev-1")
    assert dev1.publish(T.reported("dev-1"), sentinel, retain=True) == "Success"
    host.expect(T.reported("dev-1"), sentinel)
    assert host.topics_seen() == {T.reported("dev-1")}
    # nothing forged was retained either: a fresh subscriber gets only the real report
    late = peers("host")
    late.subscribe("tinyfleet/v1/#")
    late.expect(T.reported("dev-1"))
    host.publish(T.host_events(), b"end")
    late.expect(T.host_events(), b"end")
    assert late.topics_seen() == {T.reported("dev-1"), T.host_events()}


def test_device_writes_each_of_its_own_topics(peers: PeerFactory) -> None:
    host, dev1 = peers("host"), peers("dev-1", V5)
    host.subscribe("tinyfleet/v1/f1/dev/dev-1/#")
    own = [
        T.reported("dev-1"),
        T.presence("dev-1"),
        T.telemetry("dev-1"),
        T.events("dev-1"),
        T.chunk_request("dev-1"),
    ]
    for topic in own:
        assert dev1.publish(topic, b"x") == "Success", topic
        host.expect(topic)


def test_device_cannot_read_another_devices_topics(peers: PeerFactory) -> None:
    host, dev1, dev2 = peers("host"), peers("dev-1"), peers("dev-2")
    host.publish(T.desired("dev-2"), b"for dev-2", retain=True)
    host.publish(T.desired("dev-1"), b"for dev-1", retain=True)
    # Mosquitto grants the subscriptions and filters every delivery through the ACL,
    # retained messages included.
    for topic in (
        T.desired("dev-2"),
        "tinyfleet/v1/f1/dev/+/desired",
        "tinyfleet/v1/f1/dev/+/reported",
        "tinyfleet/v1/f1/dev/dev-2/#",
        "tinyfleet/v1/#",
    ):
        dev1.subscribe(topic)
    dev1.expect(T.desired("dev-1"), b"for dev-1")  # own retained desired state
    # live traffic of dev-2 and for dev-2 does not reach dev-1 either
    assert dev2.publish(T.reported("dev-2"), _reported("dev-2")) == "Success"
    host.publish(T.desired("dev-2"), b"again for dev-2")
    host.publish(T.host_presence(), b"host online")
    dev1.expect(T.host_presence(), b"host online")
    assert dev1.topics_seen() == {T.desired("dev-1"), T.host_presence()}


def test_host_publishes_desired_state_and_chunks_to_devices(peers: PeerFactory) -> None:
    host = peers("host")
    assert host.publish(T.desired("dev-1"), b"d1", retain=True) == "Success"
    assert host.publish(T.desired("dev-2"), b"d2", retain=True) == "Success"
    assert host.publish(T.chunk(SHA, 0), b"\x00\x01chunk", retain=True) == "Success"
    for device, payload in (("dev-1", b"d1"), ("dev-2", b"d2")):
        dev = peers(device)
        for topic, _qos in T.device_subscriptions(device):
            dev.subscribe(topic)
        dev.subscribe(T.chunk_filter(SHA))
        assert dev.expect(T.desired(device)).payload == payload
        chunk = dev.expect(T.chunk(SHA, 0))
        assert chunk.payload == b"\x00\x01chunk" and chunk.retain


@pytest.mark.parametrize(
    ("user", "password"), [("dev-1", "wrong"), (None, None), ("stranger", "pw")]
)
def test_unknown_or_anonymous_clients_are_refused(
    acl_broker: MosquittoBroker, user: str | None, password: str | None
) -> None:
    peer = Peer(acl_broker.address, user, password)
    try:
        rc = peer.connect()
    finally:
        peer.client.loop_stop()
    assert rc.is_failure
    assert rc in ("Not authorized", "Bad user name or password")


def _wait_log(
    broker: MosquittoBroker, text: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + TIMEOUT
    while text not in broker.log():
        assert proc is None or proc.poll() is None, f"client exited before: {text}"
        assert time.monotonic() < deadline, f"not in the broker log: {text}"
        time.sleep(0.02)


def _kill_with_will(broker: MosquittoBroker, user: str, will_topic: str, payload: bytes) -> None:
    """Connect mosquitto_sub as ``user`` with a retained last will, then kill it (-9).

    Returns once the broker has noticed the lost connection (and handled the will).
    """
    tool = shutil.which("mosquitto_sub")
    if tool is None:
        pytest.skip("mosquitto_sub is not installed")
    client_id = f"{user}-will-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        [
            tool,
            *("-h", broker.host, "-p", str(broker.port), "-u", user, "-P", USERS[user]),
            *("-i", client_id, "-q", "1", "-t", T.desired(user)),
            *("--will-topic", will_topic, "--will-payload", payload.decode()),
            *("--will-qos", "1", "--will-retain"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_log(broker, f" as {client_id} ", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    _wait_log(broker, f"Client {client_id} closed its connection.")


def test_last_will_only_on_the_devices_own_presence(
    acl_broker: MosquittoBroker, peers: PeerFactory
) -> None:
    host = peers("host")
    host.subscribe(T.presence_filter())
    birth = Presence(
        device="dev-1",
        status="online",
        session=3,
        ts=datetime.now(UTC),
        agent_version="0.1.0",
        profile="rpi4",
    )
    # a will naming another device's presence topic is dropped
    _kill_with_will(acl_broker, "dev-1", T.presence("dev-2"), b"forged will")
    # a will on its own presence topic is published when the connection dies
    will = encode(birth.as_will())
    _kill_with_will(acl_broker, "dev-1", T.presence("dev-1"), will)
    msg = host.expect(T.presence("dev-1"))
    assert decode(Presence, msg.payload).status == "offline"
    assert host.topics_seen() == {T.presence("dev-1")}


def test_restart_keeps_retained_messages_with_persistence(mosquitto: MosquittoBroker) -> None:
    peer = Peer(mosquitto.address, None, None)
    assert peer.connect() == "Success"
    peer.publish(T.desired("dev-1"), b"kept", retain=True)
    peer.close()
    port = mosquitto.port
    mosquitto.restart()
    assert mosquitto.running and mosquitto.port == port
    peer = Peer(mosquitto.address, None, None)
    assert peer.connect() == "Success"
    try:
        peer.subscribe(T.desired("dev-1"))
        msg = peer.expect(T.desired("dev-1"))
        assert msg.payload == b"kept" and msg.retain
    finally:
        peer.close()


def test_restart_without_persistence_loses_retained_messages(
    mosquitto_factory: BrokerFactory,
) -> None:
    broker = mosquitto_factory(persistence=False)
    peer = Peer(broker.address, None, None)
    assert peer.connect() == "Success"
    peer.publish(T.desired("dev-1"), b"lost", retain=True)
    peer.close()
    broker.restart()
    peer = Peer(broker.address, None, None)
    assert peer.connect() == "Success"
    try:
        peer.subscribe(T.desired("dev-1"))
        peer.publish(T.desired("dev-1"), b"live")
        first = peer.expect(T.desired("dev-1"))
        assert first.payload == b"live" and not first.retain
    finally:
        peer.close()


# ---------------------------------------------------------------- the example config


def _tls_files(directory: Path) -> Path:
    """A throwaway CA and a broker certificate for 127.0.0.1; returns the CA file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)

    def cert(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tinyfleet test CA")])
    ca_cert = cert("tinyfleet test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    broker_cert = cert("localhost", key, ca_name, ca_key, ca=False)
    certs = directory / "certs"
    certs.mkdir(parents=True)
    pem = serialization.Encoding.PEM
    (certs / "broker.crt").write_bytes(broker_cert.public_bytes(pem))
    (certs / "broker.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (certs / "broker.key").chmod(0o600)
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    return directory / "ca.crt"


def test_mosquitto_conf_example(tmp_path: Path) -> None:
    """The example config runs as written, paths and ports aside: TLS for devices, ACL on."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    etc = tmp_path / "etc"
    etc.mkdir()
    ca = _tls_files(etc)
    shutil.copy(ACL_EXAMPLE, etc / "acl")
    data = tmp_path / "data"
    data.mkdir()
    tls_port, local_port = free_port(), free_port()
    text = (REPO / "docs" / "mosquitto" / "mosquitto.conf.example").read_text()
    for old, new in (
        ("/etc/mosquitto/tinyfleet/", f"{etc}/"),
        ("/var/lib/mosquitto/", f"{data}/"),
        ("listener 8883\n", f"listener {tls_port} 127.0.0.1\n"),
        ("listener 1883 127.0.0.1\n", f"listener {local_port} 127.0.0.1\n"),
    ):
        assert old in text, f"the example no longer contains {old!r}"
        text = text.replace(old, new)
    if os.geteuid() == 0:
        text += f"user {getpass.getuser()}\n"
    broker = MosquittoBroker(tmp_path / "run", users=USERS, port=local_port, config=text)
    assert broker.password_file is not None
    shutil.copy(broker.password_file, etc / "passwd")
    (etc / "passwd").chmod(0o600)
    with broker:
        host = Peer(broker.address, "host", USERS["host"])
        device = Peer(("127.0.0.1", tls_port), "dev-1", USERS["dev-1"], tls_ca=ca)
        try:
            assert host.connect() == "Success"
            host.subscribe("tinyfleet/v1/#")
            assert device.connect() == "Success"
            # the ACL is in force on the TLS listener: the forged report is dropped
            device.publish(T.reported("dev-2"), b"forged")
            report = _reported("dev-1")
            assert device.publish(T.reported("dev-1"), report) == "Success"
            host.expect(T.reported("dev-1"), report)
            assert host.topics_seen() == {T.reported("dev-1")}
        finally:
            device.close()
            host.close()
        # plain MQTT on the device port gets no CONNACK
        plain = Peer(("127.0.0.1", tls_port), "dev-1", USERS["dev-1"])
        try:
            with pytest.raises(ConnectionError):
                plain.connect()
        finally:
            plain.client.loop_stop()
