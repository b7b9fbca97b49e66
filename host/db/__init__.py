"""The registry's database: engines, ORM tables and packaged Alembic migrations.

SQLite (``sqlite:///<home>/registry.db``) by default, PostgreSQL
(``postgresql+psycopg://user@host/db``) by URL.  Later features add tables by
adding Alembic revisions under ``migrations/versions``.
"""

from __future__ import annotations

from tinyfleet.host.db.engine import (
    default_url,
    make_engine,
    make_sessionmaker,
    mask_url,
    storage_errors,
    writer,
)
from tinyfleet.host.db.migrate import (
    MIGRATIONS_DIR,
    alembic_config,
    current_revision,
    head_revision,
    new_revision,
    upgrade,
)
from tinyfleet.host.db.tables import (
    VERSION_STATUSES,
    AliasRow,
    ArtifactRow,
    Base,
    ModelRow,
    UTCDateTime,
    VersionRow,
    utcnow,
)

__all__ = [
    "MIGRATIONS_DIR",
    "VERSION_STATUSES",
    "AliasRow",
    "ArtifactRow",
    "Base",
    "ModelRow",
    "UTCDateTime",
    "VersionRow",
    "alembic_config",
    "current_revision",
    "default_url",
    "head_revision",
    "make_engine",
    "make_sessionmaker",
    "mask_url",
    "new_revision",
    "storage_errors",
    "upgrade",
    "utcnow",
    "writer",
]
