"""The model pipeline: train → quantize → evaluate → gate → register.

Each step reads and writes a *run folder* (``<home>/runs/<recipe>-<stamp>``), so the
steps can run on their own (``tinyfleet train``, ``quantize``, ``evaluate``) or
together (``tinyfleet pipeline``), and a user's own model enters at the quantize
step (``tinyfleet models import``).

Run folder layout::

    run.json          what was run: recipe, seed, data fingerprint, code version, classes …
    model.keras       the trained float model (recipes only)
    data.npz          calibration inputs, validation and held-out evaluation data
    artifacts/        model_float32.tflite, model_int8.tflite, model_float32.onnx, model_int8.onnx
    artifacts.json    what quantize produced and with which settings
    metrics.json      what evaluate measured
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tinyfleet.agent import drift
from tinyfleet.host.errors import CalibrationError, ModelFileError, UsageError
from tinyfleet.host.gates import GateResult, evaluate_gates, rejection_reasons
from tinyfleet.host.settings import HostSettings

CALIBRATION_SAMPLES = 200


class Reporter:
    """Progress sink for long steps; the CLI draws it on stderr, tests ignore it."""

    def stage(self, name: str) -> None:  # a new step starts
        pass

    def step(self, done: int, total: int, info: str = "") -> None:  # progress inside a step
        pass

    def done(self, name: str, seconds: float) -> None:  # a step finished
        pass


@contextmanager
def _stage(reporter: Reporter, name: str, timings: dict[str, float]) -> Iterator[None]:
    reporter.stage(name)
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)
    reporter.done(name, timings[name])


def code_version() -> str:
    """The installed tinyfleet version plus, in a source checkout, its git commit."""
    try:
        version = metadata.version("tinyfleet")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        version = "0+unknown"
    src = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{head}{'.dirty' if dirty else ''}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


@dataclass
class RunFolder:
    """A pipeline run on disk."""

    path: Path

    @property
    def info(self) -> dict[str, Any]:
        try:
            value: dict[str, Any] = json.loads((self.path / "run.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"{self.path} is not a tinyfleet run folder ({exc})") from None
        return value

    def write_info(self, info: dict[str, Any]) -> None:
        _write_json(self.path / "run.json", info)

    @property
    def artifacts_dir(self) -> Path:
        return self.path / "artifacts"

    def data(self) -> dict[str, np.ndarray]:
        try:
            with np.load(self.path / "data.npz") as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise UsageError(f"{self.path}: cannot read data.npz ({exc})") from None

    @classmethod
    def create(cls, runs_dir: Path, name: str) -> RunFolder:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        base = runs_dir / f"{name}-{stamp}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        path.mkdir(parents=True)
        return cls(path)


@dataclass
class PipelineResult:
    run: RunFolder
    info: dict[str, Any]
    metrics: list[Any]
    gates: list[GateResult]
    version: Any | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_json(self) -> dict[str, Any]:
        return {
            "run": str(self.run.path),
            "model": self.info.get("model"),
            "recipe": self.info.get("recipe"),
            "data_fingerprint": self.info.get("data_fingerprint"),
            "seed": self.info.get("seed"),
            "code_version": self.info.get("code_version"),
            "artifacts": [m.model_dump(mode="json") for m in self.metrics],
            "gates": [g.model_dump(mode="json") for g in self.gates],
            "passed": self.passed,
            "version": None if self.version is None else self.version.model_dump(mode="json"),
            "timings_s": self.timings,
        }


# --------------------------------------------------------------------------- steps


def train_step(
    settings: HostSettings,
    recipe_ref: str,
    *,
    small: bool = False,
    overrides: dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    timings: dict[str, float] | None = None,
) -> RunFolder:
    """Load the recipe's data, train the float model, write a run folder."""
    from tinyfleet.host import recipes, train

    rep = reporter or Reporter()
    t = timings if timings is not None else {}
    recipe = recipes.load_recipe(recipe_ref, overrides=overrides, small=small)
    with _stage(rep, "data", t):
        dataset = recipes.load_dataset(recipe)
    with _stage(rep, "train", t):

        def on_epoch(epoch: int, epochs: int, logs: dict[str, Any]) -> None:
            acc = logs.get("val_accuracy", logs.get("accuracy"))
            rep.step(epoch, epochs, f"val_acc={acc:.3f}" if isinstance(acc, float) else "")

        model = train.train(recipe, dataset, progress=on_epoch)
        float_acc = train.keras_accuracy(model, dataset.x_test, dataset.y_test)
    run = RunFolder.create(settings.runs_dir, recipe.name)
    model.save(run.path / "model.keras")
    rng = np.random.default_rng(recipe.train.seed)
    cal_idx = rng.choice(
        len(dataset.x_train), size=min(CALIBRATION_SAMPLES, len(dataset.x_train)), replace=False
    )
    arrays: dict[str, np.ndarray] = {
        "x_cal": dataset.x_train[np.sort(cal_idx)],
        "x_val": dataset.x_val,
        "y_val": dataset.y_val,
        "x_eval": dataset.x_test,
        "y_eval": dataset.y_test,
    }
    # sensor stats of the validation and evaluation samples (drift reference profile)
    for key, split in (("m_val", "val"), ("m_eval", "test")):
        if split in dataset.monitor:
            arrays[key] = dataset.monitor[split]
    np.savez(run.path / "data.npz", **arrays)  # type: ignore[arg-type]
    run.write_info(
        {
            "source": "recipe",
            "model": recipe.name,
            "recipe": recipe.name,
            "recipe_sha256": recipe.sha256 if hasattr(recipe, "sha256") else None,
            "small": small,
            "overrides": overrides or {},
            "seed": recipe.train.seed,
            "data_fingerprint": dataset.fingerprint(),
            "code_version": code_version(),
            "classes": list(dataset.class_names),
            "feature_names": dataset.feature_names,
            "preprocess": recipe.preprocess,
            "monitor": recipe.preprocess if dataset.monitor else None,
            "monitor_names": dataset.monitor_names if dataset.monitor else None,
            "gates": recipe.gates.model_dump(mode="json"),
            "profiles": list(recipe.profiles.targets),
            "train": {
                "epochs": recipe.train.epochs,
                "batch_size": recipe.train.batch_size,
                "learning_rate": recipe.train.learning_rate,
                "keras_test_accuracy": float_acc,
                "samples": {
                    "train": len(dataset.x_train),
                    "val": len(dataset.x_val),
                    "test": len(dataset.x_test),
                },
            },
            "versions": {
                "python": platform.python_version(),
                "tensorflow": _pkg_version("tensorflow-cpu") or _pkg_version("tensorflow"),
                "numpy": np.__version__,
            },
            "created_at": _now(),
            "created_by": settings.user,
        }
    )
    return run


