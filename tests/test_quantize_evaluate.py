"""Export (TFLite/ONNX, float32/int8) and evaluation on a small digits CNN.

One module-scoped fixture trains the CNN on ``sklearn``'s bundled digits (8x8) and
exports it once; the tests read the four artifacts and their metrics.  The CNN is
weight-dominated (34 k parameters, 32 k of them in the first dense layer), so its
int8 file is under 30 % of the float bytes.  Less weight-dominated models land
higher: besides int8 weights and int32 biases, per-channel quantization stores a
float32 scale and an int64 zero-point per output channel for weights and biases
(24 B per channel), and tensor names and the graph cost the same in both files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tinyfleet.agent.profiles import PROFILES
from tinyfleet.host.errors import CalibrationError, ModelFileError
from tinyfleet.host.evaluate import ArtifactMetrics, evaluate_all, evaluate_artifact
from tinyfleet.host.quantize import export_artifacts, export_from_file

# conv 8x8x16 outputs x 3x3x1 + dense 256x128 + dense 128x10
DIGITS_CNN_MACS = 8 * 8 * 16 * 9 + 256 * 128 + 128 * 10


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    train, test = idx[:1400], idx[1400:]
    return x[train], y[train], x[test], y[test]


def _digits_cnn() -> Any:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(128, activation="relu", name="dense"),
            keras.layers.Dense(10, activation="softmax", name="probs"),
        ]
    )
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    return model


class Exported:
    def __init__(self, root: Path) -> None:
        self.x_train, self.y_train, self.x_test, self.y_test = _digits()
        self.model = _digits_cnn()
        self.model.fit(self.x_train, self.y_train, epochs=5, batch_size=16, verbose=0)
        self.keras_file = root / "digits.keras"
        self.model.save(self.keras_file)
        self.out = root / "artifacts"
        self.progress: list[str] = []
        self.artifacts = export_artifacts(
            self.model, self.x_train, self.out, progress=self.progress.append
        )
        self.metrics = evaluate_all(
            self.artifacts,
            self.x_test,
            self.y_test,
            list(PROFILES.values()),
            latency_runs=200,
        )

    def metric(self, fmt: str, precision: str) -> ArtifactMetrics:
        return next(m for m in self.metrics if (m.format, m.precision) == (fmt, precision))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(tmp_path_factory.mktemp("digits"))


def _report(e: Exported) -> str:
    rows = []
    for m in e.metrics:
        rows.append(
            f"{m.format:6} {m.precision:7} {m.bytes:>8} B  acc {m.accuracy:.4f}  "
            f"p50 {m.latency_p50_ms * 1000:7.1f} us  p99 {m.latency_p99_ms * 1000:7.1f} us  "
            f"size/f32 {m.size_ratio_to_float}  speed-up {m.speedup_over_float}  "
            f"arena {m.arena_bytes}"
        )
    return "\n".join(rows)


# ------------------------------------------------------------------ export


def test_four_artifacts_in_order_with_settings(exported: Exported) -> None:
    arts = exported.artifacts
    assert [(a.path.name, a.format, a.precision) for a in arts] == [
        ("model_float32.tflite", "tflite", "float32"),
        ("model_int8.tflite", "tflite", "int8"),
        ("model_float32.onnx", "onnx", "float32"),
        ("model_int8.onnx", "onnx", "int8"),
    ]
    assert sorted(os.listdir(exported.out)) == sorted(a.path.name for a in arts)  # no temp left
    assert all(a.path.parent == exported.out for a in arts)
    q8 = arts[1].quantization
    assert q8["inference_input_type"] == q8["inference_output_type"] == "int8"
    assert q8["supported_ops"] == ["TFLITE_BUILTINS_INT8"]
    assert q8["representative_samples"] == 500  # capped: 1400 rows given
    assert q8["batch"] == 1
    assert arts[2].quantization["converter"].startswith("tf2onnx.convert.from_graph_def")
    assert arts[2].quantization["opset"] == 17
    qo = arts[3].quantization
    assert (qo["format"], qo["calibration_method"], qo["per_channel"]) == ("QDQ", "MinMax", True)
    assert exported.progress[0] == "converting TFLite float32"


def test_int8_tflite_is_full_integer_and_small(exported: Exported) -> None:
    from ai_edge_litert.interpreter import Interpreter

    f32 = exported.metric("tflite", "float32")
    i8 = exported.metric("tflite", "int8")
    it = Interpreter(model_content=Path(i8.path).read_bytes())
    it.allocate_tensors()
    kinds = {np.dtype(t).name for op in it._get_ops_details() for t in op["operand_types"]}
    assert "float32" not in kinds
    assert i8.input.dtype == "int8" and i8.output.dtype == "int8"
    assert i8.input.shape == (1, 8, 8, 1)
    assert i8.bytes <= 0.30 * f32.bytes, _report(exported)
    assert i8.size_ratio_to_float == pytest.approx(i8.bytes / f32.bytes)


def test_accuracy_int8_close_to_float(exported: Exported) -> None:
    tf32, ti8 = exported.metric("tflite", "float32"), exported.metric("tflite", "int8")
    of32, oi8 = exported.metric("onnx", "float32"), exported.metric("onnx", "int8")
    for m in (tf32, ti8, of32, oi8):
        assert m.accuracy is not None and m.samples == len(exported.y_test)
    assert tf32.accuracy is not None and tf32.accuracy >= 0.85, _report(exported)
    assert abs(tf32.accuracy - (ti8.accuracy or 0)) * 100 <= 1.0, _report(exported)
    assert abs((of32.accuracy or 0) - (oi8.accuracy or 0)) * 100 <= 1.5, _report(exported)
    keras_acc = float(
        np.mean(exported.model.predict(exported.x_test, verbose=0).argmax(1) == exported.y_test)
    )
    assert tf32.accuracy == pytest.approx(keras_acc, abs=0.006)  # at most 2 of 397 flip


# -------------------------------------------------------------- evaluation


def test_metrics_fields(exported: Exported) -> None:
    for m, a in zip(exported.metrics, exported.artifacts, strict=True):
        data = a.path.read_bytes()
        assert m.sha256 == hashlib.sha256(data).hexdigest() and m.bytes == len(data)
        assert 0 < m.latency_p50_ms <= m.latency_p99_ms
        assert 0 < m.invoke_p50_ms <= m.invoke_p99_ms
        assert m.invoke_p50_ms < m.latency_p50_ms  # the runtime call is part of the whole
        assert m.latency_runs == 200
        assert m.macs == DIGITS_CNN_MACS
        assert [f.profile for f in m.fits] == list(PROFILES)
        if m.precision == "float32":
            assert m.size_ratio_to_float is None and m.speedup_over_float is None
        else:
            ref = exported.metric(m.format, "float32")
            assert m.speedup_over_float == pytest.approx(ref.invoke_p50_ms / m.invoke_p50_ms)
            assert m.e2e_speedup_over_float == pytest.approx(ref.latency_p50_ms / m.latency_p50_ms)
    assert exported.metric("tflite", "int8").latency_runtime.startswith("litert ")
    assert exported.metric("onnx", "int8").latency_runtime.startswith("onnxruntime ")


def test_arena_and_fit(exported: Exported) -> None:
    i8 = exported.metric("tflite", "int8")
    assert i8.arena_bytes is not None and 1024 < i8.arena_bytes < 64 * 1024
    assert i8.arena_bytes % 16 == 0
    fits = {f.profile: f for f in i8.fits}
    m4 = fits["cortex-m4"]
    assert m4.fits and m4.reasons == []
    assert m4.ram_needed == i8.arena_bytes + PROFILES["cortex-m4"].ram_reserve_bytes
    assert m4.flash_needed == i8.bytes + PROFILES["cortex-m4"].runtime_flash_bytes
    assert m4.est_latency_ms == pytest.approx(DIGITS_CNN_MACS / (168e6 * 0.5) * 1000)
    assert m4.latency_is_estimate
    for m in exported.metrics:
        if m.format == "onnx" or m.precision == "float32":
            assert m.arena_bytes is None
            assert not {f.profile: f for f in m.fits}["cortex-m4"].fits
        assert {f.profile: f for f in m.fits}["rpi4"].fits


def test_evaluate_artifact_alone_and_data_checks(exported: Exported) -> None:
    art = exported.artifacts[1]
    m = evaluate_artifact(art, exported.x_test[:50], exported.y_test[:50], [], latency_runs=20)
    assert m.samples == 50 and m.fits == [] and m.latency_runs == 20
    assert m.speedup_over_float is None  # no float32 artifact in this call
    no_data = evaluate_artifact(art, None, None, [], latency_runs=10)
    assert no_data.accuracy is None and no_data.notes
    with pytest.raises(CalibrationError, match="expects"):
        evaluate_artifact(art, exported.x_test[:, :4], exported.y_test, [], latency_runs=5)
    with pytest.raises(CalibrationError, match="labels"):
        evaluate_artifact(art, exported.x_test, exported.y_test[:3], [], latency_runs=5)


# ------------------------------------------------------------------ errors


def test_wrong_calibration_shape(exported: Exported, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match=r"\(n, 8, 8, 1\)"):
        export_artifacts(exported.model, np.zeros((10, 8, 8), np.float32), tmp_path / "a")
    with pytest.raises(CalibrationError, match="empty"):
        export_artifacts(exported.model, np.zeros((0, 8, 8, 1), np.float32), tmp_path / "b")
    with pytest.raises(CalibrationError, match=r"shape \(4, 64\)"):
        export_from_file(exported.artifacts[2].path, np.zeros((4, 64)), tmp_path / "c")
    with pytest.raises(CalibrationError, match="NaN"):
        export_from_file(exported.artifacts[0].path, np.full((4, 8, 8, 1), np.nan), tmp_path / "d")
    assert not any((tmp_path / n).exists() and os.listdir(tmp_path / n) for n in "abcd")


@pytest.mark.parametrize("name", ["model.tflite", "model.onnx", "model.keras", "model.h5"])
def test_corrupted_model_file(exported: Exported, tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(1)
    source = {
        "model.tflite": exported.artifacts[1].path.read_bytes()[:5000],  # truncated
        "model.onnx": rng.bytes(3000),
        "model.keras": exported.keras_file.read_bytes()[:2000],
        "model.h5": rng.bytes(3000),
    }[name]
    bad = tmp_path / name
    bad.write_bytes(source)
    out = tmp_path / "out"
    with pytest.raises(ModelFileError):
        export_from_file(bad, exported.x_train[:20], out)
    assert not out.exists() or os.listdir(out) == []
    with pytest.raises(ModelFileError):
        export_from_file(tmp_path / "missing.tflite", exported.x_train[:20], out)


def test_failed_export_leaves_nothing(tmp_path: Path) -> None:
    import keras

    # SIN has no int8 kernel: the float32 TFLite converts, the int8 one cannot.
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.Lambda(lambda t: keras.ops.sin(t)),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    out = tmp_path / "out"
    with pytest.raises(ModelFileError, match="SIN"):
        export_artifacts(model, np.random.default_rng(0).random((16, 4)), out)
    assert os.listdir(out) == []


# --------------------------------------------------------- bring your own


def test_export_from_keras_file(exported: Exported, tmp_path: Path) -> None:
    arts = export_from_file(exported.keras_file, exported.x_train[:100], tmp_path)
    assert [(a.format, a.precision) for a in arts] == [
        ("tflite", "float32"),
        ("tflite", "int8"),
        ("onnx", "float32"),
        ("onnx", "int8"),
    ]
    assert arts[0].quantization["source"] == "keras file"
    assert arts[1].quantization["representative_samples"] == 100
    # Same weights, same float graph: the float TFLite predicts like the first export.
    from tinyfleet.agent.runtime import load_model

    a, b = load_model(arts[0].path), load_model(exported.artifacts[0].path)
    np.testing.assert_allclose(
        a.predict(exported.x_test[:20]), b.predict(exported.x_test[:20]), atol=1e-6
    )


def test_export_from_saved_model(exported: Exported, tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    exported.model.export(saved, format="tf_saved_model", verbose=False)
    arts = export_from_file(saved, exported.x_train[:64], tmp_path / "out")
    assert [a.path.name for a in arts] == [a.path.name for a in exported.artifacts]
    assert arts[1].quantization["source"] == "saved model"
    from tinyfleet.agent.runtime import load_model

    a, b = load_model(arts[0].path), load_model(exported.artifacts[0].path)
    np.testing.assert_allclose(
        a.predict(exported.x_test[:20]), b.predict(exported.x_test[:20]), atol=1e-6
    )
    with pytest.raises(ModelFileError, match="not a SavedModel"):
        export_from_file(tmp_path / "out", exported.x_train[:4], tmp_path / "x")


def test_export_from_tflite_and_onnx_files(exported: Exported, tmp_path: Path) -> None:
    f32_tfl, i8_tfl, f32_onnx, i8_onnx = (a.path for a in exported.artifacts)
    cal = exported.x_train[:50]

    arts = export_from_file(i8_tfl, cal, tmp_path / "i8")
    assert [(a.format, a.precision) for a in arts] == [("tflite", "int8")]
    assert arts[0].path.read_bytes() == i8_tfl.read_bytes()

    arts = export_from_file(f32_tfl, cal, tmp_path / "f32")
    assert [(a.format, a.precision) for a in arts] == [
        ("tflite", "float32"),
        ("onnx", "float32"),
        ("onnx", "int8"),
    ]
    assert arts[0].path.read_bytes() == f32_tfl.read_bytes()
    assert arts[1].quantization["converter"] == "tf2onnx.convert.from_tflite"

    arts = export_from_file(f32_onnx, cal, tmp_path / "onnx")
    assert [(a.format, a.precision) for a in arts] == [("onnx", "float32"), ("onnx", "int8")]
    assert arts[1].quantization["calibration_samples"] == 50
    metrics = evaluate_all(arts, exported.x_test, exported.y_test, [], latency_runs=10)
    assert abs((metrics[0].accuracy or 0) - (metrics[1].accuracy or 0)) * 100 <= 1.5

    arts = export_from_file(i8_onnx, cal, tmp_path / "onnx8")
    assert [(a.format, a.precision) for a in arts] == [("onnx", "int8")]
