"""Rollout of a 100 KB model to N simulated devices: wall time, devices/s, egress, fan-out, CPU, RSS.

Everything is the real code: a host (registry and signing key in a temporary
home on disk, ``FleetService`` with its orchestrator at its default step
interval), N real agents in k worker processes (the fleet launcher's workers,
``tinyfleet.sim.launcher.WorkerProcess``, that ``tinyfleet sim up`` runs: each an
``InProcessFleet`` with one selector thread and a shared activation pool,
answering on a control socket; no sensor feed here; device state on /dev/shm
unless a run says disk) and a private Mosquitto with the limits of docs/mosquitto
(``max_queued_messages 1000``, in flight 20: Mosquitto's defaults).  One run
per N uses an unlimited broker queue (``max_queued_messages 0``) to show what
the rollout takes when the broker never drops a message for a slow host.

The model is a TFLite float32 MLP of ~100 KB (identity preprocess, random
weights) registered four times (four seeds) with a real reference bundle.  Its
health-check latency budget is 500 ms instead of the default 50 ms: the check
takes the maximum wall time of single predictions, and in a process running
hundreds of agents that includes waits for the GIL (measured 60-80 ms with 500
agents per process), which aborted rollouts for reasons unrelated to the model.

Per configuration: devices connect and report (the host's devices table shows N
online), v1 is rolled out to all (so every device has a previous version), then
three rollouts (v2, v3, v4; waves "100%", soak 0) are each timed from
``orchestrator.create`` to ``completed``: every device downloaded, verified,
activated, health-checked and reported it.  The median one is reported in
detail.  ``create`` is retried when SQLite says "database is locked" (it reads
then writes in a deferred transaction; a commit of the ingest in between makes
SQLite refuse at once).  Where the time goes: the rollout's device rows
(``sent_at``, ``done_at``), each agent's ``serving.since`` (when it started
serving the version), the duration of every orchestrator step (timed by
wrapping ``step``), the ingest queue and the project's warnings and errors
(counted, not printed).  ``TINYFLEET_BENCH_PROFILE=1`` adds a cProfile of the
steps.

Bytes: host artifact egress is ``ArtifactPublisher.bytes_out`` (model and
reference bundle, republished chunks included); host total egress is its
link's ``bytes_out`` (desired states included); what devices received is the
sum of their links' ``bytes_in`` (payload bytes); the broker's figures are its
``$SYS/broker`` counters (wire bytes and messages to and from every client,
over the rollout plus up to 1 s).  CPU is user+system time of each process over the timed rollout (the
host's includes this benchmark's 20 ms status poll).  RSS per device is a
worker's VmRSS over its devices; "over base" subtracts the worker's RSS before
it created its agents (Python, numpy, paho, pydantic, cryptography, LiteRT), and
the stages split that increment (agents built, connected, first model active).
``TINYFLEET_BENCH_ROLLOUT_RUNS="10x1,1000x2:q0,500x2:disk"`` replaces the runs.
Targets (docs DESIGN): 1,000 devices in ≤ 10 s, host artifact egress ≤ 2× the
artifact size whatever N, cost linear in N; simulator ≤ 1 MB RSS per device.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Run:
    """One measured configuration."""

    devices: int
    processes: int
    disk: bool = False  # device state on the ordinary disk instead of /dev/shm
    queue: int | None = None  # broker max_queued_messages; None: docs/mosquitto's 1000

    @property
    def label(self) -> str:
        extra = (":disk" if self.disk else "") + ("" if self.queue is None else f":q{self.queue}")
        return f"{self.devices}x{self.processes}{extra}"


RUNS: tuple[Run, ...] = (
    Run(10, 1),
    Run(100, 1),
    Run(500, 1),
    Run(500, 2),
    Run(500, 2, disk=True),
    Run(1000, 1),
    Run(1000, 2),
    Run(1000, 1, queue=0),
    Run(1000, 2, queue=0),
)
FLEET = "bench"
MODEL = "bench-mlp"
N_FEATURES = 8
N_CLASSES = 3
HIDDEN = (128, 120, 64)  # ~100 KB of float32 weights
SEEDS = (1, 2, 3, 4)  # v1 (setup) and three timed rollouts per configuration
LATENCY_BUDGET_MS = 500.0  # health check; see the module docstring
CONNECT_TIMEOUT_S = 120.0
ROLLOUT_TIMEOUT_S = 60.0  # 6x the target: a rollout still running then is reported as such
POLL_S = 0.02
DONE = ("completed", "rolled_back", "failed", "cancelled")

TARGET_DEVICES = 1000
TARGET_S = 10.0
TARGET_EGRESS_X = 2.0
TARGET_RSS_MB = 1.0
MB = 1024 * 1024


# ---------------------------------------------------------------------- model


def _build_models(out_dir: str) -> list[str]:
    """Two ~100 KB float32 TFLite MLPs (spawned process: TensorFlow stays out of the bench)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # TensorFlow's and Keras's chatter
    os.dup2(devnull, 2)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras  # type: ignore[import-untyped]
    import tensorflow as tf  # type: ignore[import-untyped]

    out = []
    for seed in SEEDS:
        keras.utils.set_random_seed(seed)
        layers: list[Any] = [keras.Input((N_FEATURES,))]
        layers += [keras.layers.Dense(h, activation="relu") for h in HIDDEN]
        layers.append(keras.layers.Dense(N_CLASSES, activation="softmax"))
        model = keras.Sequential(layers)
        path = Path(out_dir) / f"mlp-{seed}.tflite"
        path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
        out.append(str(path))
    return out


