"""The device's buffer of labelled samples, for federated retraining on the device.

Applications (and the simulator, which knows the ground truth) add labelled samples
through ``Agent.add_label`` / ``Agent.infer(raw, label=…)`` or the local API's
``label`` op; the agent stores the *features* the serving version's feature
pipeline computed (the model's input, not the raw sensor data), with the name of
that pipeline and the ``name@version`` that served.  Flower's ClientApp, another
process, reads them with ``load_labels`` (read-only).  Nothing here is ever sent
in telemetry: the samples stay on the device.

Storage: one SQLite file, ``<state_dir>/labels.db``, in WAL mode (a reader in
another process never blocks the agent's writes, nor the reverse), committed per
``add`` with ``synchronous=NORMAL``, a 32 KiB page cache (many simulated devices
share a process); the agent opens it when the first sample comes.  Table ``labels``: ``id`` (insertion order),
``ts`` (UTC seconds), ``preprocess``, ``model``, ``n_features``, ``features``
(little-endian float32 BLOB) and ``label``.  Bounded: at most ``capacity`` rows;
an ``add`` past it deletes the oldest rows in the same transaction.

Every sample of one ``preprocess`` has the same number of features (a model's
input size); a sample that does not fit, has a non-finite value or a label that is
not an integer ≥ 0 is refused with ``LabelError``, as is a file that is not a label
buffer.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from tinyfleet.agent.errors import TinyfleetError

__all__ = ["DEFAULT_CAPACITY", "MAX_LABEL", "LabelBuffer", "LabelError", "load_labels"]

DEFAULT_CAPACITY = 5000
MAX_CAPACITY = 10_000_000
MAX_LABEL = 2**31 - 1
MAX_FEATURES = 1_000_000
_SCHEMA_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MODEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}@[1-9][0-9]{0,18}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    preprocess TEXT NOT NULL,
    model TEXT NOT NULL,
    n_features INTEGER NOT NULL,
    features BLOB NOT NULL,
    label INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_preprocess ON labels (preprocess, id);
"""


class LabelError(TinyfleetError):
    """A labelled sample or the label buffer is invalid (features, label, file)."""

    exit_code = 17


def _features(values: Any) -> np.ndarray:
    try:
        f = np.asarray(values, dtype=np.float32).ravel()
    except (TypeError, ValueError) as exc:
        raise LabelError(f"features must be numbers: {exc}") from None
    if f.size == 0 or f.size > MAX_FEATURES:
        raise LabelError(f"features must hold 1 to {MAX_FEATURES} values; got {f.size}")
    if not np.all(np.isfinite(f)):
        raise LabelError("features must be finite numbers (no NaN or infinity)")
    return f


def check_label(label: Any, n_classes: int | None = None) -> int:
    """``label`` as an int if it is an integer in ``[0, n_classes)``; ``LabelError`` otherwise."""
    if isinstance(label, bool) or not isinstance(label, int | np.integer):
        raise LabelError(f"a label is an integer class index; got {label!r}")
    value = int(label)
    upper = MAX_LABEL if n_classes is None else n_classes - 1
    if not 0 <= value <= upper:
        raise LabelError(f"label {value} is out of range 0..{upper}")
    return value


