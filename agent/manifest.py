"""Signed model manifests: the schema, the exact bytes that are signed, and verification.

The host signs a ``Manifest`` with its Ed25519 key; a device holds the host's public
key (pinned at provisioning) and refuses anything that fails ``verify_manifest``
(schema, key id, signature, validity period, version monotonicity) or
``verify_artifact`` / ``verify_chunk`` (size and sha256 of the bytes it received).

Only pydantic and cryptography are imported: this module runs on devices.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tinyfleet.agent.canonical import canonical_json as _canonical_json
from tinyfleet.agent.canonical import rfc3339
from tinyfleet.agent.errors import (
    ConfigError,
    DigestMismatchError,
    DowngradeError,
    ExpiredManifestError,
    ManifestError,
    ModelFileError,
    SignatureError,
)

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_CLOCK_SKEW",
    "MODEL_NAME_RE",
    "Manifest",
    "ManifestArtifact",
    "ReferenceRef",
    "SignedManifest",
    "TensorSpecModel",
    "canonical_bytes",
    "canonical_json",
    "chunk_hashes",
    "digest",
    "key_id",
    "load_public_key",
    "parse_signed_manifest",
    "public_key_bytes",
    "verify_artifact",
    "verify_chunk",
    "verify_manifest",
]

CHUNK_SIZE = 16 * 1024
"""Default chunk size of an artifact download, in bytes."""

DEFAULT_CLOCK_SKEW = timedelta(minutes=5)
"""How far a device clock may be off when the validity period is checked."""

MODEL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""A model name (full match)."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_READ_BLOCK = 1024 * 1024


def _check_sha256(value: str) -> str:
    if not _HEX64.fullmatch(value):
        raise ValueError("must be 64 lowercase hex characters (a sha256 digest)")
    return value


Sha256Hex = Annotated[str, AfterValidator(_check_sha256)]


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpecModel(_Frozen):
    """Shape, dtype and (for quantized tensors) quantization parameters of one tensor."""

    shape: list[int]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None

    @field_validator("scale")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class ManifestArtifact(_Frozen):
    """One model file a device may download: its digests, runtime and resource needs."""

    kind: Literal["model"] = "model"
    format: Literal["tflite", "onnx"]
    precision: Literal["float32", "int8"]
    sha256: Sha256Hex
    size: int = Field(gt=0)
    runtime: str = Field(min_length=1)
    input: TensorSpecModel
    output: TensorSpecModel
    chunk_size: int = Field(gt=0)
    chunks: list[Sha256Hex]
    arena_bytes: int | None = Field(default=None, ge=0)
    min_ram_bytes: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _chunk_count(self) -> ManifestArtifact:
        want = math.ceil(self.size / self.chunk_size)
        if len(self.chunks) != want:
            raise ValueError(
                f"chunks has {len(self.chunks)} entries; size {self.size} in chunks of "
                f"{self.chunk_size} needs {want}"
            )
        return self

    def chunk_length(self, index: int) -> int:
        """Byte length of chunk ``index`` (the last one may be shorter)."""
        if not 0 <= index < len(self.chunks):
            raise ManifestError(f"chunk index {index} is out of range 0..{len(self.chunks) - 1}")
        return min(self.chunk_size, self.size - index * self.chunk_size)


class ReferenceRef(_Frozen):
    """The blob holding the drift reference profile and the health-check inputs."""

    sha256: Sha256Hex
    size: int = Field(gt=0)


class Manifest(_Frozen):
    """What the host promises about one model version; signed as ``canonical_bytes``.

    The schema number is ``schema`` on the wire and ``schema_`` in Python.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True
    )

    schema_: Literal[1] = Field(default=1, alias="schema")
    model: str
    version: int = Field(ge=1)
    created: UtcDatetime
    expires: UtcDatetime
    preprocess: str
    classes: list[str]
    artifacts: list[ManifestArtifact] = Field(min_length=1)
    reference: ReferenceRef
    lineage_sha256: Sha256Hex
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not MODEL_NAME_RE.fullmatch(value):
            raise ValueError("must match [a-z0-9][a-z0-9._-]{0,63}")
        return value

    @model_validator(mode="after")
    def _period(self) -> Manifest:
        if self.expires <= self.created:
            raise ValueError("expires must be later than created")
        return self