def _register(registry: Any, signer: Any, path: Path) -> Any:
    """Register ``path`` as a new version with a real reference bundle (health inputs, profile)."""
    import numpy as np

    from tinyfleet.agent import drift
    from tinyfleet.agent.manifest import digest
    from tinyfleet.agent.runtime import load_model
    from tinyfleet.host.registry import NewArtifact

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, N_FEATURES)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    m = load_model(path, "tflite", delegate=False)
    probs = m.predict(x)
    hx, hy = drift.pick_health_inputs(x, y, per_class=2)
    expected = m.predict(hx)
    spec_in, spec_out = m.input_spec, m.output_spec
    m.close()
    sha, _ = digest(path)
    bundle = drift.ReferenceBundle(
        profile=drift.build_profile(x, probs),
        health=drift.health_reference(hx, hy, {sha: expected}, latency_budget_ms=LATENCY_BUDGET_MS),
    ).to_bytes()
    return registry.register(
        model=MODEL,
        artifacts=[
            NewArtifact(
                path=path, format="tflite", precision="float32", input=spec_in, output=spec_out
            )
        ],
        reference=bundle,
        lineage={"bench": "rollout"},
        metrics={},
        gates=[],
        passed=True,
        rejection_reasons=[],
        preprocess="identity",
        classes=[str(i) for i in range(N_CLASSES)],
        signer=signer,
        created_by="bench",
        parent_version=None,
    )


# ---------------------------------------------------------------------- logs


def _install_log_counts() -> Any:
    """Count the project's warnings and errors instead of printing them (stderr stays clean)."""
    from tinyfleet.sim.launcher import LogCounts

    return LogCounts().install()


# ---------------------------------------------------------------------- processes


