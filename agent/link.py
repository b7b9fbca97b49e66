"""The agent's MQTT transport: one small ``Link`` over paho-mqtt 2.x.

A ``Link`` moves bytes between a ``LinkHandler`` and one broker.  It never runs a
network loop of its own: a driver from ``tinyfleet.agent.drivers`` does, either a
``ThreadDriver`` (one link, its own thread: the daemon) or a ``SelectorDriver``
(thousands of links in one thread: the fleet simulator).  The driver connects,
reconnects with full-jitter ``Backoff`` and calls the handler from its thread.

By default sessions are clean (``clean_session=True`` on MQTT 3.1.1, ``clean_start=True`` and
no session expiry on MQTT 5): the agent subscribes again in ``on_connected`` and
reads its state from retained messages, so no broker-side session is needed.
QoS 1 messages that were in flight when a connection dropped are sent again by
paho after the next CONNACK (with the DUP flag); ``on_published`` then reports
their original mid.
"""

from __future__ import annotations

import enum
import functools
import logging
import random
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from tinyfleet.agent.errors import ConfigError

if TYPE_CHECKING:
    from paho.mqtt.client import ConnectFlags, DisconnectFlags, MQTTMessage, SocketLike
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "Backoff",
    "BaseLinkHandler",
    "BrokerConfig",
    "Link",
    "LinkHandler",
    "LinkState",
    "LinkStats",
    "Will",
]

_LOG = logging.getLogger("tinyfleet.agent.link")
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_RNG = random.Random()
_STATS_LOCK = threading.Lock()  # one for all links: a lock per link would cost memory


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """Where and how a link connects.  ``from_url`` builds one from ``mqtt[s]://host:port``."""

    host: str
    port: int = 1883
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive: int = 30
    connect_timeout: float = 5.0
    client_id: str
    persistent_session: bool = False
    """Keep the broker-side session (subscriptions, queued QoS 1 messages) across
    disconnects.  Agents use clean sessions (they re-subscribe and read retained state);
    the host service keeps one so that device messages the broker accepted while it was
    away are delivered when it comes back."""
    session_expiry_s: int = 3600

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"broker config for {self.client_id!r}: {msg}")

        if not self.host:
            raise bad("host is empty")
        if not 1 <= self.port <= 65535:
            raise bad(f"port {self.port} is outside 1..65535")
        if self.protocol not in ("3.1.1", "5"):
            raise bad(f"protocol {self.protocol!r} is not '3.1.1' or '5'")
        if not 1 <= self.keepalive <= 65535:
            raise bad(f"keepalive {self.keepalive} s is outside 1..65535")
        if not self.connect_timeout > 0:
            raise bad(f"connect_timeout {self.connect_timeout} s is not positive")
        if not self.client_id or len(self.client_id.encode()) > 65535:
            raise ConfigError("broker config: client_id must be 1..65535 bytes of UTF-8")
        if not self.tls and (self.ca_file or self.cert_file or self.key_file):
            raise bad("ca_file/cert_file/key_file need TLS (an mqtts:// URL)")
        if self.key_file and not self.cert_file:
            raise bad("key_file given without cert_file")
        if self.password is not None and self.username is None:
            raise bad("a password needs a username")

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> BrokerConfig:
        """``mqtt://host[:port]`` (plain, default 1883) or ``mqtts://host[:port]`` (TLS, 8883).

        A user name may be given in the URL (``mqtt://name@host``); a password may not
        (it is read from a file by the caller and passed as ``password=``).
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r} is invalid: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ConfigError(f"broker URL {url!r} has no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"broker URL {url!r} must not have a path, query or fragment")
        if parts.password is not None:
            raise ConfigError(
                f"broker URL {url.replace(parts.password, '***')!r} contains a password; "
                "give it in a password file instead"
            )
        if parts.username and "username" not in kw:
            kw["username"] = unquote(parts.username)
        return cls(
            host=parts.hostname,
            port=port if port is not None else _DEFAULT_PORTS[scheme],
            tls=scheme == "mqtts",
            **kw,
        )


@dataclass(frozen=True)
class Will:
    """The last will the broker publishes if the link drops without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True

    def __post_init__(self) -> None:
        _check_topic(self.topic)
        _check_qos(self.qos)


def _check_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic:
        raise ValueError(f"invalid topic for a publish: {topic!r}")


def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise ValueError(f"invalid QoS {qos!r} (0, 1 or 2)")


