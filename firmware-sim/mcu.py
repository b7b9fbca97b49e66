"""MCU execution under TensorFlow Lite Micro: arena size, a runnable model, MAC count.

TFLite Micro (the ``tflite-micro`` wheel, nightly, x86_64 Linux only) is imported
lazily; without it ``RuntimeUnavailableError``.

**Arena.**  TFLM has no "arena used" call, so ``min_arena_bytes`` searches for the
smallest arena that allocates (interpreter construction + one invoke), a multiple of
``step`` (16 by default: arenas are declared ``alignas(16) uint8_t arena[N]``).  Its
Python wrapper does not survive every failed allocation: arenas below ~464 bytes,
and some sizes at which a kernel's ``Prepare`` runs out of memory, crash the
process (SIGSEGV).  The search therefore runs in a child process that is restarted
after a crash, and a crash counts as "does not allocate".  The figure is measured
with the reference kernels on a 64-bit host: pointers in TFLM's per-tensor and
per-node structures are twice as large as on a 32-bit MCU, and optimized kernels
(CMSIS-NN, ESP-NN) may ask for different scratch buffers, so keep a margin.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from tinyfleet.agent.errors import ModelFileError, RuntimeUnavailableError
from tinyfleet.agent.profiles import DeviceProfile
from tinyfleet.agent.runtime import TensorSpec, dequantize, quantize

__all__ = [
    "MicroModel",
    "arena_allocates",
    "count_macs",
    "mcu_loader",
    "min_arena_bytes",
    "tflm_version",
]

_INSTALL_HINT = (
    "TensorFlow Lite Micro is not installed: pip install tflite-micro (x86_64 Linux wheels only)"
)


@functools.cache
def _tflm() -> Any:
    try:
        from tflite_micro.python.tflite_micro import runtime  # type: ignore[import-untyped]
    except ImportError:
        raise RuntimeUnavailableError(_INSTALL_HINT) from None
    return runtime


def tflm_version() -> str:
    """Version of the installed tflite-micro wheel (``RuntimeUnavailableError`` if none)."""
    _tflm()
    from importlib import metadata

    try:
        return metadata.version("tflite-micro")
    except metadata.PackageNotFoundError:  # pragma: no cover - installed without metadata
        return "unknown"


def _check_flatbuffer(model_bytes: bytes) -> None:
    """Reject what is not a TFLite flatbuffer before TFLM (which does not verify it) sees it."""
    if len(model_bytes) < 8 or model_bytes[4:8] != b"TFL3":
        raise ModelFileError("not a TFLite flatbuffer (no 'TFL3' identifier at byte 4)")
    try:
        from tinyfleet.agent.runtime import load_model

        load_model(model_bytes, "tflite", delegate=False).close()
    except RuntimeUnavailableError:
        pass  # no LiteRT here: TFLM alone decides


# --------------------------------------------------------------------- arena

# Runs in a child process: reads the model, then one arena size per line; answers
# "ok" or "fail" per size.  A crash of this process means "fail" for that size.
_PROBE_CHILD = r"""
import struct, sys
import numpy as np
from tflite_micro.python.tflite_micro import runtime
stdin, stdout = sys.stdin.buffer, sys.stdout
(n,) = struct.unpack(">Q", stdin.read(8))
model = stdin.read(n)
sg = runtime.convert_bytearray_to_object(model).subgraphs[0]
n_inputs = len(sg.inputs)
for line in stdin:
    try:
        it = runtime.Interpreter.from_bytes(model, arena_size=int(line))
        for i in range(n_inputs):
            d = it.get_input_details(i)
            it.set_input(np.zeros(d["shape"], d["dtype"]), i)
        it.invoke()
        ok = True
    except Exception as exc:
        sys.stderr.write(f"probe {int(line)}: {type(exc).__name__}: {exc}\n")
        ok = False
    it = None
    stdout.write("ok\n" if ok else "fail\n")
    stdout.flush()
