"""The device's on-disk telemetry spool, on real SQLite files."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tinyfleet.agent.spool import SEQ_BLOCK, Spool, SpoolRecord

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _body(i: int, size: int = 0) -> bytes:
    return json.dumps({"i": i, "pad": "x" * size}).encode()


def _all(spool: Spool) -> list[SpoolRecord]:
    return spool.peek(1_000_000)


def test_append_then_peek_in_seq_order(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db") as spool:
        seqs = [
            spool.append(3, kind, _body(i)) for i, kind in enumerate(["heartbeat", "drift"] * 5)
        ]
        assert seqs == list(range(1, 11))
        assert spool.pending == 10 and spool.last_seq == 10
        first = spool.peek(3)
        assert first == [
            SpoolRecord(1, 3, "heartbeat", _body(0)),
            SpoolRecord(2, 3, "drift", _body(1)),
            SpoolRecord(3, 3, "heartbeat", _body(2)),
        ]
        assert [r.seq for r in spool.peek(4, after=3)] == [4, 5, 6, 7]
        assert [r.seq for r in spool.peek(100, after=8)] == [9, 10]
        assert spool.peek(0) == []
        assert spool.peek(5) == spool.peek(5)  # peek does not consume
        assert spool.pending_bytes == sum(len(_body(i)) for i in range(10))


def test_seq_monotonic_across_reopen_and_after_acking_everything(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path) as spool:
        assert [spool.append(1, "event", _body(i)) for i in range(3)] == [1, 2, 3]
    with Spool(path) as spool:
        assert spool.last_seq == 3 and spool.pending == 3
        assert spool.append(2, "event", _body(3)) == 4
        assert spool.ack(4) == 4
        assert spool.pending == 0
    # The database alone (AUTOINCREMENT) keeps the counter when nothing is left in it.
    (path.parent / "spool.db.seq").unlink()
    with Spool(path) as spool:
        assert spool.pending == 0
        assert spool.append(3, "event", _body(5)) == 5
        assert [r.session for r in _all(spool)] == [3]


def test_record_bound_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path, max_records=5) as spool:
        for i in range(8):
            spool.append(1, "inference", _body(i))
        assert spool.pending == 5
        assert spool.dropped == 3
        assert [r.seq for r in _all(spool)] == [4, 5, 6, 7, 8]
    with Spool(path, max_records=5) as spool:
        assert spool.dropped == 3
        spool.append(1, "inference", _body(8))
        assert spool.dropped == 4
        assert [r.seq for r in _all(spool)] == [5, 6, 7, 8, 9]
    # A smaller bound on a later open trims on the next append.
    with Spool(path, max_records=2) as spool:
        spool.append(1, "inference", _body(9))
        assert [r.seq for r in _all(spool)] == [9, 10]
        assert spool.dropped == 8


def test_byte_bound_drops_the_oldest_and_rejects_oversized_bodies(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    body = b"y" * 30
    with Spool(path, max_bytes=100) as spool:
        for _ in range(5):
            spool.append(1, "inference", body)
        assert spool.pending == 3 and spool.pending_bytes == 90
        assert spool.dropped == 2
        assert [r.seq for r in _all(spool)] == [3, 4, 5]
        assert spool.append(1, "inference", b"z" * 101) == 0
        assert spool.dropped == 3
        assert spool.pending == 3  # the stored records are kept
        assert spool.append(1, "inference", b"z" * 100) == 7  # 6 was used up
        assert [r.seq for r in _all(spool)] == [7]
        assert spool.dropped == 6
    with Spool(path, max_bytes=100) as spool:
        assert spool.dropped == 6


def test_ack_is_idempotent(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db") as spool:
        for i in range(6):
            spool.append(1, "heartbeat", _body(i))
        assert spool.ack(3) == 3
        assert spool.ack(3) == 0
        assert spool.ack(2) == 0
        assert [r.seq for r in _all(spool)] == [4, 5, 6]
        assert spool.ack(100) == 3
        assert spool.ack(100) == 0
        assert spool.pending == 0 and spool.pending_bytes == 0
        assert spool.append(1, "heartbeat", _body(6)) == 7


def test_closed_spool_refuses_work(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.close()
    spool.close()
    with pytest.raises(ValueError, match="closed"):
        spool.append(1, "heartbeat", b"{}")
    with pytest.raises(ValueError, match="closed"):
        spool.peek()


_CHILD = """
import sys
from pathlib import Path
from tinyfleet.agent.spool import Spool

