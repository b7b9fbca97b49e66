"""``tinyfleet fl``: federated retraining runs from the command line.

``fl run`` checks the request and the cohort and stores the run; the fleet service
(``tinyfleet service run``) carries it out, like rollouts.  ``--wait`` follows it to
its end.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from tinyfleet.host.cli import output
from tinyfleet.host.cli.app import JsonOpt, app, settings
from tinyfleet.host.errors import FLRunFailedError, GateRejectedError, UsageError

fl_app = typer.Typer(help="Federated retraining runs (Flower).", no_args_is_help=True)
app.add_typer(fl_app, name="fl")

TERMINAL = ("registered", "rejected", "failed")


def _coordinator() -> Any:
    """A coordinator for commands: it reads and writes the database, it runs nothing."""
    from tinyfleet.host.fl.coordinator import FLCoordinator
    from tinyfleet.host.registry import Registry

    s = settings()
    return FLCoordinator(s, Registry(s.registry_dir, s.database_url))


def _cohort(values: list[str]) -> list[str]:
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    if not out:
        raise UsageError("--cohort: name at least one target (tag:NAME, group:NAME, device id)")
    return out


@fl_app.command("run")
def fl_run(
    cohort: Annotated[
        list[str],
        typer.Option(
            "--cohort", "-c", help="tag:NAME, group:NAME, device id or all (repeatable, or a,b)."
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(help="Parent version MODEL@VERSION (default: the one the cohort serves)."),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Federated rounds (1-100).")] = 3,
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox, fedmedian or krum.")] = "fedavg",
    min_clients: Annotated[int, typer.Option(help="Devices the run needs at least.")] = 2,
    round_timeout: Annotated[
        float, typer.Option(help="Seconds a round waits for stragglers.")
    ] = 30.0,
    fraction_fit: Annotated[float, typer.Option(help="Share of nodes sampled per round.")] = 1.0,
    local_epochs: Annotated[int, typer.Option(help="Epochs each device trains per round.")] = 1,
    learning_rate: Annotated[float, typer.Option(help="Devices' learning rate.")] = 0.003,
    proximal_mu: Annotated[float, typer.Option(help="FedProx proximal term.")] = 0.0,
    min_samples: Annotated[
        int, typer.Option(help="Labelled samples a device needs to take part.")
    ] = 32,
    max_samples: Annotated[
        int | None,
        typer.Option(help="Train on each device's newest labelled samples only (default: all)."),
    ] = None,
    enable_timeout: Annotated[
        float, typer.Option(help="Seconds devices may take to start their SuperNode.")
    ] = 60.0,
    rollout: Annotated[
        bool,
        typer.Option(
            "--rollout", help="Roll a gate-passing result out to the cohort (default: leave it)."
        ),
    ] = False,
    rollout_waves: Annotated[
        str, typer.Option(help="Waves of that rollout (cumulative counts and percentages).")
    ] = "1,10%,50%,100%",
    rollout_soak: Annotated[
        float, typer.Option(help="Seconds that rollout watches each wave.")
    ] = 30.0,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run until it ends.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Start a federated run on a cohort (the fleet service carries it out)."""
    coord = _coordinator()
    rid = coord.request(
        _cohort(cohort),
        rounds,
        strategy,
        model=model,
        min_clients=min_clients,
        round_timeout_s=round_timeout,
        fraction_fit=fraction_fit,
        local_epochs=local_epochs,
        learning_rate=learning_rate,
        proximal_mu=proximal_mu,
        min_samples=min_samples,
        max_samples=max_samples,
        enable_timeout_s=enable_timeout,
        auto_rollout=rollout,
        rollout=(
            {"waves": [w for w in rollout_waves.split(",") if w.strip()], "soak_s": rollout_soak}
            if rollout
            else {}
        ),
    )
    if wait:
        _follow(coord, rid, json_out)
        return
    view = coord.view(rid)
    if json_out:
        output.emit_json({"run": view})
    else:
        output.out().print(
            f"federated run {rid} requested: {view['model']}@{view['parent_version']} on "
            f"{len(view['devices'])} device(s) ({', '.join(view['devices'])}); "
            "the fleet service runs it"
        )
        _print_excluded(view)


def _follow(coord: Any, rid: str, json_out: bool) -> None:
    last = None
    while True:
        view = coord.view(rid)
        if view["state"] != last and not json_out:
            output.err().print(f"{rid}: {view['state']}")
            last = view["state"]
        if view["state"] in TERMINAL:
            break
        time.sleep(0.5)
    if json_out:
        output.emit_json({"run": view})
    else:
        _print_view(view)
    if view["state"] == "failed":
        raise typer.Exit(FLRunFailedError.exit_code)
    if view["state"] == "rejected":
        raise typer.Exit(GateRejectedError.exit_code)


def _print_excluded(view: dict[str, Any]) -> None:
    for device, why in sorted((view.get("excluded") or {}).items()):
        output.out().print(f"  excluded {device}: {why}")


def _print_view(view: dict[str, Any]) -> None:
    con = output.out()
    cfg = view.get("config") or {}
    new = f" → {view['model']}@{view['new_version']}" if view.get("new_version") else ""
    con.print(
        f"federated run {view['id']}: {view['model']}@{view['parent_version']}{new} "
        f"on {', '.join(view['cohort'])}  [{view['state']}]",
        markup=False,
        highlight=False,
    )
    con.print(
        f"  {cfg.get('strategy')}, {cfg.get('rounds')} rounds, min clients "
        f"{cfg.get('min_clients')}, round timeout {cfg.get('round_timeout_s')} s; "
        f"devices: {', '.join(view['devices']) or '-'}"
    )
    if view.get("reason"):
        con.print(f"  reason: {view['reason']}")
    if view.get("rollout_id"):
        con.print(f"  rollout: {view['rollout_id']}")
    _print_excluded(view)
    rounds = ((view.get("result") or {}).get("round_metrics")) or []
    if rounds:
        keys = sorted({k for r in rounds if isinstance(r, dict) for k in r})[:8]
        output.table(
            None,
            keys,
            [tuple(_cell(r.get(k)) for k in keys) for r in rounds if isinstance(r, dict)],
        )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return str(len(value))
    return "-" if value is None else str(value)


@fl_app.command("status")
def fl_status(run_id: str, json_out: JsonOpt = False) -> None:
    """One federated run: state, devices, per-round metrics, outcome."""
    view = _coordinator().view(run_id)
    if json_out:
        output.emit_json({"run": view})
    else:
        _print_view(view)


@fl_app.command("list")
def fl_list(json_out: JsonOpt = False) -> None:
    """Recent federated runs."""
    runs = _coordinator().list_runs()
    if json_out:
        output.emit_json({"runs": runs})
        return
    output.table(
        None,
        ["run", "parent", "new", "state", "devices", "strategy", "rounds", "created", "reason"],
        [
            (
                r["id"],
                f"{r['model']}@{r['parent_version']}",
                "-" if r["new_version"] is None else f"{r['model']}@{r['new_version']}",
                r["state"],
                len(r["devices"]),
                (r["config"] or {}).get("strategy", "-"),
                (r["config"] or {}).get("rounds", "-"),
                r["created_at"].strftime("%Y-%m-%d %H:%M") if r["created_at"] else "-",
                (r["reason"] or "")[:60],
            )
            for r in runs
        ],
    )
