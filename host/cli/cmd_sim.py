"""``tinyfleet sim up|status|down|chaos``: simulated devices running the real agent code.

The simulator keeps its files in ``<home>/sim/`` (see ``tinyfleet.sim.launcher``);
devices pin the host key of this home (``<home>/keys/host.pub``) unless
``--host-key`` says otherwise, and connect to the settings' broker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tinyfleet.host.cli import output
from tinyfleet.host.cli.app import JsonOpt, app, settings
from tinyfleet.host.errors import UsageError

sim_app = typer.Typer(
    help="The device simulator (real agents, simulated sensors).", no_args_is_help=True
)
chaos_app = typer.Typer(help="Chaos on running simulated devices.", no_args_is_help=True)
app.add_typer(sim_app, name="sim")
sim_app.add_typer(chaos_app, name="chaos")

DevicesOpt = Annotated[
    str | None, typer.Option("--devices", "-d", help="Comma-separated device ids.")
]
FractionOpt = Annotated[
    float | None, typer.Option("--fraction", "-f", help="A seeded fraction of the fleet (0-1].")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the --fraction selection.")]


def _ids(devices: str | None) -> list[str] | None:
    if devices is None:
        return None
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not ids:
        raise UsageError("--devices: give at least one device id")
    return ids


@sim_app.command("up")
def sim_up(
    devices: Annotated[
        int | None,
        typer.Option("--devices", "-n", help="Number of devices (overrides the scenario)."),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(help="Profile or mix, e.g. rpi4 or rpi4=0.8,cortex-m4=0.2."),
    ] = None,
    scenario: Annotated[
        Path | None, typer.Option(help="Scenario file (TOML), see firmware-sim/scenarios/.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (default: the machine's cores).")
    ] = None,
    broker: Annotated[str | None, typer.Option(help="Broker URL (default: the settings').")] = None,
    fleet: Annotated[str | None, typer.Option(help="Fleet name (default: the settings').")] = None,
    host_key: Annotated[
        Path | None, typer.Option(help="Host public key to pin (default <home>/keys/host.pub).")
    ] = None,
    password_dir: Annotated[
        Path | None,
        typer.Option(help="Broker passwords: a file per device id; the username is the id."),
    ] = None,
    heartbeat: Annotated[float, typer.Option(help="Heartbeat period of each device, s.")] = 5.0,
    feed: Annotated[
        bool, typer.Option("--feed/--no-feed", help="Run the sensors and inference.")
    ] = True,
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Run the supervisor here until Ctrl-C.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Start N simulated devices in worker processes (daemonised unless --foreground)."""
    from tinyfleet.sim import launcher
    from tinyfleet.sim.scenario import parse_profile_mix

    if heartbeat <= 0:
        raise UsageError(f"--heartbeat must be > 0, not {heartbeat}")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, not {workers}")
    s = settings()
    mix = parse_profile_mix(profile) if profile else None

    def ready(st: dict[str, Any]) -> None:
        output.err().print(
            f"{st['devices']} simulated devices in {len(st['workers'])} worker(s) on "
            f"{st['broker_url']}; Ctrl-C to stop"
        )

    st = launcher.up(
        s.home,
        devices=devices,
        scenario=scenario,
        profiles=mix,
        workers=workers,
        broker_url=broker or s.broker_url,
        fleet=fleet or s.fleet,
        host_public_key=host_key or s.keys_dir / "host.pub",
        foreground=foreground,
        feed=feed,
        password_dir=password_dir,
        heartbeat_s=heartbeat,
        on_ready=ready,
    )
    if json_out:
        output.emit_json({"sim": st})
        return
    if foreground:
        return
    output.out().print(
        f"simulator up: {st['devices']} devices in {len(st['workers'])} worker(s) "
        f"(supervisor pid {st['supervisor_pid']}, workers "
        f"{', '.join(str(w['pid']) for w in st['workers'])}) on {st['broker_url']}, "
        f"fleet {st['fleet']}; state in {launcher.SimPaths(s.home).root}"
    )


