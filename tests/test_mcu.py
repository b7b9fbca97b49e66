"""Device profiles and fit; TFLite Micro arena search, MicroModel and MAC counting."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from tinyfleet.agent.errors import ConfigError, ModelFileError, RuntimeUnavailableError
from tinyfleet.agent.profiles import PROFILES, DeviceProfile, check_fit, get_profile
from tinyfleet.agent.runtime import load_model
from tinyfleet.sim import mcu

KiB = 1024

# --------------------------------------------------------------- profiles


def test_profiles() -> None:
    assert set(PROFILES) == {"cortex-m4", "cortex-m7", "esp32-s3", "rpi4"}
    m4 = get_profile("cortex-m4")
    assert (m4.kind, m4.ram_bytes, m4.flash_bytes, m4.clock_hz) == (
        "mcu",
        256 * KiB,
        1024 * KiB,
        168_000_000,
    )
    assert get_profile("cortex-m7").ram_bytes == 512 * KiB
    assert get_profile("esp32-s3").flash_bytes == 8 * 1024 * KiB
    assert get_profile("rpi4").kind == "linux"
    with pytest.raises(ConfigError, match="cortex-m4, cortex-m7, esp32-s3, rpi4"):
        get_profile("cortex-m0")
    with pytest.raises(ValueError, match="bogus"):
        DeviceProfile(**{**m4.model_dump(), "bogus": 1})


def test_check_fit_mcu() -> None:
    p = DeviceProfile(
        name="t",
        kind="mcu",
        ram_bytes=100_000,
        flash_bytes=500_000,
        clock_hz=100_000_000,
        macs_per_cycle=0.5,
        runtime_flash_bytes=100_000,
        ram_reserve_bytes=20_000,
    )
    ok = check_fit(p, 300_000, 80_000, 1_000_000)
    assert ok.fits and ok.reasons == []
    assert (ok.ram_needed, ok.flash_needed) == (100_000, 400_000)
    assert ok.est_latency_ms == pytest.approx(20.0)  # 1e6 / (1e8 * 0.5) s
    assert ok.latency_is_estimate
    big = check_fit(p, 400_001, 80_001, None)
    assert not big.fits and big.est_latency_ms is None
    assert [r.split(":")[0] for r in big.reasons] == ["flash", "RAM"]
    unknown = check_fit(p, 1000, None, 10)
    assert not unknown.fits and "arena not measured" in unknown.reasons[0]
    onnx = check_fit(p, 1000, 1000, 10, model_format="onnx")
    assert not onnx.fits and "no runtime on an MCU" in onnx.reasons[0]


def test_check_fit_linux_has_no_arena() -> None:
    rpi = get_profile("rpi4")
    r = check_fit(rpi, 1_000_000, None, 2_000_000)
    assert r.fits and r.kind == "linux"
    assert r.ram_needed == 2_000_000 + rpi.ram_reserve_bytes
    assert r.est_latency_ms == pytest.approx(2e6 / (1.5e9 * 4) * 1000)
    assert not check_fit(rpi, 2 * 1024**3, None, None).fits


# ------------------------------------------------------------------ models


@dataclass
class Models:
    x: np.ndarray
    int8: bytes  # digits CNN, full-integer int8, batch 1
    float32: bytes  # same CNN, float32
    dw_float: bytes  # conv + depthwise + dense, float32 (MAC count)
    dw_int8: bytes


def _tflite(tf: Any, model: Any, x: np.ndarray | None) -> bytes:
    spec = tf.TensorSpec([1, *model.inputs[0].shape[1:]], tf.float32)
    fn = tf.function(lambda t: model(t, training=False), input_signature=[spec])
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    if x is not None:
        cal = x

        def rep() -> Any:
            for k in range(min(len(cal), 200)):
                yield [cal[k : k + 1]]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    with warnings.catch_warnings():  # "Statistics for quantized inputs were expected"
        warnings.simplefilter("ignore", UserWarning)
        return bytes(conv.convert())


@pytest.fixture(scope="module")
def models() -> Models:
    import keras
    import tensorflow as tf
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    keras.utils.set_random_seed(0)
    cnn = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    cnn.compile("adam", "sparse_categorical_crossentropy")
    cnn.fit(x[:1000], d.target[:1000], epochs=2, batch_size=32, verbose=0)
    dw = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
            keras.layers.DepthwiseConv2D(3, padding="same"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    return Models(
        x=x[1000:],
        int8=_tflite(tf, cnn, x[:500]),
        float32=_tflite(tf, cnn, None),
        dw_float=_tflite(tf, dw, None),
        dw_int8=_tflite(tf, dw, x[:100]),
    )


# ------------------------------------------------------------------- arena


def test_min_arena_is_tight(models: Models) -> None:
    arena = mcu.min_arena_bytes(models.int8)
    assert arena % 16 == 0 and 1024 < arena < 64 * KiB
    assert mcu.arena_allocates(models.int8, arena)
    assert not mcu.arena_allocates(models.int8, arena - 2048)
    assert not mcu.arena_allocates(models.int8, arena - 16)  # the granularity is the answer's
    exact = mcu.min_arena_bytes(models.int8, step=1)
    assert arena - 16 < exact <= arena
    assert mcu.arena_allocates(models.int8, exact)
    assert not mcu.arena_allocates(models.int8, exact - 1)


def test_probes_survive_tflm_crashes(models: Models) -> None:
    """Tiny arenas crash TFLM's Python wrapper (SIGSEGV); probes run in a child process."""
    assert not mcu.arena_allocates(models.int8, 100)
    arena = mcu.min_arena_bytes(models.int8)
    with mcu._ArenaProber(models.int8) as probe:
        assert not probe(100) and probe.crashes == 1
        assert probe(arena) and not probe(0) and probe(arena)
        assert probe.crashes == 2


