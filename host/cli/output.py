"""Output for the CLI: results on stdout (tables or one JSON object), everything else on stderr."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from tinyfleet.host.pipeline import Reporter

# Created lazily so tests can swap sys.stdout/sys.stderr (CliRunner) before first use.


def out() -> Console:
    # Tables keep their shape when stdout is a pipe or a file (no terminal width to fit).
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)


def err() -> Console:
    return Console(file=sys.stderr, soft_wrap=True)


_json_stream: TextIO | None = None


@contextmanager
def json_stdout() -> Iterator[None]:
    """Keep stdout for the one JSON document: anything else written to file descriptor 1
    while the command runs (TensorFlow and converters print there) goes to stderr."""
    global _json_stream
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (embedded use): nothing to protect
        yield
        return
    os.dup2(2, 1)
    _json_stream = os.fdopen(saved, "w", closefd=True)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        _json_stream.close()
        _json_stream = None


def _write_json(payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2, default=str) + "\n"
    stream = _json_stream or sys.stdout
    stream.write(text)
    stream.flush()


def emit_json(value: dict[str, Any]) -> None:
    """One JSON object on stdout: ``{"ok": true, ...}``."""
    _write_json({"ok": True, **value})


def emit_error_json(code: int, name: str, message: str) -> None:
    _write_json({"ok": False, "error": {"code": code, "name": name, "message": message}})


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[Text("" if v is None else str(v)) for v in r])
    out().print(t)


class RichReporter(Reporter):
    """Draws pipeline progress on stderr."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: Any = None

    def stage(self, name: str) -> None:
        self.task = self.progress.add_task(name, total=None, info="")

    def step(self, done: int, total: int, info: str = "") -> None:
        if self.task is None:
            return
        if total:
            self.progress.update(self.task, total=total, completed=done, info=info)
        else:
            self.progress.update(self.task, info=info)

    def done(self, name: str, seconds: float) -> None:
        if self.task is not None:
            task = self.progress.tasks[self.task]
            total = task.total or 1
            self.progress.update(self.task, total=total, completed=total, info=f"{seconds:.1f}s")
        self.task = None


@contextmanager
def reporter(enabled: bool = True) -> Iterator[Reporter]:
    if not enabled:
        yield Reporter()
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err(),
        transient=False,
    )
    with progress:
        r = RichReporter(progress)
        yield r