def _pkg_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def quantize_step(
    run: RunFolder, *, reporter: Reporter | None = None, timings: dict[str, float] | None = None
) -> list[Any]:
    """Export every artifact of the run's model (TFLite f32/int8, ONNX f32/int8)."""
    from tinyfleet.host import quantize

    rep = reporter or Reporter()
    t = timings if timings is not None else {}
    info = run.info
    data = run.data()
    if run.artifacts_dir.exists():
        shutil.rmtree(run.artifacts_dir)
    run.artifacts_dir.mkdir()
    with _stage(rep, "quantize", t):
        if info["source"] == "recipe":
            import keras  # type: ignore[import-untyped]

            model = keras.models.load_model(run.path / "model.keras")
            files = quantize.export_artifacts(
                model, data["x_cal"], run.artifacts_dir, progress=lambda s: rep.step(0, 0, s)
            )
        else:
            files = quantize.export_from_file(
                Path(info["source_path"]), data["x_cal"], run.artifacts_dir
            )
    _write_json(
        run.path / "artifacts.json",
        [
            {
                "file": f.path.name,
                "format": f.format,
                "precision": f.precision,
                "quantization": f.quantization,
            }
            for f in files
        ],
    )
    return list(files)


def _load_artifacts(run: RunFolder) -> list[Any]:
    from tinyfleet.host.quantize import ArtifactFile

    try:
        entries = json.loads((run.path / "artifacts.json").read_text())
    except OSError:
        raise UsageError(f"{run.path}: no artifacts yet; run `tinyfleet quantize` first") from None
    return [
        ArtifactFile(
            path=run.artifacts_dir / e["file"],
            format=e["format"],
            precision=e["precision"],
            quantization=e["quantization"],
        )
        for e in entries
    ]


def _profiles(names: list[str]) -> list[Any]:
    from tinyfleet.agent.profiles import get_profile

    return [get_profile(n) for n in names]


def evaluate_step(
    run: RunFolder,
    *,
    reporter: Reporter | None = None,
    timings: dict[str, float] | None = None,
    latency_runs: int = 200,
) -> tuple[list[Any], list[GateResult]]:
    """Measure every artifact on the runtime a device uses, then apply the gates."""
    from tinyfleet.host import evaluate
    from tinyfleet.host.recipes import Gates

    rep = reporter or Reporter()
    t = timings if timings is not None else {}
    info = run.info
    data = run.data()
    artifacts = _load_artifacts(run)
    with _stage(rep, "evaluate", t):
        x_eval, y_eval = data.get("x_eval"), data.get("y_eval")
        metrics = evaluate.evaluate_all(
            artifacts,
            x_eval,
            y_eval,
            _profiles(info["profiles"]),
            latency_runs=latency_runs,
            progress=lambda done, total, what: rep.step(done, total, what),
        )
    gates = evaluate_gates(Gates.model_validate(info["gates"]), metrics)
    _write_json(
        run.path / "metrics.json",
        {
            "artifacts": [m.model_dump(mode="json") for m in metrics],
            "gates": [g.model_dump(mode="json") for g in gates],
        },
    )
    return metrics, gates


