"""Wire messages of protocol v1: frozen pydantic models with bounded fields.

Every top-level message has ``schema`` = 1 and rejects unknown fields; strings,
lists and numbers are bounded so that a retained piece of garbage or a huge
payload cannot hurt a device.  Datetimes are timezone-aware and normalised to UTC.
The host signs ``DesiredState`` with Ed25519 over ``canonical_bytes``; the agent
checks it with ``verify_desired`` against the pinned host key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    model_validator,
)

from tinyfleet.agent.errors import SignatureError
from tinyfleet.agent.protocol.codec import (
    SCHEMA_VERSION,
    ProtocolError,
    canonical_json,
    rfc3339,
)
from tinyfleet.agent.protocol.states import AgentPhase

__all__ = [
    "ID_PATTERN",
    "MAX_CHUNKS",
    "MAX_CHUNK_REQUEST",
    "MAX_CLASSES",
    "MAX_FEATURES",
    "MAX_JSON_DEPTH",
    "MAX_RECORDS",
    "MESSAGE_TYPES",
    "PROTOCOL_REVISION_FL",
    "ActiveModel",
    "Capabilities",
    "ChunkRequest",
    "DesiredModel",
    "DesiredState",
    "DeviceEvent",
    "DownloadProgress",
    "DriftReport",
    "ErrorCode",
    "EventKind",
    "FLSettings",
    "FLState",
    "FLStatus",
    "Heartbeat",
    "HostEvent",
    "HostPresence",
    "InferenceStats",
    "Message",
    "Presence",
    "ReportedError",
    "ReportedState",
    "SignedDesiredState",
    "TelemetryBatch",
    "TelemetryRecord",
    "TelemetrySettings",
    "canonical_bytes",
    "key_id",
    "sign_desired",
    "verify_desired",
]

# ---------------------------------------------------------------- bounds

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""Fleet and device ids, rollout ids, runtime and profile names: at most 64 characters."""

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
"""Model names, as in the manifest."""

MAX_RECORDS = 500
"""Records in one ``TelemetryBatch``."""
MAX_CLASSES = 256
"""Bins of a prediction histogram."""
MAX_FEATURES = 1024
"""Per-feature drift scores in one ``DriftReport``."""
MAX_CHUNKS = 65536
"""Chunks of one artifact (chunk indexes are 0 .. MAX_CHUNKS - 1)."""
MAX_CHUNK_REQUEST = 1024
"""Chunk indexes in one ``ChunkRequest``."""
MAX_INT = 2**63 - 1
"""Counters fit a signed 64-bit database column."""

# ---------------------------------------------------------------- field types


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[
    AwareDatetime,
    AfterValidator(_to_utc),
    PlainSerializer(rfc3339, return_type=str, when_used="json"),
]
"""A timezone-aware datetime, stored in UTC, written as RFC 3339 with ``Z``."""

MAX_JSON_DEPTH = 32
"""Nesting depth of free-form JSON objects (the manifest, host event payloads)."""


def _plain_json(value: Any, depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("contains a non-finite number (NaN or infinity)")
    if isinstance(value, dict):
        for item in value.values():
            _plain_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _plain_json(item, depth + 1)


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    _plain_json(value)
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_json_object)]
"""A free-form JSON object: finite numbers only, bounded nesting."""

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
ModelRef = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}@[1-9][0-9]{0,18}$")
]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Version = Annotated[int, Field(ge=1, le=MAX_INT)]
Generation = Annotated[int, Field(ge=1, le=MAX_INT)]
Session = Annotated[int, Field(ge=1, le=MAX_INT)]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
ChunkIndex = Annotated[int, Field(ge=0, lt=MAX_CHUNKS)]
Millis = Annotated[float, Field(ge=0.0)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
SoftwareVersion = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")]
Text500 = Annotated[str, StringConstraints(max_length=500)]
Text1000 = Annotated[str, StringConstraints(max_length=1000)]
TopicText = Annotated[str, StringConstraints(max_length=256)]
HostPort = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.:\[\]-]{1,253}:[0-9]{1,5}$")]