spool = Spool(Path(sys.argv[1]))
run = sys.argv[2]
i = 0
while True:
    seq = spool.append(1, "inference", ('{"run": %s, "i": %d}' % (run, i)).encode())
    sys.stdout.write(f"{seq}\\n")
    sys.stdout.flush()
    i += 1
"""


def _append_until_killed(path: Path, run: int, appends: int) -> list[int]:
    """Run a child that appends in a loop, SIGKILL it; the seqs it reported as stored."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(run)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    reported: list[int] = []
    deadline = time.monotonic() + 60
    while len(reported) < appends and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        reported.append(int(line))
    os.kill(child.pid, signal.SIGKILL)
    rest, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    reported += [int(x) for x in rest.split()]
    assert len(reported) >= appends, "the child did not get going"
    return reported


def test_sigkilled_writer_leaves_a_gap_free_prefix(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    first = _append_until_killed(path, 0, 300)
    second = _append_until_killed(path, 1, 300)
    assert first == list(range(1, len(first) + 1))
    with Spool(path) as spool:
        records = _all(spool)
        seqs = [r.seq for r in records]
        # Everything the writers saw stored is there, numbers are contiguous from 1.
        assert seqs == list(range(1, len(seqs) + 1))
        assert set(first) | set(second) <= set(seqs)
        bodies = [json.loads(r.body) for r in records]
        for run in (0, 1):
            indices = [b["i"] for b in bodies if b["run"] == run]
            assert indices == list(range(len(indices)))  # a prefix of what run appended
        # After a crash in the same boot the numbering continues without a gap.
        if BOOT_ID.exists():
            committed_by_first = sum(1 for b in bodies if b["run"] == 0)
            assert second[0] == committed_by_first + 1
            assert spool.append(1, "inference", b"{}") == seqs[-1] + 1


def test_next_boot_skips_numbers_a_power_loss_may_have_lost(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    side = tmp_path / "spool.db.seq"
    with Spool(path) as spool:
        for i in range(3):
            spool.append(1, "event", _body(i))
    # A writer of an earlier boot had reserved numbers up to 5000 and did not close.
    side.write_text(json.dumps({"high": 5000, "boot": "an-earlier-boot", "dropped": 0}))
    with Spool(path) as spool:
        assert spool.append(1, "event", b"{}") == 5001
        assert json.loads(side.read_text())["high"] >= 5001
    assert json.loads(side.read_text())["high"] == 5001  # exact after a clean close
    if BOOT_ID.exists():
        # A crashed writer of this boot: WAL commits survive, no numbers are skipped.
        boot = BOOT_ID.read_text().strip()
        side.write_text(json.dumps({"high": 9000, "boot": boot, "dropped": 0}))
        with Spool(path) as spool:
            assert spool.append(1, "event", b"{}") == 5002


def test_side_file_reserves_ahead_of_the_numbers_handed_out(tmp_path: Path) -> None:
    side = tmp_path / "spool.db.seq"
    with Spool(tmp_path / "spool.db") as spool:
        spool.append(1, "event", b"{}")
        assert json.loads(side.read_text())["high"] == SEQ_BLOCK
        for _ in range(SEQ_BLOCK):
            spool.append(1, "event", b"{}")
        assert json.loads(side.read_text())["high"] == 2 * SEQ_BLOCK
        assert spool.last_seq == SEQ_BLOCK + 1


def test_non_sqlite_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    junk = b"this is not a database\n" * 200
    path.write_bytes(junk)
    with Spool(path) as spool:
        assert spool.recovered_from_corruption
        assert spool.corrupt_path is not None
        assert spool.corrupt_path.name.startswith("spool.db.corrupt-")
        assert spool.corrupt_path.read_bytes() == junk
        assert spool.append(1, "heartbeat", b"{}") == 1
    with Spool(path) as spool:
        assert not spool.recovered_from_corruption
        assert spool.pending == 1


def test_garbage_over_the_file_keeps_seq_going_from_the_side_file(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path, max_records=100) as spool:
        for i in range(300):
            spool.append(1, "inference", _body(i, 200))
        dropped = spool.dropped
    assert dropped == 200
    raw = bytearray(path.read_bytes())
    raw[100:] = os.urandom(len(raw) - 100)  # header kept, everything after it garbage
    path.write_bytes(bytes(raw))
    with Spool(path) as spool:
        assert spool.recovered_from_corruption
        assert spool.pending == 0
        assert spool.dropped >= dropped
        assert spool.append(1, "inference", b"{}") == 301
    with Spool(path) as spool:
        assert [r.seq for r in _all(spool)] == [301]
        assert spool.dropped >= dropped


def test_corruption_found_while_running_is_recovered(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path) as spool:
        for i in range(400):
            spool.append(1, "inference", _body(i, 1000))
    with Spool(path) as spool:
        assert not spool.recovered_from_corruption
        with open(path, "r+b") as fh:  # the file is damaged under the open spool
            fh.seek(4096)
            fh.write(os.urandom(os.path.getsize(path) - 4096))
        assert spool.peek(1000) == []
        assert spool.recovered_from_corruption
        assert spool.corrupt_path is not None and spool.corrupt_path.exists()
        assert spool.dropped == 400
        assert spool.append(1, "inference", b"{}") == 401
        assert [r.seq for r in _all(spool)] == [401]
    with Spool(path) as spool:
        assert spool.dropped == 400 and spool.last_seq == 401


def test_foreign_sqlite_database_is_moved_aside_untouched(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('ada')")
    conn.commit()
    conn.close()
    with Spool(path) as spool:
        assert spool.recovered_from_corruption
        moved = spool.corrupt_path
        assert spool.append(1, "event", b"{}") == 1
    assert moved is not None
    conn = sqlite3.connect(moved)
    assert conn.execute("SELECT name FROM users").fetchall() == [("ada",)]
    conn.close()


def test_two_appending_threads_and_one_draining_thread(tmp_path: Path) -> None:
    per_thread = 1500
    received: list[SpoolRecord] = []
    done = threading.Event()
    errors: list[BaseException] = []

    with Spool(tmp_path / "spool.db") as spool:

        def produce(tag: int) -> None:
            try:
                for i in range(per_thread):
                    assert spool.append(tag, "inference", b"%d:%d" % (tag, i)) > 0
            except BaseException as exc:
                errors.append(exc)

        def drain() -> None:
            try:
                while True:
                    batch = spool.peek(37)
                    if batch:
                        received.extend(batch)
                        assert spool.ack(batch[-1].seq) == len(batch)
                    elif done.is_set() and spool.pending == 0:
                        return
                    else:
                        time.sleep(0.0005)
            except BaseException as exc:
                errors.append(exc)

        producers = [threading.Thread(target=produce, args=(t,)) for t in (1, 2)]
        drainer = threading.Thread(target=drain)
        for t in [*producers, drainer]:
            t.start()
        for t in producers:
            t.join()
        done.set()
        drainer.join(timeout=60)
        assert not drainer.is_alive()
        assert not errors, errors
        assert spool.pending == 0 and spool.dropped == 0

    seqs = [r.seq for r in received]
    assert seqs == list(range(1, 2 * per_thread + 1))  # no loss, no duplicate, in order
    for tag in (1, 2):
        mine = [r.body for r in received if r.session == tag]
        assert mine == [b"%d:%d" % (tag, i) for i in range(per_thread)]


def test_full_disk_drops_and_counts_without_raising(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    spool.append(1, "inference", _body(0, 3000))
    conn = spool._conn  # simulate a full disk: SQLite may not grow the file any further
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 6}")
    results = [spool.append(1, "inference", _body(i, 3000)) for i in range(1, 20)]
    stored = [s for s in results if s]
    assert 0 < len(stored) < len(results)
    assert spool.dropped == results.count(0)
    assert spool.last_error is not None and "full" in spool.last_error
    assert spool.pending == 1 + len(stored)
    assert [r.seq for r in _all(spool)] == [1, *stored]
    lost = spool.dropped
    # Acknowledging frees pages; appends succeed again and the counter is persisted.
    assert spool.ack(spool.last_seq) == 1 + len(stored)
    assert spool.append(1, "inference", _body(99, 3000)) == 21
    spool.close()
    with Spool(path) as again:
        assert again.dropped == lost
        assert [r.seq for r in _all(again)] == [21]
