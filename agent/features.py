"""Feature pipelines that the host (training) and the device (inference) both run.

A pipeline maps a batch of raw inputs to the model's input features.  The manifest
names the pipeline (``preprocess``); the agent picks it from ``FEATURE_PIPELINES``.

``vibration-v1`` turns a three-axis accelerometer window (``WINDOW_LEN`` samples at
``SAMPLE_RATE_HZ``; x and y radial, z axial) into ``len(FEATURE_NAMES)`` numbers that
are insensitive to the mounting gain and the rotation speed of a machine: shape
statistics (crest factor, kurtosis), spectral energies in bands placed at multiples of
the rotation frequency estimated from the window itself, their ratios, and envelope
statistics of the high-frequency band where bearing impacts ring.  Only the per-axis
RMS carries the absolute level.  Each column is centred and scaled by fixed constants
(``FEATURE_CENTER``, ``FEATURE_SCALE``) so all columns share one range.  Everything is
computed row by row along the last axis, so one window gives bit-for-bit the same
features alone or inside a batch.

numpy only: this module runs on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tinyfleet.agent.errors import ConfigError

__all__ = [
    "AXES",
    "FEATURE_CENTER",
    "FEATURE_NAMES",
    "FEATURE_PIPELINES",
    "FEATURE_SCALE",
    "MONITORS",
    "ROTATION_SEARCH_HZ",
    "SAMPLE_RATE_HZ",
    "VIBRATION_MONITOR_NAMES",
    "WINDOW_LEN",
    "FeaturePipeline",
    "Monitor",
    "estimate_rotation_hz",
    "get_monitor",
    "get_pipeline",
    "identity_features",
    "vibration_features",
    "vibration_features_and_stats",
    "vibration_features_batch",
    "vibration_sensor_stats",
]

SAMPLE_RATE_HZ = 1000.0
"""Accelerometer sample rate the vibration pipeline assumes."""

WINDOW_LEN = 512
"""Samples per window (0.512 s at ``SAMPLE_RATE_HZ``; 1.95 Hz per FFT bin)."""

AXES = ("x", "y", "z")
"""Axis order of a window's columns: x and y radial, z axial."""

ROTATION_SEARCH_HZ = (15.0, 40.0)
"""Band searched for the 1x (running speed) peak of the radial spectrum."""

MIN_WINDOW_LEN = 128
"""Shortest window the pipeline accepts."""

_EPS = 1e-12
_HARMONIC_HALF_WIDTH = 0.3  # band around h * f1 is h * f1 +- 0.3 * f1
_HF_CUTOFF = 7.0  # high-frequency band starts at 7 * f1 (above running-speed harmonics)
_ENV_PEAK_BAND = (2.6, 4.2)  # bearing defect frequencies, in multiples of f1
_ENV_REF_BAND = (1.0, 10.0)  # envelope spectrum reference band, in multiples of f1

# (name, centre, scale): each feature is reported as (value - centre) / scale.  The
# constants are fixed (the fleet-wide mean and standard deviation of the simulated
# sensor, two significant digits) and part of the pipeline's definition: every column
# then has a similar range, which an int8 input tensor (one scale for all columns) needs.
_FEATURES: tuple[tuple[str, float, float], ...] = (
    ("log_rms_x", -0.96, 0.31),
    ("log_rms_y", -1.0, 0.29),
    ("log_rms_z", -1.3, 0.29),
    ("log_crest_x", 0.39, 0.11),
    ("log_crest_y", 0.4, 0.1),
    ("log_crest_z", 0.47, 0.076),
    ("log_kurtosis_x", 0.35, 0.11),
    ("log_kurtosis_y", 0.35, 0.11),
    ("log_kurtosis_z", 0.43, 0.067),
    ("log_frac_radial_1x", -0.75, 0.67),
    ("log_frac_radial_2x", -1.4, 0.84),
    ("log_frac_radial_3x_5x", -2.1, 0.56),
    ("log_frac_axial_1x", -1.8, 0.82),
    ("log_frac_axial_2x", -2.4, 0.89),
    ("log_ratio_radial_2x_1x", -0.63, 1.1),
    ("log_ratio_axial_radial_1x", -1.1, 1.1),
    ("log_ratio_axial_radial_2x", -1.0, 0.31),
    ("log_frac_high_freq", -0.96, 0.74),
    ("log_envelope_peak", 0.74, 0.25),
    ("envelope_modulation", 0.36, 0.093),
    ("centroid_over_1x", 4.6, 3.4),
)

