"""What the host publishes to devices: signed desired states and artifact chunks.

Desired states are retained per device and carry a generation that only grows
(``max(stored desired, last reported) + 1``, so a host whose database was reset
still outranks what a device has seen).  The generation and the signed document
are committed to the database before they are published, so after a crash
``republish_all`` restores the broker's retained copies from the database.

Artifacts (model files and reference bundles) are published once, chunk by
chunk, as retained messages; the broker fans them out to every device that
subscribes, so host egress stays about one artifact size whatever the fleet size.
Chunks are published again only when a device asks for them (``ChunkRequest``),
at most once per chunk per ``republish_interval``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tinyfleet.agent.link import Link
from tinyfleet.agent.manifest import CHUNK_SIZE
from tinyfleet.agent.protocol import (
    ChunkRequest,
    DesiredModel,
    DesiredState,
    FLSettings,
    SignedDesiredState,
    TelemetrySettings,
    Topics,
    encode,
)
from tinyfleet.host.db.tables import DeviceRow
from tinyfleet.host.keys import SigningKey
from tinyfleet.host.registry import VersionInfo


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Keep:
    """``fl=KEEP``: a new desired state keeps the federated setting of the stored one."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()


def stored_fl(row: DeviceRow) -> FLSettings | None:
    """The ``fl`` of the device's stored desired state (None: absent)."""
    fl = ((row.desired or {}).get("desired") or {}).get("fl")
    return None if fl is None else FLSettings.model_validate(fl)


def device_row(s: Session, fleet: str, device: str) -> DeviceRow:
    """The device's row, created if the host has not heard from it yet."""
    row = s.get(DeviceRow, (fleet, device))
    if row is None:
        row = DeviceRow(
            fleet=fleet,
            device=device,
            tags=[],
            groups=[],
            session=0,
            online=False,
            reported_generation=0,
            desired_generation=0,
            updated_at=utcnow(),
        )
        s.add(row)
    return row


class DesiredPublisher:
    """Builds, signs, stores and publishes desired states."""

    def __init__(
        self, link: Link, topics: Topics, signer: SigningKey, fleet: str, engine: Engine
    ) -> None:
        self.link = link
        self.topics = topics
        self.signer = signer
        self.fleet = fleet
        self.engine = engine

    def assign(
        self,
        s: Session,
        device: str,
        version: VersionInfo | None,
        artifact_sha256: str | None,
        *,
        rollout_id: str | None = None,
        rollback: bool = False,
        telemetry: TelemetrySettings | None = None,
        fl: FLSettings | _Keep | None = KEEP,
    ) -> tuple[int, bytes]:
        """Record a new desired state for ``device`` in session ``s``; publish after commit.

        ``fl`` defaults to keeping the stored desired state's federated setting, so a
        rollout (or its rollback) never starts or stops a device's SuperNode: a model
        change does not take a node out of a federated run (the run trains the weights
        the server sends, not the model the device serves).
        """
        row = device_row(s, self.fleet, device)
        fl_value = stored_fl(row) if isinstance(fl, _Keep) else fl
        generation = max(row.desired_generation, row.reported_generation) + 1
        model = None
        if version is not None:
            if version.manifest is None or artifact_sha256 is None:
                raise ValueError(f"{version.ref} has no signed manifest")
            model = DesiredModel(
                name=version.model,
                version=version.number,
                manifest=version.manifest.model_dump(mode="json"),
                artifact_sha256=artifact_sha256,
                rollback=rollback,
            )
        desired = DesiredState(
            device=device,
            generation=generation,
            issued_at=utcnow(),
            model=model,
            rollout_id=rollout_id,
            telemetry=telemetry,
            fl=fl_value,
        )
        signed = self.signer.sign_desired(desired)
        row.desired = signed.model_dump(mode="json")
        row.desired_generation = generation
        row.updated_at = utcnow()
        return generation, encode(signed)

    def set_fl(self, s: Session, device: str, fl: FLSettings | None) -> tuple[int, bytes]:
        """A new generation of the device's desired state with ``fl`` set (None: cleared).

        The model, artifact, rollback flag and telemetry settings of the stored desired
        state are kept (re-signed under the new generation); ``rollout_id`` is left out,
        since no rollout produced this generation.  ``ValueError`` if the host has never
        sent the device a desired state (a new one would have to name its model).
        """
        row = device_row(s, self.fleet, device)
        if row.desired is None:
            raise ValueError(f"{device} has no desired state from this host yet")
        current = SignedDesiredState.model_validate(row.desired).desired
        generation = max(row.desired_generation, row.reported_generation) + 1
        desired = current.model_copy(
            update={"generation": generation, "issued_at": utcnow(), "rollout_id": None, "fl": fl}
        )
        desired = DesiredState.model_validate(desired.model_dump(mode="json", by_alias=True))
        signed = self.signer.sign_desired(desired)
        row.desired = signed.model_dump(mode="json")
        row.desired_generation = generation
        row.updated_at = utcnow()
        return generation, encode(signed)

    def publish(self, device: str, payload: bytes) -> None:
        self.link.publish(self.topics.desired(device), payload, 1, True)

    def resync_reported(self, devices: Sequence[str], batch: int = 500) -> int:
        """Ask the broker for these devices' retained reported states again.

        A new subscription to a topic makes the broker send its retained message; the
        host's wildcard subscription stays, so each filter is unsubscribed right after.
        A report dropped on its way to a slow host (a full broker queue) is read again
        this way instead of timing the device out.  Returns how many were asked for.
        """
        if not devices or not self.link.connected:
            return 0
        filters = [self.topics.reported(d) for d in devices]
        for i in range(0, len(filters), batch):
            part = filters[i : i + batch]
            self.link.subscribe([(f, 1) for f in part])
            self.link.unsubscribe(part)
        return len(filters)

    def republish_all(self) -> int:
        """Publish every stored desired state again (after a reconnect or a crash)."""
        with Session(self.engine) as s:
            rows = s.execute(
                select(DeviceRow.device, DeviceRow.desired).where(
                    DeviceRow.fleet == self.fleet, DeviceRow.desired.is_not(None)
                )
            ).all()
        for device, desired in rows:
            payload = encode(SignedDesiredState.model_validate(desired))
            self.publish(device, payload)
        return len(rows)


