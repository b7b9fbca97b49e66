"""The labelled-sample buffer (agent/labels.py)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tinyfleet.agent.labels import LabelBuffer, LabelError, load_labels

MODEL = "vibration@3"


def test_add_load_count_in_insertion_order(tmp_path: Path) -> None:
    with LabelBuffer(tmp_path / "labels.db") as buf:
        for i in range(5):
            buf.add(np.full(4, i, np.float32), i % 3, preprocess="vibration-v1", model=MODEL)
        buf.add(np.arange(2, dtype=np.float64), 1, preprocess="identity", model="tiny@1")
        assert buf.count() == 6 and buf.count("vibration-v1") == 5 and buf.count("nope") == 0
        x, y = buf.load("vibration-v1")
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (5, 4)
        assert x[:, 0].tolist() == [0, 1, 2, 3, 4] and y.tolist() == [0, 1, 2, 0, 1]
        x, y = buf.load("vibration-v1", limit=2)  # the newest two, oldest first
        assert x[:, 0].tolist() == [3, 4] and y.tolist() == [0, 1]
        x, y = buf.load("identity")
        assert x.tolist() == [[0.0, 1.0]]
        with pytest.raises(LabelError, match="different sizes"):
            buf.load()
        x, y = buf.load("nope")
        assert x.shape[0] == 0 and y.shape == (0,)
    # persisted
    with LabelBuffer(tmp_path / "labels.db") as buf:
        assert buf.count() == 6
        with pytest.raises(LabelError, match="have 4"):
            buf.add(np.zeros(3), 0, preprocess="vibration-v1", model=MODEL)


def test_bounded_keeps_the_newest(tmp_path: Path) -> None:
    with LabelBuffer(tmp_path / "labels.db", capacity=10) as buf:
        for i in range(25):
            buf.add(np.array([i, -i], np.float32), i % 4, preprocess="identity", model="tiny@1")
        assert buf.count() == 10
        x, y = buf.load()
        assert x[:, 0].tolist() == list(range(15, 25))
        assert y.tolist() == [i % 4 for i in range(15, 25)]
    # a smaller capacity on reopen trims at the next add
    with LabelBuffer(tmp_path / "labels.db", capacity=3) as buf:
        buf.add(np.array([99, 0], np.float32), 0, preprocess="identity", model="tiny@1")
        assert buf.count() == 3 and buf.load()[0][:, 0].tolist() == [23, 24, 99]


@pytest.mark.parametrize(
    ("features", "label", "match"),
    [
        ([1.0, float("nan")], 0, "finite"),
        ([1.0, float("inf")], 0, "finite"),
        ([], 0, "1 to"),
        (["a", "b"], 0, "numbers"),
        ([1.0, 2.0], -1, "out of range"),
        ([1.0, 2.0], 1.5, "integer"),
        ([1.0, 2.0], True, "integer"),
        ([1.0, 2.0], "2", "integer"),
    ],
)
def test_refuses_bad_samples(tmp_path: Path, features: list, label: object, match: str) -> None:
    with LabelBuffer(tmp_path / "labels.db") as buf:
        with pytest.raises(LabelError, match=match):
            buf.add(features, label, preprocess="identity", model="tiny@1")  # type: ignore[arg-type]
        with pytest.raises(LabelError, match="preprocess"):
            buf.add(np.zeros(2), 0, preprocess="", model="tiny@1")
        with pytest.raises(LabelError, match="name@version"):
            buf.add(np.zeros(2), 0, preprocess="identity", model="tiny")
        assert buf.count() == 0
    assert LabelError.exit_code == 17


def test_refuses_a_file_that_is_not_a_buffer(tmp_path: Path) -> None:
    bad = tmp_path / "labels.db"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LabelError, match="not a usable label buffer"):
        LabelBuffer(bad)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE labels (x INTEGER)")
    with pytest.raises(LabelError, match=r"not a (usable )?label buffer"):
        LabelBuffer(other)
    with pytest.raises(LabelError, match="no label buffer"):
        load_labels(tmp_path / "missing.db")
    with pytest.raises(LabelError, match="capacity"):
        LabelBuffer(tmp_path / "x.db", capacity=0)


READER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tinyfleet.agent.labels import load_labels
    path = Path(sys.argv[1])
    seen = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        x, y = load_labels(path, "identity")
        seen.append(len(y))
        assert x.shape == (len(y), 3) and (x[:, 0] == y).all(), "torn read"
        if len(y) >= 200:
            break
    print(max(seen), len(set(seen)))
    """
)


def test_another_process_reads_while_the_agent_writes(tmp_path: Path) -> None:
    path = tmp_path / "labels.db"
    buf = LabelBuffer(path)
    buf.add(np.zeros(3), 0, preprocess="identity", model="tiny@1")
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        for i in range(1, 200):
            row = np.array([i % 7, i, 0.5], np.float32)
            buf.add(row, i % 7, preprocess="identity", model="tiny@1")
        out, _ = reader.communicate(timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
    assert reader.returncode == 0
    most, _distinct = (int(v) for v in out.split())
    assert most == 200
    buf.close()
    # and after the writer closed (no -wal / -shm left)
    x, y = load_labels(path, "identity", limit=5)
    assert x[:, 1].tolist() == [195, 196, 197, 198, 199] and len(y) == 5
    with LabelBuffer.open_readonly(path) as ro, pytest.raises(LabelError, match="read-only"):
        ro.add(np.zeros(3), 0, preprocess="identity", model="tiny@1")
