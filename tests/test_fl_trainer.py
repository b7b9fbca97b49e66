"""Numpy device trainer: same forward as Keras on the same weights, training works."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tinyfleet.agent.fl.data import load_local_data, save_npz_data
from tinyfleet.agent.fl.errors import FLDataError, FLUnsupportedModel
from tinyfleet.agent.fl.trainer import MLPSpec, TrainConfig, evaluate, forward, train

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _toy(n: int, f: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 3.0, size=(4, f))
    y = rng.integers(0, 4, size=n)
    x = centers[y] + rng.normal(0.0, 1.0, size=(n, f)) * 2.0 + 5.0
    return x.astype(np.float32), y.astype(np.int64)


def test_forward_matches_keras_and_layout_roundtrips() -> None:
    from tinyfleet.recipes.vibration import build_model

    x, _ = _toy(200, 21, 0)
    model = build_model((21,), 4, {})
    model.get_layer("standardize").adapt(x)
    weights = model.get_weights()
    spec = MLPSpec.from_weights(weights)
    assert spec == MLPSpec(21, (48, 32), 4, True)
    ours = forward(weights, x)
    theirs = np.asarray(model(x, training=False))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)

    # trained weights keep Keras' layout: set_weights accepts them and agrees
    y = np.argmax(theirs, axis=1)
    res = train(weights, x, y, TrainConfig(epochs=2, batch_size=32, seed=1))
    model.set_weights(res.weights)
    np.testing.assert_allclose(forward(res.weights, x), np.asarray(model(x)), atol=1e-5)
    np.testing.assert_array_equal(res.weights[0], weights[0])  # statistics never trained


def _mlp(f: int, seed: int, x: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(f, 48), (48, 32), (32, 4)]
    ws: list[np.ndarray] = [
        x.mean(axis=0).astype(np.float32),
        x.var(axis=0).astype(np.float32),
        np.array(len(x), dtype=np.int64),
    ]
    for a, b in shapes:
        ws += [
            rng.normal(0, np.sqrt(2 / a), size=(a, b)).astype(np.float32),
            np.zeros(b, np.float32),
        ]
    return ws


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_reduces_loss_and_is_deterministic(optimizer: str) -> None:
    x, y = _toy(400, 21, 1)
    w0 = _mlp(21, 2, x)
    loss0, acc0 = evaluate(w0, x, y)
    cfg = TrainConfig(
        epochs=5,
        batch_size=32,
        learning_rate=0.01 if optimizer == "adam" else 0.1,
        optimizer=optimizer,
        seed=3,
    )
    res = train(w0, x, y, cfg)
    loss1, acc1 = evaluate(res.weights, x, y)
    assert loss1 < 0.5 * loss0 and acc1 > max(acc0, 0.8)
    assert res.num_examples == 400 and abs(res.accuracy - acc1) < 1e-9
    again = train(w0, x, y, cfg)
    for a, b in zip(res.weights, again.weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_proximal_term_keeps_weights_closer() -> None:
    x, y = _toy(300, 21, 4)
    w0 = _mlp(21, 5, x)
    free = train(w0, x, y, TrainConfig(epochs=5, learning_rate=0.01, seed=0))
    prox = train(w0, x, y, TrainConfig(epochs=5, learning_rate=0.01, seed=0, proximal_mu=5.0))

    def dist(ws: list[np.ndarray]) -> float:
        return sum(float(np.sum((a - b) ** 2)) for a, b in zip(ws[3:], w0[3:], strict=True))

    assert dist(prox.weights) < 0.5 * dist(free.weights)


def test_unsupported_models_and_bad_data(tmp_path: Path) -> None:
    conv = [np.zeros((3, 3, 1, 8), np.float32), np.zeros(8, np.float32)]
    with pytest.raises(FLUnsupportedModel, match="Dense"):
        MLPSpec.from_weights(conv)
    with pytest.raises(FLUnsupportedModel):
        MLPSpec.from_weights([np.zeros((4, 5)), np.zeros(5), np.zeros((6, 2)), np.zeros(2)])
    x, y = _toy(50, 21, 0)
    w = _mlp(21, 0, x)
    with pytest.raises(FLDataError, match="expects"):
        train(w, x[:, :5], y, TrainConfig())
    with pytest.raises(FLDataError, match="labels"):
        train(w, x, y + 10, TrainConfig())
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(FLDataError, match="NaN"):
        train(w, bad, y, TrainConfig())
    p = save_npz_data(tmp_path / "d.npz", x, y)
    lx, ly = load_local_data(p)
    assert lx.shape == (50, 21) and ly.dtype == np.int64
    with pytest.raises(FLDataError, match="no labelled data"):
        load_local_data(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(FLDataError, match="cannot read"):
        load_local_data(tmp_path / "junk.npz")


def test_device_side_does_not_import_flower_or_tensorflow() -> None:
    """Only the ClientApp module (run inside flwr-clientapp) imports flwr."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import tinyfleet.agent.fl, tinyfleet.agent.fl.supernode, tinyfleet.agent.fl.trainer\n"
        "import tinyfleet.agent.fl.data, tinyfleet.agent.fl.process\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flwr', 'tensorflow', 'keras')"
        " or m.startswith('tinyfleet.host')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reads_the_agents_label_buffer(tmp_path: Path) -> None:
    from tinyfleet.agent.labels import LabelBuffer

    x, y = _toy(30, 21, 2)
    with LabelBuffer(tmp_path / "labels.db") as buf:
        for row, label in zip(x, y, strict=True):
            buf.add(row, int(label), preprocess="vibration-v1", model="vibration@1")
        buf.add(np.zeros(5, np.float32), 1, preprocess="other-v1", model="other@1")
    lx, ly = load_local_data(tmp_path / "labels.db", "vibration-v1")
    np.testing.assert_allclose(lx, x, rtol=1e-6)
    np.testing.assert_array_equal(ly, y)
    assert load_local_data(tmp_path / "labels.db", "other-v1")[0].shape == (1, 5)
    with pytest.raises(FLDataError, match="cannot read"):
        load_local_data(tmp_path / "labels.db")  # two widths mixed: refused with a reason
    (tmp_path / "bad.db").write_bytes(b"not sqlite at all" * 10)
    with pytest.raises(FLDataError, match="cannot read"):
        load_local_data(tmp_path / "bad.db")
