"""Manifests (schema, canonical bytes, signature, expiry, rollback), artifact checks, host keys."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tinyfleet.agent.errors import (
    ConfigError,
    DigestMismatchError,
    DowngradeError,
    ExpiredManifestError,
    ManifestError,
    ModelFileError,
    SignatureError,
)
from tinyfleet.agent.manifest import (
    CHUNK_SIZE,
    Manifest,
    ManifestArtifact,
    ReferenceRef,
    SignedManifest,
    TensorSpecModel,
    canonical_bytes,
    chunk_hashes,
    key_id,
    load_public_key,
    verify_artifact,
    verify_chunk,
    verify_manifest,
)
from tinyfleet.host.errors import KeyError_
from tinyfleet.host.keys import SigningKey, init_keys, load_signing_key

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
DATA = bytes(range(256)) * 150  # 38,400 bytes: 3 chunks of 16 KiB, the last shorter


def make_artifact(data: bytes = DATA, chunk_size: int = CHUNK_SIZE) -> ManifestArtifact:
    spec_in = TensorSpecModel(shape=[1, 64], dtype="int8", scale=0.0235, zero_point=-3)
    spec_out = TensorSpecModel(shape=[1, 4], dtype="int8", scale=1 / 256, zero_point=-128)
    return ManifestArtifact(
        format="tflite",
        precision="int8",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        runtime="litert>=1.2",
        input=spec_in,
        output=spec_out,
        chunk_size=chunk_size,
        chunks=chunk_hashes(data, chunk_size),
        arena_bytes=11_907,
        min_ram_bytes=None,
    )


def make_manifest(key: SigningKey, *, version: int = 3, created: datetime = T0) -> Manifest:
    return Manifest(
        model="vibration",
        version=version,
        created=created,
        expires=created + timedelta(days=30),
        preprocess="vibration-fft-v1",
        classes=["normal", "imbalance", "bearing", "misalignment"],
        artifacts=[make_artifact()],
        reference=ReferenceRef(sha256="ab" * 32, size=1234),
        lineage_sha256="cd" * 32,
        key_id=key.key_id,
    )


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def signed(key: SigningKey) -> SignedManifest:
    return key.sign_manifest(make_manifest(key))


# ---------------------------------------------------------------- canonical form


def test_canonical_bytes_are_sorted_compact_utf8_with_z_datetimes(key: SigningKey) -> None:
    m = make_manifest(key).model_copy(update={"classes": ["normal", "défaut"]})
    raw = canonical_bytes(m)
    text = raw.decode("utf-8")
    assert "défaut" in text  # UTF-8, not \u escapes
    assert " " not in text and "\n" not in text
    assert '"created":"2026-03-01T12:00:00Z"' in text
    assert '"schema":1' in text
    doc = json.loads(raw)
    assert list(doc) == sorted(doc)
    assert list(doc["artifacts"][0]) == sorted(doc["artifacts"][0])
    # the same manifest built with another UTC offset gives the same bytes
    plus2 = T0.astimezone(timezone(timedelta(hours=2)))
    assert canonical_bytes(make_manifest(key, created=plus2)) == canonical_bytes(make_manifest(key))


def test_json_round_trip_keeps_signature_valid(key: SigningKey, signed: SignedManifest) -> None:
    wire = signed.model_dump_json()
    assert '"schema":1' in wire  # the wire name, not the Python attribute name
    back = SignedManifest.model_validate_json(wire)
    assert canonical_bytes(back.manifest) == canonical_bytes(signed.manifest)
    m = verify_manifest(wire, key.public_key_pem, now=T0 + timedelta(days=1))
    assert m == signed.manifest
    # microseconds and floats survive the round trip too
    odd = make_manifest(key, created=T0.replace(microsecond=123456))
    odd_signed = key.sign_manifest(odd)
    assert verify_manifest(odd_signed.model_dump_json(), key.public_key, now=T0 + timedelta(days=1))


# ---------------------------------------------------------------- schema


def test_schema_problems_are_one_line_manifest_errors(
    key: SigningKey, signed: SignedManifest
) -> None:
    doc = json.loads(signed.model_dump_json())
    with pytest.raises(ManifestError, match="invalid manifest"):
        verify_manifest(b"{not json", key.public_key)

    extra = json.loads(json.dumps(doc))
    extra["manifest"]["surprise"] = 1
    with pytest.raises(ManifestError, match=r"manifest\.surprise") as info:
        verify_manifest(json.dumps(extra), key.public_key)
    assert "\n" not in str(info.value)

    bad_sha = json.loads(json.dumps(doc))
    bad_sha["manifest"]["artifacts"][0]["sha256"] = "A" * 64
    with pytest.raises(ManifestError, match="64 lowercase hex"):
        verify_manifest(json.dumps(bad_sha), key.public_key)

    chunks = json.loads(json.dumps(doc))
    chunks["manifest"]["artifacts"][0]["chunks"].pop()
    with pytest.raises(ManifestError, match="chunks has 2 entries"):
        verify_manifest(json.dumps(chunks), key.public_key)

    naive = json.loads(json.dumps(doc))
    naive["manifest"]["created"] = "2026-03-01T12:00:00"
    with pytest.raises(ManifestError, match="created"):
        verify_manifest(json.dumps(naive), key.public_key)

    for name in ("Vibration", "-x", "a" * 65, "a b"):
        bad_name = json.loads(json.dumps(doc))
        bad_name["manifest"]["model"] = name
        with pytest.raises(ManifestError, match="model"):
            verify_manifest(json.dumps(bad_name), key.public_key)

    with pytest.raises(ValueError, match="expires must be later"):
        Manifest.model_validate(
            {**make_manifest(key).model_dump(), "expires": T0 - timedelta(seconds=1)}
        )


def test_chunk_hashes_match_for_bytes_and_files(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(DATA)
    hashes = chunk_hashes(DATA)
    assert hashes == chunk_hashes(path)
    assert len(hashes) == math.ceil(len(DATA) / CHUNK_SIZE) == 3
    assert hashes[2] == hashlib.sha256(DATA[2 * CHUNK_SIZE :]).hexdigest()
    assert chunk_hashes(DATA, 1000)[0] == hashlib.sha256(DATA[:1000]).hexdigest()


# ---------------------------------------------------------------- keys and signature


def test_key_id_and_public_key_forms(key: SigningKey, tmp_path: Path) -> None:
    raw = key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(raw) == hashlib.sha256(raw).hexdigest()[:16] == key.key_id
    pem_file = tmp_path / "host.pub"
    pem_file.write_text(key.public_key_pem)
    for form in (
        key.public_key_pem,
        key.public_key_pem.encode(),
        key.public_key_b64,
        raw,
        pem_file,
    ):
        assert key_id(load_public_key(form)) == key.key_id

    with pytest.raises(ConfigError, match="neither PEM nor base64"):
        load_public_key("this is not a key!")
    with pytest.raises(ConfigError, match="decodes to 16 bytes"):
        load_public_key(base64.b64encode(b"x" * 16).decode())
    with pytest.raises(ConfigError, match="not a valid PEM"):
        load_public_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match="cannot read public key file"):
        load_public_key(tmp_path / "missing.pub")


def test_signature_checks(key: SigningKey, signed: SignedManifest) -> None:
    now = T0 + timedelta(days=1)
    assert verify_manifest(signed, key.public_key, now=now).version == 3

    other = SigningKey.generate()
    with pytest.raises(SignatureError, match="pinned key"):
        verify_manifest(signed, other.public_key, now=now)

    # an attacker re-labels the manifest with the pinned key's id but cannot sign it
    forged = SignedManifest(
        manifest=signed.manifest.model_copy(update={"key_id": other.key_id}),
        signature=signed.signature,
    )
    with pytest.raises(SignatureError, match="does not match"):
        verify_manifest(forged, other.public_key, now=now)

    doc = json.loads(signed.model_dump_json())
    doc["manifest"]["classes"][0] = "all-good"
    with pytest.raises(SignatureError, match="does not match"):
        verify_manifest(json.dumps(doc), key.public_key, now=now)

    doc = json.loads(signed.model_dump_json())
    doc["manifest"]["artifacts"][0]["size"] += 1
    with pytest.raises(SignatureError):
        verify_manifest(json.dumps(doc), key.public_key, now=now)

    bad_b64 = signed.model_copy(update={"signature": "%%%"})
    with pytest.raises(SignatureError, match="base64"):
        verify_manifest(bad_b64, key.public_key, now=now)

    with pytest.raises(KeyError_, match="names key"):
        other.sign_manifest(signed.manifest)


def test_validity_period_and_clock_skew(key: SigningKey, signed: SignedManifest) -> None:
    m = signed.manifest
    verify_manifest(signed, key.public_key, now=m.created)
    verify_manifest(signed, key.public_key, now=m.created - timedelta(minutes=4))  # skew
    with pytest.raises(ExpiredManifestError, match="not valid before"):
        verify_manifest(signed, key.public_key, now=m.created - timedelta(hours=1))
    verify_manifest(signed, key.public_key, now=m.expires + timedelta(minutes=4))
    with pytest.raises(ExpiredManifestError, match="expired at"):
        verify_manifest(signed, key.public_key, now=m.expires + timedelta(minutes=5))
    with pytest.raises(ExpiredManifestError):
        verify_manifest(
            signed, key.public_key, now=m.expires + timedelta(seconds=1), clock_skew=timedelta(0)
        )
    with pytest.raises(ExpiredManifestError):  # default now: the real clock, long after 2026-03-31
        verify_manifest(signed, key.public_key)
    with pytest.raises(ManifestError, match="timezone-aware"):
        verify_manifest(signed, key.public_key, now=datetime(2026, 3, 2))


def test_version_monotonicity(key: SigningKey, signed: SignedManifest) -> None:
    now = T0 + timedelta(days=1)
    assert verify_manifest(signed, key.public_key, now=now, min_version=3).version == 3
    assert verify_manifest(signed, key.public_key, now=now, min_version=2).version == 3
    with pytest.raises(DowngradeError, match="older than v4"):
        verify_manifest(signed, key.public_key, now=now, min_version=4)
    rolled = verify_manifest(signed, key.public_key, now=now, min_version=4, allow_rollback=True)
    assert rolled.version == 3


# ---------------------------------------------------------------- artifacts and chunks


def test_verify_artifact_bytes_and_files(tmp_path: Path) -> None:
    art = make_artifact()
    verify_artifact(art, DATA)
    path = tmp_path / "model.tflite"
    path.write_bytes(DATA)
    verify_artifact(art, path)

    with pytest.raises(DigestMismatchError, match="size 38399 differs"):
        verify_artifact(art, DATA[:-1])
    flipped = bytearray(DATA)
    flipped[20_000] ^= 0x01
    with pytest.raises(DigestMismatchError, match="sha256"):
        verify_artifact(art, bytes(flipped))
    path.write_bytes(bytes(flipped))
    with pytest.raises(DigestMismatchError, match=r"model\.tflite: sha256"):
        verify_artifact(art, path)
    with pytest.raises(ModelFileError, match="cannot read"):
        verify_artifact(art, tmp_path / "gone.tflite")


def test_verify_large_file_streams(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # spans several read blocks
    art = make_artifact(data)
    path = tmp_path / "big.onnx"
    path.write_bytes(data)
    verify_artifact(art, path)
    with path.open("r+b") as fh:
        fh.seek(len(data) - 1)
        fh.write(bytes([data[-1] ^ 0xFF]))
    with pytest.raises(DigestMismatchError):
        verify_artifact(art, path)


def test_verify_chunk() -> None:
    art = make_artifact()
    pieces = [DATA[i : i + CHUNK_SIZE] for i in range(0, len(DATA), CHUNK_SIZE)]
    assert [len(p) for p in pieces] == [16384, 16384, 5632]
    for i, piece in enumerate(pieces):
        verify_chunk(art, i, piece)
    with pytest.raises(DigestMismatchError, match="has 16384 bytes; expected 5632"):
        verify_chunk(art, 2, pieces[0])
    bad = bytearray(pieces[1])
    bad[0] ^= 1
    with pytest.raises(DigestMismatchError, match="chunk 1"):
        verify_chunk(art, 1, bytes(bad))
    with pytest.raises(ManifestError, match="out of range"):
        verify_chunk(art, 3, b"")


def test_manifest_module_stays_light() -> None:
    code = (
        "import sys, tinyfleet.agent.manifest\n"
        "heavy = ('tensorflow', 'sqlalchemy', 'alembic', 'onnxruntime', 'tinyfleet.host')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- host keys


def test_init_keys_writes_0600_private_key_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        pair = init_keys(tmp_path / "keys")
    finally:
        os.umask(old)
    assert stat.S_IMODE(pair.private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pair.public_path.stat().st_mode) == 0o644
    assert pair.private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert key_id(load_public_key(pair.public_path)) == pair.key_id
    assert not [p.name for p in pair.private_path.parent.iterdir() if ".tmp" in p.name]

    signer = load_signing_key(tmp_path / "keys")
    assert signer.key_id == pair.key_id
    assert signer.public_key_pem == pair.public_key_pem
    signed = signer.sign_manifest(make_manifest(signer))
    verify_manifest(signed, pair.public_path, now=T0)


def test_init_keys_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = init_keys(tmp_path)
    with pytest.raises(KeyError_, match="already exists"):
        init_keys(tmp_path)
    assert load_signing_key(tmp_path).key_id == first.key_id
    second = init_keys(tmp_path, force=True)
    assert second.key_id != first.key_id
    assert load_signing_key(tmp_path).key_id == second.key_id
    assert stat.S_IMODE(second.private_path.stat().st_mode) == 0o600


def test_load_signing_key_refusals(tmp_path: Path) -> None:
    with pytest.raises(KeyError_, match="tinyfleet keys init"):
        load_signing_key(tmp_path / "nothing-here")

    pair = init_keys(tmp_path / "k")
    os.chmod(pair.private_path, 0o640)
    with pytest.raises(KeyError_, match=r"group or others \(mode 0640\)"):
        load_signing_key(tmp_path / "k")
    os.chmod(pair.private_path, 0o604)
    with pytest.raises(KeyError_, match="chmod 600"):
        load_signing_key(tmp_path / "k")
    os.chmod(pair.private_path, 0o600)
    load_signing_key(tmp_path / "k")

    pair.private_path.write_bytes(b"garbage")
    with pytest.raises(KeyError_, match="not a valid"):
        load_signing_key(tmp_path / "k")

    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pair.private_path.write_bytes(other)
    with pytest.raises(KeyError_, match="not Ed25519"):
        load_signing_key(tmp_path / "k")


def test_signature_is_plain_ed25519_over_canonical_bytes(tmp_path: Path) -> None:
    """A verifier written against the spec alone (no tinyfleet) accepts the signature."""
    private = Ed25519PrivateKey.generate()
    signer = SigningKey(private)
    signed = signer.sign_manifest(make_manifest(signer))
    doc = json.loads(signed.model_dump_json())
    body = json.dumps(doc["manifest"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    private.public_key().verify(base64.b64decode(doc["signature"]), body.encode("utf-8"))
