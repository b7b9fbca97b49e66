"""Recipes: what to train, on which data, and the gates a version must pass.

A recipe is a folder with ``recipe.toml`` (declarative: data parameters, training
hyperparameters, gates, target profiles) and ``__init__.py`` (code: ``load_data`` and
``build_model``).  The recipes shipped with tinyfleet live in ``models/``
(``tinyfleet.recipes``); any other folder of the same shape can be loaded by path.

``recipe.toml``::

    name = "vibration"
    description = "..."
    preprocess = "vibration-v1"      # tinyfleet.agent.features pipeline the device runs
    [data]                           # free-form, passed to load_data(data, seed)
    [train]                          # TrainConfig
    [gates]                          # Gates
    [profiles]
    targets = ["cortex-m4", ...]
    [small]                          # dotted-key overrides for quick runs and tests
    "train.epochs" = 3

The module defines::

    def load_data(data: dict[str, Any], seed: int) -> Dataset: ...
    def build_model(input_shape: tuple[int, ...], n_classes: int, train: dict[str, Any]) -> keras.Model

``build_model`` (here) adapts every ``keras.layers.Normalization`` layer of the built
model on the training inputs, so a model can carry its own standardisation and the
device needs nothing besides the feature pipeline.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from tinyfleet.agent.features import FEATURE_PIPELINES, FeaturePipeline, get_monitor
from tinyfleet.host.errors import RecipeError

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

if TYPE_CHECKING:
    import keras  # type: ignore[import-untyped]

__all__ = [
    "RECIPES_DIR",
    "Dataset",
    "Gates",
    "Profiles",
    "Recipe",
    "TrainConfig",
    "apply_overrides",
    "build_model",
    "list_recipes",
    "load_dataset",
    "load_recipe",
]

RECIPES_DIR = Path(__file__).resolve().parent.parent / "models"
"""Folder of the recipes shipped with tinyfleet (the ``tinyfleet.recipes`` package)."""

_BUILTIN_PACKAGE = "tinyfleet.recipes"


class TrainConfig(BaseModel):
    """Training hyperparameters (``[train]``)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(42, ge=0, le=2**31 - 1)
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    learning_rate: float = Field(0.003, gt=0.0, le=1.0)
    patience: int | None = Field(None, ge=1)
    """Stop after this many epochs without a better validation accuracy (None: never)."""


class Gates(BaseModel):
    """Quality gates a version must pass to be promotable (``[gates]``)."""

    model_config = ConfigDict(extra="forbid")

    min_accuracy: float | None = Field(ge=0.0, le=1.0)
    """Minimum held-out accuracy of every artifact (float and int8); None: no such gate."""
    max_int8_drop: float | None = Field(ge=0.0, le=1.0)
    """Maximum accuracy lost by the int8 artifact against the float model (fraction)."""
    max_bytes: int | None = Field(None, ge=1)
    """Maximum size of the int8 TFLite file."""
    must_fit: list[str] = Field(default_factory=list)
    """Device profiles the int8 model must fit (flash and RAM)."""


class Profiles(BaseModel):
    """Device profiles to report metrics for (``[profiles]``)."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] = Field(default_factory=list)


class Recipe(BaseModel):
    """A loaded, validated recipe; ``module`` is its code."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    preprocess: str = "identity"
    data: dict[str, Any] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig)  # type: ignore[arg-type]
    gates: Gates
    profiles: Profiles = Field(default_factory=Profiles)
    small: dict[str, Any] = Field(default_factory=dict)
    path: Path
    """The recipe's folder."""

    _module: types.ModuleType | None = PrivateAttr(default=None)

    @property
    def module(self) -> types.ModuleType:
        """The recipe's code (imported on first use); checked for ``load_data``/``build_model``."""
        if self._module is None:
            self._module = _import_recipe_module(self.name, self.path)
        return self._module

    @property
    def sha256(self) -> str:
        """sha256 of the effective declaration (after overrides) and the recipe's code file."""
        h = hashlib.sha256()
        h.update(self.model_dump_json(exclude={"path", "small"}).encode())
        init = self.path / "__init__.py"
        h.update(init.read_bytes() if init.is_file() else b"")
        return h.hexdigest()

    @property
    def preprocess_fn(self) -> FeaturePipeline:
        """The feature pipeline the device runs on raw inputs before the model."""
        return FEATURE_PIPELINES[self.preprocess]


