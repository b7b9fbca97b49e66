"""Three-axis accelerometer on a rotating machine, for predictive maintenance.

A window is ``WINDOW_LEN`` samples at ``SAMPLE_RATE_HZ`` in g, columns x, y (radial)
and z (axial).  Every machine runs at its own speed and carries a small residual
imbalance, some 2x content and sensor noise; a fault adds its signature:

- ``imbalance``: a strong 1x (running speed) component, radial, x and y in quadrature;
- ``misalignment``: a strong 2x component, more 1x, and a large axial (z) 1x and 2x;
- ``bearing_fault``: impacts at the bearing's outer-race defect frequency (a fixed
  multiple of the running speed given by the bearing geometry), each ringing a
  structural resonance, with impact strength modulated by the rotating load.

Devices differ (``DeviceParams``: mounting gain per axis, noise, speed, resonance,
bias), drawn deterministically from the device id and a fleet seed, so a fleet is
non-IID.  ``Drift`` changes a sensor over time (gain, bias, noise, speed, a developing
fault), suddenly or along a ramp, counted in windows.  Everything is deterministic
given the seeds.  numpy only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from tinyfleet.agent.errors import ConfigError
from tinyfleet.agent.features import AXES, SAMPLE_RATE_HZ, WINDOW_LEN

__all__ = [
    "AXES",
    "CLASS_NAMES",
    "RESONANCE_HZ_RANGE",
    "ROTATION_HZ_RANGE",
    "SAMPLE_RATE_HZ",
    "WINDOW_LEN",
    "DeviceParams",
    "Drift",
    "VibrationSensor",
    "class_index",
    "derive_seed",
    "make_fleet_dataset",
]

CLASS_NAMES: tuple[str, ...] = ("normal", "imbalance", "misalignment", "bearing_fault")
"""Machine conditions, in label order."""

ROTATION_HZ_RANGE = (22.0, 30.0)
"""Nominal running speeds of a fleet (1320-1800 rpm: 4-pole motors under load)."""

RESONANCE_HZ_RANGE = (220.0, 380.0)
"""Structural resonance that bearing impacts excite."""

BPFO_RATIO_RANGE = (3.05, 3.65)
"""Outer-race defect frequency / running speed, set by the bearing geometry."""

SPEED_JITTER = 0.01
"""Relative standard deviation of the running speed from window to window (load)."""

FULL_SCALE_G = 16.0
"""The accelerometer clips at +-16 g."""


def derive_seed(seed: int, *parts: str) -> int:
    """A 64-bit seed derived from ``seed`` and labels (stable across runs and platforms)."""
    text = "\x00".join([str(int(seed)), *parts]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


def class_index(label: str | int) -> int:
    """Index of a class given by name or index; ``ConfigError`` if unknown."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < len(CLASS_NAMES):
            return int(label)
    elif isinstance(label, str) and label in CLASS_NAMES:
        return CLASS_NAMES.index(label)
    raise ConfigError(f"unknown vibration class {label!r} (known: {', '.join(CLASS_NAMES)})")


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


@dataclass(frozen=True)
class DeviceParams:
    """Physical parameters of one device: its machine, mounting and sensor."""

    device_id: str
    gain: tuple[float, float, float]
    """Mounting gain per axis (transmission path from bearing housing to sensor)."""
    noise: float
    """Sensor noise, g rms per axis."""
    rotation_hz: float
    """Nominal running speed."""
    resonance_hz: float
    """Structural resonance excited by bearing impacts."""
    bias: tuple[float, float, float]
    """Offset per axis in g (gravity lies along one radial axis, plus sensor offsets)."""
    bpfo_ratio: float = 3.58
    """Bearing outer-race defect frequency as a multiple of the running speed."""

    @classmethod
    def for_device(cls, device_id: str, seed: int) -> DeviceParams:
        """Parameters of ``device_id`` in the fleet generated from ``seed``."""
        rng = np.random.default_rng(derive_seed(seed, "params", device_id))
        gain = np.clip(rng.lognormal(0.0, 0.2, size=3), 0.6, 1.6)
        noise = float(rng.uniform(0.01, 0.04))
        rotation = float(rng.uniform(*ROTATION_HZ_RANGE))
        resonance = float(rng.uniform(*RESONANCE_HZ_RANGE))
        bias = rng.normal(0.0, 0.03, size=3)
        gravity_axis = int(rng.integers(0, 2))
        bias[gravity_axis] += 1.0 if rng.random() < 0.5 else -1.0
        bpfo = float(rng.uniform(*BPFO_RATIO_RANGE))
        return cls(
            device_id=device_id,
            gain=(float(gain[0]), float(gain[1]), float(gain[2])),
            noise=noise,
            rotation_hz=rotation,
            resonance_hz=resonance,
            bias=(float(bias[0]), float(bias[1]), float(bias[2])),
            bpfo_ratio=bpfo,
        )


