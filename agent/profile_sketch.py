"""Drift reference profiles from many devices, without raw data leaving any of them.

A federated run trains a version for a cohort whose data the host never sees, so
the version's reference profile cannot be built from the host's validation data:
that would describe the old distribution, and the cohort's drift alerts would
never clear.  Instead every client sketches its local data on a grid that all of
them share, and the host merges the sketches:

* ``sketch_grid(profile)`` — per feature, uniform fine bins spanning the parent
  profile's quantile edges widened by ``margin`` times their spread on each side,
  plus an underflow and an overflow bin;
* ``sketch(grid, x, labels, probs)`` — on the device: counts per fine bin and
  feature, label counts, and the histogram of the model's confidence;
* ``merge_sketches(sketches)`` — on the host: the sum;
* ``profile_from_sketch(grid, merged, names)`` — quantile edges interpolated from
  the merged fine histogram, proportions of each coarse bin, class priors from the
  label counts, confidence proportions and mean.

Only counts leave a device: ``features × (bins + 2)`` integers, the label counts
and ten confidence counts.  Pure core: numpy and the profile types only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinyfleet.agent.drift import (
    CONFIDENCE_EDGES,
    DEFAULT_BINS,
    FeatureBins,
    ReferenceProfile,
    bin_counts,
)

__all__ = [
    "GRID_BINS",
    "Sketch",
    "merge_sketches",
    "profile_from_sketch",
    "sketch",
    "sketch_grid",
]

GRID_BINS = 256
"""Fine bins per feature between the grid's bounds."""
MARGIN = 3.0
"""How far past the parent's outer quantile edges the grid reaches, in their spread."""


