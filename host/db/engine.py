"""Engines for the registry database: SQLite by default, PostgreSQL by URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import Session, sessionmaker

from tinyfleet.host.errors import StorageError

__all__ = [
    "BEGIN_IMMEDIATE",
    "CONNECT_TIMEOUT_S",
    "SQLITE_BUSY_TIMEOUT_MS",
    "default_url",
    "make_engine",
    "make_sessionmaker",
    "mask_url",
    "storage_errors",
    "writer",
]

CONNECT_TIMEOUT_S = 5
"""PostgreSQL connect timeout unless the URL sets ``connect_timeout``."""

SQLITE_BUSY_TIMEOUT_MS = 10_000
"""How long a SQLite connection waits for another writer's lock."""

BEGIN_IMMEDIATE = "tinyfleet_begin_immediate"
"""Execution option: on SQLite, open the transaction with ``BEGIN IMMEDIATE``."""


def default_url(home: Path) -> str:
    """The default database: ``sqlite:///<home>/registry.db``."""
    return f"sqlite:///{Path(home).resolve() / 'registry.db'}"


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***``."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except ArgumentError:
        return "<unparseable database URL>"
    return parsed.render_as_string(hide_password=True)


def _reason(exc: BaseException) -> str:
    """One line describing a database error (the driver's message, without SQL)."""
    inner = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = " ".join(str(inner).split())
    return text or type(inner).__name__


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy emit BEGIN itself (see _sqlite_begin) so DDL and reads are
    # transactional too; pysqlite's own implicit BEGIN only covers DML.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
    finally:
        cur.close()


def _sqlite_begin(conn: Any) -> None:
    immediate = conn.get_execution_options().get(BEGIN_IMMEDIATE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str | URL, *, check: bool = True, **kwargs: Any) -> Engine:
    """Create an engine for ``url`` and (with ``check``) open one connection.

    SQLite gets WAL, foreign keys and a busy timeout on every connection;
    ``postgresql://`` URLs use psycopg 3 and a connect timeout.  A bad URL, a
    missing driver or an unreachable database raises ``StorageError`` naming the
    URL (password masked) and the reason.
    """
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except ArgumentError as exc:
        raise StorageError(f"invalid database URL {mask_url(url)!s}: {exc}") from None
    shown = mask_url(parsed)
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = dict(kwargs.pop("connect_args", {}))
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        if "connect_timeout" not in parsed.query:
            connect_args.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        kwargs.setdefault("pool_pre_ping", True)
    elif backend == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            parent = Path(database).expanduser().resolve().parent
            if not parent.is_dir():
                raise StorageError(
                    f"cannot open database {shown}: directory {parent} does not exist"
                )
        connect_args.setdefault("check_same_thread", False)
    else:
        raise StorageError(
            f"unsupported database {shown}: use sqlite:///PATH or postgresql://USER@HOST/DB"
        )
    try:
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise StorageError(f"cannot use database {shown}: {exc}") from None
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    if check:
        try:
            with engine.connect():
                pass
        except SQLAlchemyError as exc:
            engine.dispose()
            raise StorageError(f"cannot reach database {shown}: {_reason(exc)}") from None
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def writer(engine: Engine) -> Engine:
    """The same engine whose transactions take SQLite's write lock at BEGIN.

    A read-then-write transaction (allocate the next number, insert it) then
    waits for other writers instead of failing on a stale snapshot.  No effect
    on PostgreSQL.
    """
    return engine.execution_options(**{BEGIN_IMMEDIATE: True})


@contextmanager
def storage_errors(engine: Engine, what: str) -> Iterator[None]:
    """Turn connection-level failures (server gone, database locked) into ``StorageError``."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        raise StorageError(f"{what} on {mask_url(engine.url)}: {_reason(exc)}") from exc
