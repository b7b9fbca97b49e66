"""Run one federated training on a SuperLink and collect its result.

``run_federated(superlink, config, initial_weights, validation, workdir)`` writes
the job (settings, the parent's weights, the host's validation set), starts the
Flower app with ``flwr run`` against the SuperLink's connection, waits for the
ServerApp's result file (or the run's failure) and returns an ``FLResult``.  A run
that fails raises: ``FLTooFewNodesError`` when too few nodes connected in time,
``FLError`` otherwise, ``FLTimeoutError`` when nothing finished in time.  Nothing
is printed; Flower's output stays in ``workdir``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinyfleet.agent.fl.errors import FLError, FLTimeoutError, FLTooFewNodesError
from tinyfleet.agent.fl.trainer import MLPSpec
from tinyfleet.host.fl.config import (
    DroppedUpdate,
    FLJob,
    FLResultFile,
    FLRunConfig,
    RoundMetrics,
)
from tinyfleet.host.fl.serverapp import load_weights, save_weights
from tinyfleet.host.fl.superlink import CONNECTION, SuperLink

__all__ = ["APP_DIR", "FLResult", "FLRunConfig", "run_federated", "start_run", "wait_run"]

STATUS_CHECK_S = 20.0
"""Seconds between ``flwr ls`` checks of a run's status while waiting for its result."""

APP_DIR = Path(__file__).resolve().parent / "app"
"""The Flower App folder ``flwr run`` packs (a pyproject.toml naming the components)."""


@dataclass
class FLResult:
    """The outcome of a finished federated run."""

    run_id: int
    weights: list[np.ndarray]
    """Final global weights, Keras ``get_weights()`` order and dtypes of the parent."""
    rounds: list[RoundMetrics]
    nodes: list[int]
    """SuperNode ids whose updates went into at least one aggregate."""
    dropped: list[DroppedUpdate]
    """Every update left out, with its round, node and reason."""
    initial_val_acc: float | None = None
    final_val_acc: float | None = None
    seconds: float = 0.0
    """From ``flwr run`` to the result file."""
    submit_s: float = 0.0
    """The ``flwr run`` command (packing the FAB, submitting over the Control API)."""
    serverapp_s: float = 0.0
    """The ServerApp's own run time (first round's sampling to the last validation)."""
    workdir: Path = field(default_factory=Path)


def _check_inputs(
    initial_weights: Sequence[np.ndarray], validation: tuple[np.ndarray, np.ndarray] | None
) -> MLPSpec:
    spec = MLPSpec.from_weights(initial_weights)  # FLUnsupportedModel for other families
    if validation is not None:
        x, y = np.asarray(validation[0]), np.asarray(validation[1])
        if x.ndim != 2 or x.shape[1] != spec.n_features or y.shape != (x.shape[0],):
            raise FLError(
                f"validation set of shape {tuple(x.shape)} / {tuple(y.shape)} does not fit a "
                f"model with {spec.n_features} inputs"
            )
        if x.shape[0] == 0:
            raise FLError("the validation set is empty")
    return spec


def start_run(
    superlink: SuperLink,
    config: FLRunConfig,
    initial_weights: Sequence[np.ndarray],
    validation: tuple[np.ndarray, np.ndarray] | None,
    workdir: Path,
) -> tuple[int, Path]:
    """Write the job and submit the run; returns (run id, output folder) at once."""
    _check_inputs(initial_weights, validation)
    if not superlink.alive():
        raise FLError(f"the SuperLink at {superlink.address} is not running")
    workdir = Path(workdir).absolute()
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "weights.npz"):
        (out / stale).unlink(missing_ok=True)
    w_path = save_weights(workdir / "initial.npz", [np.asarray(w) for w in initial_weights])
    v_path = None
    if validation is not None:
        v_path = workdir / "validation.npz"
        np.savez(
            v_path, x=np.asarray(validation[0], np.float32), y=np.asarray(validation[1], np.int64)
        )
    job = FLJob(
        config=config,
        initial_weights=str(w_path),
        validation=str(v_path) if v_path else None,
        output=str(out),
    )
    job_path = workdir / "job.json"
    job_path.write_text(job.model_dump_json(indent=1))
    res = superlink.flwr(
        "run", str(APP_DIR), CONNECTION, "--run-config", f'job="{job_path}"', "--format", "json"
    )
    (workdir / "flwr-run.log").write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
    payload = _json_tail(res.stdout)
    if res.returncode != 0 or not payload.get("success") or "run-id" not in payload:
        reason = payload.get("error-message") or (res.stderr or res.stdout).strip()[-400:]
        raise FLError(f"`flwr run` failed: {reason}")
    return int(str(payload["run-id"])), out


