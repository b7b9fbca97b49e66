"""Quality gates: the checks a version must pass before it may ever be rolled out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict


class GateResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    passed: bool
    value: float | None
    threshold: float | None
    reason: str


class _Fit(Protocol):
    @property
    def profile(self) -> str: ...
    @property
    def fits(self) -> bool: ...
    @property
    def reasons(self) -> list[str]: ...


class _Metrics(Protocol):
    @property
    def format(self) -> str: ...
    @property
    def precision(self) -> str: ...
    @property
    def accuracy(self) -> float | None: ...
    @property
    def bytes(self) -> int: ...
    @property
    def fits(self) -> Sequence[_Fit]: ...


class GateSpec(Protocol):
    @property
    def min_accuracy(self) -> float | None: ...
    @property
    def max_int8_drop(self) -> float | None: ...
    @property
    def max_bytes(self) -> int | None: ...
    @property
    def must_fit(self) -> list[str]: ...


def _label(m: _Metrics) -> str:
    return f"{m.format}-{m.precision}"


def evaluate_gates(spec: GateSpec, metrics: Sequence[_Metrics]) -> list[GateResult]:
    """Every gate of ``spec`` applied to the evaluated artifacts; all must pass."""
    results: list[GateResult] = []
    by_key = {(m.format, m.precision): m for m in metrics}

    if spec.min_accuracy is not None:
        for m in metrics:
            name = f"accuracy[{_label(m)}]"
            if m.accuracy is None:
                results.append(
                    GateResult(
                        name=name,
                        passed=False,
                        value=None,
                        threshold=spec.min_accuracy,
                        reason="accuracy was not measured (no evaluation data)",
                    )
                )
                continue
            ok = m.accuracy >= spec.min_accuracy
            results.append(
                GateResult(
                    name=name,
                    passed=ok,
                    value=m.accuracy,
                    threshold=spec.min_accuracy,
                    reason=f"{m.accuracy:.2%} {'>=' if ok else '<'} {spec.min_accuracy:.2%}",
                )
            )

    if spec.max_int8_drop is not None:
        for fmt in ("tflite", "onnx"):
            f32, i8 = by_key.get((fmt, "float32")), by_key.get((fmt, "int8"))
            if f32 is None or i8 is None or f32.accuracy is None or i8.accuracy is None:
                continue
            drop = f32.accuracy - i8.accuracy
            ok = drop <= spec.max_int8_drop
            results.append(
                GateResult(
                    name=f"int8_drop[{fmt}]",
                    passed=ok,
                    value=drop,
                    threshold=spec.max_int8_drop,
                    reason=f"int8 is {drop * 100:+.2f} points below float32 "
                    f"({'within' if ok else 'over'} {spec.max_int8_drop * 100:.2f})",
                )
            )

    primary = by_key.get(("tflite", "int8"))
    if spec.max_bytes is not None:
        if primary is None:
            results.append(
                GateResult(
                    name="max_bytes",
                    passed=False,
                    value=None,
                    threshold=float(spec.max_bytes),
                    reason="no int8 TFLite artifact to measure",
                )
            )
        else:
            ok = primary.bytes <= spec.max_bytes
            results.append(
                GateResult(
                    name="max_bytes",
                    passed=ok,
                    value=float(primary.bytes),
                    threshold=float(spec.max_bytes),
                    reason=f"int8 TFLite is {primary.bytes} B ({'<=' if ok else '>'} {spec.max_bytes} B)",
                )
            )

    for profile in spec.must_fit:
        name = f"fits[{profile}]"
        fit = (
            None
            if primary is None
            else next((f for f in primary.fits if f.profile == profile), None)
        )
        if fit is None:
            results.append(
                GateResult(
                    name=name,
                    passed=False,
                    value=None,
                    threshold=None,
                    reason=f"no MCU fit measured for {profile} (needs an int8 TFLite artifact)",
                )
            )
        else:
            results.append(
                GateResult(
                    name=name,
                    passed=fit.fits,
                    value=None,
                    threshold=None,
                    reason="fits" if fit.fits else "; ".join(fit.reasons) or "does not fit",
                )
            )
    return results


def rejection_reasons(results: Sequence[GateResult]) -> list[str]:
    return [f"{r.name}: {r.reason}" for r in results if not r.passed]
