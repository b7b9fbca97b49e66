"""Scenario files: who is in the simulated fleet, what their sensors see, and when they drift.

A scenario is a TOML file (examples in ``firmware-sim/scenarios/``)::

    [fleet]
    devices = 100                    # device ids sim-00000 .. sim-00099 (id_prefix)
    seed = 7                         # sensors, tags, profiles, drift selection
    profiles = { rpi4 = 0.9, cortex-m4 = 0.1 }   # shares of the fleet per device profile
    tags = { line-a = 0.5 }          # fraction of devices carrying each tag

    [sensor]
    rate_hz = 2.0                    # windows per second per device (one inference each)
    class_mix = { normal = 0.7, imbalance = 0.1, misalignment = 0.1, bearing_fault = 0.1 }
    label_rate = 0.05                # fraction of inferences whose true label the agent is given

    [[drift]]
    kind = "gain"                    # gain | bias | noise | speed | fault
    magnitude = 1.6                  # factor (gain, noise, speed), offset in g (bias)
    select = { fraction = 0.3, seed = 1 }        # or { ids = [...] } or { tag = "line-a" }
    at_s = 60                        # or at_window = 120 (the fleet's window count)
    ramp_s = 0                       # 0: sudden; else full after ramp_s (or ramp_windows)
    for_s = 300                      # optional: the drift ends after this long

Time in a scenario is the fleet's window clock: window k is the k-th tick of the
feed, at ``k / rate_hz`` seconds after the fleet started, the same on every
worker process.  ``load_scenario`` answers a malformed or impossible file with
one ``ScenarioError`` line naming the file, the key and the reason.

``ScenarioFeed`` runs a scenario on an ``InProcessFleet``: once per window it
generates one window for every serving device in one vectorised step (the
signature of a fault class is added per faulty device, with the same physics as
``VibrationSensor``), applies the drifts active at that window, runs each
device's agent on its window and hands a ``label_rate`` share of the true labels
to the agent (``Agent.infer(raw, label=...)`` or ``Agent.add_label`` when the
agent has them).
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tinyfleet.agent.features import SAMPLE_RATE_HZ, WINDOW_LEN
from tinyfleet.agent.profiles import PROFILES
from tinyfleet.sim.errors import ScenarioError
from tinyfleet.sim.sensors import (
    CLASS_NAMES,
    FULL_SCALE_G,
    SPEED_JITTER,
    DeviceParams,
    VibrationSensor,
    derive_seed,
)

if TYPE_CHECKING:
    from tinyfleet.sim.fleet import DeviceSpec, InProcessFleet

__all__ = [
    "MAX_DEVICES",
    "DriftEntry",
    "FleetSection",
    "Scenario",
    "ScenarioFeed",
    "Select",
    "SensorSection",
    "default_scenario",
    "load_scenario",
    "parse_profile_mix",
]

MAX_DEVICES = 100_000
"""Largest fleet a scenario may declare (the launcher also checks what the machine holds)."""

DRIFT_KINDS = ("gain", "bias", "noise", "speed", "fault")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _shares(v: dict[str, float], what: str) -> dict[str, float]:
    for k, share in v.items():
        if not math.isfinite(share) or share < 0:
            raise ValueError(f"{what} {k!r}: share must be a number >= 0, got {share!r}")
    if v and sum(v.values()) <= 0:
        raise ValueError(f"{what}: the shares add up to 0")
    return v


class FleetSection(_Model):
    devices: int = Field(ge=1, le=MAX_DEVICES)
    id_prefix: str = Field("sim", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")
    seed: int = 7
    profiles: dict[str, float] = Field(default_factory=lambda: {"rpi4": 1.0})
    tags: dict[str, float] = Field(default_factory=dict)
    groups: list[str] = Field(default_factory=list)

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("at least one profile")
        for name in v:
            if name not in PROFILES:
                raise ValueError(
                    f"unknown device profile {name!r} (known: {', '.join(sorted(PROFILES))})"
                )
        return _shares(v, "profile")

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, float]) -> dict[str, float]:
        for tag, frac in v.items():
            if not math.isfinite(frac) or not 0 <= frac <= 1:
                raise ValueError(f"tag {tag!r}: a fraction between 0 and 1, got {frac!r}")
        return v


class SensorSection(_Model):
    rate_hz: float = Field(2.0, gt=0, le=50)
    class_mix: dict[str, float] = Field(
        default_factory=lambda: {
            "normal": 0.7,
            "imbalance": 0.1,
            "misalignment": 0.1,
            "bearing_fault": 0.1,
        }
    )
    label_rate: float = Field(0.0, ge=0, le=1)

    @field_validator("class_mix")
    @classmethod
    def _mix(cls, v: dict[str, float]) -> dict[str, float]:
        for name in v:
            if name not in CLASS_NAMES:
                raise ValueError(f"unknown class {name!r} (known: {', '.join(CLASS_NAMES)})")
        if not v:
            raise ValueError("at least one class")
        return _shares(v, "class")

    def class_probs(self) -> np.ndarray:
        p = np.array([self.class_mix.get(c, 0.0) for c in CLASS_NAMES], dtype=np.float64)
        return p / p.sum()


class Select(_Model):
    """Which devices a drift applies to: exactly one of ``ids``, ``tag``, ``fraction``."""

    ids: list[str] | None = None
    tag: str | None = None
    fraction: float | None = Field(None, gt=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one(self) -> Select:
        given = [k for k in ("ids", "tag", "fraction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of ids, tag, fraction"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.ids is not None and not self.ids:
            raise ValueError("ids is empty")
        return self


class DriftEntry(_Model):
    kind: Literal["gain", "bias", "noise", "speed", "fault"]
    magnitude: float | None = None
    fault: str | None = None
    select: Select
    at_s: float | None = Field(None, ge=0)
    at_window: int | None = Field(None, ge=0)
    ramp_s: float | None = Field(None, ge=0)
    ramp_windows: int | None = Field(None, ge=0)
    for_s: float | None = Field(None, gt=0)
    name: str | None = None

    @model_validator(mode="after")
    def _check(self) -> DriftEntry:
        if self.at_s is not None and self.at_window is not None:
            raise ValueError("give at_s or at_window, not both")
        if self.ramp_s is not None and self.ramp_windows is not None:
            raise ValueError("give ramp_s or ramp_windows, not both")
        if self.kind == "fault":
            if self.fault is None:
                raise ValueError(f"a fault drift needs fault = one of {', '.join(CLASS_NAMES[1:])}")
            if self.fault not in CLASS_NAMES[1:]:
                raise ValueError(
                    f"fault must be one of {', '.join(CLASS_NAMES[1:])}, got {self.fault!r}"
                )
            if self.magnitude is not None and not 0 < self.magnitude <= 1:
                raise ValueError("a fault's magnitude is its severity in (0, 1]")
        else:
            if self.fault is not None:
                raise ValueError(f"fault is only for kind = 'fault', not {self.kind!r}")
            if self.magnitude is None:
                raise ValueError(f"a {self.kind} drift needs a magnitude")
            if not math.isfinite(self.magnitude):
                raise ValueError("magnitude must be finite")
            if self.kind != "bias" and not 0 < self.magnitude <= 100:
                raise ValueError(f"a {self.kind} magnitude is a factor in (0, 100]")
            if self.kind == "bias" and abs(self.magnitude) > FULL_SCALE_G:
                raise ValueError(f"a bias beyond the sensor's +-{FULL_SCALE_G:g} g full scale")
        return self

    def windows(self, rate_hz: float) -> tuple[int, int, int | None]:
        """(onset, ramp, end) in fleet windows; end None: the drift never ends."""
        onset = (
            self.at_window if self.at_window is not None else round((self.at_s or 0.0) * rate_hz)
        )
        ramp = (
            self.ramp_windows
            if self.ramp_windows is not None
            else round((self.ramp_s or 0.0) * rate_hz)
        )
        end = None if self.for_s is None else onset + max(1, round(self.for_s * rate_hz))
        return onset, ramp, end

    def progress(self, k: int, rate_hz: float) -> float:
        onset, ramp, end = self.windows(rate_hz)
        if k < onset or (end is not None and k >= end):
            return 0.0
        if ramp == 0:
            return 1.0
        return min(1.0, (k - onset + 1) / ramp)

    def label(self, index: int) -> str:
        return self.name or f"drift[{index}] {self.kind}"


class Scenario(_Model):
    fleet: FleetSection
    sensor: SensorSection = Field(default_factory=SensorSection)
    drift: list[DriftEntry] = Field(default_factory=list)

    def device_ids(self) -> list[str]:
        width = max(5, len(str(self.fleet.devices - 1)))
        return [f"{self.fleet.id_prefix}-{i:0{width}d}" for i in range(self.fleet.devices)]

    def _assigned(self) -> tuple[dict[str, str], dict[str, list[str]]]:
        ids = self.device_ids()
        n = len(ids)
        rng = np.random.default_rng(derive_seed(self.fleet.seed, "profiles"))
        names = list(self.fleet.profiles)
        shares = np.array([self.fleet.profiles[p] for p in names], dtype=np.float64)
        counts = _largest_remainder(shares / shares.sum(), n)
        order = rng.permutation(n)
        profile: dict[str, str] = {}
        start = 0
        for name, c in zip(names, counts, strict=True):
            for i in order[start : start + c]:
                profile[ids[int(i)]] = name
            start += c
        tags: dict[str, list[str]] = {d: [] for d in ids}
        for tag, frac in self.fleet.tags.items():
            pick = np.random.default_rng(derive_seed(self.fleet.seed, "tag", tag)).permutation(n)
            for i in sorted(int(j) for j in pick[: round(frac * n)]):
                tags[ids[i]].append(tag)
        return profile, tags

    def device_specs(self) -> list[DeviceSpec]:
        """Every device of the fleet: id, tags, groups and profile (deterministic)."""
        from tinyfleet.sim.fleet import DeviceSpec

        profile, tags = self._assigned()
        return [
            DeviceSpec(d, tags=tags[d], groups=list(self.fleet.groups), profile=profile[d])
            for d in self.device_ids()
        ]

    def drift_targets(self) -> list[list[str]]:
        """For each ``[[drift]]`` entry, the devices it applies to (sorted)."""
        ids = self.device_ids()
        _, tags = self._assigned()
        out: list[list[str]] = []
        for e in self.drift:
            sel = e.select
            if sel.ids is not None:
                out.append(sorted(set(sel.ids)))
            elif sel.tag is not None:
                out.append([d for d in ids if sel.tag in tags[d]])
            else:
                k = round((sel.fraction or 0.0) * len(ids))
                pick = np.random.default_rng(derive_seed(sel.seed, "drift-select")).permutation(
                    len(ids)
                )
                out.append(sorted(ids[int(i)] for i in pick[:k]))
        return out

    def check(self, source: str = "scenario") -> Scenario:
        """Cross-field checks: selections name existing devices and select at least one."""
        ids = set(self.device_ids())
        for i, (e, targets) in enumerate(zip(self.drift, self.drift_targets(), strict=True)):
            key = f"drift[{i}].select"
            if e.select.ids is not None:
                unknown = sorted(set(e.select.ids) - ids)
                if unknown:
                    raise ScenarioError(
                        f"{source}: {key}.ids: unknown device {unknown[0]!r}"
                        + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                        + f"; ids run {min(ids)} .. {max(ids)}"
                    )
            elif e.select.tag is not None and e.select.tag not in self.fleet.tags:
                known = ", ".join(sorted(self.fleet.tags)) or "none declared"
                raise ScenarioError(
                    f"{source}: {key}.tag: tag {e.select.tag!r} is not in fleet.tags ({known})"
                )
            if not targets:
                raise ScenarioError(f"{source}: {key}: selects no device of {len(ids)}")
        return self

    def with_overrides(
        self, *, devices: int | None = None, profiles: dict[str, float] | None = None
    ) -> Scenario:
        """The same scenario with another fleet size or profile mix (``sim up`` options)."""
        fleet = self.fleet.model_dump()
        if devices is not None:
            fleet["devices"] = devices
        if profiles is not None:
            fleet["profiles"] = profiles
        data = self.model_dump()
        data["fleet"] = fleet
        return _validate(data, "command line").check("command line")


def _largest_remainder(shares: np.ndarray, n: int) -> list[int]:
    raw = shares * n
    counts = np.floor(raw).astype(int)
    rest = n - int(counts.sum())
    for i in np.argsort(-(raw - counts), kind="stable")[:rest]:
        counts[int(i)] += 1
    return [int(c) for c in counts]


def _validate(data: Mapping[str, Any], source: str) -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required key is missing"
            problems.append(f"{key}: {msg}")
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ScenarioError(f"{source}: {problems[0]}{more}") from None


def load_scenario(path: str | Path) -> Scenario:
    """Read, validate and check a scenario file (``ScenarioError`` naming file, key, reason)."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ScenarioError(f"{p}: no such scenario file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{p}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: {exc}") from None
    return _validate(data, str(p)).check(str(p))


