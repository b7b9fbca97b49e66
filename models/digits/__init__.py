"""Digits recipe: 8x8 handwritten digits, a small weight-dominated CNN.

Data is scikit-learn's bundled copy of the UCI handwritten digits (1,797 images, no
download), scaled to [0, 1] and split stratified by the seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from tinyfleet.host.errors import RecipeError
from tinyfleet.host.recipes import Dataset

if TYPE_CHECKING:
    import keras  # type: ignore[import-untyped]

__all__ = ["build_model", "load_data"]

DENSE_UNITS = 256


def _fraction(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise RecipeError(f"recipe 'digits': data.{key} must be a number between 0 and 1")
    return float(value)


def load_data(data: dict[str, Any], seed: int) -> Dataset:
    """Stratified train / validation / test split of the images, shape (n, 8, 8, 1)."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    val_fraction = _fraction(data, "val_fraction")
    test_fraction = _fraction(data, "test_fraction")
    if val_fraction + test_fraction >= 0.9:
        raise RecipeError("recipe 'digits': val_fraction + test_fraction must be below 0.9")
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest,
        y_rest,
        test_size=val_fraction / (1.0 - test_fraction),
        stratify=y_rest,
        random_state=seed,
    )
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        class_names=[str(d) for d in range(10)],
    )


def build_model(input_shape: tuple[int, ...], n_classes: int, train: dict[str, Any]) -> keras.Model:
    """Conv(16) -> pool -> Dense(256) -> softmax: most bytes are Dense weights."""
    import keras  # type: ignore[import-untyped]

    inputs = keras.Input(shape=input_shape, name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Reshape((int(np.prod(x.shape[1:])),), name="flatten")(x)
    x = keras.layers.Dense(DENSE_UNITS, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(0.25, name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")
