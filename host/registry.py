"""The model registry: versions, lineage, gate results, signed manifests and blobs.

Layout of a registry root::

    registry.db                       the SQLite database (unless a database URL is given)
    blobs/sha256/ab/abcdef…           content-addressed, read-only artifact and reference blobs
    .lock                             held shared while registering, exclusively by gc()

Versions of a model are numbered 1, 2, … in registration order, rejected ones
included.  Only versions that passed their gates get a signed manifest; a
rejected version keeps its blobs, lineage, metrics and reasons for inspection
but can never be verified by a device, so it can never be rolled out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from tinyfleet.agent.manifest import (
    CHUNK_SIZE,
    MODEL_NAME_RE,
    Manifest,
    ManifestArtifact,
    ReferenceRef,
    SignedManifest,
    TensorSpecModel,
    canonical_bytes,
    canonical_json,
    chunk_hashes,
    digest,
    parse_signed_manifest,
    verify_artifact,
    verify_manifest,
)
from tinyfleet.host.db import (
    AliasRow,
    ArtifactRow,
    ModelRow,
    VersionRow,
    default_url,
    make_engine,
    make_sessionmaker,
    storage_errors,
    upgrade,
    utcnow,
    writer,
)
from tinyfleet.host.errors import (
    ManifestError,
    ModelFileError,
    NotFoundError,
    RegistryError,
    StorageError,
    TinyfleetError,
)
from tinyfleet.host.gates import GateResult
from tinyfleet.host.keys import SigningKey

__all__ = [
    "DEFAULT_RUNTIMES",
    "ArtifactInfo",
    "ModelInfo",
    "NewArtifact",
    "Registry",
    "VerifyReport",
    "VersionInfo",
]

DEFAULT_RUNTIMES = {"tflite": "litert>=1.2", "onnx": "onnxruntime>=1.16"}
"""The runtime requirement written into a manifest when an artifact names none."""

ALIAS_RE = re.compile(r"[a-z][a-z0-9-]{0,62}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REGISTER_ATTEMPTS = 5


# ---------------------------------------------------------------- public models


class NewArtifact(BaseModel):
    """A model file to register, with what a device needs to know about it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    format: Literal["tflite", "onnx"]
    precision: Literal["float32", "int8"]
    role: str = "model"
    input: TensorSpecModel
    output: TensorSpecModel
    arena_bytes: int | None = None
    min_ram_bytes: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    runtime: str | None = None
    chunk_size: int = Field(default=CHUNK_SIZE, gt=0)

    @field_validator("input", "output", mode="before")
    @classmethod
    def _spec(cls, value: Any) -> Any:
        """Accept any object with ``shape``/``dtype``/``scale``/``zero_point``."""
        if isinstance(value, (TensorSpecModel, Mapping)):
            return value
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            return {
                "shape": [int(d) for d in value.shape],
                "dtype": str(value.dtype),
                "scale": getattr(value, "scale", None),
                "zero_point": getattr(value, "zero_point", None),
            }
        return value


class ArtifactInfo(BaseModel):
    """One registered artifact."""

    format: str
    precision: str
    role: str
    sha256: str
    size: int
    runtime: str
    input: TensorSpecModel
    output: TensorSpecModel
    arena_bytes: int | None
    min_ram_bytes: int | None
    metrics: dict[str, Any]


class VersionInfo(BaseModel):
    """One registered version, as ``models show`` / ``--json`` present it."""

    model: str
    number: int
    status: Literal["ready", "rejected"]
    aliases: list[str]
    created_at: datetime
    created_by: str
    recipe: str | None
    code_version: str | None
    data_fingerprint: str | None
    seed: int | None
    parent_version: int | None
    lineage: dict[str, Any]
    lineage_sha256: str
    metrics: dict[str, Any]
    gates: list[GateResult]
    rejection_reasons: list[str]
    preprocess: str
    classes: list[str]
    reference: ReferenceRef
    artifacts: list[ArtifactInfo]
    expires_at: datetime | None
    manifest_sha256: str | None
    manifest: SignedManifest | None

    @property
    def ref(self) -> str:
        return f"{self.model}@{self.number}"


