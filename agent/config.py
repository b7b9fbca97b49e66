"""Agent configuration: ``/etc/tinyfleet/agent.toml`` plus ``TINYFLEET_<SECTION>_<KEY>`` overrides.

Unknown keys are errors (a typo must fail loudly), and every error names the key
and the reason.  Secrets (broker password) are read from files; a relative
``password_file`` is looked up in systemd's ``$CREDENTIALS_DIRECTORY`` first.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tinyfleet.agent.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/tinyfleet/agent.toml")
DEFAULT_STATE = Path("/var/lib/tinyfleet")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceSection(_Section):
    id: str
    fleet: str = "default"
    tags: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    profile: str = "rpi4"

    @field_validator("id", "fleet")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not ID_RE.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '.', '_' or '-'")
        return v

    @field_validator("tags", "groups")
    @classmethod
    def _idents(cls, v: list[str]) -> list[str]:
        for item in v:
            if not ID_RE.match(item):
                raise ValueError(f"{item!r}: must be letters, digits, '.', '_' or '-'")
        return v


class BrokerSection(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive: int = Field(30, ge=5, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^mqtts?://[^/:\s]+(:\d{1,5})?/?$", v):
            raise ValueError("expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        return v


class SecuritySection(_Section):
    host_public_key: Path


class PathsSection(_Section):
    state_dir: Path = DEFAULT_STATE


class TelemetrySection(_Section):
    heartbeat_s: float = Field(30.0, gt=0, le=86_400)
    window: int = Field(200, ge=1, le=1_000_000)
    spool_max_records: int = Field(10_000, ge=10)


class DownloadSection(_Section):
    chunk_window: int = Field(8, ge=1, le=256)
    chunk_timeout_s: float = Field(10.0, gt=0)
    max_artifact_bytes: int = Field(64 * 1024 * 1024, ge=1024)


class InferenceSection(_Section):
    socket: Path | None = None
    threads: int = Field(1, ge=1, le=64)


class DriftSection(_Section):
    """On-device drift statistics (agent/drift_stats.py); scores only leave the device."""

    enabled: bool = True
    window: int | None = Field(
        None, ge=1, le=1_000_000, description="Inferences per drift window; default: telemetry's."
    )
    window_s: float | None = Field(
        None, gt=0, le=86_400, description="Also close a window after this long (seconds)."
    )
    min_samples: int = Field(
        30, ge=1, le=1_000_000, description="A window closed by window_s needs this many."
    )
    eps: float = Field(1e-4, gt=0, le=0.01, description="PSI smoothing of bin shares.")


class LabelsSection(_Section):
    """The local buffer of labelled samples (``<state_dir>/labels.db``)."""

    capacity: int = Field(5000, ge=1, le=10_000_000)


class AgentConfig(_Section):
    device: DeviceSection
    broker: BrokerSection = Field(default_factory=BrokerSection)
    security: SecuritySection
    paths: PathsSection = Field(default_factory=PathsSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    download: DownloadSection = Field(default_factory=DownloadSection)
    inference: InferenceSection = Field(default_factory=InferenceSection)
    drift: DriftSection = Field(default_factory=DriftSection)
    labels: LabelsSection = Field(default_factory=LabelsSection)

    def broker_password(self, environ: dict[str, str] | None = None) -> str | None:
        """The broker password from its file (``$CREDENTIALS_DIRECTORY`` for relative paths)."""
        path = self.broker.password_file
        if path is None:
            return None
        env = os.environ if environ is None else environ
        if not path.is_absolute() and env.get("CREDENTIALS_DIRECTORY"):
            path = Path(env["CREDENTIALS_DIRECTORY"]) / path
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"broker.password_file: cannot read {path}: {exc.strerror}") from None


def _env_overrides(environ: dict[str, str]) -> dict[str, dict[str, Any]]:
    sections = {
        name: set(model.model_fields)
        for name, model in (
            ("device", DeviceSection),
            ("broker", BrokerSection),
            ("security", SecuritySection),
            ("paths", PathsSection),
            ("telemetry", TelemetrySection),
            ("download", DownloadSection),
            ("inference", InferenceSection),
            ("drift", DriftSection),
            ("labels", LabelsSection),
        )
    }
    out: dict[str, dict[str, Any]] = {}
    for key, value in environ.items():
        if not key.startswith("TINYFLEET_"):
            continue
        rest = key[len("TINYFLEET_") :].lower()
        section, _, field = rest.partition("_")
        if section in sections and field in sections[section]:
            parsed: Any = value
            if field in ("tags", "groups"):
                parsed = [t.strip() for t in value.split(",") if t.strip()]
            out.setdefault(section, {})[field] = parsed
    return out


def _first_error(exc: ValidationError, source: str) -> ConfigError:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    return ConfigError(f"{source}: {key}: {msg}")


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> AgentConfig:
    """Read and validate the agent's configuration."""
    env = dict(os.environ if environ is None else environ)
    path = path or Path(env.get("TINYFLEET_CONFIG", str(DEFAULT_CONFIG)))
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
    elif environ is None and "TINYFLEET_CONFIG" not in env and path == DEFAULT_CONFIG:
        pass  # environment-only configuration is allowed
    else:
        raise ConfigError(f"{path}: no such file")
    for section, values in _env_overrides(env).items():
        current = data.get(section)
        if current is not None and not isinstance(current, dict):
            raise ConfigError(f"{path}: {section}: must be a table")
        data.setdefault(section, {}).update(values)
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, str(path)) from None
