"""Real models and signed versions for agent tests (built once per test session).

A tiny Keras classifier on 8 features, converted to TFLite float32 with
different seeds so that versions differ in bytes and outputs; versions are
registered in a real registry, so manifests, chunk hashes and reference bundles
are exactly what a device receives in production.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

N_FEATURES = 8
N_CLASSES = 3


def make_tflite(out: Path, seed: int) -> Path:
    """Train a few steps of a tiny MLP and convert it to TFLite float32."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras  # type: ignore[import-untyped]
    import tensorflow as tf  # type: ignore[import-untyped]

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, N_FEATURES)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    model = keras.Sequential(
        [
            keras.Input((N_FEATURES,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(N_CLASSES, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3, verbose=0)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    out.write_bytes(converter.convert())
    return out


def reference_inputs(seed: int = 0, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    return x, y


@dataclass
class Version:
    model: str
    number: int
    manifest_json: bytes  # the SignedManifest as the host publishes it
    sha256: str
    model_path: Path
    reference_path: Path
    info: Any


def register_version(
    registry: Any,
    signer: Any,
    tflite: Path,
    *,
    model: str = "tiny",
    latency_budget_ms: float = 50.0,
    corrupt_expected: bool = False,
    expires_in: Any = None,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    preprocess: str = "identity",
    classes: list[str] | None = None,
    lineage: dict[str, Any] | None = None,
    precision: str = "float32",
    arena_bytes: int | None = None,
    profile_kw: dict[str, Any] | None = None,
) -> Version:
    """Register ``tflite`` as a new version with a real reference bundle.

    The profile and health references come from ``x``, ``y`` (default: the tiny model's
    reference inputs); ``profile_kw`` goes to ``drift.build_profile`` (feature names,
    sensor stats).
    """
    from datetime import timedelta

    from tinyfleet.agent import drift
    from tinyfleet.agent.manifest import digest
    from tinyfleet.agent.runtime import load_model
    from tinyfleet.host.registry import NewArtifact

    if x is None or y is None:
        x, y = reference_inputs()
    m = load_model(tflite, "tflite", delegate=False)
    probs = m.predict(x)
    hx, hy = drift.pick_health_inputs(x, y, per_class=2)
    expected = m.predict(hx)
    spec_in, spec_out = m.input_spec, m.output_spec
    m.close()
    if corrupt_expected:
        expected = np.roll(expected, 1, axis=1)
    sha, _ = digest(tflite)
    bundle = drift.ReferenceBundle(
        profile=drift.build_profile(x, probs, **(profile_kw or {})),
        health=drift.health_reference(hx, hy, {sha: expected}, latency_budget_ms=latency_budget_ms),
    ).to_bytes()
    info = registry.register(
        model=model,
        artifacts=[
            NewArtifact(
                path=tflite,
                format="tflite",
                precision=precision,
                input=spec_in,
                output=spec_out,
                arena_bytes=arena_bytes,
                min_ram_bytes=arena_bytes,
            )
        ],
        reference=bundle,
        lineage=lineage or {"test": True},
        metrics={},
        gates=[],
        passed=True,
        rejection_reasons=[],
        preprocess=preprocess,
        classes=classes or [str(i) for i in range(N_CLASSES)],
        signer=signer,
        created_by="tests",
        parent_version=None,
        **({} if expires_in is None else {"expires_in": expires_in or timedelta(days=1)}),
    )
    manifest_json = info.manifest.model_dump_json().encode()
    return Version(
        model=model,
        number=info.number,
        manifest_json=manifest_json,
        sha256=sha,
        model_path=registry.blob_path(sha),
        reference_path=registry.blob_path(info.manifest.manifest.reference.sha256),
        info=info,
    )
