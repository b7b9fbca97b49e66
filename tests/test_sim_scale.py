"""1,000 simulated devices through ``tinyfleet sim up``'s launcher converge on a rollout (slow:
``bench/rollout.py`` measures the same thing with figures; run with ``-m slow``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fleet_support import (
    make_host,
    running_service,
    start_rollout,
    tflites,
    wait_rollout,
    wait_until,
)
from mqtt_broker import MosquittoBroker

from tinyfleet.host.fleet.rollout import AbortRules
from tinyfleet.sim import launcher

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

N = 1000


def _online(service: Any) -> int:
    from sqlalchemy import func, select

    from tinyfleet.host.db.tables import DeviceRow

    with service.registry.engine.connect() as c:
        return int(c.execute(select(func.count()).where(DeviceRow.online.is_(True))).scalar() or 0)


def test_thousand_devices_converge_on_a_rollout(tmp_path: Path) -> None:
    # An unlimited broker queue: with docs/mosquitto's 1000 the broker drops reports queued
    # for a host that reads slower than 1,000 devices report (see docs/simulator.md).
    broker = MosquittoBroker(tmp_path / "mq", extra_config="max_queued_messages 0").start()
    try:
        host = make_host(tmp_path / "home", broker)
        host.version(tflites(tmp_path / "models", seeds=(1,))[0])
        home = tmp_path / "home"
        with running_service(host) as service:
            launcher.up(
                home,
                devices=N,
                workers=2,
                broker_url=host.settings.broker_url,
                fleet=host.settings.fleet,
                host_public_key=host.public_key_path,
                feed=False,
            )
            try:
                wait_until(lambda: _online(service) == N, 120, 0.5)
                rid = start_rollout(
                    service,
                    "tiny@1",
                    ["all"],
                    waves=["100%"],
                    soak_s=0,
                    wave_timeout_s=120,
                    rules=AbortRules(max_p99_regression=None),
                )
                view = wait_rollout(service, rid, ("completed", "rolled_back", "failed"), 180)
                assert view.row["state"] == "completed", view.row["reason"]
                assert view.counts == {"succeeded": N}
                summary = launcher.status(home)["summary"]
                assert summary["models"] == {"tiny@1": N} and summary["connected"] == N
            finally:
                launcher.down(home)
    finally:
        broker.stop()