def _json_tail(text: str) -> dict[str, object]:
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
            return value if isinstance(value, dict) else {}
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return {}


def _run_status(superlink: SuperLink, run_id: int) -> str | None:
    res = superlink.flwr("ls", "--run-id", str(run_id), "--format", "json", timeout=30)
    payload = _json_tail(res.stdout)
    runs = payload.get("runs")
    if isinstance(runs, list) and runs and isinstance(runs[0], dict):
        status = runs[0].get("status")
        return str(status) if status is not None else None
    return None


def wait_run(
    superlink: SuperLink,
    run_id: int,
    out: Path,
    config: FLRunConfig,
    timeout: float | None = None,
) -> FLResult:
    """Wait for the run's result file; raise on a failed or overdue run."""
    if timeout is None:
        timeout = (
            config.node_wait_s * config.rounds
            + config.rounds * (config.round_timeout_s + 30.0)
            + 60.0
        )
    t0 = time.monotonic()
    deadline = t0 + timeout
    # The ServerApp writes result.json on every outcome it can see; `flwr ls` (a CLI process,
    # ~1.5 s of CPU) only catches a ServerApp that never started, so it is asked rarely.
    next_status = t0 + STATUS_CHECK_S
    result_path = out / "result.json"
    while not result_path.exists():
        now = time.monotonic()
        if not superlink.alive():
            raise FLError(f"the SuperLink stopped during run {run_id} (log: {superlink.log_file})")
        if now >= deadline:
            superlink.flwr("stop", str(run_id), CONNECTION, timeout=30)
            raise FLTimeoutError(f"federated run {run_id} did not finish within {timeout:g} s")
        if now >= next_status:
            status = _run_status(superlink, run_id)
            if status is not None and status.startswith("finished") and not result_path.exists():
                time.sleep(0.5)
                if not result_path.exists():
                    raise FLError(
                        f"federated run {run_id} ended ({status}) without a result; "
                        f"see {superlink.log_file}"
                    )
            next_status = time.monotonic() + STATUS_CHECK_S
        time.sleep(0.05)
    result = FLResultFile.model_validate_json(result_path.read_text())
    if not result.ok:
        if result.error_kind == "too-few-nodes":
            raise FLTooFewNodesError(result.error or "too few nodes")
        raise FLError(f"federated run {run_id} failed: {result.error}")
    if result.weights_file is None:
        raise FLError(f"federated run {run_id} wrote no weights")
    weights = load_weights(Path(result.weights_file))
    return FLResult(
        run_id=result.run_id,
        weights=weights,
        rounds=result.rounds,
        nodes=result.nodes,
        dropped=result.dropped,
        initial_val_acc=result.initial_val_acc,
        final_val_acc=result.rounds[-1].val_acc if result.rounds else None,
        seconds=time.monotonic() - t0,
        serverapp_s=result.seconds,
        workdir=out.parent,
    )


def run_federated(
    superlink: SuperLink,
    config: FLRunConfig,
    initial_weights: Sequence[np.ndarray],
    validation: tuple[np.ndarray, np.ndarray] | None,
    workdir: Path,
    timeout: float | None = None,
) -> FLResult:
    """Run a federated training from ``initial_weights`` and return its result.

    ``initial_weights`` are the parent model's ``get_weights()`` (a dense classifier
    the device trainer supports); ``validation`` ``(x, y)`` is the host's validation
    set, evaluated after every round.  Raises a ``FLError`` subclass on failure.
    """
    t0 = time.monotonic()
    run_id, out = start_run(superlink, config, initial_weights, validation, workdir)
    submitted = time.monotonic()
    result = wait_run(superlink, run_id, out, config, timeout)
    result.seconds = time.monotonic() - t0
    result.submit_s = submitted - t0
    return result