@sim_app.command("status")
def sim_status(
    per_device: Annotated[bool, typer.Option("--per-device", help="One row per device.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Workers and devices of the running simulator: connected, serving, model, inferences."""
    from tinyfleet.sim import launcher

    st = launcher.status(settings().home)
    if json_out:
        output.emit_json({"sim": st})
        return
    sm = st["summary"]
    models = ", ".join(f"{m} x{n}" for m, n in sorted(sm["models"].items())) or "none"
    output.out().print(
        f"{sm['devices']} devices: {sm['connected']} connected, {sm['serving']} serving "
        f"({models}), {sm['killed']} killed, {sm['inferences']} inferences; up "
        f"{st['uptime_s']:.0f} s on {st['broker_url']}"
    )
    output.table(
        None,
        ["worker", "pid", "devices", "connected", "RSS MB", "feed windows", "note"],
        [
            (
                w["index"],
                w["pid"],
                w["devices"],
                w.get("connected", "-"),
                f"{(w.get('rss_bytes') or 0) / 2**20:.0f}",
                (w.get("feed") or {}).get("windows", "-"),
                w.get("error", ""),
            )
            for w in st["workers"]
        ],
    )
    if per_device:
        output.table(
            None,
            ["device", "worker", "profile", "connected", "phase", "serving", "inferences", "chaos"],
            [
                (
                    d["device"],
                    d.get("worker"),
                    d.get("profile"),
                    "yes" if d.get("connected") else "no",
                    d.get("phase"),
                    d.get("serving") or "-",
                    d.get("inferences", 0),
                    ",".join(d.get("chaos") or []),
                )
                for d in st["device_status"]
            ],
        )


@sim_app.command("down")
def sim_down(json_out: JsonOpt = False) -> None:
    """Stop the simulator: every worker and the supervisor (none is left running)."""
    from tinyfleet.sim import launcher

    r = launcher.down(settings().home)
    if json_out:
        output.emit_json({"sim": r})
        return
    output.out().print(f"simulator down: {r['devices']} devices, {r['workers']} worker(s) stopped")


def _chaos(
    action: str,
    devices: str | None,
    fraction: float | None,
    seed: int,
    json_out: bool,
    **params: Any,
) -> None:
    from tinyfleet.sim import launcher

    r = launcher.chaos(
        settings().home, action, devices=_ids(devices), fraction=fraction, seed=seed, **params
    )
    if json_out:
        output.emit_json({"chaos": r})
        return
    extra = ", ".join(f"{k}={v}" for k, v in params.items() if v is not None)
    skipped = f"; skipped {len(r['skipped'])}" if r["skipped"] else ""
    output.out().print(
        f"{action}: {len(r['devices'])} device(s){' (' + extra + ')' if extra else ''}{skipped}: "
        + ", ".join(r["devices"][:20])
        + (" ..." if len(r["devices"]) > 20 else "")
    )


def _positive(value: float | None, what: str) -> None:
    if value is not None and value <= 0:
        raise UsageError(f"{what} must be > 0, not {value}")


@chaos_app.command("kill")
def chaos_kill(
    devices: DevicesOpt = None,
    fraction: FractionOpt = None,
    seed: SeedOpt = 0,
    restart_after: Annotated[
        float | None, typer.Option(help="Restart the killed devices after this many seconds.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Kill devices (their connection drops, the will fires); optionally restart them later."""
    _positive(restart_after, "--restart-after")
    _chaos("kill", devices, fraction, seed, json_out, restart_after=restart_after)


@chaos_app.command("restart")
def chaos_restart(
    devices: DevicesOpt = None,
    fraction: FractionOpt = None,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Restart killed devices (a new agent on the same state folder)."""
    _chaos("restart", devices, fraction, seed, json_out)


@chaos_app.command("disconnect")
def chaos_disconnect(
    devices: DevicesOpt = None,
    fraction: FractionOpt = None,
    seed: SeedOpt = 0,
    for_s: Annotated[float, typer.Option("--for", help="Seconds without network.")] = 10.0,
    json_out: JsonOpt = False,
) -> None:
    """Take devices off the network for a while (the agents keep running)."""
    _positive(for_s, "--for")
    _chaos("disconnect", devices, fraction, seed, json_out, seconds=for_s)


@chaos_app.command("slow-link")
def chaos_slow_link(
    devices: DevicesOpt = None,
    fraction: FractionOpt = None,
    seed: SeedOpt = 0,
    delay_ms: Annotated[float, typer.Option(help="Added delay on every delivery, ms.")] = 500.0,
    for_s: Annotated[
        float | None, typer.Option("--for", help="Seconds (default: until delay 0).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Deliver every message to the devices late (0 ms ends it)."""
    if delay_ms < 0:
        raise UsageError(f"--delay-ms must be >= 0, not {delay_ms}")
    _positive(for_s, "--for")
    _chaos("slow_link", devices, fraction, seed, json_out, delay_s=delay_ms / 1000.0, seconds=for_s)


@chaos_app.command("full-disk")
def chaos_full_disk(
    devices: DevicesOpt = None,
    fraction: FractionOpt = None,
    seed: SeedOpt = 0,
    for_s: Annotated[
        float | None, typer.Option("--for", help="Seconds (default: until restart).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """The devices' telemetry spool can no longer grow (a full disk)."""
    _positive(for_s, "--for")
    _chaos("full_disk", devices, fraction, seed, json_out, seconds=for_s)


@chaos_app.command("clock-skew")
def chaos_clock_skew(
    devices: DevicesOpt = None,
    fraction: FractionOpt = None,
    seed: SeedOpt = 0,
    seconds: Annotated[
        float, typer.Option(help="Jump of the agents' clocks, s (0 resets).")
    ] = 3600.0,
    json_out: JsonOpt = False,
) -> None:
    """Jump the devices' clocks (their timers: heartbeat, chunk timeouts)."""
    _chaos("clock_skew", devices, fraction, seed, json_out, seconds=seconds)