class ModelInfo(BaseModel):
    """A model and a summary of its versions."""

    name: str
    created_at: datetime
    versions: int
    latest: int | None
    latest_ready: int | None
    aliases: dict[str, int]


class VerifyReport(BaseModel):
    """What ``Registry.verify`` checked and every problem it found."""

    ref: str
    ok: bool
    signed: bool
    checks: list[str]
    problems: list[str]


# ---------------------------------------------------------------- helpers


def _parse_ref(ref: str) -> tuple[str, str | None]:
    name, sep, selector = ref.strip().partition("@")
    if not MODEL_NAME_RE.fullmatch(name) or (sep and not selector):
        raise RegistryError(
            f"invalid reference {ref!r}: use MODEL, MODEL@VERSION or MODEL@ALIAS "
            f"(model names match [a-z0-9][a-z0-9._-]{{0,63}})"
        )
    return name, selector if sep else None


def _normalise_gates(
    gates: Sequence[GateResult | Mapping[str, Any]] | Mapping[str, Any],
) -> list[GateResult]:
    """Gate results from a list (models or dicts) or a ``{name: result}`` mapping."""
    items: list[Any]
    if isinstance(gates, Mapping):
        items = []
        for name, value in gates.items():
            if isinstance(value, bool):
                reason = "passed" if value else "failed"
                items.append(
                    {
                        "name": name,
                        "passed": value,
                        "value": None,
                        "threshold": None,
                        "reason": reason,
                    }
                )
            elif isinstance(value, GateResult):
                items.append(value)
            else:
                items.append({"name": name, **dict(value)})
    else:
        items = list(gates)
    out: list[GateResult] = []
    for item in items:
        if isinstance(item, GateResult):
            out.append(item)
            continue
        data = {"value": None, "threshold": None, "reason": "", **dict(item)}
        try:
            out.append(GateResult.model_validate(data))
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise RegistryError(
                f"invalid gate result {data.get('name')!r}: {loc}: {first['msg']}"
            ) from None
    return out


def _json_value(value: Any, what: str) -> Any:
    """``value`` as plain JSON data (what the database stores)."""
    try:
        return json.loads(canonical_json(value))
    except ManifestError as exc:
        raise RegistryError(f"{what} is not JSON-serialisable: {exc}") from None


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("name")
        if value is None:
            return None
    return str(value)[:128]


def _opt_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _changes(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, list[Any]]:
    fa, fb = _flatten(a), _flatten(b)
    fa.pop("", None)
    fb.pop("", None)
    keys = sorted(set(fa) | set(fb))
    return {k: [fa.get(k), fb.get(k)] for k in keys if fa.get(k) != fb.get(k)}


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- registry


