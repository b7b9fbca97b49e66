"""Drift statistics (agent/drift_stats.py) against scipy and hand formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from tinyfleet.agent import drift
from tinyfleet.agent.drift_stats import (
    DEFAULT_EPS,
    DriftAccumulator,
    js_distance,
    ks_binned,
    psi,
    window_scores,
)


def _profile(x: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> drift.ReferenceProfile:
    return drift.build_profile(x, probs, n_bins=n_bins)


def _probs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    logits = rng.normal(size=(n, k)) * 2.0
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------- psi


def test_psi_hand_formula_on_a_tiny_case() -> None:
    ref = [0.5, 0.5]
    counts = [3, 1]  # shares 0.75, 0.25
    eps = 1e-4
    a = (np.array([0.75, 0.25]) + eps) / (1 + 2 * eps)
    e = (np.array([0.5, 0.5]) + eps) / (1 + 2 * eps)
    expected = float(np.sum((a - e) * np.log(a / e)))
    assert psi(ref, counts, eps) == pytest.approx(expected, rel=1e-12)
    # without smoothing the classic value: 0.25 ln 1.5 - 0.25 ln 0.5 = 0.25 ln 3
    assert psi(ref, counts, 1e-12) == pytest.approx(0.25 * math.log(3), rel=1e-9)


def test_psi_zero_on_identical_distributions_and_finite_on_empty_bins() -> None:
    ref = [0.1] * 10
    assert psi(ref, [7] * 10) == pytest.approx(0.0, abs=1e-15)
    assert psi(ref, [0] * 10) == 0.0  # empty window
    one_bin = psi(ref, [100] + [0] * 9)
    assert math.isfinite(one_bin) and one_bin > 5.0
    # an empty bin holding 10 % of the reference costs about 0.1 * ln(0.1 / eps)
    assert psi(ref, [0] + [10] * 9) == pytest.approx(0.1 * math.log(0.1 / DEFAULT_EPS), rel=0.05)


def test_psi_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="counts for"):
        psi([0.5, 0.5], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        psi([0.5, float("nan")], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        psi([0.5, 0.5], [-1, 2])
    with pytest.raises(ValueError, match="eps"):
        psi([0.5, 0.5], [1, 2], eps=0.0)
    with pytest.raises(ValueError, match="all zero"):
        psi([0.0, 0.0], [1, 2])


# ---------------------------------------------------------------------- js


def test_js_distance_equals_scipy() -> None:
    rng = np.random.default_rng(3)
    cases = [
        ([1, 0, 0], [0, 1, 0]),  # disjoint: 1
        ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),  # identical: 0
        ([5, 0, 3, 2], [0.25, 0.25, 0.25, 0.25]),  # unnormalised, a zero
    ] + [(rng.random(6), rng.random(6)) for _ in range(20)]
    for p, q in cases:
        assert js_distance(p, q) == pytest.approx(float(jensenshannon(p, q, base=2)), abs=1e-12), (
            p,
            q,
        )
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="all zero"):
        js_distance([0, 0], [1, 1])
    with pytest.raises(ValueError, match="entries"):
        js_distance([1, 0], [1, 0, 0])


# ---------------------------------------------------------------------- ks


def test_ks_binned_equals_ks_2samp_with_an_edge_between_all_pooled_values() -> None:
    rng = np.random.default_rng(0)
    for shift in (0.0, 0.3, 2.0):
        ref = rng.normal(size=400)
        win = rng.normal(loc=shift, size=250)
        pooled = np.unique(np.concatenate([ref, win]))
        edges = (pooled[1:] + pooled[:-1]) / 2.0
        ref_props = drift.bin_counts(ref, edges) / ref.size
        counts = drift.bin_counts(win, edges)
        exact = stats.ks_2samp(ref, win).statistic
        assert ks_binned(edges, ref_props, counts) == pytest.approx(exact, abs=1e-12)


def test_ks_binned_lower_bound_of_kstest_and_large_on_a_shift() -> None:
    rng = np.random.default_rng(1)
    edges = stats.norm.ppf(np.linspace(0, 1, 101)[1:-1])  # 100 quantile bins of N(0, 1)
    ref_props = np.diff(np.concatenate([[0.0], stats.norm.cdf(edges), [1.0]]))
    same = rng.normal(size=2000)
    shifted = rng.normal(loc=1.0, size=2000)
    for sample in (same, shifted):
        exact = stats.kstest(sample, "norm").statistic
        binned = ks_binned(edges, ref_props, drift.bin_counts(sample, edges))
        assert binned <= exact + 1e-12
        assert binned == pytest.approx(exact, abs=0.02)  # 100 bins: close to the exact one
    assert ks_binned(edges, ref_props, drift.bin_counts(shifted, edges)) > 0.3
    assert ks_binned(edges, ref_props, drift.bin_counts(same, edges)) < 0.05
    # all of a window in one bin
    counts = np.zeros(100)
    counts[-1] = 50
    assert ks_binned(edges, ref_props, counts) == pytest.approx(0.99)
    assert ks_binned([], [1.0], [5]) == 0.0
    with pytest.raises(ValueError, match="edges need"):
        ks_binned([0.0], [0.5, 0.5], [1, 2, 3])


# ---------------------------------------------------------------------- accumulator


def test_accumulator_equals_batch_computation() -> None:
    rng = np.random.default_rng(5)
    ref_x = rng.normal(size=(3000, 6)).astype(np.float32)
    ref_x[:, 4] = np.round(ref_x[:, 4])  # ties: collapsed edges, fewer bins
    ref_x[:, 5] = 1.5  # constant: one edge
    profile = _profile(ref_x, _probs(rng, 3000, 4))
    assert len(profile.features[4].edges) < 9 and len(profile.features[5].edges) == 1

    x = (rng.normal(size=(300, 6)) * [1, 2, 1, 1, 1, 1] + [0, 0, 1, 0, 0, 0]).astype(np.float32)
    x[:, 4] = np.round(x[:, 4])
    assert 0.0 in profile.features[4].edges
    x[:7, 0] = profile.features[0].edges[3]  # exactly on an edge
    x[7:9, 4] = -0.0  # on the edge 0.0 (bit patterns differ, values are equal)
    x[:, 5] = 1.5
    p = _probs(rng, 300, 4)
    acc = DriftAccumulator(profile)
    for xi, pi in zip(x, p, strict=True):
        acc.add(xi, pi)
    got = acc.report()
    assert got is not None and got["n"] == 300 and got["window"] == 0

    for j, f in enumerate(profile.features):
        counts = drift.bin_counts(x[:, j], f.edges)
        assert got["psi"][j] == pytest.approx(psi(f.proportions, counts), rel=1e-9, abs=1e-12)
        assert got["ks"][j] == pytest.approx(ks_binned(f.edges, f.proportions, counts), abs=1e-12)
    hist = np.bincount(p.argmax(axis=1), minlength=4)
    assert got["js_prediction"] == pytest.approx(
        float(jensenshannon(hist, profile.class_priors, base=2)), abs=1e-12
    )
    conf = float(p.max(axis=1).mean())
    assert got["mean_confidence"] == pytest.approx(conf, rel=1e-6)
    assert got["confidence_shift"] == pytest.approx(conf - profile.mean_confidence, abs=1e-6)
    assert got["psi"][1] > 0.25 and got["psi"][2] > 0.25  # scaled and shifted features
    assert got["psi"][3] < 0.1 and got["psi"][4] < 0.1
    assert got["psi"][5] == pytest.approx(0.0, abs=1e-12) and got["ks"][5] < 1e-12

    batch = window_scores(profile, x, p)
    assert batch is not None
    for key in ("psi", "ks"):
        assert np.allclose(batch[key], got[key], rtol=1e-12, atol=1e-15)
    assert batch["js_prediction"] == pytest.approx(got["js_prediction"])

    # the window was reset: next report is window 1 on new data, and empty gives None
    assert acc.report() is None
    acc.add(x[0], p[0])
    nxt = acc.report()
    assert nxt is not None and nxt["window"] == 1 and nxt["n"] == 1


def test_accumulator_never_nan() -> None:
    rng = np.random.default_rng(7)
    profile = _profile(rng.normal(size=(500, 3)).astype(np.float32), _probs(rng, 500, 3))
    acc = DriftAccumulator(profile)
    # a window entirely in one bin of every feature, and non-finite inputs
    for _ in range(20):
        acc.add(np.full(3, 100.0, dtype=np.float32), np.array([1.0, 0.0, 0.0], np.float32))
    acc.add(np.array([np.nan, np.inf, -np.inf], np.float32), np.array([0.2, 0.3, 0.5], np.float32))
    acc.add(np.zeros(3, np.float32), np.array([np.nan, 0.1, 0.1], np.float32))  # skipped
    assert acc.skipped == 1
    got = acc.report()
    assert got is not None and got["n"] == 21
    values = [*got["psi"], *got["ks"], got["js_prediction"], got["mean_confidence"]]
    assert all(math.isfinite(v) for v in values)
    assert min(got["ks"]) > 0.8 and min(got["psi"]) > 2.0
    assert 0.0 <= got["js_prediction"] <= 1.0


def test_accumulator_rejects_a_profile_that_does_not_fit() -> None:
    rng = np.random.default_rng(8)
    profile = _profile(rng.normal(size=(100, 3)).astype(np.float32), _probs(rng, 100, 3))
    with pytest.raises(ValueError, match="3 class priors"):
        DriftAccumulator(profile, n_classes=5)
    acc = DriftAccumulator(profile)
    with pytest.raises(ValueError, match="4 features"):
        acc.add(np.zeros(4, np.float32), np.array([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="features"):
        acc.add_batch(np.zeros((2, 4), np.float32), np.zeros((2, 3)))


# ---------------------------------------------------------------------- vibration recipe


def test_vibration_drift_gives_larger_psi_than_clean_windows() -> None:
    from tinyfleet.agent.features import vibration_features_batch
    from tinyfleet.sim.sensors import DeviceParams, Drift, VibrationSensor

    params = DeviceParams.for_device("dev-0", 11)

    def features(drift_: Drift | None, n: int, seed: int) -> np.ndarray:
        sensor = VibrationSensor(params, rng=np.random.default_rng(seed), drift=drift_)
        windows, _ = sensor.sample(n)
        return vibration_features_batch(windows)

    ref = features(None, 600, 1)
    probs = np.full((len(ref), 4), 0.25, dtype=np.float32)
    probs[:, 0] = 0.4
    probs[:, 1:] = 0.2
    profile = drift.build_profile(ref, probs)
    p = probs[:200]

    def mean_psi(x: np.ndarray) -> float:
        got = window_scores(profile, x, p)
        assert got is not None
        return float(np.mean(got["psi"]))

    clean = mean_psi(features(None, 200, 2))
    drifted = {
        "gain": mean_psi(features(Drift(gain_factor=1.6), 200, 3)),
        "bias": mean_psi(features(Drift(bias_offset=0.5), 200, 4)),
        "noise": mean_psi(features(Drift(noise_factor=4.0), 200, 5)),
        "speed": mean_psi(features(Drift(speed_factor=1.3), 200, 6)),
    }
    print(
        f"\nmean PSI over features: clean {clean:.3f}, "
        + ", ".join(f"{k} {v:.3f}" for k, v in drifted.items())
    )
    assert clean < 0.1
    for kind in ("gain", "noise", "speed"):
        assert drifted[kind] > 2.5 * clean and drifted[kind] > 0.15, kind
    # vibration-v1 features are insensitive to a DC offset (rms, crest, spectra of the
    # AC part): a pure bias drift does not show in feature PSI, by design of the features
    assert drifted["bias"] < 0.1


def test_vibration_bias_shows_in_the_sensor_stats_not_the_features() -> None:
    from tinyfleet.agent.features import (
        FEATURE_NAMES,
        VIBRATION_MONITOR_NAMES,
        vibration_features_and_stats,
    )
    from tinyfleet.sim.sensors import DeviceParams, Drift, VibrationSensor

    params = DeviceParams.for_device("dev-0", 11)

    def rows(drift_: Drift | None, n: int, seed: int) -> np.ndarray:
        sensor = VibrationSensor(params, rng=np.random.default_rng(seed), drift=drift_)
        x, stats = vibration_features_and_stats(sensor.sample(n)[0])
        return np.concatenate([x, stats], axis=1)

    ref = rows(None, 600, 1)
    n_in = len(FEATURE_NAMES)
    probs = np.tile([0.4, 0.2, 0.2, 0.2], (len(ref), 1))
    profile = drift.build_profile(
        ref[:, :n_in],
        probs,
        FEATURE_NAMES,
        monitor="vibration-v1",
        monitor_stats=ref[:, n_in:],
        monitor_names=VIBRATION_MONITOR_NAMES,
    )

    def psi(x: np.ndarray) -> np.ndarray:
        got = window_scores(profile, x, probs[:200])
        assert got is not None
        return np.asarray(got["psi"])

    clean, bias = psi(rows(None, 200, 2)), psi(rows(Drift(bias_offset=0.5), 200, 4))
    # the model's features: no change; every axis' mean: far outside the reference
    assert np.mean(bias[:n_in]) < 0.1 and np.mean(clean[:n_in]) < 0.1
    assert max(clean[n_in:]) < 0.5 and min(bias[n_in : n_in + 3]) > 5.0
    assert bias[-1] < 0.5  # the running speed did not change
