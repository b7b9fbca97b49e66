"""``tinyfleet demo``: the closed loop on embedded defaults, from nothing to a retrained fleet.

1. a signing key, then the ``vibration`` pipeline: train, quantize, evaluate, gate, register;
2. an embedded Mosquitto, the fleet service (ingest, drift monitor, retrain policy,
   rollout orchestrator, federated-run coordinator) and N simulated devices running
   the real agent, each fed by its own simulated sensor with part of its true labels;
3. a rollout in waves (canary first);
4. drift injected on the devices tagged ``line-b`` (their accelerometers' gain grows):
   the devices score it against the version's reference, the host raises alerts;
5. the retrain policy sees sustained drift on the cohort and starts a federated run on
   Flower (a SuperLink on the host, a SuperNode supervised by each agent, training on
   the device's labelled buffer); the result goes through quantize → evaluate → gate
   and, if it passes, is rolled out to the cohort;
6. the cohort's accuracy before, during and after, its alerts clearing, and a summary
   with the figures of each step.

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

COHORT_TAG = "line-b"
TERMINAL_ROLLOUT = ("completed", "rolled_back", "aborted", "failed")
TERMINAL_FL = ("registered", "rejected", "failed")


@dataclass
class DemoOptions:
    devices: int = 20
    small: bool = False
    broker_url: str | None = None
    keep: bool = False
    rate_hz: float = 20.0
    """Sensor windows (inferences) per second and device."""
    window: int = 100
    """Inferences per telemetry and drift window (smaller windows see less: docs/drift.md)."""
    label_rate: float = 0.5
    """Share of inferences whose true label the application hands to the agent."""
    cohort_fraction: float = 0.4
    """Share of the fleet tagged ``line-b``: the devices that drift."""
    drift: str = "gain"
    magnitude: float = 1.8
    rounds: int = 4
    local_epochs: int = 3
    max_samples: int = 300
    """Each device trains on its newest labelled samples."""
    soak_s: float = 2.0
    fresh_devices: bool = True


@dataclass
class DemoSummary:
    steps: list[dict[str, Any]] = field(default_factory=list)

    def add(self, step: str, seconds: float, **figures: Any) -> None:
        self.steps.append({"step": step, "seconds": round(seconds, 2), **figures})


def _wait(
    predicate: Callable[[], Any], timeout: float, what: str, stop: threading.Event | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RolloutFailedError(f"demo: {what} did not happen within {timeout:.0f} s")
        if stop is not None and stop.is_set():
            raise RolloutFailedError(f"demo: stopped while waiting for {what}")
        time.sleep(0.2)


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


class _Accuracy:
    """Accuracy of a set of devices between two moments, from the feed's ground truth."""

    def __init__(self, feed: Any, devices: list[str]) -> None:
        self.feed = feed
        self.devices = devices
        self.mark = feed.counts(devices)

    def reset(self) -> None:
        self.mark = self.feed.counts(self.devices)

    def since_mark(self) -> tuple[float | None, int]:
        n, ok = self.feed.counts(self.devices)
        dn, dok = n - self.mark[0], ok - self.mark[1]
        return (None if dn == 0 else round(dok / dn, 4)), dn


