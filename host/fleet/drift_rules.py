"""Drift alert rules: a pure engine over ``DriftReport`` windows (no MQTT, no database).

The ``DriftMonitor`` (``host/fleet/drift.py``) feeds every accepted report through a
``RuleEngine`` and persists what it decides; the detection benchmark drives the same
engine directly.  Per device, the engine keeps a rolling state for the model version
it serves:

* a **baseline** of its own per-feature scores, taken over its first
  ``baseline_windows`` windows on that version.  Devices are not alike (every machine
  has its own speed, gain, resonance), so a clean device already differs from the
  fleet-wide reference profile: its PSI against the reference is typically 1-4, far
  above any textbook threshold (0.25).  What a drift changes is the device's scores
  *relative to what they were*;
* per rule, the outcome of the last ``m`` windows.  A rule **fires** when at least
  ``k`` of them exceed its threshold; an open alert **clears** after ``clear_after``
  consecutive windows below it.

Statistics (``Statistic``):

* ``ks_shift``: the largest change of a feature's KS statistic from the device's
  baseline, in units of its baseline spread: ``max_j |ks_j - mu_j| / sqrt(sd_j^2 +
  floor^2)``; ``psi_shift`` likewise on PSI.  ``0`` while the baseline is being taken.
  ``j`` runs over every entry of the report: the model's features and, with a monitored
  profile, the sensor stats after them (their ``ks`` is one-sided, ``drift_stats``);
  on the benchmark's clean windows the sensor stats' part stays below 1.31, the
  features' below 2.72 (docs/drift.md);
* ``psi_max``, ``ks_max``: the largest per-feature score against the reference,
  absolute (for fleets whose devices do resemble the reference);
* ``js_prediction``: Jensen-Shannon distance of the window's prediction mix;
* ``confidence_drop``: ``-confidence_shift`` (mean confidence below the reference's);
* ``confidence_drop_shift``: the drop of mean confidence from the device's baseline.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # host settings import this module: keep it light
    from tinyfleet.agent.protocol import DriftReport

__all__ = [
    "STATISTICS",
    "Baseline",
    "DeviceState",
    "DriftSettings",
    "RetrainSettings",
    "RuleEngine",
    "RuleSpec",
    "Statistic",
    "Transition",
    "WebhookSettings",
    "window_statistics",
]

Statistic = Literal[
    "ks_shift",
    "psi_shift",
    "psi_max",
    "ks_max",
    "js_prediction",
    "confidence_drop",
    "confidence_drop_shift",
]
STATISTICS: tuple[str, ...] = (
    "ks_shift",
    "psi_shift",
    "psi_max",
    "ks_max",
    "js_prediction",
    "confidence_drop",
    "confidence_drop_shift",
)
_RELATIVE = ("ks_shift", "psi_shift", "confidence_drop_shift")

RuleName = str


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleSpec(_Strict):
    """One alert rule: ``statistic`` above ``threshold`` on ``k`` of the last ``m`` windows."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    statistic: Statistic
    threshold: float = Field(allow_inf_nan=False)
    k: int = Field(2, ge=1, le=100)
    m: int = Field(3, ge=1, le=100)
    clear_after: int = Field(3, ge=1, le=1000)
    """Consecutive windows at or below the threshold that clear an open alert."""

    @model_validator(mode="after")
    def _k_le_m(self) -> RuleSpec:
        if self.k > self.m:
            raise ValueError(f"rule {self.name}: k ({self.k}) is larger than m ({self.m})")
        return self


def _default_rules() -> list[RuleSpec]:
    # Thresholds from bench/drift.py (see docs/drift.md): windows of 200 inferences,
    # 8 baseline windows, 100+ simulated devices, no false alarm in >= 1,000 clean windows.
    return [
        RuleSpec(name="ks_shift", statistic="ks_shift", threshold=3.0, k=2, m=3, clear_after=3),
        RuleSpec(
            name="confidence_drop",
            statistic="confidence_drop",
            threshold=0.15,
            k=2,
            m=3,
            clear_after=3,
        ),
    ]


class WebhookSettings(_Strict):
    """Where alerts are POSTed as JSON (off unless ``url`` is set)."""

    url: str | None = Field(None, pattern=r"^https?://[^\s]{1,2000}$")
    timeout_s: float = Field(5.0, gt=0, le=120)
    max_attempts: int = Field(6, ge=1, le=100)
    backoff_base_s: float = Field(0.5, gt=0, le=60)
    backoff_cap_s: float = Field(60.0, gt=0, le=3600)
    queue_max: int = Field(1000, ge=1, le=1_000_000)
    bearer_token: str | None = Field(None, max_length=4096)


class RetrainSettings(_Strict):
    """When sustained drift on a cohort starts a federated retraining run."""

    enabled: bool = True
    min_devices: int = Field(3, ge=1)
    min_fraction: float = Field(0.2, ge=0.0, le=1.0)
    sustained_windows: int = Field(3, ge=1, le=10_000)
    """A device counts once its alert has been open for this many windows."""
    cooldown_s: float = Field(6 * 3600.0, ge=0.0)
    decision_interval_s: float = Field(60.0, ge=0.0)
    """A repeated 'too few devices' or 'cooldown' decision is recorded at most this often."""


