"""A numpy trainer for the recipes' dense classifiers (no TensorFlow on the device).

The model family is the ``vibration`` recipe's: an optional Keras ``Normalization``
layer (fixed mean and variance, taken from the parent model) followed by ``Dense``
layers with ReLU and a softmax output.  Weights are a list of arrays in exactly the
order of Keras' ``model.get_weights()``::

    [mean (f,), variance (f,), count (), W1 (f, h1), b1 (h1,), ..., Wk (h, c), bk (c,)]

(without the first three when the model has no ``Normalization`` layer), so the host
can ``model.set_weights(weights)`` and run the normal quantize / evaluate path.
Anything else (a convolution, a 1-D dense stack that does not chain) is refused with
``FLUnsupportedModel``.

Training minimises sparse categorical cross-entropy with Adam (or plain SGD) over
shuffled minibatches, optionally with FedProx's proximal term ``mu / 2 * |w - w0|^2``
against the received weights; the normalisation statistics are never trained.  The
same seed, data and weights give the same result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tinyfleet.agent.fl.errors import FLDataError, FLUnsupportedModel

__all__ = [
    "MLPSpec",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "forward",
    "train",
]

_KERAS_EPSILON = 1e-7  # keras.backend.epsilon(): Normalization divides by max(sqrt(var), eps)
_ADAM_BETA1 = 0.9
_ADAM_BETA2 = 0.999
_ADAM_EPS = 1e-7  # Keras' Adam default


@dataclass(frozen=True)
class MLPSpec:
    """Shape of a dense classifier as read from its weight list."""

    n_features: int
    hidden: tuple[int, ...]
    n_classes: int
    normalization: bool

    @property
    def first_dense(self) -> int:
        """Index of the first kernel in the weight list."""
        return 3 if self.normalization else 0

    @classmethod
    def from_weights(cls, weights: Sequence[np.ndarray]) -> MLPSpec:
        """The spec of ``weights``; ``FLUnsupportedModel`` if they are not this family."""
        arrays = [np.asarray(w) for w in weights]
        if not arrays:
            raise FLUnsupportedModel("empty weight list: no model to train")
        normalization = arrays[0].ndim == 1
        if normalization and (
            len(arrays) < 3 or arrays[1].shape != arrays[0].shape or arrays[2].ndim != 0
        ):
            raise FLUnsupportedModel(
                "weights do not start with a Normalization layer (mean, variance, count) "
                f"followed by Dense layers; shapes: {_shapes(arrays)}"
            )
        dense = arrays[3:] if normalization else arrays
        if len(dense) < 2 or len(dense) % 2:
            raise FLUnsupportedModel(
                f"expected Dense (kernel, bias) pairs; shapes: {_shapes(arrays)}"
            )
        units: list[int] = []
        n_in = int(arrays[0].shape[0]) if normalization else int(dense[0].shape[0])
        prev = n_in
        for i in range(0, len(dense), 2):
            kernel, bias = dense[i], dense[i + 1]
            if kernel.ndim != 2 or bias.ndim != 1 or kernel.shape != (prev, bias.shape[0]):
                raise FLUnsupportedModel(
                    "only stacks of Dense layers (2-D kernels that chain) can be trained "
                    f"by the device trainer; shapes: {_shapes(arrays)}"
                )
            prev = int(bias.shape[0])
            units.append(prev)
        for w in arrays:
            if not np.issubdtype(w.dtype, np.number):
                raise FLUnsupportedModel(f"non-numeric weight array of dtype {w.dtype}")
        if units[-1] < 2:
            raise FLUnsupportedModel("the output layer must have at least 2 classes")
        return cls(n_in, tuple(units[:-1]), units[-1], normalization)


def _shapes(arrays: Sequence[np.ndarray]) -> str:
    return ", ".join(str(tuple(a.shape)) for a in arrays)


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings (what the ServerApp sends in each round's config)."""

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.003
    optimizer: Literal["adam", "sgd"] = "adam"
    proximal_mu: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError("learning_rate must be a positive number")
        if not (np.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError("proximal_mu must be >= 0")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r} (adam, sgd)")


@dataclass
class TrainResult:
    """New weights (Keras layout) and what local training measured."""

    weights: list[np.ndarray]
    num_examples: int
    loss: float
    """Mean cross-entropy over the last epoch's minibatches (without the proximal term)."""
    accuracy: float
    """Accuracy of the trained weights on the local training data."""
    seconds: float
    """Wall time of the training loop."""


def _check_data(spec: MLPSpec, x: np.ndarray, y: np.ndarray | None) -> None:
    if x.ndim != 2 or x.shape[1] != spec.n_features:
        raise FLDataError(
            f"local data has shape {tuple(x.shape)}; the model expects (n, {spec.n_features})"
        )
    if y is not None:
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise FLDataError(f"{x.shape[0]} samples but labels of shape {tuple(y.shape)}")
        if y.size and (int(y.min()) < 0 or int(y.max()) >= spec.n_classes):
            raise FLDataError(
                f"labels must be in 0..{spec.n_classes - 1}; got {int(y.min())}..{int(y.max())}"
            )


