"""Reading a node's labelled samples for local training.

A node's ``data-path`` is either the agent's label buffer (``labels.db``, read
only through ``tinyfleet.agent.labels.load_labels``) or an ``.npz`` file with arrays
``x`` (n, f) float and ``y`` (n,) int (what tests and benchmarks write).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from tinyfleet.agent.fl.errors import FLDataError

__all__ = ["load_local_data", "save_npz_data"]


def save_npz_data(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Write labelled samples as an ``.npz`` data file (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, x=np.asarray(x, dtype=np.float32), y=np.asarray(y, dtype=np.int64))
    tmp.replace(path)
    return path


def load_local_data(
    path: str | Path, preprocess: str | None = None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Features float32 (n, f) and labels int64 (n,) of a node; ``FLDataError`` if unusable.

    ``preprocess`` selects the label buffer's samples of that feature pipeline (the
    model's); ``limit`` keeps the newest samples.
    """
    p = Path(path)
    if not p.exists():
        raise FLDataError(f"no labelled data at {p}")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as data:
                x, y = np.asarray(data["x"]), np.asarray(data["y"])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise FLDataError(f"cannot read labelled data {p}: {exc}") from exc
    else:
        from tinyfleet.agent.labels import LabelError, load_labels

        try:
            x, y = load_labels(p, preprocess, limit)  # read-only: the agent keeps writing
        except LabelError as exc:
            raise FLDataError(f"cannot read labelled data: {exc}") from exc
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise FLDataError(
            f"labelled data {p} has features {tuple(x.shape)} and labels {tuple(y.shape)}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise FLDataError(f"labels in {p} are not integers ({y.dtype})")
    if limit is not None:
        x, y = x[-limit:], y[-limit:]
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)
