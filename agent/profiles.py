"""Device profiles and the check of whether a model fits one.

Pure: numbers and arithmetic, no runtime imports.  The figures of each profile are
nominal for a typical board of its class; ``macs_per_cycle`` is an *effective* int8
rate (kernel library, memory stalls and per-layer overhead included), so the latency
it gives is an order-of-magnitude estimate and is labelled as such everywhere.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tinyfleet.agent.errors import ConfigError

__all__ = ["PROFILES", "DeviceProfile", "FitResult", "check_fit", "get_profile"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class DeviceProfile(BaseModel):
    """Memory, clock and runtime footprint of one class of device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["mcu", "linux"]
    ram_bytes: int = Field(gt=0)
    flash_bytes: int = Field(gt=0)
    clock_hz: int = Field(gt=0)
    macs_per_cycle: float = Field(gt=0, description="Effective int8 MACs per clock cycle.")
    runtime_flash_bytes: int = Field(
        ge=0, description="Code size of the interpreter and its kernels (TFLM) or runtime install."
    )
    ram_reserve_bytes: int = Field(
        ge=0, description="RAM taken by everything but the model: stack, application, OS."
    )
    description: str = ""


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            name="cortex-m4",
            kind="mcu",
            ram_bytes=256 * KiB,
            flash_bytes=1 * MiB,
            clock_hz=168_000_000,
            macs_per_cycle=0.5,
            runtime_flash_bytes=100 * KiB,
            ram_reserve_bytes=32 * KiB,
            description="STM32F4-class Cortex-M4F, TFLite Micro with CMSIS-NN (SMLAD dual MAC).",
        ),
        DeviceProfile(
            name="cortex-m7",
            kind="mcu",
            ram_bytes=512 * KiB,
            flash_bytes=2 * MiB,
            clock_hz=480_000_000,
            macs_per_cycle=1.0,
            runtime_flash_bytes=100 * KiB,
            ram_reserve_bytes=48 * KiB,
            description="STM32H7-class Cortex-M7, TFLite Micro with CMSIS-NN (dual issue).",
        ),
        DeviceProfile(
            name="esp32-s3",
            kind="mcu",
            ram_bytes=512 * KiB,
            flash_bytes=8 * MiB,
            clock_hz=240_000_000,
            macs_per_cycle=2.0,
            runtime_flash_bytes=120 * KiB,
            ram_reserve_bytes=160 * KiB,
            description="ESP32-S3 (internal SRAM only), TFLite Micro with ESP-NN SIMD; "
            "the reserve covers Wi-Fi, MQTT and FreeRTOS.",
        ),
        DeviceProfile(
            name="rpi4",
            kind="linux",
            ram_bytes=4 * GiB,
            flash_bytes=32 * GiB,
            clock_hz=1_500_000_000,
            macs_per_cycle=4.0,
            runtime_flash_bytes=64 * MiB,
            ram_reserve_bytes=512 * MiB,
            description="Raspberry Pi 4 (Cortex-A72), LiteRT or ONNX Runtime on one core; "
            "the reserve covers the OS and the agent's Python process.",
        ),
    )
}


def get_profile(name: str) -> DeviceProfile:
    """The profile called ``name``; ``ConfigError`` listing the valid names otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(
            f"unknown device profile {name!r}; valid profiles: {', '.join(sorted(PROFILES))}"
        ) from None


class FitResult(BaseModel):
    """Whether one model fits one device profile, and by what margin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str
    kind: Literal["mcu", "linux"]
    fits: bool
    ram_needed: int | None = Field(description="Arena + reserve (MCU); model + reserve (linux).")
    ram_limit: int
    flash_needed: int = Field(description="Model bytes + runtime code.")
    flash_limit: int
    macs: int | None
    est_latency_ms: float | None = Field(
        description="MACs / (clock x macs_per_cycle): an estimate, not a measurement."
    )
    latency_is_estimate: Literal[True] = True
    reasons: list[str] = Field(default_factory=list)


def _fmt(n: int) -> str:
    return f"{n:,} B"


def check_fit(
    profile: DeviceProfile,
    model_bytes: int,
    arena_bytes: int | None,
    macs: int | None,
    *,
    model_format: Literal["tflite", "onnx"] = "tflite",
) -> FitResult:
    """Check flash and RAM of ``profile`` against a model.

    On an MCU the model runs in place from flash under TFLite Micro: flash holds the
    model and the interpreter, RAM holds the tensor arena and ``ram_reserve_bytes``.
    Without a measured arena the RAM fit of an MCU is not established (does not fit).
    On a linux device the runtime keeps the model and a packed copy of its weights in
    RAM (``2 x model_bytes``, an estimate) and there is no arena.
    """
    reasons: list[str] = []
    flash_needed = model_bytes + profile.runtime_flash_bytes
    ram_needed: int | None
    if profile.kind == "mcu":
        if model_format != "tflite":
            reasons.append(f"{model_format} models have no runtime on an MCU (TFLite Micro only)")
        if arena_bytes is None:
            ram_needed = None
            reasons.append("tensor arena not measured; RAM fit not established")
        else:
            ram_needed = arena_bytes + profile.ram_reserve_bytes
    else:
        ram_needed = 2 * model_bytes + profile.ram_reserve_bytes
    if flash_needed > profile.flash_bytes:
        reasons.append(
            f"flash: needs {_fmt(flash_needed)} (model {_fmt(model_bytes)} + runtime "
            f"{_fmt(profile.runtime_flash_bytes)}) > {_fmt(profile.flash_bytes)}"
        )
    if ram_needed is not None and ram_needed > profile.ram_bytes:
        what = (
            f"arena {_fmt(arena_bytes)}"
            if arena_bytes is not None and profile.kind == "mcu"
            else f"model {_fmt(2 * model_bytes)}"
        )
        reasons.append(
            f"RAM: needs {_fmt(ram_needed)} ({what} + reserve "
            f"{_fmt(profile.ram_reserve_bytes)}) > {_fmt(profile.ram_bytes)}"
        )
    est = None
    if macs is not None:
        est = macs / (profile.clock_hz * profile.macs_per_cycle) * 1000.0
    return FitResult(
        profile=profile.name,
        kind=profile.kind,
        fits=not reasons,
        ram_needed=ram_needed,
        ram_limit=profile.ram_bytes,
        flash_needed=flash_needed,
        flash_limit=profile.flash_bytes,
        macs=macs,
        est_latency_ms=est,
        reasons=reasons,
    )
