"""Export a trained model as device artifacts: TFLite float32/int8 and ONNX float32/int8.

``export_artifacts(keras_model, calibration, out_dir)`` writes, in this order:

``model_float32.tflite``
    ``tf.lite.TFLiteConverter.from_concrete_functions`` on a ``tf.function`` with a
    fixed batch of 1 (what a device invokes; no SHAPE/STRIDED_SLICE/PACK ops for a
    dynamic batch, no SignatureDef, no conversion metadata).
``model_int8.tflite``
    Full-integer: int8 weights (per-channel) and activations, int8 input and output,
    ``TFLITE_BUILTINS_INT8`` only (the converter fails rather than keep a float op),
    calibrated on up to ``MAX_CALIBRATION_SAMPLES`` rows of the calibration array.
    Runs unchanged under LiteRT and TFLite Micro.
``model_float32.onnx``
    ``tf2onnx.convert.from_function`` with an explicit input signature (dynamic
    batch); ``tf2onnx.convert.from_keras`` does not handle Keras 3.
``model_int8.onnx``
    ONNX Runtime ``quantize_static``: QDQ, int8 weights per channel and int8
    activations (what Arm CPUs prefer), MinMax calibration, after ``quant_pre_process``.

Every setting goes into ``ArtifactFile.quantization`` (recorded in the lineage).

``export_from_file(path, calibration, out_dir)`` is the "bring your own model" entry:

* ``.keras`` / ``.h5`` files and SavedModel directories: all four artifacts, as above.
* ``.tflite``, float32: copied as the float32 TFLite artifact, plus ONNX float32 and
  int8 through ``tf2onnx.convert.from_tflite`` when tf2onnx can convert it (skipped,
  with a progress note, otherwise).  No int8 TFLite: TensorFlow cannot re-quantize a
  flatbuffer without the float graph; export from the Keras/SavedModel model instead.
* ``.tflite``, full-integer int8: kept as the int8 TFLite artifact (nothing else can
  be derived from it).  Hybrid or float16 files are refused.
* ``.onnx``, float: copied as the float32 ONNX artifact and quantized to int8;
  already quantized (QDQ / QLinear): kept as the int8 ONNX artifact.

Files appear in ``out_dir`` only once all of them are complete (written to a staging
directory inside ``out_dir``, then renamed); a failure leaves nothing behind.
TensorFlow, tf2onnx, onnx and ONNX Runtime are imported when needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tinyfleet.host.errors import CalibrationError, ModelFileError, StorageError

__all__ = [
    "FILE_NAMES",
    "MAX_CALIBRATION_SAMPLES",
    "ONNX_OPSET",
    "ArtifactFile",
    "export_artifacts",
    "export_from_file",
]

ONNX_OPSET = 17
MAX_CALIBRATION_SAMPLES = 500
"""Rows of the calibration array used at most (the converter runs the model on each)."""

FILE_NAMES: dict[tuple[str, str], str] = {
    ("tflite", "float32"): "model_float32.tflite",
    ("tflite", "int8"): "model_int8.tflite",
    ("onnx", "float32"): "model_float32.onnx",
    ("onnx", "int8"): "model_int8.onnx",
}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ArtifactFile:
    """One exported model file and the settings that produced it."""

    path: Path
    format: Literal["tflite", "onnx"]
    precision: Literal["float32", "int8"]
    quantization: dict[str, Any] = field(default_factory=dict)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _note(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def _import_tf() -> Any:
    # Only when called: TF reads this once, at its first import.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # type: ignore[import-untyped]

    return tf


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """Mute the converter's Python-side chatter (absl deprecation notes, UserWarnings)."""
    loggers = [logging.getLogger(name) for name in ("absl", "tensorflow")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ----------------------------------------------------------------- calibration


def _check_calibration(
    calibration: Any, sample_shape: Sequence[int | None], what: str
) -> np.ndarray:
    """The calibration array as float32 ``(n, *sample_shape)``; ``CalibrationError`` otherwise."""
    want = "(n, " + ", ".join("?" if d is None else str(d) for d in sample_shape) + ")"
    try:
        arr = np.asarray(calibration)
    except Exception as exc:
        raise CalibrationError(f"{what}: calibration data is not an array: {exc}") from None
    if arr.dtype.kind not in "fiu":
        raise CalibrationError(f"{what}: calibration data must be numeric, got dtype {arr.dtype}")
    if arr.ndim != len(sample_shape) + 1 or any(
        d is not None and d != got for d, got in zip(sample_shape, arr.shape[1:], strict=False)
    ):
        raise CalibrationError(
            f"{what}: calibration data has shape {arr.shape}; the model expects {want}"
        )
    if arr.shape[0] < 1:
        raise CalibrationError(f"{what}: calibration data is empty; the model expects {want}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise CalibrationError(f"{what}: calibration data contains NaN or infinite values")
    return arr


def _subsample(calibration: np.ndarray) -> np.ndarray:
    n = calibration.shape[0]
    if n <= MAX_CALIBRATION_SAMPLES:
        return calibration
    idx = np.linspace(0, n - 1, MAX_CALIBRATION_SAMPLES).round().astype(np.int64)
    return calibration[idx]


# --------------------------------------------------------------------- staging


class _Staging:
    """Files written into a hidden directory of ``out_dir``, renamed into place on commit."""

    def __init__(self, out_dir: Path) -> None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
        except OSError as exc:
            raise StorageError(f"{out_dir}: cannot write artifacts: {exc.strerror}") from None
        self.out_dir = out_dir
        self.staged: list[ArtifactFile] = []

    def path(self, name: str) -> Path:
        return self.dir / name

    def add(
        self,
        fmt: Literal["tflite", "onnx"],
        precision: Literal["float32", "int8"],
        quantization: dict[str, Any],
    ) -> None:
        self.staged.append(
            ArtifactFile(self.path(FILE_NAMES[(fmt, precision)]), fmt, precision, quantization)
        )

    def write(self, name: str, data: bytes) -> Path:
        p = self.path(name)
        try:
            with p.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise StorageError(f"{p}: cannot write the artifact: {exc.strerror}") from None
        return p

    def commit(self) -> list[ArtifactFile]:
        done = []
        for art in self.staged:
            final = self.out_dir / art.path.name
            try:
                os.replace(art.path, final)
            except OSError as exc:
                raise StorageError(f"{final}: cannot write the artifact: {exc.strerror}") from None
            done.append(ArtifactFile(final, art.format, art.precision, art.quantization))
        return done

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[_Staging]:
    stage = _Staging(Path(out_dir))
    try:
        yield stage
    finally:
        stage.cleanup()


# ------------------------------------------------------------------- TFLite


def _tflite_int8_check(data: bytes) -> dict[str, Any]:
    """Input/output quantization of a full-integer model; ModelFileError if a float op remains."""
    from tinyfleet.agent.runtime import load_model

    float_ops = sorted({name for name, types in _tflite_ops(data) if "float32" in types})
    model = load_model(data, "tflite", delegate=False)
    try:
        if float_ops or model.input_spec.dtype != "int8":
            raise ModelFileError(
                "the int8 conversion kept float32 tensors around "
                f"{', '.join(float_ops) or 'the input'}: an op TFLite cannot quantize to int8"
            )
        return {
            "input_scale": model.input_spec.scale,
            "input_zero_point": model.input_spec.zero_point,
            "output_scale": model.output_spec.scale,
            "output_zero_point": model.output_spec.zero_point,
        }
    finally:
        model.close()


def _tflite_ops(data: bytes) -> list[tuple[str, set[str]]]:
    """Each op of a TFLite model with the dtypes of its operands and results."""
    from tinyfleet.agent.runtime import _tflite_runtime

    rt = _tflite_runtime()
    kwargs: dict[str, Any] = {"model_content": data}
    if rt.op_resolver_type is not None:
        kwargs["experimental_op_resolver_type"] = (
            rt.op_resolver_type.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    try:
        it = rt.interpreter_cls(**kwargs)
        it.allocate_tensors()
        ops = it._get_ops_details()
    except (ValueError, RuntimeError) as exc:
        raise ModelFileError(f"not a valid TFLite model: {_first_line(exc)}") from None
    return [
        (
            str(op["op_name"]),
            {np.dtype(t).name for t in [*op["operand_types"], *op["result_types"]]},
        )
        for op in ops
    ]


def _convert_tflite(
    tf: Any, concrete: Any, calibration: np.ndarray | None
) -> tuple[bytes, dict[str, Any]]:
    with _quiet_converter():
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    converter.exclude_conversion_metadata = True
    settings: dict[str, Any] = {
        "converter": "tf.lite.TFLiteConverter.from_concrete_functions",
        "tensorflow": tf.__version__,
        "batch": 1,
    }
    if calibration is None:
        settings.update({"optimizations": [], "weights": "float32", "activations": "float32"})
    else:
        cal = _subsample(calibration)

        def representative() -> Iterator[list[np.ndarray]]:
            for k in range(cal.shape[0]):
                yield [cal[k : k + 1]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        settings.update(
            {
                "optimizations": ["DEFAULT"],
                "representative_samples": int(cal.shape[0]),
                "supported_ops": ["TFLITE_BUILTINS_INT8"],
                "inference_input_type": "int8",
                "inference_output_type": "int8",
                "weights": "int8 symmetric",
                "per_channel": True,
                "activations": "int8 asymmetric, per-tensor",
                "bias": "int32",
                "calibration_method": "min/max over the representative samples",
            }
        )
    try:
        # The frozen-graph path (no trackable_obj): TF 2.21 marks it deprecated, but
        # the trackable path fails on Keras 3 models and a SavedModel round trip keeps
        # resource variables that the int8 calibrator cannot run.
        with _quiet_converter():
            data = bytes(converter.convert())
    except Exception as exc:  # ConverterError and friends
        kind = "int8" if calibration is not None else "float32"
        raise ModelFileError(f"TFLite {kind} conversion failed: {_first_line(exc)}") from None
    return data, settings


# ---------------------------------------------------------------------- ONNX


class _CalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over an array, in small batches."""

    def __init__(self, name: str, data: np.ndarray, batch: int) -> None:
        self._batches = iter([{name: data[s : s + batch]} for s in range(0, data.shape[0], batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _onnx_input(model: Any) -> tuple[str, list[int | None], bool]:
    """Name, dims (None when symbolic) and whether the batch dimension is dynamic."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelFileError(
            f"ONNX models with one input are supported (this one has {len(inputs)})"
        )
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != 1:  # TensorProto.FLOAT
        raise ModelFileError("the ONNX model's input must be float32")
    dims: list[int | None] = [
        int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in tensor.shape.dim
    ]
    return inputs[0].name, dims, bool(dims) and dims[0] is None


def _quantize_onnx(
    src: Path, dst: Path, calibration: np.ndarray, progress: Progress | None
) -> dict[str, Any]:
    import onnx  # type: ignore[import-untyped]
    from onnxruntime.quantization import (  # type: ignore[import-untyped]
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import (  # type: ignore[import-untyped]
        quant_pre_process,
    )

    model = onnx.load(str(src))
    name, _dims, dynamic = _onnx_input(model)
    cal = _subsample(calibration)
    pre = src.with_name(src.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        preprocessed = True
    except Exception as exc:  # optional step: quantize the original graph instead
        _note(progress, f"ONNX pre-processing skipped: {_first_line(exc)}")
        pre, preprocessed = src, False
    try:
        quantize_static(
            str(pre),
            str(dst),
            _CalibrationReader(name, cal, 64 if dynamic else 1),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as exc:  # onnxruntime raises many types
        raise ModelFileError(f"ONNX int8 quantization failed: {_first_line(exc)}") from None
    finally:
        if preprocessed:
            pre.unlink(missing_ok=True)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "quantizer": "onnxruntime.quantization.quantize_static",
        "onnxruntime": _version("onnxruntime"),
        "format": "QDQ",
        "pre_process": "quant_pre_process(skip_symbolic_shape=True)" if preprocessed else None,
        "weights": "int8 symmetric",
        "per_channel": True,
        "reduce_range": False,
        "activations": "int8 (QInt8)",
        "calibration_method": "MinMax",
        "calibration_samples": int(cal.shape[0]),
        "opset": opset,
    }


def _write_onnx_pair(
    stage: _Staging,
    proto_bytes: bytes,
    settings: dict[str, Any],
    calibration: np.ndarray,
    progress: Progress | None,
) -> None:
    f32 = stage.write(FILE_NAMES[("onnx", "float32")], proto_bytes)
    _check_onnx_runs(f32)
    stage.add("onnx", "float32", settings)
    _note(progress, "quantizing ONNX int8 (onnxruntime quantize_static, QDQ)")
    q = _quantize_onnx(f32, stage.path(FILE_NAMES[("onnx", "int8")]), calibration, progress)
    _check_onnx_runs(stage.path(FILE_NAMES[("onnx", "int8")]))
    source = {k: v for k, v in settings.items() if k.startswith("source")}
    stage.add("onnx", "int8", {**source, "derived": True, **q})


def _check_onnx_runs(path: Path) -> None:
    from tinyfleet.agent.runtime import load_model

    load_model(path, "onnx").close()


# ------------------------------------------------------------------ pipeline


def _export_function(
    call: Callable[[Any], Any],
    sample_shape: tuple[int, ...],
    calibration: np.ndarray,
    out_dir: Path,
    progress: Progress | None,
    source: dict[str, Any],
) -> list[ArtifactFile]:
    tf = _import_tf()
    import tf2onnx  # type: ignore[import-untyped]

    one = tf.TensorSpec([1, *sample_shape], tf.float32, name="input")
    many = tf.TensorSpec([None, *sample_shape], tf.float32, name="input")
    with _staging(out_dir) as stage:
        try:
            concrete = tf.function(call, input_signature=[one]).get_concrete_function()
        except Exception as exc:
            raise ModelFileError(f"the model cannot be traced: {_first_line(exc)}") from None

        _note(progress, "converting TFLite float32")
        data, settings = _convert_tflite(tf, concrete, None)
        stage.write(FILE_NAMES[("tflite", "float32")], data)
        stage.add("tflite", "float32", {**source, **settings})

        _note(progress, "converting TFLite int8 (full-integer)")
        data, settings = _convert_tflite(tf, concrete, calibration)
        settings.update(_tflite_int8_check(data))
        stage.write(FILE_NAMES[("tflite", "int8")], data)
        stage.add("tflite", "int8", {**source, **settings})

        _note(progress, "converting ONNX float32 (tf2onnx)")
        try:
            proto = _onnx_from_function(tf, tf2onnx, tf.function(call, input_signature=[many]))
        except Exception as exc:
            raise ModelFileError(f"ONNX conversion failed: {_first_line(exc)}") from None
        _write_onnx_pair(
            stage,
            proto.SerializeToString(),
            {
                **source,
                "converter": "tf2onnx.convert.from_graph_def (frozen tf.function)",
                "tf2onnx": _version("tf2onnx"),
                "tensorflow": tf.__version__,
                "opset": ONNX_OPSET,
                "batch": "dynamic",
            },
            calibration,
            progress,
        )
        return stage.commit()


def _onnx_from_function(tf: Any, tf2onnx: Any, function: Any) -> Any:
    """ONNX of a ``tf.function`` with its variables frozen into constants.

    ``tf2onnx.convert.from_function`` turns some captured variables (e.g. the mean
    and variance of a Keras ``Normalization`` layer) into extra graph inputs;
    freezing first gives a model with the one input a device feeds.
    """
    from tensorflow.python.framework.convert_to_constants import (  # type: ignore[import-untyped]
        convert_variables_to_constants_v2,
    )

    with _quiet_converter():
        frozen = convert_variables_to_constants_v2(function.get_concrete_function())
    proto, _ = tf2onnx.convert.from_graph_def(
        frozen.graph.as_graph_def(),
        input_names=[t.name for t in frozen.inputs],
        output_names=[t.name for t in frozen.outputs],
        opset=ONNX_OPSET,
    )
    return proto


def _keras_sample_shape(model: Any) -> tuple[int, ...]:
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ModelFileError(
            "the Keras model has no defined input (build it with keras.Input or call it once)"
        )
    if len(inputs) != 1 or len(getattr(model, "outputs", None) or [None]) != 1:
        raise ModelFileError("Keras models with one input and one output are supported")
    shape = tuple(inputs[0].shape)[1:]
    if any(d is None for d in shape):
        raise ModelFileError(f"the model input has unknown dimensions {tuple(inputs[0].shape)}")
    dtype = str(getattr(inputs[0], "dtype", "float32"))
    if "float" not in dtype:
        raise ModelFileError(f"the model input must be floating point, it is {dtype}")
    return tuple(int(d) for d in shape)


def export_artifacts(
    model: Any,
    calibration: np.ndarray,
    out_dir: Path,
    *,
    progress: Progress | None = None,
) -> list[ArtifactFile]:
    """Export a Keras model as TFLite float32/int8 and ONNX float32/int8 into ``out_dir``.

    ``calibration`` is float input data shaped like the model's input with a leading
    batch axis (``CalibrationError`` otherwise).  Returns the artifacts in the order
    float32 TFLite, int8 TFLite, float32 ONNX, int8 ONNX.  ``ModelFileError`` when a
    conversion fails (e.g. an op without an int8 kernel), ``StorageError`` when
    ``out_dir`` cannot be written.
    """
    sample_shape = _keras_sample_shape(model)
    cal = _check_calibration(calibration, sample_shape, "keras model")
    return _export_function(
        lambda x: model(x, training=False),
        sample_shape,
        cal,
        Path(out_dir),
        progress,
        {"source": "keras", "keras": _version("keras")},
    )


# ------------------------------------------------------------ bring your own


def export_from_file(
    path: Path,
    calibration: np.ndarray,
    out_dir: Path,
    *,
    progress: Progress | None = None,
) -> list[ArtifactFile]:
    """Export the artifacts that can be derived from a model file (see the module doc).

    Accepts ``.keras``/``.h5`` Keras files, SavedModel directories, ``.tflite`` and
    ``.onnx`` files.  ``ModelFileError`` for an unreadable, corrupted or unsupported
    model, ``CalibrationError`` when the calibration data does not fit its input,
    ``StorageError`` when ``out_dir`` cannot be written.
    """
    path = Path(path)
    out_dir = Path(out_dir)
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return _from_saved_model(path, calibration, out_dir, progress)
        raise ModelFileError(f"{path}: a directory but not a SavedModel (no saved_model.pb)")
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read the model file: {exc.strerror}") from None
    suffix = path.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        return _from_keras_file(path, calibration, out_dir, progress)
    if suffix == ".tflite" or (suffix != ".onnx" and head[4:8] == b"TFL3"):
        return _from_tflite(path, calibration, out_dir, progress)
    if suffix == ".onnx" or head[:1] == b"\x08":
        return _from_onnx(path, calibration, out_dir, progress)
    raise ModelFileError(
        f"{path}: unsupported model file (expected .keras, .h5, .tflite, .onnx or a SavedModel)"
    )


def _from_keras_file(
    path: Path, calibration: np.ndarray, out_dir: Path, progress: Progress | None
) -> list[ArtifactFile]:
    _import_tf()
    import keras  # type: ignore[import-untyped]

    _note(progress, f"loading {path.name}")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # zip, h5py, json and deserialization errors
        raise ModelFileError(f"{path}: not a loadable Keras model: {_first_line(exc)}") from None
    sample_shape = _keras_sample_shape(model)
    cal = _check_calibration(calibration, sample_shape, str(path))
    return _export_function(
        lambda x: model(x, training=False),
        sample_shape,
        cal,
        out_dir,
        progress,
        {"source": "keras file", "source_file": path.name, "keras": _version("keras")},
    )


def _from_saved_model(
    path: Path, calibration: np.ndarray, out_dir: Path, progress: Progress | None
) -> list[ArtifactFile]:
    tf = _import_tf()
    _note(progress, f"loading SavedModel {path.name}")
    try:
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures["serving_default"]
    except Exception as exc:
        raise ModelFileError(f"{path}: not a loadable SavedModel: {_first_line(exc)}") from None
    specs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if len(specs) != 1 or len(outputs) != 1:
        raise ModelFileError(
            f"{path}: SavedModels whose serving_default has one input and one output are supported"
        )
    (name, spec), (out_name,) = next(iter(specs.items())), list(outputs)
    if not spec.dtype.is_floating:
        raise ModelFileError(f"{path}: the model input must be floating point, it is {spec.dtype}")
    dims = spec.shape.as_list()[1:]
    if any(d is None for d in dims):
        raise ModelFileError(f"{path}: the model input has unknown dimensions {spec.shape}")
    sample_shape = tuple(int(d) for d in dims)
    cal = _check_calibration(calibration, sample_shape, str(path))

    def call(x: Any) -> Any:
        return signature(**{name: tf.cast(x, spec.dtype)})[out_name]

    return _export_function(
        call,
        sample_shape,
        cal,
        out_dir,
        progress,
        {"source": "saved model", "source_file": path.name, "signature": "serving_default"},
    )


def _from_tflite(
    path: Path, calibration: np.ndarray, out_dir: Path, progress: Progress | None
) -> list[ArtifactFile]:
    from tinyfleet.agent.runtime import load_model

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read the model file: {exc.strerror}") from None
    model = load_model(data, "tflite", delegate=False)
    spec = model.input_spec
    model.close()
    cal = _check_calibration(calibration, spec.shape[1:], str(path))
    types: set[str] = set()
    for _name, op_types in _tflite_ops(data):
        types |= op_types
    source = {"source": "tflite file", "source_file": path.name, "derived": False}
    with _staging(out_dir) as stage:
        if spec.dtype in ("int8", "uint8") and "float32" not in types:
            stage.write(FILE_NAMES[("tflite", "int8")], data)
            stage.add(
                "tflite",
                "int8",
                {
                    **source,
                    **_tflite_int8_check(data),
                    "note": "already full-integer; float artifacts cannot be recovered from it",
                },
            )
            return stage.commit()
        if spec.dtype != "float32" or types - {"float32", "int32", "int64", "bool"}:
            raise ModelFileError(
                f"{path}: a hybrid or float16 TFLite model (tensor types {sorted(types)}); "
                "export from the float Keras model or SavedModel instead"
            )
        f32 = stage.write(FILE_NAMES[("tflite", "float32")], data)
        note = "no int8 TFLite: a flatbuffer cannot be re-quantized without its float graph"
        stage.add("tflite", "float32", {**source, "note": note})
        _note(progress, "converting ONNX float32 (tf2onnx from_tflite)")
        try:
            _import_tf()
            import tf2onnx

            with _quiet_converter():  # it uses the deprecated tf.lite.Interpreter
                proto, _ = tf2onnx.convert.from_tflite(str(f32), opset=ONNX_OPSET)
            onnx_bytes = proto.SerializeToString()
        except Exception as exc:
            _note(
                progress, f"ONNX artifacts skipped: tf2onnx cannot convert it: {_first_line(exc)}"
            )
            return stage.commit()
        _write_onnx_pair(
            stage,
            onnx_bytes,
            {
                **source,
                "derived": True,
                "converter": "tf2onnx.convert.from_tflite",
                "tf2onnx": _version("tf2onnx"),
                "opset": ONNX_OPSET,
            },
            cal,
            progress,
        )
        return stage.commit()


_QUANTIZED_ONNX_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeLinear",
}


def _from_onnx(
    path: Path, calibration: np.ndarray, out_dir: Path, progress: Progress | None
) -> list[ArtifactFile]:
    import onnx

    try:
        data = path.read_bytes()
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:  # DecodeError, ValidationError, OSError
        raise ModelFileError(f"{path}: not a valid ONNX model: {_first_line(exc)}") from None
    _name, dims, _dynamic = _onnx_input(model)
    cal = _check_calibration(calibration, dims[1:], str(path))
    _check_onnx_runs(path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    source = {"source": "onnx file", "source_file": path.name, "opset": opset}
    with _staging(out_dir) as stage:
        if any(n.op_type in _QUANTIZED_ONNX_OPS for n in model.graph.node):
            stage.write(FILE_NAMES[("onnx", "int8")], data)
            stage.add("onnx", "int8", {**source, "derived": False, "note": "already quantized"})
            return stage.commit()
        _write_onnx_pair(stage, data, {**source, "derived": False}, cal, progress)
        return stage.commit()