class SignedManifest(_Frozen):
    """A manifest and the base64 Ed25519 signature over its canonical bytes."""

    manifest: Manifest
    signature: str = Field(min_length=1)


# ---------------------------------------------------------------- canonical form


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON (``tinyfleet.agent.canonical``); ``ManifestError`` if impossible."""
    try:
        return _canonical_json(value)
    except ValueError as exc:
        raise ManifestError(f"value cannot be written as canonical JSON: {exc}") from None


def canonical_bytes(manifest: Manifest) -> bytes:
    """The exact bytes that are signed: ``canonical_json`` of the manifest's fields."""
    return canonical_json(manifest.model_dump(mode="python", by_alias=True))


# ---------------------------------------------------------------- keys


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    """The raw 32-byte form of an Ed25519 public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: bytes | Ed25519PublicKey) -> str:
    """First 16 hex characters of the sha256 of the raw 32-byte public key."""
    raw = public_key if isinstance(public_key, bytes) else public_key_bytes(public_key)
    if len(raw) != 32:
        raise ConfigError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(data: bytes | str | Path | Ed25519PublicKey) -> Ed25519PublicKey:
    """Load an Ed25519 public key from PEM or base64 of the raw 32 bytes.

    A ``Path`` is read from disk; ``str`` and ``bytes`` are the key text itself
    (raw 32 bytes are accepted too).  Anything else raises ``ConfigError``.
    """
    if isinstance(data, Ed25519PublicKey):
        return data
    where = "public key"
    if isinstance(data, Path):
        where = f"public key file {data}"
        try:
            data = data.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from exc
    raw = data.encode("utf-8") if isinstance(data, str) else data
    text = raw.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError as exc:
            raise ConfigError(f"{where} is not a valid PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{where} is a {type(key).__name__}, not an Ed25519 key")
        return key
    if len(raw) == 32 and not _looks_base64(raw):
        key_raw = raw
    else:
        try:
            key_raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"{where} is neither PEM nor base64: {exc}") from exc
    if len(key_raw) != 32:
        raise ConfigError(f"{where} decodes to {len(key_raw)} bytes; an Ed25519 key has 32")
    return Ed25519PublicKey.from_public_bytes(key_raw)


def _looks_base64(raw: bytes) -> bool:
    return re.fullmatch(rb"[A-Za-z0-9+/=\s]+", raw) is not None


# ---------------------------------------------------------------- manifests


def _first_problem(exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(part) for part in first.get("loc", ())) or "document"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{loc}: {first.get('msg', 'invalid')}{more}"


def parse_signed_manifest(data: SignedManifest | bytes | str | dict[str, Any]) -> SignedManifest:
    """Parse a signed manifest from JSON (or a dict) without checking the signature."""
    if isinstance(data, SignedManifest):
        return data
    try:
        if isinstance(data, dict):
            return SignedManifest.model_validate(data)
        return SignedManifest.model_validate_json(data)
    except ValidationError as exc:
        raise ManifestError(f"invalid manifest: {_first_problem(exc)}") from None


def verify_manifest(
    signed: SignedManifest | bytes | str | dict[str, Any],
    public_key: Ed25519PublicKey | bytes | str | Path,
    *,
    now: datetime | None = None,
    min_version: int | None = None,
    allow_rollback: bool = False,
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
) -> Manifest:
    """Check a signed manifest against the pinned key and return the manifest.

    Checks, in order: schema (``ManifestError``), key id and signature
    (``SignatureError``), ``created <= now < expires`` within ``clock_skew``
    (``ExpiredManifestError``), and ``version >= min_version`` unless
    ``allow_rollback`` (``DowngradeError``).
    """
    parsed = parse_signed_manifest(signed)
    manifest = parsed.manifest
    key = load_public_key(public_key)
    pinned = key_id(key)
    if manifest.key_id != pinned:
        raise SignatureError(
            f"{manifest.model} v{manifest.version} names signing key {manifest.key_id}; "
            f"the pinned key is {pinned}"
        )
    try:
        signature = base64.b64decode(parsed.signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(
            f"{manifest.model} v{manifest.version}: signature is not valid base64"
        ) from None
    try:
        key.verify(signature, canonical_bytes(manifest))
    except InvalidSignature:
        raise SignatureError(
            f"{manifest.model} v{manifest.version}: signature does not match the manifest "
            f"(tampered, or signed by another key)"
        ) from None
    if now is not None and now.tzinfo is None:
        raise ManifestError("now must be a timezone-aware datetime")
    when = _to_utc(now) if now is not None else datetime.now(UTC)
    if when + clock_skew < manifest.created:
        raise ExpiredManifestError(
            f"{manifest.model} v{manifest.version} is not valid before "
            f"{rfc3339(manifest.created)} (now {rfc3339(when)})"
        )
    if when - clock_skew >= manifest.expires:
        raise ExpiredManifestError(
            f"{manifest.model} v{manifest.version} expired at {rfc3339(manifest.expires)} "
            f"(now {rfc3339(when)})"
        )
    if min_version is not None and manifest.version < min_version and not allow_rollback:
        raise DowngradeError(
            f"{manifest.model} v{manifest.version} is older than v{min_version}; "
            f"a rollback must be explicit"
        )
    return manifest


# ---------------------------------------------------------------- artifacts


def _blocks(data: bytes | Path, size: int = _READ_BLOCK) -> Iterator[bytes]:
    if isinstance(data, Path):
        try:
            with data.open("rb") as fh:
                while block := fh.read(size):
                    yield block
        except OSError as exc:
            raise ModelFileError(f"cannot read {data}: {exc.strerror or exc}") from exc
    else:
        view = memoryview(data)
        for start in range(0, len(view), size):
            yield bytes(view[start : start + size])


def _size_of(data: bytes | Path) -> int:
    if isinstance(data, Path):
        try:
            return data.stat().st_size
        except OSError as exc:
            raise ModelFileError(f"cannot read {data}: {exc.strerror or exc}") from exc
    return len(data)


def digest(data: bytes | Path) -> tuple[str, int]:
    """sha256 hex digest and byte size of bytes or a file (read in blocks)."""
    h = hashlib.sha256()
    n = 0
    for block in _blocks(data):
        h.update(block)
        n += len(block)
    return h.hexdigest(), n


def chunk_hashes(data: bytes | Path, chunk_size: int = CHUNK_SIZE) -> list[str]:
    """sha256 of each ``chunk_size`` piece of the data (the last may be shorter)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return [hashlib.sha256(block).hexdigest() for block in _blocks(data, chunk_size)]


