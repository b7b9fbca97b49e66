"""``tinyfleet service|devices|rollout``: the fleet from the command line.

The fleet service (``tinyfleet service run``) is the one process that talks to
the broker; rollout commands write to the database it reads, so they work
whether the service runs on this machine or elsewhere.
"""

from __future__ import annotations

import signal
import threading
import time
from datetime import datetime
from typing import Annotated, Any

import typer

from tinyfleet.host.cli import output
from tinyfleet.host.cli.app import JsonOpt, app, settings
from tinyfleet.host.errors import RolloutFailedError, UsageError

devices_app = typer.Typer(help="Devices known to the host.", no_args_is_help=True)
rollout_app = typer.Typer(help="Roll a version out to devices in waves.", no_args_is_help=True)
service_app = typer.Typer(help="The host's fleet service.", no_args_is_help=True)
app.add_typer(devices_app, name="devices")
app.add_typer(rollout_app, name="rollout")
app.add_typer(service_app, name="service")

TERMINAL = ("completed", "rolled_back", "aborted", "failed")


def _orchestrator() -> Any:
    """An orchestrator for commands: it reads and writes the database, it publishes nothing."""
    from tinyfleet.host.fleet.rollout import Orchestrator
    from tinyfleet.host.registry import Registry

    s = settings()
    registry = Registry(s.registry_dir, s.database_url)
    return Orchestrator(registry.engine, registry, _Offline(s), None, s.fleet)  # type: ignore[arg-type]


class _Offline:
    """Stands in for the publisher where commands only touch the database."""

    def __init__(self, s: Any) -> None:
        self._settings = s
        self._signer: Any = None

    @property
    def signer(self) -> Any:
        from tinyfleet.host.keys import load_signing_key

        if self._signer is None:
            self._signer = load_signing_key(self._settings.keys_dir)
        return self._signer


def _pct(value: str, what: str) -> float:
    v = value.strip().rstrip("%")
    try:
        f = float(v)
    except ValueError:
        raise UsageError(f"{what}: expected a percentage like 10%, got {value!r}") from None
    if not 0 <= f <= 100:
        raise UsageError(f"{what}: a percentage between 0 and 100, got {value!r}")
    return f


def _ts(v: Any) -> str:
    return v.strftime("%H:%M:%S") if isinstance(v, datetime) else ("-" if v is None else str(v))


@service_app.command("run")
def service_run(
    broker: Annotated[
        str | None,
        typer.Option(help="Broker URL, e.g. mqtt://127.0.0.1:1883 (env TINYFLEET_BROKER_URL)."),
    ] = None,
    fleet: Annotated[str | None, typer.Option(help="Fleet name (env TINYFLEET_FLEET).")] = None,
) -> None:
    """Run the fleet service in the foreground until SIGTERM/Ctrl-C."""
    import logging

    from tinyfleet.host.fleet.service import FleetService
    from tinyfleet.host.settings import load_settings

    s = settings()
    if broker or fleet:
        s = load_settings(s.home, database_url=s.database_url, broker_url=broker, fleet=fleet)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    service = FleetService(s)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service.start()
    output.err().print(f"fleet service for fleet {s.fleet} on {s.broker_url}; Ctrl-C to stop")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        service.stop()


