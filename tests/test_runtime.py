"""The device inference runtime wrapper (LiteRT and ONNX Runtime), on real runtimes."""

from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tinyfleet.agent import runtime
from tinyfleet.agent.errors import ModelFileError, RuntimeUnavailableError
from tinyfleet.agent.runtime import detect_format, load_model


@dataclass
class Models:
    x: np.ndarray
    f32_b1: bytes  # float32, fixed batch 1
    i8_b1: bytes  # full-integer int8, fixed batch 1
    i8_dyn: bytes  # full-integer int8, dynamic batch
    f32_dyn: bytes  # float32, dynamic batch
    onnx: bytes  # float32 ONNX, dynamic batch
    dir: Path


def _convert(tf: Any, model: Any, batch: int | None, x: np.ndarray, int8: bool) -> bytes:
    spec = tf.TensorSpec([batch, 8, 8, 1], tf.float32, name="input")
    fn = tf.function(lambda t: model(t, training=False), input_signature=[spec])
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    if int8:

        def rep() -> Any:
            for k in range(64):
                yield [x[k : k + 1]]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    with warnings.catch_warnings():  # "Statistics for quantized inputs were expected"
        warnings.simplefilter("ignore", UserWarning)
        return bytes(conv.convert())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    import keras
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(1)
    x = np.random.default_rng(0).random((64, 8, 8, 1), dtype=np.float32)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    many = tf.TensorSpec([None, 8, 8, 1], tf.float32, name="input")
    proto, _ = tf2onnx.convert.from_function(
        tf.function(lambda t: model(t, training=False), input_signature=[many]),
        input_signature=[many],
        opset=17,
    )
    d = tmp_path_factory.mktemp("runtime")
    m = Models(
        x=x,
        f32_b1=_convert(tf, model, 1, x, False),
        i8_b1=_convert(tf, model, 1, x, True),
        i8_dyn=_convert(tf, model, None, x, True),
        f32_dyn=_convert(tf, model, None, x, False),
        onnx=proto.SerializeToString(),
        dir=d,
    )
    for name in ("f32_b1", "i8_b1", "onnx"):
        (d / f"{name}.{'onnx' if name == 'onnx' else 'tflite'}").write_bytes(getattr(m, name))
    return m


