"""The MQTT topic tree of protocol v1; the only place the ``tinyfleet/v1/`` prefix is written.

``Topics(fleet)`` builds topic names and subscription filters; ``Topics.parse``
turns a received topic back into a ``ParsedTopic`` and rejects anything that is not
exactly one of the names it builds.  ``TOPIC_SPECS`` holds QoS, retain flag,
publisher and payload type of each kind of topic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from tinyfleet.agent.protocol.codec import MAX_MESSAGE_BYTES, ProtocolError, decode
from tinyfleet.agent.protocol.messages import (
    ID_PATTERN,
    MAX_CHUNKS,
    ChunkRequest,
    DeviceEvent,
    HostEvent,
    HostPresence,
    Message,
    Presence,
    ReportedState,
    SignedDesiredState,
    TelemetryBatch,
)

__all__ = [
    "MAX_TOPIC_CHARS",
    "PREFIX_ROOT",
    "TOPIC_SPECS",
    "ParsedTopic",
    "TopicKind",
    "TopicSpec",
    "Topics",
    "decode_message",
    "parse_topic",
    "validate_id",
]

PREFIX_ROOT = "tinyfleet/v1"
"""Protocol name and major version; a breaking change moves to ``tinyfleet/v2``."""

MAX_TOPIC_CHARS = 256
"""Longest topic name ``parse`` considers."""

_ID = re.compile(ID_PATTERN)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_INDEX = re.compile(r"^(0|[1-9][0-9]{0,5})$")


class TopicKind(StrEnum):
    """The kinds of topic in the tree."""

    DESIRED = "desired"
    REPORTED = "reported"
    PRESENCE = "presence"
    TELEMETRY = "telemetry"
    EVENTS = "events"
    CHUNK_REQUEST = "chunk_request"
    CHUNK = "chunk"
    HOST_PRESENCE = "host_presence"
    HOST_EVENTS = "host_events"


@dataclass(frozen=True)
class TopicSpec:
    """How one kind of topic is used."""

    pattern: str  # below the fleet prefix; <device>, <sha256>, <index> are placeholders
    publisher: str  # "host" or "device"
    qos: int
    retain: bool
    payload: type[Message] | None  # None: raw artifact bytes


TOPIC_SPECS: dict[TopicKind, TopicSpec] = {
    TopicKind.DESIRED: TopicSpec("dev/<device>/desired", "host", 1, True, SignedDesiredState),
    TopicKind.REPORTED: TopicSpec("dev/<device>/reported", "device", 1, True, ReportedState),
    TopicKind.PRESENCE: TopicSpec("dev/<device>/presence", "device", 1, True, Presence),
    TopicKind.TELEMETRY: TopicSpec("dev/<device>/telemetry", "device", 1, False, TelemetryBatch),
    TopicKind.EVENTS: TopicSpec("dev/<device>/events", "device", 1, False, DeviceEvent),
    TopicKind.CHUNK_REQUEST: TopicSpec(
        "dev/<device>/artifact/req", "device", 1, False, ChunkRequest
    ),
    TopicKind.CHUNK: TopicSpec("art/<sha256>/<index>", "host", 1, True, None),
    TopicKind.HOST_PRESENCE: TopicSpec("host/presence", "host", 1, True, HostPresence),
    TopicKind.HOST_EVENTS: TopicSpec("host/events", "host", 1, False, HostEvent),
}

_DEVICE_LEAVES = {
    ("desired",): TopicKind.DESIRED,
    ("reported",): TopicKind.REPORTED,
    ("presence",): TopicKind.PRESENCE,
    ("telemetry",): TopicKind.TELEMETRY,
    ("events",): TopicKind.EVENTS,
    ("artifact", "req"): TopicKind.CHUNK_REQUEST,
}
_HOST_LEAVES = {"presence": TopicKind.HOST_PRESENCE, "events": TopicKind.HOST_EVENTS}


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid fleet or device id, else raise ``ProtocolError``.

    Ids are 1-64 characters of ``[A-Za-z0-9._-]`` starting with a letter or digit, so
    they never contain MQTT wildcards (``+`` ``#``), level separators or NUL.
    """
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(
            f"invalid {what} {value!r}: use 1-64 characters of A-Z a-z 0-9 . _ - "
            f"starting with a letter or digit"
        )
    return value


