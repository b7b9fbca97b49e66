"""Rollouts under chaos on a real Mosquitto with the real orchestrator.

- 40 devices in 2 launcher worker processes; 10 % are killed mid-rollout with
  ``chaos kill``: the rollout completes for the rest (killed devices time out and
  the rules do not count timeouts as failures, nor 10 % offline as a reason to
  abort), and the killed devices converge once restarted.
- A device whose agent keeps raising never takes the other devices of its process
  down.
"""

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
from tinyfleet.sim import launcher
from tinyfleet.sim.fleet import DeviceSpec

pytestmark = pytest.mark.mqtt


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return tflites(tmp_path_factory.mktemp("models"), seeds=(1,))


def _online(service: Any) -> int:
    from sqlalchemy import func, select

    from tinyfleet.host.db.tables import DeviceRow

    with service.registry.engine.connect() as c:
        return int(c.execute(select(func.count()).where(DeviceRow.online.is_(True))).scalar() or 0)


def test_ten_percent_killed_mid_rollout(
    tmp_path: Path, mosquitto: MosquittoBroker, models: list[Path]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    host.version(models[0])
    home = tmp_path / "home"
    with running_service(host) as service:
        st = launcher.up(
            home,
            devices=40,
            workers=2,
            broker_url=host.settings.broker_url,
            fleet=host.settings.fleet,
            host_public_key=host.public_key_path,
            heartbeat_s=1.0,
            chunk_timeout_s=1.0,
            tick_s=0.2,
        )
        try:
            wait_until(lambda: _online(service) == 40, 30)
            rules = AbortRules(
                max_failure_pct=0,  # any real failure aborts ...
                count_timeouts=False,  # ... a device that never answers does not
                max_offline_pct=20,  # 10 % offline is tolerated, past the grace period too
                offline_grace_s=1.0,
            )
            rid = start_rollout(
                service, "tiny@1", ["all"], waves=["1", "100%"], soak_s=3.0,
                wave_timeout_s=4.0, rules=rules,
            )  # fmt: skip
            # mid-rollout: the canary is done and soaking, the other 39 not yet sent
            wait_until(lambda: service.orchestrator.view(rid).row["state"] == "soaking", 30)
            res = launcher.chaos(home, "kill", fraction=0.1, seed=5)
            killed = res["devices"]
            assert len(killed) == 4
            view = wait_rollout(service, rid, ("completed", "rolled_back", "failed"), 60)
            assert view.row["state"] == "completed", view.row["reason"]
            status = {d["device"]: d["status"] for d in view.devices}
            canary = next(d["device"] for d in view.devices if d["wave"] == 0)
            late = [d for d in killed if d != canary]  # a killed canary had converged already
            assert all(status[d] == "timed_out" for d in late)
            assert sum(s == "succeeded" for s in status.values()) == 40 - len(late)
            sim = launcher.status(home)
            serving = {d["device"]: d["serving"] for d in sim["device_status"]}
            assert all(serving[d] == "tiny@1" for d in serving if d not in killed)
            assert sim["summary"]["killed"] == 4
            # restarted, the killed devices converge on what the host wants
            launcher.chaos(home, "restart", devices=killed)

            def converged() -> bool:
                s = launcher.status(home)["summary"]
                return s["models"] == {"tiny@1": 40} and s["connected"] == 40

            wait_until(converged, 30)
        finally:
            launcher.down(home)
    assert not any(
        launcher._alive(p) for p in [st["supervisor_pid"], *(w["pid"] for w in st["workers"])]
    )


def test_a_crashing_device_never_takes_the_others_down(
    tmp_path: Path, mosquitto: MosquittoBroker, models: list[Path]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    host.version(models[0])
    specs = [DeviceSpec(f"dev-{i}") for i in range(5)]
    with (
        running_service(host) as service,
        running_fleet(device_configs(host, tmp_path / "devs", specs)) as fleet,
    ):
        bad = fleet.agents["dev-2"]

        def boom(*_a: Any, **_k: Any) -> None:
            raise RuntimeError("simulated bug in the agent")

        bad.tick = boom  # type: ignore[method-assign]
        bad.on_message = boom  # type: ignore[method-assign]
        wait_until(lambda: _online(service) == 5, 20)
        rules = AbortRules(max_failure_pct=25, count_timeouts=True)
        rid = start_rollout(
            service, "tiny@1", ["all"], waves=["100%"], soak_s=0, wave_timeout_s=5, rules=rules
        )
        view = wait_rollout(service, rid, ("completed", "rolled_back", "failed"), 30)
        assert view.row["state"] == "completed", view.row["reason"]
        status = {d["device"]: d["status"] for d in view.devices}
        assert status.pop("dev-2") == "timed_out"
        assert set(status.values()) == {"succeeded"}
        assert fleet.crashes["dev-2"] > 0 and set(fleet.crashes) == {"dev-2"}
        assert bad.link.stats.handler_errors > 0
        assert fleet.connected() == 5  # the others' links and ticks kept going
