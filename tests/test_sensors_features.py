"""Vibration sensor model and the feature pipeline shared by host and device."""

from __future__ import annotations

import numpy as np
import pytest

from tinyfleet.agent import features as agent_features
from tinyfleet.agent.errors import ConfigError
from tinyfleet.agent.features import (
    FEATURE_CENTER,
    FEATURE_NAMES,
    FEATURE_PIPELINES,
    FEATURE_SCALE,
    estimate_rotation_hz,
    get_pipeline,
    vibration_features,
    vibration_features_batch,
)
from tinyfleet.sim.sensors import (
    CLASS_NAMES,
    SAMPLE_RATE_HZ,
    WINDOW_LEN,
    DeviceParams,
    Drift,
    VibrationSensor,
    make_fleet_dataset,
)

COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


def _raw_features(windows: np.ndarray) -> np.ndarray:
    """Features in their physical units (log10 ratios, ...), undoing the fixed scaling."""
    return vibration_features_batch(windows) * FEATURE_SCALE + FEATURE_CENTER


def _sensor(device: str = "dev-007", seed: int = 1, rng_seed: int = 5) -> VibrationSensor:
    return VibrationSensor(DeviceParams.for_device(device, seed), np.random.default_rng(rng_seed))


def _windows(sensor: VibrationSensor, label: str, n: int) -> np.ndarray:
    return np.stack([sensor.window(label) for _ in range(n)])


