"""Sensor stats monitored beside the model's features (``vibration-v1``: per-axis mean and
running speed): what the features are built not to see, one pass with the features, in the
reference profile after them, fed by the agent into its drift records (a real LiteRT model
taking the real features)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_support import register_version

from tinyfleet.agent import drift
from tinyfleet.agent.drift_stats import window_scores
from tinyfleet.agent.features import (
    FEATURE_NAMES,
    VIBRATION_MONITOR_NAMES,
    get_monitor,
    vibration_features_and_stats,
    vibration_features_batch,
    vibration_sensor_stats,
)
from tinyfleet.agent.protocol import DriftReport
from tinyfleet.sim.sensors import DeviceParams, Drift, VibrationSensor, make_fleet_dataset

N_IN = len(FEATURE_NAMES)
N_STATS = len(VIBRATION_MONITOR_NAMES)
WINDOW = 50


def _windows(drift_: Drift | None, n: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    params = DeviceParams.for_device("dev-007", 3)
    sensor = VibrationSensor(params, rng=np.random.default_rng(seed), drift=drift_)
    return sensor.sample(n, [0.85, 0.05, 0.05, 0.05])


def test_one_pass_gives_the_features_unchanged_and_the_stats() -> None:
    w, _ = _windows(None, 12)
    x, s = vibration_features_and_stats(w)
    assert x.dtype == s.dtype == np.float32
    assert np.array_equal(x, vibration_features_batch(w))  # the model's inputs do not change
    assert s.shape == (12, N_STATS)
    assert np.allclose(s, vibration_sensor_stats(w))
    assert np.allclose(s[:, :3], w.mean(axis=1), atol=1e-6)
    params = DeviceParams.for_device("dev-007", 3)
    assert np.allclose(s[:, 3], params.rotation_hz, rtol=0.05)  # 1 % jitter, FFT estimate
    # a window alone gives bit for bit what it gives in a batch
    x1, s1 = vibration_features_and_stats(w[3:4])
    assert np.array_equal(x1[0], x[3]) and np.array_equal(s1[0], s[3])
    mon = get_monitor("vibration-v1")
    assert mon is not None and list(mon.names) == VIBRATION_MONITOR_NAMES
    assert get_monitor("identity") is None and get_monitor(None) is None


def test_bias_and_speed_drift_move_the_sensor_stats_not_the_features() -> None:
    n = 200
    w_clean, _ = _windows(None, n)
    w_bias, _ = _windows(Drift(bias_offset=0.5), n)  # same rng: the same vibration, offset
    w_fast, _ = _windows(Drift(speed_factor=1.1), n)
    x0, s0 = vibration_features_and_stats(w_clean)
    xb, sb = vibration_features_and_stats(w_bias)
    xf, sf = vibration_features_and_stats(w_fast)
    # the model's features: a bias is removed with each window's mean, a speed change is
    # measured away (frequencies in multiples of the running speed)
    assert np.max(np.abs(xb - x0)) < 1e-3
    # the sensor stats see both
    assert np.allclose(sb[:, :3] - s0[:, :3], 0.5, atol=1e-3)
    assert np.allclose(sb[:, 3], s0[:, 3], atol=1e-3)
    assert np.median(sf[:, 3]) / np.median(s0[:, 3]) == pytest.approx(1.1, abs=0.02)

    # scored against a profile of the clean device: only the sensor stats drift
    w_ref, _ = _windows(None, 600, seed=1)
    xr, sr = vibration_features_and_stats(w_ref)
    probs = np.tile([0.7, 0.1, 0.1, 0.1], (600, 1))
    profile = drift.build_profile(
        xr,
        probs,
        FEATURE_NAMES,
        monitor="vibration-v1",
        monitor_stats=sr,
        monitor_names=VIBRATION_MONITOR_NAMES,
    )
    assert profile.n_inputs == N_IN and len(profile.features) == N_IN + N_STATS

    def ks(x: np.ndarray, s: np.ndarray) -> np.ndarray:
        got = window_scores(profile, np.concatenate([x, s], axis=1), probs[:n])
        assert got is not None
        return np.asarray(got["ks"])

    clean, bias, fast = ks(x0, s0), ks(xb, sb), ks(xf, sf)
    assert max(clean) < 0.2
    assert max(bias[:N_IN]) < 0.2 and min(bias[N_IN : N_IN + 3]) > 0.85  # every axis' mean
    assert bias[-1] < 0.2  # the speed did not change
    print(
        f"\nKS clean {max(clean):.2f}, speed x1.1: features {max(fast[:N_IN]):.2f}, "
        f"rotation_hz {fast[-1]:.2f}"
    )
    assert fast[-1] > 0.85 and max(fast[N_IN : N_IN + 3]) < 0.2
    assert max(fast[:N_IN]) < 0.3  # the features move a little (FFT resolution), not much


def test_profile_monitor_fields_validated_and_old_bundles_load() -> None:
    rng = np.random.default_rng(0)
    x, m = rng.normal(size=(40, 3)), rng.normal(size=(40, 2))
    p = np.full((40, 2), 0.5)
    profile = drift.build_profile(x, p, monitor="vibration-v1", monitor_stats=m)
    assert [f.name for f in profile.features] == ["f0", "f1", "f2", "m0", "m1"]
    assert profile.model_inputs == 3
    plain = drift.build_profile(x, p)
    assert plain.monitor is None and plain.n_inputs is None and plain.model_inputs == 3
    data = plain.model_dump()
    old = {k: v for k, v in data.items() if k not in ("monitor", "n_inputs")}
    assert drift.ReferenceProfile.model_validate(old) == plain  # bundles from before
    for bad in ({"monitor": "vibration-v1"}, {"n_inputs": 2}, {"monitor": "x", "n_inputs": 3}):
        with pytest.raises(ValueError):
            drift.ReferenceProfile.model_validate({**data, **bad})
    # a bundle without sensor stats is written exactly as before (older agents read it)
    health = drift.health_reference(x[:2], np.array([0, 1]), {"a" * 64: p[:2]})
    blob = drift.ReferenceBundle(profile=plain, health=health).to_bytes()
    assert b"monitor" not in blob and b"n_inputs" not in blob
    assert drift.ReferenceBundle.from_bytes(blob).profile == plain
    blob = drift.ReferenceBundle(profile=profile, health=health).to_bytes()
    assert drift.ReferenceBundle.from_bytes(blob).profile == profile
    with pytest.raises(ValueError, match="go together"):
        drift.build_profile(x, p, monitor_stats=m)
    with pytest.raises(ValueError, match="rows of monitor stats"):
        drift.build_profile(x, p, monitor="vibration-v1", monitor_stats=m[:5])
    with pytest.raises(ValueError, match="names"):
        drift.build_profile(x, p, monitor="v", monitor_stats=m, monitor_names=["a"])


# ---------------------------------------------------------------- the agent


@pytest.fixture(scope="module")
def vib_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A small real classifier on ``vibration-v1`` features, as TFLite, and its reference data."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras  # type: ignore[import-untyped]
    import tensorflow as tf  # type: ignore[import-untyped]

    keras.utils.set_random_seed(0)
    w, y, _ = make_fleet_dataset([f"ref-{i}" for i in range(4)], 15, 3)
    x, s = vibration_features_and_stats(w)
    model = keras.Sequential(
        [
            keras.Input((N_IN,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=5, verbose=0)
    out = tmp_path_factory.mktemp("vib") / "vib.tflite"
    out.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return out, (x, s, y)


def _serving_agent(tmp_path: Path, signing_key: Any, vib_model: Any, profile_kw: Any) -> Any:
    from tinyfleet.agent.activation import activate
    from tinyfleet.agent.agent import Agent
    from tinyfleet.agent.config import AgentConfig
    from tinyfleet.agent.runtime import load_model
    from tinyfleet.agent.store import ModelStore
    from tinyfleet.host.registry import Registry

    tflite, (x, s, y) = vib_model
    registry = Registry(tmp_path / "registry")
    version = register_version(
        registry,
        signing_key,
        tflite,
        model="vib",
        x=x,
        y=y,
        preprocess="vibration-v1",
        classes=["normal", "imbalance", "misalignment", "bearing_fault"],
        profile_kw={"feature_names": FEATURE_NAMES, **profile_kw(s)},
    )
    info, sha = version.info, version.sha256
    pub = tmp_path / "host.pub"
    pub.write_text(signing_key.public_key_pem)
    cfg = AgentConfig.model_validate(
        {
            "device": {"id": "dev-007", "fleet": "test"},
            "broker": {"url": "mqtt://127.0.0.1:9"},  # never connected
            "security": {"host_public_key": str(pub)},
            "paths": {"state_dir": str(tmp_path / "state")},
            "telemetry": {"window": WINDOW},
        }
    )
    activate(
        ModelStore(cfg.paths.state_dir / "models"),
        info.manifest.model_dump_json().encode(),
        sha,
        registry.blob_path(sha),
        registry.blob_path(info.manifest.manifest.reference.sha256),
        public_key=signing_key.public_key,
        generation=1,
        loader=load_model,
    )
    agent = Agent(cfg, public_key=signing_key.public_key)
    assert agent.serving is not None
    return agent


def _monitored(s: np.ndarray) -> dict[str, Any]:
    return {
        "monitor": "vibration-v1",
        "monitor_stats": s,
        "monitor_names": VIBRATION_MONITOR_NAMES,
    }


def test_agent_spools_drift_records_of_features_and_sensor_stats(
    tmp_path: Path, signing_key: Any, vib_model: Any
) -> None:
    from tinyfleet.agent.labels import load_labels

    agent = _serving_agent(tmp_path, signing_key, vib_model, _monitored)
    try:
        serving = agent.serving
        assert serving.drift is not None and serving.drift.n_features == N_IN + N_STATS
        assert serving.monitor is not None
        w_clean, y = _windows(None, WINDOW)
        w_bias, _ = _windows(Drift(bias_offset=0.5), WINDOW)  # the same vibration, offset
        preds = [agent.infer(w, label=int(c)) for w, c in zip(w_clean, y, strict=True)]
        preds_b = [agent.infer(w) for w in w_bias]
        # prediction and confidence do not depend on the monitor (nor on the offset)
        ref = agent.serving.activated.model
        x0 = vibration_features_batch(w_clean)
        for p, xi in zip(preds, x0, strict=True):
            assert np.allclose(p.probabilities, ref.invoke_one(xi))
        assert [p.label for p in preds] == [p.label for p in preds_b]
        records = [json.loads(r.body) for r in agent.spool.peek(1000) if r.kind == "drift"]
        assert len(records) == 2
        for k, r in enumerate(records):
            assert len(r["psi"]) == len(r["ks"]) == N_IN + N_STATS
            DriftReport.model_validate({**r, "session": 1, "seq": k})
        clean, biased = records
        # the model's features did not move; the mean of every axis did
        assert np.allclose(clean["ks"][:N_IN], biased["ks"][:N_IN], atol=0.05)
        moved = np.abs(np.subtract(biased["ks"][N_IN:], clean["ks"][N_IN:]))
        # the z mean (no gravity: the fleet's spread is narrow) leaves the reference's range;
        # a point mass that moves across the fleet's median can keep its KS (x here)
        assert moved[2] > 0.25 and moved[3] < 0.1, moved  # the means, not the speed
        # the host's drift monitor expects as many entries as the registered profile has
        from tinyfleet.host.fleet.drift import ProfileSource
        from tinyfleet.host.registry import Registry

        source = ProfileSource(Registry(tmp_path / "registry"))
        assert source.feature_count("vib", 1) == len(clean["psi"]) == N_IN + N_STATS
        # the label buffer stores the model's features only
        samples = load_labels(agent.config.paths.state_dir / "labels.db", "vibration-v1")
        assert samples[0].shape == (WINDOW, N_IN)
    finally:
        agent.close(timeout=0.5)


def test_agent_without_monitor_or_with_an_unknown_one(
    tmp_path: Path, signing_key: Any, vib_model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    agent = _serving_agent(tmp_path / "a", signing_key, vib_model, lambda s: {})
    try:
        assert agent.serving.drift is not None and agent.serving.drift.n_features == N_IN
        assert agent.serving.monitor is None
        for w in _windows(None, WINDOW)[0]:
            agent.infer(w)
        (r,) = [json.loads(r.body) for r in agent.spool.peek(100) if r.kind == "drift"]
        assert len(r["psi"]) == N_IN
    finally:
        agent.close(timeout=0.5)

    def unknown(s: np.ndarray) -> dict[str, Any]:
        return {**_monitored(s), "monitor": "vibration-v9"}

    agent = _serving_agent(tmp_path / "b", signing_key, vib_model, unknown)
    try:
        assert agent.serving.drift is None and agent.serving.monitor is None
        assert any("vibration-v9" in r.getMessage() for r in caplog.records)
        p = agent.infer(_windows(None, 1)[0][0])  # inference goes on
        assert 0 <= p.label < 4
    finally:
        agent.close(timeout=0.5)

    def two_stats(s: np.ndarray) -> dict[str, Any]:
        return {**_monitored(s[:, :2]), "monitor_names": VIBRATION_MONITOR_NAMES[:2]}

    caplog.clear()
    agent = _serving_agent(tmp_path / "c", signing_key, vib_model, two_stats)
    try:
        assert agent.serving.drift is None  # 21 features + 4 stats do not make 23 entries
        (msg,) = [r.getMessage() for r in caplog.records if "disabled" in r.getMessage()]
        assert "4 sensor stats" in msg and "has 23" in msg
    finally:
        agent.close(timeout=0.5)


def test_dataset_monitor_stats_checked() -> None:
    from tinyfleet.host.errors import RecipeError
    from tinyfleet.host.recipes import Dataset

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), np.array([0, 1, 0, 1, 0, 1])

    def ds(**kw: Any) -> Dataset:
        return Dataset(x, y, x, y, x, y, ["a", "b"], **kw)

    plain = ds()
    assert plain.monitor == {} and plain.monitor_names is None
    good = ds(monitor={"val": rng.normal(size=(6, 2))}, monitor_names=["m0", "m1"])
    assert good.monitor["val"].dtype == np.float32
    assert good.fingerprint() != plain.fingerprint()
    for kw, match in (
        ({"monitor": {"val": np.zeros((6, 2))}}, "monitor_names"),
        ({"monitor": {"val": np.zeros((5, 2))}, "monitor_names": ["a", "b"]}, "shape"),
        ({"monitor": {"val": np.zeros((6, 3))}, "monitor_names": ["a", "b"]}, "shape"),
        ({"monitor": {"cal": np.zeros((6, 2))}, "monitor_names": ["a", "b"]}, "split"),
        ({"monitor": {"val": np.full((6, 2), np.nan)}, "monitor_names": ["a", "b"]}, "finite"),
    ):
        with pytest.raises(RecipeError, match=match):
            ds(**kw)


def test_sensor_stats_ks_is_one_sided_and_tells_mirror_positions_apart() -> None:
    from tinyfleet.agent.drift_stats import DriftAccumulator, ks_binned

    rng = np.random.default_rng(4)
    fleet = rng.uniform(22.0, 30.0, size=(2000, 1))  # running speeds of a fleet
    feats = rng.normal(size=(2000, 1))
    p = np.full((2000, 2), 0.5)
    profile = drift.build_profile(feats, p, monitor="vibration-v1", monitor_stats=fleet)
    plain = drift.build_profile(np.concatenate([feats, fleet], axis=1), p)

    def scores(prof: drift.ReferenceProfile, speed: float) -> list[float]:
        acc = DriftAccumulator(prof)
        x = np.column_stack([rng.normal(size=200), rng.normal(speed, 0.05, size=200)])
        acc.add_batch(x.astype(np.float32), p[:200])
        got = acc.scores()
        assert got is not None
        return list(got["ks"])

    # 24.5 Hz and its mirror 27.5 Hz across the fleet's median (26): the same two-sided KS
    lo, hi = scores(plain, 24.5)[1], scores(plain, 27.5)[1]
    assert lo == pytest.approx(hi, abs=0.06) and lo >= 0.55
    # the one-sided D+ is the share of the fleet below the device: it moved
    d_lo, d_hi = scores(profile, 24.5)[1], scores(profile, 27.5)[1]
    assert d_lo <= 0.35 and d_hi >= 0.55 and d_hi - d_lo >= 0.25, (d_lo, d_hi)
    # the model's features keep the two-sided statistic
    f = profile.features[0]
    row = scores(profile, 26.0)[0]
    counts = np.zeros(len(f.edges) + 1)
    assert 0.0 <= row <= 1.0 and ks_binned(f.edges, f.proportions, counts) == 0.0