@functools.lru_cache(maxsize=16)
def _ssl_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    """One TLS context per (CA, cert, key), shared by every link that uses them."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if cert_file is not None:
            ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(str(p) for p in (ca_file, cert_file, key_file) if p) or "system CAs"
        raise ConfigError(f"cannot load TLS files ({files}): {exc}") from None
    # Hostname checking by the context: paho then skips ssl.match_hostname (gone in 3.12).
    ctx.check_hostname = True
    return ctx


# --------------------------------------------------------------------------- backoff


class Backoff:
    """Full-jitter exponential backoff: ``uniform(0, min(cap, base * 2**attempt))``."""

    __slots__ = ("_rng", "attempt", "base", "cap")

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        if not 0 < base <= cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base} cap={cap}")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng if rng is not None else _RNG

    def ceiling(self) -> float:
        """Upper bound of the next delay."""
        # 2**64 already exceeds any useful cap; bounding the exponent avoids float overflow.
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 64))

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Called after a successful connect."""
        self.attempt = 0


# --------------------------------------------------------------------------- handler


class LinkHandler(Protocol):
    """What a link reports; every call comes from the driver's thread."""

    def before_connect(self, link: Link) -> None:
        """Called before each connection attempt (set the will for this attempt here)."""

    def on_connected(self, link: Link, session_present: bool) -> None:
        """The broker accepted the connection (subscribe here)."""

    def on_disconnected(self, link: Link, reason: str) -> None:
        """An established connection ended (also on ``close()``)."""

    def on_message(self, link: Link, topic: str, payload: bytes, retained: bool) -> None:
        """A message arrived; ``retained`` is True for retained messages sent on subscribe."""

    def on_published(self, link: Link, mid: int) -> None:
        """The broker acknowledged ``mid`` (PUBACK for QoS 1; written to the socket for QoS 0)."""


class BaseLinkHandler:
    """A ``LinkHandler`` that ignores everything; subclass and override what you need."""

    def before_connect(self, link: Link) -> None:
        return None

    def on_connected(self, link: Link, session_present: bool) -> None:
        return None

    def on_disconnected(self, link: Link, reason: str) -> None:
        return None

    def on_message(self, link: Link, topic: str, payload: bytes, retained: bool) -> None:
        return None

    def on_published(self, link: Link, mid: int) -> None:
        return None


# --------------------------------------------------------------------------- link


class LinkState(enum.Enum):
    IDLE = "idle"  # not attached to a driver yet
    WAITING = "waiting"  # attached, next connect attempt scheduled
    CONNECTING = "connecting"  # socket open, CONNECT sent, no CONNACK yet
    CONNECTED = "connected"
    CLOSING = "closing"  # DISCONNECT queued
    CLOSED = "closed"


@dataclass(slots=True)
class LinkStats:
    """Counters of one link.  Bytes are payload bytes."""

    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    connect_attempts: int = 0
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    handler_errors: int = 0
    publish_failures: int = 0

    @property
    def reconnects(self) -> int:
        """Successful connects after the first."""
        return max(0, self.connects - 1)


class _Driver(Protocol):
    """What a link needs from the driver that owns it (see ``tinyfleet.agent.drivers``)."""

    def _request_flush(self, link: Link) -> None: ...
    def _request_close(self, link: Link, timeout: float) -> None: ...
    def _socket_opened(self, link: Link, sock: SocketLike) -> None: ...
    def _socket_closing(self, link: Link, sock: SocketLike) -> None: ...
    def _link_down(self, link: Link) -> None: ...
    def _link_closed(self, link: Link) -> None: ...


