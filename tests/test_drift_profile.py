"""Reference profiles and the reference bundle shipped with each version."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from tinyfleet.agent import drift


def test_quantile_bins_split_data_evenly() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=10_000)
    edges, props = drift.quantile_bins(v, 10)
    assert len(edges) == 9
    assert np.allclose(props, 0.1, atol=0.002)
    assert sum(props) == pytest.approx(1.0)


def test_constant_feature_collapses_to_one_edge() -> None:
    edges, props = drift.quantile_bins(np.zeros(100), 10)
    assert edges == [0.0]
    assert props == [0.0, 1.0]


def test_bin_counts_boundaries() -> None:
    counts = drift.bin_counts(np.array([-1.0, 0.0, 0.5, 1.0, 2.0]), [0.0, 1.0])
    assert counts.tolist() == [1.0, 2.0, 2.0]


def test_build_profile_priors_and_confidence() -> None:
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    probs = np.zeros((20, 3), dtype=np.float32)
    probs[:10, 0] = 0.95
    probs[:10, 1] = 0.05
    probs[10:, 2] = 0.55
    probs[10:, 1] = 0.45
    p = drift.build_profile(x, probs, ["a", "b"])
    assert p.class_priors == [0.5, 0.0, 0.5]
    assert p.mean_confidence == pytest.approx(0.75)
    assert [f.name for f in p.features] == ["a", "b"]
    # confidences 0.95 fall in the last bin, 0.55 in [0.5, 0.6)
    assert p.confidence_proportions[-1] == pytest.approx(0.5)
    assert p.confidence_proportions[5] == pytest.approx(0.5)


def test_build_profile_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        drift.build_profile(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError):
        drift.build_profile(np.zeros((3, 2)), np.zeros((3, 2)), ["only-one"])


def test_bundle_round_trip_and_strictness() -> None:
    x = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    probs = np.full((50, 2), 0.5, dtype=np.float32)
    y = np.array([0, 1] * 25)
    hx, hy = drift.pick_health_inputs(x, y, per_class=3, seed=7)
    assert sorted(hy.tolist()) == [0, 0, 0, 1, 1, 1]
    hx2, _ = drift.pick_health_inputs(x, y, per_class=3, seed=7)
    assert np.array_equal(hx, hx2)
    bundle = drift.ReferenceBundle(
        profile=drift.build_profile(x, probs),
        health=drift.health_reference(hx, hy, {"ab" * 32: probs[: len(hx)]}),
    )
    data = bundle.to_bytes()
    assert drift.ReferenceBundle.from_bytes(data) == bundle
    assert bundle.to_bytes() == data  # canonical
    with pytest.raises(ValidationError):
        drift.ReferenceBundle.from_bytes(data.replace(b'"profile"', b'"profile","extra":1,"x"', 1))


def test_feature_bins_validation() -> None:
    with pytest.raises(ValidationError):
        drift.FeatureBins(name="a", edges=[1.0, 0.0], proportions=[0.3, 0.3, 0.4])
    with pytest.raises(ValidationError):
        drift.FeatureBins(name="a", edges=[0.0], proportions=[0.3, 0.3])
