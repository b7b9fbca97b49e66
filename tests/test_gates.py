"""Quality gates."""

from __future__ import annotations

from dataclasses import dataclass, field

from tinyfleet.host.gates import evaluate_gates, rejection_reasons


@dataclass
class Fit:
    profile: str
    fits: bool
    reasons: list[str] = field(default_factory=list)


@dataclass
class M:
    format: str
    precision: str
    accuracy: float | None
    bytes: int
    fits: list[Fit] = field(default_factory=list)


@dataclass
class Spec:
    min_accuracy: float | None = 0.9
    max_int8_drop: float | None = 0.01
    max_bytes: int | None = 10_000
    must_fit: list[str] = field(default_factory=lambda: ["cortex-m4"])


def _metrics(int8_acc: float = 0.95, int8_bytes: int = 5_000, fits: bool = True) -> list[M]:
    return [
        M("tflite", "float32", 0.955, 20_000),
        M(
            "tflite",
            "int8",
            int8_acc,
            int8_bytes,
            [Fit("cortex-m4", fits, [] if fits else ["arena too big"])],
        ),
    ]


def test_all_pass() -> None:
    results = evaluate_gates(Spec(), _metrics())
    assert results and all(r.passed for r in results)
    names = {r.name for r in results}
    assert {"accuracy[tflite-int8]", "int8_drop[tflite]", "max_bytes", "fits[cortex-m4]"} <= names


def test_each_gate_can_fail() -> None:
    assert not next(
        r
        for r in evaluate_gates(Spec(), _metrics(int8_acc=0.85))
        if r.name == "accuracy[tflite-int8]"
    ).passed
    drop = next(
        r for r in evaluate_gates(Spec(), _metrics(int8_acc=0.93)) if r.name == "int8_drop[tflite]"
    )
    assert not drop.passed and abs(drop.value - 0.025) < 1e-9
    assert not next(
        r for r in evaluate_gates(Spec(), _metrics(int8_bytes=20_000)) if r.name == "max_bytes"
    ).passed
    fit = next(
        r for r in evaluate_gates(Spec(), _metrics(fits=False)) if r.name == "fits[cortex-m4]"
    )
    assert not fit.passed and "arena too big" in fit.reason
    assert rejection_reasons(evaluate_gates(Spec(), _metrics(fits=False))) == [
        "fits[cortex-m4]: arena too big"
    ]


def test_missing_measurements_fail_rather_than_pass() -> None:
    only_onnx = [M("onnx", "float32", None, 100)]
    results = evaluate_gates(Spec(), only_onnx)
    assert not any(r.passed for r in results)


def test_no_gates_no_results() -> None:
    assert evaluate_gates(Spec(None, None, None, []), _metrics()) == []