class Registry:
    """Versions in a database (SQLite by default), artifacts in a content-addressed store.

    Raises ``StorageError`` if ``root`` is not writable or the database cannot be
    reached or migrated.
    """

    def __init__(self, root: Path | str, database_url: str | None = None) -> None:
        self.root = Path(root).expanduser()
        self.blobs = self.root / "blobs" / "sha256"
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:
            raise StorageError(
                f"registry directory {self.root} is not writable: {exc.strerror or exc}"
            ) from None
        self.database_url = database_url or default_url(self.root)
        self.engine = make_engine(self.database_url)
        try:
            upgrade(self.engine)
        except BaseException:
            self.engine.dispose()
            raise
        self._sessions = make_sessionmaker(self.engine)
        self._writes = make_sessionmaker(writer(self.engine))

    @classmethod
    def open(cls, root: Path | str, database_url: str | None = None) -> Registry:
        """Open (creating and migrating if needed) the registry at ``root``."""
        return cls(root, database_url)

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ blobs

    @contextlib.contextmanager
    def _lock(self, *, exclusive: bool) -> Iterator[None]:
        """Held shared while registering and exclusively by ``gc``.

        So ``gc`` never removes a blob whose version is still being committed.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        try:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot lock registry {self.root}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _blob_file(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def put_blob(self, src: Path | bytes) -> tuple[str, int]:
        """Store bytes or a file by sha256; returns ``(sha256, size)``. Idempotent.

        Written to a temporary file in the blob's folder, fsynced, renamed into
        place and the folder fsynced: a crash leaves the whole blob or none.
        """
        if isinstance(src, Path) and not src.is_file():
            raise ModelFileError(f"artifact file {src} does not exist or is not a file")
        sha, size = digest(src)
        final = self._blob_file(sha)
        try:
            if final.is_file() and final.stat().st_size == size:
                return sha, size
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=".tmp-")
            tmp = Path(tmp_name)
            try:
                h = hashlib.sha256()
                with os.fdopen(fd, "wb") as out:
                    if isinstance(src, Path):
                        with src.open("rb") as fh:
                            while block := fh.read(1024 * 1024):
                                h.update(block)
                                out.write(block)
                    else:
                        h.update(src)
                        out.write(src)
                    out.flush()
                    os.fsync(out.fileno())
                if h.hexdigest() != sha and isinstance(src, Path):
                    raise ModelFileError(f"{src.name} changed while it was being stored")
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(final.parent)
        except OSError as exc:
            raise StorageError(
                f"cannot store blob {sha[:12]} in {self.blobs}: {exc.strerror or exc}"
            ) from None
        return sha, size

    def blob_path(self, sha256: str) -> Path:
        """Path of a stored blob; ``NotFoundError`` if it is not in the store."""
        if not _HEX64.fullmatch(sha256):
            raise NotFoundError(f"no blob {sha256!r}: not a sha256 digest")
        path = self._blob_file(sha256)
        if not path.is_file():
            raise NotFoundError(f"blob {sha256} is missing from {self.blobs}")
        return path

    # ------------------------------------------------------------ register

    def register(
        self,
        *,
        model: str,
        artifacts: Sequence[NewArtifact],
        reference: bytes,
        lineage: Mapping[str, Any],
        metrics: Mapping[str, Any],
        gates: Sequence[GateResult | Mapping[str, Any]] | Mapping[str, Any],
        passed: bool,
        rejection_reasons: Sequence[str],
        preprocess: str,
        classes: Sequence[str],
        signer: SigningKey,
        created_by: str,
        parent_version: int | None,
        expires_in: timedelta = timedelta(days=365),
    ) -> VersionInfo:
        """Register a new version of ``model`` and return it.

        Blobs are stored first (content-addressed, idempotent); then one database
        transaction allocates the next number (max + 1 per model, retried on a
        concurrent conflict), inserts the version and its artifacts and, if the
        version ``passed`` its gates, signs its manifest and stores it.  A crash
        before the commit leaves at most orphan blobs (removed by ``gc``), never a
        version pointing at missing files.

        A rejected version (``passed=False``) is recorded with its reasons but
        gets **no signed manifest**, so no device will ever accept it.  Lineage
        keys ``recipe``, ``code_version``, ``data_fingerprint`` and ``seed`` are
        also stored as columns for querying.
        """
        if not MODEL_NAME_RE.fullmatch(model):
            raise RegistryError(f"invalid model name {model!r}: use [a-z0-9][a-z0-9._-]{{0,63}}")
        if not artifacts:
            raise RegistryError(f"{model}: a version needs at least one artifact")
        if not reference:
            raise RegistryError(f"{model}: the reference bundle is empty")
        if expires_in <= timedelta(0):
            raise RegistryError(f"{model}: expires_in must be positive, got {expires_in}")
        gate_results = _normalise_gates(gates)
        reasons = [str(r) for r in rejection_reasons]
        if not passed and not reasons:
            reasons = [f"{g.name}: {g.reason}" for g in gate_results if not g.passed] or [
                "rejected without a stated reason"
            ]
        lineage_json = _json_value(dict(lineage), "lineage")
        lineage_sha = hashlib.sha256(canonical_json(lineage_json)).hexdigest()
        metrics_json = _json_value(dict(metrics), "metrics")
        artifact_metrics = [_json_value(a.metrics, f"metrics of {a.path}") for a in artifacts]

        with self._lock(exclusive=False):
            stored: list[tuple[NewArtifact, str, int, list[str]]] = []
            for art in artifacts:
                sha, size = self.put_blob(art.path)
                if size == 0:
                    raise ModelFileError(f"artifact file {art.path} is empty")
                stored.append((art, sha, size, chunk_hashes(self._blob_file(sha), art.chunk_size)))
            ref_sha, ref_size = self.put_blob(bytes(reference))

            last: IntegrityError | None = None
            for attempt in range(_REGISTER_ATTEMPTS):
                try:
                    return self._insert_version(
                        model=model,
                        stored=stored,
                        artifact_metrics=artifact_metrics,
                        reference=ReferenceRef(sha256=ref_sha, size=ref_size),
                        lineage=lineage_json,
                        lineage_sha256=lineage_sha,
                        metrics=metrics_json,
                        gates=gate_results,
                        passed=passed,
                        reasons=reasons,
                        preprocess=preprocess,
                        classes=[str(c) for c in classes],
                        signer=signer,
                        created_by=created_by,
                        parent_version=parent_version,
                        expires_in=expires_in,
                    )
                except IntegrityError as exc:  # a concurrent writer created the model first
                    last = exc
                    time.sleep(random.uniform(0, 0.02 * (attempt + 1)))
            reason = " ".join(str(getattr(last, "orig", last)).split())
            raise RegistryError(
                f"{model}: could not allocate a version number after {_REGISTER_ATTEMPTS} "
                f"attempts: {reason}"
            )

    def _insert_version(
        self,
        *,
        model: str,
        stored: list[tuple[NewArtifact, str, int, list[str]]],
        artifact_metrics: list[Any],
        reference: ReferenceRef,
        lineage: dict[str, Any],
        lineage_sha256: str,
        metrics: dict[str, Any],
        gates: list[GateResult],
        passed: bool,
        reasons: list[str],
        preprocess: str,
        classes: list[str],
        signer: SigningKey,
        created_by: str,
        parent_version: int | None,
        expires_in: timedelta,
    ) -> VersionInfo:
        with storage_errors(self.engine, f"registering {model}"), self._writes.begin() as session:
            now = utcnow()
            # The model row's lock serialises number allocation per model on PostgreSQL
            # (SQLite's BEGIN IMMEDIATE already serialises writers); UNIQUE is the backstop.
            row = session.scalar(select(ModelRow).where(ModelRow.name == model).with_for_update())
            if row is None:
                row = ModelRow(name=model, created_at=now)
                session.add(row)
                session.flush()
            latest = session.scalar(
                select(func.max(VersionRow.number)).where(VersionRow.model_id == row.id)
            )
            number = (latest or 0) + 1
            if parent_version is not None and not session.scalar(
                select(VersionRow.id).where(
                    VersionRow.model_id == row.id, VersionRow.number == parent_version
                )
            ):
                raise RegistryError(f"{model}: parent version {parent_version} does not exist")
            version = VersionRow(
                model_id=row.id,
                number=number,
                status="ready" if passed else "rejected",
                recipe=_opt_str(lineage.get("recipe")),
                code_version=_opt_str(lineage.get("code_version")),
                data_fingerprint=_opt_str(lineage.get("data_fingerprint")),
                seed=_opt_int(lineage.get("seed")),
                parent_version=parent_version,
                lineage=lineage,
                lineage_sha256=lineage_sha256,
                metrics=metrics,
                gates=[g.model_dump(mode="json") for g in gates],
                rejection_reasons=reasons,
                preprocess=preprocess,
                classes=classes,
                reference_sha256=reference.sha256,
                reference_size=reference.size,
                manifest=None,
                manifest_sha256=None,
                expires_at=None,
                created_by=created_by[:128],
                created_at=now,
            )
            session.add(version)
            session.flush()
            entries: list[ManifestArtifact] = []
            for (art, sha, size, chunks), art_metrics in zip(stored, artifact_metrics, strict=True):
                runtime = art.runtime or DEFAULT_RUNTIMES[art.format]
                session.add(
                    ArtifactRow(
                        version_id=version.id,
                        format=art.format,
                        precision=art.precision,
                        sha256=sha,
                        size=size,
                        role=art.role,
                        runtime=runtime,
                        input_spec=art.input.model_dump(mode="json"),
                        output_spec=art.output.model_dump(mode="json"),
                        chunk_size=art.chunk_size,
                        arena_bytes=art.arena_bytes,
                        min_ram_bytes=art.min_ram_bytes,
                        metrics=art_metrics,
                    )
                )
                entries.append(
                    ManifestArtifact(
                        format=art.format,
                        precision=art.precision,
                        sha256=sha,
                        size=size,
                        runtime=runtime,
                        input=art.input,
                        output=art.output,
                        chunk_size=art.chunk_size,
                        chunks=chunks,
                        arena_bytes=art.arena_bytes,
                        min_ram_bytes=art.min_ram_bytes,
                    )
                )
            if passed:
                try:
                    manifest = Manifest(
                        model=model,
                        version=number,
                        created=now,
                        expires=now + expires_in,
                        preprocess=preprocess,
                        classes=classes,
                        artifacts=entries,
                        reference=reference,
                        lineage_sha256=lineage_sha256,
                        key_id=signer.key_id,
                    )
                except ValidationError as exc:
                    first = exc.errors()[0]
                    loc = ".".join(str(p) for p in first["loc"])
                    raise RegistryError(
                        f"{model}@{number}: invalid manifest: {loc}: {first['msg']}"
                    ) from None
                signed = signer.sign_manifest(manifest)
                version.manifest = signed.model_dump(mode="json", by_alias=True)
                version.manifest_sha256 = hashlib.sha256(canonical_bytes(manifest)).hexdigest()
                version.expires_at = manifest.expires
            session.flush()
            return self._info(session, version)

    # ------------------------------------------------------------ queries

    def _aliases_of(self, session: Session, version: VersionRow) -> list[str]:
        return sorted(
            session.scalars(select(AliasRow.name).where(AliasRow.version_id == version.id))
        )

    def _info(
        self, session: Session, v: VersionRow, aliases: list[str] | None = None
    ) -> VersionInfo:
        manifest: SignedManifest | None = None
        if v.manifest is not None:
            try:
                manifest = parse_signed_manifest(v.manifest)
            except ManifestError as exc:
                raise ManifestError(
                    f"{v.model.name}@{v.number}: stored manifest is corrupt: {exc}"
                ) from None
        return VersionInfo(
            model=v.model.name,
            number=v.number,
            status=v.status,  # type: ignore[arg-type]
            aliases=self._aliases_of(session, v) if aliases is None else aliases,
            created_at=v.created_at,
            created_by=v.created_by,
            recipe=v.recipe,
            code_version=v.code_version,
            data_fingerprint=v.data_fingerprint,
            seed=v.seed,
            parent_version=v.parent_version,
            lineage=v.lineage,
            lineage_sha256=v.lineage_sha256,
            metrics=v.metrics,
            gates=[GateResult.model_validate(g) for g in v.gates],
            rejection_reasons=list(v.rejection_reasons),
            preprocess=v.preprocess,
            classes=list(v.classes),
            reference=ReferenceRef(sha256=v.reference_sha256, size=v.reference_size),
            artifacts=[
                ArtifactInfo(
                    format=a.format,
                    precision=a.precision,
                    role=a.role,
                    sha256=a.sha256,
                    size=a.size,
                    runtime=a.runtime,
                    input=TensorSpecModel.model_validate(a.input_spec),
                    output=TensorSpecModel.model_validate(a.output_spec),
                    arena_bytes=a.arena_bytes,
                    min_ram_bytes=a.min_ram_bytes,
                    metrics=a.metrics,
                )
                for a in v.artifacts
            ],
            expires_at=v.expires_at,
            manifest_sha256=v.manifest_sha256,
            manifest=manifest,
        )

    def _model_row(self, session: Session, name: str) -> ModelRow:
        row = session.scalar(select(ModelRow).where(ModelRow.name == name))
        if row is None:
            raise NotFoundError(f"no model named {name!r} in the registry")
        return row

    def _resolve(self, session: Session, ref: str) -> VersionRow:
        name, selector = _parse_ref(ref)
        model = self._model_row(session, name)
        if selector is None:
            row = session.scalar(
                select(VersionRow)
                .where(VersionRow.model_id == model.id, VersionRow.status == "ready")
                .order_by(VersionRow.number.desc())
                .limit(1)
            )
            if row is None:
                raise NotFoundError(f"model {name!r} has no ready version (all were rejected)")
            return row
        if selector.isdigit():
            row = session.scalar(
                select(VersionRow).where(
                    VersionRow.model_id == model.id, VersionRow.number == int(selector)
                )
            )
            if row is None:
                raise NotFoundError(f"model {name!r} has no version {selector}")
            return row
        alias = session.get(AliasRow, (model.id, selector))
        if alias is None:
            raise NotFoundError(f"model {name!r} has no version or alias {selector!r}")
        return alias.version

    def get(self, ref: str) -> VersionInfo:
        """``name@3``, ``name@production`` or ``name`` (its latest ready version)."""
        with storage_errors(self.engine, f"reading {ref}"), self._sessions() as session:
            return self._info(session, self._resolve(session, ref))

    def list_models(self) -> list[ModelInfo]:
        """Every model, by name."""
        ready_number = case((VersionRow.status == "ready", VersionRow.number))
        query = (
            select(
                ModelRow.id,
                ModelRow.name,
                ModelRow.created_at,
                func.count(VersionRow.id),
                func.max(VersionRow.number),
                func.max(ready_number),
            )
            .outerjoin(VersionRow, VersionRow.model_id == ModelRow.id)
            .group_by(ModelRow.id, ModelRow.name, ModelRow.created_at)
            .order_by(ModelRow.name)
        )
        aliases_query = select(AliasRow.model_id, AliasRow.name, VersionRow.number).join(
            VersionRow, VersionRow.id == AliasRow.version_id
        )
        with storage_errors(self.engine, "listing models"), self._sessions() as session:
            aliases: dict[int, dict[str, int]] = {}
            for model_id, alias, number in session.execute(aliases_query):
                aliases.setdefault(model_id, {})[alias] = number
            return [
                ModelInfo(
                    name=name,
                    created_at=created_at,
                    versions=count,
                    latest=latest,
                    latest_ready=latest_ready,
                    aliases=dict(sorted(aliases.get(model_id, {}).items())),
                )
                for model_id, name, created_at, count, latest, latest_ready in session.execute(
                    query
                )
            ]

    def list_versions(self, model: str) -> list[VersionInfo]:
        """Every version of ``model``, oldest first; ``NotFoundError`` if there is no such model."""
        with storage_errors(self.engine, f"listing {model}"), self._sessions() as session:
            row = self._model_row(session, model)
            versions = session.scalars(
                select(VersionRow)
                .where(VersionRow.model_id == row.id)
                .order_by(VersionRow.number)
                .options(selectinload(VersionRow.artifacts))
            ).all()
            names: dict[int, list[str]] = {}
            for version_id, alias in session.execute(
                select(AliasRow.version_id, AliasRow.name).where(AliasRow.model_id == row.id)
            ):
                names.setdefault(version_id, []).append(alias)
            return [self._info(session, v, sorted(names.get(v.id, []))) for v in versions]

    # ------------------------------------------------------------ changes

    def promote(self, ref: str, alias: str) -> VersionInfo:
        """Point ``alias`` (``[a-z][a-z0-9-]*``) at ``ref``; a rejected version is refused."""
        if not ALIAS_RE.fullmatch(alias):
            raise RegistryError(
                f"invalid alias {alias!r}: use [a-z][a-z0-9-]* (up to 63 characters)"
            )
        for attempt in range(2):
            try:
                with (
                    storage_errors(self.engine, f"promoting {ref}"),
                    self._writes.begin() as session,
                ):
                    version = self._resolve(session, ref)
                    if version.status != "ready":
                        raise RegistryError(
                            f"{version.model.name}@{version.number} was rejected "
                            f"({'; '.join(version.rejection_reasons)}); it cannot be promoted"
                        )
                    row = session.get(AliasRow, (version.model_id, alias))
                    if row is None:
                        session.add(
                            AliasRow(
                                model_id=version.model_id,
                                name=alias,
                                version_id=version.id,
                                updated_at=utcnow(),
                            )
                        )
                    else:
                        row.version_id = version.id
                        row.updated_at = utcnow()
                    session.flush()
                    session.expire(version)
                    return self._info(session, version)
            except IntegrityError:  # a concurrent promote created the alias first
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def diff(self, a: str, b: str) -> dict[str, dict[str, list[Any]]]:
        """Differences between two versions: ``{section: {key: [value_a, value_b]}}``.

        Sections: ``version`` (status, parent, preprocess, classes…), ``lineage``
        and ``metrics`` (nested keys dotted), ``gates`` (by gate name) and
        ``artifacts`` (``format/precision/role.field``; an artifact only one side
        has shows as ``[None, sha256]`` or ``[sha256, None]``).  Only differing
        keys appear; identical versions give empty sections.
        """
        va, vb = self.get(a), self.get(b)
        top = (
            "status",
            "parent_version",
            "preprocess",
            "classes",
            "created_by",
            "rejection_reasons",
        )
        version = {
            k: [getattr(va, k), getattr(vb, k)] for k in top if getattr(va, k) != getattr(vb, k)
        }
        gates_a = {g.name: g.model_dump(mode="json", exclude={"name"}) for g in va.gates}
        gates_b = {g.name: g.model_dump(mode="json", exclude={"name"}) for g in vb.gates}

        def arts(v: VersionInfo) -> dict[str, dict[str, Any]]:
            return {
                f"{x.format}/{x.precision}/{x.role}": x.model_dump(
                    mode="json", exclude={"format", "precision", "role"}
                )
                for x in v.artifacts
            }

        arts_a, arts_b = arts(va), arts(vb)
        artifacts: dict[str, list[Any]] = {}
        for key in sorted(set(arts_a) | set(arts_b)):
            if key not in arts_a:
                artifacts[key] = [None, arts_b[key]["sha256"]]
            elif key not in arts_b:
                artifacts[key] = [arts_a[key]["sha256"], None]
            else:
                for field, pair in _changes(arts_a[key], arts_b[key]).items():
                    artifacts[f"{key}.{field}"] = pair
        return {
            "version": version,
            "lineage": _changes(va.lineage, vb.lineage),
            "metrics": _changes(va.metrics, vb.metrics),
            "gates": _changes(gates_a, gates_b),
            "artifacts": artifacts,
        }

    # ------------------------------------------------------------ integrity

    def verify(
        self,
        ref: str,
        public_key: Ed25519PublicKey | bytes | str | Path,
        *,
        now: datetime | None = None,
    ) -> VerifyReport:
        """Re-hash every blob and check the manifest with the device's own checks.

        Problems (a tampered or missing blob, a manifest that no longer matches
        its signature or the version's rows, an expired manifest) are listed in
        the report rather than raised; ``ok`` is true only if there are none.  A
        rejected version has no manifest: its blobs are checked against its rows.
        """
        checks: list[str] = []
        problems: list[str] = []
        with storage_errors(self.engine, f"verifying {ref}"), self._sessions() as session:
            row = self._resolve(session, ref)
            name, number = row.model.name, row.number
            label = f"{name}@{number}"
            stored_manifest = row.manifest
            rows = [(a.format, a.precision, a.sha256, a.size) for a in row.artifacts]
            reference = (row.reference_sha256, row.reference_size)
            status = row.status

        signed: SignedManifest | None = None
        if stored_manifest is None:
            if status == "ready":
                problems.append(f"{label} is ready but has no signed manifest")
            else:
                checks.append(f"{label} is rejected: no manifest (it can never be rolled out)")
        else:
            try:
                signed = parse_signed_manifest(stored_manifest)
            except ManifestError as exc:
                problems.append(f"manifest: {exc}")
        if signed is not None:
            try:
                verify_manifest(signed, public_key, now=now)
                checks.append(f"manifest signature (key {signed.manifest.key_id}) and expiry")
            except TinyfleetError as exc:
                problems.append(f"manifest: {exc}")
            m = signed.manifest
            if (m.model, m.version) != (name, number):
                problems.append(f"manifest names {m.model}@{m.version}, not {label}")
            listed = sorted((x.format, x.precision, x.sha256, x.size) for x in m.artifacts)
            if listed != sorted(rows):
                problems.append("manifest artifacts differ from the version's artifact rows")
            if (m.reference.sha256, m.reference.size) != reference:
                problems.append("manifest reference differs from the version's reference")
            for art in m.artifacts:
                what = f"{art.format}/{art.precision} {art.sha256[:12]}"
                try:
                    path = self.blob_path(art.sha256)
                    verify_artifact(art, path)
                    if chunk_hashes(path, art.chunk_size) != art.chunks:
                        problems.append(f"{what}: chunk hashes differ from the manifest")
                        continue
                    checks.append(f"{what}: {art.size} bytes, sha256 and {len(art.chunks)} chunks")
                except TinyfleetError as exc:
                    problems.append(f"{what}: {exc}")
            targets = [("reference", m.reference.sha256, m.reference.size)]
        else:
            targets = [(f"{f}/{p}", sha, size) for f, p, sha, size in rows]
            targets.append(("reference", *reference))
        for what, sha, size in targets:
            try:
                got_sha, got_size = digest(self.blob_path(sha))
            except TinyfleetError as exc:
                problems.append(f"{what} {sha[:12]}: {exc}")
                continue
            if (got_sha, got_size) != (sha, size):
                problems.append(
                    f"{what} {sha[:12]}: blob has sha256 {got_sha[:12]}… and {got_size} bytes; "
                    f"expected {size} bytes"
                )
            else:
                checks.append(f"{what} {sha[:12]}: {size} bytes, sha256")
        return VerifyReport(
            ref=label, ok=not problems, signed=signed is not None, checks=checks, problems=problems
        )

    def gc(self) -> int:
        """Remove blobs no version references (and leftover temporary files).

        Returns the number of blobs removed.
        """
        with self._lock(exclusive=True):
            with storage_errors(self.engine, "collecting garbage"), self._sessions() as session:
                keep = set(session.scalars(select(ArtifactRow.sha256)))
                keep |= set(session.scalars(select(VersionRow.reference_sha256)))
            removed = 0
            for sub in sorted(self.blobs.iterdir()) if self.blobs.is_dir() else []:
                if not sub.is_dir():
                    continue
                for path in sub.iterdir():
                    name = path.name
                    try:
                        if name.startswith(".tmp-"):
                            path.unlink()
                        elif _HEX64.fullmatch(name) and name not in keep:
                            path.unlink()
                            removed += 1
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        raise StorageError(f"cannot remove {path}: {exc.strerror or exc}") from None
                with contextlib.suppress(OSError):
                    sub.rmdir()  # only succeeds when empty
            return removed