FEATURE_NAMES: list[str] = [name for name, _, _ in _FEATURES]
"""Names of the ``vibration-v1`` features, in column order."""

FEATURE_CENTER = np.array([c for _, c, _ in _FEATURES], dtype=np.float64)
"""Subtracted from each raw feature (see ``FEATURE_SCALE``)."""

FEATURE_SCALE = np.array([s for _, _, s in _FEATURES], dtype=np.float64)
"""Divides each centred feature: a raw value is ``feature * FEATURE_SCALE + FEATURE_CENTER``."""

FeaturePipeline = Callable[[np.ndarray], np.ndarray]


def _log10(x: np.ndarray) -> np.ndarray:
    return np.log10(np.maximum(x, _EPS))


def _check_windows(windows: np.ndarray) -> np.ndarray:
    x = np.asarray(windows)
    if x.ndim != 3 or x.shape[2] != len(AXES):
        raise ConfigError(
            f"vibration windows must have shape (n, window_len, {len(AXES)}); got {x.shape}"
        )
    if x.shape[1] < MIN_WINDOW_LEN:
        raise ConfigError(
            f"vibration windows need at least {MIN_WINDOW_LEN} samples; got {x.shape[1]}"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise ConfigError(f"vibration windows must be numeric; got dtype {x.dtype}")
    # (n, axes, samples), contiguous: every reduction below runs along the last axis.
    return np.ascontiguousarray(x.transpose(0, 2, 1), dtype=np.float64)


def _rotation_hz(radial_power: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """1x frequency per row: radial power peak in ``ROTATION_SEARCH_HZ``, interpolated."""
    lo = int(np.searchsorted(freqs, ROTATION_SEARCH_HZ[0], side="left"))
    hi = int(np.searchsorted(freqs, ROTATION_SEARCH_HZ[1], side="right"))
    lo = max(lo, 1)
    k = lo + np.argmax(radial_power[:, lo:hi], axis=1)
    rows = np.arange(radial_power.shape[0])
    a = np.log(radial_power[rows, k - 1] + _EPS)
    b = np.log(radial_power[rows, k] + _EPS)
    c = np.log(radial_power[rows, k + 1] + _EPS)
    denom = a - 2.0 * b + c
    safe = np.where(np.abs(denom) > _EPS, denom, 1.0)
    delta = np.where(np.abs(denom) > _EPS, 0.5 * (a - c) / safe, 0.0)
    delta = np.clip(delta, -0.5, 0.5)
    df = freqs[1] - freqs[0]
    result: np.ndarray = (k + delta) * df
    return result


def _band_sum(power: np.ndarray, freqs: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Sum of ``power`` (n, k) over ``lo[i] <= f <= hi[i]`` for each row i."""
    mask = (freqs[None, :] >= lo[:, None]) & (freqs[None, :] <= hi[:, None])
    result: np.ndarray = np.sum(np.where(mask, power, 0.0), axis=1)
    return result


def _harmonic_energy(
    power: np.ndarray, freqs: np.ndarray, f1: np.ndarray, harmonics: tuple[int, ...]
) -> np.ndarray:
    total = np.zeros(power.shape[0])
    for h in harmonics:
        total = total + _band_sum(
            power, freqs, (h - _HARMONIC_HALF_WIDTH) * f1, (h + _HARMONIC_HALF_WIDTH) * f1
        )
    return total


def _spectra(
    x: np.ndarray, sample_rate_hz: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hann-windowed power spectra: (freqs, radial (n, k), axial (n, k), f1 (n,))."""
    n_samples = x.shape[-1]
    hann = np.hanning(n_samples)
    spec = np.fft.rfft(x * hann, axis=-1)
    power = spec.real**2 + spec.imag**2  # (n, axes, k)
    freqs = np.fft.rfftfreq(n_samples, d=1.0 / sample_rate_hz)
    radial = power[:, 0, :] + power[:, 1, :]
    axial = power[:, 2, :]
    return freqs, radial, axial, _rotation_hz(radial, freqs)


def estimate_rotation_hz(windows: np.ndarray, sample_rate_hz: float = SAMPLE_RATE_HZ) -> np.ndarray:
    """Running speed (Hz) estimated from each window's radial spectrum, shape (n,)."""
    x = _check_windows(windows)
    x = x - np.mean(x, axis=-1, keepdims=True)
    return _spectra(x, sample_rate_hz)[3]


def _envelope_features(
    x: np.ndarray, freqs: np.ndarray, f1: np.ndarray, sample_rate_hz: float
) -> tuple[np.ndarray, np.ndarray]:
    """Peak prominence of the envelope spectrum at bearing defect rates, and modulation."""
    n_samples = x.shape[-1]
    spec = np.fft.rfft(x, axis=-1)  # (n, axes, k)
    keep = freqs[None, :] >= (_HF_CUTOFF * f1)[:, None]  # (n, k)
    weights = np.where(keep, 2.0, 0.0)
    if n_samples % 2 == 0:
        weights[:, -1] = np.where(keep[:, -1], 1.0, 0.0)
    analytic_spec = np.zeros((x.shape[0], x.shape[1], n_samples), dtype=np.complex128)
    analytic_spec[:, :, : freqs.size] = spec * weights[:, None, :]
    analytic = np.fft.ifft(analytic_spec, axis=-1)
    mag = analytic.real**2 + analytic.imag**2  # (n, axes, samples)
    energy = mag[:, 0, :] + mag[:, 1, :] + mag[:, 2, :]
    envelope = np.sqrt(energy)
    env_mean = np.mean(envelope, axis=-1)
    env_std = np.std(envelope, axis=-1)
    modulation = env_std / (env_mean + _EPS)

    env_spec = np.fft.rfft(envelope - env_mean[:, None], axis=-1)
    env_power = env_spec.real**2 + env_spec.imag**2
    env_freqs = np.fft.rfftfreq(n_samples, d=1.0 / sample_rate_hz)
    peak_mask = (env_freqs[None, :] >= (_ENV_PEAK_BAND[0] * f1)[:, None]) & (
        env_freqs[None, :] <= (_ENV_PEAK_BAND[1] * f1)[:, None]
    )
    ref_mask = (env_freqs[None, :] >= (_ENV_REF_BAND[0] * f1)[:, None]) & (
        env_freqs[None, :] <= (_ENV_REF_BAND[1] * f1)[:, None]
    )
    peak = np.max(np.where(peak_mask, env_power, 0.0), axis=-1)
    ref = np.sum(np.where(ref_mask, env_power, 0.0), axis=-1) / np.maximum(
        np.sum(ref_mask, axis=-1), 1
    )
    return _log10(peak / (ref + _EPS) + _EPS), modulation


def _vibration(windows: np.ndarray, sample_rate_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """One pass over windows (n, window_len, 3): ``vibration-v1`` features and sensor stats."""
    x = _check_windows(windows)
    mean = np.mean(x, axis=-1, keepdims=True)  # (n, axes, 1): the bias (gravity, offsets)
    x = x - mean  # the features never see it

    ms = np.mean(x**2, axis=-1)  # (n, axes)
    rms = np.sqrt(ms)
    peak = np.max(np.abs(x), axis=-1)
    crest = peak / (rms + _EPS)
    kurtosis = np.mean(x**4, axis=-1) / (ms**2 + _EPS)

    freqs, radial, axial, f1 = _spectra(x, sample_rate_hz)
    total = np.sum(radial, axis=-1) + np.sum(axial, axis=-1) + _EPS
    r1 = _harmonic_energy(radial, freqs, f1, (1,))
    r2 = _harmonic_energy(radial, freqs, f1, (2,))
    r35 = _harmonic_energy(radial, freqs, f1, (3, 4, 5))
    a1 = _harmonic_energy(axial, freqs, f1, (1,))
    a2 = _harmonic_energy(axial, freqs, f1, (2,))
    high = _band_sum(radial + axial, freqs, _HF_CUTOFF * f1, np.full_like(f1, np.inf))
    centroid = np.sum((radial + axial) * freqs, axis=-1) / total

    env_peak, modulation = _envelope_features(x, freqs, f1, sample_rate_hz)

    columns = [
        _log10(rms[:, 0]),
        _log10(rms[:, 1]),
        _log10(rms[:, 2]),
        _log10(crest[:, 0]),
        _log10(crest[:, 1]),
        _log10(crest[:, 2]),
        _log10(kurtosis[:, 0]),
        _log10(kurtosis[:, 1]),
        _log10(kurtosis[:, 2]),
        _log10(r1 / total),
        _log10(r2 / total),
        _log10(r35 / total),
        _log10(a1 / total),
        _log10(a2 / total),
        _log10((r2 + _EPS) / (r1 + _EPS)),
        _log10((a1 + _EPS) / (r1 + _EPS)),
        _log10((a2 + _EPS) / (r2 + _EPS)),
        _log10(high / total),
        env_peak,
        modulation,
        centroid / f1,
    ]
    raw = np.stack(columns, axis=-1)
    features = ((raw - FEATURE_CENTER) / FEATURE_SCALE).astype(np.float32)
    stats = np.concatenate([mean[:, :, 0], f1[:, None]], axis=-1).astype(np.float32)
    return features, stats


def vibration_features_batch(
    windows: np.ndarray, sample_rate_hz: float = SAMPLE_RATE_HZ
) -> np.ndarray:
    """``vibration-v1`` features of windows shaped (n, window_len, 3): float32 (n, F)."""
    return _vibration(windows, sample_rate_hz)[0]


def vibration_features_and_stats(
    windows: np.ndarray, sample_rate_hz: float = SAMPLE_RATE_HZ
) -> tuple[np.ndarray, np.ndarray]:
    """Features (as ``vibration_features_batch``) and sensor stats (n, 4), from one pass.

    The sensor stats (``VIBRATION_MONITOR_NAMES``) are what the features are built not to
    see: the mean of each axis in g (the DC offset: gravity, sensor offset, a loose mount)
    and the running speed in Hz that the features measure every frequency against (the
    1x peak of the radial spectrum in ``ROTATION_SEARCH_HZ``, the same ``f1``).  They cost
    nothing beyond the features: both come out of the same FFT.
    """
    return _vibration(windows, sample_rate_hz)


def vibration_sensor_stats(
    windows: np.ndarray, sample_rate_hz: float = SAMPLE_RATE_HZ
) -> np.ndarray:
    """Sensor stats of windows (n, window_len, 3): float32 (n, 4), see ``VIBRATION_MONITOR_NAMES``."""
    x = _check_windows(windows)
    mean = np.mean(x, axis=-1)
    f1 = _spectra(x - mean[:, :, None], sample_rate_hz)[3]
    return np.concatenate([mean, f1[:, None]], axis=-1).astype(np.float32)


def vibration_features(window: np.ndarray, sample_rate_hz: float = SAMPLE_RATE_HZ) -> np.ndarray:
    """``vibration-v1`` features of one window shaped (window_len, 3): float32 (F,)."""
    w = np.asarray(window)
    if w.ndim != 2:
        raise ConfigError(f"a vibration window must have shape (window_len, 3); got {w.shape}")
    features: np.ndarray = vibration_features_batch(w[None, :, :], sample_rate_hz)[0]
    return features


def identity_features(batch: np.ndarray) -> np.ndarray:
    """The inputs unchanged, as float32 (the model takes raw inputs)."""
    return np.asarray(batch, dtype=np.float32)


def _vibration_v1(batch: np.ndarray) -> np.ndarray:
    return vibration_features_batch(batch)


FEATURE_PIPELINES: dict[str, FeaturePipeline] = {
    "vibration-v1": _vibration_v1,
    "identity": identity_features,
}
"""Pipeline name (as recorded in a manifest) -> function from a raw batch to features."""


def get_pipeline(name: str) -> FeaturePipeline:
    """The pipeline called ``name``; ``ConfigError`` naming the known ones otherwise."""
    try:
        return FEATURE_PIPELINES[name]
    except KeyError:
        known = ", ".join(sorted(FEATURE_PIPELINES))
        raise ConfigError(f"unknown feature pipeline {name!r} (known: {known})") from None


VIBRATION_MONITOR_NAMES: list[str] = [
    "sensor.mean_x",
    "sensor.mean_y",
    "sensor.mean_z",
    "sensor.rotation_hz",
]
"""Sensor stats the ``vibration-v1`` monitor adds to the drift statistics, in column order."""


@dataclass(frozen=True)
class Monitor:
    """Statistics of the raw inputs watched for drift beside a feature pipeline's output.

    ``stats(batch)`` gives (n, len(names)) float32; ``features_and_stats(batch)`` gives
    the pipeline's features and the stats from one pass (what the agent calls).
    """

    name: str
    names: tuple[str, ...]
    stats: FeaturePipeline
    features_and_stats: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _vibration_v1_both(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return vibration_features_and_stats(batch)


def _vibration_v1_stats(batch: np.ndarray) -> np.ndarray:
    return vibration_sensor_stats(batch)


MONITORS: dict[str, Monitor] = {
    "vibration-v1": Monitor(
        "vibration-v1",
        tuple(VIBRATION_MONITOR_NAMES),
        _vibration_v1_stats,
        _vibration_v1_both,
    ),
}
"""Feature pipeline name -> its sensor-stat monitor (pipelines without one are absent)."""


def get_monitor(name: str | None) -> Monitor | None:
    """The monitor of feature pipeline ``name``, or None when it has none."""
    if name is None:
        return None
    return MONITORS.get(name)
