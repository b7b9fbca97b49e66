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
TAIL_EDGES = 6
"""Edges added beyond each end of a sensor stat's quantile edges (see ``quantile_bins``)."""
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
    """What the model's inputs and outputs looked like on held-out data.

    ``features`` are the model's input features, then (when ``monitor`` names a sensor
    stat monitor of ``tinyfleet.agent.features``) that monitor's statistics of the raw
    inputs: the first ``n_inputs`` entries are model inputs, the rest sensor stats.  Drift
    reports score all of them, in this order.  A profile without ``monitor`` (older
    bundles, pipelines without a monitor) describes model inputs only.
    """

    n_samples: int = Field(ge=1)
    features: list[FeatureBins]
    class_priors: list[float]
    confidence_edges: list[float]
    confidence_proportions: list[float]
    mean_confidence: float = Field(ge=0.0, le=1.0)
    monitor: str | None = Field(None, min_length=1, max_length=64)
    """Monitor whose sensor stats follow the model's features (None: none)."""
    n_inputs: int | None = Field(None, ge=1)
    """How many leading ``features`` are model inputs (set with ``monitor``)."""

    @model_validator(mode="after")
    def _check_monitor(self) -> ReferenceProfile:
        if (self.monitor is None) != (self.n_inputs is None):
            raise ValueError("monitor and n_inputs go together")
        if self.n_inputs is not None and self.n_inputs >= len(self.features):
            raise ValueError(
                f"n_inputs ({self.n_inputs}) leaves no sensor stat among "
                f"{len(self.features)} features"
            )
        return self

    @property
    def model_inputs(self) -> int:
        """Number of leading ``features`` that are model inputs."""
        return len(self.features) if self.n_inputs is None else self.n_inputs


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
        data = self.model_dump(mode="json", by_alias=True)
        # a profile without sensor stats is written as before the optional fields existed,
        # so agents that do not know them still read it
        for key in ("monitor", "n_inputs"):
            if data["profile"].get(key) is None:
                data["profile"].pop(key, None)
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceBundle:
        return cls.model_validate_json(data)


def quantile_bins(
    values: np.ndarray, n_bins: int = DEFAULT_BINS, tails: int = 0
) -> tuple[list[float], list[float]]:
    """Interior quantile edges of ``values`` and the share of values in each bin.

    Ties (e.g. a constant feature) collapse duplicate edges, so a feature may have
    fewer bins than asked for; proportions are measured, not assumed.

    ``tails`` > 0 adds that many edges beyond each end, spaced 1, 2, 4, … times the mean
    width of the inner bins: a value that moves past the reference's extremes then still
    changes bin (and the KS statistic) instead of staying in the first or last open bin.
    Used for sensor stats, where one device sits at one value and the fleet's extremes
    are where an offset or a speed change takes a device.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    qs = np.quantile(v, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    edges = [float(e) for e in np.unique(qs)]
    if tails > 0:
        edges = _with_tails(v, edges, tails)
    proportions = bin_counts(v, edges) / v.size
    return edges, [float(p) for p in proportions]


def _with_tails(values: np.ndarray, edges: list[float], tails: int) -> list[float]:
    """``edges`` plus ``tails`` edges beyond each end, at 1, 2, 4, … mean inner bin widths."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = (edges[0], edges[-1]) if edges else (float(np.min(v)), float(np.max(v)))
    width = (hi - lo) / max(len(edges) - 1, 1)
    if not (width > 0):
        width = max(abs(lo), abs(hi), 1.0) * 1e-3
    steps = width * (2.0 ** np.arange(tails))
    below = [lo - d for d in steps[::-1]]
    above = [hi + d for d in steps]
    out = np.unique(np.asarray([*below, *edges, *above], dtype=np.float64))
    return [float(e) for e in out]


def bin_counts(values: np.ndarray, edges: np.ndarray | list[float]) -> np.ndarray:
    """Counts per bin, bins being ``(-inf, e0), [e0, e1), ... [e_last, inf)``."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)


def build_profile(
    features: np.ndarray,
    probabilities: np.ndarray,
    feature_names: list[str] | None = None,
    n_bins: int = DEFAULT_BINS,
    *,
    monitor: str | None = None,
    monitor_stats: np.ndarray | None = None,
    monitor_names: list[str] | None = None,
) -> ReferenceProfile:
    """Profile of model inputs ``features`` (n, ...) and outputs ``probabilities`` (n, classes).

    With ``monitor`` (a monitor name), ``monitor_stats`` (n, S) of the same samples are
    profiled after the features, named ``monitor_names``, with ``TAIL_EDGES`` edges beyond
    each end of their quantile edges (``quantile_bins``).
    """
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    p = np.asarray(probabilities, dtype=np.float64)
    if len(x) != len(p) or len(x) == 0:
        raise ValueError("features and probabilities must have the same, non-zero length")
    names = list(feature_names or [f"f{i}" for i in range(x.shape[1])])
    if len(names) != x.shape[1]:
        raise ValueError(f"{len(names)} feature names for {x.shape[1]} features")
    n_inputs = None
    if (monitor is None) != (monitor_stats is None):
        raise ValueError("monitor and monitor_stats go together")
    if monitor_stats is not None:
        m = np.asarray(monitor_stats, dtype=np.float64).reshape(len(monitor_stats), -1)
        if len(m) != len(x) or m.shape[1] == 0:
            raise ValueError(f"{len(m)} rows of monitor stats for {len(x)} samples")
        m_names = list(monitor_names or [f"m{i}" for i in range(m.shape[1])])
        if len(m_names) != m.shape[1]:
            raise ValueError(f"{len(m_names)} monitor stat names for {m.shape[1]} stats")
        n_inputs = x.shape[1]
        x = np.concatenate([x, m], axis=1)
        names += m_names
    bins = []
    for j, name in enumerate(names):
        tails = TAIL_EDGES if n_inputs is not None and j >= n_inputs else 0
        edges, props = quantile_bins(x[:, j], n_bins, tails)
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
        monitor=monitor,
        n_inputs=n_inputs,
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
