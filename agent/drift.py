"""Drift reference profiles and the reference bundle shipped with every model version.

Pure core: numpy and pydantic only.  The host builds a ``ReferenceBundle`` from
held-out data when it registers a version; the device downloads it beside the
model (its sha256 is in the signed manifest) and uses

* ``profile`` as the reference its drift statistics are computed against, and
* ``health`` as the inputs and expected outputs of its activation health check.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_BINS = 10
CONFIDENCE_EDGES = [0.1 * i for i in range(1, 10)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureBins(_Frozen):
    """Quantile bins of one input feature: ``len(proportions) == len(edges) + 1``."""

    name: str
    edges: list[float]
    proportions: list[float]

    @model_validator(mode="after")
    def _check(self) -> FeatureBins:
        if len(self.proportions) != len(self.edges) + 1:
            raise ValueError("proportions must have one more entry than edges")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must be strictly increasing")
        if abs(sum(self.proportions) - 1.0) > 1e-6:
            raise ValueError("proportions must sum to 1")
        return self


class ReferenceProfile(_Frozen):
    """What the model's inputs and outputs looked like on held-out data."""

    n_samples: int = Field(ge=1)
    features: list[FeatureBins]
    class_priors: list[float]
    confidence_edges: list[float]
    confidence_proportions: list[float]
    mean_confidence: float = Field(ge=0.0, le=1.0)


class HealthReference(_Frozen):
    """Reference inputs and, per artifact sha256, the outputs that artifact gives on them."""

    inputs: list[list[float]]
    input_shape: list[int]
    labels: list[int]
    expected: dict[str, list[list[float]]]
    max_abs_diff: float = 0.05
    min_agreement: float = 0.99
    latency_budget_ms: float = 50.0


class ReferenceBundle(_Frozen):
    """The blob referenced by ``Manifest.reference``."""

    schema_: int = Field(default=1, alias="schema")
    profile: ReferenceProfile
    health: HealthReference

    def to_bytes(self) -> bytes:
        return json.dumps(
            self.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":")
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceBundle:
        return cls.model_validate_json(data)


def quantile_bins(
    values: np.ndarray, n_bins: int = DEFAULT_BINS
) -> tuple[list[float], list[float]]:
    """Interior quantile edges of ``values`` and the share of values in each bin.

    Ties (e.g. a constant feature) collapse duplicate edges, so a feature may have
    fewer bins than asked for; proportions are measured, not assumed.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    qs = np.quantile(v, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    edges = np.unique(qs)
    proportions = bin_counts(v, edges) / v.size
    return [float(e) for e in edges], [float(p) for p in proportions]


def bin_counts(values: np.ndarray, edges: np.ndarray | list[float]) -> np.ndarray:
    """Counts per bin, bins being ``(-inf, e0), [e0, e1), ... [e_last, inf)``."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)


def build_profile(
    features: np.ndarray,
    probabilities: np.ndarray,
    feature_names: list[str] | None = None,
    n_bins: int = DEFAULT_BINS,
) -> ReferenceProfile:
    """Profile of model inputs ``features`` (n, ...) and outputs ``probabilities`` (n, classes)."""
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    p = np.asarray(probabilities, dtype=np.float64)
    if len(x) != len(p) or len(x) == 0:
        raise ValueError("features and probabilities must have the same, non-zero length")
    names = feature_names or [f"f{i}" for i in range(x.shape[1])]
    if len(names) != x.shape[1]:
        raise ValueError(f"{len(names)} feature names for {x.shape[1]} features")
    bins = []
    for j, name in enumerate(names):
        edges, props = quantile_bins(x[:, j], n_bins)
        bins.append(FeatureBins(name=name, edges=edges, proportions=props))
    n_classes = p.shape[1]
    priors = np.bincount(p.argmax(axis=1), minlength=n_classes) / len(p)
    conf = p.max(axis=1)
    conf_props = bin_counts(conf, CONFIDENCE_EDGES) / len(conf)
    return ReferenceProfile(
        n_samples=len(x),
        features=bins,
        class_priors=[float(v) for v in priors],
        confidence_edges=list(CONFIDENCE_EDGES),
        confidence_proportions=[float(v) for v in conf_props],
        mean_confidence=float(conf.mean()),
    )


def pick_health_inputs(
    x: np.ndarray, y: np.ndarray, per_class: int = 2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A small, class-balanced, deterministic set of reference inputs."""
    rng = np.random.default_rng(seed)
    picks: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        picks.extend(rng.choice(idx, size=min(per_class, idx.size), replace=False).tolist())
    order = np.array(sorted(picks))
    return x[order], y[order]


def health_reference(
    inputs: np.ndarray, labels: np.ndarray, expected: dict[str, np.ndarray], **kwargs: Any
) -> HealthReference:
    return HealthReference(
        inputs=np.asarray(inputs, dtype=np.float32).reshape(len(inputs), -1).tolist(),
        input_shape=list(inputs.shape[1:]),
        labels=[int(v) for v in labels],
        expected={k: np.asarray(v, dtype=np.float32).tolist() for k, v in expected.items()},
        **kwargs,
    )
