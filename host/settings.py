"""Host settings: a home folder, an optional ``host.toml`` in it, and environment overrides.

Resolution order (later wins): defaults, ``<home>/host.toml``, ``TINYFLEET_<KEY>``
environment variables, command line options.  Nothing is read at import time.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tinyfleet.host.errors import ConfigError
from tinyfleet.host.fleet.drift_rules import DriftSettings

DEFAULT_HOME = Path(".tinyfleet")


class HostSettings(BaseModel):
    """Where the host keeps its registry, keys and database."""

    model_config = ConfigDict(extra="forbid")

    home: Path = DEFAULT_HOME
    database_url: str | None = None
    fleet: str = "default"
    broker_url: str = "mqtt://127.0.0.1:1883"
    created_by: str | None = None
    drift: DriftSettings = Field(default_factory=DriftSettings)
    """Drift alert rules, sinks and the retrain policy: the ``[drift]`` table of host.toml."""

    @property
    def registry_dir(self) -> Path:
        return self.home / "registry"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def user(self) -> str:
        if self.created_by:
            return self.created_by
        return os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"


def _first_error(exc: ValidationError, source: str) -> ConfigError:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return ConfigError(f"{source}: {key}: {err['msg']}")


def load_settings(
    home: Path | None = None, environ: dict[str, str] | None = None, **options: Any
) -> HostSettings:
    """Settings for ``home`` (default ``$TINYFLEET_HOME`` or ``./.tinyfleet``)."""
    env = dict(os.environ if environ is None else environ)
    home = home or Path(env.get("TINYFLEET_HOME", str(DEFAULT_HOME)))
    values: dict[str, Any] = {}
    config_file = home / "host.toml"
    if config_file.is_file():
        try:
            values.update(tomllib.loads(config_file.read_text()))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{config_file}: {exc}") from None
        if "home" in values:
            raise ConfigError(f"{config_file}: home: cannot be set inside the home folder")
    for key in ("database_url", "fleet", "broker_url", "created_by"):
        env_key = f"TINYFLEET_{key.upper()}"
        if env_key in env:
            values[key] = env[env_key]
    values.update({k: v for k, v in options.items() if v is not None})
    values["home"] = home
    try:
        return HostSettings.model_validate(values)
    except ValidationError as exc:
        raise _first_error(exc, str(config_file)) from None
