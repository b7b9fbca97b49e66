"""MCU-class simulated devices: the real agent runs its model under TensorFlow Lite Micro with
the measured arena, and a device with too little RAM refuses a model and reports the
measured arena against its limit (on a real broker, through the real orchestrator)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_support import N_CLASSES, N_FEATURES, reference_inputs, register_version
from fleet_support import make_host, running_service, wait_rollout, wait_until
from mqtt_broker import MosquittoBroker
from mqtt_broker import mosquitto_fixture as mosquitto_fixture

from tinyfleet.agent.errors import ModelFileError
from tinyfleet.agent.profiles import get_profile
from tinyfleet.host.fleet.rollout import AbortRules, RolloutSpec
from tinyfleet.sim.fleet import DeviceSpec, InProcessFleet, provision

pytestmark = pytest.mark.mqtt

_tflm = pytest.importorskip(
    "tflite_micro", reason="tflite-micro is not installed (nightly x86_64 wheels only)"
)
from tinyfleet.sim import mcu as sim_mcu  # noqa: E402


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(4)
    x, y = reference_inputs(1, 300)
    model = keras.Sequential(
        [
            keras.Input((N_FEATURES,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(N_CLASSES, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3, verbose=0)
    spec = tf.TensorSpec([1, N_FEATURES], tf.float32)
    fn = tf.function(lambda t: model(t, training=False), input_signature=[spec])
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])

    def rep() -> Any:
        for k in range(100):
            yield [x[k : k + 1]]

    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        data = conv.convert()
    out = tmp_path_factory.mktemp("mcu") / "mlp-int8.tflite"
    out.write_bytes(data)
    return out


def _register_int8(host: Any, path: Path, arena: int) -> Any:
    return register_version(
        host.registry,
        host.signer,
        path,
        model="tiny8",
        precision="int8",
        arena_bytes=arena,
        latency_budget_ms=200.0,
    ).info


def _online(service: Any) -> int:
    from sqlalchemy import func, select

    from tinyfleet.host.db.tables import DeviceRow

    with service.registry.engine.connect() as c:
        return int(c.execute(select(func.count()).where(DeviceRow.online.is_(True))).scalar() or 0)


def test_mcu_devices_run_tflm_and_one_without_ram_refuses_with_both_figures(
    tmp_path: Path, mosquitto: MosquittoBroker, int8_model: Path
) -> None:
    arena = sim_mcu.min_arena_bytes(int8_model.read_bytes())
    m4 = get_profile("cortex-m4")
    small_ram = m4.ram_reserve_bytes + arena - 16  # one granule short
    host = make_host(tmp_path / "home", mosquitto)
    _register_int8(host, int8_model, arena)
    specs = [
        DeviceSpec("m4-ok", profile="cortex-m4"),
        DeviceSpec("m4-small", profile="cortex-m4", ram_bytes=small_ram),
        DeviceSpec("pi", profile="rpi4"),
    ]
    configs = [
        provision(
            tmp_path / "devs",
            s,
            fleet=host.settings.fleet,
            broker_url=host.settings.broker_url,
            host_public_key=host.public_key_path,
            heartbeat_s=1.0,
            chunk_timeout_s=1.0,
        )
        for s in specs
    ]
    fleet = InProcessFleet(configs, specs=specs, tick_s=0.2)
    fleet.start()
    try:
        with running_service(host) as service:
            wait_until(lambda: fleet.connected() == 3 and _online(service) == 3, 20)
            spec = RolloutSpec(
                ref="tiny8@1",
                targets=["all"],
                waves=["100%"],
                soak_s=0,
                wave_timeout_s=30,
                artifact="tflite-int8",
                rules=AbortRules(max_failure_pct=50, min_devices=3),
            )
            rid = service.orchestrator.create(spec, "tests")
            view = wait_rollout(service, rid, ("completed", "rolled_back", "failed"), 60)
            assert view.row["state"] == "completed", view.row["reason"]
            by = {d["device"]: d for d in view.devices}
            assert by["m4-ok"]["status"] == "succeeded" and by["pi"]["status"] == "succeeded"
            refused = by["m4-small"]
            assert refused["status"] == "failed"
            # the report names the measured arena and the device's limit
            assert f"arena {arena} B" in refused["error"], refused["error"]
            assert f"RAM {small_ram} B" in refused["error"], refused["error"]
            assert refused["error"].startswith("no_fit")

            def no_fit_event() -> str | None:
                from sqlalchemy import select
                from sqlalchemy.orm import Session

                from tinyfleet.host.db.tables import EventRow

                with Session(service.registry.engine) as s:
                    return s.scalar(
                        select(EventRow.detail).where(
                            EventRow.device == "m4-small", EventRow.kind == "no_fit"
                        )
                    )

            detail = wait_until(no_fit_event, 10)
            assert str(arena) in detail and str(small_ram) in detail
        # the MCU device serves under TFLite Micro with the measured arena; the Pi on LiteRT
        ok = fleet.agents["m4-ok"].serving
        assert ok is not None
        model = ok.activated.model
        assert isinstance(model, sim_mcu.MicroModel) and model.arena_bytes == arena
        assert model.runtime.startswith("tflite-micro")
        pi = fleet.agents["pi"].serving
        assert pi is not None and not isinstance(pi.activated.model, sim_mcu.MicroModel)
        x, _ = reference_inputs(9, 5)
        for row in x:
            a = fleet.agents["m4-ok"].infer(row)
            b = fleet.agents["pi"].infer(row)
            assert a.label == b.label
            np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
        assert fleet.agents["m4-small"].serving is None
    finally:
        fleet.stop()


def test_mcu_loader_measures_the_arena_itself(int8_model: Path) -> None:
    """A manifest that understates the arena does not get past the device's own measurement."""
    data = int8_model.read_bytes()
    arena = sim_mcu.min_arena_bytes(data)
    m4 = get_profile("cortex-m4")
    tight = m4.model_copy(update={"ram_bytes": m4.ram_reserve_bytes + arena - 16})
    with pytest.raises(ModelFileError, match=rf"measured arena {arena:,} B .* exceeds RAM"):
        sim_mcu.mcu_loader(tight)(int8_model, "tflite")
    tiny_flash = m4.model_copy(update={"flash_bytes": m4.runtime_flash_bytes + len(data) - 1})
    with pytest.raises(ModelFileError, match="exceeds flash"):
        sim_mcu.mcu_loader(tiny_flash)(int8_model, "tflite")
    with pytest.raises(ModelFileError, match="not onnx"):
        sim_mcu.mcu_loader(m4)(int8_model, "onnx")
    model = sim_mcu.mcu_loader(m4)(int8_model, "tflite")
    assert model.arena_bytes == arena and len(model.time_invoke(np.zeros(N_FEATURES), 3)) == 3
    model.close()