def default_scenario(devices: int, profiles: dict[str, float] | None = None) -> Scenario:
    """No drift, no labels, Pi-class devices (or ``profiles``): what ``sim up`` runs bare."""
    return _validate(
        {"fleet": {"devices": devices, **({"profiles": profiles} if profiles else {})}},
        "command line",
    )


def parse_profile_mix(text: str) -> dict[str, float]:
    """``rpi4`` or ``rpi4=0.8,cortex-m4=0.2`` → shares (``ScenarioError`` on bad input)."""
    out: dict[str, float] = {}
    for item in text.split(","):
        name, sep, share = item.strip().partition("=")
        name = name.strip()
        if name not in PROFILES:
            raise ScenarioError(
                f"--profile: unknown device profile {name!r} (known: {', '.join(sorted(PROFILES))})"
            )
        try:
            value = float(share) if sep else 1.0
        except ValueError:
            raise ScenarioError(f"--profile: {item.strip()!r}: share is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ScenarioError(f"--profile: {item.strip()!r}: share must be >= 0")
        out[name] = value
    if sum(out.values()) <= 0:
        raise ScenarioError("--profile: the shares add up to 0")
    return out


# --------------------------------------------------------------------------- the feed


_log = logging.getLogger("tinyfleet.sim.scenario")


@dataclass
class FeedStats:
    """Counters of a feed (whole fleet part this process runs)."""

    ticks: int = 0
    late_ticks: int = 0
    windows: int = 0
    inferences: int = 0
    correct: int = 0
    errors: int = 0
    labels_fed: int = 0
    labels_unsupported: int = 0
    per_device: dict[str, int] = field(default_factory=dict)
    correct_per_device: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ticks": self.ticks,
            "late_ticks": self.late_ticks,
            "windows": self.windows,
            "inferences": self.inferences,
            "correct": self.correct,
            "errors": self.errors,
            "labels_fed": self.labels_fed,
            "labels_unsupported": self.labels_unsupported,
            "accuracy": None if not self.inferences else self.correct / self.inferences,
        }