def _proc_mem(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and its parts (bytes) from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Workers:
    """k worker processes sharing N devices: the fleet launcher's workers (``sim up`` runs
    the same code), without a sensor feed, answering on their control sockets."""

    def __init__(self, n: int, k: int, root: Path, broker_url: str, public_key: Path) -> None:
        from tinyfleet.sim.launcher import WorkerProcess

        ids = [f"dev-{i:05d}" for i in range(n)]
        self.procs: list[Any] = []
        for w in range(k):
            spec = {
                "index": w,
                "devices": [{"device": d} for d in ids[w::k]],
                "root": str(root),
                "fleet": FLEET,
                "broker_url": broker_url,
                "host_public_key": str(public_key),
                "feed": False,
                "socket": str(root / f"worker-{w}.sock"),
            }
            self.procs.append(
                WorkerProcess(spec, root / f"worker-{w}.json", root / f"worker-{w}.log").start()
            )
        try:
            for p in self.procs:
                p.wait_ready(CONNECT_TIMEOUT_S)
        except Exception:
            self.stop()
            raise
        first = self.ask("stats")
        self.base_mem: list[dict[str, int]] = [s["base_mem"] for s in first]
        self.built_mem: list[dict[str, int]] = [s["built_mem"] for s in first]

    def ask(self, cmd: str, timeout: float = 60) -> list[Any]:
        return [p.ask({"cmd": cmd}, timeout) for p in self.procs]

    def cpu(self) -> float:
        return sum(_cpu_s(p.pid) for p in self.procs)

    def stop(self) -> None:
        # No clean close: the whole setup is thrown away (SIGKILL; the broker drops the links).
        for p in self.procs:
            p.kill()


# ---------------------------------------------------------------------- host side


def _online(engine: Any) -> int:
    from sqlalchemy import func, select

    from tinyfleet.host.db.tables import DeviceRow

    with engine.connect() as c:
        return int(
            c.execute(
                select(func.count())
                .select_from(DeviceRow)
                .where(DeviceRow.fleet == FLEET, DeviceRow.online.is_(True))
            ).scalar_one()
        )


def _state(engine: Any, rid: str) -> str:
    from sqlalchemy import select

    from tinyfleet.host.db.tables import RolloutRow

    with engine.connect() as c:
        return str(c.execute(select(RolloutRow.state).where(RolloutRow.id == rid)).scalar_one())


class _StepTimer:
    """Wraps ``orchestrator.step`` to time each call (instrumentation only); optional cProfile."""

    def __init__(self, orchestrator: Any, profile: bool = False) -> None:
        import cProfile

        self.durations: list[float] = []
        self.profile = cProfile.Profile() if profile else None
        self._step = orchestrator.step

        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            if self.profile is not None:
                self.profile.enable()
            try:
                return self._step(*args, **kw)
            finally:
                if self.profile is not None:
                    self.profile.disable()
                self.durations.append(time.perf_counter() - t0)

        orchestrator.step = timed

    def take(self) -> dict[str, Any]:
        d, self.durations = self.durations, []
        out: dict[str, Any] = {"steps": len(d)}
        if d:
            out.update(median_ms=1000 * statistics.median(d), max_ms=1000 * max(d), total_s=sum(d))
        if self.profile is not None:
            import io
            import pstats

            text = io.StringIO()
            pstats.Stats(self.profile, stream=text).sort_stats("cumulative").print_stats(14)
            out["profile"] = text.getvalue()
            self.profile.clear()
        return out


def _rollout(service: Any, ref: str, timeout: float) -> dict[str, Any]:
    """Roll ``ref`` out to all devices; id, final state, seconds create→final, ingest samples."""
    from tinyfleet.host.fleet.rollout import RolloutSpec

    spec = RolloutSpec(
        ref=ref, targets=["all"], waves=["100%"], soak_s=0, artifact="tflite-float32"
    )
    engine = service.registry.engine
    depth = lag = 0.0
    t0 = time.perf_counter()
    rid, create_retries = _create(service, spec)
    deadline = t0 + timeout
    state = _state(engine, rid)
    while state not in DONE:
        if time.perf_counter() > deadline:
            break
        time.sleep(POLL_S)
        st = service.ingest.stats
        depth, lag = max(depth, st.queue_depth), max(lag, st.lag_s)
        state = _state(engine, rid)
    wall = time.perf_counter() - t0
    return {
        "id": rid,
        "state": state,
        "wall_s": wall,
        "create_retries": create_retries,
        "ingest_max_depth": depth,
        "ingest_max_lag_s": lag,
    }


def _create(service: Any, spec: Any) -> tuple[str, int]:
    """``orchestrator.create``, retried while SQLite says "database is locked"; (id, retries).

    ``create`` reads and then writes in one deferred SQLite transaction; when the
    ingest thread commits in between, SQLite refuses the upgrade at once (a stale
    snapshot: the busy timeout does not apply), which a busy fleet makes likely.
    """
    from sqlalchemy.exc import OperationalError

    for attempt in range(100):
        try:
            return service.orchestrator.create(spec, "bench"), attempt
        except OperationalError as exc:
            if "locked" not in str(exc):
                raise
            time.sleep(0.01)
    raise RuntimeError("orchestrator.create: database locked 100 times in a row")


def _wait(predicate: Any, timeout: float, what: str) -> float:
    t0 = time.perf_counter()
    while not predicate():
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)
    return time.perf_counter() - t0


