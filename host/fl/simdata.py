"""Labelled buffers of simulated devices, for federated trials, tests and benchmarks.

Each device is a ``tinyfleet.sim.sensors.VibrationSensor`` (its own machine, mount
and sensor), optionally drifted, with its own class mix (non-IID); samples are the
``vibration-v1`` features the device computes.  ``dense_weights`` makes a weight
list in the recipe's Keras layout from numpy alone (for trials without TensorFlow).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tinyfleet.agent.features import vibration_features_batch
from tinyfleet.sim.sensors import CLASS_NAMES, DeviceParams, Drift, VibrationSensor, derive_seed

__all__ = ["DeviceData", "dense_weights", "device_data", "non_iid_probs"]


@dataclass
class DeviceData:
    device_id: str
    x: np.ndarray
    y: np.ndarray


def non_iid_probs(index: int, skew: float = 0.6) -> np.ndarray:
    """A class mix favouring one class per device (``skew`` of the mass on it)."""
    n = len(CLASS_NAMES)
    probs = np.full(n, (1.0 - skew) / (n - 1))
    probs[index % n] = skew
    return probs


def device_data(
    device_id: str,
    n: int,
    seed: int,
    *,
    drift: Drift | None = None,
    class_probs: Sequence[float] | np.ndarray | None = None,
    warmup: int = 0,
) -> DeviceData:
    """``n`` labelled feature rows from one simulated device (after ``warmup`` windows).

    With a drift of onset 0 every window is drifted; ``warmup`` skips windows (e.g.
    to sample after a ramp).  Labels are the true labels (a drift fault counts).
    """
    params = DeviceParams.for_device(device_id, seed)
    sensor = VibrationSensor(
        params, np.random.default_rng(derive_seed(seed, "fl", device_id)), drift=drift, t=warmup
    )
    probs = None if class_probs is None else np.asarray(class_probs, dtype=np.float64)
    windows, labels = sensor.sample(n, probs)
    return DeviceData(device_id, vibration_features_batch(windows).astype(np.float32), labels)


def dense_weights(
    x: np.ndarray, hidden: Sequence[int] = (48, 32), n_classes: int = 4, seed: int = 0
) -> list[np.ndarray]:
    """Fresh weights of ``Normalization + Dense(hidden…, relu) + Dense(softmax)``.

    Normalisation statistics are ``x``'s mean and variance; kernels He-initialised.
    The layout equals Keras' ``get_weights()`` of the vibration recipe's model.
    """
    x = np.asarray(x, dtype=np.float32)
    rng = np.random.default_rng(seed)
    weights: list[np.ndarray] = [
        x.mean(axis=0).astype(np.float32),
        x.var(axis=0).astype(np.float32),
        np.array(x.shape[0], dtype=np.int64),
    ]
    sizes = [x.shape[1], *hidden, n_classes]
    for a, b in itertools.pairwise(sizes):
        weights.append(rng.normal(0.0, np.sqrt(2.0 / a), size=(a, b)).astype(np.float32))
        weights.append(np.zeros(b, dtype=np.float32))
    return weights