def _label_mode(agent: Any) -> str:
    """How an agent takes a true label: ``infer`` (a ``label`` argument), ``add_label``, or none."""
    try:
        if "label" in inspect.signature(agent.infer).parameters:
            return "infer"
    except (TypeError, ValueError):
        pass
    return "add_label" if callable(getattr(agent, "add_label", None)) else "none"


class ScenarioFeed:
    """Runs a scenario's sensors, drifts and labels on the devices of one ``InProcessFleet``.

    ``start_epoch`` (``time.time()`` when the fleet started; shared by every worker
    process) fixes window 0.  ``step(k)`` does window ``k`` synchronously (tests);
    ``start()`` runs windows on a thread at ``rate_hz``, skipping windows it is too
    late for (counted in ``late_ticks``) rather than falling behind.
    """

    def __init__(
        self,
        fleet: InProcessFleet,
        scenario: Scenario,
        *,
        start_epoch: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from tinyfleet.agent.agent import NoModelError

        self._no_model = NoModelError
        self.fleet = fleet
        self.scenario = scenario
        self.rate_hz = scenario.sensor.rate_hz
        self.clock = clock
        self.start_epoch = clock() if start_epoch is None else start_epoch
        seed = scenario.fleet.seed
        mine = set(fleet.configs)
        self.devices = [d for d in scenario.device_ids() if d in mine]
        n = len(self.devices)
        self.index = {d: i for i, d in enumerate(self.devices)}
        params = [DeviceParams.for_device(d, seed) for d in self.devices]
        self.params = params
        self.gain = np.array([p.gain for p in params], dtype=np.float64).reshape(n, 3)
        self.bias = np.array([p.bias for p in params], dtype=np.float64).reshape(n, 3)
        self.noise = np.array([p.noise for p in params], dtype=np.float64)
        self.rotation = np.array([p.rotation_hz for p in params], dtype=np.float64)
        # Fault signatures come from each device's own sensor model (same physics).
        self.sensors = [
            VibrationSensor(p, np.random.default_rng(derive_seed(seed, "fault", p.device_id)))
            for p in params
        ]
        self.rng = np.random.default_rng(derive_seed(seed, "feed", *self.devices[:1]))
        self.class_probs = scenario.sensor.class_probs()
        self.label_rate = scenario.sensor.label_rate
        # drift entries as (entry, member mask over this process's devices)
        self.drifts: list[tuple[DriftEntry, np.ndarray]] = []
        for e, targets in zip(scenario.drift, scenario.drift_targets(), strict=True):
            mask = np.zeros(n, dtype=bool)
            for d in targets:
                i = self.index.get(d)
                if i is not None:
                    mask[i] = True
            if mask.any():
                self.drifts.append((e, mask))
        self.stats = FeedStats()
        self._label_modes: dict[type, str] = {}
        self._time = np.arange(WINDOW_LEN) / SAMPLE_RATE_HZ
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ time

    def window_now(self) -> int:
        """The fleet window due now (``floor(elapsed * rate_hz)``)."""
        return max(0, int((self.clock() - self.start_epoch) * self.rate_hz))

    def effective(self, k: int) -> dict[str, np.ndarray]:
        """Sensor parameters of every device at window ``k``, drifts applied."""
        n = len(self.devices)
        gain = self.gain.copy()
        bias = self.bias.copy()
        noise = self.noise.copy()
        speed = self.rotation.copy()
        fault = np.full(n, -1, dtype=np.int64)
        level = np.zeros(n, dtype=np.float64)
        for e, mask in self.drifts:
            p = e.progress(k, self.rate_hz)
            if p <= 0.0:
                continue
            if e.kind == "gain":
                gain[mask] *= 1.0 + ((e.magnitude or 1.0) - 1.0) * p
            elif e.kind == "noise":
                noise[mask] *= 1.0 + ((e.magnitude or 1.0) - 1.0) * p
            elif e.kind == "speed":
                speed[mask] *= 1.0 + ((e.magnitude or 1.0) - 1.0) * p
            elif e.kind == "bias":
                bias[mask] += (e.magnitude or 0.0) * p
            else:
                fault[mask] = CLASS_NAMES.index(e.fault or "")
                level[mask] = p * (e.magnitude if e.magnitude is not None else 1.0)
        return {
            "gain": gain,
            "bias": bias,
            "noise": noise,
            "speed": speed,
            "fault": fault,
            "level": level,
        }

    # ------------------------------------------------------------------ windows

    def windows(self, k: int, rows: np.ndarray, asked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows (len(rows), WINDOW_LEN, 3) float32 of devices ``rows`` at window ``k``,
        asked classes ``asked``; returns the windows and their true labels."""
        eff = self.effective(k)
        rng = self.rng
        m = len(rows)
        t = self._time
        jitter = np.clip(rng.normal(0.0, SPEED_JITTER, size=m), -0.03, 0.03)
        f_rot = eff["speed"][rows] * (1.0 + jitter)
        theta = 2 * np.pi * f_rot[:, None] * t[None, :] + rng.uniform(0.0, 2 * np.pi, size=(m, 1))
        a1 = rng.uniform(0.03, 0.06, size=(m, 1))
        a2 = rng.uniform(0.01, 0.025, size=(m, 1))
        a3 = rng.uniform(0.003, 0.01, size=(m, 1))
        az = rng.uniform(0.01, 0.02, size=(m, 1))
        ph = rng.uniform(0.0, 2 * np.pi, size=(m, 3, 1))
        sig = np.empty((m, 3, WINDOW_LEN))
        two = 2 * theta
        sig[:, 0] = a1 * np.cos(theta) + a2 * np.cos(two + ph[:, 0]) + a3 * np.cos(3 * theta)
        sig[:, 1] = 0.9 * a1 * np.sin(theta) + a2 * np.sin(two + ph[:, 0])
        sig[:, 2] = az * np.cos(theta + ph[:, 1]) + 0.3 * a2 * np.cos(two + ph[:, 2])
        labels = asked.astype(np.int64).copy()
        fault = eff["fault"][rows]
        level = eff["level"][rows]
        for j in np.flatnonzero((asked != 0) | (fault >= 0)):
            sensor = self.sensors[int(rows[j])]
            if asked[j] != 0:
                sig[j] += sensor._fault_signal(int(asked[j]), 1.0, theta[j], float(f_rot[j]), t)
            if fault[j] >= 0 and fault[j] != asked[j]:
                sig[j] += sensor._fault_signal(
                    int(fault[j]), float(level[j]), theta[j], float(f_rot[j]), t
                )
            if fault[j] >= 0 and level[j] >= 0.5:
                labels[j] = fault[j]
        noise = rng.normal(0.0, 1.0, size=(m, 3, WINDOW_LEN)) * eff["noise"][rows, None, None]
        out = sig * eff["gain"][rows, :, None] + noise + eff["bias"][rows, :, None]
        np.clip(out, -FULL_SCALE_G, FULL_SCALE_G, out=out)
        return np.ascontiguousarray(out.transpose(0, 2, 1), dtype=np.float32), labels

    def step(self, k: int) -> int:
        """Window ``k`` for every serving device: generate, infer, feed labels; devices fed."""
        agents = self.fleet.agents
        rows = np.array(
            [
                i
                for i, d in enumerate(self.devices)
                if (a := agents.get(d)) is not None and a.serving is not None
            ],
            dtype=np.int64,
        )
        with self._lock:
            self.stats.ticks += 1
        if rows.size == 0:
            return 0
        asked = self.rng.choice(len(CLASS_NAMES), size=rows.size, p=self.class_probs)
        give = self.rng.random(rows.size) < self.label_rate
        windows, labels = self.windows(k, rows, asked)
        fed = 0
        for j, i in enumerate(rows):
            device = self.devices[int(i)]
            agent = agents.get(device)
            if agent is None:
                continue
            label = int(labels[j]) if give[j] else None
            try:
                p = self._infer(agent, windows[j], label)
            except self._no_model:
                continue
            except Exception:  # one device's failure is counted, never raised
                with self._lock:
                    self.stats.errors += 1
                continue
            fed += 1
            with self._lock:
                s = self.stats
                s.windows += 1
                s.inferences += 1
                s.correct += int(p.label == labels[j])
                s.per_device[device] = s.per_device.get(device, 0) + 1
                if p.label == labels[j]:
                    s.correct_per_device[device] = s.correct_per_device.get(device, 0) + 1
        return fed

    def _infer(self, agent: Any, window: np.ndarray, label: int | None) -> Any:
        """The agent's inference, with the true label when one is given (adapter: H1's API)."""
        if label is None:
            return agent.infer(window)
        mode = self._label_modes.get(type(agent))
        if mode is None:
            mode = self._label_modes[type(agent)] = _label_mode(agent)
        if mode == "infer":
            p = agent.infer(window, label=label)
        else:
            p = agent.infer(window)
            if mode == "add_label":
                agent.add_label(window, label)
        with self._lock:
            if mode == "none":
                self.stats.labels_unsupported += 1
            else:
                self.stats.labels_fed += 1
        return p

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sim-scenario", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        k = self.window_now()
        while not self._stop.is_set():
            due = self.start_epoch + k * period
            delay = due - self.clock()
            if delay > 0 and self._stop.wait(delay):
                return
            now_k = self.window_now()
            if now_k > k + 1:  # too late for some windows: skip them, do the current one
                with self._lock:
                    self.stats.late_ticks += now_k - k - 1
                k = now_k
            try:
                self.step(k)
            except Exception:
                _log.exception("scenario window %d failed", k)
            k += 1

    def counts(self, devices: list[str] | None = None) -> tuple[int, int]:
        """Inferences and correct ones so far, of ``devices`` (None: all of this feed's)."""
        with self._lock:
            s = self.stats
            if devices is None:
                return s.inferences, s.correct
            return (
                sum(s.per_device.get(d, 0) for d in devices),
                sum(s.correct_per_device.get(d, 0) for d in devices),
            )

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = self.stats.as_dict()
        out["window"] = self.window_now()
        out["drifts_active"] = [
            e.label(i)
            for i, (e, _m) in enumerate(self.drifts)
            if e.progress(out["window"], self.rate_hz) > 0
        ]
        return out
