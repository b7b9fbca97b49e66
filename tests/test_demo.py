"""``tinyfleet demo`` in a small configuration: the Quickstart's main job, the whole loop.

One run covers the loop end to end on real parts: pipeline → Mosquitto → fleet service
→ simulated devices running the real agent → waved rollout → drift injected on a
tagged cohort → on-device drift scores → host alerts → retrain policy → federated run
on Flower (SuperLink + one SuperNode per device) → quantize/evaluate/gate → rollout to
the cohort → the cohort's accuracy recovers and its alerts clear.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tinyfleet.host.broker import find_mosquitto
from tinyfleet.host.cli import main

pytestmark = pytest.mark.mqtt


def _flower_processes() -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-super" in cmd or "flwr-clientapp" in cmd or "flwr-serverapp" in cmd:
            found.append(f"{pid}: {cmd[:120]}")
    return found


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_demo_small_closes_the_loop(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    before = set(_flower_processes())
    code = main(
        ["--home", str(tmp_path / "demo"), "demo", "--small", "--devices", "4", "--json", "-q"]
    )
    out = capfd.readouterr().out
    assert code == 0, out
    steps = {s["step"]: s for s in json.loads(out)["steps"]}
    assert steps["pipeline v1"]["int8_accuracy"] >= 0.9

    v1 = steps["rollout v1"]
    assert v1["version"] == "vibration@1" and v1["devices_succeeded"] == 4 and v1["waves"] >= 2
    # the broker fans the artifact out: the host sends each blob about once
    assert v1["host_egress_bytes"] <= 2 * (v1["model_bytes"] + v1["reference_bytes"])

    drift = steps["drift detected"]
    cohort = drift["drifted_devices"]
    assert cohort == 3  # the retrain policy's minimum, out of 4
    assert drift["alerted_devices"] == cohort and drift["false_alerts"] == 0
    assert drift["windows_to_alert"] <= 4

    fl = steps["federated retraining"]
    assert fl["parent"] == "vibration@1" and fl["version"] == "vibration@2"
    assert fl["nodes"] == cohort and fl["rounds"] >= 1

    v2 = steps["rollout v2 to the cohort"]
    assert v2["version"] == "vibration@2" and v2["devices_succeeded"] == cohort
    assert v2["alerts_open_on_cohort"] == 0
    # the drift hurt the cohort, and the federated version brought it back
    assert v2["cohort_accuracy_during_drift"] <= v2["cohort_accuracy_before_drift"] - 0.05
    assert v2["cohort_accuracy_after"] >= v2["cohort_accuracy_during_drift"] + 0.05
    assert steps["fleet"]["drift_reports"] > 0 and steps["fleet"]["labels_fed"] > 0

    # nothing left running: no Flower process of this run, the broker's port is closed
    assert set(_flower_processes()) <= before
    port = int(steps["fleet up"]["broker"].rsplit(":", 1)[1])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_demo_refuses_a_fleet_too_small_for_the_loop(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code = main(["--home", str(tmp_path / "demo"), "demo", "--devices", "3"])
    err = capfd.readouterr().err
    assert code == 2 and "between 4 and 2000" in err and "Traceback" not in err
