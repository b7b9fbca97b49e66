"""Vibration recipe: machine condition from accelerometer windows of a non-IID fleet.

Windows come from ``tinyfleet.sim.sensors`` (one simulated device per id, parameters
drawn from the seed); features from ``tinyfleet.agent.features`` (``vibration-v1``),
the same code the device runs.  Training, validation and test devices are disjoint,
so the test accuracy is the accuracy on machines the model has never seen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from tinyfleet.agent.features import (
    FEATURE_NAMES,
    VIBRATION_MONITOR_NAMES,
    vibration_features_and_stats,
    vibration_features_batch,
)
from tinyfleet.host.errors import RecipeError
from tinyfleet.host.recipes import Dataset
from tinyfleet.sim.sensors import CLASS_NAMES, make_fleet_dataset

if TYPE_CHECKING:
    import keras  # type: ignore[import-untyped]

__all__ = ["build_model", "device_split", "featurize", "load_data", "raw_split"]

HIDDEN_UNITS = (48, 32)


def featurize(windows: np.ndarray) -> np.ndarray:
    """Model inputs of raw windows (n, window_len, 3): the ``vibration-v1`` features."""
    return vibration_features_batch(windows)


def _int_param(data: dict[str, Any], key: str, minimum: int) -> int:
    if key not in data:
        raise RecipeError(f"recipe 'vibration': [data] is missing {key!r}")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecipeError(f"recipe 'vibration': data.{key} must be an integer >= {minimum}")
    return value


def device_split(data: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """Device ids of the training, validation and test fleets (disjoint, consecutive)."""
    n_train = _int_param(data, "train_devices", 1)
    n_val = _int_param(data, "val_devices", 1)
    n_test = _int_param(data, "test_devices", 1)
    prefix = str(data.get("device_prefix", "dev-"))
    ids = [f"{prefix}{i:03d}" for i in range(n_train + n_val + n_test)]
    return ids[:n_train], ids[n_train : n_train + n_val], ids[n_train + n_val :]


def raw_split(
    device_ids: list[str], data: dict[str, Any], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw windows, labels and device ids (as strings) of one fleet split."""
    wpc = _int_param(data, "windows_per_class", 1)
    windows, labels, index = make_fleet_dataset(device_ids, wpc, seed)
    return windows, labels, np.asarray(device_ids)[index]


def load_data(data: dict[str, Any], seed: int) -> Dataset:
    """Features of balanced windows from disjoint train / validation / test fleets.

    Also the sensor stats of the validation and test windows (``Dataset.monitor``: per-axis
    mean and running speed, from the same pass as the features), which the drift reference
    profile carries after the features.
    """
    train_ids, val_ids, test_ids = device_split(data)
    splits = {}
    monitor = {}
    for split, ids in (("train", train_ids), ("val", val_ids), ("test", test_ids)):
        windows, labels, devices = raw_split(ids, data, seed)
        if split == "train":
            x = featurize(windows)
        else:
            x, monitor[split] = vibration_features_and_stats(windows)
        splits[split] = (x, labels, devices)
    return Dataset(
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        x_val=splits["val"][0],
        y_val=splits["val"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
        class_names=list(CLASS_NAMES),
        feature_names=list(FEATURE_NAMES),
        groups={f"{s}_device": splits[s][2] for s in ("train", "val", "test")},
        monitor=monitor,
        monitor_names=list(VIBRATION_MONITOR_NAMES),
    )


def build_model(input_shape: tuple[int, ...], n_classes: int, train: dict[str, Any]) -> keras.Model:
    """Normalization (adapted on the training features) + a small ReLU MLP + softmax."""
    import keras  # type: ignore[import-untyped]

    inputs = keras.Input(shape=input_shape, name="features")
    x = keras.layers.Normalization(name="standardize")(inputs)
    for i, units in enumerate(HIDDEN_UNITS):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{i}")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="vibration_mlp")
