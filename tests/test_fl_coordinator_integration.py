"""``tinyfleet fl run`` end to end on real parts.

A real Mosquitto, the real fleet service (orchestrator + federated coordinator), three
real agents in one process (two Linux-class, one MCU-class) with labelled buffers
written from the simulator's sensors and features, a real Flower SuperLink and the
agents' supervised SuperNodes.  The parent version comes from the real pipeline
(vibration, small); the run registers a new version whose lineage names the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_support import device_configs, make_host, running_fleet, running_service, wait_until
from mqtt_broker import MosquittoBroker
from mqtt_broker import mosquitto_fixture as mosquitto_fixture

from tinyfleet.sim.fleet import DeviceSpec

pytestmark = pytest.mark.mqtt

SAMPLES_PER_DEVICE = 120


def _needs_flower() -> None:
    try:
        from tinyfleet.agent.fl.process import flower_command
        from tinyfleet.host.fl.run import run_federated  # noqa: F401

        flower_command("flower-superlink")
        flower_command("flower-supernode")
    except Exception as exc:
        pytest.skip(f"Flower engine not available: {exc}")


def _fill_labels(state_dir: Path, device: str, seed: int) -> None:
    """Labelled samples as the agent stores them: the serving pipeline's features."""
    from tinyfleet.agent.labels import LabelBuffer
    from tinyfleet.recipes.vibration import featurize
    from tinyfleet.sim.sensors import make_fleet_dataset

    windows, labels, _ = make_fleet_dataset([device], SAMPLES_PER_DEVICE // 4, seed)
    x = featurize(windows)
    with LabelBuffer(state_dir / "labels.db") as buf:
        for features, label in zip(x, labels, strict=True):
            buf.add(features, int(label), preprocess="vibration-v1", model="vibration@1")


def _online(host: Any) -> int:
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from tinyfleet.host.db.tables import DeviceRow

    with Session(host.registry.engine) as s:
        return int(s.scalar(select(func.count()).where(DeviceRow.online.is_(True))) or 0)


def test_fl_run_registers_a_new_version_with_lineage(
    tmp_path: Path, mosquitto: MosquittoBroker, capfd: pytest.CaptureFixture[str]
) -> None:
    _needs_flower()
    from tinyfleet.host.cli import main
    from tinyfleet.host.fl.coordinator import CoordinatorOptions
    from tinyfleet.host.fleet.rollout import RolloutSpec
    from tinyfleet.host.pipeline import run_pipeline

    host = make_host(tmp_path / "home", mosquitto, fleet="default")
    parent = run_pipeline(
        host.settings,
        "vibration",
        small=True,
        overrides={
            "train.epochs": 4,
            "gates.min_accuracy": 0.3,
            "gates.max_int8_drop": 1.0,
            "gates.must_fit": [],
        },
        latency_runs=10,
    )
    assert parent.version is not None and parent.version.status == "ready", parent.gates
    specs = [
        DeviceSpec("fl-1", tags=["line-a"]),
        DeviceSpec("fl-2", tags=["line-a"]),
        DeviceSpec("mcu-1", tags=["line-a"], profile="cortex-m7"),
    ]
    configs = device_configs(host, tmp_path / "devs", specs)
    for i, cfg in enumerate(configs):
        _fill_labels(cfg.paths.state_dir, cfg.device.id, seed=100 + i)

    with running_service(host) as service, running_fleet(configs) as fleet:
        # the SuperLink over TLS (a CA made for the run) with SuperNode authentication:
        # each device's own key, registered before the device is enabled
        service.fl.options = CoordinatorOptions(tls=True, node_auth=True)
        wait_until(lambda: _online(host) == 3, 20)
        rid = service.orchestrator.create(
            RolloutSpec(
                ref="vibration@1",
                targets=["tag:line-a"],
                waves=["100%"],
                soak_s=0,
                artifact="tflite-int8",
            ),
            "tests",
        )
        wait_until(lambda: service.orchestrator.view(rid).row["state"] == "completed", 60)
        # every device has reported its labelled samples
        wait_until(
            lambda: all((a.reported_state().fl or None) is not None for a in fleet.agents.values()),
            10,
        )
        t0 = time.monotonic()
        capfd.readouterr()
        code = main(
            [
                "--home",
                str(host.settings.home),
                "fl",
                "run",
                "--cohort",
                "tag:line-a",
                "--model",
                "vibration@1",
                "--rounds",
                "2",
                "--min-clients",
                "2",
                "--round-timeout",
                "30",
                "--local-epochs",
                "2",
                "--rollout",
                "--rollout-waves",
                "100%",
                "--rollout-soak",
                "0",
                "--wait",
                "--json",
            ]
        )
        cap = capfd.readouterr()
        elapsed = time.monotonic() - t0
        assert code == 0, cap.err
        run: dict[str, Any] = json.loads(cap.out)["run"]
        assert run["state"] == "registered", run["reason"]
        assert run["devices"] == ["fl-1", "fl-2"]
        assert "MCU-class" in run["excluded"]["mcu-1"]
        assert run["new_version"] == 2 and run["superlink"]

        version = host.registry.get("vibration@2")
        assert version.status == "ready" and version.parent_version == 1
        lineage = version.lineage
        assert lineage["source"] == "federated" and lineage["parent_version"] == 1
        fed = lineage["federated"]
        assert fed["run_id"] == run["id"] and fed["cohort"] == ["tag:line-a"]
        assert fed["rounds"] == 2 and fed["strategy"] == "fedavg"
        assert len(fed["nodes"]) == 2 and fed["devices"] == ["fl-1", "fl-2"]
        assert fed["dropped"] == []
        # node authentication maps Flower's node ids to devices
        assert sorted(fed["node_devices"].values()) == ["fl-1", "fl-2"]
        assert sorted(int(n) for n in fed["node_devices"]) == sorted(fed["nodes"])
        assert len(fed["round_metrics"]) == 2
        # the new float model is the parent's architecture with trained weights
        import keras  # type: ignore[import-untyped]

        runs = host.settings.runs_dir
        old_w = keras.models.load_model(
            runs / str(parent.run.path.name) / "model.keras"
        ).get_weights()
        new_w = keras.models.load_model(runs / lineage["run"] / "model.keras").get_weights()
        assert [w.shape for w in old_w] == [w.shape for w in new_w]
        assert any(not np.allclose(a, b) for a, b in zip(old_w, new_w, strict=True))
        assert {f"{a.format}-{a.precision}" for a in version.artifacts} >= {"tflite-int8"}

        # afterwards fl is cleared and every SuperNode stopped
        def all_stopped() -> bool:
            states = [a.reported_state().fl for a in fleet.agents.values()]
            return all(s is not None and s.state.value in ("disabled", "refused") for s in states)

        wait_until(all_stopped, 20)
        assert all(not a.fl.running for a in fleet.agents.values())

        # --rollout: the gate-passing result goes to the cohort through a normal rollout,
        # with the artifact the cohort runs
        assert run["rollout_id"], run["reason"]
        view = wait_until(
            lambda: (
                (v := service.orchestrator.view(run["rollout_id"])).row["state"]
                in ("completed", "rolled_back", "aborted", "failed")
                and v
            ),
            60,
        )
        assert view.row["state"] == "completed", view.row["reason"]
        assert view.row["target"] == ["tag:line-a"] and view.row["version"] == 2
        int8 = next(a for a in version.artifacts if (a.format, a.precision) == ("tflite", "int8"))
        assert view.row["artifact_sha256"] == int8.sha256
        served = {d: a.reported_state().active for d, a in fleet.agents.items()}
        assert all(m is not None and m.version == 2 for m in served.values()), served
        timings = wait_until(lambda: service.fl.view(run["id"])["result"].get("timings_s"), 5)
        print(f"fl run wall time {elapsed:.1f} s; steps {timings}")