def test_min_arena_errors(models: Models) -> None:
    with pytest.raises(ModelFileError, match="raise hi"):
        mcu.min_arena_bytes(models.int8, hi=1024)
    with pytest.raises(ModelFileError):
        mcu.min_arena_bytes(models.int8[: len(models.int8) // 2])
    with pytest.raises(ModelFileError, match="TFL3"):
        mcu.min_arena_bytes(b"\x00" * 64)
    with pytest.raises(ValueError):
        mcu.min_arena_bytes(models.int8, step=0)


def test_tflm_and_litert_give_identical_int8_outputs(models: Models) -> None:
    micro = mcu.MicroModel(models.int8)
    assert micro.arena_bytes == mcu.min_arena_bytes(models.int8)
    assert micro.input_spec.dtype == "int8" and micro.input_spec.shape == (1, 8, 8, 1)
    x = models.x[:24]
    reference = load_model(models.int8, delegate=False)  # LiteRT builtin int8 kernels
    assert micro.input_spec == reference.input_spec
    assert micro.output_spec == reference.output_spec
    np.testing.assert_array_equal(micro.predict(x), reference.predict(x))
    # Raw int8 path: set_input / invoke / get_output.
    q = np.clip(np.rint(x[:1] / micro.input_spec.scale + micro.input_spec.zero_point), -128, 127)
    micro.set_input(q.astype(np.int8))
    micro.invoke()
    raw = micro.get_output()
    assert raw.dtype == np.int8 and raw.shape == (1, 10)
    # With XNNPACK (the default delegate) at most one output step apart.
    xnn = load_model(models.int8).predict(x)
    assert np.abs(micro.predict(x) - xnn).max() <= (micro.output_spec.scale or 0) * 1.0001
    # Predictions agree with the float model on these samples.
    f32 = load_model(models.float32).predict(x)
    assert np.mean(f32.argmax(1) == micro.predict(x).argmax(1)) >= 0.9


def test_micro_model_checks_a_given_arena(models: Models) -> None:
    arena = mcu.min_arena_bytes(models.int8)
    ok = mcu.MicroModel(models.int8, arena_bytes=arena + 1024)
    assert ok.invoke_one(models.x[0]).shape == (10,)
    with pytest.raises(ModelFileError, match="does not allocate"):
        mcu.MicroModel(models.dw_int8, arena_bytes=600)


def test_missing_tflite_micro(models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    mcu._tflm.cache_clear()
    try:
        for mod in ("tflite_micro", "tflite_micro.python", "tflite_micro.python.tflite_micro"):
            monkeypatch.setitem(sys.modules, mod, None)
        with pytest.raises(RuntimeUnavailableError, match="pip install tflite-micro"):
            mcu.min_arena_bytes(models.int8)
        with pytest.raises(RuntimeUnavailableError):
            mcu.MicroModel(models.int8)
    finally:
        monkeypatch.undo()
        mcu._tflm.cache_clear()


# -------------------------------------------------------------------- MACs


def test_count_macs_hand_computed(models: Models) -> None:
    # conv: 8x8x4 outputs x 3x3x1; depthwise: 8x8x4 outputs x 3x3; dense: 256 x 10
    want = 8 * 8 * 4 * 9 + 8 * 8 * 4 * 9 + 256 * 10
    assert mcu.count_macs(models.dw_float) == want == 7168
    assert mcu.count_macs(models.dw_int8) == want
    # conv 8x8x16 x 3x3x1 + dense 256x128 + dense 128x10
    assert mcu.count_macs(models.int8) == 8 * 8 * 16 * 9 + 256 * 128 + 128 * 10
    with pytest.raises(ModelFileError):
        mcu.count_macs(b"garbage" * 10)
