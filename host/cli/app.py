"""Typer application and the single error boundary of the ``tinyfleet`` command."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from tinyfleet.host.cli import output
from tinyfleet.host.errors import EXIT_CODES, TinyfleetError, UsageError
from tinyfleet.host.settings import HostSettings, load_settings

app = typer.Typer(
    name="tinyfleet",
    help="tinyfleet: train, quantize, version and roll out TinyML models to a fleet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
keys_app = typer.Typer(help="The host's signing key.", no_args_is_help=True)
recipes_app = typer.Typer(help="Recipes in models/.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(recipes_app, name="recipes")


class State:
    settings: HostSettings | None = None
    debug: bool = False


_state = State()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]


def settings() -> HostSettings:
    if _state.settings is None:  # commands invoked without the callback (should not happen)
        _state.settings = load_settings()
    return _state.settings


@app.callback()
def _root(
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            help="Working folder (registry, keys, runs). Env: TINYFLEET_HOME. Default ./.tinyfleet",
        ),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="Database URL (default SQLite in the home folder). Env: TINYFLEET_DATABASE_URL",
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks of internal errors.")
    ] = False,
) -> None:
    _state.settings = load_settings(home, database_url=db)
    _state.debug = debug


def parse_sets(values: list[str] | None) -> dict[str, Any]:
    """``--set train.epochs=3`` → ``{"train.epochs": 3}`` (values parsed as TOML scalars)."""
    import tomllib

    result: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=5")
        try:
            result[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            result[key.strip()] = raw
    return result


# Command modules register themselves on the apps above.
from tinyfleet.host.cli import (  # noqa: E402,F401
    cmd_drift,
    cmd_fl,
    cmd_fleet,
    cmd_models,
    cmd_pipeline,
    cmd_sim,
)


@app.command("exit-codes")
def exit_codes(json_out: JsonOpt = False) -> None:
    """List the exit codes of the tinyfleet command."""
    if json_out:
        output.emit_json(
            {
                "exit_codes": [
                    {"code": c, "name": n, "help": h} for c, (n, h) in sorted(EXIT_CODES.items())
                ]
            }
        )
        return
    output.table(
        None, ["code", "name", "meaning"], [(c, n, h) for c, (n, h) in sorted(EXIT_CODES.items())]
    )


def _quiet_libraries() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    logging.getLogger("absl").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tinyfleet``: runs a command, turns errors into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    json_mode = "--json" in args
    _quiet_libraries()
    with output.json_stdout() if json_mode else contextlib.nullcontext():
        code = _run(args, json_mode)
    if argv is None:
        sys.exit(code)
    return code


def _run(args: list[str], json_mode: bool) -> int:
    try:
        rv = app(args=args, prog_name="tinyfleet", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except TinyfleetError as exc:
        code = exc.exit_code
        name = EXIT_CODES.get(code, ("error", ""))[0]
        if json_mode:
            output.emit_error_json(code, name, str(exc))
        output.err().print(f"[red]error[/red]: {exc}", highlight=False, markup=True)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show(file=sys.stderr)
        code = 2 if isinstance(exc, click.UsageError) else exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.stderr.write("aborted\n")
        code = 130
    except Exception as exc:  # the last boundary: one line, never a traceback by default
        code = 1
        if _state.debug:
            traceback.print_exc()
        msg = f"internal error: {type(exc).__name__}: {exc}"
        if json_mode:
            output.emit_error_json(1, "internal", msg)
        sys.stderr.write(f"error: {msg} (run with --debug for a traceback)\n")
    sys.stdout.flush()
    return code
