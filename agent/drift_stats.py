"""Drift statistics of a window of inferences against a version's reference profile.

Pure core: numpy only (plus the ``ReferenceProfile`` type).  Used on the device by
the agent (``DriftAccumulator``, one per serving version) and on the host wherever
the same scores are needed.

Bins.  A feature's reference bins are those of ``drift.bin_counts``: with interior
edges ``e0 < e1 < … < e_{k-2}`` the ``k`` bins are ``(-inf, e0), [e0, e1), …,
[e_{k-2}, inf)``.  A feature whose quantiles coincide has fewer bins (collapsed
edges); one with no edge at all has a single bin and always scores 0.

Scores (per window of ``n`` samples, ``counts`` per bin):

* ``psi`` — population stability index ``Σ (a − e) · ln(a / e)`` over the bins of
  one feature, ``a`` the window's share and ``e`` the reference's.  A share of 0
  would make it infinite, so both distributions are smoothed first:
  ``p' = (p + eps) / (1 + k · eps)`` (``k`` bins, default ``eps = 1e-4``).  The
  result is finite, ≥ 0, 0 for identical distributions, and an empty bin that holds
  10 % of the reference contributes about 0.69.  Rule of thumb: < 0.1 stable,
  0.1–0.25 moderate shift, > 0.25 large shift.  Small windows inflate it (a window
  of ``n`` samples cannot match shares finer than ``1 / n``).
* ``ks`` — the *binned* Kolmogorov–Smirnov statistic: the largest absolute
  difference between the reference CDF and the window's empirical CDF, both
  evaluated at the reference's edges only (``P(X < e_i)``).  It is a lower bound of
  the exact (sample) KS statistic between the reference data and the window, and
  equal to it when there is an edge between every two consecutive distinct values
  of the pooled samples (e.g. the reference's quantiles at every sample).  With 10
  quantile bins it misses differences inside a bin, never invents one.  In [0, 1].
  For the **sensor stats** of a monitored profile (the entries after its ``n_inputs``
  model inputs, see ``ReferenceProfile.monitor``) the ``ks`` entry is the *one-sided*
  binned statistic ``D+ = max_i (F_ref(e_i) − F_win(e_i))``, clipped to [0, 1]: the
  share of the reference that lies below where the window is.  A device's sensor stat
  is nearly one value (its offset, its speed) where the fleet's spreads wide; the
  two-sided KS of such a point mass at ``x`` is ``max(F(x), 1 − F(x))`` and cannot
  tell ``x`` from its mirror image across the fleet's median (a 10 % faster machine
  below the median may score the same), ``D+ = F(x)`` grows with ``x``: any move
  across an edge changes it.
* ``js_prediction`` — Jensen–Shannon *distance* (square root of the divergence,
  base 2, in [0, 1]) between the window's distribution of predicted classes
  (argmax counts) and the reference's class priors; the same value as
  ``scipy.spatial.distance.jensenshannon(p, q, base=2)``.
* ``mean_confidence`` — the mean top-class probability of the window, clipped to
  [0, 1]; ``confidence_shift`` is it minus the reference's, in [-1, 1].

Nothing here returns NaN: inputs are validated (``ValueError``), an empty window
has no report (``DriftAccumulator.report`` returns ``None``), and an inference
whose probabilities are not finite numbers in [0, 1] is left out of the window and
counted in ``skipped``.  A non-finite feature value (NaN, ±inf) is binned as the
largest or smallest value (NaN after +inf), i.e. it shows up as drift.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tinyfleet.agent.drift import ReferenceProfile

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_EPS",
    "DriftAccumulator",
    "js_distance",
    "ks_binned",
    "psi",
    "window_scores",
]

DEFAULT_EPS = 1e-4
"""Additive smoothing of bin shares in ``psi`` (see the module docstring)."""

DEFAULT_CHUNK = 64
"""Feature rows ``DriftAccumulator.add`` buffers before binning them in one batch."""

_SIGN32 = np.uint32(0x80000000)


def _vector(name: str, values: Any) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d array; got shape {v.shape}")
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ValueError(f"{name} must hold finite numbers >= 0")
    return v


def _smooth(p: np.ndarray, eps: float) -> np.ndarray:
    return (p + eps) / (1.0 + p.size * eps)


def psi(ref_proportions: Any, counts: Any, eps: float = DEFAULT_EPS) -> float:
    """Population stability index of a window's bin ``counts`` against reference shares.

    An empty window (all counts 0) scores 0.0.  ``ValueError`` on mismatched lengths,
    negative or non-finite inputs, a reference that does not sum to a positive
    number, or ``eps`` that is not a positive finite number.
    """
    e = _vector("ref_proportions", ref_proportions)
    c = _vector("counts", counts)
    if e.size != c.size:
        raise ValueError(f"{c.size} counts for {e.size} reference bins")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive number; got {eps!r}")
    total_e, n = e.sum(), c.sum()
    if total_e <= 0:
        raise ValueError("ref_proportions must not be all zero")
    if n == 0:
        return 0.0
    a, e = _smooth(c / n, eps), _smooth(e / total_e, eps)
    return max(0.0, float(np.sum((a - e) * np.log(a / e))))


def ks_binned(ref_edges: Any, ref_proportions: Any, counts: Any) -> float:
    """Binned Kolmogorov–Smirnov statistic (see the module docstring); 0.0 for an empty window."""
    edges = np.asarray(ref_edges, dtype=np.float64).ravel()
    e = _vector("ref_proportions", ref_proportions)
    c = _vector("counts", counts)
    if e.size != edges.size + 1 or c.size != e.size:
        raise ValueError(
            f"{edges.size} edges need {edges.size + 1} bins; got {e.size} proportions "
            f"and {c.size} counts"
        )
    if e.sum() <= 0:
        raise ValueError("ref_proportions must not be all zero")
    n = c.sum()
    if n == 0 or edges.size == 0:
        return 0.0
    ref_cdf = np.cumsum(e)[:-1] / e.sum()
    win_cdf = np.cumsum(c)[:-1] / n
    return float(min(1.0, np.max(np.abs(ref_cdf - win_cdf))))


def js_distance(p: Any, q: Any) -> float:
    """Jensen–Shannon distance, base 2, of two distributions (normalised here); in [0, 1]."""
    pv, qv = _vector("p", p), _vector("q", q)
    if pv.size != qv.size:
        raise ValueError(f"p has {pv.size} entries, q has {qv.size}")
    sp, sq = pv.sum(), qv.sum()
    if sp <= 0 or sq <= 0:
        raise ValueError("p and q must not be all zero")
    return _js(pv / sp, qv / sq)


def _js(p: np.ndarray, q: np.ndarray) -> float:
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    d = 0.5 * (kl_p + kl_q)
    return float(math.sqrt(min(1.0, max(0.0, d))))


def _f32_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving map of float32 values to uint32 (as int64): a < b ⇔ key(a) < key(b)."""
    # + 0 turns -0.0 into +0.0: the two compare equal, their bit patterns do not
    bits = np.add(values, np.float32(0.0), dtype=np.float32).view(np.uint32)
    keys = np.where(bits & _SIGN32, ~bits, bits | _SIGN32)
    return keys.astype(np.int64)