def _device_times(engine: Any, rid: str) -> tuple[list[datetime], list[datetime], dict[str, int]]:
    from sqlalchemy import select

    from tinyfleet.host.db.tables import RolloutDeviceRow

    with engine.connect() as c:
        rows = c.execute(
            select(
                RolloutDeviceRow.status, RolloutDeviceRow.sent_at, RolloutDeviceRow.done_at
            ).where(RolloutDeviceRow.rollout_id == rid)
        ).all()
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    sent = [r.sent_at for r in rows if r.sent_at is not None]
    done = [r.done_at for r in rows if r.done_at is not None]
    return sent, done, counts


def _utc(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _rel(points: list[datetime], start: datetime) -> dict[str, float] | None:
    if not points:
        return None
    s = sorted((_utc(p) - start).total_seconds() for p in points)
    return {"first": s[0], "median": statistics.median(s), "last": s[-1]}


def _timed(
    version: int,
    n: int,
    service: Any,
    workers: _Workers,
    broker: Any,
    sys_counters: Any,
    steps: _StepTimer,
    logs: Any,
    model_size: int,
    reference_size: int,
) -> dict[str, Any]:
    """One timed rollout of ``version`` to all devices, with its bytes, CPU and timeline."""
    engine = service.registry.engine
    before = workers.ask("stats")
    steps.take()
    logs.take()
    sys1 = sys_counters.fresh()
    art0 = service.artifacts.bytes_out, service.artifacts.chunks_out
    link0 = service.link.stats.bytes_out, service.link.stats.messages_out
    refused0 = service.link.stats.publish_failures
    host0, work0, brk0 = time.process_time(), workers.cpu(), _cpu_s(broker.pid or 0)
    created = datetime.now(UTC)
    r = _rollout(service, f"{MODEL}@{version}", ROLLOUT_TIMEOUT_S)
    host_cpu = time.process_time() - host0
    work_cpu = workers.cpu() - work0
    brk_cpu = _cpu_s(broker.pid or 0) - brk0
    art_bytes = service.artifacts.bytes_out - art0[0]
    link_bytes = service.link.stats.bytes_out - link0[0]
    orchestrator = steps.take()
    after = workers.ask("stats")
    sys2 = sys_counters.fresh()
    sent, done, counts = _device_times(engine, r["id"])

    def total(stats: list[dict[str, Any]], key: str) -> int:
        return sum(int(s[key]) for s in stats)

    wall = r["wall_s"]
    dev_bytes = total(after, "bytes_in") - total(before, "bytes_in")
    serving = [
        datetime.fromisoformat(since)
        for s in after
        for v, since in s["serving"]
        if v == version and since is not None
    ]
    broker_sent = sys2.get("bytes_sent", 0) - sys1.get("bytes_sent", 0)
    return {
        "version": version,
        "state": r["state"],
        "counts": counts,
        "create_retries": r["create_retries"],
        "wall_s": wall,
        "devices_per_s": n / wall,
        "desired_sent_s": _rel(sent, created),
        "serving_s": _rel(serving, created),
        "host_done_s": _rel(done, created),
        "serving_wanted": len(serving),
        "orchestrator": orchestrator,
        "ingest_max_depth": r["ingest_max_depth"],
        "ingest_max_lag_s": r["ingest_max_lag_s"],
        "host_artifact_bytes": art_bytes,
        "host_artifact_chunks": service.artifacts.chunks_out - art0[1],
        "host_artifact_x": art_bytes / model_size,
        "host_link_bytes": link_bytes,
        "host_link_messages": service.link.stats.messages_out - link0[1],
        "desired_bytes_per_device": (link_bytes - art_bytes) / n,
        "host_publish_refused": service.link.stats.publish_failures - refused0,
        "device_bytes_per_device": dev_bytes / n,
        "device_bytes_x_artifact": dev_bytes / ((model_size + reference_size) * n),
        "device_messages_in": total(after, "messages_in") - total(before, "messages_in"),
        "broker_bytes_sent": broker_sent,
        "broker_bytes_x_model_n": broker_sent / (model_size * n),
        "broker_dropped": sys2.get("messages_dropped", 0) - sys1.get("messages_dropped", 0),
        "broker_messages_sent": sys2.get("messages_sent", 0) - sys1.get("messages_sent", 0),
        "broker_messages_received": sys2.get("messages_received", 0)
        - sys1.get("messages_received", 0),
        "host_cpu_s": host_cpu,
        "host_cpu_ms_per_device": 1000 * host_cpu / n,
        "workers_cpu_s": work_cpu,
        "broker_cpu_s": brk_cpu,
        "cores_busy": (host_cpu + work_cpu + brk_cpu) / wall,
        "device_reconnects": total(after, "reconnects") - total(before, "reconnects"),
        "device_errors": total(after, "errors"),
        "device_publish_failures": total(after, "publish_failures")
        - total(before, "publish_failures"),
        "host_logs": logs.take(),
        "device_logs": _merge_logs([s["logs"] for s in after]),
        "worker_mem": [s["mem"] for s in after],
        "worker_devices": [s["devices"] for s in after],
    }


def _run_one(run: Run, models: list[Path], logs: Any) -> dict[str, Any]:
    from bench.broker import Broker, SysCounters
    from tinyfleet.host.fleet.service import FleetService
    from tinyfleet.host.keys import init_keys, load_signing_key
    from tinyfleet.host.registry import Registry
    from tinyfleet.host.settings import load_settings

    n, k = run.devices, run.processes
    extra = "" if run.queue is None else f"max_queued_messages {run.queue}"
    out: dict[str, Any] = {"run": run.label, "devices": n, "processes": k}
    out["state_dir"] = "disk" if run.disk else "tmpfs (/dev/shm)"
    out["broker_queue"] = 1000 if run.queue is None else run.queue
    with (
        tempfile.TemporaryDirectory(prefix="tinyfleet-bench-rollout-") as host_tmp,
        tempfile.TemporaryDirectory(
            prefix="tinyfleet-bench-devices-", dir=None if run.disk else "/dev/shm"
        ) as dev_tmp,
    ):
        broker = Broker(Path(host_tmp) / "mosquitto", sys_interval=1, extra_config=extra)
        broker.start()
        sys_counters = service = workers = None
        try:
            settings = load_settings(
                Path(host_tmp) / "home", environ={}, broker_url=broker.url, fleet=FLEET
            )
            init_keys(settings.keys_dir)
            registry = Registry(settings.registry_dir)
            signer = load_signing_key(settings.keys_dir)
            versions = [_register(registry, signer, m) for m in models]
            out["model_bytes"] = model_size = versions[0].artifacts[0].size
            out["reference_bytes"] = versions[0].reference.size
            service = FleetService(settings, registry=registry, signer=signer)
            service.start()
            if not service.wait_connected(10):
                raise RuntimeError("the fleet service did not connect")
            engine = registry.engine
            sys_counters = SysCounters(broker)
            steps = _StepTimer(
                service.orchestrator, os.environ.get("TINYFLEET_BENCH_PROFILE") == "1"
            )

            t0 = time.perf_counter()
            workers = _Workers(n, k, Path(dev_tmp), broker.url, settings.keys_dir / "host.pub")
            out["spawn_s"] = time.perf_counter() - t0
            out["connect_s"] = _wait(lambda: _online(engine) >= n, CONNECT_TIMEOUT_S, "online")
            out["worker_base_mem"] = workers.base_mem
            out["worker_stages_mem"] = {
                "agents built": workers.built_mem,
                "connected": [s["mem"] for s in workers.ask("stats")],
            }

            sys0 = sys_counters.fresh()
            first = _rollout(service, f"{MODEL}@1", ROLLOUT_TIMEOUT_S)
            out["v1"] = {**first, "counts": _device_times(engine, first["id"])[2]}
            if first["state"] != "completed":
                stats = workers.ask("stats")
                sys1 = sys_counters.fresh()
                out["state"] = f"v1 {first['state']}"
                out["serving_wanted"] = sum(v == 1 for s in stats for v, _ in s["serving"])
                out["broker_dropped"] = sys1.get("messages_dropped", 0) - sys0.get(
                    "messages_dropped", 0
                )
                out["orchestrator"] = steps.take()
                out["host_publish_refused"] = service.link.stats.publish_failures
                out["host_logs"] = logs.take()
                out["device_logs"] = _merge_logs([s["logs"] for s in stats])
                return out
            out["worker_stages_mem"]["model v1 active"] = [s["mem"] for s in workers.ask("stats")]
            reps: list[dict[str, Any]] = []
            for version in range(2, len(models) + 1):
                time.sleep(1.0)  # let the last reports and heartbeats settle
                reps.append(
                    _timed(
                        version,
                        n,
                        service,
                        workers,
                        broker,
                        sys_counters,
                        steps,
                        logs,
                        model_size,
                        out["reference_bytes"],
                    )
                )
                if reps[-1]["state"] != "completed":
                    break
        finally:
            t_down = time.perf_counter()
            if workers is not None:
                workers.stop()
            if sys_counters is not None:
                sys_counters.close()
            if service is not None:
                service.stop()
            broker.stop()
            out["teardown_s"] = time.perf_counter() - t_down

    out["repeats"] = reps
    out["walls_s"] = [r["wall_s"] for r in reps]
    done = [r for r in reps if r["state"] == "completed"]
    if len(done) < len(reps):
        bad = reps[-1]
        out.update(bad)
        out["state"] = f"v{bad['version']} {bad['state']}"
    else:
        out.update(sorted(done, key=lambda r: r["wall_s"])[len(done) // 2])  # the median one
    mems = out["worker_mem"]
    base = out["worker_base_mem"]
    devs = out["worker_devices"]
    out["rss_mb_per_device"] = (
        statistics.mean(m["VmRSS"] / d for m, d in zip(mems, devs, strict=True)) / MB
    )
    stages = {"before agents": base, **out["worker_stages_mem"], "after the rollouts": mems}
    names = list(stages)
    out["rss_stages_kb_per_device"] = {
        f"{a} -> {b}": statistics.mean(
            (y["VmRSS"] - x["VmRSS"]) / d
            for x, y, d in zip(stages[a], stages[b], devs, strict=True)
        )
        / 1024
        for a, b in itertools.pairwise(names)
    }
    out["rss_incr_mb_per_device"] = (
        statistics.mean(
            (m["VmRSS"] - b["VmRSS"]) / d for m, b, d in zip(mems, base, devs, strict=True)
        )
        / MB
    )
    return out


def _merge_logs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, v in part.items():
            if key in out:
                out[key]["count"] += v["count"]
            else:
                out[key] = dict(v)
    return out


# ---------------------------------------------------------------------- report


def _print_logs(r: dict[str, Any]) -> None:
    for where in ("host_logs", "device_logs"):
        for key, v in sorted(r.get(where, {}).items(), key=lambda kv: -kv[1]["count"])[:4]:
            print(f"  log ({where[:4]})  {v['count']}x {key[:72]}  e.g. {v['example'][:150]}")


def _print_run(r: dict[str, Any]) -> None:
    def span(key: str) -> str:
        v = r[key]
        return "-" if v is None else f"{v['first']:.2f} / {v['median']:.2f} / {v['last']:.2f}"

    n = r["devices"]
    o = r["orchestrator"]
    steps = (
        f"orchestrator {o['steps']} steps, median {o.get('median_ms', 0):.0f} ms, max "
        f"{o.get('max_ms', 0):.0f} ms, {o.get('total_s', 0):.2f} s in all"
    )
    print(
        f"\n{r['run']}: {n} devices in {r['processes']} worker process(es), state on "
        f"{r['state_dir']}, broker queue {r['broker_queue'] or 'unlimited'}: {r['state']}"
    )
    if "wall_s" not in r:  # the v1 rollout did not complete: no v2 measurement
        v1 = r["v1"]
        print(
            f"  v1 rollout   {v1['state']} after {v1['wall_s']:.1f} s: host rows {v1['counts']}, "
            f"devices actually serving v1: {r['serving_wanted']} of {n}; broker dropped "
            f"{r['broker_dropped']} messages, host publishes refused "
            f"{r['host_publish_refused']}; {steps}; ingest max depth "
            f"{v1['ingest_max_depth']:.0f}, max lag {v1['ingest_max_lag_s']:.2f} s"
        )
        _print_logs(r)
        return
    walls = ", ".join(f"{w:.2f}" for w in r["walls_s"])
    print(
        f"  rollout      {r['wall_s']:.2f} s = {r['devices_per_s']:.0f} devices/s "
        f"({1000 * r['wall_s'] / n:.1f} ms per device): median of [{walls}] s; setup: connect "
        f"{r['connect_s']:.1f} s, v1 rollout {r['v1']['wall_s']:.2f} s"
    )
    print(
        f"  this one     v{r['version']}: host rows {r['counts']}, devices serving it "
        f"{r['serving_wanted']}"
    )
    print(
        f"  timeline     s after create, first / median / last: desired sent "
        f"{span('desired_sent_s')}; device serving it {span('serving_s')}; "
        f"host marked success {span('host_done_s')}"
    )
    print(
        f"  host         {steps}; ingest max depth {r['ingest_max_depth']:.0f}, max lag "
        f"{r['ingest_max_lag_s']:.2f} s; broker dropped {r['broker_dropped']} messages for "
        f"slow readers; host publishes refused by its own client queue "
        f"{r['host_publish_refused']}"
    )
    print(
        f"  host egress  artifacts {r['host_artifact_bytes']:,} B in {r['host_artifact_chunks']} "
        f"chunks = {r['host_artifact_x']:.2f}x the model ({r['model_bytes']:,} B; reference "
        f"{r['reference_bytes']:,} B); all {r['host_link_bytes']:,} B (desired states "
        f"{r['desired_bytes_per_device']:,.0f} B per device)"
    )
    print(
        f"  fan-out      devices received {r['device_bytes_per_device']:,.0f} B each "
        f"= {r['device_bytes_x_artifact']:.2f}x (model + reference); broker sent "
        f"{r['broker_bytes_sent'] / MB:.1f} MB = {r['broker_bytes_x_model_n']:.2f}x N x model"
    )
    print(
        f"  broker       messages sent {r['broker_messages_sent']:,} "
        f"({r['broker_messages_sent'] / n:.1f} per device), received "
        f"{r['broker_messages_received']:,} ({r['broker_messages_received'] / n:.1f} per device), "
        f"dropped {r['broker_dropped']}"
    )
    print(
        f"  CPU          host {r['host_cpu_s']:.2f} s ({r['host_cpu_ms_per_device']:.2f} ms per "
        f"device), workers {r['workers_cpu_s']:.2f} s ({1000 * r['workers_cpu_s'] / n:.2f} ms "
        f"per device), broker {r['broker_cpu_s']:.2f} s: {r['cores_busy']:.2f} of 2 cores busy"
    )
    mem, base = r["worker_mem"][0], r["worker_base_mem"][0]
    print(
        f"  RSS          {r['rss_mb_per_device']:.2f} MB per device (worker VmRSS / devices), "
        f"+{r['rss_incr_mb_per_device'] * 1024:.0f} KB per device over the worker's base of "
        f"{base['VmRSS'] / MB:.0f} MB; worker 0: anon {mem.get('RssAnon', 0) / MB:.0f} MB, "
        f"file {mem.get('RssFile', 0) / MB:.0f} MB, shmem {mem.get('RssShmem', 0) / MB:.0f} MB"
    )
    print(
        "  RSS stages   KB per device: "
        + "; ".join(f"{k} {v:+.0f}" for k, v in r["rss_stages_kb_per_device"].items())
    )
    if r["device_reconnects"] or r["device_publish_failures"] or r["create_retries"]:
        print(
            f"  also         device reconnects {r['device_reconnects']}, device publish failures "
            f"{r['device_publish_failures']}, create retried {r['create_retries']}x (locked)"
        )
    _print_logs(r)
    if "profile" in o:
        print(o["profile"])


def _runs() -> list[Run]:
    """``RUNS``, or those of ``TINYFLEET_BENCH_ROLLOUT_RUNS`` (``NxK[:disk][:qQUEUE]``, comma-separated)."""
    spec = os.environ.get("TINYFLEET_BENCH_ROLLOUT_RUNS")
    if not spec:
        return list(RUNS)
    runs = []
    for item in spec.split(","):
        head, *opts = item.strip().split(":")
        n, _, k = head.partition("x")
        queue = next((int(o[1:]) for o in opts if o.startswith("q")), None)
        runs.append(Run(int(n), int(k or 1), disk="disk" in opts, queue=queue))
    return runs


def run() -> dict[str, Any]:
    from bench.broker import mosquitto_path

    if mosquitto_path() is None:
        print("skipped: mosquitto is not installed")
        return {"skipped": "mosquitto is not installed"}
    runs = _runs()
    if not os.access("/dev/shm", os.W_OK):
        runs = [Run(r.devices, r.processes, True, r.queue) for r in runs]
    logs = _install_log_counts()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tinyfleet-bench-models-") as tmp:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            models = [Path(p) for p in pool.apply(_build_models, (tmp,))]
        print(
            f"model: TFLite float32 MLP {N_FEATURES}-{'-'.join(map(str, HIDDEN))}-{N_CLASSES}, "
            f"{models[0].stat().st_size:,} B; runs (devices x processes): "
            f"{', '.join(r.label for r in runs)}"
        )
        for r in runs:
            try:
                result = _run_one(r, models, logs)
            except Exception as exc:  # one configuration failing must not hide the others
                print(f"\n{r.label}: FAILED: {type(exc).__name__}: {exc}")
                results.append({"run": r.label, "devices": r.devices, "error": str(exc)})
                continue
            _print_run(result)
            results.append(result)
    return {"runs": results, "targets": _targets(results)}


def _targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in results if r.get("state") == "completed"]
    deployed = [
        r
        for r in results
        if r["devices"] >= TARGET_DEVICES and r.get("broker_queue") == 1000 and "error" not in r
    ]
    timed = [r for r in deployed if r.get("state") == "completed"]
    best = min(timed, key=lambda r: r["wall_s"]) if timed else None
    unlimited = [r for r in done if r["devices"] >= TARGET_DEVICES and r.get("broker_queue") == 0]
    measured = [r for r in results if "host_artifact_x" in r]  # finished or not
    egress = max((r["host_artifact_x"] for r in measured), default=float("nan"))
    largest = max((r["devices"] for r in measured), default=0)
    rss = max(
        (r["rss_mb_per_device"] for r in measured if r["devices"] == largest),
        default=float("nan"),
    )
    checks: list[tuple[str, float, float, bool, str]] = [
        (
            f"{TARGET_DEVICES} devices, docs broker limits, s",
            best["wall_s"] if best else float("nan"),
            TARGET_S,
            best is not None and best["wall_s"] <= TARGET_S,
            ""
            if best
            else f"no run with N ≥ {TARGET_DEVICES}"
            if not deployed
            else "did not complete: "
            + "; ".join(f"{r['run']} {r['state']}" for r in deployed)
            + (
                " (unlimited broker queue: "
                + ", ".join(f"{r['run']} {r['wall_s']:.2f} s" for r in unlimited)
                + ")"
                if unlimited
                else ""
            ),
        ),
        (
            "host artifact egress / model size, worst run",
            egress,
            TARGET_EGRESS_X,
            bool(measured) and egress <= TARGET_EGRESS_X,
            "",
        ),
        (
            f"RSS per simulated device at N={largest}, MB",
            rss,
            TARGET_RSS_MB,
            bool(measured) and rss <= TARGET_RSS_MB,
            "",
        ),
    ]
    print(
        "\n  wall time per device, ms: "
        + ", ".join(f"{r['run']} {1000 * r['wall_s'] / r['devices']:.1f}" for r in done)
    )
    print(
        "  host CPU per device, ms:   "
        + ", ".join(f"{r['run']} {r['host_cpu_ms_per_device']:.2f}" for r in done)
    )
    print()
    out = {}
    for label, value, limit, met, note in checks:
        off = f"  ({value / limit:.1f}x the target)" if not met and value == value else ""
        print(
            f"  target {label:<48} {value:>7.2f} (≤ {limit:g})  {'met' if met else 'NOT MET'}{off}"
        )
        if note:
            print(f"         {note}")
        out[label] = {"value": value, "limit": limit, "met": met, "note": note}
    return out
