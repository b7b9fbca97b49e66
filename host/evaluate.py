"""Measure artifacts the way a device runs them: accuracy, size, latency, arena, fit.

Accuracy and latency go through ``tinyfleet.agent.runtime`` (the code on the device),
single-threaded.  Latency is the wall time of ``invoke_one`` on one sample, input
quantization and output dequantization included, timed with ``perf_counter_ns`` after
a warm-up; ``evaluate_all`` interleaves the artifacts in blocks so that a load spike
on the machine hits all of them alike.  The tensor arena of the int8 TFLite artifact
is measured under TFLite Micro (``tinyfleet.sim.mcu``); MACs come from the graph; the
fit per device profile from ``tinyfleet.agent.profiles.check_fit``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tinyfleet.agent.profiles import DeviceProfile, FitResult, check_fit
from tinyfleet.agent.runtime import InferenceModel, TensorSpec, load_model
from tinyfleet.host.errors import CalibrationError, ModelFileError, RuntimeUnavailableError
from tinyfleet.host.quantize import ArtifactFile

__all__ = ["ArtifactMetrics", "ProfileFit", "evaluate_all", "evaluate_artifact"]

ProfileFit = FitResult
"""The fit of one artifact on one device profile."""

_BLOCKS = 4
"""Latency runs are taken in this many blocks, interleaved across artifacts."""

_LATENCY_SAMPLES = 256
"""Latency cycles through at most this many evaluation samples."""


class ArtifactMetrics(BaseModel):
    """What was measured for one artifact."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["tflite", "onnx"]
    precision: Literal["float32", "int8"]
    path: str
    sha256: str
    bytes: int
    accuracy: float | None = Field(description="Top-1 accuracy on the evaluation data, 0..1.")
    samples: int = Field(description="Evaluation samples behind the accuracy.")
    latency_p50_ms: float
    latency_p99_ms: float
    latency_runs: int
    latency_runtime: str = Field(description="Runtime, version and settings of the timings.")
    input: TensorSpec
    output: TensorSpec
    arena_bytes: int | None = Field(description="TFLite Micro tensor arena (int8 TFLite only).")
    macs: int | None
    fits: list[FitResult]
    size_ratio_to_float: float | None = None
    invoke_p50_ms: float = Field(description="Runtime call alone (input already set), p50.")
    invoke_p99_ms: float
    speedup_over_float: float | None = Field(
        default=None,
        description="Runtime speed-up: invoke p50 of the float32 artifact of the same format "
        "/ this invoke p50 (both timed in the same run).",
    )
    e2e_speedup_over_float: float | None = Field(
        default=None,
        description="End-to-end (float in, float out, quantization included) p50 ratio.",
    )
    notes: list[str] = Field(default_factory=list)