@devices_app.command("list")
def devices_list(json_out: JsonOpt = False) -> None:
    """Devices, their presence and the model they report."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from tinyfleet.host.db.tables import DeviceRow
    from tinyfleet.host.registry import Registry

    s = settings()
    registry = Registry(s.registry_dir, s.database_url)
    with Session(registry.engine) as db:
        rows = db.scalars(
            select(DeviceRow).where(DeviceRow.fleet == s.fleet).order_by(DeviceRow.device)
        ).all()
        items: list[dict[str, Any]] = [
            {
                "device": r.device,
                "online": r.online,
                "profile": r.profile,
                "tags": r.tags,
                "groups": r.groups,
                "model": None if r.active_model is None else f"{r.active_model}@{r.active_version}",
                "phase": r.phase,
                "error": r.error,
                "generation": r.reported_generation,
                "desired_generation": r.desired_generation,
                "last_seen": r.last_seen,
            }
            for r in rows
        ]
    if json_out:
        output.emit_json({"devices": items})
        return
    output.table(
        f"fleet {s.fleet}: {len(items)} devices",
        ["device", "online", "profile", "tags", "model", "phase", "error", "last seen"],
        [
            (
                d["device"],
                "yes" if d["online"] else "no",
                d["profile"],
                ",".join(d["tags"] or []),
                d["model"] or "-",
                d["phase"] or "-",
                "-"
                if not d["error"]
                else f"{d['error'].get('code')}: {d['error'].get('message', '')[:40]}",
                _ts(d["last_seen"]),
            )
            for d in items
        ],
    )


@rollout_app.command("start")
def rollout_start(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION (or MODEL@ALIAS) to roll out.")],
    target: Annotated[
        list[str],
        typer.Option("--target", "-t", help="Device id, tag:NAME, group:NAME or all (repeatable)."),
    ],
    waves: Annotated[
        str, typer.Option(help="Cumulative wave sizes: counts and percentages.")
    ] = "1,10%,50%,100%",
    soak: Annotated[float, typer.Option(help="Seconds to watch each wave before the next.")] = 30.0,
    wave_timeout: Annotated[
        float, typer.Option(help="Seconds a device may take to report.")
    ] = 300.0,
    artifact: Annotated[
        str, typer.Option(help="Which artifact devices run: FORMAT-PRECISION.")
    ] = "tflite-int8",
    max_failures: Annotated[str, typer.Option(help="Abort above this failure share.")] = "0%",
    min_devices: Annotated[
        int, typer.Option(help="Devices done before the failure rule applies.")
    ] = 1,
    max_offline: Annotated[
        str, typer.Option(help="Abort above this share of touched devices offline.")
    ] = "50%",
    max_p99_regression: Annotated[
        float, typer.Option(help="Abort if p99 latency grows by more than this factor (0: off).")
    ] = 2.0,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the rollout until it ends.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Start a rollout (the fleet service carries it out)."""
    from pydantic import ValidationError

    from tinyfleet.host.fleet.rollout import AbortRules, RolloutSpec

    try:
        spec = RolloutSpec(
            ref=ref,
            targets=target,
            waves=[w for w in waves.split(",") if w.strip()],
            soak_s=soak,
            wave_timeout_s=wave_timeout,
            artifact=artifact,
            rules=AbortRules(
                max_failure_pct=_pct(max_failures, "--max-failures"),
                min_devices=min_devices,
                max_offline_pct=_pct(max_offline, "--max-offline"),
                max_p99_regression=max_p99_regression if max_p99_regression > 0 else None,
            ),
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UsageError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    orch = _orchestrator()
    rid = orch.create(spec, settings().user)
    if wait:
        _follow(orch, rid, json_out)
        return
    if json_out:
        output.emit_json({"rollout": _view_json(orch.view(rid))})
    else:
        output.out().print(
            f"rollout {rid} created ({ref} → {', '.join(target)}); the fleet service runs it"
        )


def _view_json(view: Any) -> dict[str, Any]:
    return {**view.row, "counts": view.counts, "devices": view.devices}


def _follow(orch: Any, rid: str, json_out: bool) -> None:
    last = None
    while True:
        view = orch.view(rid)
        line = (view.row["state"], view.row["wave"], tuple(sorted(view.counts.items())))
        if line != last and not json_out:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(view.counts.items()))
            output.err().print(f"{rid}: {view.row['state']} (wave {view.row['wave'] + 1}) {counts}")
            last = line
        if view.row["state"] in TERMINAL:
            break
        time.sleep(0.5)
    if json_out:
        output.emit_json({"rollout": _view_json(view)})
    else:
        _print_view(view)
    if view.row["state"] != "completed":
        raise typer.Exit(RolloutFailedError.exit_code)


def _print_view(view: Any) -> None:
    r = view.row
    con = output.out()
    con.print(
        f"rollout {r['id']}: {r['model']}@{r['version']} → {', '.join(r['target'])}  "
        f"[{r['state']}] wave {r['wave'] + 1}/{r['waves_total']}"
    )
    if r["reason"]:
        con.print(f"  reason: {r['reason']}")
    output.table(
        None,
        ["device", "wave", "status", "generation", "previous", "error"],
        [
            (
                d["device"],
                d["wave"] + 1,
                d["status"],
                d["generation"] or "-",
                "-"
                if not d["previous"]
                else f"{d['previous']['model']}@{d['previous']['version']}",
                d["error"] or "",
            )
            for d in view.devices
        ],
    )


@rollout_app.command("status")
def rollout_status(rollout_id: str, json_out: JsonOpt = False) -> None:
    """One rollout and each device's part in it."""
    view = _orchestrator().view(rollout_id)
    if json_out:
        output.emit_json({"rollout": _view_json(view)})
    else:
        _print_view(view)


@rollout_app.command("list")
def rollout_list(json_out: JsonOpt = False) -> None:
    """Recent rollouts."""
    views = _orchestrator().list_rollouts()
    if json_out:
        output.emit_json({"rollouts": [{**v.row, "counts": v.counts} for v in views]})
        return
    output.table(
        None,
        ["rollout", "version", "state", "wave", "devices", "created", "reason"],
        [
            (
                v.row["id"],
                f"{v.row['model']}@{v.row['version']}",
                v.row["state"],
                f"{v.row['wave'] + 1}/{v.row['waves_total']}",
                ", ".join(f"{k} {n}" for k, n in sorted(v.counts.items())) or "-",
                v.row["created_at"].strftime("%Y-%m-%d %H:%M") if v.row["created_at"] else "-",
                (v.row["reason"] or "")[:60],
            )
            for v in views
        ],
    )


def _command(name: str, help_text: str) -> None:
    def cmd(rollout_id: str, json_out: JsonOpt = False) -> None:
        orch = _orchestrator()
        orch.command(rollout_id, name)
        if json_out:
            output.emit_json({"rollout": rollout_id, "command": name})
        else:
            output.out().print(f"{name} requested for {rollout_id}; the fleet service applies it")

    cmd.__doc__ = help_text
    rollout_app.command(name)(cmd)


_command("pause", "Pause a rollout after the devices in flight report.")
_command("resume", "Resume a paused rollout.")
_command("abort", "Stop a rollout and roll every touched device back.")
_command("rollback", "Roll every touched device of a rollout back (also after it completed).")