class Link:
    """One MQTT connection of one device.  Thread-safe ``publish``/``subscribe``/``close``.

    Give it to a driver (``SelectorDriver.add`` or ``ThreadDriver``) to connect it; a
    link is driven once and ends ``CLOSED``.  ``max_queued`` bounds the QoS>0 messages
    paho holds (in flight or waiting for the in-flight window of 20); beyond it
    ``publish`` returns None and counts a ``publish_failures``.
    """

    __slots__ = (
        "_client",
        "_closed",
        "_deadline",
        "_driver",
        "_gen",
        "_log",
        "_mask",
        "_sock",
        "_state",
        "_will",
        "backoff",
        "config",
        "handler",
        "stats",
    )

    def __init__(
        self,
        config: BrokerConfig,
        handler: LinkHandler,
        *,
        logger: logging.Logger | None = None,
        backoff: Backoff | None = None,
        max_queued: int = 1000,
    ) -> None:
        self.config = config
        self.handler = handler
        self.backoff = backoff if backoff is not None else Backoff()
        self.stats = LinkStats()
        self._log = logger if logger is not None else _LOG
        self._will: Will | None = None
        self._state = LinkState.IDLE
        self._driver: _Driver | None = None
        self._closed: threading.Event | None = None  # made by a close() that waits (~1 KB)
        # Driver bookkeeping: heap generation, registered socket and event mask, deadline
        # of the current CONNECTING/CLOSING phase.
        self._gen = 0
        self._sock: SocketLike | None = None
        self._mask = 0
        self._deadline = 0.0
        self._client = self._make_client(max_queued)

    def _make_client(self, max_queued: int) -> mqtt.Client:
        cfg = self.config
        v5 = cfg.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=None if v5 else not cfg.persistent_session,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        # Exceptions in our callbacks are caught there; never let one unwind paho mid-packet.
        client.suppress_exceptions = True
        client.connect_timeout = cfg.connect_timeout
        client.max_queued_messages_set(max_queued)
        if cfg.tls:
            client.tls_set_context(_ssl_context(cfg.ca_file, cfg.cert_file, cfg.key_file))
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        properties = None
        if v5 and cfg.persistent_session:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = cfg.session_expiry_s
        client.connect_async(
            cfg.host,
            cfg.port,
            cfg.keepalive,
            clean_start=(not cfg.persistent_session) if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        client.enable_logger(self._log.getChild("paho"))
        client.on_connect = self._cb_connect
        client.on_disconnect = self._cb_disconnect
        client.on_message = self._cb_message
        client.on_publish = self._cb_publish
        client.on_subscribe = self._cb_subscribe
        client.on_socket_open = self._cb_socket_open
        client.on_socket_close = self._cb_socket_close
        # With a register-write callback set, paho never writes from the publishing thread:
        # the driver does every write from its own thread.
        client.on_socket_register_write = _ignore_socket
        return client

    def __repr__(self) -> str:
        return f"<Link {self.config.client_id} {self._state.value}>"

    # ------------------------------------------------------------------ public

    @property
    def client_id(self) -> str:
        return self.config.client_id

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is LinkState.CONNECTED

    def set_will(self, will: Will | None) -> None:
        """The will sent with the next CONNECT (set it in ``before_connect`` to vary it)."""
        self._will = will

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Queue a message; its mid, or None when not connected (never raises on a disconnect)."""
        _check_topic(topic)
        _check_qos(qos)
        if self._state is not LinkState.CONNECTED:
            return None
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        # NO_CONN for QoS>0 means paho kept the message and sends it after the next CONNACK.
        accepted = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
            qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN
        )
        stats = self.stats
        with _STATS_LOCK:  # publish may run in several threads at once
            if accepted:
                stats.messages_out += 1
                stats.bytes_out += len(payload)
            else:
                stats.publish_failures += 1
        if not accepted:
            self._log.debug("%s: publish to %s refused: %s", self.client_id, topic, info.rc)
            return None
        self._flush()
        return info.mid

    def subscribe(self, filters: list[tuple[str, int]]) -> int | None:
        """Subscribe to ``[(filter, qos), ...]``; the SUBSCRIBE's mid, or None when not connected."""
        if not filters or self._state is not LinkState.CONNECTED:
            return None
        rc, mid = self._client.subscribe(filters)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None
        self._flush()
        return mid

    def unsubscribe(self, topics: list[str]) -> int | None:
        """Unsubscribe from ``topics``; the UNSUBSCRIBE's mid, or None when not connected."""
        if not topics or self._state is not LinkState.CONNECTED:
            return None
        rc, mid = self._client.unsubscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None
        self._flush()
        return mid

    def close(self, timeout: float = 5.0) -> None:
        """Clean DISCONNECT (the broker drops the will), then stop driving this link.

        Waits up to ``timeout`` for the DISCONNECT to be written, except when called
        from the driver's own thread (a handler), where it only starts the close.
        """
        driver = self._driver
        if driver is None:
            self._state = LinkState.CLOSED
            return
        driver._request_close(self, timeout)

    # ------------------------------------------------------------------ driver side

    def _attach(self, driver: _Driver) -> None:
        if self._driver is not None or self._state is not LinkState.IDLE:
            raise RuntimeError(f"{self!r} is already driven or closed; a link is added once")
        self._driver = driver

    def _flush(self) -> None:
        driver = self._driver
        if driver is not None:
            driver._request_flush(self)

    def _attempt_connect(self) -> bool:
        """One connection attempt (driver thread): TCP (+TLS) connect and queue CONNECT."""
        self._guard("before_connect", self.handler.before_connect, self)
        client = self._client
        will = self._will
        client.will_clear()
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self.stats.connect_attempts += 1
        self._state = LinkState.CONNECTING
        try:
            rc = client.reconnect()
        except Exception as exc:
            # ssl.SSLError and socket timeouts are OSErrors; ssl.CertificateError a ValueError.
            self._state = LinkState.WAITING
            self.stats.connect_failures += 1
            expected = isinstance(exc, OSError | ValueError)
            self._log.log(
                self._failure_level() if expected else logging.ERROR,
                "%s: cannot connect to %s:%d: %s",
                self.client_id,
                self.config.host,
                self.config.port,
                exc or type(exc).__name__,
                exc_info=not expected,
            )
            return False
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._log.info("%s: CONNECT not queued: %s", self.client_id, rc)
        return True

    def _failure_level(self) -> int:
        """INFO for the first failure in a row, DEBUG for the retries after it."""
        return logging.INFO if self.backoff.attempt == 0 else logging.DEBUG

    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        """Call a handler method; log and count what it raises, never propagate it."""
        try:
            fn(*args)
        except Exception:
            self.stats.handler_errors += 1
            self._log.exception("%s: handler %s raised", self.client_id, what)

    # ------------------------------------------------------------------ paho callbacks

    def _cb_socket_open(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        driver = self._driver
        if driver is not None:
            driver._socket_opened(self, sock)

    def _cb_socket_close(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        driver = self._driver
        if driver is not None:
            driver._socket_closing(self, sock)

    def _cb_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            # paho closes the socket next; on_disconnect counts the failure and reschedules.
            level = logging.WARNING if self.backoff.attempt == 0 else logging.DEBUG
            self._log.log(level, "%s: broker refused the connection: %s", self.client_id, reason)
            return
        if self._state is not LinkState.CONNECTING:
            return
        self._state = LinkState.CONNECTED
        self.backoff.reset()
        self.stats.connects += 1
        self._log.debug(
            "%s: connected (session present: %s)", self.client_id, flags.session_present
        )
        self._guard("on_connected", self.handler.on_connected, self, bool(flags.session_present))

    def _cb_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._state is LinkState.CLOSING:
            driver = self._driver
            if driver is not None:
                driver._link_closed(self)
            return
        text = str(reason)
        if flags.is_disconnect_packet_from_server:
            text = f"broker sent DISCONNECT: {text}"
        elif text == "Unspecified error":
            text = "connection lost"
        self._on_down(text)

    def _on_down(self, reason: str) -> None:
        """The socket is gone (driver thread): tell the handler, let the driver reschedule."""
        state = self._state
        if state not in (LinkState.CONNECTING, LinkState.CONNECTED):
            return
        self._state = LinkState.WAITING
        if state is LinkState.CONNECTED:
            self.stats.disconnects += 1
            self._log.info("%s: disconnected: %s", self.client_id, reason)
            self._guard("on_disconnected", self.handler.on_disconnected, self, reason)
        else:
            self.stats.connect_failures += 1
            self._log.log(
                self._failure_level(), "%s: connection attempt failed: %s", self.client_id, reason
            )
        driver = self._driver
        if driver is not None and self._state is LinkState.WAITING:
            driver._link_down(self)

    def _cb_message(self, client: mqtt.Client, userdata: Any, msg: MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._log.warning("%s: dropped a message whose topic is not UTF-8", self.client_id)
            return
        payload = msg.payload
        self.stats.messages_in += 1
        self.stats.bytes_in += len(payload)
        self._guard("on_message", self.handler.on_message, self, topic, payload, bool(msg.retain))

    def _cb_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        if reason.is_failure:
            with _STATS_LOCK:
                self.stats.publish_failures += 1
            self._log.warning("%s: broker rejected publish mid %d: %s", self.client_id, mid, reason)
            return
        self._guard("on_published", self.handler.on_published, self, mid)

    def _cb_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties,
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            self._log.warning("%s: subscription mid %d refused: %s", self.client_id, mid, failed)


def _ignore_socket(client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
    return None