def _reference_bundle(run: RunFolder, metrics: list[Any]) -> bytes:
    """Drift profile and health-check references.

    The profile is the validation data's features and the primary artifact's outputs.
    When the run has the sensor stats of the validation samples (``m_val`` in data.npz,
    the monitor named in run.json), the profile carries them after the features: devices
    then watch them too.
    """
    from tinyfleet.agent.runtime import load_model

    info = run.info
    data = run.data()
    artifacts = _load_artifacts(run)
    by_key = {(a.format, a.precision): a for a in artifacts}
    primary = by_key.get(("tflite", "int8")) or artifacts[0]
    x_ref = data["x_val"] if "x_val" in data else data["x_cal"]
    model = load_model(primary.path, primary.format)
    try:
        probs = model.predict(x_ref)
    finally:
        model.close()
    monitor = info.get("monitor")
    if "x_val" in data and "m_val" in data and monitor:
        profile = drift.build_profile(
            x_ref,
            probs,
            info.get("feature_names"),
            monitor=monitor,
            monitor_stats=data["m_val"],
            monitor_names=info.get("monitor_names"),
        )
    else:
        profile = drift.build_profile(x_ref, probs, info.get("feature_names"))
    if "x_eval" in data:
        hx, hy = drift.pick_health_inputs(data["x_eval"], data["y_eval"], seed=int(info["seed"]))
    else:
        hx = data["x_cal"][:8]
        hy = np.full(len(hx), -1)
    expected: dict[str, np.ndarray] = {}
    for art, m in zip(artifacts, metrics, strict=True):
        mdl = load_model(art.path, art.format)
        try:
            expected[m.sha256] = mdl.predict(hx)
        finally:
            mdl.close()
    health = drift.health_reference(hx, hy, expected)
    return drift.ReferenceBundle(profile=profile, health=health).to_bytes()


def register_step(
    settings: HostSettings,
    run: RunFolder,
    metrics: list[Any],
    gates: list[GateResult],
    *,
    parent_version: int | None = None,
    extra_lineage: dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    timings: dict[str, float] | None = None,
) -> Any:
    """Register the run's artifacts as a new version (rejected if a gate failed)."""
    from tinyfleet.host.keys import load_signing_key
    from tinyfleet.host.registry import NewArtifact, Registry

    rep = reporter or Reporter()
    t = timings if timings is not None else {}
    info = run.info
    artifacts = _load_artifacts(run)
    with _stage(rep, "register", t):
        signer = load_signing_key(settings.keys_dir)
        reference = _reference_bundle(run, metrics)
        passed = all(g.passed for g in gates)
        lineage = {
            "recipe": info.get("recipe"),
            "recipe_sha256": info.get("recipe_sha256"),
            "source": info["source"],
            "source_path": info.get("source_path"),
            "code_version": info["code_version"],
            "data_fingerprint": info.get("data_fingerprint"),
            "seed": info.get("seed"),
            "overrides": info.get("overrides", {}),
            "parent_version": parent_version,
            "quantization": {f"{a.format}-{a.precision}": a.quantization for a in artifacts},
            "train": info.get("train"),
            "versions": info.get("versions"),
            "run": run.path.name,
            **(extra_lineage or {}),
        }
        new = []
        for art, m in zip(artifacts, metrics, strict=True):
            new.append(
                NewArtifact(
                    path=art.path,
                    format=art.format,
                    precision=art.precision,
                    role="model",
                    input=m.input,
                    output=m.output,
                    arena_bytes=m.arena_bytes,
                    min_ram_bytes=m.arena_bytes,
                    metrics=m.model_dump(mode="json"),
                )
            )
        registry = Registry(settings.registry_dir, settings.database_url)
        version = registry.register(
            model=info["model"],
            artifacts=new,
            reference=reference,
            lineage=lineage,
            metrics={f"{m.format}-{m.precision}": m.model_dump(mode="json") for m in metrics},
            gates=[g.model_dump(mode="json") for g in gates],
            passed=passed,
            rejection_reasons=rejection_reasons(gates),
            preprocess=info.get("preprocess", "identity"),
            classes=info.get("classes") or [],
            signer=signer,
            created_by=settings.user,
            parent_version=parent_version,
        )
    return version


