"""The model registry on SQLite and PostgreSQL: numbering, aliases, diff, atomicity, integrity."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from tinyfleet.agent.manifest import (
    TensorSpecModel,
    canonical_json,
    chunk_hashes,
    verify_artifact,
    verify_manifest,
)
from tinyfleet.host.db import (
    Base,
    VersionRow,
    current_revision,
    head_revision,
    make_engine,
    upgrade,
)
from tinyfleet.host.errors import (
    DigestMismatchError,
    ExpiredManifestError,
    NotFoundError,
    RegistryError,
    SignatureError,
    StorageError,
)
from tinyfleet.host.keys import SigningKey
from tinyfleet.host.registry import NewArtifact, Registry, VersionInfo

SPEC_IN = TensorSpecModel(shape=[1, 32], dtype="int8", scale=0.05, zero_point=-2)
SPEC_OUT = TensorSpecModel(shape=[1, 3], dtype="int8", scale=1 / 256, zero_point=-128)


def artifact(tmp: Path, name: str, data: bytes, **kw: Any) -> NewArtifact:
    path = tmp / name
    path.write_bytes(data)
    fields: dict[str, Any] = {
        "path": path,
        "format": "tflite",
        "precision": "int8",
        "input": SPEC_IN,
        "output": SPEC_OUT,
        "arena_bytes": 12_000,
        "min_ram_bytes": 64_000,
        "metrics": {"accuracy": 0.93, "p50_ms": 0.4},
    }
    fields.update(kw)
    return NewArtifact(**fields)


def gate(name: str, passed: bool, value: float = 0.9, threshold: float = 0.8) -> dict[str, Any]:
    return {
        "name": name,
        "passed": passed,
        "value": value,
        "threshold": threshold,
        "reason": f"{value} {'>=' if passed else '<'} {threshold}",
    }


def register(
    reg: Registry,
    key: SigningKey,
    tmp: Path,
    *,
    model: str = "vibration",
    data: bytes = b"model-bytes-v1" * 100,
    passed: bool = True,
    seed: int = 1,
    accuracy: float = 0.93,
    parent_version: int | None = None,
    expires_in: timedelta = timedelta(days=365),
    reference: bytes = b"reference-profile",
) -> VersionInfo:
    tmp.mkdir(parents=True, exist_ok=True)
    arts = [
        artifact(tmp, f"{model}-{seed}.tflite", data, metrics={"accuracy": accuracy}),
        artifact(tmp, f"{model}-{seed}.onnx", data[::-1] + b"onnx", format="onnx"),
    ]
    gates = [gate("min_accuracy", passed, accuracy, 0.9), gate("max_bytes", True, 1400, 4096)]
    return reg.register(
        model=model,
        artifacts=arts,
        reference=reference,
        lineage={"recipe": "vibration", "seed": seed, "code_version": "abc123", "data": {"n": 600}},
        metrics={"tflite-int8": {"accuracy": accuracy}},
        gates=gates,
        passed=passed,
        rejection_reasons=[] if passed else [f"min_accuracy: {accuracy} < 0.9"],
        preprocess="vibration-fft-v1",
        classes=["normal", "imbalance", "bearing"],
        signer=key,
        created_by="tester",
        parent_version=parent_version,
        expires_in=expires_in,
    )


def blob_files(reg: Registry) -> set[str]:
    return {p.name for p in reg.blobs.glob("*/*") if not p.name.startswith(".")}


# ---------------------------------------------------------------- numbering, refs, aliases


def test_versions_number_monotonically_per_model(
    registry: Registry, signing_key: SigningKey, tmp_path: Path
) -> None:
    v1 = register(registry, signing_key, tmp_path, seed=1)
    v2 = register(registry, signing_key, tmp_path, seed=2, parent_version=1)
    v3 = register(registry, signing_key, tmp_path, seed=3, passed=False, accuracy=0.5)
    other = register(registry, signing_key, tmp_path, model="digits", seed=1)
    assert [v1.number, v2.number, v3.number, other.number] == [1, 2, 3, 1]
    assert [v.number for v in registry.list_versions("vibration")] == [1, 2, 3]
    assert [v.status for v in registry.list_versions("vibration")] == ["ready", "ready", "rejected"]

    assert v2.parent_version == 1 and v2.seed == 2 and v2.recipe == "vibration"
    assert v2.code_version == "abc123"
    assert v1.created_at.tzinfo is not None
    assert v1.lineage_sha256 == hashlib.sha256(canonical_json(v1.lineage)).hexdigest()
    assert {(a.format, a.precision) for a in v1.artifacts} == {("tflite", "int8"), ("onnx", "int8")}
    assert v1.gates[0].name == "min_accuracy" and v1.gates[0].threshold == 0.9

    models = {m.name: m for m in registry.list_models()}
    assert set(models) == {"digits", "vibration"}
    assert (models["vibration"].versions, models["vibration"].latest) == (3, 3)
    assert models["vibration"].latest_ready == 2

    # "name" alone is the latest *ready* version; rejected ones are reachable by number
    assert registry.get("vibration").number == 2
    rejected = registry.get("vibration@3")
    assert rejected.status == "rejected"
    assert rejected.manifest is None and rejected.manifest_sha256 is None
    assert rejected.rejection_reasons == ["min_accuracy: 0.5 < 0.9"]

    with pytest.raises(RegistryError, match="parent version 9 does not exist"):
        register(registry, signing_key, tmp_path, seed=4, parent_version=9)
    assert register(registry, signing_key, tmp_path, seed=5).number == 4


def test_refs_and_not_found(registry: Registry, signing_key: SigningKey, tmp_path: Path) -> None:
    register(registry, signing_key, tmp_path)
    with pytest.raises(NotFoundError, match="no model named 'nope'"):
        registry.get("nope")
    with pytest.raises(NotFoundError, match="no version 7"):
        registry.get("vibration@7")
    with pytest.raises(NotFoundError, match="no version or alias 'production'"):
        registry.get("vibration@production")
    with pytest.raises(NotFoundError):
        registry.list_versions("nope")
    for bad in ("Vibration", "vibration@", "@3", ""):
        with pytest.raises(RegistryError, match="invalid reference"):
            registry.get(bad)
    register(registry, signing_key, tmp_path, model="only-rejected", passed=False)
    with pytest.raises(NotFoundError, match="no ready version"):
        registry.get("only-rejected")


def test_promote_and_aliases(registry: Registry, signing_key: SigningKey, tmp_path: Path) -> None:
    register(registry, signing_key, tmp_path, seed=1)
    register(registry, signing_key, tmp_path, seed=2)
    register(registry, signing_key, tmp_path, seed=3, passed=False)

    promoted = registry.promote("vibration@1", "production")
    assert promoted.number == 1 and promoted.aliases == ["production"]
    registry.promote("vibration@2", "canary")
    assert registry.get("vibration@production").number == 1
    assert registry.get("vibration@canary").number == 2

    moved = registry.promote("vibration@canary", "production")  # by alias, moves it
    assert moved.number == 2 and moved.aliases == ["canary", "production"]
    assert registry.get("vibration@1").aliases == []
    assert registry.list_models()[0].aliases == {"canary": 2, "production": 2}

    with pytest.raises(RegistryError, match="rejected"):
        registry.promote("vibration@3", "production")
    assert registry.get("vibration@production").number == 2
    for bad in ("Prod", "1st", "prod_1", "x" * 64):
        with pytest.raises(RegistryError, match="invalid alias"):
            registry.promote("vibration@1", bad)


def test_diff(registry: Registry, signing_key: SigningKey, tmp_path: Path) -> None:
    register(registry, signing_key, tmp_path, seed=1, data=b"A" * 500, accuracy=0.93)
    register(
        registry,
        signing_key,
        tmp_path / "b",
        seed=2,
        data=b"B" * 700,
        accuracy=0.71,
        passed=False,
        parent_version=1,
    )
    d = registry.diff("vibration@1", "vibration@2")
    assert set(d) == {"version", "lineage", "metrics", "gates", "artifacts"}
    assert d["version"]["status"] == ["ready", "rejected"]
    assert d["version"]["parent_version"] == [None, 1]
    assert d["lineage"] == {"seed": [1, 2]}  # nested keys that did not change are absent
    assert d["metrics"] == {"tflite-int8.accuracy": [0.93, 0.71]}
    assert d["gates"]["min_accuracy.passed"] == [True, False]
    assert d["gates"]["min_accuracy.value"] == [0.93, 0.71]
    assert "max_bytes.passed" not in d["gates"]
    assert d["artifacts"]["tflite/int8/model.size"] == [500, 700]
    assert d["artifacts"]["tflite/int8/model.metrics.accuracy"] == [0.93, 0.71]
    assert "tflite/int8/model.runtime" not in d["artifacts"]
    json.dumps(d)  # plain JSON for --json output

    same = registry.diff("vibration@1", "vibration@1")
    assert all(section == {} for section in same.values())


# ---------------------------------------------------------------- blobs and manifests


def test_blob_store_is_content_addressed_and_idempotent(registry: Registry, tmp_path: Path) -> None:
    data = b"some artifact bytes" * 50
    sha = hashlib.sha256(data).hexdigest()
    src = tmp_path / "a.bin"
    src.write_bytes(data)
    assert registry.put_blob(data) == (sha, len(data))
    assert registry.put_blob(src) == (sha, len(data))
    path = registry.blob_path(sha)
    assert path == registry.root / "blobs" / "sha256" / sha[:2] / sha
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert blob_files(registry) == {sha}
    assert not list(registry.blobs.glob("*/.tmp-*"))
    with pytest.raises(NotFoundError, match="missing"):
        registry.blob_path("0" * 64)
    with pytest.raises(NotFoundError, match="not a sha256"):
        registry.blob_path("../../etc/passwd")


def test_registered_manifest_verifies_on_the_device_side(
    registry: Registry, signing_key: SigningKey, tmp_path: Path
) -> None:
    v = register(registry, signing_key, tmp_path, data=os.urandom(40_000))
    assert v.manifest is not None and v.expires_at is not None
    m = verify_manifest(v.manifest.model_dump_json(), signing_key.public_key_pem)
    assert (m.model, m.version, m.key_id) == ("vibration", 1, signing_key.key_id)
    assert m.lineage_sha256 == v.lineage_sha256
    assert m.classes == ["normal", "imbalance", "bearing"]
    assert m.expires - m.created == timedelta(days=365)
    assert m.reference.sha256 == hashlib.sha256(b"reference-profile").hexdigest()
    for art in m.artifacts:
        path = registry.blob_path(art.sha256)
        verify_artifact(art, path)
        assert art.chunks == chunk_hashes(path, art.chunk_size)
        assert art.runtime == {"tflite": "litert>=1.2", "onnx": "onnxruntime>=1.16"}[art.format]
    assert len(m.artifacts[0].chunks) == 3  # 40,000 bytes in 16 KiB chunks
    report = registry.verify("vibration@1", signing_key.public_key)
    assert report.ok and report.signed and not report.problems
    assert len(report.checks) == 4  # signature + 2 artifacts + reference


# ---------------------------------------------------------------- atomicity


class ExplodingSigner(SigningKey):
    """Fails inside the registration transaction, after the version row was flushed."""

    def sign_manifest(self, manifest: Any) -> Any:
        raise RuntimeError("power cut while signing")


def test_failure_mid_registration_leaves_no_version(
    registry: Registry, signing_key: SigningKey, tmp_path: Path
) -> None:
    register(registry, signing_key, tmp_path, seed=1, data=b"first" * 100)
    before = blob_files(registry)
    exploding = ExplodingSigner(signing_key._key)
    with pytest.raises(RuntimeError, match="power cut"):
        register(registry, exploding, tmp_path / "x", seed=2, data=b"orphan" * 100)
    assert [v.number for v in registry.list_versions("vibration")] == [1]
    orphans = blob_files(registry) - before
    assert len(orphans) == 2  # both artifact blobs were stored before the transaction
    # a brand-new model's row is rolled back too
    with pytest.raises(RuntimeError):
        register(registry, exploding, tmp_path / "y", model="brand-new", data=b"orphan" * 100)
    assert [m.name for m in registry.list_models()] == ["vibration"]

    v2 = register(registry, signing_key, tmp_path / "z", seed=3, data=b"second" * 100)
    assert v2.number == 2
    assert registry.gc() == 2
    assert blob_files(registry) == {a.sha256 for a in v2.artifacts} | before | {v2.reference.sha256}
    assert registry.gc() == 0
    assert registry.verify("vibration@1", signing_key.public_key).ok
    assert registry.verify("vibration@2", signing_key.public_key).ok


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from cryptography.hazmat.primitives import serialization
    from tinyfleet.agent.manifest import TensorSpecModel
    from tinyfleet.host.keys import SigningKey
    from tinyfleet.host.registry import NewArtifact, Registry

    class Crash(SigningKey):
        def sign_manifest(self, manifest):
            os._exit(17)  # no rollback, no cleanup: the process just dies

    root, url, keyfile, art = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4]
    key = serialization.load_pem_private_key(Path(keyfile).read_bytes(), None)
    spec = TensorSpecModel(shape=[1, 4], dtype="float32")
    reg = Registry(Path(root), url)
    reg.register(
        model="vibration",
        artifacts=[NewArtifact(path=Path(art), format="onnx", precision="float32",
                               input=spec, output=spec)],
        reference=b"crash-reference", lineage={}, metrics={}, gates=[], passed=True,
        rejection_reasons=[], preprocess="identity", classes=[], signer=Crash(key),
        created_by="crash", parent_version=None,
    )
    """
)