@dataclass
class Dataset:
    """Features (float32) and labels (int64) split into train, validation and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    feature_names: list[str] | None = None
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-sample group labels, e.g. ``"test_device"``: the device of each test sample."""
    monitor: dict[str, np.ndarray] = field(default_factory=dict)
    """Sensor stats of the raw inputs per split (``"val"``, ``"test"``, ``"train"``): rows
    of the recipe's preprocess monitor (``tinyfleet.agent.features.get_monitor``), one per
    sample of the split.  The drift reference profile carries them after the features, so
    devices also watch what the features do not see (a sensor offset, the running speed).
    Empty: the pipeline has no monitor, or the recipe does not provide them."""
    monitor_names: list[str] | None = None
    """Names of the monitor's columns (None with an empty ``monitor``)."""

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            x = np.ascontiguousarray(getattr(self, f"x_{split}"), dtype=np.float32)
            y = np.ascontiguousarray(getattr(self, f"y_{split}"), dtype=np.int64)
            if y.ndim != 1 or x.ndim < 2 or x.shape[0] != y.shape[0]:
                raise RecipeError(
                    f"dataset split {split!r}: x {x.shape} and y {y.shape} do not match "
                    "(x must be (n, ...) and y (n,))"
                )
            if y.size and (y.min() < 0 or y.max() >= len(self.class_names)):
                raise RecipeError(
                    f"dataset split {split!r}: labels outside 0..{len(self.class_names) - 1}"
                )
            setattr(self, f"x_{split}", x)
            setattr(self, f"y_{split}", y)
        shapes = {self.x_train.shape[1:], self.x_val.shape[1:], self.x_test.shape[1:]}
        if len(shapes) != 1:
            raise RecipeError(f"dataset splits have different input shapes: {sorted(shapes)}")
        if self.x_train.shape[0] == 0:
            raise RecipeError("dataset has no training samples")
        if self.feature_names is not None and (
            self.x_train.ndim != 2 or len(self.feature_names) != self.x_train.shape[1]
        ):
            raise RecipeError(
                f"{len(self.feature_names)} feature names for inputs of shape {self.input_shape}"
            )
        if self.monitor and not self.monitor_names:
            raise RecipeError("dataset monitor stats need monitor_names")
        for split, stats in list(self.monitor.items()):
            if split not in ("train", "val", "test"):
                raise RecipeError(f"dataset monitor: unknown split {split!r} (train, val, test)")
            m = np.ascontiguousarray(stats, dtype=np.float32)
            n = getattr(self, f"x_{split}").shape[0]
            if m.ndim != 2 or m.shape[0] != n or m.shape[1] != len(self.monitor_names or []):
                raise RecipeError(
                    f"dataset monitor {split!r}: shape {m.shape}, expected ({n}, "
                    f"{len(self.monitor_names or [])})"
                )
            if not np.all(np.isfinite(m)):
                raise RecipeError(f"dataset monitor {split!r}: values must be finite")
            self.monitor[split] = m

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """sha256 over every array (name, dtype, shape, bytes), class and feature names."""
        h = hashlib.sha256()

        def add(name: str, arr: np.ndarray) -> None:
            a = np.ascontiguousarray(arr)
            h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())

        for split in ("train", "val", "test"):
            add(f"x_{split}", getattr(self, f"x_{split}"))
            add(f"y_{split}", getattr(self, f"y_{split}"))
        for key in sorted(self.groups):
            add(f"group:{key}", np.asarray(self.groups[key]))
        h.update(("classes|" + "\x00".join(self.class_names)).encode())
        if self.feature_names is not None:
            h.update(("features|" + "\x00".join(self.feature_names)).encode())
        for key in sorted(self.monitor):  # nothing added without monitor stats
            add(f"monitor:{key}", self.monitor[key])
        if self.monitor:
            h.update(("monitor|" + "\x00".join(self.monitor_names or [])).encode())
        return h.hexdigest()


def list_recipes() -> list[str]:
    """Names of the recipes shipped with tinyfleet (folders of models/ with recipe.toml)."""
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(
        p.name
        for p in RECIPES_DIR.iterdir()
        if p.is_dir() and (p / "recipe.toml").is_file() and not p.name.startswith((".", "_"))
    )


