"""Reference profiles merged from per-device sketches match the pooled data's profile."""

from __future__ import annotations

import numpy as np
import pytest

from tinyfleet.agent import drift
from tinyfleet.agent.profile_sketch import (
    Sketch,
    merge_sketches,
    profile_from_sketch,
    sketch,
    sketch_grid,
)


def _probs(rng: np.random.Generator, n: int, classes: int = 4) -> np.ndarray:
    logits = rng.normal(size=(n, classes)) * 3
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_merged_sketches_give_the_pooled_profile() -> None:
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    clean = rng.normal(size=(2000, 3))
    parent = drift.build_profile(clean, _probs(rng, 2000), names)
    grid = sketch_grid(parent)

    # three devices whose data drifted: shifted, scaled, one skewed feature
    parts = []
    for k in range(3):
        x = rng.normal(loc=1.5 + 0.2 * k, scale=1.4, size=(700 + 100 * k, 3))
        x[:, 2] = rng.exponential(size=len(x))
        parts.append((x, rng.integers(0, 4, size=len(x)), _probs(rng, len(x))))
    merged = merge_sketches([sketch(grid, *p) for p in parts])
    profile = profile_from_sketch(grid, merged, names)

    pooled_x = np.concatenate([p[0] for p in parts])
    pooled_y = np.concatenate([p[1] for p in parts])
    pooled_p = np.concatenate([p[2] for p in parts])
    exact = drift.build_profile(pooled_x, pooled_p, names)

    assert profile.n_samples == len(pooled_x)
    for j, (got, want) in enumerate(zip(profile.features, exact.features, strict=True)):
        width = grid[j, 1] - grid[j, 0]
        assert len(got.edges) == len(want.edges)
        np.testing.assert_allclose(got.edges, want.edges, atol=2 * width)
        np.testing.assert_allclose(got.proportions, want.proportions, atol=0.01)
        # the new reference describes the drifted data, not the parent's
        assert abs(got.edges[4] - parent.features[j].edges[4]) > 0.5
    np.testing.assert_allclose(
        profile.class_priors, np.bincount(pooled_y, minlength=4) / len(pooled_y)
    )
    np.testing.assert_allclose(profile.confidence_proportions, exact.confidence_proportions)
    assert profile.mean_confidence == pytest.approx(exact.mean_confidence)


def test_values_beyond_the_grid_land_in_the_outer_bins() -> None:
    parent = drift.build_profile(np.arange(100.0)[:, None], np.full((100, 2), 0.5), ["x"])
    grid = sketch_grid(parent)
    s = sketch(grid, np.array([[-1e9], [1e9], [50.0]]), np.array([0, 1, 1]), np.full((3, 2), 0.5))
    assert s.features[0, 0] == 1 and s.features[0, -1] == 1 and s.features.sum() == 3
    profile = profile_from_sketch(grid, s, ["x"], n_bins=2)
    # the median lies inside the fine bin holding 50; each half holds half the mass
    width = grid[0, 1] - grid[0, 0]
    assert abs(profile.features[0].edges[0] - 50.0) <= width
    assert profile.features[0].proportions == pytest.approx([0.5, 0.5], abs=0.01)


def test_a_received_sketch_is_checked() -> None:
    rng = np.random.default_rng(1)
    parent = drift.build_profile(rng.normal(size=(200, 2)), _probs(rng, 200), ["a", "b"])
    grid = sketch_grid(parent)
    good = sketch(grid, rng.normal(size=(50, 2)), rng.integers(0, 4, 50), _probs(rng, 50))
    assert Sketch.from_arrays(good.arrays()).n == 50
    bad = good.arrays()
    bad["features"] = bad["features"].copy()
    bad["features"][0, 3] += 1  # counts no longer add up
    with pytest.raises(ValueError, match="add up"):
        Sketch.from_arrays(bad)
    neg = good.arrays() | {"labels": np.array([-1, 0, 0, 0])}
    with pytest.raises(ValueError, match="non-negative"):
        Sketch.from_arrays(neg)
    nan = good.arrays() | {"totals": np.array([np.nan, 50.0])}
    with pytest.raises(ValueError, match="finite"):
        Sketch.from_arrays(nan)
    with pytest.raises(ValueError, match="features"):
        sketch(grid, np.zeros((3, 5)), np.zeros(3, dtype=int), np.full((3, 4), 0.25))
    with pytest.raises(ValueError, match="finite"):
        sketch(grid, np.full((1, 2), np.nan), np.zeros(1, dtype=int), np.full((1, 4), 0.25))