class ArtifactPublisher:
    """Publishes blobs as retained chunks; answers chunk requests for known blobs."""

    def __init__(
        self,
        link: Link,
        topics: Topics,
        blob_path: Callable[[str], Path],
        *,
        republish_interval: float = 1.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.link = link
        self.topics = topics
        self.blob_path = blob_path
        self.republish_interval = republish_interval
        self.log = logger or logging.getLogger("tinyfleet.host.artifacts")
        self._lock = threading.Lock()
        self._published: dict[str, int] = {}  # sha256 -> chunk size
        self._allowed: dict[str, int] = {}
        self._last: dict[tuple[str, int], float] = {}
        self.bytes_out = 0
        self.chunks_out = 0

    def _chunks(self, sha256: str, chunk_size: int, indexes: list[int] | None = None) -> int:
        path = self.blob_path(sha256)
        size = path.stat().st_size
        n = max(1, -(-size // chunk_size))
        sent = 0
        with open(path, "rb") as f:
            for i in range(n) if indexes is None else indexes:
                if not 0 <= i < n:
                    continue
                f.seek(i * chunk_size)
                data = f.read(chunk_size)
                if self.link.publish(self.topics.chunk(sha256, i), data, 1, True) is not None:
                    self.bytes_out += len(data)
                    self.chunks_out += 1
                    self._last[(sha256, i)] = time.monotonic()
                    sent += 1
        return sent

    def ensure(self, sha256: str, chunk_size: int = CHUNK_SIZE) -> bool:
        """Publish a blob's chunks (once); False if not connected yet."""
        with self._lock:
            self._allowed[sha256] = chunk_size
            if sha256 in self._published or not self.link.connected:
                return sha256 in self._published
            self._chunks(sha256, chunk_size)
            self._published[sha256] = chunk_size
            return True

    def on_request(self, request: ChunkRequest) -> int:
        """Publish requested chunks again (rate-limited per chunk); unknown blobs are ignored."""
        with self._lock:
            chunk_size = self._allowed.get(request.sha256)
            if chunk_size is None:
                self.log.info("%s asked for unknown blob %s", request.device, request.sha256[:12])
                return 0
            now = time.monotonic()
            due = [
                i
                for i in request.chunks
                if now - self._last.get((request.sha256, i), 0.0) >= self.republish_interval
            ]
            return self._chunks(request.sha256, chunk_size, due) if due else 0

    def reset(self) -> None:
        """Forget what was published (after a reconnect: the broker may have lost it)."""
        with self._lock:
            self._published.clear()

    def clear(self, sha256: str, chunk_size: int = CHUNK_SIZE) -> None:
        """Remove a blob's retained chunks from the broker."""
        with self._lock:
            path = self.blob_path(sha256)
            n = max(1, -(-path.stat().st_size // chunk_size))
            for i in range(n):
                self.link.publish(self.topics.chunk(sha256, i), b"", 1, True)
            self._published.pop(sha256, None)
            self._allowed.pop(sha256, None)

    def stats(self) -> dict[str, Any]:
        return {"bytes_out": self.bytes_out, "chunks_out": self.chunks_out}
