"""The whole drift loop on a real broker: agents score windows on device, the fleet
service's monitor alerts, opens a cohort alert, asks the retrain policy, and clears.

Three in-process agents serve a real LiteRT model rolled out by the service; each is
fed inputs like the version's reference data, then two of them get a shifted feature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_support import N_FEATURES, make_tflite
from fleet_support import make_host, running_fleet, running_service, start_rollout, wait_rollout
from fleet_support import wait_until as wait
from mqtt_broker import MosquittoBroker
from mqtt_broker import mosquitto_fixture as mosquitto_fixture
from sqlalchemy import select

from tinyfleet.host.db.tables import AlertRow, DeviceRow, DriftScoreRow, RetrainDecisionRow
from tinyfleet.host.fleet.drift_rules import DriftSettings, RetrainSettings, RuleSpec
from tinyfleet.host.fleet.retrain import CohortKey
from tinyfleet.sim.fleet import DeviceSpec, provision

pytestmark = pytest.mark.mqtt

WINDOW = 100
DEVICES = ("d1", "d2", "d3")


def _rows(service: Any, table: Any) -> list[Any]:
    with service.registry.engine.connect() as conn:
        t = table.__table__
        return [r._mapping for r in conn.execute(select(t).order_by(*t.primary_key.columns))]


def test_drift_on_devices_becomes_alerts_and_a_retrain_decision(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    host = make_host(tmp_path / "home", mosquitto, fleet="f1")
    host.version(make_tflite(tmp_path / "m.tflite", 1))
    host.settings = host.settings.model_copy(
        update={
            "drift": DriftSettings(
                baseline_windows=4,
                rules=[RuleSpec(name="ks_shift", statistic="ks_shift", threshold=3.0, k=2, m=3)],
                retrain=RetrainSettings(min_devices=2, min_fraction=0.5, sustained_windows=2),
            )
        }
    )
    configs = [
        provision(
            tmp_path / "devices",
            DeviceSpec(d, tags=["line-a"]),
            fleet="f1",
            broker_url=host.settings.broker_url,
            host_public_key=host.public_key_path,
            heartbeat_s=0.5,
            window=WINDOW,
            chunk_timeout_s=1.0,
        )
        for d in DEVICES
    ]
    calls: list[tuple[CohortKey, list[str]]] = []

    def trigger(cohort: CohortKey, devices: list[str]) -> str:
        calls.append((cohort, devices))
        return "fl-run-1"

    rng = np.random.default_rng(3)

    def feed(fleet: Any, device: str, windows: int, shift: float = 0.0) -> None:
        agent = fleet.agents[device]
        for _ in range(windows):
            x = rng.normal(size=(WINDOW, N_FEATURES)).astype(np.float32)
            x[:, 0] += shift
            for row in x:
                agent.infer(row)

    with running_service(host, retrain_trigger=trigger) as service, running_fleet(configs) as fleet:
        wait(lambda: len(_rows(service, DeviceRow)) == len(DEVICES), 20)  # presence ingested
        rid = start_rollout(service, "tiny@1", ["all"], waves=["100%"], soak_s=0)
        wait_rollout(service, rid, ("completed",))
        for d in DEVICES:
            feed(fleet, d, 6)  # baseline (4) and two clean windows
        wait(
            lambda: (
                {r["device"]: r["window"] for r in _rows(service, DriftScoreRow)}
                == dict.fromkeys(DEVICES, 5)
            ),
            30,
        )
        assert _rows(service, AlertRow) == []
        for d in ("d1", "d2"):
            feed(fleet, d, 4, shift=2.0)
        feed(fleet, "d3", 4)
        wait(lambda: len([a for a in _rows(service, AlertRow) if a["device"]]) == 2, 30)
        alerts = _rows(service, AlertRow)
        assert sorted(a["device"] for a in alerts if a["device"]) == ["d1", "d2"]
        assert {(a["cohort"], a["state"]) for a in alerts if a["device"] is None} == {
            ("*|tiny@1", "open"),
            ("line-a|tiny@1", "open"),
        }
        wait(lambda: calls, 30)
        assert calls[0][1] == ["d1", "d2"]
        assert calls[0][0].model_ref == "tiny@1"
        decisions = _rows(service, RetrainDecisionRow)
        (triggered,) = [d for d in decisions if d["decision"] == "triggered"]
        assert triggered["run_id"] == "fl-run-1" and triggered["devices"] == ["d1", "d2"]
        # before: d1 alone was too few; after: the cooldown
        assert {d["decision"] for d in decisions} <= {"triggered", "too_few_devices", "cooldown"}
        # the drift goes away: alerts clear
        for d in ("d1", "d2"):
            feed(fleet, d, 4)
        wait(lambda: all(a["state"] == "cleared" for a in _rows(service, AlertRow)), 30)
        assert service.drift.stats.rejected == {}
        assert len(calls) == 1
        assert len(_rows(service, AlertRow)) == 4  # d1, d2 and two cohorts: none re-opened