@dataclass
class _State:
    artifact: ArtifactFile
    data: bytes
    model: InferenceModel
    runtime: str
    samples: np.ndarray
    timings: list[int] = field(default_factory=list)
    invoke_timings: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _check_data(
    x: np.ndarray | None, y: np.ndarray | None, spec: TensorSpec, what: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    if x is None:
        return None, None
    xa = np.asarray(x)
    want = (None, *spec.shape[1:])
    if xa.ndim != len(want) or any(
        w not in (-1, None) and w != g for w, g in zip(want[1:], xa.shape[1:], strict=True)
    ):
        raise CalibrationError(
            f"{what}: evaluation data has shape {xa.shape}; the model expects "
            f"(n, {', '.join(map(str, spec.shape[1:]))})"
        )
    if xa.shape[0] < 1:
        raise CalibrationError(f"{what}: evaluation data is empty")
    if y is None:
        return xa.astype(np.float32, copy=False), None
    ya = np.asarray(y)
    if ya.ndim == 2:
        ya = ya.argmax(axis=1)
    if ya.ndim != 1 or ya.shape[0] != xa.shape[0]:
        raise CalibrationError(
            f"{what}: {ya.shape[0] if ya.ndim else 0} labels for {xa.shape[0]} evaluation samples"
        )
    return xa.astype(np.float32, copy=False), ya


def _accuracy(model: InferenceModel, x: np.ndarray, y: np.ndarray) -> float:
    probs = model.predict(x)
    probs = probs.reshape(probs.shape[0], -1)
    pred = (probs[:, 0] > 0.5).astype(np.int64) if probs.shape[1] == 1 else probs.argmax(axis=1)
    return float(np.mean(pred == y))


def _onnx_macs(data: bytes) -> int | None:
    """MACs of Conv, ConvTranspose, MatMul and Gemm at batch 1 (None if shapes are unknown)."""
    import onnx  # type: ignore[import-untyped]

    model = onnx.load_from_string(data)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = model.graph
    shapes: dict[str, list[int]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)

    def known(name: str) -> list[int] | None:
        s = shapes.get(name)
        return s if s and all(d > 0 for d in s) else None

    total = 0
    for node in g.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        out, a, w = known(node.output[0]), known(node.input[0]), known(node.input[1])
        if out is None or a is None or w is None:
            return None
        if node.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            total += int(np.prod(a)) * int(np.prod(w[1:]))
        elif node.op_type == "MatMul":
            total += int(np.prod(out)) * a[-1]
        else:
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            total += int(np.prod(out)) * (a[0] if trans_a else a[-1])
    return total


def _prepare(artifact: ArtifactFile, delegate: bool) -> _State:
    try:
        data = Path(artifact.path).read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{artifact.path}: cannot read the artifact: {exc.strerror}") from None
    model = load_model(Path(artifact.path), artifact.format, threads=1, delegate=delegate)
    samples = np.zeros((1, *model.input_spec.shape[1:]), np.float32)
    runtime = f"{model.runtime}, 1 thread"
    if artifact.format == "tflite":
        runtime += ", default delegate (XNNPACK)" if delegate else ", builtin kernels"
    return _State(artifact, data, model, runtime, samples)


def _time_block(state: _State, runs: int, warmup: int) -> None:
    model, samples = state.model, state.samples
    n = samples.shape[0]
    for k in range(warmup):
        model.invoke_one(samples[k % n])
    clock = time.perf_counter_ns
    out = state.timings
    for k in range(runs):
        sample = samples[k % n]
        t0 = clock()
        model.invoke_one(sample)
        out.append(clock() - t0)


def _measure_latency(states: Sequence[_State], runs: int, warmup: int) -> None:
    blocks = max(1, min(_BLOCKS, runs))
    for b in range(blocks):
        per_block = runs // blocks + (1 if b < runs % blocks else 0)
        for s in states:
            _time_block(s, per_block, warmup if b == 0 else max(1, warmup // blocks))
            sample = s.samples[b % s.samples.shape[0]]
            s.model.time_invoke(sample, warmup if b == 0 else 1)
            s.invoke_timings.extend(s.model.time_invoke(sample, per_block))


def _finish(
    state: _State,
    x: np.ndarray | None,
    y: np.ndarray | None,
    profiles: Sequence[DeviceProfile],
) -> ArtifactMetrics:
    art, model, notes = state.artifact, state.model, state.notes
    accuracy = None
    if x is not None and y is not None:
        accuracy = _accuracy(model, x, y)
    elif x is not None:
        notes.append("no labels: accuracy not measured")

    arena: int | None = None
    macs: int | None = None
    if art.format == "tflite":
        from tinyfleet.sim import mcu

        if art.precision == "int8":
            try:
                arena = mcu.min_arena_bytes(state.data)
            except RuntimeUnavailableError as exc:
                notes.append(f"arena not measured: {exc}")
            except ModelFileError as exc:
                notes.append(f"arena not measured: {exc}")
        macs = mcu.count_macs(state.data)
    else:
        try:
            macs = _onnx_macs(state.data)
        except Exception as exc:  # onnx shape inference raises its own types
            notes.append(f"MACs not counted: {exc}")

    t = np.asarray(state.timings, dtype=np.float64) / 1e6
    ti = np.asarray(state.invoke_timings, dtype=np.float64) / 1e6
    fits = [check_fit(p, len(state.data), arena, macs, model_format=art.format) for p in profiles]
    return ArtifactMetrics(
        format=art.format,
        precision=art.precision,
        path=str(art.path),
        sha256=hashlib.sha256(state.data).hexdigest(),
        bytes=len(state.data),
        accuracy=accuracy,
        samples=0 if x is None or y is None else int(x.shape[0]),
        latency_p50_ms=float(np.percentile(t, 50)),
        latency_p99_ms=float(np.percentile(t, 99)),
        latency_runs=len(state.timings),
        invoke_p50_ms=float(np.percentile(ti, 50)),
        invoke_p99_ms=float(np.percentile(ti, 99)),
        latency_runtime=state.runtime,
        input=model.input_spec,
        output=model.output_spec,
        arena_bytes=arena,
        macs=macs,
        fits=fits,
        notes=notes,
    )


def evaluate_artifact(
    artifact: ArtifactFile,
    x: np.ndarray | None,
    y: np.ndarray | None,
    profiles: Sequence[DeviceProfile],
    *,
    latency_runs: int = 200,
    warmup: int = 20,
    delegate: bool = True,
) -> ArtifactMetrics:
    """Measure one artifact (accuracy on ``x``/``y``, latency, arena, MACs, fit)."""
    return evaluate_all(
        [artifact], x, y, profiles, latency_runs=latency_runs, warmup=warmup, delegate=delegate
    )[0]


def evaluate_all(
    artifacts: Sequence[ArtifactFile],
    x: np.ndarray | None,
    y: np.ndarray | None,
    profiles: Sequence[DeviceProfile],
    *,
    latency_runs: int = 200,
    warmup: int = 20,
    delegate: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[ArtifactMetrics]:
    """Measure every artifact; ratios and speed-ups are against the float32 artifact of
    the same format, timed in this same call."""
    if latency_runs < 1:
        raise ValueError("latency_runs must be >= 1")
    total = len(artifacts) + 1
    states: list[_State] = []
    xs: list[tuple[np.ndarray | None, np.ndarray | None]] = []
    try:
        for k, art in enumerate(artifacts):
            if progress:
                progress(k, total, f"loading {Path(art.path).name}")
            state = _prepare(art, delegate)
            states.append(state)
            cx, cy = _check_data(x, y, state.model.input_spec, str(art.path))
            xs.append((cx, cy))
            if cx is None:
                state.notes.append("no evaluation data: latency measured on an all-zero input")
            else:
                state.samples = cx[: min(len(cx), _LATENCY_SAMPLES)]
        if progress:
            progress(len(artifacts), total, "timing")
        _measure_latency(states, latency_runs, warmup)
        metrics = []
        for k, (state, (cx, cy)) in enumerate(zip(states, xs, strict=True)):
            if progress:
                progress(k, total, f"measuring {Path(state.artifact.path).name}")
            metrics.append(_finish(state, cx, cy, profiles))
    finally:
        for s in states:
            s.model.close()
    floats = {m.format: m for m in metrics if m.precision == "float32"}
    out = []
    for m in metrics:
        ref = floats.get(m.format)
        if ref is not None and m is not ref:
            m = m.model_copy(
                update={
                    "size_ratio_to_float": m.bytes / ref.bytes,
                    "speedup_over_float": ref.invoke_p50_ms / m.invoke_p50_ms
                    if m.invoke_p50_ms > 0
                    else None,
                    "e2e_speedup_over_float": ref.latency_p50_ms / m.latency_p50_ms
                    if m.latency_p50_ms > 0
                    else None,
                }
            )
        out.append(m)
    if progress:
        progress(total, total, "done")
    return out