"""


class _ArenaProber:
    """Answers "does the model allocate and run with an arena of N bytes?" safely."""

    def __init__(self, model_bytes: bytes) -> None:
        self._model = model_bytes
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.crashes = 0
        self.probes = 0

    def __enter__(self) -> _ArenaProber:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> subprocess.Popen[bytes]:
        if self._log is None:
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        proc = subprocess.Popen(
            [sys.executable, "-c", _PROBE_CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        assert proc.stdin is not None
        proc.stdin.write(struct.pack(">Q", len(self._model)) + self._model)
        proc.stdin.flush()
        self._proc = proc
        return proc

    def __call__(self, arena: int) -> bool:
        self.probes += 1
        proc = self._proc or self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(f"{arena}\n".encode())
            proc.stdin.flush()
            answer = proc.stdout.readline().strip()
        except BrokenPipeError:
            answer = b""
        if answer in (b"ok", b"fail"):
            return answer == b"ok"
        # The child died (a crash in TFLM on a failed allocation): that size fails.
        proc.wait()
        self._proc = None
        self.crashes += 1
        if self.crashes > 32:
            raise ModelFileError(f"TFLite Micro keeps crashing on this model: {self.last_error()}")
        return False

    def last_error(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        lines = [
            ln.strip()
            for ln in self._log.read().decode(errors="replace").splitlines()
            if ln.strip() and not ln.startswith("[Recording")
        ]
        return " | ".join(lines[-3:])

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


_verified: dict[tuple[str, int], int] = {}
"""(model sha256, step) -> smallest arena found, so a MicroModel needs no new search."""


_STEP = 16
"""Default granularity of the arena search: arenas are declared ``alignas(16)``."""


def min_arena_bytes(model_bytes: bytes, *, hi: int = 1 << 20, step: int = _STEP) -> int:
    """Smallest tensor arena, a multiple of ``step``, with which TFLite Micro allocates
    and invokes the model; the same size minus ``step`` does not.

    Binary search over multiples of ``step`` up to ``hi`` (allocation succeeds for every
    size above the minimum).  ``step=1`` gives the exact byte count.  Raises
    ``ModelFileError`` when the model is not a TFLite flatbuffer or does not run
    under TFLM within ``hi`` bytes (e.g. an op TFLM lacks), ``RuntimeUnavailableError``
    without tflite-micro.
    """
    if step < 1 or hi < step:
        raise ValueError("need step >= 1 and hi >= step")
    model_bytes = bytes(model_bytes)
    _tflm()
    _check_flatbuffer(model_bytes)
    top = -(-hi // step)  # in units of step
    with _ArenaProber(model_bytes) as probe:
        if not probe(top * step):
            raise ModelFileError(
                f"the model does not allocate under TFLite Micro with {top * step:,} bytes "
                f"(raise hi, or check its ops): {probe.last_error() or 'no message'}"
            )
        lo = 0  # known to fail (an empty arena)
        while top - lo > 1:
            mid = (lo + top) // 2
            if probe(mid * step):
                top = mid
            else:
                lo = mid
    arena = top * step
    _verified[(hashlib.sha256(model_bytes).hexdigest(), step)] = arena
    return arena


def arena_allocates(model_bytes: bytes, arena: int) -> bool:
    """Whether TFLite Micro allocates and invokes the model with ``arena`` bytes (isolated)."""
    model_bytes = bytes(model_bytes)
    _tflm()
    _check_flatbuffer(model_bytes)
    with _ArenaProber(model_bytes) as probe:
        return probe(arena)


# --------------------------------------------------------------------- model


def _tflm_spec(detail: dict[str, Any]) -> TensorSpec:
    q = detail.get("quantization_parameters") or {}
    scales, zps = q.get("scales"), q.get("zero_points")
    scale = float(scales[0]) if scales is not None and len(scales) == 1 else None
    zero_point = int(zps[0]) if scale is not None and zps is not None and len(zps) else None
    return TensorSpec(
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        scale=scale if scale else None,
        zero_point=zero_point if scale else None,
    )


class MicroModel:
    """A TFLite model run by TensorFlow Lite Micro with a fixed tensor arena.

    ``arena_bytes`` None uses ``min_arena_bytes``.  A given arena is first checked in
    a child process (a too-small arena can crash TFLM's Python wrapper), unless a
    search already showed it is large enough for this model.
    """

    def __init__(self, model_bytes: bytes, arena_bytes: int | None = None) -> None:
        runtime = _tflm()
        self._model = bytes(model_bytes)
        digest = hashlib.sha256(self._model).hexdigest()
        known = [a for (d, _s), a in _verified.items() if d == digest]
        if arena_bytes is None:
            arena_bytes = _verified.get((digest, _STEP)) or min_arena_bytes(self._model)
        elif not (known and arena_bytes >= min(known)) and not arena_allocates(
            self._model, arena_bytes
        ):
            raise ModelFileError(
                f"the model does not allocate under TFLite Micro with an arena of "
                f"{arena_bytes:,} bytes"
            )
        self.arena_bytes = arena_bytes
        try:
            self._it = runtime.Interpreter.from_bytes(self._model, arena_size=arena_bytes)
            self.input_spec = _tflm_spec(self._it.get_input_details(0))
            self.output_spec = _tflm_spec(self._it.get_output_details(0))
        except (RuntimeError, ValueError) as exc:
            raise ModelFileError(f"TFLite Micro cannot load the model: {exc}") from None
        self._in_dtype = np.dtype(self.input_spec.dtype)

    @property
    def format(self) -> str:
        return "tflite"

    @property
    def runtime(self) -> str:
        return f"tflite-micro {tflm_version()}"

    def time_invoke(self, x_one: np.ndarray, runs: int) -> list[int]:
        """Nanoseconds of ``runs`` TFLM invocations on one prepared sample (host time, x86)."""
        a = np.asarray(x_one, np.float32).reshape(self.input_spec.shape)
        self.set_input(quantize(a, self.input_spec))
        out = []
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            self.invoke()
            out.append(time.perf_counter_ns() - t0)
        return out

    def set_input(self, x: np.ndarray) -> None:
        """Copy an already-quantized input (the input tensor's dtype and shape)."""
        self._it.set_input(np.ascontiguousarray(x, self._in_dtype), 0)

    def invoke(self) -> None:
        try:
            self._it.invoke()
        except RuntimeError as exc:
            raise ModelFileError(f"TFLite Micro invoke failed: {exc}") from None

    def get_output(self) -> np.ndarray:
        """The raw output tensor of the last invoke (its own dtype)."""
        return np.array(self._it.get_output(0))

    def invoke_one(self, x_one: np.ndarray) -> np.ndarray:
        """Float32 output row for one float32 sample (quantized like the LiteRT wrapper)."""
        a = np.asarray(x_one, np.float32).reshape(self.input_spec.shape)
        self.set_input(quantize(a, self.input_spec))
        self.invoke()
        out = dequantize(self.get_output(), self.output_spec)
        return out[0] if out.shape[:1] == (1,) else out

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float32 outputs for a float32 batch, one invoke per sample."""
        a = np.asarray(x, np.float32)
        if a.shape[1:] != self.input_spec.shape[1:]:
            raise ValueError(
                f"input batch must have shape (n, {self.input_spec.shape[1:]}), got {a.shape}"
            )
        return np.stack([self.invoke_one(a[k]) for k in range(a.shape[0])])

    def close(self) -> None:
        self._it = None


# ------------------------------------------------------------ MCU devices

_search_locks: dict[str, threading.Lock] = {}
_search_guard = threading.Lock()


def _measured_arena(model_bytes: bytes) -> int:
    """``min_arena_bytes`` once per model and process, even with several loaders at once."""
    digest = hashlib.sha256(model_bytes).hexdigest()
    with _search_guard:
        lock = _search_locks.setdefault(digest, threading.Lock())
    with lock:
        known = _verified.get((digest, _STEP))
        return known if known is not None else min_arena_bytes(model_bytes)


def mcu_loader(profile: DeviceProfile) -> Callable[..., MicroModel]:
    """A model loader for an agent on an MCU-class device of ``profile``.

    The model runs under TensorFlow Lite Micro with the smallest arena it allocates
    with, measured here (not taken from the manifest): if that arena plus the
    profile's RAM reserve exceeds its RAM, or model plus runtime code its flash, the
    load fails with both figures in the message (the agent reports it and keeps its
    previous model).  Latency is this host's TFLM time, not the MCU's: the profile's
    estimate (``check_fit``) is the figure for the device.
    """

    def load(source: Path | bytes | str, fmt: str | None = None) -> MicroModel:
        if fmt not in (None, "tflite"):
            raise ModelFileError(f"{profile.name} runs TFLite models under TFLite Micro, not {fmt}")
        if isinstance(source, bytes | bytearray):
            data = bytes(source)
        else:
            try:
                data = Path(source).read_bytes()
            except OSError as exc:
                raise ModelFileError(f"cannot read {source}: {exc.strerror}") from None
        flash = len(data) + profile.runtime_flash_bytes
        if flash > profile.flash_bytes:
            raise ModelFileError(
                f"{profile.name}: model {len(data):,} B + runtime {profile.runtime_flash_bytes:,} B"
                f" = {flash:,} B exceeds flash {profile.flash_bytes:,} B"
            )
        arena = _measured_arena(data)
        need = arena + profile.ram_reserve_bytes
        if need > profile.ram_bytes:
            raise ModelFileError(
                f"{profile.name}: measured arena {arena:,} B + reserve "
                f"{profile.ram_reserve_bytes:,} B = {need:,} B exceeds RAM {profile.ram_bytes:,} B"
            )
        return MicroModel(data, arena)

    return load


# ---------------------------------------------------------------------- MACs

_CONV_LIKE = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL"}


def count_macs(model_bytes: bytes) -> int:
    """Multiply-accumulates of one inference (batch 1), from the TFLite graph.

    Counted: CONV_2D (output elements x kh x kw x in-channels per group),
    DEPTHWISE_CONV_2D (output elements x kh x kw), FULLY_CONNECTED (output elements
    x input features), TRANSPOSE_CONV (input elements x kh x kw x out-channels),
    BATCH_MATMUL (output elements x inner dimension, assuming no adjoint).  Other ops
    (pooling, element-wise, activations) count 0: they are memory-bound and small
    next to these in the models tinyfleet builds.
    """
    from tinyfleet.agent.runtime import _tflite_runtime

    rt = _tflite_runtime()
    kwargs: dict[str, Any] = {"model_content": bytes(model_bytes), "num_threads": 1}
    if rt.op_resolver_type is not None:  # no delegate: keeps the original nodes
        kwargs["experimental_op_resolver_type"] = (
            rt.op_resolver_type.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    try:
        it = rt.interpreter_cls(**kwargs)
        it.allocate_tensors()
        ops = it._get_ops_details()
    except (ValueError, RuntimeError) as exc:
        raise ModelFileError(f"not a valid TFLite model: {exc}") from None

    def shape(idx: int) -> tuple[int, ...]:
        return tuple(int(d) for d in it._get_tensor_details(int(idx), 0)["shape"])

    def elems(s: tuple[int, ...]) -> int:
        return int(np.prod(s, dtype=np.int64)) if s else 1

    total = 0
    for op in ops:
        name = op["op_name"]
        if name not in _CONV_LIKE:
            continue
        ins = [int(i) for i in op["inputs"] if int(i) >= 0]
        out = shape(int(op["outputs"][0]))
        if name == "CONV_2D":
            _cout, kh, kw, cin = shape(ins[1])
            total += elems(out) * kh * kw * cin
        elif name == "DEPTHWISE_CONV_2D":
            _one, kh, kw, _c = shape(ins[1])
            total += elems(out) * kh * kw
        elif name == "FULLY_CONNECTED":
            total += elems(out) * shape(ins[1])[-1]
        elif name == "TRANSPOSE_CONV":
            cout, kh, kw, _cin = shape(ins[1])
            total += elems(shape(ins[2])) * kh * kw * cout
        elif name == "BATCH_MATMUL":
            total += elems(out) * shape(ins[0])[-1]
    return int(total)