def _standardize(spec: MLPSpec, weights: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if not spec.normalization:
        return x
    mean = np.asarray(weights[0], dtype=np.float32)
    std = np.maximum(np.sqrt(np.asarray(weights[1], dtype=np.float32)), _KERAS_EPSILON)
    return ((x - mean) / std).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def _dense_forward(
    params: Sequence[np.ndarray], h: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Probabilities and the input of each Dense layer (for backprop)."""
    inputs = []
    n_layers = len(params) // 2
    for i in range(n_layers):
        inputs.append(h)
        z = h @ params[2 * i] + params[2 * i + 1]
        h = np.maximum(z, 0.0) if i < n_layers - 1 else _softmax(z)
    return h, inputs


def forward(weights: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Class probabilities (n, classes) float32, as Keras' ``model(x)`` computes them."""
    spec = MLPSpec.from_weights(weights)
    x = np.asarray(x, dtype=np.float32)
    _check_data(spec, x, None)
    params = [np.asarray(w, dtype=np.float32) for w in weights[spec.first_dense :]]
    probs, _ = _dense_forward(params, _standardize(spec, weights, x))
    return probs.astype(np.float32)


def _cross_entropy(probs: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(probs[np.arange(y.shape[0]), y], 1e-7, 1.0)
    return float(-np.mean(np.log(p)))


def evaluate(weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``weights`` on ``(x, y)``."""
    y = np.asarray(y, dtype=np.int64)
    spec = MLPSpec.from_weights(weights)
    _check_data(spec, np.asarray(x), y)
    if y.shape[0] == 0:
        raise FLDataError("no samples to evaluate on")
    probs = forward(weights, x)
    return _cross_entropy(probs, y), float(np.mean(np.argmax(probs, axis=1) == y))


def train(
    weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray, config: TrainConfig
) -> TrainResult:
    """Train the Dense layers of ``weights`` on ``(x, y)``; returns new weights."""
    spec = MLPSpec.from_weights(weights)
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    _check_data(spec, x, y)
    n = x.shape[0]
    if n == 0:
        raise FLDataError("no samples to train on")
    if not all(np.all(np.isfinite(np.asarray(w, dtype=np.float64))) for w in weights):
        raise FLDataError("the received weights are not all finite")
    if not np.all(np.isfinite(x)):
        raise FLDataError("local features contain NaN or infinite values")

    start = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    h0 = _standardize(spec, weights, x)
    params = [np.array(w, dtype=np.float32) for w in weights[spec.first_dense :]]
    anchor = [p.copy() for p in params] if config.proximal_mu > 0 else None
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    step = 0
    lr = np.float32(config.learning_rate)
    n_layers = len(params) // 2
    last_losses: list[float] = []
    for _ in range(config.epochs):
        order = rng.permutation(n)
        last_losses = []
        for s in range(0, n, config.batch_size):
            idx = order[s : s + config.batch_size]
            xb, yb = h0[idx], y[idx]
            probs, inputs = _dense_forward(params, xb)
            last_losses.append(_cross_entropy(probs, yb))
            delta = probs.copy()
            delta[np.arange(idx.size), yb] -= 1.0
            delta /= np.float32(idx.size)
            grads: list[np.ndarray] = [np.empty(0)] * len(params)
            for i in range(n_layers - 1, -1, -1):
                grads[2 * i] = inputs[i].T @ delta
                grads[2 * i + 1] = delta.sum(axis=0)
                if i > 0:
                    delta = (delta @ params[2 * i].T) * (inputs[i] > 0)
            if anchor is not None:
                mu = np.float32(config.proximal_mu)
                grads = [g + mu * (p - a) for g, p, a in zip(grads, params, anchor, strict=True)]
            step += 1
            if config.optimizer == "sgd":
                for p, g in zip(params, grads, strict=True):
                    p -= lr * g
            else:
                c1 = 1.0 - _ADAM_BETA1**step
                c2 = 1.0 - _ADAM_BETA2**step
                alpha = np.float32(config.learning_rate * np.sqrt(c2) / c1)
                for p, g, mi, vi in zip(params, grads, m, v, strict=True):
                    mi *= _ADAM_BETA1
                    mi += (1.0 - _ADAM_BETA1) * g
                    vi *= _ADAM_BETA2
                    vi += (1.0 - _ADAM_BETA2) * (g * g)
                    p -= alpha * mi / (np.sqrt(vi) + np.float32(_ADAM_EPS))
    new_weights = [np.asarray(w).copy() for w in weights[: spec.first_dense]] + [
        p.astype(np.float32) for p in params
    ]
    probs, _ = _dense_forward(params, h0)
    accuracy = float(np.mean(np.argmax(probs, axis=1) == y))
    return TrainResult(
        weights=new_weights,
        num_examples=n,
        loss=float(np.mean(last_losses)),
        accuracy=accuracy,
        seconds=time.perf_counter() - start,
    )
