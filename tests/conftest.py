"""Shared pytest fixtures, one section per subsystem.

Add a new section (a banner comment and its fixtures) rather than mixing
fixtures of different subsystems; keep heavy imports inside the fixtures.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tinyfleet.host.keys import SigningKey
    from tinyfleet.host.registry import Registry


# =============================================================================
# Registry, signing keys and databases (SQLite and PostgreSQL)
# =============================================================================

PG_HOST = os.environ.get("TINYFLEET_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TINYFLEET_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TINYFLEET_TEST_PG_USER", "postgres")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database ``tinyfleet_test_<random>``, dropped afterwards.

    Skips only if no server answers on 127.0.0.1:5432.
    """
    import psycopg

    admin_dsn = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres connect_timeout=3"
    try:
        admin = psycopg.connect(admin_dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split())
        pytest.skip(f"no PostgreSQL server answers on {PG_HOST}:{PG_PORT}: {reason}")
    name = f"tinyfleet_test_{uuid.uuid4().hex[:12]}"
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Each registry test runs twice: ``None`` (the default SQLite file) and PostgreSQL."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def signing_key() -> SigningKey:
    """An in-memory Ed25519 signing key."""
    from tinyfleet.host.keys import SigningKey

    return SigningKey.generate()


@pytest.fixture
def registry_root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def registry(registry_root: Path, database_url: str | None) -> Iterator[Registry]:
    """A new, empty registry on each backend."""
    from tinyfleet.host.registry import Registry

    reg = Registry(registry_root, database_url)
    try:
        yield reg
    finally:
        reg.close()