def test_process_killed_mid_transaction(
    registry: Registry,
    database_url: str | None,
    signing_key: SigningKey,
    tmp_path: Path,
) -> None:
    from cryptography.hazmat.primitives import serialization

    register(registry, signing_key, tmp_path, seed=1)
    keyfile = tmp_path / "key.pem"
    keyfile.write_bytes(
        signing_key._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    art = tmp_path / "crash.onnx"
    art.write_bytes(b"crash-model" * 10)
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(registry.root),
            database_url or "",
            str(keyfile),
            str(art),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 17, proc.stderr
    assert hashlib.sha256(art.read_bytes()).hexdigest() in blob_files(registry)

    reopened = Registry(registry.root, database_url)  # recovers (SQLite WAL, PostgreSQL rollback)
    try:
        assert [v.number for v in reopened.list_versions("vibration")] == [1]
        assert register(reopened, signing_key, tmp_path, seed=2).number == 2
        assert reopened.gc() == 2  # the crashed artifact and its reference
        assert reopened.verify("vibration@2", signing_key.public_key).ok
    finally:
        reopened.close()


def test_concurrent_registrations_get_distinct_numbers(
    registry: Registry, signing_key: SigningKey, tmp_path: Path
) -> None:
    numbers: list[int] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(3):
                v = register(registry, signing_key, tmp_path / f"w{i}", seed=10 * i + j)
                numbers.append(v.number)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(numbers) == list(range(1, 10))
    assert [v.number for v in registry.list_versions("vibration")] == list(range(1, 10))


# ---------------------------------------------------------------- tampering and expiry


def test_tampered_artifact_blob_is_refused(
    registry: Registry, signing_key: SigningKey, tmp_path: Path
) -> None:
    v = register(registry, signing_key, tmp_path)
    tflite = next(a for a in v.artifacts if a.format == "tflite")
    path = registry.blob_path(tflite.sha256)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[7] ^= 0x40  # same size, one bit different
    path.write_bytes(bytes(data))

    report = registry.verify("vibration@1", signing_key.public_key)
    assert not report.ok
    assert any("tflite/int8" in p and "sha256" in p for p in report.problems), report.problems
    assert len(report.problems) == 1  # the signature, the onnx blob and the reference are fine

    assert v.manifest is not None
    entry = next(a for a in v.manifest.manifest.artifacts if a.format == "tflite")
    with pytest.raises(DigestMismatchError):
        verify_artifact(entry, path)

    path.unlink()
    report = registry.verify("vibration@1", signing_key.public_key)
    assert any("missing" in p for p in report.problems), report.problems


def test_tampered_manifest_in_database_is_refused(
    registry: Registry, signing_key: SigningKey, tmp_path: Path
) -> None:
    register(registry, signing_key, tmp_path)
    with registry.engine.begin() as conn:
        stored = conn.scalar(select(VersionRow.manifest).where(VersionRow.number == 1))
        assert stored is not None
        stored["manifest"]["classes"] = ["normal", "normal", "normal"]
        conn.execute(update(VersionRow).where(VersionRow.number == 1).values(manifest=stored))

    report = registry.verify("vibration@1", signing_key.public_key)
    assert not report.ok
    assert any("signature does not match" in p for p in report.problems), report.problems
    v = registry.get("vibration@1")
    assert v.manifest is not None and v.manifest.manifest.classes[0] == "normal"
    with pytest.raises(SignatureError):
        verify_manifest(v.manifest, signing_key.public_key)

    # swapping an artifact digest in the manifest is caught by the signature and the rows
    stored["manifest"]["classes"] = ["normal", "imbalance", "bearing"]
    stored["manifest"]["artifacts"][0]["sha256"] = "0" * 64
    with registry.engine.begin() as conn:
        conn.execute(update(VersionRow).where(VersionRow.number == 1).values(manifest=stored))
    problems = registry.verify("vibration@1", signing_key.public_key).problems
    assert any("signature" in p for p in problems)
    assert any("differ from the version's artifact rows" in p for p in problems)


def test_expired_manifest_and_wrong_key_are_refused(
    registry: Registry, signing_key: SigningKey, tmp_path: Path
) -> None:
    v = register(registry, signing_key, tmp_path, expires_in=timedelta(seconds=1))
    assert v.manifest is not None
    later = v.created_at + timedelta(hours=1)
    report = registry.verify("vibration@1", signing_key.public_key, now=later)
    assert not report.ok
    assert any("expired" in p for p in report.problems), report.problems
    with pytest.raises(ExpiredManifestError):
        verify_manifest(v.manifest, signing_key.public_key, now=later)
    assert registry.verify("vibration@1", signing_key.public_key, now=v.created_at).ok

    stranger = SigningKey.generate()
    report = registry.verify("vibration@1", stranger.public_key, now=v.created_at)
    assert not report.ok and any("pinned key" in p for p in report.problems)

    with pytest.raises(RegistryError, match="expires_in must be positive"):
        register(registry, signing_key, tmp_path, expires_in=timedelta(0))


def test_rejected_version_is_unsigned_and_verifies_blobs_only(
    registry: Registry, signing_key: SigningKey, tmp_path: Path
) -> None:
    register(registry, signing_key, tmp_path, passed=False)
    report = registry.verify("vibration@1", signing_key.public_key)
    assert report.ok and not report.signed
    assert "can never be rolled out" in report.checks[0]
    sha = registry.get("vibration@1").artifacts[0].sha256
    assert registry.gc() == 0  # rejected versions keep their blobs
    os.chmod(registry.blob_path(sha), 0o644)
    registry.blob_path(sha).write_bytes(b"x")
    assert not registry.verify("vibration@1", signing_key.public_key).ok


# ---------------------------------------------------------------- storage and migrations


def test_schema_after_migrations_matches_the_orm(
    registry: Registry, database_url: str | None
) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    assert current_revision(registry.engine) == head_revision()
    assert head_revision() is not None and int(head_revision() or 0) >= 2
    with registry.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == []
    upgrade(registry.engine)  # idempotent
    again = Registry(registry.root, database_url)
    again.close()
    assert current_revision(registry.engine) == head_revision()


def test_unreachable_postgres_is_a_quick_storage_error(tmp_path: Path) -> None:
    url = "postgresql://fleet:s3cret-pw@127.0.0.1:1/registry"
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        Registry(tmp_path / "reg", url)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "s3cret-pw" not in message
    assert "postgresql://fleet:***@127.0.0.1:1/registry" in message
    assert "\n" not in message


def test_bad_database_urls_are_storage_errors(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="invalid database URL"):
        make_engine("not a url at all")
    with pytest.raises(StorageError, match="unsupported database"):
        make_engine("mysql://root@127.0.0.1/x")
    with pytest.raises(StorageError, match="does not exist"):
        make_engine(f"sqlite:///{tmp_path}/missing-dir/registry.db")


def test_unwritable_root_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="not writable"):
        Registry(blocker / "registry")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o500)
        try:
            with pytest.raises(StorageError, match="not writable"):
                Registry(ro)
        finally:
            os.chmod(ro, 0o700)


@pytest.mark.postgres
def test_postgres_fixture_database_is_fresh(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        assert current_revision(engine) is None
        upgrade(postgres_url)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