# ---------------------------------------------------------------- base classes


class _Part(BaseModel):
    """A nested part of a message: frozen, no unknown fields, finite floats only."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, serialize_by_alias=True
    )


def _required_on_wire(*names: str) -> Callable[[dict[str, Any], type[Any]], None]:
    """A ``json_schema_extra`` hook listing defaulted fields as required in the JSON Schema."""

    def hook(schema: dict[str, Any], cls: type[Any]) -> None:
        required = schema.setdefault("required", [])
        for name in reversed(names):
            if name not in required:
                required.insert(0, name)

    return hook


class Message(_Part):
    """A top-level wire message.  ``schema`` is required on the wire, defaulted in code."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        serialize_by_alias=True,
        json_schema_extra=_required_on_wire("schema"),
    )

    schema_: Literal[1] = Field(
        default=SCHEMA_VERSION,
        alias="schema",
        description="Payload schema version; 1 for everything under tinyfleet/v1/.",
    )


# ---------------------------------------------------------------- desired state


class DesiredModel(_Part):
    """The model a device should run: the signed manifest and which artifact of it."""

    name: ModelName
    version: Version
    manifest: JsonObject = Field(
        description="The signed manifest as JSON ({manifest, signature}); the agent verifies it."
    )
    artifact_sha256: Sha256 = Field(description="Which of the manifest's artifacts to run.")
    rollback: bool = Field(default=False, description="Allows a lower version than the active one.")


class TelemetrySettings(_Part):
    """How often and over what window the agent reports."""

    heartbeat_s: int = Field(default=60, ge=1, le=86400)
    window: int = Field(
        default=256, ge=1, le=1_000_000, description="Inferences per statistics window."
    )


PROTOCOL_REVISION_FL = 2
"""Revision of protocol v1 that added ``FLSettings.run/min_samples/root_certificates``,
``ReportedState.fl`` and the ``fl_*`` device events (docs/protocol.md §11.2)."""

Pem = Annotated[
    str,
    StringConstraints(
        max_length=16384,
        pattern=r"^-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s-]+-----END CERTIFICATE-----\s*$",
    ),
]


SshPublicKey = Annotated[
    str,
    StringConstraints(
        max_length=1000, pattern=r"^ecdsa-sha2-nistp(256|384|521) [A-Za-z0-9+/]+={0,2}( [^\n]*)?$"
    ),
]


class FLSettings(_Part):
    """Federated retraining participation: run a Flower SuperNode against ``superlink``."""

    enabled: bool = False
    superlink: HostPort | None = Field(
        default=None, description="host:port of the Flower SuperLink."
    )
    run: Id | None = Field(
        default=None, description="The host's federated run this participation is for (rev 2)."
    )
    min_samples: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Labelled samples the device needs to take part (rev 2).",
    )
    root_certificates: Pem | None = Field(
        default=None,
        description="PEM root certificate(s) of the SuperLink's TLS; absent: insecure (rev 2).",
    )
    node_auth: bool = Field(
        default=False,
        description="The SuperNode authenticates with the device's own key pair; the agent "
        "reports the public key (FLStatus.public_key) so the host can register it (rev 2).",
    )

    @model_validator(mode="after")
    def _address_when_enabled(self) -> FLSettings:
        if self.enabled and self.superlink is None:
            raise ValueError("superlink is required when enabled")
        return self


class DesiredState(Message):
    """What the host wants one device to run; retained on ``dev/<device>/desired``."""

    device: Id
    generation: Generation = Field(
        description="Monotonic per device, assigned by the host; stale ones are ignored."
    )
    issued_at: UtcDatetime
    model: DesiredModel | None = Field(default=None, description="None: run no model.")
    rollout_id: Id | None = None
    telemetry: TelemetrySettings | None = None
    fl: FLSettings | None = None


