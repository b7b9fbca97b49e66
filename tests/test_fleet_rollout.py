"""Rollouts over a real Mosquitto: fleet service, orchestrator and real agents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fleet_support import (
    device_configs,
    make_host,
    running_fleet,
    running_service,
    start_rollout,
    tflites,
    wait_rollout,
    wait_until,
)
from mqtt_broker import MosquittoBroker
from mqtt_broker import mosquitto_fixture as mosquitto_fixture

from tinyfleet.host.fleet.rollout import AbortRules
from tinyfleet.sim.fleet import DeviceSpec

pytestmark = pytest.mark.mqtt


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return tflites(tmp_path_factory.mktemp("models"))


def _active(fleet: Any) -> dict[str, Any]:
    return {d: (s.active.version if s.active else None) for d, s in fleet.states().items()}


def test_waves_converge_then_upgrade(
    tmp_path: Path, mosquitto: MosquittoBroker, models: list[Path]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    v1, v2 = host.version(models[0]), host.version(models[1])
    specs = [DeviceSpec(f"dev-{i:02d}", tags=["line-a" if i % 2 else "line-b"]) for i in range(10)]
    with (
        running_service(host) as service,
        running_fleet(device_configs(host, tmp_path / "devs", specs)) as fleet,
    ):
        wait_until(
            lambda: len(service.orchestrator.registry.list_models()) >= 0 and _known(service) == 10
        )
        rid = start_rollout(service, "tiny@1", ["all"], waves=["1", "50%", "100%"], soak_s=0.2)
        view = wait_rollout(service, rid, ("completed", "rolled_back", "failed"))
        assert view.row["state"] == "completed", view.row["reason"]
        assert view.counts == {"succeeded": 10}
        assert [d["wave"] for d in view.devices].count(0) == 1  # one canary
        assert set(_active(fleet).values()) == {1}
        # every device reports exactly what the host wanted
        for state in fleet.states().values():
            assert (
                state.active is not None
                and state.active.sha256 == v1.sha256
                and state.error is None
            )
        # targeting by tag: only line-a gets v2
        rid2 = start_rollout(service, "tiny@2", ["tag:line-a"], waves=["100%"], soak_s=0)
        view = wait_rollout(service, rid2, ("completed", "rolled_back", "failed"))
        assert view.row["state"] == "completed"
        active = _active(fleet)
        assert {d for d, v in active.items() if v == 2} == {
            s.device for s in specs if "line-a" in s.tags
        }
        prev = fleet.agents["dev-01"].reported_state().previous
        assert prev is not None and prev.version == 1  # A/B: the old version stays for rollback
        assert v2.sha256 != v1.sha256


def _known(service: Any) -> int:
    from sqlalchemy import func, select

    from tinyfleet.host.db.tables import DeviceRow

    with service.registry.engine.connect() as c:
        return int(
            c.execute(
                select(func.count()).select_from(DeviceRow).where(DeviceRow.online.is_(True))
            ).scalar_one()
        )


def test_bad_version_aborts_at_canary_and_rolls_back(
    tmp_path: Path, mosquitto: MosquittoBroker, models: list[Path]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    host.version(models[0])
    bad = host.version(models[1], latency_budget_ms=0.0)  # passes the gates, fails on devices
    specs = [DeviceSpec(f"dev-{i:02d}") for i in range(6)]
    with (
        running_service(host) as service,
        running_fleet(device_configs(host, tmp_path / "devs", specs)) as fleet,
    ):
        wait_until(lambda: _known(service) == 6)
        rid = start_rollout(service, "tiny@1", ["all"], waves=["100%"], soak_s=0)
        assert wait_rollout(service, rid, ("completed", "rolled_back")).row["state"] == "completed"
        before = {d: a.generation for d, a in fleet.agents.items()}
        rid = start_rollout(
            service, f"tiny@{bad.number}", ["all"], waves=["1", "50%", "100%"], soak_s=0.5
        )
        view = wait_rollout(service, rid, ("completed", "rolled_back", "failed"))
        assert view.row["state"] == "rolled_back"
        assert "health_check" in view.row["reason"] or "latency" in view.row["reason"]
        canary = next(d for d in view.devices if d["wave"] == 0)
        assert canary["status"] == "rolled_back"
        assert all(d["status"] == "pending" for d in view.devices if d["wave"] > 0)
        # every touched device ends on its previous version; the others never received it
        wait_until(lambda: set(_active(fleet).values()) == {1})
        for device, agent in fleet.agents.items():
            if device == canary["device"]:
                assert agent.generation > before[device]
            else:
                assert agent.generation == before[device]


def test_abort_rules_validate() -> None:
    rules = AbortRules(max_failure_pct=10, min_devices=5)
    assert rules.count_timeouts and rules.max_p99_regression == 2.0
    with pytest.raises(ValueError):
        AbortRules(max_failure_pct=150)