@dataclass(frozen=True)
class Drift:
    """A change of a sensor over time, starting at window ``onset``.

    With ``ramp == 0`` the change is sudden: full from ``onset`` on.  Otherwise it grows
    linearly and is full ``ramp`` windows after ``onset``.  Factors multiply, offsets
    add; ``fault`` blends that fault's signature in with the same progress, and once
    it is at least half developed the window's true label is that fault.
    """

    gain_factor: float = 1.0
    bias_offset: float | tuple[float, float, float] = 0.0
    noise_factor: float = 1.0
    speed_factor: float = 1.0
    fault: str | None = None
    onset: int = 0
    ramp: int = 0

    def __post_init__(self) -> None:
        for name in ("gain_factor", "noise_factor", "speed_factor"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ConfigError(f"drift {name} must be a positive number; got {value!r}")
        if self.onset < 0 or self.ramp < 0:
            raise ConfigError(f"drift onset and ramp must be >= 0; got {self.onset}, {self.ramp}")
        if self.fault is not None and self.fault not in CLASS_NAMES[1:]:
            raise ConfigError(
                f"drift fault must be one of {', '.join(CLASS_NAMES[1:])}; got {self.fault!r}"
            )
        offsets = np.broadcast_to(np.asarray(self.bias_offset, dtype=np.float64), (3,))
        if not np.all(np.isfinite(offsets)):
            raise ConfigError(f"drift bias_offset must be finite; got {self.bias_offset!r}")

    def progress(self, t: int) -> float:
        """How far the drift has developed at window ``t``: 0 before onset, 1 when full."""
        if t < self.onset:
            return 0.0
        if self.ramp == 0:
            return 1.0
        return min(1.0, (t - self.onset + 1) / self.ramp)


@dataclass
class _Effective:
    gain: np.ndarray
    bias: np.ndarray
    noise: float
    rotation_hz: float
    fault: int | None
    fault_level: float


@dataclass
class VibrationSensor:
    """Generates windows for one device; ``t`` counts the windows generated so far."""

    params: DeviceParams
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    drift: Drift | None = None
    t: int = 0
    last_label: int | None = None
    """True label of the last window (differs from the asked one when a drift fault is on)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rng, np.random.Generator):
            self.rng = np.random.default_rng(self.rng)

    def _effective(self) -> _Effective:
        p = self.params
        gain = np.asarray(p.gain, dtype=np.float64)
        bias = np.asarray(p.bias, dtype=np.float64)
        noise, speed = p.noise, p.rotation_hz
        fault: int | None = None
        level = 0.0
        d = self.drift
        if d is not None:
            level = d.progress(self.t)
            gain = gain * (1.0 + (d.gain_factor - 1.0) * level)
            bias = bias + np.broadcast_to(np.asarray(d.bias_offset, dtype=np.float64), (3,)) * level
            noise = noise * (1.0 + (d.noise_factor - 1.0) * level)
            speed = speed * (1.0 + (d.speed_factor - 1.0) * level)
            if d.fault is not None and level > 0.0:
                fault = class_index(d.fault)
        return _Effective(gain, bias, noise, speed, fault, level)

    def _fault_signal(
        self, cls: int, level: float, theta: np.ndarray, f_rot: float, time: np.ndarray
    ) -> np.ndarray:
        """Signature of fault ``cls`` at strength ``level`` (0..1), shape (3, samples)."""
        rng = self.rng
        sig = np.zeros((3, time.size))
        if cls == 1:  # imbalance: 1x, radial, quadrature
            amp = level * _log_uniform(rng, 0.08, 0.5)
            phase = rng.uniform(0.0, 2 * np.pi)
            sig[0] += amp * np.cos(theta + phase)
            sig[1] += 0.9 * amp * np.sin(theta + phase)
            sig[2] += 0.05 * amp * np.cos(theta + phase)
        elif cls == 2:  # misalignment: 2x radial, 1x more, strong axial 1x and 2x
            severity = level * _log_uniform(rng, 0.3, 1.0)
            a2 = severity * rng.uniform(0.2, 0.35)
            a1 = severity * rng.uniform(0.04, 0.1)
            ax1 = severity * rng.uniform(0.1, 0.3)
            ax2 = severity * rng.uniform(0.06, 0.2)
            ph = rng.uniform(0.0, 2 * np.pi, size=4)
            sig[0] += a2 * np.cos(2 * theta + ph[0]) + a1 * np.cos(theta + ph[1])
            sig[1] += a2 * np.sin(2 * theta + ph[0]) + a1 * np.sin(theta + ph[1])
            sig[2] += ax1 * np.cos(theta + ph[2]) + ax2 * np.cos(2 * theta + ph[3])
        elif cls == 3:  # bearing outer race: impacts ringing the resonance, load-modulated
            p = self.params
            amp = level * _log_uniform(rng, 0.08, 1.0)
            f_defect = p.bpfo_ratio * f_rot
            period = 1.0 / f_defect
            damping = 0.05
            f_res = p.resonance_hz * (1.0 + rng.normal(0.0, 0.01))
            decay = 2 * np.pi * f_res * damping
            start = -5.0 / decay  # impacts before the window still ring into it
            first = start + rng.uniform(0.0, period)
            n_imp = int(np.ceil((time[-1] - first) / period)) + 1
            k = np.arange(n_imp)
            times = first + k * period * (1.0 + rng.normal(0.0, 0.005, size=n_imp))
            mod_phase = rng.uniform(0.0, 2 * np.pi)
            strength = amp * (1.0 + 0.5 * np.cos(2 * np.pi * f_rot * times + mod_phase))
            strength *= rng.uniform(0.8, 1.2, size=n_imp)
            tau = time[None, :] - times[:, None]
            ring = np.where(
                tau >= 0.0,
                np.exp(-decay * np.maximum(tau, 0.0)) * np.sin(2 * np.pi * f_res * tau),
                0.0,
            )
            response = strength @ ring
            sig[0] += response
            sig[1] += 0.7 * response
            sig[2] += 0.3 * response
        return sig

    def window(self, label: str | int = "normal") -> np.ndarray:
        """One window of condition ``label``: float32 (WINDOW_LEN, 3); advances ``t``."""
        cls = class_index(label)
        eff = self._effective()
        rng = self.rng
        time = np.arange(WINDOW_LEN) / SAMPLE_RATE_HZ
        f_rot = eff.rotation_hz * (1.0 + float(np.clip(rng.normal(0.0, SPEED_JITTER), -0.03, 0.03)))
        theta = 2 * np.pi * f_rot * time + rng.uniform(0.0, 2 * np.pi)

        sig = np.zeros((3, WINDOW_LEN))
        # Every machine: residual imbalance, a little 2x and 3x, a little axial 1x.
        a1 = rng.uniform(0.03, 0.06)
        a2 = rng.uniform(0.01, 0.025)
        a3 = rng.uniform(0.003, 0.01)
        ph = rng.uniform(0.0, 2 * np.pi, size=3)
        sig[0] += a1 * np.cos(theta) + a2 * np.cos(2 * theta + ph[0]) + a3 * np.cos(3 * theta)
        sig[1] += 0.9 * a1 * np.sin(theta) + a2 * np.sin(2 * theta + ph[0])
        sig[2] += rng.uniform(0.01, 0.02) * np.cos(theta + ph[1]) + 0.3 * a2 * np.cos(
            2 * theta + ph[2]
        )
        if cls != 0:
            sig += self._fault_signal(cls, 1.0, theta, f_rot, time)
        true_cls = cls
        if eff.fault is not None:
            if eff.fault != cls:
                sig += self._fault_signal(eff.fault, eff.fault_level, theta, f_rot, time)
            if eff.fault_level >= 0.5:
                true_cls = eff.fault

        noise = rng.normal(0.0, eff.noise, size=(3, WINDOW_LEN))
        out = sig * eff.gain[:, None] + noise + eff.bias[:, None]
        out = np.clip(out, -FULL_SCALE_G, FULL_SCALE_G)
        self.t += 1
        self.last_label = true_cls
        return np.ascontiguousarray(out.T, dtype=np.float32)

    def sample(
        self, n: int, class_probs: np.ndarray | list[float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` windows with labels drawn from ``class_probs`` (uniform by default).

        Returns windows float32 (n, WINDOW_LEN, 3) and true labels int64 (n,).
        """
        if n < 0:
            raise ConfigError(f"window count must be >= 0; got {n}")
        probs = None
        if class_probs is not None:
            probs = np.asarray(class_probs, dtype=np.float64)
            if probs.shape != (len(CLASS_NAMES),) or np.any(probs < 0) or probs.sum() <= 0:
                raise ConfigError(
                    f"class_probs must be {len(CLASS_NAMES)} non-negative numbers; got {class_probs!r}"
                )
            probs = probs / probs.sum()
        asked = self.rng.choice(len(CLASS_NAMES), size=n, p=probs)
        windows = np.empty((n, WINDOW_LEN, 3), dtype=np.float32)
        labels = np.empty(n, dtype=np.int64)
        for i, c in enumerate(asked):
            windows[i] = self.window(int(c))
            labels[i] = self.last_label if self.last_label is not None else int(c)
        return windows, labels


def make_fleet_dataset(
    device_ids: list[str] | tuple[str, ...], windows_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced windows of every class from every device, without drift.

    Returns windows float32 (n, WINDOW_LEN, 3), labels int64 (n,) and device_index
    int64 (n,) into ``device_ids``; ordered by device, then class.
    """
    if windows_per_class < 1:
        raise ConfigError(f"windows_per_class must be >= 1; got {windows_per_class}")
    n = len(device_ids) * len(CLASS_NAMES) * windows_per_class
    windows = np.empty((n, WINDOW_LEN, 3), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    device_index = np.empty(n, dtype=np.int64)
    i = 0
    for d, device_id in enumerate(device_ids):
        params = DeviceParams.for_device(device_id, seed)
        sensor = VibrationSensor(
            params, np.random.default_rng(derive_seed(seed, "data", device_id))
        )
        for c in range(len(CLASS_NAMES)):
            for _ in range(windows_per_class):
                windows[i] = sensor.window(c)
                labels[i] = c
                device_index[i] = d
                i += 1
    return windows, labels, device_index