def run_pipeline(
    settings: HostSettings,
    recipe_ref: str,
    *,
    small: bool = False,
    overrides: dict[str, Any] | None = None,
    register: bool = True,
    parent_version: int | None = None,
    reporter: Reporter | None = None,
    latency_runs: int = 200,
) -> PipelineResult:
    timings: dict[str, float] = {}
    rep = reporter or Reporter()
    if register:  # fail before training, not after, when there is no key
        from tinyfleet.host.keys import load_signing_key

        load_signing_key(settings.keys_dir)
    run = train_step(
        settings, recipe_ref, small=small, overrides=overrides, reporter=rep, timings=timings
    )
    quantize_step(run, reporter=rep, timings=timings)
    metrics, gates = evaluate_step(run, reporter=rep, timings=timings, latency_runs=latency_runs)
    version = None
    if register:
        version = register_step(
            settings,
            run,
            metrics,
            gates,
            parent_version=parent_version,
            reporter=rep,
            timings=timings,
        )
    return PipelineResult(run, run.info, metrics, gates, version, timings)


def _load_array(path: Path, what: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{what} {path}: cannot read as a .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray) or arr.size == 0:
        raise CalibrationError(f"{what} {path}: empty or not a single array")
    return arr


def import_model(
    settings: HostSettings,
    path: Path,
    *,
    name: str,
    calibration: Path,
    eval_data: tuple[Path, Path] | None = None,
    classes: list[str] | None = None,
    preprocess: str = "identity",
    profiles: list[str] | None = None,
    gates: dict[str, Any] | None = None,
    register: bool = True,
    reporter: Reporter | None = None,
    latency_runs: int = 200,
) -> PipelineResult:
    """Bring a user's model (Keras, SavedModel, .tflite, .onnx) through the same path."""
    from tinyfleet.host.keys import load_signing_key
    from tinyfleet.host.recipes import Gates

    if register:
        load_signing_key(settings.keys_dir)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file or directory")
    x_cal = _load_array(calibration, "calibration data").astype(np.float32)
    arrays: dict[str, np.ndarray] = {"x_cal": x_cal}
    if eval_data is not None:
        x_eval = _load_array(eval_data[0], "evaluation inputs").astype(np.float32)
        y_eval = _load_array(eval_data[1], "evaluation labels")
        if y_eval.ndim != 1 or len(y_eval) != len(x_eval):
            raise CalibrationError(
                f"evaluation labels {eval_data[1]}: expected shape ({len(x_eval)},), got {y_eval.shape}"
            )
        if x_eval.shape[1:] != x_cal.shape[1:]:
            raise CalibrationError(
                f"evaluation inputs have sample shape {x_eval.shape[1:]}, "
                f"calibration data has {x_cal.shape[1:]}"
            )
        arrays.update(x_eval=x_eval, y_eval=y_eval.astype(np.int64))
    gate_spec = Gates.model_validate(
        {"min_accuracy": None, "max_int8_drop": None, "max_bytes": None, "must_fit": []}
        | (gates or {})
    )
    timings: dict[str, float] = {}
    rep = reporter or Reporter()
    run = RunFolder.create(settings.runs_dir, name)
    try:
        np.savez(run.path / "data.npz", **arrays)  # type: ignore[arg-type]
        n_classes = len(classes) if classes else None
        run.write_info(
            {
                "source": "import",
                "source_path": str(path.resolve()),
                "model": name,
                "recipe": None,
                "seed": 0,
                "data_fingerprint": None,
                "code_version": code_version(),
                "classes": classes or [],
                "n_classes": n_classes,
                "feature_names": None,
                "preprocess": preprocess,
                "gates": gate_spec.model_dump(mode="json"),
                "profiles": profiles or ["cortex-m4", "cortex-m7", "esp32-s3", "rpi4"],
                "created_at": _now(),
                "created_by": settings.user,
            }
        )
        quantize_step(run, reporter=rep, timings=timings)
        metrics, gate_results = evaluate_step(
            run, reporter=rep, timings=timings, latency_runs=latency_runs
        )
    except BaseException:
        shutil.rmtree(run.path, ignore_errors=True)  # nothing half-written is left behind
        raise
    info = run.info
    if not info["classes"]:
        n = metrics[0].output.shape[-1] if metrics else 0
        info["classes"] = [str(i) for i in range(n)]
        run.write_info(info)
    version = None
    if register:
        version = register_step(settings, run, metrics, gate_results, reporter=rep, timings=timings)
    return PipelineResult(run, run.info, metrics, gate_results, version, timings)


ProgressFn = Callable[[int, int, str], None]