class SignedDesiredState(Message):
    """A desired state and the host's Ed25519 signature over its canonical bytes."""

    desired: DesiredState
    key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")] = Field(
        description="First 16 hex of sha256 of the host's raw public key."
    )
    signature: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{86}==$")] = Field(
        description="Base64 of the 64-byte Ed25519 signature over canonical_bytes(desired)."
    )


def canonical_bytes(desired: DesiredState) -> bytes:
    """The exact bytes signed for a desired state: sorted-key compact JSON, ``None`` left out."""
    return canonical_json(desired.model_dump(mode="json", by_alias=True, exclude_none=True))


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of the sha256 of the raw public key (as in manifests)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_desired(desired: DesiredState, private_key: Ed25519PrivateKey) -> SignedDesiredState:
    """Sign a desired state with the host's key."""
    signature = private_key.sign(canonical_bytes(desired))
    return SignedDesiredState(
        desired=desired,
        key_id=key_id(private_key.public_key()),
        signature=base64.b64encode(signature).decode("ascii"),
    )


def verify_desired(
    signed: SignedDesiredState, public_key: Ed25519PublicKey, *, device: str | None = None
) -> DesiredState:
    """The desired state if its signature matches the pinned host key.

    Raises ``SignatureError`` on a wrong key id or signature, ``ProtocolError`` if
    ``device`` is given and the desired state is addressed to another device.
    """
    desired = signed.desired
    pinned = key_id(public_key)
    where = f"desired state {desired.device}#{desired.generation}"
    if signed.key_id != pinned:
        raise SignatureError(f"{where} names key {signed.key_id}; the pinned key is {pinned}")
    try:
        raw = base64.b64decode(signed.signature, validate=True)
        public_key.verify(raw, canonical_bytes(desired))
    except (binascii.Error, ValueError, InvalidSignature):
        raise SignatureError(
            f"{where}: signature does not match (tampered, or signed by another key)"
        ) from None
    if device is not None and desired.device != device:
        raise ProtocolError(f"{where} is addressed to {desired.device}, not {device}")
    return desired


# ---------------------------------------------------------------- presence


class Capabilities(_Part):
    """What a device can run."""

    runtimes: Annotated[list[Id], Field(max_length=16)] = Field(
        default_factory=list, description="Inference runtimes installed, e.g. litert, onnxruntime."
    )
    ram_bytes: Count = 0
    protocol_revision: int = Field(
        default=1,
        ge=1,
        le=1_000_000,
        description="Newest additive revision of protocol v1 the agent understands.",
    )


class Presence(Message):
    """Birth (``online``) and last will (``offline``); retained on ``dev/<device>/presence``."""

    device: Id
    status: Literal["online", "offline"]
    session: Session = Field(
        description="Incremented on every connection, persisted across agent restarts."
    )
    ts: UtcDatetime
    agent_version: SoftwareVersion
    profile: Id = Field(description="Device profile name, e.g. cortex-m7, rpi4.")
    capabilities: Capabilities = Field(default_factory=Capabilities)
    tags: Annotated[list[Id], Field(max_length=32)] = Field(
        default_factory=list, description="Tags from the device's configuration (rollout targets)."
    )
    groups: Annotated[list[Id], Field(max_length=32)] = Field(
        default_factory=list, description="Groups from the device's configuration."
    )

    def as_will(self) -> Presence:
        """The ``offline`` presence of the same session, registered as the last will."""
        return self.model_copy(update={"status": "offline"})


class HostPresence(Message):
    """The host's birth and last will; retained on ``host/presence``."""

    status: Literal["online", "offline"]
    session: Session
    ts: UtcDatetime
    version: SoftwareVersion


# ---------------------------------------------------------------- reported state


class ErrorCode(StrEnum):
    """Why the agent could not bring a desired state into service."""

    SIGNATURE = "signature"
    DIGEST = "digest"
    EXPIRED = "expired"
    DOWNGRADE = "downgrade"
    HEALTH_CHECK = "health_check"
    LOAD = "load"
    NO_FIT = "no_fit"
    DOWNLOAD_TIMEOUT = "download_timeout"
    BAD_MESSAGE = "bad_message"
    STORAGE = "storage"
    INTERNAL = "internal"


