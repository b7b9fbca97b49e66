"""``tinyfleet demo`` in a small configuration: the Quickstart's main job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyfleet.host.broker import find_mosquitto
from tinyfleet.host.cli import main

pytestmark = pytest.mark.mqtt


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_demo_small(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["--home", str(tmp_path / "demo"), "demo", "--small", "--devices", "4", "--json", "-q"]
    )
    out = capfd.readouterr().out
    assert code == 0, out
    steps = {s["step"]: s for s in json.loads(out)["steps"]}
    assert steps["pipeline v1"]["int8_accuracy"] >= 0.9
    for label, version in (("3/5 rollout v1", "vibration@1"), ("5/5 rollout v2", "vibration@2")):
        r = steps[label]
        assert r["version"] == version and r["devices_succeeded"] == 4 and r["waves"] >= 2
        # the broker fans the artifact out: the host sends each blob about once
        assert r["host_egress_bytes"] <= 2 * (r["model_bytes"] + r["reference_bytes"])
    assert steps["pipeline v2"]["parent"] == "vibration@1"
    fleet = steps["fleet"]
    assert fleet["on_device_inferences"] > 0 and fleet["on_device_accuracy"] >= 0.8
    assert fleet["telemetry_records"] > 0
    # nothing left running: the broker's port is closed and a second run works on the same home
    code = main(
        ["--home", str(tmp_path / "demo"), "demo", "--small", "--devices", "2", "--json", "-q"]
    )
    assert code == 0, capfd.readouterr().out
