"""Recipe loading and validation, datasets, and seeded training."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from tinyfleet.host.errors import RecipeError
from tinyfleet.host.recipes import (
    Dataset,
    Recipe,
    build_model,
    list_recipes,
    load_dataset,
    load_recipe,
)

USER_RECIPE_TOML = """
name = "blobs"
description = "two gaussian blobs"
preprocess = "identity"

[data]
n = 120

[train]
seed = 3
epochs = 15
batch_size = 8
learning_rate = 0.05

[gates]
min_accuracy = 0.9
max_int8_drop = 0.02
max_bytes = 4096
must_fit = ["cortex-m4"]

[profiles]
targets = ["cortex-m4"]

[small]
"data.n" = 40
"""

USER_RECIPE_CODE = """
from __future__ import annotations

import numpy as np

from tinyfleet.host.recipes import Dataset


def load_data(data, seed):
    rng = np.random.default_rng(seed)
    n = data["n"]
    y = rng.integers(0, 2, size=3 * n)
    x = rng.normal(0.0, 0.3, size=(3 * n, 2)) + y[:, None] * 2.0
    return Dataset(
        x[:n], y[:n], x[n : 2 * n], y[n : 2 * n], x[2 * n :], y[2 * n :],
        class_names=["a", "b"], feature_names=["u", "v"],
    )


def build_model(input_shape, n_classes, train):
    import keras

    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Normalization()(inputs)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)