def _resolve(name_or_path: str | Path) -> Path:
    """The folder of a recipe given by shipped name or by path (folder or recipe.toml)."""
    text = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or "/" in text or "\\" in text
    if not looks_like_path and text in list_recipes():
        return RECIPES_DIR / text
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file() and candidate.name == "recipe.toml":
        return candidate.parent.resolve()
    if candidate.is_dir():
        if not (candidate / "recipe.toml").is_file():
            raise RecipeError(f"{candidate} is not a recipe folder: it has no recipe.toml")
        return candidate.resolve()
    known = ", ".join(list_recipes()) or "none"
    raise RecipeError(f"unknown recipe {text!r} (available: {known}; or give a recipe folder)")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read: {e.strerror or e}") from None


def _format_validation(where: str, err: ValidationError) -> str:
    problems = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(top level)"
        reason = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        problems.append(f"{loc}: {reason}")
    return f"{where}: " + "; ".join(problems)


def _coerce_like(old: Any, value: Any, key: str) -> Any:
    """``value`` converted to the type of ``old`` when it is given as a string."""
    if not isinstance(value, str) or isinstance(old, str) or old is None:
        return value
    try:
        if isinstance(old, bool):
            lowered = value.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(old, int):
            return int(value)
        if isinstance(old, float):
            return float(value)
    except ValueError:
        raise RecipeError(
            f"override {key}={value!r}: expected a {type(old).__name__} like {old!r}"
        ) from None
    return value


