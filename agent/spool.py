"""Bounded on-disk telemetry spool: the device's store-and-forward queue.

The inference thread ``append``s telemetry records; the I/O thread ``peek``s the
oldest ones, publishes them and ``ack``s them once the broker has confirmed the
batch.  Records live in one SQLite file (stdlib ``sqlite3``) opened with one
connection guarded by one lock, so the two threads may share a ``Spool``.

Durability.  Every ``append`` and ``ack`` is its own transaction, committed in WAL
mode with ``synchronous=NORMAL``: a commit is an append to the write-ahead log
without an fsync.  A committed record survives a crash of the process (the agent
killed, an unhandled exception); an operating system crash or a power loss may
lose the last few commits (they are in the page cache, not yet on the medium).
The log is fsynced at every checkpoint (about every 256 pages), so what can be
lost is bounded.  Committing per append rather than batching costs little here
because appends happen once per telemetry window, not once per inference.

Bounds.  At most ``max_records`` records and ``max_bytes`` bytes of bodies are
kept; an ``append`` past a bound deletes the oldest records in the same
transaction and adds them to ``dropped``.  A body larger than ``max_bytes`` on its
own is not stored and counts as dropped.  The file itself is larger than
``max_bytes`` by SQLite's page and b-tree overhead; pages freed by ``ack`` are
reused, so it does not grow past its high-water mark.

Failures never reach the inference path.  ``append`` does not raise when the
disk is full (``SQLITE_FULL``) or on another storage error: the record is dropped
and counted, and ``last_error`` says why.  ``ack`` and ``peek`` likewise return
``0`` and ``[]``: unacknowledged records are sent again later and the host drops
the duplicates by ``seq``.  A file that is not a SQLite database, fails
``PRAGMA quick_check`` on open, or reports corruption later is renamed to
``<path>.corrupt-<UTC timestamp>`` (its ``-wal`` beside it) and a fresh spool is
started; ``recovered_from_corruption`` is then true and ``corrupt_path`` names
the moved file.  The records it held are lost.

Sequence numbers.  ``seq`` is assigned by the spool, starts at 1 and increases by
one per ``append`` (a record dropped because the disk is full also uses up its
number, so every gap the host sees is a dropped record or one of the cases
below).  The table uses ``AUTOINCREMENT``, so acknowledging every record never
makes a number come back.  Across restarts and corruption a side file
``<path>.seq`` holds a high-water mark ``high``: every ``seq`` ever handed out is
at most ``high``.  Before it hands out a number above ``high`` the spool writes
``high + SEQ_BLOCK`` to the side file and fsyncs it; ``close`` writes the exact
last number.  On open the next ``seq`` is

* one past the database's own counter when the database is healthy and the
  previous writer ran in the same boot (read from ``/proc``): a process crash
  does not lose WAL commits, so numbers stay gap-free;
* one past ``max(database counter, high)`` when the previous writer ran in an
  earlier boot (or the boot is unknown): commits lost to a power loss are never
  reused, at the price of a gap of up to ``SEQ_BLOCK`` after an unclean shutdown;
* one past ``high`` for a fresh or recovered database.

The guarantee is therefore: numbers only go up and no two stored records share
one, as long as the side file survives and can be written.  If writing it fails
(a full disk) numbers are handed out anyway and the next ``append`` tries again;
if both the database and the side file are lost, numbering restarts at 1.  (After
a process crash a number that was used up by a dropped record and never stored
may be handed out again; it never reached the host.)  ``dropped`` is persisted in
the database (with the next successful write when the disk was full) and copied
to the side file, from which a fresh database takes it over; the records lost
with a database corrupted while the spool was open are added to it.

Memory.  One connection per spool with a 32 KiB page cache; what the open-time
``quick_check`` pulled in is released at once.  An open spool costs about 200 KiB
of RSS and three file descriptors (database, WAL, shared-memory index).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from tinyfleet.agent.errors import ConfigError

__all__ = ["SEQ_BLOCK", "Spool", "SpoolRecord"]

SEQ_BLOCK = 1024
"""How many sequence numbers one fsync of the side file reserves."""

_SCHEMA_VERSION = 1
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpoolRecord:
    """One stored telemetry record."""

    seq: int
    session: int
    kind: str
    body: bytes


class _CorruptError(Exception):
    """Internal: the database file is damaged or is not a spool."""


@functools.cache
def _boot_id() -> str:
    """Identifier of the running boot ("" where the kernel does not provide one)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _is_corrupt(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF == _SQLITE_FULL
    return "full" in str(exc)


class Spool:
    """A bounded, persistent FIFO of telemetry records with per-device sequence numbers."""

    def __init__(
        self,
        path: Path,
        *,
        max_records: int = 10_000,
        max_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1, not {max_records}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        self._path = Path(path)
        self._side = self._path.with_name(self._path.name + ".seq")
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._last_seq = 0
        self._high = 0  # durable high-water mark in the side file
        self._pending = 0
        self._pending_bytes = 0
        self._dropped = 0
        self._dropped_stored = 0  # value of ``dropped`` in the database
        self._recovered = False
        self._corrupt_path: Path | None = None
        self._last_error: str | None = None
        self._failing = False
        try:
            self._open()
        except _CorruptError as exc:
            self._recover(str(exc), at_open=True)

    # ------------------------------------------------------------------ public

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def pending(self) -> int:
        """Records stored and not yet acknowledged."""
        return self._pending

    @property
    def pending_bytes(self) -> int:
        """Total size of the stored bodies."""
        return self._pending_bytes

    @property
    def dropped(self) -> int:
        """Records lost to the bounds or to storage errors, over the spool's lifetime."""
        return self._dropped

    @property
    def last_seq(self) -> int:
        """The last sequence number handed out (0 before the first ``append``)."""
        return self._last_seq

    @property
    def recovered_from_corruption(self) -> bool:
        """True once a corrupted database was moved aside and replaced by an empty one."""
        return self._recovered

    @property
    def corrupt_path(self) -> Path | None:
        """Where the corrupted database was moved, if it was."""
        return self._corrupt_path

    @property
    def last_error(self) -> str | None:
        """The last storage error met (kept after it clears), or None."""
        return self._last_error

    def append(self, session: int, kind: str, body: bytes) -> int:
        """Store one record and return its ``seq``; never raises on storage errors.

        Past a bound the oldest records are deleted and counted in ``dropped``.
        When the record cannot be stored (disk full, I/O error, body larger than
        ``max_bytes``) it is counted in ``dropped``, its number is used up and 0 is
        returned.
        """
        body = bytes(body)
        with self._lock:
            self._check_open()
            seq = self._last_seq + 1
            self._last_seq = seq
            if len(body) > self._max_bytes:
                self._dropped += 1
                self._note_failure(f"record of {len(body)} bytes exceeds max_bytes")
                return 0
            if seq > self._high:
                self._reserve(seq + SEQ_BLOCK - 1)
            for attempt in range(2):
                try:
                    self._append_txn(seq, session, kind, body)
                except sqlite3.DatabaseError as exc:
                    if attempt == 0 and _is_corrupt(exc) and self._recover(str(exc)):
                        continue
                    self._dropped += 1
                    reason = "disk full" if _is_full(exc) else "storage error"
                    self._note_failure(f"{reason}: {exc}")
                    return 0
                self._failing = False
                return seq
            return 0  # pragma: no cover - the loop always returns

    def peek(self, limit: int = 100, *, after: int | None = None) -> list[SpoolRecord]:
        """Up to ``limit`` oldest records (with ``seq > after``), in ``seq`` order."""
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        with self._lock:
            self._check_open()
            try:
                rows = (
                    self._db()
                    .execute(
                        "SELECT seq, session, kind, body FROM records WHERE seq > ? "
                        "ORDER BY seq LIMIT ?",
                        (after if after is not None else 0, limit),
                    )
                    .fetchall()
                )
            except sqlite3.DatabaseError as exc:
                if _is_corrupt(exc):
                    self._recover(str(exc))
                else:
                    self._note_failure(f"storage error: {exc}")
                return []
        return [SpoolRecord(int(s), int(n), str(k), bytes(b)) for s, n, k, b in rows]

    def ack(self, up_to_seq: int) -> int:
        """Delete the records with ``seq <= up_to_seq`` and return how many there were."""
        with self._lock:
            self._check_open()
            try:
                conn = self._db()
                conn.execute("BEGIN IMMEDIATE")
                count, nbytes = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(length(body)), 0) FROM records WHERE seq <= ?",
                    (up_to_seq,),
                ).fetchone()
                if count:
                    conn.execute("DELETE FROM records WHERE seq <= ?", (up_to_seq,))
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                self._rollback()
                if _is_corrupt(exc):
                    self._recover(str(exc))
                else:
                    self._note_failure(f"storage error: {exc}")
                return 0
            self._pending -= int(count)
            self._pending_bytes -= int(nbytes)
            return int(count)

    def close(self) -> None:
        """Write the side file, checkpoint and close the database; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._write_side(self._last_seq, fsync=True)
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Spool({str(self._path)!r}, pending={self._pending}, "
            f"dropped={self._dropped}, last_seq={self._last_seq})"
        )

    # ----------------------------------------------------------------- private

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"spool {self._path} is closed")

    def _db(self) -> sqlite3.Connection:
        """The connection; reopens the database if an earlier recovery could not."""
        if self._conn is None:
            try:
                self._open(known_last=self._last_seq)
            except (ConfigError, _CorruptError) as exc:
                raise sqlite3.OperationalError(f"spool database is not open: {exc}") from exc
        assert self._conn is not None
        return self._conn

    def _note_failure(self, message: str) -> None:
        self._last_error = message
        if not self._failing:
            self._failing = True
            _log.warning("telemetry spool %s: %s", self._path, message)

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _append_txn(self, seq: int, session: int, kind: str, body: bytes) -> None:
        conn = self._db()
        count = self._pending + 1
        nbytes = self._pending_bytes + len(body)
        dropped = self._dropped
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO records (seq, session, kind, body) VALUES (?, ?, ?, ?)",
                (seq, session, kind, body),
            )
            if count > self._max_records or nbytes > self._max_bytes:
                cut, n, b = self._eviction(conn, count, nbytes)
                conn.execute("DELETE FROM records WHERE seq <= ?", (cut,))
                count, nbytes, dropped = count - n, nbytes - b, dropped + n
            if dropped != self._dropped_stored:
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('dropped', ?)", (dropped,)
                )
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._pending, self._pending_bytes = count, nbytes
        self._dropped = self._dropped_stored = dropped

    def _eviction(self, conn: sqlite3.Connection, count: int, nbytes: int) -> tuple[int, int, int]:
        """The oldest records to delete to get back within the bounds: (last seq, n, bytes)."""
        cut = n = b = 0
        cur = conn.execute("SELECT seq, length(body) FROM records ORDER BY seq")
        try:
            for seq, size in cur:
                if count - n <= self._max_records and nbytes - b <= self._max_bytes:
                    break
                cut, n, b = int(seq), n + 1, b + int(size)
        finally:
            cur.close()
        return cut, n, b

    # side file ---------------------------------------------------------------

    def _read_side(self) -> tuple[int, str, int] | None:
        """(high, boot id, dropped) from the side file, or None if missing or unreadable."""
        try:
            data = json.loads(self._side.read_bytes())
            high, boot, dropped = data["high"], data["boot"], data.get("dropped", 0)
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if not (isinstance(high, int) and isinstance(boot, str) and isinstance(dropped, int)):
            return None
        return max(high, 0), boot, max(dropped, 0)

    def _write_side(self, high: int, *, fsync: bool) -> bool:
        data = {"high": high, "boot": _boot_id(), "dropped": self._dropped}
        tmp = self._side.with_name(self._side.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(json.dumps(data).encode())
                if fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, self._side)
            if fsync:
                dir_fd = os.open(self._side.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            self._note_failure(f"cannot write {self._side.name}: {exc}")
            return False
        self._high = high
        return True

    def _reserve(self, high: int) -> None:
        # On failure (disk full) the number is handed out anyway and the next
        # append tries again: losing telemetry is worse than a weaker guarantee.
        self._write_side(high, fsync=True)

    # open and recovery ---------------------------------------------------------

    def _open(self, *, known_last: int | None = None) -> None:
        """Open (or create) the database; raise ``_CorruptError`` if it is damaged.

        ``known_last`` is the last number handed out by this process, when it is
        known exactly (a reopen after a recovery at run time).
        """
        try:
            conn = sqlite3.connect(
                self._path,
                timeout=1.0,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=16,
            )
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open telemetry spool {self._path}: {exc}") from exc
        try:
            fresh, db_seq, stored_dropped, count, nbytes = self._prepare(conn)
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            if _is_corrupt(exc):
                raise _CorruptError(str(exc)) from exc
            raise ConfigError(f"cannot open telemetry spool {self._path}: {exc}") from exc
        except _CorruptError:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            raise
        self._conn = conn
        side = self._read_side()
        boot = _boot_id()
        carried = 0  # ``dropped`` taken over from the side file by a fresh database
        if known_last is not None:
            base = max(known_last, db_seq)
        elif fresh:
            base, carried = (side[0], side[2]) if side else (0, 0)
        elif side is not None and (not boot or side[1] != boot):
            base = max(db_seq, side[0])
        else:
            base = db_seq
        self._last_seq = base
        self._high = side[0] if side is not None and side[1] == boot and boot else 0
        self._pending, self._pending_bytes = count, nbytes
        self._dropped = max(stored_dropped, carried, self._dropped)
        self._dropped_stored = stored_dropped
        if fresh and (self._last_seq or self._dropped):
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)",
                    (self._last_seq,),
                )
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('dropped', ?)",
                    (self._dropped,),
                )
                conn.execute("COMMIT")
                self._dropped_stored = self._dropped
            except sqlite3.Error:
                self._rollback()  # the side file and memory still hold both numbers

    def _prepare(self, conn: sqlite3.Connection) -> tuple[bool, int, int, int, int]:
        """Set pragmas, check the file, create the schema.

        Returns (fresh, database seq counter, stored dropped, pending, pending bytes).
        """
        conn.execute("PRAGMA cache_size = -32")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 256")
        conn.execute("PRAGMA journal_size_limit = 1048576")
        check = conn.execute("PRAGMA quick_check(1)").fetchone()
        if check is None or check[0] != "ok":
            raise _CorruptError(f"quick_check: {check[0] if check else 'no answer'}")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = {
            str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        fresh = "records" not in tables
        if version not in (0, _SCHEMA_VERSION) or (version == 0 and tables):
            raise _CorruptError(f"not a telemetry spool (user_version {version}, tables {tables})")
        if fresh:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                "session INTEGER NOT NULL, kind TEXT NOT NULL, body BLOB NOT NULL)"
            )
            conn.execute(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID"
            )
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        db_seq = int(row[0]) if row else 0
        row = conn.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        dropped = int(row[0]) if row else 0
        count, nbytes = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(length(body)), 0) FROM records"
        ).fetchone()
        conn.execute("PRAGMA shrink_memory")  # what quick_check left in the page cache
        return fresh, db_seq, dropped, int(count), int(nbytes)

    def _recover(self, reason: str, *, at_open: bool = False) -> bool:
        """Move the damaged database aside and open a fresh one; False if that failed.

        At open a failure raises ``ConfigError``; at run time it is only recorded.
        """
        lost = self._pending
        if self._conn is not None:
            self._rollback()
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self._path.with_name(f"{self._path.name}.corrupt-{stamp}-{n}")
            n += 1
        try:
            if self._path.exists():
                os.replace(self._path, target)
            wal = Path(f"{self._path}-wal")
            if wal.exists():
                os.replace(wal, Path(f"{target}-wal"))
            Path(f"{self._path}-shm").unlink(missing_ok=True)
        except OSError as exc:
            message = f"corrupted ({reason}) and cannot be moved aside: {exc}"
            if at_open:
                raise ConfigError(f"telemetry spool {self._path} is {message}") from exc
            self._note_failure(message)
            return False
        _log.warning(
            "telemetry spool %s was corrupted (%s); moved to %s, %d records lost",
            self._path,
            reason,
            target,
            lost,
        )
        self._recovered = True
        self._corrupt_path = target
        self._last_error = f"corrupted: {reason}"
        self._dropped += lost
        self._pending = self._pending_bytes = 0
        try:
            self._open(known_last=None if at_open else self._last_seq)
        except (ConfigError, _CorruptError) as exc:
            if at_open:
                raise ConfigError(
                    f"cannot start a fresh telemetry spool {self._path}: {exc}"
                ) from exc
            self._note_failure(f"cannot start a fresh spool: {exc}")
            return False
        return True