def verify_artifact(artifact: ManifestArtifact, data: bytes | Path) -> None:
    """Check the size, then the sha256, of an artifact's bytes or file.

    Raises ``DigestMismatchError`` on a mismatch, ``ModelFileError`` if the file
    cannot be read.  Files are hashed in blocks (bounded memory).
    """
    name = str(data) if isinstance(data, Path) else "artifact bytes"
    size = _size_of(data)
    if size != artifact.size:
        raise DigestMismatchError(
            f"{name}: size {size} differs from the manifest's {artifact.size} "
            f"({artifact.format}/{artifact.precision})"
        )
    sha, read = digest(data)
    if read != artifact.size:
        raise DigestMismatchError(f"{name}: changed while being read ({read} bytes read)")
    if sha != artifact.sha256:
        raise DigestMismatchError(
            f"{name}: sha256 {sha} differs from the manifest's {artifact.sha256} "
            f"({artifact.format}/{artifact.precision})"
        )


def verify_chunk(artifact: ManifestArtifact, index: int, data: bytes) -> None:
    """Check one downloaded chunk's length and sha256 against the manifest."""
    want = artifact.chunk_length(index)
    if len(data) != want:
        raise DigestMismatchError(
            f"chunk {index} of {artifact.sha256[:12]} has {len(data)} bytes; expected {want}"
        )
    sha = hashlib.sha256(data).hexdigest()
    if sha != artifact.chunks[index]:
        raise DigestMismatchError(
            f"chunk {index} of {artifact.sha256[:12]}: sha256 {sha[:12]}… differs from "
            f"the manifest's {artifact.chunks[index][:12]}…"
        )
