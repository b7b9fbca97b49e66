"""The MQTT link and its drivers, against a real Mosquitto (plus unit tests of config and backoff)."""

from __future__ import annotations

import datetime as dt
import logging
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mqtt_broker import MosquittoBroker, free_port
from mqtt_broker import mosquitto_factory_fixture as mosquitto_factory_fixture
from mqtt_broker import mosquitto_fixture as mosquitto_fixture

from tinyfleet.agent.drivers import SelectorDriver, ThreadDriver
from tinyfleet.agent.errors import ConfigError
from tinyfleet.agent.link import (
    Backoff,
    BaseLinkHandler,
    BrokerConfig,
    Link,
    LinkState,
    Will,
)


def fast() -> Backoff:
    """A short backoff so reconnect tests take a fraction of a second."""
    return Backoff(base=0.05, cap=0.4)


# ----------------------------------------------------------------------------- helpers


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class Recorder(BaseLinkHandler):
    """Records what a link reports; subscribes to ``filters`` on every connect."""

    def __init__(self, filters: list[tuple[str, int]] | None = None) -> None:
        self.filters = filters or []
        self.events: list[str] = []
        self.messages: list[tuple[str, bytes, bool]] = []
        self.published: list[int] = []

    def on_connected(self, link: Link, session_present: bool) -> None:
        self.events.append("connected")
        if self.filters:
            link.subscribe(self.filters)

    def on_disconnected(self, link: Link, reason: str) -> None:
        self.events.append(f"disconnected: {reason}")

    def on_message(self, link: Link, topic: str, payload: bytes, retained: bool) -> None:
        self.messages.append((topic, payload, retained))

    def on_published(self, link: Link, mid: int) -> None:
        self.published.append(mid)

    def payloads(self, topic: str) -> list[bytes]:
        return [p for t, p, _ in self.messages if t == topic]


def config(broker: MosquittoBroker, client_id: str, **kw: object) -> BrokerConfig:
    return BrokerConfig.from_url(f"mqtt://{broker.host}:{broker.port}", client_id=client_id, **kw)


