"""Artifacts per recipe: accuracy, bytes, size ratio to float, p50/p99 latency, speed-up over float, arena.

Every recipe runs through the real pipeline (full configuration, no registration);
each artifact is measured on the runtime a device uses, float32 and int8 of the
same format in the same run, so ratios compare like with like.  "invoke" is the
runtime call alone (the kernels' speed, what the speed-up target is about);
"e2e" adds the float→int8→float conversion an application pays per call.
Targets (docs DESIGN): int8 ≤ 0.30× float bytes, ≥ 1.3× float speed on LiteRT,
≤ 1 point accuracy loss.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

RECIPES = ("vibration", "digits")
LATENCY_RUNS = 2000


def run() -> dict[str, Any]:
    from tinyfleet.host.pipeline import run_pipeline
    from tinyfleet.host.settings import load_settings

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as home:
        settings = load_settings(Path(home), environ={})
        for recipe in RECIPES:
            result = run_pipeline(settings, recipe, register=False, latency_runs=LATENCY_RUNS)
            rows = [m.model_dump(mode="json") for m in result.metrics]
            out[recipe] = {"artifacts": rows, "timings_s": result.timings}
            print(f"\n{recipe}  (train+quantize+evaluate {sum(result.timings.values()):.1f} s)")
            print(
                f"  {'artifact':<16}{'accuracy':>9}{'bytes':>10}{'size/f32':>9}"
                f"{'invoke p50 µs':>14}{'p99 µs':>8}{'speed-up':>9}"
                f"{'e2e p50 µs':>11}{'p99 µs':>8}{'e2e x':>7}{'arena B':>9}"
            )
            for m in result.metrics:
                ratio = "-" if m.size_ratio_to_float is None else f"{m.size_ratio_to_float:.3f}"
                speed = "-" if m.speedup_over_float is None else f"{m.speedup_over_float:.2f}x"
                e2e = (
                    "-" if m.e2e_speedup_over_float is None else f"{m.e2e_speedup_over_float:.2f}x"
                )
                arena = "-" if m.arena_bytes is None else str(m.arena_bytes)
                print(
                    f"  {m.format + ' ' + m.precision:<16}{m.accuracy * 100:>8.2f}%{m.bytes:>10}"
                    f"{ratio:>9}{m.invoke_p50_ms * 1e3:>14.2f}{m.invoke_p99_ms * 1e3:>8.2f}{speed:>9}"
                    f"{m.latency_p50_ms * 1e3:>11.2f}{m.latency_p99_ms * 1e3:>8.2f}{e2e:>7}{arena:>9}"
                )
            by = {(m.format, m.precision): m for m in result.metrics}
            f32, i8 = by.get(("tflite", "float32")), by.get(("tflite", "int8"))
            if f32 and i8:
                checks = {
                    "int8 bytes / float (≤ 0.30)": (
                        i8.bytes / f32.bytes,
                        i8.bytes / f32.bytes <= 0.30,
                    ),
                    "int8 speed-up on LiteRT (≥ 1.3x)": (
                        i8.speedup_over_float,
                        (i8.speedup_over_float or 0) >= 1.3,
                    ),
                    "int8 accuracy loss, points (≤ 1)": (
                        (f32.accuracy - i8.accuracy) * 100,
                        (f32.accuracy - i8.accuracy) * 100 <= 1.0,
                    ),
                }
                for label, (value, ok) in checks.items():
                    print(f"  target {label:<36} {value:.3f}  {'met' if ok else 'NOT MET'}")
                out[recipe]["targets"] = {
                    k: {"value": v, "met": ok} for k, (v, ok) in checks.items()
                }
    return out
