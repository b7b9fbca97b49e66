"""Drift detection end to end on a small simulated fleet (the full figures: ``python -m bench drift``).

Simulated sensors (every machine different), ``vibration-v1`` features, a real
scikit-learn classifier, the on-device ``DriftAccumulator`` and the host's
``RuleEngine`` with the default ``DriftSettings``: the same code as the benchmark,
at a scale that fits the default test run (12 devices, windows of 100 inferences).  The
reference profile carries the ``vibration-v1`` sensor stats after the model's features.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import drift as bench_drift  # noqa: E402
from tinyfleet.host.fleet.drift_rules import DriftSettings  # noqa: E402

WINDOW = 100


@pytest.fixture(scope="module")
def fleet() -> tuple[bench_drift.Classifier, bench_drift.Fleet]:
    clf = bench_drift.build_classifier(per_class=15)
    settings = DriftSettings()
    fleet = bench_drift.simulate_fleet(
        devices=12,
        window=WINDOW,
        baseline=settings.baseline_windows,
        clean_monitored=4,
        pre_onset=2,
        after_onset=2,
        drifted_share=1 / 3,
    ).scored(clf)
    return clf, fleet


def test_noise_and_gain_drift_are_alerted_within_two_windows_without_false_alarms(
    fleet: tuple[bench_drift.Classifier, bench_drift.Fleet],
) -> None:
    clf, f = fleet
    settings = DriftSettings()
    for kw in ({"noise_factor": 3.0}, {"gain_factor": 1.5}):
        r = bench_drift.evaluate(settings, f, bench_drift.drifted_runs(clf, f, WINDOW, kw))
        assert r["drifted_devices"] == 4
        assert r["clean_windows"] == 8 * 4 + 4 * 2
        assert r["false_alarms"] == 0, r
        assert r["detection_rate_2"] >= 0.75, (kw, r)
        # the drift matters: the classifier gets worse on the drifted devices
        assert r["accuracy_after"] < r["accuracy_before"] - 0.1, (kw, r)


def test_a_bias_the_features_remove_is_alerted_through_the_sensor_stats(
    fleet: tuple[bench_drift.Classifier, bench_drift.Fleet],
) -> None:
    clf, f = fleet
    settings = DriftSettings()
    assert clf.profile.monitor == "vibration-v1"
    r = bench_drift.evaluate(
        settings, f, bench_drift.drifted_runs(clf, f, WINDOW, {"bias_offset": 0.5})
    )
    # vibration-v1 subtracts each window's mean: a constant offset is invisible to the
    # model's inputs and the accuracy is unchanged; the per-axis means monitored beside
    # the features move, and the device is alerted
    assert r["accuracy_after"] == pytest.approx(r["accuracy_before"], abs=0.05)
    assert r["false_alarms"] == 0 and r["detection_rate_2"] >= 0.75, r
    # with a profile of the model's features only, as before: nothing to alert on
    plain = clf.without_monitor()
    r0 = bench_drift.evaluate(
        settings,
        f.scored(plain),
        bench_drift.drifted_runs(plain, f, WINDOW, {"bias_offset": 0.5}),
    )
    assert r0["detected_within_4"] == 0 and r0["false_alarms"] == 0
