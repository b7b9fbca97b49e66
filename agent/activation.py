"""Atomic activation: stage → verify → swap → load → health check → commit.

Any failure raises ``ActivationError`` with a reason code from the protocol
(``signature``, ``digest``, ``expired``, ``downgrade``, ``load``, ``health_check``,
``no_fit``) and leaves the committed model serving.  A crash at any step is
handled by ``ModelStore.recover()`` at the next start.

Crash points for fault tests are in ``faults.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tinyfleet.agent.drift import ReferenceBundle
from tinyfleet.agent.errors import (
    DigestMismatchError,
    DowngradeError,
    ExpiredManifestError,
    ManifestError,
    ModelFileError,
    RuntimeUnavailableError,
    SignatureError,
    TinyfleetError,
)
from tinyfleet.agent.faults import crash_point
from tinyfleet.agent.manifest import ManifestArtifact, digest, verify_artifact, verify_manifest
from tinyfleet.agent.store import ModelStore, SlotContent


class ActivationError(TinyfleetError):
    """Activation failed; the previous model keeps serving."""

    exit_code = 15

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def reason_code(exc: BaseException) -> str:
    """The protocol's error code for a verification or activation failure."""
    if isinstance(exc, ActivationError):
        return exc.code
    for cls, code in (
        (SignatureError, "signature"),
        (ExpiredManifestError, "expired"),
        (DowngradeError, "downgrade"),
        (DigestMismatchError, "digest"),
        (ManifestError, "manifest"),
        (ModelFileError, "load"),
        (RuntimeUnavailableError, "load"),
    ):
        if isinstance(exc, cls):
            return code
    return "internal"


@dataclass(frozen=True)
class HealthReport:
    agreement: float
    max_abs_diff: float
    latency_ms_max: float
    latency_ms_median: float
    samples: int


def health_check(model: Any, bundle: ReferenceBundle, artifact: ManifestArtifact) -> HealthReport:
    """Run the version's reference inputs: shape, finiteness, latency budget, agreement."""
    h = bundle.health
    if not h.inputs:
        raise ActivationError("health_check", "reference bundle has no inputs")
    x = np.asarray(h.inputs, dtype=np.float32).reshape([len(h.inputs), *h.input_shape])
    outputs = []
    times = []
    for row in x:
        t0 = time.perf_counter()
        out = np.asarray(model.predict(row[None, ...]), dtype=np.float32)
        times.append((time.perf_counter() - t0) * 1000.0)
        outputs.append(out.reshape(-1))
    # The budget is checked against the median: a single prediction's wall time includes
    # whatever preempted it (GIL waits with many agents in one process, a busy CPU), and
    # one such outlier must not fail a healthy model.
    worst = max(times)
    typical = float(np.median(times))
    y = np.stack(outputs)
    n_out = (
        int(np.prod(artifact.output.shape[1:])) if len(artifact.output.shape) > 1 else y.shape[1]
    )
    if y.shape[1] != n_out:
        raise ActivationError(
            "health_check", f"output has {y.shape[1]} values, manifest says {n_out}"
        )
    if not np.all(np.isfinite(y)):
        raise ActivationError("health_check", "output contains NaN or infinity")
    if typical > h.latency_budget_ms:
        raise ActivationError(
            "health_check",
            f"median latency {typical:.2f} ms over the budget of {h.latency_budget_ms} ms",
        )
    expected = h.expected.get(artifact.sha256)
    agreement, max_diff = 1.0, 0.0
    if expected is not None:
        e = np.asarray(expected, dtype=np.float32).reshape(y.shape)
        agreement = float(np.mean(e.argmax(axis=1) == y.argmax(axis=1)))
        max_diff = float(np.max(np.abs(e - y)))
        if agreement < h.min_agreement or max_diff > h.max_abs_diff:
            raise ActivationError(
                "health_check",
                f"outputs disagree with the reference: agreement {agreement:.0%} "
                f"(min {h.min_agreement:.0%}), max |diff| {max_diff:.3f} (max {h.max_abs_diff})",
            )
    return HealthReport(agreement, max_diff, worst, typical, len(y))


@dataclass
class Activated:
    content: SlotContent
    model: Any
    bundle: ReferenceBundle
    health: HealthReport


def load_slot(content: SlotContent, loader: Callable[..., Any]) -> tuple[Any, ReferenceBundle]:
    """Load a slot's model and reference bundle (raises ActivationError('load'))."""
    try:
        bundle = ReferenceBundle.from_bytes(content.reference_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ActivationError("load", f"reference bundle unreadable: {exc}") from None
    try:
        model = loader(content.model_path, content.artifact.format)
    except TinyfleetError as exc:
        raise ActivationError("load", str(exc)) from None
    except Exception as exc:  # a runtime's own error types
        raise ActivationError("load", f"{type(exc).__name__}: {exc}") from None
    return model, bundle


def verify_download(
    signed_manifest: bytes,
    artifact_sha256: str,
    model_file: Path,
    reference_file: Path,
    public_key: Ed25519PublicKey,
    *,
    min_version: int | None,
    allow_rollback: bool,
    now: datetime | None = None,
) -> ManifestArtifact:
    """Verify signature, expiry, version rule and both files against the manifest."""
    manifest = verify_manifest(
        signed_manifest, public_key, now=now, min_version=min_version, allow_rollback=allow_rollback
    )
    artifact = next((a for a in manifest.artifacts if a.sha256 == artifact_sha256), None)
    if artifact is None:
        raise ManifestError(f"artifact {artifact_sha256[:12]} is not in the signed manifest")
    verify_artifact(artifact, model_file)
    sha, size = digest(reference_file)
    if (sha, size) != (manifest.reference.sha256, manifest.reference.size):
        raise DigestMismatchError("reference bundle does not match the manifest")
    return artifact


def activate(
    store: ModelStore,
    signed_manifest: bytes,
    artifact_sha256: str,
    model_file: Path,
    reference_file: Path,
    *,
    public_key: Ed25519PublicKey,
    generation: int,
    loader: Callable[..., Any],
    min_version: int | None = None,
    allow_rollback: bool = False,
    now: datetime | None = None,
) -> Activated:
    """Bring a downloaded model into service, or raise and leave the current one serving."""
    artifact = verify_download(
        signed_manifest,
        artifact_sha256,
        model_file,
        reference_file,
        public_key,
        min_version=min_version,
        allow_rollback=allow_rollback,
        now=now,
    )
    crash_point("after_verify")
    content = store.stage(signed_manifest, artifact, model_file, reference_file)
    crash_point("after_stage")
    return activate_slot(store, content, generation=generation, loader=loader)


def activate_slot(
    store: ModelStore, content: SlotContent, *, generation: int, loader: Callable[..., Any]
) -> Activated:
    """Swap to an already staged and verified slot: trial, load, health check, commit."""
    store.begin_trial(content.slot, generation, content.artifact.sha256)
    crash_point("after_swap")
    try:
        model, bundle = load_slot(content, loader)
    except Exception:
        store.end_trial()
        raise
    try:
        report = health_check(model, bundle, content.artifact)
    except Exception:
        _close(model)
        store.end_trial()
        raise
    crash_point("before_commit")
    store.commit(content)
    return Activated(content, model, bundle, report)


def _close(model: Any) -> None:
    close = getattr(model, "close", None)
    if callable(close):
        close()