class LabelBuffer:
    """Bounded, thread-safe store of labelled feature vectors in a SQLite file."""

    def __init__(
        self, path: Path, capacity: int = DEFAULT_CAPACITY, *, readonly: bool = False
    ) -> None:
        if not 1 <= capacity <= MAX_CAPACITY:
            raise LabelError(f"label buffer capacity must be 1..{MAX_CAPACITY}; got {capacity}")
        self.path = Path(path)
        self.capacity = capacity
        self.readonly = readonly
        self._lock = threading.Lock()
        self._widths: dict[str, int] = {}
        db: sqlite3.Connection | None = None
        try:
            if readonly:
                if not self.path.exists():
                    raise LabelError(f"{self.path}: no label buffer here")
                db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
                self._check_schema(db)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA cache_size = -32")  # 32 KiB: many simulated devices per process
                db.executescript(_SCHEMA)
                self._check_schema(db, write=True)
            self._count = int(db.execute("SELECT count(*) FROM labels").fetchone()[0])
        except (sqlite3.Error, LabelError) as exc:
            if db is not None:
                db.close()
            if isinstance(exc, LabelError):
                raise
            raise LabelError(f"{self.path}: not a usable label buffer: {exc}") from None
        self._db = db

    def _check_schema(self, db: sqlite3.Connection, write: bool = False) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version == 0 and write:
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        elif version != _SCHEMA_VERSION:
            raise LabelError(
                f"{self.path}: label buffer schema {version}; this agent reads {_SCHEMA_VERSION}"
            )
        cols = {row[1] for row in db.execute("PRAGMA table_info(labels)")}
        if not {"id", "preprocess", "model", "n_features", "features", "label"} <= cols:
            raise LabelError(f"{self.path}: not a label buffer (table labels missing or wrong)")

    @classmethod
    def open_readonly(cls, path: Path) -> LabelBuffer:
        """Open for reading only, e.g. from the Flower ClientApp while the agent writes."""
        return cls(path, readonly=True)

    # ------------------------------------------------------------------ writing

    def _width(self, preprocess: str) -> int | None:
        width = self._widths.get(preprocess)
        if width is None:
            row = self._db.execute(
                "SELECT n_features FROM labels WHERE preprocess = ? ORDER BY id DESC LIMIT 1",
                (preprocess,),
            ).fetchone()
            if row is not None:
                width = self._widths[preprocess] = int(row[0])
        return width

    def add(self, features: np.ndarray, label: int, *, preprocess: str, model: str) -> None:
        """Store one labelled sample; drops the oldest samples beyond ``capacity``."""
        if self.readonly:
            raise LabelError(f"{self.path}: opened read-only")
        f = _features(features)
        value = check_label(label)
        if not isinstance(preprocess, str) or not _NAME_RE.match(preprocess):
            raise LabelError(f"preprocess must be a pipeline name; got {preprocess!r}")
        if not isinstance(model, str) or not _MODEL_RE.match(model):
            raise LabelError(f"model must be name@version; got {model!r}")
        with self._lock:
            try:
                width = self._width(preprocess)
                if width is not None and width != f.size:
                    raise LabelError(
                        f"{f.size} features, but the samples of {preprocess!r} have {width}"
                    )
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute(
                        "INSERT INTO labels (ts, preprocess, model, n_features, features, label)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (time.time(), preprocess, model, f.size, f.astype("<f4").tobytes(), value),
                    )
                    self._count += 1
                    if self._count > self.capacity:
                        cur = self._db.execute(
                            "DELETE FROM labels WHERE id <= "
                            "(SELECT id FROM labels ORDER BY id DESC LIMIT 1 OFFSET ?)",
                            (self.capacity,),
                        )
                        self._count -= max(0, cur.rowcount)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    self._count = int(self._db.execute("SELECT count(*) FROM labels").fetchone()[0])
                    raise
                self._widths[preprocess] = f.size
            except sqlite3.Error as exc:
                raise LabelError(f"{self.path}: cannot store the sample: {exc}") from None

    # ------------------------------------------------------------------ reading

    def count(self, preprocess: str | None = None) -> int:
        """Samples stored (of ``preprocess`` only, if given)."""
        with self._lock:
            try:
                if preprocess is None:
                    row = self._db.execute("SELECT count(*) FROM labels").fetchone()
                else:
                    row = self._db.execute(
                        "SELECT count(*) FROM labels WHERE preprocess = ?", (preprocess,)
                    ).fetchone()
            except sqlite3.Error as exc:
                raise LabelError(f"{self.path}: cannot read: {exc}") from None
        return int(row[0])

    def load(
        self, preprocess: str | None = None, limit: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The newest ``limit`` samples (all if None), oldest first: features (n, f), labels (n,).

        Without ``preprocess`` every stored sample must have the same feature count.
        """
        if limit is not None and limit < 0:
            raise LabelError(f"limit must be >= 0; got {limit}")
        sql = "SELECT n_features, features, label FROM labels"
        args: list[Any] = []
        if preprocess is not None:
            sql += " WHERE preprocess = ?"
            args.append(preprocess)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock:
            try:
                rows = self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise LabelError(f"{self.path}: cannot read: {exc}") from None
        rows.reverse()
        widths = {int(r[0]) for r in rows}
        if len(widths) > 1:
            raise LabelError(
                f"{self.path}: samples of different sizes {sorted(widths)}; pass a preprocess"
            )
        width = widths.pop() if widths else (self._widths.get(preprocess or "", 0))
        x = np.empty((len(rows), width), dtype=np.float32)
        for i, (n, blob, _) in enumerate(rows):
            if len(blob) != 4 * n:
                raise LabelError(f"{self.path}: a stored sample is damaged")
            x[i] = np.frombuffer(blob, dtype="<f4")
        y = np.fromiter((int(r[2]) for r in rows), dtype=np.int64, count=len(rows))
        return x, y

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def load_labels(
    path: Path, preprocess: str | None = None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a device's labelled samples (read-only; for the ClientApp process)."""
    with LabelBuffer.open_readonly(path) as buf:
        return buf.load(preprocess, limit)
