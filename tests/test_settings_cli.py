"""Host settings and the CLI's error boundary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tinyfleet.host.cli import main
from tinyfleet.host.errors import EXIT_CODES, ConfigError
from tinyfleet.host.settings import load_settings

DOCS = Path(__file__).resolve().parent.parent / "docs" / "exit-codes.md"


def test_settings_defaults_file_env_options(tmp_path: Path) -> None:
    s = load_settings(tmp_path, environ={})
    assert s.registry_dir == tmp_path / "registry" and s.database_url is None
    (tmp_path / "host.toml").write_text('fleet = "plant-a"\ndatabase_url = "sqlite:///x.db"\n')
    s = load_settings(tmp_path, environ={"TINYFLEET_FLEET": "plant-b"})
    assert s.fleet == "plant-b" and s.database_url == "sqlite:///x.db"
    s = load_settings(tmp_path, environ={}, database_url="sqlite:///y.db")
    assert s.database_url == "sqlite:///y.db"


def test_settings_reject_unknown_key_naming_it(tmp_path: Path) -> None:
    (tmp_path / "host.toml").write_text('flet = "typo"\n')
    with pytest.raises(ConfigError, match="flet"):
        load_settings(tmp_path, environ={})
    (tmp_path / "host.toml").write_text("fleet = [\n")
    with pytest.raises(ConfigError, match=r"host\.toml"):
        load_settings(tmp_path, environ={})


def test_every_exit_code_documented() -> None:
    text = DOCS.read_text()
    documented = {
        int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \| ([a-z-]+) \|", text, re.M)
    }
    assert documented == {code: name for code, (name, _) in EXIT_CODES.items()}
    assert all(help_text.strip() for _, help_text in EXIT_CODES.values())


def test_exit_codes_command_json(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["exit-codes", "--json"]) == 0
    out = json.loads(capfd.readouterr().out)
    assert out["ok"] is True and {e["code"] for e in out["exit_codes"]} == set(EXIT_CODES)


def test_unknown_recipe_is_one_line_and_code(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code = main(["--home", str(tmp_path), "pipeline", "no-such-recipe", "--no-register", "-q"])
    captured = capfd.readouterr()
    assert code == 4
    assert "no-such-recipe" in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_json_error_envelope(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code = main(["--home", str(tmp_path), "models", "show", "nothing@1", "--json"])
    out = json.loads(capfd.readouterr().out)
    assert code == 12 and out["ok"] is False and out["error"]["name"] == "not-found"


def test_bad_config_file_names_key(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "host.toml").write_text("nope = 1\n")
    assert main(["--home", str(tmp_path), "models", "list"]) == 3
    assert "nope" in capfd.readouterr().err


def test_usage_error_exit_2(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["pipeline"]) == 2
    assert main(["pipeline", "vibration", "--set", "novalue"]) == 2
    assert "Traceback" not in capfd.readouterr().err