@pytest.fixture(scope="module")
def fleets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Features and labels of a small training fleet and of disjoint unseen devices."""
    out = {}
    for name, ids in (
        ("train", [f"train-{i}" for i in range(6)]),
        ("unseen", [f"unseen-{i}" for i in range(4)]),
    ):
        windows, labels, _ = make_fleet_dataset(ids, 15, seed=3)
        out[name] = (_raw_features(windows), labels)
    return out


# --- sensor -----------------------------------------------------------------------------


def test_device_params_are_deterministic_and_differ_between_devices() -> None:
    a = DeviceParams.for_device("dev-001", 42)
    assert a == DeviceParams.for_device("dev-001", 42)
    b = DeviceParams.for_device("dev-002", 42)
    c = DeviceParams.for_device("dev-001", 43)
    assert a.rotation_hz != b.rotation_hz and a.gain != b.gain and a.noise != b.noise
    assert a != c
    fleet = [DeviceParams.for_device(f"dev-{i:03d}", 42) for i in range(40)]
    speeds = np.array([p.rotation_hz for p in fleet])
    assert speeds.min() >= 22.0 and speeds.max() <= 30.0 and speeds.std() > 1.5


def test_sensor_is_deterministic_given_a_seed() -> None:
    w1, y1 = _sensor(rng_seed=9).sample(12)
    w2, y2 = _sensor(rng_seed=9).sample(12)
    assert w1.dtype == np.float32 and w1.shape == (12, WINDOW_LEN, 3)
    assert y1.dtype == np.int64
    assert np.array_equal(w1, w2) and np.array_equal(y1, y2)
    w3, _ = _sensor(rng_seed=10).sample(12)
    assert not np.array_equal(w1, w3)


def test_sample_follows_class_probs_and_counts_windows() -> None:
    sensor = _sensor()
    _, labels = sensor.sample(40, class_probs=[0, 0, 1, 0])
    assert set(labels.tolist()) == {CLASS_NAMES.index("misalignment")}
    assert sensor.t == 40
    with pytest.raises(ConfigError):
        sensor.sample(3, class_probs=[1, 0])
    with pytest.raises(ConfigError):
        sensor.window("rust")


def test_fleet_dataset_is_balanced_and_deterministic() -> None:
    ids = ["a", "b", "c"]
    w1, y1, d1 = make_fleet_dataset(ids, 4, seed=11)
    w2, y2, d2 = make_fleet_dataset(ids, 4, seed=11)
    assert w1.shape == (3 * 4 * 4, WINDOW_LEN, 3)
    assert np.array_equal(w1, w2) and np.array_equal(y1, y2) and np.array_equal(d1, d2)
    assert np.bincount(y1).tolist() == [12, 12, 12, 12]
    assert np.bincount(d1).tolist() == [16, 16, 16]
    w3, _, _ = make_fleet_dataset(ids, 4, seed=12)
    assert not np.array_equal(w1, w3)


# --- features ---------------------------------------------------------------------------


def test_single_and_batch_features_are_identical() -> None:
    windows, _, _ = make_fleet_dataset(["x", "y"], 5, seed=2)
    batch = vibration_features_batch(windows)
    assert batch.dtype == np.float32 and batch.shape == (windows.shape[0], len(FEATURE_NAMES))
    assert 16 <= len(FEATURE_NAMES) <= 32
    singles = np.stack([vibration_features(w) for w in windows])
    assert np.array_equal(batch, singles)
    order = np.random.default_rng(0).permutation(windows.shape[0])
    assert np.array_equal(vibration_features_batch(windows[order]), batch[order])
    assert np.array_equal(FEATURE_PIPELINES["vibration-v1"](windows), batch)
    assert np.array_equal(vibration_features_batch(windows.astype(np.float64)), batch)


def test_host_and_agent_compute_the_same_features() -> None:
    """The recipe's data path and the device's pipeline give bit-identical features."""
    from tinyfleet.host.recipes import load_dataset, load_recipe
    from tinyfleet.recipes import vibration

    recipe = load_recipe(
        "vibration",
        small=True,
        overrides={
            "data.train_devices": 2,
            "data.val_devices": 1,
            "data.test_devices": 2,
            "data.windows_per_class": 3,
        },
    )
    dataset = load_dataset(recipe)
    _, _, test_ids = vibration.device_split(recipe.data)
    raw, labels, devices = vibration.raw_split(test_ids, recipe.data, recipe.train.seed)
    assert np.array_equal(labels, dataset.y_test)
    assert np.array_equal(devices, dataset.groups["test_device"])
    assert set(devices.tolist()).isdisjoint(dataset.groups["train_device"].tolist())
    device_side = agent_features.get_pipeline(recipe.preprocess)(raw)
    assert np.array_equal(dataset.x_test, device_side)
    assert np.array_equal(recipe.preprocess_fn(raw), device_side)
    assert np.array_equal(dataset.x_test[3], agent_features.vibration_features(raw[3]))


def test_features_are_finite_on_degenerate_windows() -> None:
    flat = np.zeros((2, WINDOW_LEN, 3), dtype=np.float32)
    flat[1] += 1.0  # constant (gravity only)
    assert np.all(np.isfinite(vibration_features_batch(flat)))


def test_bad_inputs_and_unknown_pipeline_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="shape"):
        vibration_features_batch(np.zeros((2, WINDOW_LEN, 2)))
    with pytest.raises(ConfigError, match="at least"):
        vibration_features_batch(np.zeros((2, 16, 3)))
    with pytest.raises(ConfigError, match="vibration-v1"):
        get_pipeline("vibration-v0")
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    identity = get_pipeline("identity")(x)
    assert identity.dtype == np.float32 and np.array_equal(identity, x)


def test_rotation_speed_is_estimated_within_three_percent() -> None:
    for device in ("dev-001", "dev-002", "dev-003"):
        sensor = VibrationSensor(DeviceParams.for_device(device, 42), np.random.default_rng(0))
        for label in CLASS_NAMES:
            est = estimate_rotation_hz(_windows(sensor, label, 8))
            rel = np.abs(np.median(est) / sensor.params.rotation_hz - 1.0)
            assert rel < 0.03, (device, label, est)


def test_each_class_has_its_signature(
    fleets: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    x, y = fleets["unseen"]
    mean = {name: x[y == i].mean(axis=0) for i, name in enumerate(CLASS_NAMES)}

    def f(cls: str, feature: str) -> float:
        return float(mean[cls][COL[feature]])

    # Imbalance: energy concentrated at 1x, radially.
    assert f("imbalance", "log_frac_radial_1x") > f("normal", "log_frac_radial_1x") + 0.2
    # Misalignment: 2x dominates 1x radially, strong axial 1x.
    assert f("misalignment", "log_ratio_radial_2x_1x") > max(
        f(c, "log_ratio_radial_2x_1x") for c in ("normal", "imbalance", "bearing_fault")
    )
    assert f("misalignment", "log_ratio_axial_radial_1x") > max(
        f(c, "log_ratio_axial_radial_1x") for c in ("normal", "imbalance", "bearing_fault")
    )
    # Bearing fault: impulsive, high-frequency, envelope peak at the defect rate.
    for feature in ("log_kurtosis_x", "log_frac_high_freq", "log_envelope_peak"):
        others = max(f(c, feature) for c in ("normal", "imbalance", "misalignment"))
        assert f("bearing_fault", feature) > others, feature


def test_nearest_centroid_on_unseen_devices(
    fleets: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    """Features generalise across devices: class centroids from some devices classify others."""
    x, y = fleets["train"]
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-9
    centroids = np.stack([((x[y == k] - mu) / sd).mean(axis=0) for k in range(len(CLASS_NAMES))])
    xu, yu = fleets["unseen"]
    dist = ((((xu - mu) / sd)[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    accuracy = float(np.mean(dist.argmin(axis=1) == yu))
    assert accuracy >= 0.85


# --- drift ------------------------------------------------------------------------------


def test_drift_progress_sudden_and_gradual() -> None:
    sudden = Drift(gain_factor=2.0, onset=10)
    assert sudden.progress(9) == 0.0 and sudden.progress(10) == 1.0
    gradual = Drift(gain_factor=2.0, onset=10, ramp=4)
    assert [gradual.progress(t) for t in (9, 10, 11, 12, 13, 50)] == [0.0, 0.25, 0.5, 0.75, 1, 1]
    for bad in (
        {"gain_factor": 0.0},
        {"noise_factor": -1.0},
        {"onset": -1},
        {"fault": "normal"},
        {"fault": "rust"},
    ):
        with pytest.raises(ConfigError):
            Drift(**bad)  # type: ignore[arg-type]


def test_gain_drift_raises_rms() -> None:
    base = _sensor(rng_seed=3)
    drifted = _sensor(rng_seed=3)
    drifted.drift = Drift(gain_factor=2.0)
    fb = _raw_features(_windows(base, "imbalance", 20))
    fd = _raw_features(_windows(drifted, "imbalance", 20))
    rise = fd[:, COL["log_rms_x"]] - fb[:, COL["log_rms_x"]]
    assert np.all(rise > 0.2) and abs(float(rise.mean()) - np.log10(2.0)) < 0.05
    # Shape features do not depend on the gain.
    shape_cols = [COL["log_ratio_radial_2x_1x"], COL["log_kurtosis_x"]]
    assert np.allclose(fd[:, shape_cols], fb[:, shape_cols], atol=0.15)


def test_bias_drift_leaves_features_unchanged() -> None:
    base = _sensor(rng_seed=4)
    drifted = _sensor(rng_seed=4)
    drifted.drift = Drift(bias_offset=(0.5, -0.3, 0.2))
    wb, wd = _windows(base, "normal", 10), _windows(drifted, "normal", 10)
    assert np.allclose(wd.mean(axis=1) - wb.mean(axis=1), [0.5, -0.3, 0.2], atol=1e-4)
    assert np.allclose(_raw_features(wd), _raw_features(wb), atol=2e-3)


def test_noise_and_speed_drift_move_their_features() -> None:
    base = _sensor(rng_seed=6)
    noisy = _sensor(rng_seed=6)
    noisy.drift = Drift(noise_factor=4.0)
    fb = _raw_features(_windows(base, "normal", 20))
    fn = _raw_features(_windows(noisy, "normal", 20))
    assert fn[:, COL["log_frac_high_freq"]].mean() > fb[:, COL["log_frac_high_freq"]].mean() + 0.3

    fast = _sensor(rng_seed=6)
    fast.drift = Drift(speed_factor=1.15)
    ratio = np.median(estimate_rotation_hz(_windows(fast, "normal", 20))) / np.median(
        estimate_rotation_hz(_windows(_sensor(rng_seed=6), "normal", 20))
    )
    assert abs(ratio - 1.15) < 0.03


def test_gradual_gain_drift_rises_along_the_ramp() -> None:
    sensor = _sensor(rng_seed=8)
    sensor.drift = Drift(gain_factor=3.0, onset=20, ramp=40)
    rms = _raw_features(_windows(sensor, "imbalance", 80))[:, COL["log_rms_x"]]
    before, middle, after = rms[:20].mean(), rms[35:45].mean(), rms[60:].mean()
    assert before + 0.1 < middle < after - 0.1
    assert abs(after - before - np.log10(3.0)) < 0.1
    assert sensor.t == 80


def test_fault_drift_develops_a_new_fault() -> None:
    sensor = _sensor(rng_seed=12)
    sensor.drift = Drift(fault="bearing_fault", onset=10)
    windows, labels = sensor.sample(30, class_probs=[1, 0, 0, 0])
    fault = CLASS_NAMES.index("bearing_fault")
    assert labels[:10].tolist() == [0] * 10 and labels[10:].tolist() == [fault] * 20
    kurt = _raw_features(windows)[:, COL["log_kurtosis_x"]]
    assert kurt[10:].mean() > kurt[:10].mean() + 0.05
    assert sensor.last_label == fault


def test_sample_rate_is_shared_with_the_feature_pipeline() -> None:
    assert agent_features.SAMPLE_RATE_HZ == SAMPLE_RATE_HZ
    assert agent_features.WINDOW_LEN == WINDOW_LEN