class Drive:
    """Runs links with either driver kind and stops everything at the end."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.selector = SelectorDriver(name="test-links") if kind == "selector" else None
        self.threads: list[ThreadDriver] = []
        if self.selector is not None:
            self.selector.start()

    def add(self, link: Link) -> Link:
        if self.selector is not None:
            self.selector.add(link)
        else:
            driver = ThreadDriver(link)
            driver.start()
            self.threads.append(driver)
        return link

    def stop(self) -> None:
        if self.selector is not None:
            self.selector.stop()
            assert self.selector.errors == 0
        for driver in self.threads:
            driver.stop()
            assert driver.errors == 0


@pytest.fixture(params=["thread", "selector"])
def drive(request: pytest.FixtureRequest) -> Iterator[Drive]:
    d = Drive(request.param)
    try:
        yield d
    finally:
        d.stop()


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def broker_saw(broker: MosquittoBroker, needle: str, timeout: float = 5.0) -> None:
    wait_for(lambda: needle in broker.log(), timeout, f"{needle!r} in the broker log")


# ----------------------------------------------------------------------------- config, backoff


def test_from_url_plain_tls_and_defaults() -> None:
    c = BrokerConfig.from_url("mqtt://broker.local", client_id="d1")
    assert (c.host, c.port, c.tls, c.protocol, c.keepalive) == (
        "broker.local",
        1883,
        False,
        "3.1.1",
        30,
    )
    t = BrokerConfig.from_url(
        "mqtts://User@[::1]:8884/", client_id="d1", ca_file=Path("ca.pem"), protocol="5"
    )
    assert (t.host, t.port, t.tls, t.username, t.protocol) == ("::1", 8884, True, "User", "5")
    assert "secret" not in repr(
        BrokerConfig(host="h", client_id="d", username="u", password="secret")
    )


@pytest.mark.parametrize(
    ("url", "kw", "needle"),
    [
        ("http://h:1883", {}, "http://h:1883"),
        ("mqtt://h:99999", {}, "mqtt://h:99999"),
        ("mqtt://:1883", {}, "no host"),
        ("mqtt://h/path", {}, "path"),
        ("mqtt://u:pw@h", {}, "password file"),
        ("mqtt://h", {"ca_file": Path("ca.pem")}, "TLS"),
        ("mqtt://h", {"client_id": ""}, "client_id"),
        ("mqtts://h", {"key_file": Path("k.pem")}, "cert_file"),
        ("mqtt://h", {"keepalive": 0}, "keepalive"),
    ],
)
def test_from_url_rejects_bad_input(url: str, kw: dict[str, object], needle: str) -> None:
    kw = {"client_id": "d1", **kw}
    with pytest.raises(ConfigError, match=needle) as err:
        BrokerConfig.from_url(url, **kw)
    assert "pw@" not in str(err.value)


def test_backoff_full_jitter_bounds_growth_cap_and_reset() -> None:
    b = Backoff(base=0.5, cap=30.0, rng=random.Random(7))
    ref = random.Random(7)
    ceilings = [min(30.0, 0.5 * 2**i) for i in range(12)]
    delays = [b.next_delay() for _ in range(12)]
    assert delays == [ref.uniform(0, c) for c in ceilings]  # exactly full jitter
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert b.attempt == 12 and b.ceiling() == 30.0
    # The cap holds for any number of failures (no overflow either).
    b.attempt = 5000
    assert 0 <= b.next_delay() <= 30.0
    b.reset()
    assert b.attempt == 0 and b.ceiling() == 0.5 and b.next_delay() <= 0.5
    # Over many draws the ceilings grow: the mean of attempt k is ceiling/2.
    many = Backoff(base=1.0, cap=8.0, rng=random.Random(1))
    means = []
    for k in range(5):
        samples = []
        for _ in range(400):
            many.attempt = k
            samples.append(many.next_delay())
        means.append(sum(samples) / len(samples))
    for k, mean in enumerate(means):
        assert abs(mean - min(8.0, 2**k) / 2) < 0.15 * min(8.0, 2**k)
    with pytest.raises(ValueError):
        Backoff(base=2.0, cap=1.0)


def test_publish_without_connection_returns_none() -> None:
    link = Link(BrokerConfig(host="127.0.0.1", port=free_port(), client_id="alone"), Recorder())
    assert not link.connected and link.state.name == "IDLE"
    assert link.publish("a/b", b"x") is None
    assert link.subscribe([("a/#", 1)]) is None
    with pytest.raises(ValueError, match="topic"):
        link.publish("a/+", b"x")
    link.close()
    assert link.state is LinkState.CLOSED


@pytest.mark.mqtt
def test_unreachable_broker_retries_with_backoff_and_then_connects(
    mosquitto_factory: Callable[..., MosquittoBroker],
) -> None:
    port = free_port()
    rec = Recorder()
    link = Link(BrokerConfig(host="127.0.0.1", port=port, client_id="early"), rec, backoff=fast())
    driver = ThreadDriver(link)
    driver.start()
    try:
        wait_for(lambda: link.stats.connect_failures >= 3, what="refused attempts")
        assert not link.connected and rec.events == []
        mosquitto_factory(port=port, persistence=False)
        wait_for(lambda: link.connected, what="connect once the broker is up")
        assert rec.events == ["connected"] and link.backoff.attempt == 0
    finally:
        driver.stop()


# ----------------------------------------------------------------------------- with Mosquitto


@pytest.mark.mqtt
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_round_trip_and_reply_from_handler(
    mosquitto: MosquittoBroker, drive: Drive, protocol: str
) -> None:
    class Echo(Recorder):
        def on_message(self, link: Link, topic: str, payload: bytes, retained: bool) -> None:
            super().on_message(link, topic, payload, retained)
            if payload != b"marker":
                link.publish("rt/pong", payload.upper())  # from the driver's thread

    sender_rec = Recorder([("rt/pong", 1)])
    echo_rec = Echo([("rt/ping", 1)])
    sender = drive.add(Link(config(mosquitto, "sender", protocol=protocol), sender_rec))
    echo = drive.add(Link(config(mosquitto, "echo", protocol=protocol), echo_rec))
    wait_for(lambda: sender.connected and echo.connected, what="both connected")
    # Subscriptions are sent from on_connected; retained markers tell when they are active.
    sender.publish("rt/ping", b"marker", retain=True)
    sender.publish("rt/pong", b"marker", retain=True)
    wait_for(lambda: bool(echo_rec.messages and sender_rec.messages), what="subscriptions")
    sender_rec.messages.clear()

    mids = [sender.publish("rt/ping", f"m{i}".encode()) for i in range(50)]  # from this thread
    assert all(isinstance(m, int) for m in mids)
    wait_for(lambda: len(sender_rec.payloads("rt/pong")) == 50, what="50 echoes")
    assert sender_rec.payloads("rt/pong") == [f"M{i}".encode() for i in range(50)]
    wait_for(lambda: set(mids) <= set(sender_rec.published), what="PUBACKs")
    assert sender.stats.messages_out == 52 and echo.stats.messages_in == 51
    assert echo.stats.bytes_in == 6 + sum(len(f"m{i}") for i in range(50))
    assert sender.stats.handler_errors == echo.stats.handler_errors == 0


@pytest.mark.mqtt
def test_publish_from_many_threads(mosquitto: MosquittoBroker, drive: Drive) -> None:
    rec = Recorder([("mt/#", 1)])
    sink = drive.add(Link(config(mosquitto, "sink"), rec))
    src = drive.add(Link(config(mosquitto, "src"), Recorder()))
    wait_for(lambda: sink.connected and src.connected)
    src.publish("mt/marker", b"", retain=True)
    wait_for(lambda: bool(rec.messages), what="subscription")

    def burst(t: int) -> None:
        for i in range(200):
            assert src.publish(f"mt/{t}", f"{t}:{i}".encode(), qos=i % 2) is not None

    threads = [threading.Thread(target=burst, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in range(4):
        expected = [f"{t}:{i}".encode() for i in range(200)]
        wait_for(lambda t=t: len(rec.payloads(f"mt/{t}")) == 200, what=f"thread {t}")  # type: ignore[misc]
        got = rec.payloads(f"mt/{t}")
        assert sorted(got) == sorted(expected)
        # Order holds per QoS; QoS 0 may overtake QoS 1 held back by paho's in-flight window.
        for qos in (0, 1):
            assert [p for p in got if int(p.split(b":")[1]) % 2 == qos] == expected[qos::2]
    assert src.stats.messages_out == 801 and src.stats.publish_failures == 0


@pytest.mark.mqtt
def test_close_from_a_handler(mosquitto: MosquittoBroker, drive: Drive) -> None:
    class Quitter(Recorder):
        def on_message(self, link: Link, topic: str, payload: bytes, retained: bool) -> None:
            super().on_message(link, topic, payload, retained)
            if payload == b"bye":
                link.close()  # on the driver's thread: starts the close and returns

    rec = Quitter([("q/#", 1)])
    link = drive.add(Link(config(mosquitto, "quitter"), rec))
    wait_for(lambda: link.connected)
    link.publish("q/x", b"bye", retain=True)
    wait_for(lambda: link.state is LinkState.CLOSED, what="closed")
    assert rec.events == ["connected", "disconnected: closed"]
    broker_saw(mosquitto, "Client quitter disconnected")
    assert link.publish("q/x", b"after") is None


def test_silent_server_times_out_without_stalling_other_links(tmp_path: Path) -> None:
    # A socket that listens but never answers: TCP connects, CONNACK never comes.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    port = silent.getsockname()[1]
    driver = SelectorDriver(tick=0.05)
    stuck = Link(
        BrokerConfig(host="127.0.0.1", port=port, client_id="stuck", connect_timeout=0.2),
        Recorder(),
        backoff=fast(),
    )
    driver.add(stuck)
    driver.start()
    try:
        wait_for(lambda: stuck.stats.connect_failures >= 3, what="CONNACK timeouts")
        assert not stuck.connected and driver.errors == 0
    finally:
        driver.stop(timeout=1)
        silent.close()


@pytest.mark.mqtt
def test_retained_message_is_flagged_on_subscribe(mosquitto: MosquittoBroker, drive: Drive) -> None:
    pub = drive.add(Link(config(mosquitto, "pub"), Recorder()))
    wait_for(lambda: pub.connected)
    mid = pub.publish("ret/state", b"v1", retain=True)
    wait_for(lambda: mid in pub.handler.published)  # type: ignore[attr-defined]

    rec = Recorder([("ret/#", 1)])
    drive.add(Link(config(mosquitto, "late"), rec))
    wait_for(lambda: rec.messages == [("ret/state", b"v1", True)], what="retained delivery")
    pub.publish("ret/state", b"v2", retain=True)
    wait_for(lambda: len(rec.messages) == 2)
    assert rec.messages[1] == ("ret/state", b"v2", False)  # live delivery: not flagged


_CHILD = """
import sys, time
from tinyfleet.agent.link import BaseLinkHandler, BrokerConfig, Link, Will
from tinyfleet.agent.drivers import ThreadDriver
link = Link(BrokerConfig(host="127.0.0.1", port=int(sys.argv[1]), client_id="victim"),
            BaseLinkHandler())
