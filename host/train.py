"""Seeded, deterministic training of a recipe's Keras model."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from tinyfleet.host.errors import CalibrationError
from tinyfleet.host.recipes import Dataset, Recipe, build_model

if TYPE_CHECKING:
    import keras  # type: ignore[import-untyped]

__all__ = ["ProgressFn", "keras_accuracy", "predict_probs", "train"]

ProgressFn = Callable[[int, int, dict[str, float]], None]
"""``progress(epoch, epochs, logs)`` after each epoch (1-based); logs hold loss/accuracy."""

_PREDICT_BATCH = 4096


def train(recipe: Recipe, dataset: Dataset, progress: ProgressFn | None = None) -> keras.Model:
    """Train the recipe's model on ``dataset`` and return it.

    Seeds Python, numpy and TensorFlow with ``recipe.train.seed`` and enables
    TensorFlow's op determinism, so the same recipe and data give the same weights.
    Optimises sparse categorical cross-entropy with Adam; keeps the weights of the
    epoch with the best validation accuracy, stopping early after
    ``recipe.train.patience`` epochs without improvement (when set).  When training
    stops early the last ``progress`` call has ``epoch < epochs``.
    """
    import keras  # type: ignore[import-untyped]
    import tensorflow as tf  # type: ignore[import-untyped]

    cfg = recipe.train
    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()

    model = build_model(recipe, dataset)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=cfg.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

    class _Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if progress is not None:
                clean = {k: float(v) for k, v in (logs or {}).items()}
                progress(epoch + 1, cfg.epochs, clean)

    has_val = dataset.x_val.shape[0] > 0
    callbacks: list[keras.callbacks.Callback] = []
    if has_val:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy",
                mode="max",
                patience=cfg.patience if cfg.patience is not None else cfg.epochs,
                restore_best_weights=True,
            )
        )
    callbacks.append(_Progress())
    model.fit(
        dataset.x_train,
        dataset.y_train,
        validation_data=(dataset.x_val, dataset.y_val) if has_val else None,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        shuffle=True,
        verbose=0,
        callbacks=callbacks,
    )
    return model


def predict_probs(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Class probabilities of a Keras model for ``x`` (float32), in batches."""
    x = np.asarray(x, dtype=np.float32)
    expected = tuple(model.inputs[0].shape[1:]) if model.inputs else None
    if expected is not None and tuple(x.shape[1:]) != expected:
        raise CalibrationError(f"inputs of shape {x.shape[1:]} for a model expecting {expected}")
    parts = [
        np.asarray(model(x[i : i + _PREDICT_BATCH], training=False))
        for i in range(0, x.shape[0], _PREDICT_BATCH)
    ]
    if not parts:
        return np.zeros((0, int(model.outputs[0].shape[-1])), dtype=np.float32)
    return np.concatenate(parts, axis=0)


def keras_accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of samples whose most probable class is the label."""
    y = np.asarray(y)
    if y.shape[0] != np.asarray(x).shape[0]:
        raise CalibrationError(f"{np.asarray(x).shape[0]} inputs but {y.shape[0]} labels")
    if y.shape[0] == 0:
        raise CalibrationError("no samples to measure accuracy on")
    probs = predict_probs(model, x)
    return float(np.mean(np.argmax(probs, axis=1) == y))
