"""The latency-regression abort rule on stored telemetry, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from tinyfleet.host.db.tables import RolloutDeviceRow, RolloutRow, TelemetryRow
from tinyfleet.host.fleet.rollout import LATENCY_WINDOWS, AbortRules, Orchestrator
from tinyfleet.host.registry import Registry

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _orchestrator(registry: Registry) -> Orchestrator:
    # the latency rule reads only the database: no link, publisher or artifacts needed
    return Orchestrator(
        registry.engine,
        registry,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        "f",
        logger=logging.getLogger("test"),
    )


def _windows(s: Session, device: str, model: str, p99s: list[float], start: int) -> int:
    for i, p99 in enumerate(p99s):
        s.add(
            TelemetryRow(
                fleet="f",
                device=device,
                session=1,
                seq=start + i,
                ts=NOW + timedelta(seconds=start + i),
                kind="inference",
                model=model,
                body={"latency_p50_ms": p99 / 2, "latency_p99_ms": p99},
                received_at=NOW,
            )
        )
    return start + len(p99s)


def _rollout(s: Session, devices: dict[str, dict[str, Any]]) -> RolloutRow:
    row = RolloutRow(
        id="r-1",
        fleet="f",
        model="m",
        version=2,
        artifact_sha256="0" * 64,
        target=list(devices),
        waves=["100%"],
        soak_s=0.0,
        wave_timeout_s=60.0,
        rules={},
        state="running",
        created_by="test",
        created_at=NOW,
        updated_at=NOW,
    )
    s.add(row)
    for i, (device, fields) in enumerate(devices.items()):
        s.add(RolloutDeviceRow(rollout_id="r-1", device=device, position=i, wave=0, **fields))
    s.flush()
    s.refresh(row)
    return row


def test_p99_ratio_is_the_median_device_ratio_over_the_newest_windows(registry: Registry) -> None:
    orch = _orchestrator(registry)
    prev = {"model": "m", "version": 1, "sha256": "1" * 64}
    with Session(registry.engine) as s:
        seq = 1
        # a: old p99 1 ms, new 3 ms -> 3x; older windows (beyond the newest 20) are ignored
        seq = _windows(s, "a", "m@2", [100.0] * 5, seq)
        seq = _windows(s, "a", "m@1", [1.0] * LATENCY_WINDOWS, seq)
        seq = _windows(s, "a", "m@2", [3.0] * LATENCY_WINDOWS, seq)
        # b: 2 ms -> 2 ms (1x); c: 1 ms -> 5 ms (5x)
        seq = _windows(s, "b", "m@1", [2.0, 2.0, 2.0], seq)
        seq = _windows(s, "b", "m@2", [2.0, 2.0], seq)
        seq = _windows(s, "c", "m@1", [1.0, 1.0], seq)
        seq = _windows(s, "c", "m@2", [5.0, 5.0], seq)
        # d: too few windows under the new version; e: not succeeded; f: no previous
        seq = _windows(s, "d", "m@1", [1.0, 1.0], seq)
        seq = _windows(s, "d", "m@2", [9.0], seq)
        seq = _windows(s, "e", "m@1", [1.0, 1.0], seq)
        seq = _windows(s, "e", "m@2", [9.0, 9.0], seq)
        seq = _windows(s, "f", "m@2", [9.0, 9.0], seq)
        ok = {"status": "succeeded", "previous": prev}
        row = _rollout(
            s,
            {
                "a": ok,
                "b": ok,
                "c": ok,
                "d": ok,
                "e": {"status": "desired_sent", "previous": prev},
                "f": {"status": "succeeded", "previous": None},
            },
        )
        ratio = orch._p99_ratio(s, row, AbortRules())
        assert ratio == 3.0  # median of a 3x, b 1x, c 5x

        # the rule aborts over its limit and is read at most every couple of seconds
        assert "regressed 3.00x" in (orch._abort_reason(s, row, NOW) or "")
        relaxed = AbortRules(max_p99_regression=4.0).model_dump()
        row.rules = relaxed
        assert orch._abort_reason(s, row, NOW + timedelta(seconds=5)) is None


def test_p99_ratio_needs_a_previous_version(registry: Registry) -> None:
    orch = _orchestrator(registry)
    with Session(registry.engine) as s:
        _windows(s, "a", "m@2", [3.0, 3.0], 1)
        row = _rollout(s, {"a": {"status": "succeeded", "previous": None}})
        assert orch._p99_ratio(s, row, AbortRules()) is None
        assert orch._abort_reason(s, row, NOW) is None


def test_a_device_silent_after_its_desired_state_has_its_report_read_again(
    registry: Registry,
) -> None:
    from tinyfleet.host.fleet.rollout import RESYNC_AFTER_S, RESYNC_INTERVAL_S

    orch = _orchestrator(registry)
    orch._versions["m@2"] = None  # type: ignore[assignment]  # _run_wave only looks it up
    sent = NOW - timedelta(seconds=RESYNC_AFTER_S + 1)
    with Session(registry.engine) as s:
        row = _rollout(
            s,
            {
                "late": {"status": "desired_sent", "generation": 3, "sent_at": sent},
                "fresh": {"status": "desired_sent", "generation": 3, "sent_at": NOW},
                "done": {"status": "succeeded", "generation": 3, "sent_at": sent},
            },
        )
        resync: list[str] = []
        orch._run_wave(s, row, NOW, [], resync)
        assert resync == ["late"]
        # not again until the interval has passed
        resync.clear()
        orch._run_wave(s, row, NOW + timedelta(seconds=1), [], resync)
        assert resync == []
        orch._run_wave(s, row, NOW + timedelta(seconds=RESYNC_INTERVAL_S), [], resync)
        assert resync == ["late", "fresh"]