@dataclass
class Sketch:
    """Counts of one device's (or a merged cohort's) data on a shared grid."""

    features: np.ndarray  # (n_features, GRID_BINS + 2) int64: underflow, fine bins, overflow
    labels: np.ndarray  # (n_classes,) int64
    confidence: np.ndarray  # (len(CONFIDENCE_EDGES) + 1,) int64
    confidence_sum: float
    n: int

    def arrays(self) -> dict[str, np.ndarray]:
        """As plain arrays, for a message between client and server."""
        return {
            "features": self.features,
            "labels": self.labels,
            "confidence": self.confidence,
            "totals": np.asarray([self.confidence_sum, float(self.n)], dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Sketch:
        """Rebuild and check a sketch received from a client (``ValueError`` if malformed)."""
        try:
            features = np.asarray(arrays["features"])
            labels = np.asarray(arrays["labels"])
            confidence = np.asarray(arrays["confidence"])
            totals = np.asarray(arrays["totals"], dtype=np.float64)
        except KeyError as exc:
            raise ValueError(f"sketch is missing {exc.args[0]!r}") from None
        for name, a in (("features", features), ("labels", labels), ("confidence", confidence)):
            if not np.issubdtype(a.dtype, np.integer) or a.size == 0 or np.any(a < 0):
                raise ValueError(f"sketch {name} must be non-negative integer counts")
        if features.ndim != 2 or confidence.shape != (len(CONFIDENCE_EDGES) + 1,):
            raise ValueError("sketch has the wrong shape")
        if totals.shape != (2,) or not np.all(np.isfinite(totals)) or np.any(totals < 0):
            raise ValueError("sketch totals must be two finite, non-negative numbers")
        n = int(totals[1])
        if np.any(features.sum(axis=1) != n) or int(confidence.sum()) != n:
            raise ValueError("sketch counts do not add up to its sample count")
        return cls(features.astype(np.int64), labels.astype(np.int64), confidence, totals[0], n)


def sketch_grid(
    profile: ReferenceProfile, bins: int = GRID_BINS, margin: float = MARGIN
) -> np.ndarray:
    """Per feature, the ``bins + 1`` edges of the fine grid: shape ``(n_features, bins + 1)``."""
    grid = np.empty((len(profile.features), bins + 1), dtype=np.float64)
    for j, f in enumerate(profile.features):
        if f.edges:
            lo, hi = min(f.edges), max(f.edges)
        else:
            lo = hi = 0.0
        spread = hi - lo if hi > lo else max(1.0, abs(lo))
        grid[j] = np.linspace(lo - margin * spread, hi + margin * spread, bins + 1)
    return grid


def _fine_counts(grid: np.ndarray, x: np.ndarray) -> np.ndarray:
    n_features, n_edges = grid.shape
    out = np.zeros((n_features, n_edges + 1), dtype=np.int64)
    for j in range(n_features):
        # side="right" as in drift.bin_counts: index 0 is below the first edge (underflow),
        # n_edges is at or above the last edge (overflow)
        idx = np.searchsorted(grid[j], x[:, j], side="right")
        out[j] = np.bincount(idx, minlength=n_edges + 1)
    return out


def sketch(grid: np.ndarray, x: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> Sketch:
    """Counts of local inputs ``x`` (n, features), true ``labels`` and the model's ``probs``."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if x.shape[1] != grid.shape[0]:
        raise ValueError(f"inputs have {x.shape[1]} features; the grid has {grid.shape[0]}")
    if len(x) != len(y) or len(x) != len(p) or p.ndim != 2:
        raise ValueError("inputs, labels and probabilities must have the same length")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(p))):
        raise ValueError("inputs and probabilities must be finite")
    if np.any(y < 0) or (len(y) and int(y.max()) >= p.shape[1]):
        raise ValueError(f"labels must be class indexes below {p.shape[1]}")
    conf = p.max(axis=1) if len(p) else np.zeros(0)
    return Sketch(
        features=_fine_counts(grid, x),
        labels=np.bincount(y, minlength=p.shape[1]).astype(np.int64),
        confidence=bin_counts(conf, CONFIDENCE_EDGES).astype(np.int64),
        confidence_sum=float(conf.sum()),
        n=len(x),
    )


def merge_sketches(sketches: list[Sketch]) -> Sketch:
    """The sum of sketches on the same grid (``ValueError`` if they do not line up)."""
    if not sketches:
        raise ValueError("no sketch to merge")
    first = sketches[0]
    for s in sketches[1:]:
        if s.features.shape != first.features.shape or s.labels.shape != first.labels.shape:
            raise ValueError("sketches were made on different grids or class counts")
    return Sketch(
        features=sum((s.features for s in sketches), np.zeros_like(first.features)),
        labels=sum((s.labels for s in sketches), np.zeros_like(first.labels)),
        confidence=sum((s.confidence for s in sketches), np.zeros_like(first.confidence)),
        confidence_sum=float(sum(s.confidence_sum for s in sketches)),
        n=sum(s.n for s in sketches),
    )


def _quantile_edges(grid_row: np.ndarray, counts: np.ndarray, n_bins: int) -> list[float]:
    """Interior quantiles of a fine histogram, linear inside each fine bin."""
    n = counts.sum()
    # the cumulative share at each grid edge: underflow lies below grid_row[0]
    cum = np.cumsum(counts[:-1]) / n  # at grid_row[0], grid_row[1], ... grid_row[-1]
    edges = []
    for q in np.linspace(0.0, 1.0, n_bins + 1)[1:-1]:
        k = int(np.searchsorted(cum, q, side="left"))
        if k == 0:
            edges.append(float(grid_row[0]))
        elif k >= len(grid_row):
            edges.append(float(grid_row[-1]))
        else:
            lo_c, hi_c = cum[k - 1], cum[k]
            frac = 0.0 if hi_c <= lo_c else (q - lo_c) / (hi_c - lo_c)
            edges.append(float(grid_row[k - 1] + frac * (grid_row[k] - grid_row[k - 1])))
    return [float(e) for e in np.unique(edges)]


def _coarse_proportions(
    grid_row: np.ndarray, counts: np.ndarray, edges: list[float]
) -> list[float]:
    """Share of each coarse bin, splitting fine bins that straddle an edge linearly."""
    n = counts.sum()
    # cumulative counts at arbitrary points, linear inside fine bins
    cum_at_grid = np.concatenate([[counts[0]], counts[0] + np.cumsum(counts[1:-1])])
    at_edges = np.interp(edges, grid_row, cum_at_grid) if edges else np.zeros(0)
    below = np.concatenate([[0.0], at_edges, [float(n)]])
    props = np.clip(np.diff(below) / n, 0.0, None)
    return [float(v) for v in props / props.sum()]


def profile_from_sketch(
    grid: np.ndarray,
    merged: Sketch,
    feature_names: list[str],
    n_bins: int = DEFAULT_BINS,
) -> ReferenceProfile:
    """A reference profile of the data the sketches describe."""
    if merged.n < 1:
        raise ValueError("the sketches hold no samples")
    if len(feature_names) != grid.shape[0]:
        raise ValueError(f"{len(feature_names)} feature names for {grid.shape[0]} features")
    bins = []
    for j, name in enumerate(feature_names):
        edges = _quantile_edges(grid[j], merged.features[j], n_bins)
        props = _coarse_proportions(grid[j], merged.features[j], edges)
        bins.append(FeatureBins(name=name, edges=edges, proportions=props))
    priors = merged.labels / max(1, int(merged.labels.sum()))
    conf = merged.confidence / merged.n
    return ReferenceProfile(
        n_samples=merged.n,
        features=bins,
        class_priors=[float(v) for v in priors],
        confidence_edges=list(CONFIDENCE_EDGES),
        confidence_proportions=[float(v) for v in conf],
        mean_confidence=min(1.0, max(0.0, merged.confidence_sum / merged.n)),
    )
