"""Drift statistics and labelled samples in the agent: a real LiteRT model, its real reference
bundle, the telemetry spool, the local API, and one run through Mosquitto into the host."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_support import N_CLASSES, N_FEATURES, Version, make_tflite, register_version
from mqtt_broker import MosquittoBroker
from mqtt_broker import mosquitto_fixture as mosquitto_fixture

from tinyfleet.agent import drift
from tinyfleet.agent.activation import activate
from tinyfleet.agent.agent import Agent, NoModelError
from tinyfleet.agent.config import AgentConfig, load_config
from tinyfleet.agent.errors import ConfigError
from tinyfleet.agent.labels import LabelError, load_labels
from tinyfleet.agent.local_api import handle_request
from tinyfleet.agent.protocol import EventKind, TelemetryBatch, decode
from tinyfleet.agent.runtime import load_model
from tinyfleet.agent.store import ModelStore

WINDOW = 40


@pytest.fixture(scope="module")
def tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tflite(tmp_path_factory.mktemp("tflite") / "m.tflite", 1)


@pytest.fixture
def version(tmp_path: Path, tflite: Path, signing_key: Any) -> Version:
    from tinyfleet.host.registry import Registry

    return register_version(Registry(tmp_path / "registry"), signing_key, tflite)


def _config(tmp_path: Path, signing_key: Any, **sections: dict[str, Any]) -> AgentConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    pub = tmp_path / "host.pub"
    pub.write_text(signing_key.public_key_pem)
    data: dict[str, Any] = {
        "device": {"id": "dev-1", "fleet": "test"},
        "broker": {"url": "mqtt://127.0.0.1:9"},  # never connected in these tests
        "security": {"host_public_key": str(pub)},
        "paths": {"state_dir": str(tmp_path / "state")},
        "telemetry": {"window": WINDOW},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return AgentConfig.model_validate(data)


def _serving_agent(tmp_path: Path, version: Version, signing_key: Any, **sections: Any) -> Agent:
    """An agent whose state folder holds ``version`` committed: it serves it on start."""
    cfg = _config(tmp_path, signing_key, **sections)
    store = ModelStore(cfg.paths.state_dir / "models")
    activate(
        store,
        version.manifest_json,
        version.sha256,
        version.model_path,
        version.reference_path,
        public_key=signing_key.public_key,
        generation=1,
        loader=load_model,
    )
    agent = Agent(cfg, public_key=signing_key.public_key)
    assert agent.serving is not None
    return agent


def _records(agent: Agent, kind: str) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in agent.spool.peek(10_000) if r.kind == kind]


def test_drift_records_per_window_valid_and_only_scores(
    tmp_path: Path, version: Version, signing_key: Any
) -> None:
    agent = _serving_agent(tmp_path, version, signing_key)
    try:
        rng = np.random.default_rng(1)
        for x in rng.normal(size=(WINDOW * 2 + 5, N_FEATURES)).astype(np.float32):
            agent.infer(x)  # like the reference data (normal 0, 1)
        for x in rng.normal(loc=2.0, scale=2.0, size=(WINDOW, N_FEATURES)).astype(np.float32):
            agent.infer(x)  # shifted and wider
        drift_records = _records(agent, "drift")
        assert len(drift_records) == 3 and len(_records(agent, "inference")) == 3
        assert [r["window"] for r in drift_records] == [0, 1, 2]
        for r in drift_records:
            assert set(r) == {
                "kind", "ts", "model", "version", "window", "n", "psi", "ks",
                "js_prediction", "mean_confidence", "confidence_shift",
            }  # fmt: skip
            assert r["model"] == "tiny" and r["version"] == version.number and r["n"] == WINDOW
            assert len(r["psi"]) == len(r["ks"]) == N_FEATURES
        clean, _, shifted = drift_records
        assert np.mean(clean["psi"]) < 0.5 and max(clean["ks"]) < 0.35
        # window 2 holds 5 clean and 35 shifted inferences
        assert np.mean(shifted["psi"]) > 3 * np.mean(clean["psi"]) and np.mean(shifted["psi"]) > 1
        assert min(shifted["ks"]) > 0.3
        # what the agent sends is what the host accepts
        payload, _ = agent._telemetry_batch()
        assert payload is not None
        batch = decode(TelemetryBatch, payload)
        kinds = [r.kind for r in batch.records]
        assert kinds.count("drift") == 3
        assert b"labels" not in payload
    finally:
        agent.close(timeout=0.5)


def test_drift_window_override_time_window_and_disabled(
    tmp_path: Path, version: Version, signing_key: Any
) -> None:
    x = np.random.default_rng(2).normal(size=(30, N_FEATURES)).astype(np.float32)
    agent = _serving_agent(tmp_path / "a", version, signing_key, drift={"window": 10})
    try:
        for row in x:
            agent.infer(row)
        assert [r["n"] for r in _records(agent, "drift")] == [10, 10, 10]
        assert _records(agent, "inference") == []  # the telemetry window (40) is not full yet
    finally:
        agent.close(timeout=0.5)
    agent = _serving_agent(
        tmp_path / "b", version, signing_key, drift={"window_s": 0.01, "min_samples": 4}
    )
    try:
        for row in x[:3]:
            agent.infer(row)
        assert agent.serving is not None
        agent.serving.drift_started -= 1.0  # the window is old, but holds 3 < 4 samples
        agent.infer(x[3])
        assert [r["n"] for r in _records(agent, "drift")] == [4]
    finally:
        agent.close(timeout=0.5)
    agent = _serving_agent(tmp_path / "c", version, signing_key, drift={"enabled": False})
    try:
        for row in np.tile(x, (2, 1)):
            agent.infer(row)
        assert agent.serving is not None and agent.serving.drift is None
        assert _records(agent, "drift") == [] and len(_records(agent, "inference")) == 1
    finally:
        agent.close(timeout=0.5)


def test_profile_that_does_not_fit_disables_drift_once(
    tmp_path: Path, version: Version, signing_key: Any, caplog: pytest.LogCaptureFixture
) -> None:
    agent = _serving_agent(tmp_path, version, signing_key)
    try:
        serving = agent.serving
        assert serving is not None and serving.drift is not None
        rng = np.random.default_rng(3)
        wrong = drift.build_profile(
            rng.normal(size=(50, 5)), np.full((50, N_CLASSES), 1 / N_CLASSES)
        )
        activated = dataclasses.replace(
            serving.activated,
            bundle=serving.activated.bundle.model_copy(update={"profile": wrong}),
        )
        with caplog.at_level(logging.WARNING):
            agent._serve(activated)
        warnings = [r for r in caplog.records if "drift statistics disabled" in r.getMessage()]
        assert len(warnings) == 1 and "5" in warnings[0].getMessage()
        assert [k for k, _ in agent._deferred_events] == [EventKind.DRIFT_DISABLED]
        assert agent.serving is not None and agent.serving.drift is None
        for row in rng.normal(size=(WINDOW, N_FEATURES)).astype(np.float32):
            p = agent.infer(row)  # inference goes on
        assert 0 <= p.label < N_CLASSES
        assert _records(agent, "drift") == [] and len(_records(agent, "inference")) == 1
    finally:
        agent.close(timeout=0.5)


def test_labels_from_infer_add_label_and_local_api(
    tmp_path: Path, version: Version, signing_key: Any
) -> None:
    agent = _serving_agent(tmp_path, version, signing_key, labels={"capacity": 50})
    try:
        rng = np.random.default_rng(4)
        x = rng.normal(size=(60, N_FEATURES)).astype(np.float32)
        p = agent.infer(x[0], label=2)
        assert 0 <= p.label < N_CLASSES
        agent.add_label(x[1], 1)
        with pytest.raises(LabelError, match=r"out of range 0\.\.2"):
            agent.infer(x[2], label=N_CLASSES)
        with pytest.raises(LabelError, match="integer"):
            agent.add_label(x[2], 1.0)  # type: ignore[arg-type]
        stored, labels = agent.labels.load("identity")
        assert labels.tolist() == [2, 1]
        assert np.array_equal(stored, x[:2])  # the identity pipeline's features are the input

        ok = handle_request(agent, json.dumps({"op": "label", "input": x[3].tolist(), "label": 0}))
        assert ok == {"ok": True, "stored": 1, "samples": 3}
        ok = handle_request(
            agent, json.dumps({"op": "infer", "input": x[4].tolist(), "label": 1}).encode()
        )
        assert ok["ok"] and ok["model"] == "tiny@1"
        for req, message in [
            ({"op": "label", "input": x[5].tolist()}, "label: required"),
            ({"op": "label", "input": x[5].tolist(), "label": "2"}, "integer class index"),
            ({"op": "label", "input": x[5].tolist(), "label": True}, "integer class index"),
            ({"op": "label", "input": x[5].tolist(), "label": 7}, "out of range"),
            ({"op": "label", "input": [1.0, None], "label": 0}, "input"),
            ({"op": "label", "input": [1.0, 2.0], "label": 0}, "does not fit the model"),
            ({"op": "relabel"}, "use infer, label or status"),
        ]:
            answer = handle_request(agent, json.dumps(req))
            assert answer["ok"] is False and message in answer["error"], (req, answer)
        for row in x[5:]:
            agent.add_label(row, int(row[0] > 0))
        assert agent.labels.count() == 50  # bounded: the oldest went
        # the ClientApp's view, from another connection, read-only
        fx, fy = load_labels(tmp_path / "state" / "labels.db", "identity", limit=10)
        assert np.array_equal(fx, x[-10:]) and fy.tolist() == [int(v > 0) for v in x[-10:, 0]]
        # labelled samples never go into telemetry
        assert all(r.kind != "label" for r in agent.spool.peek(10_000))
    finally:
        agent.close(timeout=0.5)


def test_no_model_no_label(tmp_path: Path, signing_key: Any) -> None:
    agent = Agent(_config(tmp_path, signing_key), public_key=signing_key.public_key)
    try:
        with pytest.raises(NoModelError):
            agent.add_label(np.zeros(N_FEATURES), 0)
        answer = handle_request(agent, b'{"op": "label", "input": [1.0], "label": 0}')
        assert answer["ok"] is False and "no model" in answer["error"]
        assert not (tmp_path / "state" / "labels.db").exists()  # opened on first use only
    finally:
        agent.close(timeout=0.5)


def test_config_sections_and_env_overrides(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[device]\nid = "d1"\n[security]\nhost_public_key = "/k.pub"\n'
        "[drift]\nenabled = true\nwindow = 64\n[labels]\ncapacity = 100\n"
    )
    cfg = load_config(path, environ={})
    assert cfg.drift.window == 64 and cfg.drift.window_s is None and cfg.labels.capacity == 100
    cfg = load_config(
        path,
        environ={
            "TINYFLEET_DRIFT_ENABLED": "false",
            "TINYFLEET_DRIFT_WINDOW_S": "30",
            "TINYFLEET_LABELS_CAPACITY": "7",
        },
    )
    assert not cfg.drift.enabled and cfg.drift.window_s == 30.0 and cfg.labels.capacity == 7
    with pytest.raises(ConfigError, match=r"labels\.capacity"):
        load_config(path, environ={"TINYFLEET_LABELS_CAPACITY": "0"})
    path.write_text(
        '[device]\nid = "d1"\n[security]\nhost_public_key = "/k.pub"\n[drift]\nwindw = 3\n'
    )
    with pytest.raises(ConfigError, match=r"drift\.windw: unknown key"):
        load_config(path, environ={})


@pytest.mark.mqtt
def test_drift_records_reach_the_host_over_mosquitto(
    tmp_path: Path, tflite: Path, mosquitto: MosquittoBroker
) -> None:
    """A rollout to a real agent, inferences on it, drift records ingested by the host."""
    from fleet_support import (
        device_configs,
        make_host,
        running_fleet,
        running_service,
        start_rollout,
        wait_rollout,
        wait_until,
    )
    from sqlalchemy import select

    from tinyfleet.host.db.tables import DeviceRow, TelemetryRow
    from tinyfleet.sim.fleet import DeviceSpec

    host = make_host(tmp_path / "home", mosquitto)
    host.version(tflite)
    configs = device_configs(host, tmp_path / "devs", [DeviceSpec("dev-d")])
    with running_service(host) as service, running_fleet(configs) as fleet:

        def known() -> list[str]:  # the agent is connected; the host may not know it yet
            with host.registry.engine.connect() as c:
                return list(c.execute(select(DeviceRow.device)).scalars())

        wait_until(lambda: "dev-d" in known(), 20)
        rid = start_rollout(service, "tiny@1", ["dev-d"], waves=["100%"], soak_s=0)
        view = wait_rollout(service, rid, ("completed", "rolled_back", "failed"))
        assert view.row["state"] == "completed", view.row["reason"]
        agent = fleet.agents["dev-d"]
        window = agent.serving.drift_window if agent.serving else 0
        rng = np.random.default_rng(5)
        for x in rng.normal(loc=1.5, size=(2 * window, N_FEATURES)).astype(np.float32):
            agent.infer(x)

        def drift_rows() -> list[Any]:
            with host.registry.engine.connect() as c:
                return list(
                    c.execute(
                        select(TelemetryRow.body).where(
                            TelemetryRow.device == "dev-d", TelemetryRow.kind == "drift"
                        )
                    ).scalars()
                )

        rows = wait_until(lambda: len(drift_rows()) >= 2 and drift_rows(), 20)
        windows = sorted(r["window"] for r in rows)
        assert windows == [0, 1] and all(r["n"] == window for r in rows)
        assert all(np.mean(r["psi"]) > 0.5 for r in rows)  # inputs shifted by 1.5 sd
