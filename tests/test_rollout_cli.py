"""``tinyfleet rollout …`` and ``devices list`` against a running fleet service."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from fleet_support import (
    device_configs,
    make_host,
    running_fleet,
    running_service,
    tflites,
    wait_until,
)
from mqtt_broker import MosquittoBroker
from mqtt_broker import mosquitto_fixture as mosquitto_fixture

from tinyfleet.host.cli import main
from tinyfleet.sim.fleet import DeviceSpec

pytestmark = pytest.mark.mqtt


def cli(
    capfd: pytest.CaptureFixture[str], home: Path, broker: str, *args: str
) -> tuple[int, Any, str]:
    capfd.readouterr()
    code = main(["--home", str(home), *args])
    cap = capfd.readouterr()
    out: Any = json.loads(cap.out) if "--json" in args and cap.out.strip() else cap.out
    return code, out, cap.err


def test_rollout_commands(
    tmp_path: Path, mosquitto: MosquittoBroker, capfd: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path / "home", mosquitto, fleet="default")
    m = tflites(tmp_path / "models", (1, 2))
    host.version(m[0])
    host.version(m[1])
    home, url = host.settings.home, host.settings.broker_url
    specs = [DeviceSpec(f"pump-{i}", tags=["plant-a"]) for i in range(4)]
    with (
        running_service(host) as service,
        running_fleet(device_configs(host, tmp_path / "devs", specs)),
    ):
        wait_until(
            lambda: cli(capfd, home, url, "devices", "list", "--json")[1]["devices"].__len__() == 4
        )
        code, out, _ = cli(
            capfd,
            home,
            url,
            "rollout",
            "start",
            "tiny@1",
            "-t",
            "tag:plant-a",
            "--waves",
            "1,100%",
            "--soak",
            "0",
            "--artifact",
            "tflite-float32",
            "--wait",
            "--json",
        )
        assert code == 0 and out["rollout"]["state"] == "completed", out
        assert out["rollout"]["counts"] == {"succeeded": 4}
        code, out, _ = cli(capfd, home, url, "devices", "list", "--json")
        assert {d["model"] for d in out["devices"]} == {"tiny@1"} and all(
            d["online"] for d in out["devices"]
        )
        # pause during the soak, resume, then roll back the completed rollout
        code, out, _ = cli(
            capfd,
            home,
            url,
            "rollout",
            "start",
            "tiny@2",
            "-t",
            "all",
            "--waves",
            "1,100%",
            "--soak",
            "3",
            "--artifact",
            "tflite-float32",
            "--json",
        )
        rid = out["rollout"]["id"]
        wait_until(lambda: service.orchestrator.view(rid).row["state"] == "soaking")
        assert cli(capfd, home, url, "rollout", "pause", rid)[0] == 0
        wait_until(lambda: service.orchestrator.view(rid).row["state"] == "paused")
        threading.Event().wait(3.5)  # longer than the soak: a paused rollout does not advance
        view = service.orchestrator.view(rid)
        assert view.row["state"] == "paused" and view.counts.get("pending") == 3
        assert cli(capfd, home, url, "rollout", "resume", rid)[0] == 0
        wait_until(lambda: service.orchestrator.view(rid).row["state"] == "completed", 30)
        code, out, _ = cli(capfd, home, url, "rollout", "list", "--json")
        assert [r["state"] for r in out["rollouts"]][:2] == ["completed", "completed"]
        assert cli(capfd, home, url, "rollout", "rollback", rid)[0] == 0
        wait_until(lambda: service.orchestrator.view(rid).row["state"] == "rolled_back", 30)
        wait_until(
            lambda: (
                {
                    d["model"]
                    for d in cli(capfd, home, url, "devices", "list", "--json")[1]["devices"]
                }
                == {"tiny@1"}
            ),
            30,
        )
        # errors: one line, a numbered exit code
        code, _, err = cli(capfd, home, url, "rollout", "start", "tiny@9", "-t", "all")
        assert code == 12 and "Traceback" not in err
        code, _, err = cli(
            capfd,
            home,
            url,
            "rollout",
            "start",
            "tiny@1",
            "-t",
            "nosuch",
            "--artifact",
            "tflite-float32",
        )
        assert code == 2 and "nosuch" in err
        code, _, err = cli(
            capfd, home, url, "rollout", "start", "tiny@1", "-t", "all", "--waves", "1,abc"
        )
        assert code == 2 and "abc" in err
        code, _, err = cli(capfd, home, url, "rollout", "start", "tiny@1", "-t", "all")
        assert code == 2 and "tflite-int8" in err  # the default artifact is int8 TFLite
        code, _, err = cli(capfd, home, url, "rollout", "pause", rid)
        assert code == 11 and "rolled_back" in err
        code, _, err = cli(capfd, home, url, "rollout", "status", "r-nope")
        assert code == 12