class DriftSettings(_Strict):
    """The ``[drift]`` section of ``host.toml``."""

    enabled: bool = True
    baseline_windows: int = Field(8, ge=2, le=10_000)
    """Windows per device and version that make its baseline (relative statistics)."""
    shift_floor_ks: float = Field(0.03, gt=0.0, le=1.0)
    shift_floor_psi: float = Field(0.05, gt=0.0, le=100.0)
    shift_floor_confidence: float = Field(0.01, gt=0.0, le=1.0)
    floor_samples: int = Field(200, ge=1, le=1_000_000)
    """Window size the floors are given for.  A window of n samples scales them as its
    sampling noise does: KS and mean confidence by sqrt(floor_samples / n), PSI by
    floor_samples / n; so the thresholds keep their false-alarm rate at any window."""
    rules: list[RuleSpec] = Field(default_factory=_default_rules, max_length=32)
    cohort_fraction: float = Field(0.3, gt=0.0, le=1.0)
    """A cohort alert opens when this share of the cohort's devices has an open alert."""
    cohort_min_devices: int = Field(2, ge=1)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    mqtt_events: bool = True

    @model_validator(mode="after")
    def _unique_names(self) -> DriftSettings:
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        if "cohort" in names:
            raise ValueError("'cohort' is reserved for cohort alerts")
        return self


# ---------------------------------------------------------------- per-device state


