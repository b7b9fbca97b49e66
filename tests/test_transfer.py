"""Chunked, resumable download logic (no transport)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tinyfleet.agent.errors import DigestMismatchError
from tinyfleet.agent.transfer import BlobSpec, Download


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _blob(size: int = 50_000, chunk: int = 16_384) -> tuple[bytes, BlobSpec]:
    data = os.urandom(size)
    hashes = [hashlib.sha256(data[i : i + chunk]).hexdigest() for i in range(0, size, chunk)]
    return data, BlobSpec(hashlib.sha256(data).hexdigest(), size, chunk, hashes)


def _chunk(data: bytes, spec: BlobSpec, i: int) -> bytes:
    return data[i * spec.chunk_size : i * spec.chunk_size + spec.chunk_length(i)]


def test_window_bounds_outstanding_requests(tmp_path: Path) -> None:
    data, spec = _blob()
    d = Download.open(spec, tmp_path, window=2)
    assert spec.chunks == 4 and d.next_requests() == [0, 1] and d.next_requests() == []
    assert d.on_chunk(1, _chunk(data, spec, 1))
    assert d.next_requests() == [2]
    for i in (0, 2):
        d.on_chunk(i, _chunk(data, spec, i))
    assert d.next_requests() == [3]
    d.on_chunk(3, _chunk(data, spec, 3))
    assert d.done and d.finish().read_bytes() == data


def test_duplicates_and_strangers_are_ignored(tmp_path: Path) -> None:
    data, spec = _blob()
    d = Download.open(spec, tmp_path)
    assert d.on_chunk(0, _chunk(data, spec, 0))
    assert not d.on_chunk(0, _chunk(data, spec, 0))
    assert not d.on_chunk(99, b"x")
    assert d.bytes_received == spec.chunk_size


def test_corrupted_chunk_is_refused_and_stays_missing(tmp_path: Path) -> None:
    data, spec = _blob()
    d = Download.open(spec, tmp_path)
    d.next_requests()
    bad = bytearray(_chunk(data, spec, 2))
    bad[10] ^= 0xFF
    with pytest.raises(DigestMismatchError):
        d.on_chunk(2, bytes(bad))
    with pytest.raises(DigestMismatchError):
        d.on_chunk(1, b"short")
    # a bad chunk stays missing *and* requested: its timeout asks the host for it again
    assert {1, 2} <= d.missing and {1, 2} <= d.requested.keys()


def test_resume_after_crash_keeps_verified_chunks(tmp_path: Path) -> None:
    data, spec = _blob()
    d = Download.open(spec, tmp_path)
    d.on_chunk(0, _chunk(data, spec, 0))
    d.on_chunk(2, _chunk(data, spec, 2))
    # a new process opens the same staging file
    d2 = Download.open(spec, tmp_path)
    assert d2.missing == {1, 3}
    # a torn write inside chunk 2 is detected on resume
    with open(d2.path, "r+b") as f:
        f.seek(2 * spec.chunk_size + 5)
        f.write(b"\0\1\2")
    assert Download.open(spec, tmp_path).missing == {1, 2, 3}


def test_timeouts_re_ask(tmp_path: Path) -> None:
    _, spec = _blob()
    clock = Clock()
    d = Download.open(spec, tmp_path, window=3, timeout=5.0, clock=clock)
    assert d.next_requests() == [0, 1, 2]
    clock.t = 4.9
    assert d.overdue() == []
    clock.t = 5.0
    assert d.overdue() == [0, 1, 2] and d.retries == 1
    assert d.overdue() == []  # clock restarted


def test_blob_without_chunk_hashes_verified_whole(tmp_path: Path) -> None:
    data = os.urandom(20_000)
    spec = BlobSpec(hashlib.sha256(data).hexdigest(), len(data), 16_384, None)
    d = Download.open(spec, tmp_path)
    d.on_chunk(0, data[:16_384])
    d.on_chunk(1, b"\0" * (len(data) - 16_384))  # wrong content, unverifiable per chunk
    assert d.done
    with pytest.raises(DigestMismatchError):
        d.finish()
    assert d.missing == {0, 1}
    d.on_chunk(0, data[:16_384])
    d.on_chunk(1, data[16_384:])
    assert d.finish().read_bytes() == data
    assert Download.open(spec, tmp_path).done  # complete file is recognised on reopen
