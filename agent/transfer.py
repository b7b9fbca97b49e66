"""Chunked, resumable artifact download (transport-agnostic).

The host publishes each chunk of an artifact once, retained, on its own topic;
the broker fans it out.  A ``Download`` asks for the chunks it still lacks by
subscribing to at most ``window`` chunk topics at a time (bounded memory: a chunk
is written to the staging file as soon as it arrives and verified against the
manifest's chunk hash), and when a chunk does not come within ``timeout`` it asks
the host to publish it again.

Resuming needs no progress file: the staging file is pre-sized and every chunk
has a hash in the signed manifest, so after a crash the chunks already on disk
are found by hashing them (``scan``).  Blobs without chunk hashes (the small
reference bundle) are verified as a whole and fetched again on mismatch.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tinyfleet.agent.errors import DigestMismatchError


@dataclass
class BlobSpec:
    """What to fetch: a sha256-addressed blob split into fixed-size chunks."""

    sha256: str
    size: int
    chunk_size: int
    chunk_hashes: list[str] | None = None  # per-chunk sha256 from the manifest, if known

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)


@dataclass
class Download:
    """One blob being fetched into ``staging/<sha256>.part``."""

    spec: BlobSpec
    path: Path
    window: int = 8
    timeout: float = 10.0
    clock: Callable[[], float] = time.monotonic
    missing: set[int] = field(default_factory=set)
    requested: dict[int, float] = field(default_factory=dict)  # chunk -> when asked
    retries: int = 0
    bytes_received: int = 0

    @classmethod
    def open(
        cls,
        spec: BlobSpec,
        staging_dir: Path,
        *,
        window: int = 8,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> Download:
        d = cls(spec, staging_dir / f"{spec.sha256}.part", window, timeout, clock)
        d.scan()
        return d

    # ---------------------------------------------------------------- state

    def scan(self) -> None:
        """Find which chunks the staging file already holds (resume after a crash)."""
        spec = self.spec
        if not self.path.exists() or self.path.stat().st_size != spec.size:
            with open(self.path, "wb") as f:
                f.truncate(spec.size)
            self.missing = set(range(spec.chunks))
            return
        if spec.chunk_hashes is None:
            self.missing = set() if self._whole_ok() else set(range(spec.chunks))
            if self.missing:
                with open(self.path, "wb") as f:
                    f.truncate(spec.size)
            return
        self.missing = set()
        with open(self.path, "rb") as f:
            for i, expected in enumerate(spec.chunk_hashes):
                data = f.read(spec.chunk_length(i))
                if hashlib.sha256(data).hexdigest() != expected:
                    self.missing.add(i)

    @property
    def done(self) -> bool:
        return not self.missing

    @property
    def received(self) -> int:
        return self.spec.chunks - len(self.missing)

    def _whole_ok(self) -> bool:
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest() == self.spec.sha256

    # ---------------------------------------------------------------- flow

    def next_requests(self) -> list[int]:
        """Chunks to ask for now, keeping at most ``window`` outstanding."""
        free = self.window - len(self.requested)
        if free <= 0:
            return []
        picks = sorted(self.missing - self.requested.keys())[:free]
        now = self.clock()
        for i in picks:
            self.requested[i] = now
        return picks

    def overdue(self) -> list[int]:
        """Outstanding chunks whose timeout has passed (re-ask for them); restarts their clock."""
        now = self.clock()
        late = [i for i, t in self.requested.items() if now - t >= self.timeout]
        for i in late:
            self.requested[i] = now
        if late:
            self.retries += 1
        return sorted(late)

    def on_chunk(self, index: int, data: bytes) -> bool:
        """Store a chunk; returns True if it was new and valid (False: duplicate/unwanted).

        Raises ``DigestMismatchError`` for a chunk that fails its hash: it stays missing
        *and requested*, so that its timeout asks the host for it again (``overdue``) and
        the good copy, published retained over the bad one, still reaches the subscriber.
        (Dropping it from ``requested`` left nothing to time out: the download stalled
        without ever sending a chunk request.)
        """
        spec = self.spec
        if not 0 <= index < spec.chunks or index not in self.missing:
            return False
        if len(data) != spec.chunk_length(index):
            raise DigestMismatchError(
                f"chunk {index}: {len(data)} bytes, expected {spec.chunk_length(index)}"
            )
        if (
            spec.chunk_hashes is not None
            and hashlib.sha256(data).hexdigest() != spec.chunk_hashes[index]
        ):
            raise DigestMismatchError(f"chunk {index} of {spec.sha256[:12]} fails its hash")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, index * spec.chunk_size)
        finally:
            os.close(fd)
        self.missing.discard(index)
        self.requested.pop(index, None)
        self.bytes_received += len(data)
        return True

    def finish(self) -> Path:
        """Flush to disk and verify the whole blob; on mismatch start over.

        After a mismatch the first window of chunks is marked as requested *now* without
        being handed out by ``next_requests``: they are asked for again when they time out
        (``overdue``: a chunk request to the host, then a new subscription).  Subscribing
        again at once would fetch the same bad retained copy and fail again in a tight loop
        through the broker, never asking the host for a good one.
        """
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())
        if not self._whole_ok():
            with open(self.path, "wb") as f:
                f.truncate(self.spec.size)
            self.missing = set(range(self.spec.chunks))
            now = self.clock()
            self.requested = {i: now for i in sorted(self.missing)[: self.window]}
            raise DigestMismatchError(f"{self.spec.sha256[:12]}: assembled blob fails its sha256")
        return self.path

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