def _validate_sha256(value: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ProtocolError(f"invalid sha256 {value!r}: expected 64 lowercase hex characters")
    return value


def _validate_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_CHUNKS:
        raise ProtocolError(f"invalid chunk index {index!r}: expected 0..{MAX_CHUNKS - 1}")
    return index


@dataclass(frozen=True)
class ParsedTopic:
    """A received topic, taken apart."""

    kind: TopicKind
    fleet: str
    device: str | None = None
    sha256: str | None = None
    index: int | None = None

    @property
    def spec(self) -> TopicSpec:
        """QoS, retain flag, publisher and payload type of this topic."""
        return TOPIC_SPECS[self.kind]


def parse_topic(topic: str) -> ParsedTopic:
    """Take apart a topic of any fleet; ``ProtocolError`` unless it is exactly a v1 topic."""
    if not isinstance(topic, str) or len(topic) > MAX_TOPIC_CHARS:
        raise ProtocolError("invalid topic: not a string of at most 256 characters")
    if any(c in topic for c in "+#\x00"):
        raise ProtocolError(f"invalid topic {topic!r}: contains a wildcard or NUL")
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "tinyfleet" or parts[1] != "v1":
        raise ProtocolError(f"invalid topic {topic!r}: not under {PREFIX_ROOT}/<fleet>/")
    fleet = parts[2]
    if not _ID.fullmatch(fleet):
        raise ProtocolError(f"invalid topic {topic!r}: bad fleet id")
    head, rest = parts[3], parts[4:]
    if head == "dev":
        device, leaf = rest[0], tuple(rest[1:])
        kind = _DEVICE_LEAVES.get(leaf)
        if kind is None:
            raise ProtocolError(f"invalid topic {topic!r}: unknown device topic")
        if not _ID.fullmatch(device):
            raise ProtocolError(f"invalid topic {topic!r}: bad device id")
        return ParsedTopic(kind, fleet, device=device)
    if head == "art" and len(rest) == 2:
        sha256, index = rest
        if not _SHA256.fullmatch(sha256):
            raise ProtocolError(f"invalid topic {topic!r}: bad sha256")
        if not _INDEX.fullmatch(index) or int(index) >= MAX_CHUNKS:
            raise ProtocolError(f"invalid topic {topic!r}: bad chunk index")
        return ParsedTopic(TopicKind.CHUNK, fleet, sha256=sha256, index=int(index))
    if head == "host" and len(rest) == 1 and rest[0] in _HOST_LEAVES:
        return ParsedTopic(_HOST_LEAVES[rest[0]], fleet)
    raise ProtocolError(f"invalid topic {topic!r}: unknown topic")


def decode_message(
    parsed: ParsedTopic,
    payload: bytes | bytearray | memoryview,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Message:
    """Decode the JSON payload of a parsed topic with the type its spec names.

    For device topics the message's ``device`` field must match the topic's device
    (for a desired state: the ``device`` of its inner ``desired``).  Chunk topics
    carry raw bytes and raise ``ProtocolError`` here.
    """
    kind = parsed.spec.payload
    if kind is None:
        raise ProtocolError(f"{parsed.kind.value} topics carry raw bytes, not a JSON message")
    msg = decode(kind, payload, max_bytes=max_bytes)
    if parsed.device is not None:
        named: str | None = None
        if isinstance(msg, SignedDesiredState):
            named = msg.desired.device
        elif isinstance(
            msg, ReportedState | Presence | TelemetryBatch | DeviceEvent | ChunkRequest
        ):
            named = msg.device
        if named != parsed.device:
            raise ProtocolError(
                f"invalid {kind.__name__}: names device {named} but arrived on the topic of "
                f"{parsed.device}"
            )
    return msg


class Topics:
    """Topic names and filters of one fleet."""

    def __init__(self, fleet: str) -> None:
        self.fleet = validate_id(fleet, "fleet id")
        self.prefix = f"{PREFIX_ROOT}/{fleet}/"

    def __repr__(self) -> str:
        return f"Topics({self.fleet!r})"

    def _dev(self, device: str, leaf: str) -> str:
        return f"{self.prefix}dev/{validate_id(device, 'device id')}/{leaf}"

    # ---- device topics
    def desired(self, device: str) -> str:
        """Retained ``SignedDesiredState`` for one device (host publishes)."""
        return self._dev(device, "desired")

    def reported(self, device: str) -> str:
        """Retained ``ReportedState`` of one device (device publishes)."""
        return self._dev(device, "reported")

    def presence(self, device: str) -> str:
        """Retained ``Presence`` birth and last will of one device."""
        return self._dev(device, "presence")

    def telemetry(self, device: str) -> str:
        """``TelemetryBatch`` stream of one device."""
        return self._dev(device, "telemetry")

    def events(self, device: str) -> str:
        """``DeviceEvent`` stream of one device."""
        return self._dev(device, "events")

    def chunk_request(self, device: str) -> str:
        """``ChunkRequest`` of one device."""
        return self._dev(device, "artifact/req")

    # ---- artifacts
    def chunk(self, sha256: str, index: int) -> str:
        """Retained raw bytes of chunk ``index`` of artifact ``sha256``."""
        return f"{self.prefix}art/{_validate_sha256(sha256)}/{_validate_index(index)}"

    def chunk_filter(self, sha256: str) -> str:
        """Every chunk of one artifact."""
        return f"{self.prefix}art/{_validate_sha256(sha256)}/+"

    # ---- host
    def host_presence(self) -> str:
        """Retained ``HostPresence``."""
        return f"{self.prefix}host/presence"

    def host_events(self) -> str:
        """``HostEvent`` stream."""
        return f"{self.prefix}host/events"

    # ---- filters the host subscribes to
    def reported_filter(self) -> str:
        """``ReportedState`` of every device."""
        return f"{self.prefix}dev/+/reported"

    def presence_filter(self) -> str:
        """``Presence`` of every device."""
        return f"{self.prefix}dev/+/presence"

    def telemetry_filter(self) -> str:
        """Telemetry of every device."""
        return f"{self.prefix}dev/+/telemetry"

    def events_filter(self) -> str:
        """Events of every device."""
        return f"{self.prefix}dev/+/events"

    def chunk_request_filter(self) -> str:
        """Chunk requests of every device."""
        return f"{self.prefix}dev/+/artifact/req"

    def host_subscriptions(self) -> list[tuple[str, int]]:
        """``(filter, qos)`` pairs the host service subscribes to."""
        return [
            (self.presence_filter(), 1),
            (self.reported_filter(), 1),
            (self.telemetry_filter(), 1),
            (self.events_filter(), 1),
            (self.chunk_request_filter(), 1),
        ]

    def device_subscriptions(self, device: str) -> list[tuple[str, int]]:
        """``(topic, qos)`` pairs an agent subscribes to on connect (chunks come later)."""
        return [(self.desired(device), 1), (self.host_presence(), 1)]

    # ---- parsing
    def parse(self, topic: str, *, device: str | None = None) -> ParsedTopic:
        """Take apart a topic of this fleet.

        ``ProtocolError`` if the topic is malformed, of another fleet, or (when
        ``device`` is given) a device topic of another device.
        """
        parsed = parse_topic(topic)
        if parsed.fleet != self.fleet:
            raise ProtocolError(
                f"topic {topic!r} belongs to fleet {parsed.fleet}, not {self.fleet}"
            )
        if device is not None and parsed.device is not None and parsed.device != device:
            raise ProtocolError(f"topic {topic!r} belongs to device {parsed.device}, not {device}")
        return parsed