def run_demo(
    settings: HostSettings,
    opts: DemoOptions,
    *,
    reporter: Reporter | None = None,
    say: Callable[[str], None] = lambda _msg: None,
    stop: threading.Event | None = None,
) -> DemoSummary:
    from tinyfleet.host.broker import EmbeddedBroker
    from tinyfleet.host.db.tables import AlertRow, DeviceRow, FLRunRow, TelemetryRow
    from tinyfleet.host.fl.coordinator import CoordinatorOptions
    from tinyfleet.host.fleet.rollout import RolloutSpec
    from tinyfleet.host.fleet.service import FleetService
    from tinyfleet.host.keys import init_keys, load_signing_key
    from tinyfleet.sim.fleet import InProcessFleet, provision
    from tinyfleet.sim.scenario import Scenario, ScenarioFeed

    rep = reporter or Reporter()
    summary = DemoSummary()
    try:
        load_signing_key(settings.keys_dir)
    except KeyError_:
        init_keys(settings.keys_dir)

    say("1/6 training, quantizing and evaluating the vibration model")
    t0 = time.monotonic()
    v1 = _pipeline(settings, opts, rep)
    assert v1.version is not None
    summary.add("pipeline v1", time.monotonic() - t0, **_artifact_figures(v1))

    window_s = opts.window / opts.rate_hz
    baseline = settings.drift.baseline_windows
    broker = None
    service = fleet = feed = None
    try:
        say("2/6 starting the broker, the fleet service and the simulated fleet")
        t0 = time.monotonic()
        url = opts.broker_url
        if url is None:
            broker = EmbeddedBroker(settings.home / "broker").start()
            url = broker.url
        settings = load_settings(
            settings.home,
            database_url=settings.database_url,
            broker_url=url,
            fleet=settings.fleet,
            drift=settings.drift,
        )
        service = FleetService(settings)
        # Runs the retrain policy starts: a few rounds, then straight to a rollout.
        service.fl.options = CoordinatorOptions.model_validate(
            {
                **service.fl.options.model_dump(),
                "retrain": {
                    "rounds": opts.rounds,
                    "strategy": "fedavg",
                    "min_clients": 2,
                    "local_epochs": opts.local_epochs,
                    "round_timeout_s": 60.0,
                    # the newest samples: mostly the drifted sensor, some from before
                    "max_samples": opts.max_samples,
                    "auto_rollout": True,
                    "rollout": {"waves": ["1", "100%"], "soak_s": opts.soak_s},
                },
            }
        )
        service.start()
        if not service.wait_connected(15):
            raise RolloutFailedError(f"demo: the fleet service could not connect to {url}")
        sim_root = settings.home / "sim"
        if opts.fresh_devices and sim_root.exists():
            shutil.rmtree(sim_root)
        # Drift starts once every device has served v1 for its baseline windows (plus two).
        onset_s = (baseline + 2) * window_s
        scenario = Scenario.model_validate(
            {
                "fleet": {
                    "devices": opts.devices,
                    "id_prefix": "pump",
                    "seed": 7,
                    # at least as many drifting devices as the retrain policy asks for
                    "tags": {
                        COHORT_TAG: min(
                            1.0,
                            max(
                                opts.cohort_fraction,
                                settings.drift.retrain.min_devices / opts.devices,
                            ),
                        )
                    },
                    "groups": ["plant-1"],
                },
                "sensor": {"rate_hz": opts.rate_hz, "label_rate": opts.label_rate},
                "drift": [
                    {
                        "name": f"{opts.drift} x{opts.magnitude:g} on {COHORT_TAG}",
                        "kind": opts.drift,
                        "magnitude": opts.magnitude,
                        "select": {"tag": COHORT_TAG},
                        "at_s": onset_s,
                    }
                ],
            }
        ).check("demo")
        specs = scenario.device_specs()
        drifted = scenario.drift_targets()[0]
        clean = [s.device for s in specs if s.device not in set(drifted)]
        configs = [
            provision(
                sim_root,
                spec,
                fleet=settings.fleet,
                broker_url=url,
                host_public_key=settings.keys_dir / "host.pub",
                heartbeat_s=2.0,
                window=opts.window,
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
                    .where(
                        DeviceRow.fleet == settings.fleet,
                        DeviceRow.device.in_([sp.device for sp in specs]),
                        DeviceRow.online.is_(True),
                    )
                )
            return int(n or 0) >= opts.devices

        _wait(online, 30, f"{opts.devices} devices coming online", stop)
        summary.add(
            "fleet up",
            time.monotonic() - t0,
            devices=opts.devices,
            cohort=f"tag:{COHORT_TAG}",
            cohort_devices=len(drifted),
            broker=url,
        )

        def follow_rollout(rid: str, label: str, t: float) -> dict[str, Any]:
            last = None
            while True:
                view = service.orchestrator.view(rid)
                state = (view.row["state"], view.row["wave"], tuple(sorted(view.counts.items())))
                if state != last:
                    counts = ", ".join(f"{k} {v}" for k, v in sorted(view.counts.items()))
                    say(
                        f"    {view.row['state']:<11} wave {view.row['wave'] + 1}/"
                        f"{view.row['waves_total']}  {counts}"
                    )
                    last = state
                if view.row["state"] in TERMINAL_ROLLOUT:
                    break
                if time.monotonic() - t > 180:
                    raise RolloutFailedError(f"demo: rollout {rid} did not finish in 180 s")
                time.sleep(0.2)
            if view.row["state"] != "completed":
                raise RolloutFailedError(
                    f"demo: rollout {rid} ended {view.row['state']}: {view.row['reason']}"
                )
            ref = f"{view.row['model']}@{view.row['version']}"
            version = service.registry.get(ref)
            art = next(a for a in version.artifacts if a.sha256 == view.row["artifact_sha256"])
            return {
                "rollout": rid,
                "version": ref,
                "waves": len({d["wave"] for d in view.devices}),
                "devices_succeeded": view.counts.get("succeeded", 0),
                "model_bytes": art.size,
                "reference_bytes": version.reference.size,
            }

        say(f"3/6 rolling out {v1.version.ref} in waves 1,25%,100%")
        t = time.monotonic()
        egress0 = service.artifacts.bytes_out
        rid = service.orchestrator.create(
            RolloutSpec(
                ref=v1.version.ref,
                targets=[s.device for s in specs],
                waves=["1", "25%", "100%"],
                soak_s=opts.soak_s,
                wave_timeout_s=60,
            ),
            settings.user,
        )
        figures = follow_rollout(rid, "rollout v1", t)
        summary.add(
            "rollout v1",
            time.monotonic() - t,
            **figures,
            host_egress_bytes=service.artifacts.bytes_out - egress0,
        )

        # The sensors start now: window 0 of the scenario is the first window of v1.
        feed = ScenarioFeed(fleet, scenario)
        feed.start()
        cohort_acc = _Accuracy(feed, drifted)
        clean_acc = _Accuracy(feed, clean)
        say(
            f"4/6 devices serving; {opts.drift} drift x{opts.magnitude:g} starts on the "
            f"{len(drifted)} devices tagged {COHORT_TAG} in {onset_s:.0f} s "
            f"(after {baseline} baseline windows of {opts.window} inferences)"
        )
        onset = feed.start_epoch + onset_s
        _wait(lambda: time.time() >= onset, onset_s + 5, "drift onset", stop)
        before, n_before = cohort_acc.since_mark()
        cohort_acc.reset()

        def device_alerts(devices: list[str], state: str = "open") -> set[str]:
            with Session(engine) as s:
                rows = s.scalars(
                    select(AlertRow.device).where(
                        AlertRow.fleet == settings.fleet,
                        AlertRow.device.in_(devices),
                        AlertRow.state == state,
                    )
                ).all()
            return {d for d in rows if d is not None}

        def alerted_fraction() -> bool:
            return len(device_alerts(drifted)) >= max(1, round(0.9 * len(drifted)))

        _wait(alerted_fraction, 20 * window_s + 30, "drift alerts on the cohort", stop)
        detect_s = time.time() - onset
        alerted = device_alerts(drifted)
        false_alerts = device_alerts(clean)
        say(
            f"    alerts: {len(alerted)}/{len(drifted)} drifted devices after {detect_s:.1f} s "
            f"({detect_s / window_s:.1f} windows); {len(false_alerts)} on the {len(clean)} "
            "clean devices"
        )
        summary.add(
            "drift detected",
            detect_s,
            drift=scenario.drift[0].label(0),
            drifted_devices=len(drifted),
            alerted_devices=len(alerted),
            windows_to_alert=round(detect_s / window_s, 1),
            false_alerts=len(false_alerts),
            cohort_accuracy_before=before,
            cohort_inferences_before=n_before,
        )

        say("5/6 sustained drift: the retrain policy starts a federated run on the cohort")
        t = time.monotonic()

        def fl_run() -> Any:
            with Session(engine) as s:
                return s.scalars(
                    select(FLRunRow)
                    .where(FLRunRow.fleet == settings.fleet, FLRunRow.trigger == "policy")
                    .order_by(FLRunRow.created_at.desc())
                ).first()

        run = _wait(fl_run, 20 * window_s + 30, "a federated run requested by the policy", stop)
        during, n_during = cohort_acc.since_mark()
        say(f"    {run.id}: {len(run.devices)} devices, cohort accuracy now {during}")
        last_state = None
        while True:
            run = fl_run()
            if run.state != last_state:
                say(f"    {run.id}: {run.state}")
                last_state = run.state
            if run.state in TERMINAL_FL:
                break
            if time.monotonic() - t > 600:
                raise RolloutFailedError(f"demo: federated run {run.id} did not finish in 600 s")
            if stop is not None and stop.is_set():
                raise RolloutFailedError("demo: stopped during the federated run")
            time.sleep(0.5)
        if run.state != "registered":
            raise RolloutFailedError(
                f"demo: federated run {run.id} ended {run.state}: {run.reason}"
            )
        result = run.result or {}
        new_ref = f"{run.model}@{run.new_version}"
        lineage = service.registry.get(new_ref).lineage
        fed = lineage.get("federated") or {}
        summary.add(
            "federated retraining",
            time.monotonic() - t,
            run=run.id,
            flower_run=run.flower_run_id,
            parent=f"{run.model}@{run.parent_version}",
            version=new_ref,
            nodes=len(fed.get("nodes") or run.devices),
            rounds=run.config.get("rounds"),
            strategy=run.config.get("strategy"),
            host_val_accuracy=result.get("final_val_acc"),
            cohort_accuracy_during_drift=during,
            cohort_inferences_during_drift=n_during,
        )

        say(f"6/6 {new_ref} passed its gates; rolling it out to tag:{COHORT_TAG}")
        t = time.monotonic()
        rid2 = _wait(lambda: fl_run().rollout_id, 30, "the cohort's rollout", stop)
        figures = follow_rollout(rid2, "rollout v2", t)
        rolled = time.monotonic() - t
        cohort_acc.reset()
        clean_acc.reset()

        def cleared() -> bool:
            return not device_alerts(drifted)

        _wait(cleared, 10 * window_s + 30, "the cohort's alerts clearing", stop)
        # enough windows on the new version to measure its accuracy on the drifted sensors
        _wait(
            lambda: cohort_acc.since_mark()[1] >= 4 * opts.window * max(1, len(drifted) // 2),
            20 * window_s + 30,
            "inferences on the new version",
            stop,
        )
        after, n_after = cohort_acc.since_mark()
        clean_now, _ = clean_acc.since_mark()
        summary.add(
            "rollout v2 to the cohort",
            rolled,
            **figures,
            alerts_open_on_cohort=len(device_alerts(drifted)),
            cohort_accuracy_before_drift=before,
            cohort_accuracy_during_drift=during,
            cohort_accuracy_after=after,
            cohort_inferences_after=n_after,
            clean_devices_accuracy=clean_now,
        )
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
        snap = feed.snapshot()
        summary.add(
            "fleet",
            0.0,
            on_device_inferences=snap["inferences"],
            labels_fed=snap["labels_fed"],
            telemetry_records=records,
            drift_reports=service.drift.stats.accepted,
            alerts_opened=service.drift.stats.alerts_opened,
            alerts_cleared=service.drift.stats.alerts_cleared,
        )
        if opts.keep:
            say(
                f"running: broker {url}, home {settings.home}; in another shell: "
                f"tinyfleet --home {settings.home} devices list | alerts list | fl list"
                " — Ctrl-C stops everything"
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