link.set_will(Will("will/victim", b"offline"))
ThreadDriver(link).start()
while not link.connected:
    time.sleep(0.01)
print("connected", flush=True)
time.sleep(60)
"""


@pytest.mark.mqtt
def test_will_is_published_retained_when_the_process_dies(mosquitto: MosquittoBroker) -> None:
    watch = Recorder([("will/#", 1)])
    driver = SelectorDriver()
    watcher = Link(config(mosquitto, "watcher"), watch)
    driver.add(watcher)
    driver.start()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(mosquitto.port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "connected"
        wait_for(lambda: watcher.connected)
        time.sleep(0.2)  # the watcher's SUBSCRIBE is processed
        assert watch.messages == []
        child.kill()  # SIGKILL: no DISCONNECT
        child.wait(10)
        wait_for(lambda: watch.payloads("will/victim") == [b"offline"], what="the will")
        # Retained: a client that subscribes later still sees it.
        late = Recorder([("will/#", 1)])
        driver.add(Link(config(mosquitto, "late"), late))
        wait_for(lambda: late.messages == [("will/victim", b"offline", True)], what="retained will")
    finally:
        child.kill()
        child.wait(10)
        driver.stop()


@pytest.mark.mqtt
def test_clean_close_sends_no_will_and_each_attempt_gets_a_fresh_will(
    mosquitto: MosquittoBroker, drive: Drive
) -> None:
    class Device(Recorder):
        session = 0

        def before_connect(self, link: Link) -> None:
            self.session += 1
            link.set_will(Will("will/dev", f"offline session {self.session}".encode()))

    watch = Recorder([("will/#", 1)])
    watcher = drive.add(Link(config(mosquitto, "watcher"), watch))
    dev_rec = Device()
    dev = drive.add(Link(config(mosquitto, "dev"), dev_rec, backoff=fast()))
    wait_for(lambda: watcher.connected and dev.connected)
    time.sleep(0.2)

    # Abrupt loss of the connection (no DISCONNECT): the broker publishes will 1,
    # the link reconnects by itself with will 2.
    sock = dev._client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    wait_for(lambda: watch.payloads("will/dev") == [b"offline session 1"], what="will 1")
    wait_for(lambda: dev.connected and dev.stats.connects == 2, what="reconnect")
    assert dev_rec.events[:2] == ["connected", "disconnected: connection lost"]
    assert dev_rec.events[-1] == "connected" and dev.stats.reconnects == 1

    # A clean close: DISCONNECT, so no will.
    dev.close()
    assert dev.state is LinkState.CLOSED and dev_rec.events[-1] == "disconnected: closed"
    broker_saw(mosquitto, "Client dev disconnected")
    time.sleep(0.3)
    assert watch.payloads("will/dev") == [b"offline session 1"]


@pytest.mark.mqtt
def test_broker_restart_reconnects_by_itself(mosquitto: MosquittoBroker, drive: Drive) -> None:
    recs = [Recorder([("restart/#", 1)]) for _ in range(3)]
    links = [
        drive.add(Link(config(mosquitto, f"r{i}"), rec, backoff=fast()))
        for i, rec in enumerate(recs)
    ]
    wait_for(lambda: all(link.connected for link in links), what="all connected")
    mosquitto.stop()
    wait_for(lambda: not any(link.connected for link in links), what="all see the loss")
    assert all(link.publish("restart/x", b"lost") is None for link in links)
    time.sleep(0.5)  # several refused attempts with backoff
    assert all(link.stats.connect_failures >= 1 for link in links)
    mosquitto.start()
    wait_for(lambda: all(link.connected for link in links), what="all reconnected")
    for rec, link in zip(recs, links, strict=True):
        assert rec.events == ["connected", "disconnected: connection lost", "connected"]
        assert link.stats.reconnects == 1 and link.backoff.attempt == 0
    # Re-subscribed in on_connected: traffic flows again.
    wait_for(
        lambda: (
            links[0].publish("restart/x", b"back", retain=True) is not None
            and all(rec.payloads("restart/x") for rec in recs)
        ),
        what="traffic after the restart",
    )


class Crashing(Recorder):
    def on_message(self, link: Link, topic: str, payload: bytes, retained: bool) -> None:
        super().on_message(link, topic, payload, retained)
        raise RuntimeError("handler bug")

    def on_published(self, link: Link, mid: int) -> None:
        raise RuntimeError("handler bug")


@pytest.mark.mqtt
def test_handler_exceptions_are_logged_and_do_not_stop_delivery(
    mosquitto: MosquittoBroker, drive: Drive, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="tinyfleet.agent.link")
    bad_rec = Crashing([("crash/#", 1)])
    good_recs = [Recorder([("crash/#", 1)]) for _ in range(2)]
    bad = drive.add(Link(config(mosquitto, "bad"), bad_rec))
    goods = [drive.add(Link(config(mosquitto, f"good{i}"), rec)) for i, rec in enumerate(good_recs)]
    wait_for(lambda: bad.connected and all(g.connected for g in goods))
    bad.publish("crash/marker", b"", retain=True)
    wait_for(lambda: all(rec.messages for rec in [bad_rec, *good_recs]), what="subscriptions")

    for i in range(20):
        assert bad.publish("crash/n", str(i).encode()) is not None
    expected = [str(i).encode() for i in range(20)]
    for rec in [bad_rec, *good_recs]:
        wait_for(lambda rec=rec: rec.payloads("crash/n") == expected, what="20 messages")  # type: ignore[misc]
    # on_message raised 21 times and on_published 21 times; the link never dropped.
    wait_for(lambda: bad.stats.handler_errors == 42, what="42 counted handler errors")
    assert bad.connected and bad.stats.connects == 1 and bad.stats.disconnects == 0
    assert all(g.stats.handler_errors == 0 for g in goods)
    assert "handler on_message raised" in caplog.text and "RuntimeError: handler bug" in caplog.text


@pytest.mark.mqtt
def test_wrong_password_keeps_retrying_without_connecting(
    mosquitto_factory: Callable[..., MosquittoBroker],
) -> None:
    broker = mosquitto_factory(users={"dev": "right"}, persistence=False)
    bad_rec, good_rec = Recorder(), Recorder()
    bad = Link(config(broker, "bad", username="dev", password="wrong"), bad_rec, backoff=fast())
    good = Link(config(broker, "good", username="dev", password="right"), good_rec)
    driver = SelectorDriver()
    driver.add(bad)
    driver.add(good)
    driver.start()
    try:
        wait_for(lambda: good.connected and bad.stats.connect_failures >= 3, what="refusals")
        assert not bad.connected and bad_rec.events == [] and bad.stats.connects == 0
    finally:
        driver.stop()


@pytest.mark.mqtt
def test_five_hundred_links_in_one_thread_fan_out(mosquitto: MosquittoBroker) -> None:
    n = 500

    class Fleet(BaseLinkHandler):
        def __init__(self) -> None:
            self.got: dict[str, list[tuple[bytes, bool]]] = {}

        def on_connected(self, link: Link, session_present: bool) -> None:
            link.subscribe([("fleet/all", 1)])

        def on_message(self, link: Link, topic: str, payload: bytes, retained: bool) -> None:
            self.got.setdefault(link.client_id, []).append((payload, retained))

    ctl = Recorder()
    ctl_driver = ThreadDriver(Link(config(mosquitto, "ctl"), ctl))
    ctl_driver.start()
    fleet = Fleet()
    driver = SelectorDriver(name="fleet")
    driver.start()
    try:
        wait_for(lambda: ctl_driver.link.connected)
        mid = ctl_driver.link.publish("fleet/all", b"retained hello", retain=True)
        wait_for(lambda: mid in ctl.published)
        threads_before = threading.active_count()
        before = rss_kb()
        t0 = time.perf_counter()
        links = [Link(config(mosquitto, f"dev{i:04d}"), fleet) for i in range(n)]
        for link in links:
            driver.add(link)
        wait_for(lambda: all(link.connected for link in links), 60, "500 connected")
        connect_s = time.perf_counter() - t0
        # Every link got the retained message once it had subscribed; then a live fan-out.
        wait_for(lambda: len(fleet.got) == n, 60, "500 retained deliveries")
        after = rss_kb()
        ctl_driver.link.publish("fleet/all", b"live", qos=1)
        wait_for(lambda: all(len(v) == 2 for v in fleet.got.values()), 60, "500 live deliveries")
        assert all(v == [(b"retained hello", True), (b"live", False)] for v in fleet.got.values())
        assert threading.active_count() == threads_before  # no thread per link
        per_link_kb = (after - before) / n
        print(
            f"\n500 links: connected in {connect_s:.2f} s, RSS growth {per_link_kb:.1f} KB per link"
        )
        assert per_link_kb < 64, f"{per_link_kb:.1f} KB per link"
        assert connect_s < 30
        assert driver.errors == 0
    finally:
        driver.stop(timeout=10)
        ctl_driver.stop()
    assert all(link.state is LinkState.CLOSED for link in links)


# ----------------------------------------------------------------------------- TLS


def _pki(tmp: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        (tmp / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (tmp / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        cn: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name,
        signer: ec.EllipticCurvePrivateKey,
        *,
        ca: bool,
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            b = b.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
            )
        elif cn == "server":
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = issue("test ca", ca_key, name("test ca"), ca_key, ca=True)
    write("ca", ca_key, ca_cert)
    for cn in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        write(cn, key, issue(cn, key, ca_cert.subject, ca_key, ca=False))
    return {p.name: p for p in tmp.iterdir()}


@pytest.mark.mqtt
def test_tls_with_client_certificate(
    mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path
) -> None:
    pki = _pki(tmp_path)
    tls_port = free_port()
    broker = mosquitto_factory(
        persistence=False,
        extra_config=f"""