def _litert_reference(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """Outputs computed straight on LiteRT, quantizing by hand."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model_bytes, num_threads=1)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    s_in, z_in = i["quantization"]
    s_out, z_out = o["quantization"]
    rows = []
    for k in range(x.shape[0]):
        q = np.rint(x[k : k + 1] * np.float32(1.0 / s_in) + np.float32(z_in))
        it.set_tensor(i["index"], np.clip(q, -128, 127).astype(np.int8))
        it.invoke()
        out = it.get_tensor(o["index"]).astype(np.float32)
        rows.append((out - np.float32(z_out)) * np.float32(s_out))
    return np.concatenate(rows)


# -------------------------------------------------------------------- import


def test_import_does_not_load_runtimes() -> None:
    code = (
        "import sys, tinyfleet.agent.runtime, tinyfleet.agent.profiles, tinyfleet.sim.mcu; "
        "print(sorted(m for m in ('tensorflow', 'keras', 'ai_edge_litert', 'onnxruntime', "
        "'tflite_micro', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_available_runtimes() -> None:
    found = runtime.available_runtimes()
    assert "litert" in found and "onnxruntime" in found


# -------------------------------------------------------------------- format


def test_detect_format(models: Models) -> None:
    assert detect_format(models.i8_b1[:8]) == "tflite"
    assert detect_format(models.onnx[:8]) == "onnx"
    assert detect_format(b"PK\x03\x04....") is None
    assert detect_format(b"") is None


# -------------------------------------------------------------------- TFLite


def test_tflite_specs_from_path_and_bytes(models: Models) -> None:
    from ai_edge_litert.interpreter import Interpreter

    by_path = load_model(models.dir / "i8_b1.tflite")
    by_bytes = load_model(models.i8_b1, "tflite")
    it = Interpreter(model_content=models.i8_b1)
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    for m in (by_path, by_bytes):
        assert m.format == "tflite" and m.runtime.startswith("litert ")
        assert m.input_spec.shape == (1, 8, 8, 1) and m.input_spec.dtype == "int8"
        assert (m.input_spec.scale, m.input_spec.zero_point) == pytest.approx(i["quantization"])
        assert (m.output_spec.scale, m.output_spec.zero_point) == pytest.approx(o["quantization"])
        assert m.output_spec.shape == (1, 10)
    f32 = load_model(models.f32_b1)
    assert f32.input_spec.dtype == "float32" and f32.input_spec.scale is None


def test_int8_predict_quantizes_like_litert(models: Models) -> None:
    m = load_model(models.i8_b1)
    got = m.predict(models.x[:16])
    assert got.dtype == np.float32 and got.shape == (16, 10)
    np.testing.assert_array_equal(got, _litert_reference(models.i8_b1, models.x[:16]))
    # Probabilities of a softmax output, dequantized: rows sum to ~1.
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=0.05)


def test_saturates_out_of_range_inputs(models: Models) -> None:
    m = load_model(models.i8_b1)
    big = np.full((1, 8, 8, 1), 1e6, np.float32)
    edge = np.full((1, 8, 8, 1), m.input_spec.scale * (127 - (m.input_spec.zero_point or 0)))
    np.testing.assert_array_equal(m.predict(big), m.predict(edge.astype(np.float32)))


@pytest.mark.parametrize("name", ["i8_b1", "i8_dyn", "f32_b1", "f32_dyn"])
def test_batch_matches_single_samples(models: Models, name: str) -> None:
    m = load_model(getattr(models, name))
    batch = m.predict(models.x)  # dynamic-batch models take the resized path
    single = np.stack([m.invoke_one(s) for s in models.x])
    if name.startswith("i8"):
        np.testing.assert_array_equal(batch, single)
    else:
        np.testing.assert_allclose(batch, single, atol=1e-6)
    # The interpreter is back at batch 1 afterwards.
    np.testing.assert_array_equal(m.invoke_one(models.x[3]), single[3])
    assert m.predict(models.x[:1]).shape == (1, 10)


def test_invoke_one_shapes(models: Models) -> None:
    m = load_model(models.i8_b1)
    a = m.invoke_one(models.x[0])
    b = m.invoke_one(models.x[:1])
    assert a.shape == (10,)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="shape"):
        m.invoke_one(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="shape"):
        m.predict(np.zeros((4, 64), np.float32))


def test_without_default_delegate(models: Models) -> None:
    plain = load_model(models.i8_b1, delegate=False)
    xnn = load_model(models.i8_b1, threads=2)
    a, b = plain.predict(models.x), xnn.predict(models.x)
    # XNNPACK requantizes in fp32, the builtin kernels in fixed point: at most 1 LSB apart.
    assert np.abs(a - b).max() <= (plain.output_spec.scale or 0) * 1.0001
    assert np.mean(a == b) >= 0.98
    f_plain, f_xnn = load_model(models.f32_b1, delegate=False), load_model(models.f32_b1)
    np.testing.assert_allclose(f_plain.predict(models.x), f_xnn.predict(models.x), atol=1e-5)
    with pytest.raises(ValueError):
        load_model(models.i8_b1, threads=0)


# ---------------------------------------------------------------------- ONNX


def test_onnx_matches_onnxruntime(models: Models) -> None:
    import onnxruntime as ort

    m = load_model(models.dir / "onnx.onnx")
    assert m.format == "onnx" and m.runtime.startswith("onnxruntime ")
    assert m.input_spec.shape == (1, 8, 8, 1) and m.output_spec.shape == (1, 10)
    sess = ort.InferenceSession(models.onnx, providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: models.x})[0]
    np.testing.assert_allclose(m.predict(models.x), want, atol=1e-6)
    np.testing.assert_allclose(m.invoke_one(models.x[5]), want[5], atol=1e-6)
    # ONNX and TFLite float32 of the same Keras model agree.
    np.testing.assert_allclose(
        m.predict(models.x), load_model(models.f32_b1).predict(models.x), atol=1e-5
    )


# -------------------------------------------------------------------- errors


def _corruptions(models: Models) -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    t = models.i8_b1
    return {
        "empty": b"",
        "random": rng.bytes(4000),
        "tfl3-header-garbage": t[:8] + rng.bytes(4000),
        "tflite-first-16": t[:16],
        "tflite-half": t[: len(t) // 2],
        "tflite-minus-100": t[:-100],
        "onnx-half": models.onnx[: len(models.onnx) // 2],
        "onnx-like-garbage": b"\x08" + rng.bytes(3000),
    }


def test_corrupted_models_raise_model_file_error(models: Models, tmp_path: Path) -> None:
    for name, data in _corruptions(models).items():
        with pytest.raises(ModelFileError):
            load_model(data)
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data)
        with pytest.raises(ModelFileError) as info:
            load_model(path)
        assert str(path) in str(info.value)


def test_wrong_format_and_missing_files(models: Models, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="TFL3"):
        load_model(models.onnx, "tflite")
    with pytest.raises(ModelFileError, match="ONNX"):
        load_model(models.i8_b1, "onnx")
    with pytest.raises(ModelFileError, match="cannot read"):
        load_model(tmp_path / "missing.tflite")
    with pytest.raises(ModelFileError, match="cannot read"):
        load_model(tmp_path)


def test_missing_runtime(models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    """An uninstalled runtime (its import blocked) is a RuntimeUnavailableError naming the package."""
    runtime._onnxruntime.cache_clear()
    runtime._tflite_runtime.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "onnxruntime", None)
        with pytest.raises(RuntimeUnavailableError, match="pip install onnxruntime"):
            load_model(models.onnx)
        for mod in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tensorflow"):
            monkeypatch.setitem(sys.modules, mod, None)
        with pytest.raises(RuntimeUnavailableError, match="ai-edge-litert"):
            load_model(models.i8_b1)
    finally:
        monkeypatch.undo()
        runtime._onnxruntime.cache_clear()
        runtime._tflite_runtime.cache_clear()
    assert load_model(models.i8_b1).runtime.startswith("litert ")