def _round_up_f32(edges: np.ndarray) -> np.ndarray:
    """The smallest float32 ≥ each float64 edge: for float32 ``v``, ``v ≥ e ⇔ v ≥ up(e)``."""
    e32 = edges.astype(np.float32)
    low = e32.astype(np.float64) < edges
    e32[low] = np.nextafter(e32[low], np.float32(np.inf))
    return e32


class DriftAccumulator:
    """Streaming bin counts of one window; ``report()`` scores it and starts the next.

    All features are binned with one ``np.searchsorted`` per batch of rows: each
    feature's edges are mapped to order-preserving integer keys (float32 bit
    patterns, edges rounded up to float32 so the comparison with a float32 feature
    is exact), prefixed with the feature's index, and stacked into one sorted
    array; feature vectors are mapped the same way and searched in it, which gives
    directly the index of each value's bin in one flat count array (``np.bincount``
    adds them up).  O(F · log B) per inference, no Python loop over features;
    ``add`` buffers up to ``chunk`` rows (F float32 each) and bins them together,
    which amortises numpy's per-call overhead.

    ``n_classes`` (default: the length of the profile's class priors) must match the
    model's outputs; ``ValueError`` otherwise, and for a profile whose priors are
    not a distribution.  With a monitored profile, rows are the model's features then
    the sensor stats (``profile.n_inputs`` + the rest), and the sensor stats' ``ks`` is
    the one-sided ``D+`` (module docstring).
    """

    def __init__(
        self,
        profile: ReferenceProfile,
        n_classes: int | None = None,
        eps: float = DEFAULT_EPS,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1; got {chunk}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a positive number; got {eps!r}")
        self.profile = profile
        self.eps = eps
        self.n_features = len(profile.features)
        if self.n_features == 0:
            raise ValueError("the reference profile has no features")
        priors = _vector("class_priors", profile.class_priors)
        if priors.sum() <= 0:
            raise ValueError("the reference class priors are all zero")
        self.n_classes = priors.size if n_classes is None else int(n_classes)
        if self.n_classes != priors.size:
            raise ValueError(
                f"the model has {self.n_classes} classes, the reference profile "
                f"{priors.size} class priors"
            )
        self.ref_mean_confidence = float(profile.mean_confidence)
        self._priors = priors / priors.sum()
        n_bins = np.array([len(f.edges) + 1 for f in profile.features], dtype=np.int64)
        self.n_bins = n_bins
        self._starts = np.concatenate([[0], np.cumsum(n_bins)[:-1]]).astype(np.int64)
        self._seg = np.repeat(np.arange(self.n_features), n_bins)
        keys = []
        ref_props = []
        for j, f in enumerate(profile.features):
            edges = np.asarray(f.edges, dtype=np.float64)
            if np.any(np.isnan(edges)):
                raise ValueError(f"feature {f.name!r}: an edge of its reference bins is NaN")
            keys.append(_f32_keys(_round_up_f32(edges)) | (np.int64(j) << 32))
            props = _vector(f"feature {f.name!r}: proportions", f.proportions)
            if props.sum() <= 0:
                raise ValueError(f"feature {f.name!r}: reference proportions are all zero")
            ref_props.append(props / props.sum())
        self._keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
        self._prefix = np.arange(self.n_features, dtype=np.int64) << 32
        self._feature_index = np.arange(self.n_features, dtype=np.int64)
        ref = np.concatenate(ref_props)
        self._ref_smooth = (ref + eps) / (1.0 + n_bins[self._seg] * eps)
        # the reference CDF within each feature, at each bin's upper edge
        self._ref_cdf = np.concatenate([np.cumsum(p) for p in ref_props])
        # sensor stats (after the profile's model inputs) are scored with the one-sided KS
        self.n_inputs = profile.model_inputs
        self._one_sided = self._seg >= self.n_inputs
        self.counts = np.zeros(int(n_bins.sum()), dtype=np.int64)
        self.class_counts = [0] * self.n_classes
        self.conf_sum = 0.0
        self.n = 0
        self.skipped = 0
        self.window = 0
        self._buf = np.empty((chunk, self.n_features), dtype=np.float32)
        self._pending = 0

    # ------------------------------------------------------------------ streaming

    def bin_index(self, features: np.ndarray) -> np.ndarray:
        """Flat count indexes of one feature vector (F,) — or of a batch (n, F)."""
        keys = _f32_keys(features) | self._prefix
        return np.searchsorted(self._keys, keys, side="right") + self._feature_index

    def add(
        self,
        features: np.ndarray,
        probs: np.ndarray,
        *,
        label: int | None = None,
        confidence: float | None = None,
    ) -> None:
        """Count one inference: its model input ``features`` (F,) and output ``probs`` (C,).

        ``label``/``confidence`` (argmax and its probability) may be passed when the
        caller has them already.  ``ValueError`` if ``features`` does not have F values.
        The feature row is copied into a buffer of ``chunk`` rows that is binned at once
        when full (or when the window is scored): the per-inference cost is a row copy
        plus 1/chunk of one batched search.
        """
        if label is None:
            label = int(np.argmax(probs))
        if confidence is None:
            confidence = float(probs[label])
        if not (0.0 <= confidence <= 1.0) or not (0 <= label < self.n_classes):  # NaN fails
            self.skipped += 1
            return
        if features.size != self.n_features:
            raise ValueError(
                f"{features.size} features; the reference profile has {self.n_features}"
            )
        self._buf[self._pending] = features.reshape(self.n_features)
        self._pending += 1
        if self._pending == len(self._buf):
            self._flush()
        self.class_counts[label] += 1
        self.conf_sum += confidence
        self.n += 1

    def _flush(self) -> None:
        if self._pending:
            idx = self.bin_index(self._buf[: self._pending]).ravel()
            self.counts += np.bincount(idx, minlength=self.counts.size)
            self._pending = 0

    def add_batch(self, features: np.ndarray, probs: np.ndarray) -> None:
        """Count a batch: ``features`` (n, F), ``probs`` (n, C)."""
        x = np.asarray(features).reshape(len(features), -1)
        p = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
        if len(x) != len(p):
            raise ValueError(f"{len(x)} feature rows for {len(p)} probability rows")
        if x.shape[1] != self.n_features:
            raise ValueError(f"{x.shape[1]} features; the reference profile has {self.n_features}")
        if p.shape[1] != self.n_classes:
            raise ValueError(f"{p.shape[1]} classes; the reference profile has {self.n_classes}")
        if len(x) == 0:
            return
        labels = p.argmax(axis=1)
        conf = p[np.arange(len(p)), labels]
        ok = (conf >= 0.0) & (conf <= 1.0)
        self.skipped += int((~ok).sum())
        x, labels, conf = x[ok], labels[ok], conf[ok]
        idx = self.bin_index(x).ravel()
        self.counts += np.bincount(idx, minlength=self.counts.size)
        for c, k in enumerate(np.bincount(labels, minlength=self.n_classes).tolist()):
            self.class_counts[c] += k
        self.conf_sum += float(conf.sum())
        self.n += int(ok.sum())

    # ------------------------------------------------------------------ scores

    def scores(self) -> dict[str, Any] | None:
        """The current window's scores (``None`` when it is empty), without resetting."""
        n = self.n
        if n == 0:
            return None
        self._flush()
        share = self.counts / n
        a = (share + self.eps) / (1.0 + self.n_bins[self._seg] * self.eps)
        e = self._ref_smooth
        psi_v = np.maximum(np.add.reduceat((a - e) * np.log(a / e), self._starts), 0.0)
        cum = np.cumsum(self.counts)
        before = np.repeat(np.concatenate([[0], cum[self._starts[1:] - 1]]), self.n_bins)
        win_cdf = (cum - before) / n
        diff = np.where(self._one_sided, self._ref_cdf - win_cdf, np.abs(win_cdf - self._ref_cdf))
        ks_v = np.clip(np.maximum.reduceat(diff, self._starts), 0.0, 1.0)
        mean_conf = min(1.0, max(0.0, self.conf_sum / n))
        return {
            "n": n,
            "psi": [float(v) for v in psi_v],
            "ks": [float(v) for v in ks_v],
            "js_prediction": _js(np.asarray(self.class_counts, dtype=np.float64) / n, self._priors),
            "mean_confidence": mean_conf,
            "confidence_shift": min(1.0, max(-1.0, mean_conf - self.ref_mean_confidence)),
        }

    def report(self) -> dict[str, Any] | None:
        """Scores of the window with its sequence number ``window``; then the next window.

        ``None`` (and nothing reset) when no inference was counted.
        """
        out = self.scores()
        if out is None:
            return None
        out["window"] = self.window
        self.window += 1
        self.reset()
        return out

    def reset(self) -> None:
        self.counts[:] = 0
        self.class_counts = [0] * self.n_classes
        self.conf_sum = 0.0
        self.n = 0
        self._pending = 0


def window_scores(
    profile: ReferenceProfile,
    features: np.ndarray,
    probs: np.ndarray,
    eps: float = DEFAULT_EPS,
) -> dict[str, Any] | None:
    """Scores of a batch of inferences at once (the accumulator's result, computed by batch)."""
    n_classes = np.asarray(probs).reshape(len(probs), -1).shape[1]
    acc = DriftAccumulator(profile, n_classes=n_classes, eps=eps)
    acc.add_batch(features, probs)
    return acc.scores()
