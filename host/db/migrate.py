"""Run the registry's Alembic migrations programmatically (no alembic.ini)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError

from tinyfleet.host.db.engine import make_engine, mask_url, writer
from tinyfleet.host.errors import StorageError

__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "current_revision",
    "head_revision",
    "new_revision",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Serialises concurrent upgrades of one PostgreSQL database (any constant works).
_PG_LOCK_ID = 0x7446_6C74


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic ``Config`` pointing at the packaged migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("file_template", "rev_%%(rev)s_%%(slug)s")
    cfg.set_main_option("truncate_slug_length", "40")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    """The newest revision shipped with this package."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (``None`` before the first upgrade)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine_or_url: Engine | str, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (``alembic upgrade head``).

    Runs in one transaction; concurrent callers wait for each other (SQLite
    write lock, PostgreSQL advisory lock).  Failures raise ``StorageError``.
    """
    owned = isinstance(engine_or_url, str)
    engine = make_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    try:
        with writer(engine).begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_ID})")
            command.upgrade(alembic_config(conn), revision)
    except SQLAlchemyError as exc:
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        raise StorageError(f"cannot migrate database {mask_url(engine.url)}: {reason}") from exc
    finally:
        if owned:
            engine.dispose()


def new_revision(message: str, *, autogenerate: bool = True) -> Path:
    """Write the next revision file (development helper; review the result).

    The revision id is the next four-digit number; with ``autogenerate`` the
    body is the difference between ``tables.py`` and the current head, computed
    on a scratch SQLite database.
    """
    script = ScriptDirectory.from_config(alembic_config())
    numbers = [int(r.revision) for r in script.walk_revisions() if r.revision.isdigit()]
    rev_id = f"{max(numbers, default=0) + 1:04d}"
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'scratch.db'}"
        engine = make_engine(make_url(url))
        try:
            upgrade(engine)
            with engine.begin() as conn:
                cfg = alembic_config(conn)
                command.revision(cfg, message=message, autogenerate=autogenerate, rev_id=rev_id)
        finally:
            engine.dispose()
    return next(MIGRATIONS_DIR.joinpath("versions").glob(f"rev_{rev_id}_*.py"))
