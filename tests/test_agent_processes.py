"""Fifty real ``tinyfleet-agent run`` processes converge on a rollout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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
from mqtt_broker import mosquitto_fixture as mosquitto_fixture

pytestmark = pytest.mark.mqtt

N = 50


def write_config(root: Path, device: str, broker_url: str, pub: Path) -> Path:
    state = root / device
    state.mkdir(parents=True)
    cfg = state / "agent.toml"
    cfg.write_text(
        f'[device]\nid = "{device}"\nfleet = "test"\ntags = ["procs"]\n'
        f'[broker]\nurl = "{broker_url}"\n'
        f'[security]\nhost_public_key = "{pub}"\n'
        f'[paths]\nstate_dir = "{state}"\n'
        "[telemetry]\nheartbeat_s = 2\n"
        "[download]\nchunk_timeout_s = 2\n"
    )
    return cfg


def test_fifty_agent_processes_converge(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    m = tflites(tmp_path / "models", (1, 2))
    v1, v2 = host.version(m[0]), host.version(m[1])
    devices = [f"proc-{i:02d}" for i in range(N)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        for d in devices:
            cfg = write_config(tmp_path / "devs", d, host.settings.broker_url, host.public_key_path)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tinyfleet.agent.cli",
                        "--log-level",
                        "WARNING",
                        "run",
                        "--config",
                        str(cfg),
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=open(tmp_path / "devs" / d / "agent.log", "wb"),  # noqa: SIM115
                )
            )
        with running_service(host) as service:
            from sqlalchemy import func, select

            from tinyfleet.host.db.tables import DeviceRow

            def online() -> int:
                with service.registry.engine.connect() as c:
                    return int(
                        c.execute(
                            select(func.count())
                            .select_from(DeviceRow)
                            .where(DeviceRow.online.is_(True))
                        ).scalar_one()
                    )

            wait_until(lambda: online() == N, 120)
            for version in (v1, v2):
                rid = start_rollout(
                    service, f"tiny@{version.number}", ["tag:procs"], waves=["1", "100%"], soak_s=0
                )
                view = wait_rollout(
                    service, rid, ("completed", "rolled_back", "failed"), timeout=180
                )
                assert view.row["state"] == "completed", view.row["reason"]
                assert view.counts == {"succeeded": N}

            # every reported state matches the desired one
            def converged() -> bool:
                with service.registry.engine.connect() as c:
                    rows = c.execute(
                        select(
                            DeviceRow.active_sha256,
                            DeviceRow.reported_generation,
                            DeviceRow.desired_generation,
                        )
                    ).all()
                return len(rows) == N and all(r[0] == v2.sha256 and r[1] == r[2] for r in rows)

            wait_until(converged, 30)
        assert all(p.poll() is None for p in procs), "an agent process died"
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                assert p.wait(20) == 0  # SIGTERM stops cleanly
            except subprocess.TimeoutExpired:
                p.kill()
                raise