_SECTIONS: dict[str, type[BaseModel]] = {"train": TrainConfig, "gates": Gates, "profiles": Profiles}
_TOP_LEVEL = {"name", "description", "preprocess"}


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of the raw recipe table with dotted-key ``overrides`` applied.

    ``train.*``, ``gates.*`` and ``profiles.*`` keys must be fields of those tables;
    ``data.*`` keys must already exist in ``[data]`` (so a typo fails); values given as
    strings are converted to the type of the value they replace.
    """
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        parts = str(key).split(".")
        if len(parts) == 1 and parts[0] in _TOP_LEVEL:
            out[parts[0]] = value
            continue
        section, rest = parts[0], parts[1:]
        if not rest or any(not p for p in rest):
            raise RecipeError(f"{source}: bad override key {key!r} (expected e.g. 'train.epochs')")
        if section in _SECTIONS:
            fields = _SECTIONS[section].model_fields
            if len(rest) != 1 or rest[0] not in fields:
                raise RecipeError(
                    f"{source}: bad override key {key!r}: {section} has no field {'.'.join(rest)!r}"
                    f" (fields: {', '.join(fields)})"
                )
            table = out.setdefault(section, {})
            if not isinstance(table, dict):
                raise RecipeError(f"{source}: [{section}] is not a table")
            table[rest[0]] = _coerce_like(table.get(rest[0]), value, key)
        elif section == "data":
            node: Any = out.get("data", {})
            for p in rest[:-1]:
                node = node.get(p) if isinstance(node, dict) else None
            if not isinstance(node, dict) or rest[-1] not in node:
                known = ", ".join(sorted(out.get("data", {}))) or "none"
                raise RecipeError(
                    f"{source}: bad override key {key!r}: no such key in [data] (keys: {known})"
                )
            node[rest[-1]] = _coerce_like(node[rest[-1]], value, key)
        else:
            raise RecipeError(
                f"{source}: bad override key {key!r}: unknown section {section!r} "
                "(data, train, gates, profiles)"
            )
    return out


def load_recipe(
    name_or_path: str | Path,
    overrides: dict[str, Any] | None = None,
    small: bool = False,
) -> Recipe:
    """Load and validate a recipe by shipped name or folder path.

    ``small`` applies the recipe's ``[small]`` overrides; ``overrides`` (dotted keys,
    e.g. ``{"train.epochs": 3}``) are applied after them.  Raises ``RecipeError``.
    """
    folder = _resolve(name_or_path)
    toml_path = folder / "recipe.toml"
    raw = _read_toml(toml_path)
    if not isinstance(raw.get("small", {}), dict):
        raise RecipeError(f"{toml_path}: small: must be a table of dotted keys")
    if small:
        raw = apply_overrides(raw, raw.get("small", {}), f"{toml_path} [small]")
    if overrides:
        raw = apply_overrides(raw, overrides, f"recipe {raw.get('name', folder.name)!r}")
    if "path" in raw:
        raise RecipeError(f"{toml_path}: path: unknown key")
    try:
        recipe = Recipe.model_validate({**raw, "path": folder})
    except ValidationError as e:
        raise RecipeError(_format_validation(str(toml_path), e)) from None
    if recipe.preprocess not in FEATURE_PIPELINES:
        known = ", ".join(sorted(FEATURE_PIPELINES))
        raise RecipeError(
            f"{toml_path}: preprocess: unknown feature pipeline {recipe.preprocess!r} "
            f"(known: {known})"
        )
    if not (folder / "__init__.py").is_file():
        raise RecipeError(f"{folder}: a recipe needs an __init__.py with load_data and build_model")
    return recipe


def _import_recipe_module(name: str, folder: Path) -> types.ModuleType:
    folder = folder.resolve()
    if folder.parent == RECIPES_DIR.resolve():
        module_name = f"{_BUILTIN_PACKAGE}.{folder.name}"
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise RecipeError(f"recipe {name!r}: cannot import {module_name}: {e}") from e
    else:
        module = _import_user_module(name, folder)
    for attr in ("load_data", "build_model"):
        if not callable(getattr(module, attr, None)):
            raise RecipeError(f"recipe {name!r}: {module.__file__} defines no function {attr}()")
    return module


def _import_user_module(name: str, folder: Path) -> types.ModuleType:
    """Import a recipe folder outside models/ by file path (once per folder)."""
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    module_name = f"tinyfleet_user_recipe_{digest}"
    cached = sys.modules.get(module_name)
    if cached is not None:
        return cached
    init = folder / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        module_name, init, submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise RecipeError(f"recipe {name!r}: cannot load {init}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise RecipeError(
            f"recipe {name!r}: {init} failed to import: {type(e).__name__}: {e}"
        ) from e
    return module


def load_dataset(recipe: Recipe) -> Dataset:
    """The recipe's data: ``module.load_data(recipe.data, recipe.train.seed)``."""
    dataset = recipe.module.load_data(copy.deepcopy(recipe.data), recipe.train.seed)
    if not isinstance(dataset, Dataset):
        raise RecipeError(
            f"recipe {recipe.name!r}: load_data returned {type(dataset).__name__}, not a Dataset"
        )
    if dataset.monitor:
        monitor = get_monitor(recipe.preprocess)
        if monitor is None or list(monitor.names) != dataset.monitor_names:
            expected = "none" if monitor is None else ", ".join(monitor.names)
            raise RecipeError(
                f"recipe {recipe.name!r}: load_data gives sensor stats "
                f"{dataset.monitor_names}; devices running {recipe.preprocess!r} compute: "
                f"{expected}"
            )
    return dataset


def build_model(recipe: Recipe, dataset: Dataset) -> keras.Model:
    """The recipe's untrained Keras model, with Normalization layers adapted on x_train."""
    import keras  # type: ignore[import-untyped]

    model = recipe.module.build_model(
        dataset.input_shape, dataset.n_classes, recipe.train.model_dump()
    )
    if not isinstance(model, keras.Model):
        raise RecipeError(
            f"recipe {recipe.name!r}: build_model returned {type(model).__name__}, "
            "not a keras.Model"
        )
    out_shape = tuple(model.outputs[0].shape) if model.outputs else ()
    if len(out_shape) != 2 or out_shape[-1] != dataset.n_classes:
        raise RecipeError(
            f"recipe {recipe.name!r}: model output shape {out_shape} does not give "
            f"{dataset.n_classes} class probabilities"
        )
    for layer in _walk_layers(model):
        if (
            isinstance(layer, keras.layers.Normalization)
            and getattr(layer, "input_mean", 1) is None
        ):
            layer.adapt(dataset.x_train)
    return model


def _walk_layers(model: Any) -> list[Any]:
    layers = []
    for layer in getattr(model, "layers", []):
        layers.append(layer)
        if hasattr(layer, "layers"):
            layers.extend(_walk_layers(layer))
    return layers