class ActiveModel(_Part):
    """A model installed in one of the two slots."""

    name: ModelName
    version: Version
    sha256: Sha256
    slot: Literal["a", "b"]
    since: UtcDatetime


class ReportedError(_Part):
    """The last failure, with the generation it concerns."""

    code: ErrorCode
    message: Text500
    generation: Count | None = None


class DownloadProgress(_Part):
    """Chunks of the artifact being downloaded that are verified on disk."""

    sha256: Sha256
    received_chunks: Annotated[int, Field(ge=0, le=MAX_CHUNKS)]
    total_chunks: Annotated[int, Field(ge=1, le=MAX_CHUNKS)]

    @model_validator(mode="after")
    def _bounded(self) -> DownloadProgress:
        if self.received_chunks > self.total_chunks:
            raise ValueError("received_chunks exceeds total_chunks")
        return self


class FLState(StrEnum):
    """Where the device's federated-retraining participation is."""

    DISABLED = "disabled"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    REFUSED = "refused"


class FLStatus(_Part):
    """The device's SuperNode as its supervisor sees it (rev 2)."""

    state: FLState
    reason: Text500 | None = Field(
        default=None, description="Why it is refused or restarting; absent otherwise."
    )
    run: Id | None = Field(default=None, description="The run named by the desired state.")
    samples: Count | None = Field(
        default=None, description="Labelled samples in the device's buffer (absent: unknown)."
    )
    restarts: Count = Field(default=0, description="Times the SuperNode was restarted.")
    public_key: SshPublicKey | None = Field(
        default=None,
        description="The device's SuperNode public key (OpenSSH), when node_auth is asked for.",
    )


class ReportedState(Message):
    """What a device actually runs; retained on ``dev/<device>/reported``."""

    device: Id
    session: Session
    ts: UtcDatetime
    generation: Count = Field(
        description="Last desired generation processed (0: none yet), successful or not."
    )
    phase: AgentPhase
    active: ActiveModel | None = None
    previous: ActiveModel | None = None
    error: ReportedError | None = None
    rejected_messages: Count = 0
    progress: DownloadProgress | None = None
    fl: FLStatus | None = Field(
        default=None, description="Federated-retraining participation (rev 2); absent: none."
    )


# ---------------------------------------------------------------- telemetry


class _Record(_Part):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        serialize_by_alias=True,
        json_schema_extra=_required_on_wire("kind"),
    )

    session: Session = Field(description="Session the record was produced in.")
    seq: Count = Field(description="Per-device monotonic sequence number, persisted.")
    ts: UtcDatetime


class Heartbeat(_Record):
    """Liveness and counters, every ``heartbeat_s``."""

    kind: Literal["heartbeat"] = "heartbeat"
    uptime_s: Annotated[float, Field(ge=0.0)]
    model: ModelRef | None = Field(default=None, description="name@version being served.")
    inference_count: Count = 0
    latency_p50_ms: Millis | None = None
    latency_p99_ms: Millis | None = None
    prediction_hist: Annotated[list[Count], Field(max_length=MAX_CLASSES)] = Field(
        default_factory=list
    )
    rejected_messages: Count = 0
    spool_dropped: Count = 0
    rss_bytes: Count = 0


class InferenceStats(_Record):
    """Inference counts, latency and prediction distribution over one window."""

    kind: Literal["inference"] = "inference"
    model: ModelRef | None = Field(default=None, description="name@version that served the window.")
    window: Count = Field(description="Window sequence number since the model was activated.")
    count: Count
    latency_p50_ms: Millis
    latency_p99_ms: Millis
    prediction_hist: Annotated[list[Count], Field(max_length=MAX_CLASSES)] = Field(
        default_factory=list
    )
    mean_confidence: Unit | None = None


