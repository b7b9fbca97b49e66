"""Scenario files: validation (one line naming file, key, reason), fleet assignment, drift
timing and selection, and the vectorised ScenarioFeed with label feeding."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tinyfleet.agent.agent import NoModelError
from tinyfleet.agent.features import WINDOW_LEN, vibration_features_batch
from tinyfleet.sim.errors import ScenarioError
from tinyfleet.sim.scenario import (
    Scenario,
    ScenarioFeed,
    default_scenario,
    load_scenario,
    parse_profile_mix,
)
from tinyfleet.sim.sensors import DeviceParams, VibrationSensor

SCENARIOS = Path(__file__).resolve().parent.parent / "firmware-sim" / "scenarios"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


def test_example_scenarios_load() -> None:
    files = sorted(SCENARIOS.glob("*.toml"))
    assert {f.name for f in files} >= {"drift-30pct.toml", "mixed-profiles.toml", "calm.toml"}
    for f in files:
        load_scenario(f)
    s = load_scenario(SCENARIOS / "drift-30pct.toml")
    targets = s.drift_targets()
    assert [len(t) for t in targets] == [30, 10]
    assert s.sensor.label_rate == 0.05


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("[fleet]\ndevices = 10\nbogus = 1\n", "fleet.bogus: unknown key"),
        ("[fleet]\ndevices = 0\n", "fleet.devices"),
        ("[fleet]\n", "fleet.devices: required key is missing"),
        ("[fleet]\ndevices = 5\nprofiles = { cortex-m0 = 1.0 }\n", "cortex-m0"),
        ("[fleet]\ndevices = 5\n[sensor]\nclass_mix = { broken = 1.0 }\n", "broken"),
        ("[fleet]\ndevices = 5\n[sensor]\nlabel_rate = 1.5\n", "sensor.label_rate"),
        (
            '[fleet]\ndevices = 5\n[[drift]]\nkind = "gain"\nselect = { fraction = 0.5 }\n',
            "drift.0: a gain drift needs a magnitude",
        ),
        (
            '[fleet]\ndevices = 5\n[[drift]]\nkind = "fault"\nselect = { fraction = 0.5 }\n',
            "a fault drift needs fault",
        ),
        (
            '[fleet]\ndevices = 5\n[[drift]]\nkind = "bias"\nmagnitude = 40\n'
            "select = { fraction = 0.5 }\n",
            "full scale",
        ),
        (
            '[fleet]\ndevices = 5\n[[drift]]\nkind = "gain"\nmagnitude = 2\n'
            'select = { fraction = 0.5, tag = "x" }\n',
            "exactly one of ids, tag, fraction",
        ),
        (
            '[fleet]\ndevices = 5\n[[drift]]\nkind = "gain"\nmagnitude = 2\n'
            'select = { ids = ["sim-00099"] }\n',
            "drift[0].select.ids: unknown device 'sim-00099'",
        ),
        (
            '[fleet]\ndevices = 5\n[[drift]]\nkind = "gain"\nmagnitude = 2\n'
            'select = { tag = "line-z" }\n',
            "tag 'line-z' is not in fleet.tags",
        ),
        (
            '[fleet]\ndevices = 5\n[[drift]]\nkind = "gain"\nmagnitude = 2\n'
            "select = { fraction = 0.01 }\n",
            "selects no device of 5",
        ),
        (
            '[fleet]\ndevices = 5\n[[drift]]\nkind = "gain"\nmagnitude = 2\nat_s = 1\n'
            "at_window = 3\nselect = { fraction = 1.0 }\n",
            "at_s or at_window",
        ),
        ("[fleet\ndevices = 5\n", "not valid TOML"),
    ],
)
def test_malformed_scenario_is_one_line_naming_file_and_key(
    tmp_path: Path, body: str, where: str
) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    assert where in msg, msg
    assert "\n" not in msg
    assert info.value.exit_code == 50


def test_missing_file_and_profile_mix_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load_scenario(tmp_path / "none.toml")
    assert parse_profile_mix("rpi4") == {"rpi4": 1.0}
    assert parse_profile_mix("rpi4=0.8, cortex-m4=0.2") == {"rpi4": 0.8, "cortex-m4": 0.2}
    for bad in ("rpi5", "rpi4=x", "rpi4=-1", "rpi4=0"):
        with pytest.raises(ScenarioError, match="--profile"):
            parse_profile_mix(bad)


def test_fleet_assignment_is_deterministic_with_exact_shares() -> None:
    s = Scenario.model_validate(
        {
            "fleet": {
                "devices": 40,
                "seed": 3,
                "profiles": {"rpi4": 0.5, "cortex-m7": 0.3, "cortex-m4": 0.2},
                "tags": {"line-a": 0.25},
            }
        }
    )
    specs = s.device_specs()
    assert [d.device for d in specs][:2] == ["sim-00000", "sim-00001"]
    counts = {p: sum(d.profile == p for d in specs) for p in ("rpi4", "cortex-m7", "cortex-m4")}
    assert counts == {"rpi4": 20, "cortex-m7": 12, "cortex-m4": 8}
    assert sum("line-a" in d.tags for d in specs) == 10
    assert [(d.device, d.profile, d.tags) for d in specs] == [
        (d.device, d.profile, d.tags) for d in s.device_specs()
    ]
    bigger = s.with_overrides(devices=80, profiles={"rpi4": 1.0})
    assert len(bigger.device_specs()) == 80 and {d.profile for d in bigger.device_specs()} == {
        "rpi4"
    }


def test_drift_timing_sudden_ramp_window_and_end() -> None:
    s = Scenario.model_validate(
        {
            "fleet": {"devices": 4},
            "sensor": {"rate_hz": 2.0},
            "drift": [
                {"kind": "gain", "magnitude": 2.0, "select": {"fraction": 1.0}, "at_s": 5},
                {
                    "kind": "noise",
                    "magnitude": 3.0,
                    "select": {"fraction": 1.0},
                    "at_window": 4,
                    "ramp_windows": 4,
                    "for_s": 10,
                },
            ],
        }
    )
    sudden, ramp = s.drift
    assert [sudden.progress(k, 2.0) for k in (9, 10, 500)] == [0.0, 1.0, 1.0]
    assert [ramp.progress(k, 2.0) for k in (3, 4, 5, 7, 23, 24)] == [0, 0.25, 0.5, 1, 1, 0]


class _Agent:
    """Stands in for Agent: a serving model that always answers class 0."""

    def __init__(self, serving: bool = True) -> None:
        self.serving = object() if serving else None
        self.calls: list[tuple[tuple[int, ...], int | None]] = []

    def infer(self, raw: np.ndarray) -> Any:
        self.calls.append((raw.shape, None))
        return SimpleNamespace(label=0)


class _LabelAgent(_Agent):
    def infer(self, raw: np.ndarray, label: int | None = None) -> Any:  # type: ignore[override]
        self.calls.append((raw.shape, label))
        return SimpleNamespace(label=0)


class _AddLabelAgent(_Agent):
    def __init__(self) -> None:
        super().__init__()
        self.labels: list[int] = []

    def add_label(self, raw: np.ndarray, label: int) -> None:
        self.labels.append(label)


class _Broken(_Agent):
    def infer(self, raw: np.ndarray) -> Any:
        raise RuntimeError("boom")


class _NoModel(_Agent):
    def infer(self, raw: np.ndarray) -> Any:
        raise NoModelError("none")


def _fleet(agents: dict[str, Any]) -> Any:
    return SimpleNamespace(configs=dict.fromkeys(agents), agents=agents)


def test_feed_applies_drift_to_selected_devices_at_their_time() -> None:
    s = Scenario.model_validate(
        {
            "fleet": {"devices": 10, "tags": {"a": 0.5}},
            "sensor": {"rate_hz": 1.0},
            "drift": [
                {"kind": "gain", "magnitude": 0.5, "select": {"tag": "a"}, "at_window": 3},
                {"kind": "bias", "magnitude": 0.2, "select": {"ids": ["sim-00001"]}},
                {
                    "kind": "speed",
                    "magnitude": 1.2,
                    "select": {"fraction": 0.3, "seed": 4},
                    "at_window": 2,
                    "ramp_windows": 4,
                },
            ],
        }
    )
    agents = {d: _Agent() for d in s.device_ids()}
    feed = ScenarioFeed(_fleet(agents), s, start_epoch=0.0)
    tagged = {d.device for d in s.device_specs() if "a" in d.tags}
    before, after = feed.effective(2), feed.effective(3)
    for i, d in enumerate(feed.devices):
        assert np.allclose(before["gain"][i], feed.gain[i])
        want = feed.gain[i] * (0.5 if d in tagged else 1.0)
        assert np.allclose(after["gain"][i], want)
    assert np.allclose(before["bias"][1], feed.bias[1] + 0.2)
    assert np.allclose(before["bias"][0], feed.bias[0])
    fast = set(s.drift_targets()[2])
    assert len(fast) == 3
    half = feed.effective(3)["speed"]  # 2 of 4 ramp windows: +10 %
    for i, d in enumerate(feed.devices):
        assert half[i] == pytest.approx(feed.rotation[i] * (1.1 if d in fast else 1.0))


def test_feed_windows_match_the_sensor_model_and_fault_drift_sets_true_label() -> None:
    s = Scenario.model_validate(
        {
            "fleet": {"devices": 60, "seed": 5},
            "drift": [
                {
                    "kind": "fault",
                    "fault": "imbalance",
                    "select": {"ids": ["sim-00000"]},
                    "at_window": 0,
                }
            ],
        }
    )
    feed = ScenarioFeed(_fleet({d: _Agent() for d in s.device_ids()}), s, start_epoch=0.0)
    rows = np.arange(60)
    w, labels = feed.windows(0, rows, np.zeros(60, dtype=np.int64))
    assert w.shape == (60, WINDOW_LEN, 3) and w.dtype == np.float32
    assert labels[0] == 1 and set(labels[1:]) == {0}  # the fault drift is the truth
    ours = vibration_features_batch(w[1:])
    ref = vibration_features_batch(
        np.stack(
            [
                VibrationSensor(DeviceParams.for_device(d, 5), np.random.default_rng(i)).window(0)
                for i, d in enumerate(s.device_ids()[1:])
            ]
        )
    )
    # Same physics: per-feature means agree within a fraction of their spread.
    spread = ref.std(axis=0) + 1e-3
    assert np.all(np.abs(ours.mean(axis=0) - ref.mean(axis=0)) < 0.6 * spread)


def test_feed_gives_labels_through_either_agent_api_and_counts_failures() -> None:
    s = Scenario.model_validate({"fleet": {"devices": 6}, "sensor": {"label_rate": 1.0}})
    ids = s.device_ids()
    agents: dict[str, Any] = {
        ids[0]: _LabelAgent(),
        ids[1]: _AddLabelAgent(),
        ids[2]: _Agent(),
        ids[3]: _Broken(),
        ids[4]: _NoModel(),
        ids[5]: _Agent(serving=False),
    }
    feed = ScenarioFeed(_fleet(agents), s, start_epoch=0.0)
    for k in range(5):
        feed.step(k)
    st = feed.stats
    assert st.inferences == 15 and st.errors == 5
    assert st.labels_fed == 10 and st.labels_unsupported == 5
    assert all(lab is not None for _, lab in agents[ids[0]].calls)
    assert len(agents[ids[1]].labels) == 5
    assert agents[ids[5]].calls == []  # not serving: no window
    assert st.per_device == {ids[0]: 5, ids[1]: 5, ids[2]: 5}
    # label_rate 0: no label at all
    s0 = default_scenario(1)
    a = _LabelAgent()
    f0 = ScenarioFeed(_fleet({s0.device_ids()[0]: a}), s0, start_epoch=0.0)
    f0.step(0)
    assert a.calls == [((WINDOW_LEN, 3), None)]
