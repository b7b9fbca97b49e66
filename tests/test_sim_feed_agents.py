"""ScenarioFeed on real agents: a vibration-v1 model rolled out over a real broker, windows
from the scenario's sensors, true labels fed into each agent's label buffer at the
scenario's rate, and a fault drift that changes what the devices see."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_support import register_version
from fleet_support import (
    device_configs,
    make_host,
    running_fleet,
    running_service,
    wait_rollout,
    wait_until,
)
from mqtt_broker import MosquittoBroker
from mqtt_broker import mosquitto_fixture as mosquitto_fixture

from tinyfleet.agent.features import vibration_features_batch
from tinyfleet.host.fleet.rollout import RolloutSpec
from tinyfleet.sim.fleet import DeviceSpec
from tinyfleet.sim.scenario import Scenario, ScenarioFeed
from tinyfleet.sim.sensors import CLASS_NAMES, make_fleet_dataset

pytestmark = pytest.mark.mqtt


@pytest.fixture(scope="module")
def vibration_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, Any]:
    """A small float32 MLP on vibration-v1 features of simulated machines."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    windows, labels, _ = make_fleet_dataset([f"train-{i}" for i in range(8)], 15, seed=3)
    x = vibration_features_batch(windows)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(len(CLASS_NAMES), activation="softmax"),
        ]
    )
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(x, labels, epochs=40, batch_size=64, verbose=0)
    out = tmp_path_factory.mktemp("vib") / "vib.tflite"
    out.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return out, x, labels


def _register(host: Any, path: Path, x: np.ndarray, y: np.ndarray) -> None:
    register_version(
        host.registry,
        host.signer,
        path,
        model="vib",
        x=x,
        y=y,
        preprocess="vibration-v1",
        classes=list(CLASS_NAMES),
        latency_budget_ms=200.0,
    )


def test_feed_runs_real_agents_and_fills_their_label_buffers(
    tmp_path: Path, mosquitto: MosquittoBroker, vibration_model: tuple[Path, np.ndarray, Any]
) -> None:
    path, x, y = vibration_model
    host = make_host(tmp_path / "home", mosquitto)
    _register(host, path, x, y)
    scenario = Scenario.model_validate(
        {
            "fleet": {"devices": 4, "seed": 3},
            "sensor": {
                "rate_hz": 20.0,
                "label_rate": 0.5,
                "class_mix": {"normal": 1.0},
            },
            "drift": [
                {
                    "kind": "fault",
                    "fault": "imbalance",
                    "select": {"ids": ["sim-00003"]},
                    "at_window": 0,
                }
            ],
        }
    )
    specs = [DeviceSpec(s.device) for s in scenario.device_specs()]
    with (
        running_service(host) as service,
        running_fleet(device_configs(host, tmp_path / "devs", specs)) as fleet,
    ):
        wait_until(lambda: all(a.link.connected for a in fleet.agents.values()), 20)
        time.sleep(0.5)  # presences ingested
        rid = service.orchestrator.create(
            RolloutSpec(ref="vib@1", targets=["all"], waves=["100%"], soak_s=0,
                        artifact="tflite-float32"),
            "tests",
        )  # fmt: skip
        view = wait_rollout(service, rid, ("completed", "rolled_back", "failed"), 30)
        assert view.row["state"] == "completed", view.row["reason"]
        feed = ScenarioFeed(fleet, scenario)
        for k in range(40):
            feed.step(k)
        # every label went into the device's own buffer (H1's Agent.infer(raw, label=...))
        stored = {d: a.labels.count() for d, a in fleet.agents.items()}
        # the drifted machine's windows are imbalance for real: the model sees it
        w, truth = feed.windows(40, np.array([3, 3, 3, 3, 3, 3]), np.zeros(6, dtype=np.int64))
        seen = [fleet.agents["sim-00003"].infer(win).label for win in w]
    st = feed.stats
    assert st.errors == 0 and st.inferences == 160
    assert st.per_device == {d.device: 40 for d in specs}
    assert 40 < st.labels_fed < 120 and st.labels_unsupported == 0  # ~50 % of 160
    assert sum(stored.values()) == st.labels_fed and all(v > 0 for v in stored.values())
    assert st.correct / st.inferences > 0.7, st.as_dict()
    assert set(truth) == {1} and seen.count(1) >= 4, seen