class DriftReport(_Record):
    """Drift scores of one window against the version's reference profile."""

    kind: Literal["drift"] = "drift"
    model: ModelName
    version: Version
    window: Count
    n: Annotated[int, Field(ge=1, le=MAX_INT)] = Field(description="Samples in the window.")
    psi: Annotated[list[Annotated[float, Field(ge=0.0)]], Field(max_length=MAX_FEATURES)] = Field(
        description="Population stability index per feature."
    )
    ks: Annotated[list[Unit], Field(max_length=MAX_FEATURES)] = Field(
        description="Kolmogorov-Smirnov statistic per feature."
    )
    js_prediction: Unit = Field(description="Jensen-Shannon distance of the prediction mix.")
    mean_confidence: Unit
    confidence_shift: Annotated[float, Field(ge=-1.0, le=1.0)] = Field(
        description="Mean confidence minus the reference's."
    )

    @model_validator(mode="after")
    def _per_feature(self) -> DriftReport:
        if len(self.psi) != len(self.ks):
            raise ValueError(f"psi has {len(self.psi)} features, ks has {len(self.ks)}")
        return self


TelemetryRecord = Annotated[Heartbeat | InferenceStats | DriftReport, Field(discriminator="kind")]


class TelemetryBatch(Message):
    """Telemetry records, possibly spooled from earlier sessions; on ``dev/<device>/telemetry``."""

    device: Id
    session: Session = Field(description="The session that publishes the batch.")
    records: Annotated[list[TelemetryRecord], Field(min_length=1, max_length=MAX_RECORDS)]

    @model_validator(mode="after")
    def _no_future_sessions(self) -> TelemetryBatch:
        for i, record in enumerate(self.records):
            if record.session > self.session:
                raise ValueError(
                    f"records.{i}: session {record.session} is later than the batch's "
                    f"{self.session}"
                )
        return self


# ---------------------------------------------------------------- events and requests


class EventKind(StrEnum):
    """Notable things that happen on a device."""

    AGENT_STARTED = "agent_started"
    MESSAGE_REJECTED = "message_rejected"
    ACTIVATED = "activated"
    ACTIVATION_FAILED = "activation_failed"
    ROLLED_BACK = "rolled_back"
    NO_FIT = "no_fit"
    DOWNLOAD_FAILED = "download_failed"
    CHUNK_REQUESTED = "chunk_requested"
    FL_STARTED = "fl_started"
    FL_STOPPED = "fl_stopped"
    FL_EXITED = "fl_exited"
    FL_REFUSED = "fl_refused"
    DRIFT_DISABLED = "drift_disabled"


class DeviceEvent(Message):
    """One event on ``dev/<device>/events``."""

    device: Id
    session: Session
    seq: Count
    ts: UtcDatetime
    kind: EventKind
    detail: Text1000 = ""
    topic: TopicText | None = Field(
        default=None, description="The topic concerned, e.g. of a rejected message."
    )


class ChunkRequest(Message):
    """Asks the host to publish these retained chunks again; on ``dev/<device>/artifact/req``."""

    device: Id
    sha256: Sha256
    chunks: Annotated[list[ChunkIndex], Field(min_length=1, max_length=MAX_CHUNK_REQUEST)]

    @model_validator(mode="after")
    def _unique(self) -> ChunkRequest:
        if len(set(self.chunks)) != len(self.chunks):
            raise ValueError("chunks has repeated indexes")
        return self


class HostEvent(Message):
    """Host notifications (alerts, rollout changes) on ``host/events``; reserved."""

    kind: Id
    ts: UtcDatetime
    payload: JsonObject = Field(default_factory=dict)


MESSAGE_TYPES: tuple[type[Message], ...] = (
    DesiredState,
    SignedDesiredState,
    ReportedState,
    Presence,
    TelemetryBatch,
    DeviceEvent,
    ChunkRequest,
    HostPresence,
    HostEvent,
)
"""Every top-level message type, in the order the specification lists them."""
