"""``tinyfleet demo``: the loop on embedded defaults, from nothing to a fleet running a new version.

1. a signing key, then the ``vibration`` pipeline: train, quantize, evaluate, gate, register;
2. an embedded Mosquitto, the fleet service, and N simulated devices running the real
   agent, each fed by its own simulated sensor;
3. a rollout in waves (canary first), then a retrained version rolled out the same way;
4. a summary with the figures of each step.

Everything lives in the host's home folder; ``keep=True`` leaves broker, service and
fleet running until Ctrl-C.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tinyfleet.host.errors import GateRejectedError, KeyError_, RolloutFailedError
from tinyfleet.host.pipeline import PipelineResult, Reporter, run_pipeline
from tinyfleet.host.settings import HostSettings, load_settings


@dataclass
class DemoOptions:
    devices: int = 20
    small: bool = False
    broker_url: str | None = None
    keep: bool = False
    rate_hz: float = 2.0
    soak_s: float = 2.0
    fresh_devices: bool = True


@dataclass
class DemoSummary:
    steps: list[dict[str, Any]] = field(default_factory=list)

    def add(self, step: str, seconds: float, **figures: Any) -> None:
        self.steps.append({"step": step, "seconds": round(seconds, 2), **figures})


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RolloutFailedError(f"demo: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.1)


def _pipeline(
    settings: HostSettings, opts: DemoOptions, reporter: Reporter, **kw: Any
) -> PipelineResult:
    result = run_pipeline(settings, "vibration", small=opts.small, reporter=reporter, **kw)
    if not result.passed:
        failed = "; ".join(f"{g.name}: {g.reason}" for g in result.gates if not g.passed)
        raise GateRejectedError(f"demo: the vibration model failed its gates: {failed}")
    return result


def _artifact_figures(result: PipelineResult) -> dict[str, Any]:
    by = {(m.format, m.precision): m for m in result.metrics}
    i8, f32 = by[("tflite", "int8")], by[("tflite", "float32")]
    fits = [f.profile for f in i8.fits if f.kind == "mcu" and f.fits]
    return {
        "version": result.version.ref if result.version is not None else None,
        "int8_accuracy": round(i8.accuracy or 0.0, 4),
        "float_accuracy": round(f32.accuracy or 0.0, 4),
        "int8_bytes": i8.bytes,
        "size_vs_float": round(i8.bytes / f32.bytes, 3),
        "int8_speedup": None if i8.speedup_over_float is None else round(i8.speedup_over_float, 2),
        "tflm_arena_bytes": i8.arena_bytes,
        "fits": fits,
    }


def run_demo(
    settings: HostSettings,
    opts: DemoOptions,
    *,
    reporter: Reporter | None = None,
    say: Callable[[str], None] = lambda _msg: None,
    stop: threading.Event | None = None,
) -> DemoSummary:
    from tinyfleet.host.broker import EmbeddedBroker
    from tinyfleet.host.db.tables import DeviceRow, TelemetryRow
    from tinyfleet.host.fleet.rollout import RolloutSpec
    from tinyfleet.host.fleet.service import FleetService
    from tinyfleet.host.keys import init_keys, load_signing_key
    from tinyfleet.sim.fleet import DeviceSpec, InProcessFleet, SensorFeed, provision

    rep = reporter or Reporter()
    summary = DemoSummary()
    try:
        load_signing_key(settings.keys_dir)
    except KeyError_:
        init_keys(settings.keys_dir)

    say("1/5 training, quantizing and evaluating the vibration model")
    t0 = time.monotonic()
    v1 = _pipeline(settings, opts, rep)
    summary.add("pipeline v1", time.monotonic() - t0, **_artifact_figures(v1))

    broker = None
    service = fleet = feed = None
    try:
        say("2/5 starting the broker, the fleet service and the simulated fleet")
        t0 = time.monotonic()
        url = opts.broker_url
        if url is None:
            broker = EmbeddedBroker(settings.home / "broker").start()
            url = broker.url
        settings = load_settings(
            settings.home, database_url=settings.database_url, broker_url=url, fleet=settings.fleet
        )
        service = FleetService(settings)
        service.start()
        if not service.wait_connected(15):
            raise RolloutFailedError(f"demo: the fleet service could not connect to {url}")
        sim_root = settings.home / "sim"
        if opts.fresh_devices and sim_root.exists():
            shutil.rmtree(sim_root)
        specs = [
            DeviceSpec(
                f"pump-{i:03d}", tags=["line-a" if i % 2 == 0 else "line-b"], groups=["plant-1"]
            )
            for i in range(opts.devices)
        ]
        configs = [
            provision(
                sim_root,
                spec,
                fleet=settings.fleet,
                broker_url=url,
                host_public_key=settings.keys_dir / "host.pub",
                heartbeat_s=2.0,
                window=20,
                chunk_timeout_s=2.0,
            )
            for spec in specs
        ]
        fleet = InProcessFleet(configs, tick_s=0.25)
        fleet.start()
        engine = service.registry.engine

        def online() -> bool:
            with Session(engine) as s:
                n = s.scalar(
                    select(func.count())
                    .select_from(DeviceRow)
                    .where(DeviceRow.fleet == settings.fleet, DeviceRow.online.is_(True))
                )
            return int(n or 0) >= opts.devices

        _wait(online, 30, f"{opts.devices} devices coming online")
        feed = SensorFeed(fleet, rate_hz=opts.rate_hz)
        feed.start()
        summary.add("fleet up", time.monotonic() - t0, devices=opts.devices, broker=url)

        def rollout(ref: str, waves: list[str], label: str) -> None:
            say(f"{label}: rolling out {ref} in waves {','.join(waves)}")
            t = time.monotonic()
            egress0 = service.artifacts.bytes_out
            rid = service.orchestrator.create(
                # this run's devices (the database may remember devices of earlier runs)
                RolloutSpec(
                    ref=ref,
                    targets=[s.device for s in specs],
                    waves=waves,
                    soak_s=opts.soak_s,
                    wave_timeout_s=60,
                ),
                settings.user,
            )
            last = None
            while True:
                view = service.orchestrator.view(rid)
                state = (view.row["state"], view.row["wave"], tuple(sorted(view.counts.items())))
                if state != last:
                    counts = ", ".join(f"{k} {v}" for k, v in sorted(view.counts.items()))
                    say(
                        f"    {view.row['state']:<11} wave {view.row['wave'] + 1}/{view.row['waves_total']}  {counts}"
                    )
                    last = state
                if view.row["state"] in ("completed", "rolled_back", "aborted", "failed"):
                    break
                if time.monotonic() - t > 180:
                    raise RolloutFailedError(f"demo: rollout {rid} did not finish in 180 s")
                time.sleep(0.2)
            if view.row["state"] != "completed":
                raise RolloutFailedError(
                    f"demo: rollout {rid} ended {view.row['state']}: {view.row['reason']}"
                )
            version = service.registry.get(ref)
            art = next(a for a in version.artifacts if a.sha256 == view.row["artifact_sha256"])
            summary.add(
                label,
                time.monotonic() - t,
                rollout=rid,
                version=ref,
                waves=len({d["wave"] for d in view.devices}),
                devices_succeeded=view.counts.get("succeeded", 0),
                model_bytes=art.size,
                reference_bytes=version.reference.size,
                host_egress_bytes=service.artifacts.bytes_out - egress0,
            )

        assert v1.version is not None
        rollout(v1.version.ref, ["1", "25%", "100%"], "3/5 rollout v1")
        time.sleep(max(2.0, 3.0 / opts.rate_hz))
        acc1 = feed.accuracy()

        say("4/5 retraining (new seed) and rolling the new version out")
        t0 = time.monotonic()
        seed = int(v1.info.get("seed") or 42) + 1
        v2 = _pipeline(
            settings, opts, rep, overrides={"train.seed": seed}, parent_version=v1.version.number
        )
        summary.add(
            "pipeline v2", time.monotonic() - t0, parent=v1.version.ref, **_artifact_figures(v2)
        )
        assert v2.version is not None
        rollout(v2.version.ref, ["1", "50%", "100%"], "5/5 rollout v2")
        time.sleep(2.0)
        service.ingest.flush(10)
        with Session(engine) as s:
            records = int(
                s.scalar(
                    select(func.count())
                    .select_from(TelemetryRow)
                    .where(TelemetryRow.fleet == settings.fleet)
                )
                or 0
            )
        summary.add(
            "fleet",
            0.0,
            on_device_inferences=feed.inferences,
            on_device_accuracy=None
            if feed.accuracy() is None
            else round(feed.accuracy() or 0.0, 4),
            accuracy_after_v1=None if acc1 is None else round(acc1, 4),
            telemetry_records=records,
        )
        if opts.keep:
            say(
                f"running: broker {url}, home {settings.home}; in another shell: "
                f"tinyfleet --home {settings.home} devices list  — Ctrl-C stops everything"
            )
            (stop or threading.Event()).wait()
        return summary
    finally:
        if feed is not None:
            feed.stop()
        if fleet is not None:
            fleet.stop()
        if service is not None:
            service.stop()
        if broker is not None:
            broker.stop()
