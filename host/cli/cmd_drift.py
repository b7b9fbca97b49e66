"""``tinyfleet drift|alerts``: drift scores, cohorts, alerts and retrain decisions.

Everything is read from (and ``alerts clear`` written to) the database the fleet
service's drift monitor keeps, so the commands work wherever the database is
reachable.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from tinyfleet.host.cli import output
from tinyfleet.host.cli.app import JsonOpt, app, settings
from tinyfleet.host.errors import NotFoundError, UsageError

drift_app = typer.Typer(help="Drift scores per device and cohort.", no_args_is_help=True)
alerts_app = typer.Typer(help="Drift alerts.", no_args_is_help=True)
app.add_typer(drift_app, name="drift")
app.add_typer(alerts_app, name="alerts")

CohortOpt = Annotated[
    str | None,
    typer.Option(
        "--cohort",
        help="TAG|MODEL@VERSION (TAG '*' for every device on that version), or MODEL@VERSION.",
    ),
]


def _engine() -> Any:
    from tinyfleet.host.registry import Registry

    s = settings()
    return Registry(s.registry_dir, s.database_url).engine


def _cohort(value: str | None) -> Any:
    from tinyfleet.host.fleet.retrain import CohortKey

    if value is None:
        return None
    text = value if "|" in value else f"*|{value}"
    try:
        return CohortKey.parse(text)
    except ValueError:
        raise UsageError(
            f"--cohort {value!r}: use TAG|MODEL@VERSION or MODEL@VERSION (e.g. line-a|vibration@2)"
        ) from None


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


@drift_app.command("status")
def drift_status(cohort: CohortOpt = None, json_out: JsonOpt = False) -> None:
    """Latest drift scores per device and aggregates per cohort."""
    from sqlalchemy import select

    from tinyfleet.host.db.engine import storage_errors
    from tinyfleet.host.db.tables import DriftCohortRow, DriftScoreRow

    s = settings()
    key = _cohort(cohort)
    engine = _engine()
    sc = DriftScoreRow.__table__.c
    cc = DriftCohortRow.__table__.c
    with storage_errors(engine, "reading drift scores"), engine.connect() as conn:
        q = select(DriftScoreRow.__table__).where(sc.fleet == s.fleet).order_by(sc.device)
        cq = select(DriftCohortRow.__table__).where(cc.fleet == s.fleet).order_by(cc.cohort)
        if key is not None:
            q = q.where(sc.model == key.model, sc.version == key.version)
            cq = cq.where(cc.model == key.model, cc.version == key.version)
            if key.tag != "*":
                cq = cq.where(cc.tag == key.tag)
        devices = [dict(r._mapping) for r in conn.execute(q)]
        cohorts = [dict(r._mapping) for r in conn.execute(cq)]
    if key is not None and key.tag != "*":
        devices = [d for d in devices if key.tag in (d["tags"] or [])]
    dev_items = [
        {
            "device": d["device"],
            "model": f"{d['model']}@{d['version']}",
            "tags": d["tags"],
            "window": d["window"],
            "windows": d["windows"],
            "ts": d["ts"],
            "n": d["n"],
            "psi_max": d["psi_max"],
            "ks_max": d["ks_max"],
            "js_prediction": d["js_prediction"],
            "mean_confidence": d["mean_confidence"],
            "confidence_shift": d["confidence_shift"],
            "stats": d["stats"],
        }
        for d in devices
    ]
    cohort_items = [
        {k: v for k, v in c.items() if k != "fleet"} | {"model": f"{c['model']}@{c['version']}"}
        for c in cohorts
    ]
    for c in cohort_items:
        c.pop("version", None)
    if json_out:
        output.emit_json({"fleet": s.fleet, "devices": dev_items, "cohorts": cohort_items})
        return
    output.table(
        f"fleet {s.fleet}: drift of {len(dev_items)} devices",
        [
            "device",
            "model",
            "window",
            "psi max",
            "ks max",
            "ks shift",
            "js pred",
            "conf shift",
            "at",
        ],
        [
            (
                d["device"],
                d["model"],
                d["window"],
                f"{d['psi_max']:.3f}",
                f"{d['ks_max']:.3f}",
                f"{float(d['stats'].get('ks_shift', 0.0)):.2f}",
                f"{d['js_prediction']:.3f}",
                f"{d['confidence_shift']:+.3f}",
                _when(d["ts"]),
            )
            for d in dev_items
        ],
    )
    output.table(
        "cohorts",
        ["cohort", "devices", "alerting", "mean psi max", "mean ks max", "mean conf shift"],
        [
            (
                c["cohort"],
                c["devices"],
                c["alerting"],
                f"{c['mean_psi_max']:.3f}",
                f"{c['mean_ks_max']:.3f}",
                f"{c['mean_confidence_shift']:+.3f}",
            )
            for c in cohort_items
        ],
    )


@drift_app.command("decisions")
def drift_decisions(
    cohort: CohortOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Newest N decisions.")] = 50,
    json_out: JsonOpt = False,
) -> None:
    """Decisions of the retrain policy (triggered, cooldown, too few devices…)."""
    from sqlalchemy import select

    from tinyfleet.host.db.engine import storage_errors
    from tinyfleet.host.db.tables import RetrainDecisionRow

    s = settings()
    key = _cohort(cohort)
    engine = _engine()
    t = RetrainDecisionRow.__table__.c
    q = (
        select(RetrainDecisionRow.__table__)
        .where(t.fleet == s.fleet)
        .order_by(t.id.desc())
        .limit(limit)
    )
    if key is not None:
        q = q.where(t.cohort == key.key)
    with storage_errors(engine, "reading retrain decisions"), engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(q)]
    items = [{k: v for k, v in r.items() if k != "fleet"} for r in rows]
    if json_out:
        output.emit_json({"fleet": s.fleet, "decisions": items})
        return
    output.table(
        f"fleet {s.fleet}: {len(items)} retrain decisions",
        ["id", "at", "cohort", "decision", "devices", "run", "detail"],
        [
            (
                r["id"],
                _when(r["decided_at"]),
                r["cohort"],
                r["decision"],
                f"{len(r['devices'])} of {r['cohort_size']}",
                r["run_id"] or "-",
                r["detail"] or "",
            )
            for r in items
        ],
    )


def _alert_item(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": r["id"],
        "device": r["device"],
        "rule": r["rule"],
        "cohort": r["cohort"],
        "model": f"{r['model']}@{r['version']}",
        "state": r["state"],
        "opened_at": r["opened_at"],
        "cleared_at": r["cleared_at"],
        "last_value": r["last_value"],
        "windows": r["windows"],
        "reason": r["reason"],
    }


@alerts_app.command("list")
def alerts_list(
    open_only: Annotated[bool, typer.Option("--open", help="Only open alerts.")] = False,
    device: Annotated[str | None, typer.Option("--device", help="Only this device.")] = None,
    cohort: CohortOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Newest N alerts.")] = 200,
    json_out: JsonOpt = False,
) -> None:
    """Drift alerts, newest first (device alerts and cohort alerts, rule 'cohort')."""
    from sqlalchemy import select

    from tinyfleet.host.db.engine import storage_errors
    from tinyfleet.host.db.tables import AlertRow

    s = settings()
    key = _cohort(cohort)
    engine = _engine()
    t = AlertRow.__table__.c
    q = select(AlertRow.__table__).where(t.fleet == s.fleet).order_by(t.id.desc()).limit(limit)
    if open_only:
        q = q.where(t.state == "open")
    if device is not None:
        q = q.where(t.device == device)
    if key is not None:
        q = q.where(t.model == key.model, t.version == key.version)
        if key.tag != "*":
            q = q.where(t.cohort == key.key)
    with storage_errors(engine, "reading alerts"), engine.connect() as conn:
        items = [_alert_item(dict(r._mapping)) for r in conn.execute(q)]
    if json_out:
        output.emit_json({"fleet": s.fleet, "alerts": items})
        return
    output.table(
        f"fleet {s.fleet}: {len(items)} alerts" + (" (open)" if open_only else ""),
        ["id", "state", "device", "rule", "value", "windows", "cohort", "opened", "cleared"],
        [
            (
                a["id"],
                a["state"],
                a["device"] or "(cohort)",
                a["rule"],
                f"{a['last_value']:.3f}",
                a["windows"],
                a["cohort"],
                _when(a["opened_at"]),
                _when(a["cleared_at"]),
            )
            for a in items
        ],
    )


@alerts_app.command("clear")
def alerts_clear(
    alert_id: Annotated[int, typer.Argument(help="The alert's id (see `alerts list`).")],
    json_out: JsonOpt = False,
) -> None:
    """Clear an open alert by hand; the monitor opens a new one if the drift goes on."""
    from sqlalchemy import select, update

    from tinyfleet.host.db.engine import storage_errors, writer
    from tinyfleet.host.db.tables import AlertRow

    s = settings()
    engine = _engine()
    t = AlertRow.__table__.c
    now = datetime.now(UTC)
    with storage_errors(engine, "clearing an alert"), writer(engine).begin() as conn:
        row = conn.execute(
            select(AlertRow.__table__).where(t.fleet == s.fleet, t.id == alert_id)
        ).first()
        if row is None:
            raise NotFoundError(f"fleet {s.fleet} has no alert {alert_id}")
        already = row.state != "open"
        if not already:
            conn.execute(
                update(AlertRow)
                .where(t.id == alert_id, t.state == "open")
                .values(state="cleared", open_key=None, cleared_at=now, reason="cleared by hand")
            )
    if json_out:
        output.emit_json({"id": alert_id, "cleared": not already, "state": "cleared"})
        return
    output.out().print(
        f"alert {alert_id} was already cleared" if already else f"alert {alert_id} cleared"
    )