"""


def _write_recipe(folder: Path, toml: str = USER_RECIPE_TOML, code: str = USER_RECIPE_CODE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.toml").write_text(textwrap.dedent(toml))
    (folder / "__init__.py").write_text(textwrap.dedent(code))
    return folder


# --- loading and validation -------------------------------------------------------------


def test_shipped_recipes_are_listed_and_load() -> None:
    names = list_recipes()
    assert {"vibration", "digits"} <= set(names)
    for name in ("vibration", "digits"):
        recipe = load_recipe(name)
        assert isinstance(recipe, Recipe) and recipe.name == name
        assert recipe.path.name == name and callable(recipe.module.load_data)
        assert recipe.gates.min_accuracy >= 0.95 and recipe.gates.max_int8_drop <= 0.01
        assert set(recipe.gates.must_fit) <= set(recipe.profiles.targets)
    assert load_recipe("vibration").preprocess == "vibration-v1"
    assert load_recipe("digits").preprocess == "identity"


def test_small_and_overrides_apply_in_order() -> None:
    full = load_recipe("vibration")
    small = load_recipe("vibration", small=True)
    assert small.train.epochs < full.train.epochs
    assert small.data["windows_per_class"] < full.data["windows_per_class"]
    both = load_recipe(
        "vibration", small=True, overrides={"train.epochs": "3", "data.windows_per_class": "7"}
    )
    assert both.train.epochs == 3 and both.data["windows_per_class"] == 7
    assert both.data["train_devices"] == small.data["train_devices"]
    assert load_recipe(full.path).train == full.train  # by folder path too
    assert load_recipe(full.path).sha256 == full.sha256 != small.sha256 != both.sha256
    assert load_recipe(full.path / "recipe.toml").name == "vibration"


def test_unknown_recipe_names_the_available_ones() -> None:
    with pytest.raises(RecipeError, match=r"unknown recipe 'vibrations'.*digits.*vibration"):
        load_recipe("vibrations")


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"train.epochz": 3}, "epochz"),
        ({"data.no_such_key": 1}, "no_such_key"),
        ({"model.units": 3}, "unknown section 'model'"),
        ({"epochs": 3}, "bad override key 'epochs'"),
        ({"train.epochs": 0}, "train.epochs"),
        ({"train.epochs": "many"}, "train.epochs"),
        ({"data.windows_per_class": "lots"}, "windows_per_class"),
        ({"gates.min_accuracy": 1.5}, "gates.min_accuracy"),
    ],
)
def test_bad_overrides_raise_recipe_error(overrides: dict[str, object], pattern: str) -> None:
    with pytest.raises(RecipeError, match=pattern):
        load_recipe("vibration", overrides=overrides)


def test_invalid_declarations_raise_recipe_error(tmp_path: Path) -> None:
    bad_toml = _write_recipe(tmp_path / "bad_toml", toml="name = [unclosed\n")
    with pytest.raises(RecipeError, match="invalid TOML"):
        load_recipe(bad_toml)

    typo = _write_recipe(
        tmp_path / "typo", toml=USER_RECIPE_TOML.replace("batch_size", "batchsize")
    )
    with pytest.raises(RecipeError, match=r"train\.batchsize: unknown key"):
        load_recipe(typo)

    extra = _write_recipe(tmp_path / "extra", toml="colour = 'red'\n" + USER_RECIPE_TOML)
    with pytest.raises(RecipeError, match="colour: unknown key"):
        load_recipe(extra)

    no_gates = _write_recipe(
        tmp_path / "nogates", toml=USER_RECIPE_TOML.replace("min_accuracy = 0.9\n", "")
    )
    with pytest.raises(RecipeError, match=r"gates\.min_accuracy"):
        load_recipe(no_gates)

    bad_pipe = _write_recipe(
        tmp_path / "pipe", toml=USER_RECIPE_TOML.replace('"identity"', '"fft-v9"')
    )
    with pytest.raises(RecipeError, match="fft-v9"):
        load_recipe(bad_pipe)

    no_code = _write_recipe(tmp_path / "nocode", code="X = 1\n")
    with pytest.raises(RecipeError, match="load_data"):
        _ = load_recipe(no_code).module

    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"no recipe\.toml"):
        load_recipe(tmp_path / "empty")


def test_user_recipe_loads_by_path_and_trains(tmp_path: Path) -> None:
    from tinyfleet.host.train import keras_accuracy, train

    recipe = load_recipe(_write_recipe(tmp_path / "blobs"), small=True)
    assert recipe.data == {"n": 40}
    dataset = load_dataset(recipe)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int64
    assert dataset.input_shape == (2,)
    calls: list[tuple[int, int, dict[str, float]]] = []
    model = train(recipe, dataset, progress=lambda e, n, logs: calls.append((e, n, logs)))
    assert [c[:2] for c in calls] == [(e, 15) for e in range(1, 16)]
    assert {"loss", "accuracy", "val_accuracy"} <= set(calls[-1][2])
    assert keras_accuracy(model, dataset.x_test, dataset.y_test) >= 0.9
    # The Normalization layer was adapted on the training inputs.
    norm = next(layer for layer in model.layers if "normalization" in layer.name)
    assert np.allclose(np.ravel(norm.mean), dataset.x_train.mean(axis=0), atol=1e-5)


def test_dataset_validates_and_fingerprints() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 3)), rng.integers(0, 2, size=10)

    def make(labels: np.ndarray) -> Dataset:
        return Dataset(x, labels, x, labels, x, labels, class_names=["a", "b"])

    a = make(y)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.fingerprint() == make(y.copy()).fingerprint()
    flipped = y.copy()
    flipped[0] = 1 - flipped[0]
    assert a.fingerprint() != make(flipped).fingerprint()
    with pytest.raises(RecipeError, match="do not match"):
        Dataset(x, y[:5], x, y, x, y, class_names=["a", "b"])
    with pytest.raises(RecipeError, match="labels outside"):
        Dataset(x, y + 5, x, y, x, y, class_names=["a", "b"])


# --- shipped recipes' data and training -------------------------------------------------


def test_digits_data_is_stratified_and_seeded() -> None:
    recipe = load_recipe("digits", small=True)
    ds = load_dataset(recipe)
    assert ds.input_shape == (8, 8, 1) and ds.class_names == [str(d) for d in range(10)]
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    n = ds.x_train.shape[0] + ds.x_val.shape[0] + ds.x_test.shape[0]
    assert n == 1797 and abs(ds.x_test.shape[0] / n - 0.2) < 0.01
    counts = np.bincount(ds.y_test, minlength=10)
    assert counts.max() - counts.min() <= 2
    assert ds.fingerprint() == load_dataset(recipe).fingerprint()
    other = load_dataset(load_recipe("digits", overrides={"train.seed": 7}))
    assert other.fingerprint() != ds.fingerprint()


def test_digits_model_is_weight_dominated() -> None:
    recipe = load_recipe("digits", small=True)
    ds = load_dataset(recipe)
    model = build_model(recipe, ds)
    weights = sum(int(np.prod(w.shape)) for w in model.weights)
    dense = sum(int(np.prod(w.shape)) for w in model.get_layer("dense").weights)
    assert dense / weights > 0.9
    assert model.outputs[0].shape[-1] == 10


def test_vibration_training_is_seeded_and_deterministic() -> None:
    from tinyfleet.host.train import keras_accuracy, train

    recipe = load_recipe("vibration", small=True)
    results = []
    for _ in range(2):
        ds = load_dataset(recipe)
        model = train(recipe, ds)
        results.append((ds.fingerprint(), keras_accuracy(model, ds.x_test, ds.y_test)))
    (fp1, acc1), (fp2, acc2) = results
    assert fp1 == fp2
    assert abs(acc1 - acc2) <= 0.005
    assert acc1 >= 0.9, acc1
    assert ds.groups["test_device"].shape == ds.y_test.shape
    assert set(ds.groups["test_device"]).isdisjoint(ds.groups["train_device"])
    other = load_dataset(load_recipe("vibration", small=True, overrides={"train.seed": 1}))
    assert other.fingerprint() != fp1