@dataclass
class Baseline:
    """Running sums of a device's per-feature scores over its first windows."""

    n: int = 0
    ks_sum: list[float] = field(default_factory=list)
    ks_sq: list[float] = field(default_factory=list)
    psi_sum: list[float] = field(default_factory=list)
    psi_sq: list[float] = field(default_factory=list)
    conf_sum: float = 0.0
    conf_sq: float = 0.0

    def add(self, report: DriftReport) -> None:
        if self.n == 0:
            f = len(report.ks)
            self.ks_sum, self.ks_sq = [0.0] * f, [0.0] * f
            self.psi_sum, self.psi_sq = [0.0] * f, [0.0] * f
        for j, v in enumerate(report.ks):
            self.ks_sum[j] += v
            self.ks_sq[j] += v * v
        for j, v in enumerate(report.psi):
            self.psi_sum[j] += v
            self.psi_sq[j] += v * v
        c = report.mean_confidence
        self.conf_sum += c
        self.conf_sq += c * c
        self.n += 1

    @staticmethod
    def _mean_sd(s: float, sq: float, n: int) -> tuple[float, float]:
        mean = s / n
        var = (sq - n * mean * mean) / (n - 1) if n > 1 else 0.0
        return mean, math.sqrt(max(var, 0.0))

    def shift(
        self, values: list[float], sums: list[float], sqs: list[float], floor: float
    ) -> float:
        best = 0.0
        for v, s, sq in zip(values, sums, sqs, strict=True):
            mean, sd = self._mean_sd(s, sq, self.n)
            best = max(best, abs(v - mean) / math.sqrt(sd * sd + floor * floor))
        return best

    def confidence_drop(self, value: float, floor: float) -> float:
        mean, sd = self._mean_sd(self.conf_sum, self.conf_sq, self.n)
        return (mean - value) / math.sqrt(sd * sd + floor * floor)

    def to_json(self) -> dict[str, object]:
        return {
            "n": self.n,
            "ks_sum": self.ks_sum,
            "ks_sq": self.ks_sq,
            "psi_sum": self.psi_sum,
            "psi_sq": self.psi_sq,
            "conf_sum": self.conf_sum,
            "conf_sq": self.conf_sq,
        }

    @classmethod
    def from_json(cls, data: object) -> Baseline | None:
        if not isinstance(data, dict):
            return None
        try:
            b = cls(
                n=int(data["n"]),
                ks_sum=[float(v) for v in data["ks_sum"]],
                ks_sq=[float(v) for v in data["ks_sq"]],
                psi_sum=[float(v) for v in data["psi_sum"]],
                psi_sq=[float(v) for v in data["psi_sq"]],
                conf_sum=float(data["conf_sum"]),
                conf_sq=float(data["conf_sq"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return b if b.n >= 0 else None


def window_statistics(
    report: DriftReport, baseline: Baseline | None, settings: DriftSettings
) -> dict[str, float]:
    """Every statistic of one window (relative ones are 0 without a complete baseline)."""
    ready = baseline is not None and baseline.n >= settings.baseline_windows
    stats = {
        "psi_max": max(report.psi, default=0.0),
        "ks_max": max(report.ks, default=0.0),
        "js_prediction": report.js_prediction,
        "confidence_drop": -report.confidence_shift,
        "ks_shift": 0.0,
        "psi_shift": 0.0,
        "confidence_drop_shift": 0.0,
    }
    if ready and baseline is not None and len(baseline.ks_sum) == len(report.ks):
        ratio = settings.floor_samples / report.n
        stats["ks_shift"] = baseline.shift(
            list(report.ks),
            baseline.ks_sum,
            baseline.ks_sq,
            settings.shift_floor_ks * math.sqrt(ratio),
        )
        stats["psi_shift"] = baseline.shift(
            list(report.psi), baseline.psi_sum, baseline.psi_sq, settings.shift_floor_psi * ratio
        )
        stats["confidence_drop_shift"] = baseline.confidence_drop(
            report.mean_confidence, settings.shift_floor_confidence * math.sqrt(ratio)
        )
    return stats


@dataclass
class RuleState:
    hits: deque[bool]
    open: bool = False
    clean_streak: int = 0
    windows: int = 0
    """Windows the alert has been open (0 when closed)."""
    last_value: float = 0.0


@dataclass
class DeviceState:
    """What the engine keeps for one device on one model version."""

    model: str
    version: int
    session: int = 0
    window: int = -1
    windows_seen: int = 0
    baseline: Baseline = field(default_factory=Baseline)
    rules: dict[RuleName, RuleState] = field(default_factory=dict)
    last_stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Transition:
    """An alert that opened, stayed open (``ongoing``) or cleared on one window."""

    kind: Literal["opened", "cleared", "ongoing"]
    device: str
    rule: str
    value: float
    windows: int
    model: str
    version: int
    window: int
    reason: str = ""


class RuleEngine:
    """Per-device rolling rule state; ``observe`` one report at a time."""

    def __init__(self, settings: DriftSettings) -> None:
        self.settings = settings
        self.devices: dict[str, DeviceState] = {}
        self.out_of_order = 0

    def state(self, device: str) -> DeviceState | None:
        return self.devices.get(device)

    def restore(
        self,
        device: str,
        model: str,
        version: int,
        *,
        session: int,
        window: int,
        baseline: Baseline | None,
        open_rules: dict[str, int],
        windows_seen: int = 0,
    ) -> None:
        """Recreate a device's state after a restart (baseline and open alerts; the
        k-of-m history starts empty)."""
        st = DeviceState(model, version, session=session, window=window)
        st.windows_seen = windows_seen
        if baseline is not None:
            st.baseline = baseline
            st.windows_seen = max(windows_seen, baseline.n)
        for spec in self.settings.rules:
            rs = RuleState(hits=deque(maxlen=spec.m))
            if spec.name in open_rules:
                rs.open = True
                rs.windows = open_rules[spec.name]
            st.rules[spec.name] = rs
        self.devices[device] = st

    def observe(self, device: str, report: DriftReport) -> list[Transition]:
        """Feed one window; the alerts it opens or clears (and those that stay open)."""
        out: list[Transition] = []
        st = self.devices.get(device)
        if st is None or (st.model, st.version) != (report.model, report.version):
            if st is not None:
                out.extend(self._close_all(device, st, report, "model version changed"))
            st = DeviceState(report.model, report.version)
            st.rules = {s.name: RuleState(hits=deque(maxlen=s.m)) for s in self.settings.rules}
            self.devices[device] = st
        elif (report.session, report.window) <= (st.session, st.window):
            self.out_of_order += 1
            return out
        st.session, st.window = report.session, report.window
        stats = window_statistics(report, st.baseline, self.settings)
        st.last_stats = stats
        st.windows_seen += 1
        if st.baseline.n < self.settings.baseline_windows:
            st.baseline.add(report)
        baseline_ready = st.baseline.n >= self.settings.baseline_windows
        for spec in self.settings.rules:
            rs = st.rules.setdefault(spec.name, RuleState(hits=deque(maxlen=spec.m)))
            if spec.statistic in _RELATIVE and not baseline_ready:
                continue  # nothing to compare with yet
            value = stats[spec.statistic]
            hit = value > spec.threshold
            rs.hits.append(hit)
            rs.last_value = value
            if rs.open:
                rs.windows += 1
                rs.clean_streak = 0 if hit else rs.clean_streak + 1
                if rs.clean_streak >= spec.clear_after:
                    out.append(self._t("cleared", device, spec.name, value, rs.windows, report))
                    rs.open, rs.windows, rs.clean_streak = False, 0, 0
                    rs.hits.clear()
                else:
                    out.append(self._t("ongoing", device, spec.name, value, rs.windows, report))
            elif sum(rs.hits) >= spec.k:
                rs.open, rs.windows, rs.clean_streak = True, 1, 0
                out.append(self._t("opened", device, spec.name, value, 1, report))
        return out

    def forget(self, device: str) -> None:
        self.devices.pop(device, None)

    def _close_all(
        self, device: str, st: DeviceState, report: DriftReport, reason: str
    ) -> list[Transition]:
        out = []
        for name, rs in st.rules.items():
            if rs.open:
                out.append(
                    Transition(
                        "cleared",
                        device,
                        name,
                        rs.last_value,
                        rs.windows,
                        st.model,
                        st.version,
                        report.window,
                        reason,
                    )
                )
        return out

    @staticmethod
    def _t(
        kind: Literal["opened", "cleared", "ongoing"],
        device: str,
        rule: str,
        value: float,
        windows: int,
        report: DriftReport,
    ) -> Transition:
        return Transition(
            kind, device, rule, float(value), windows, report.model, report.version, report.window
        )