listener {tls_port} 127.0.0.1
cafile {pki["ca.pem"]}
certfile {pki["server.pem"]}
keyfile {pki["server.key"]}
require_certificate true
""",
    )
    url = f"mqtts://127.0.0.1:{tls_port}"
    rec = Recorder([("tls/#", 1)])
    good = Link(
        BrokerConfig.from_url(
            url,
            client_id="tls-good",
            ca_file=pki["ca.pem"],
            cert_file=pki["client.pem"],
            key_file=pki["client.key"],
        ),
        rec,
    )
    no_cert = Link(
        BrokerConfig.from_url(url, client_id="tls-nocert", ca_file=pki["ca.pem"]),
        Recorder(),
        backoff=fast(),
    )
    untrusted = Link(
        BrokerConfig.from_url(url, client_id="tls-untrusted"),  # system CAs only
        Recorder(),
        backoff=fast(),
    )
    driver = SelectorDriver()
    for link in (good, no_cert, untrusted):
        driver.add(link)
    driver.start()
    try:
        wait_for(lambda: good.connected, what="TLS connect")
        good.publish("tls/x", b"over tls", retain=True)
        wait_for(lambda: rec.payloads("tls/x") == [b"over tls"], what="TLS round trip")
        wait_for(
            lambda: no_cert.stats.connect_failures >= 2 and untrusted.stats.connect_failures >= 2,
            what="refused handshakes",
        )
        assert not no_cert.connected and not untrusted.connected and driver.errors == 0
    finally:
        driver.stop()
    with pytest.raises(ConfigError, match="cannot load TLS files"):
        Link(
            BrokerConfig.from_url(url, client_id="x", ca_file=tmp_path / "missing.pem"),
            Recorder(),
        )
    assert broker.running


@pytest.mark.mqtt
def test_resync_reported_reads_retained_reports_again_without_duplicating_later_ones(
    mosquitto: MosquittoBroker,
) -> None:
    """What the orchestrator does for a device whose report the host missed."""
    from tinyfleet.agent.protocol import Topics
    from tinyfleet.host.fleet.publish import DesiredPublisher

    topics = Topics("f")
    host_rec = Recorder([(topics.reported("d1").replace("/d1/", "/+/"), 1)])
    drive = Drive("thread")
    try:
        host = drive.add(Link(config(mosquitto, "host"), host_rec))
        dev = drive.add(Link(config(mosquitto, "dev"), Recorder()))
        wait_for(lambda: host.connected and dev.connected, what="both connected")
        dev.publish(topics.reported("d1"), b"first", retain=True)
        dev.publish(topics.reported("d2"), b"other", retain=True)
        wait_for(lambda: len(host_rec.messages) == 2, what="the reports")

        publisher = DesiredPublisher(host, topics, None, "f", None)  # type: ignore[arg-type]
        assert publisher.resync_reported(["d1"]) == 1
        wait_for(lambda: len(host_rec.payloads(topics.reported("d1"))) == 2, what="d1 again")
        assert host_rec.messages[-1] == (topics.reported("d1"), b"first", True)
        # the per-device filter is gone again: a new report arrives exactly once
        dev.publish(topics.reported("d1"), b"second", retain=True)
        wait_for(lambda: b"second" in host_rec.payloads(topics.reported("d1")), what="second")
        time.sleep(0.3)
        assert host_rec.payloads(topics.reported("d1")).count(b"second") == 1
        assert host_rec.payloads(topics.reported("d2")) == [b"other"]
    finally:
        drive.stop()
