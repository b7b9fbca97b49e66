"""Agent memory and inference-path overhead: idle RSS against its libraries' floor, infer() against bare invoke().

The model is the vibration recipe (small configuration, trained and registered
by the real pipeline in a spawned process, so TensorFlow stays out of this
one) and its int8 TFLite artifact, the rollout default; preprocess
``vibration-v1`` (512 x 3 accelerometer window → 21 features).

Memory.  A real ``tinyfleet-agent run`` subprocess (its own config, a private
Mosquitto, a host ``FleetService`` in this process) receives the model through
a rollout; its VmRSS is read from /proc after it reports the model active and
has idled, and compared with the floor: a bare Python process that imports
numpy, paho-mqtt, pydantic (``BaseModel``: ``import pydantic`` alone is lazy and
loads ~4 MB less), cryptography (Ed25519) and LiteRT and loads the same model
file in a LiteRT ``Interpreter`` (measured the same way, in the same run).  An
import ladder (RSS after each import, one process) shows where the memory goes.

Inference.  The agent process is stopped; an ``Agent`` on the same state
folder in this process recovers the committed model (the daemon's loader: LiteRT
with XNNPACK, one thread; the window of 200 inferences per telemetry record is
the daemon's default).  In the same run, on the same model file and inputs
(simulated sensor windows), per call, in interleaved blocks: ``Agent.infer(raw)``;
the same work by hand (features, quantize, ``set_tensor``, ``invoke``,
``get_tensor``, dequantize, argmax); the agent runtime's ``invoke_one`` on ready
features; ``set_tensor`` + ``invoke`` + ``get_tensor``; ``invoke()`` alone.
``Agent.infer`` includes the drift statistics (a ``DriftAccumulator`` per
serving version, a ``drift`` record spooled per window), so the ratio against
the work by hand is the agent's whole overhead: features, drift statistics,
counters.  Two more rows split the drift share out: ``Agent.infer`` with the
accumulator switched off, and ``DriftAccumulator.add`` alone on the same
features and outputs (with ``report()`` once per window, as the agent does).
Medians over blocks; a cProfile of ``Agent.infer`` lists where its time goes.
Targets (docs DESIGN): idle RSS with LiteRT and a model loaded ≤ 64 MB; the
inference path ≤ 1.10x a bare LiteRT ``invoke()``, amortised per window.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FLEET = "bench"
DEVICE = "bench-agent"
ARTIFACT = "tflite-int8"
IDLE_S = 3.0  # idle time before RSS is read
RSS_SAMPLES = 5
BLOCKS = 10
PER_BLOCK = 2_000  # calls per block and method: 20,000 calls per method
N_WINDOWS = 64  # distinct sensor windows cycled through
PROFILE_CALLS = 5_000

TARGET_RSS_MB = 64.0
TARGET_RATIO = 1.10
MB = 1024 * 1024

FLOOR = r"""
import sys
import numpy
import paho.mqtt.client
from pydantic import BaseModel
from cryptography.hazmat.primitives.asymmetric import ed25519
from ai_edge_litert import interpreter as litert
it = litert.Interpreter(model_path=sys.argv[1], num_threads=1)
it.allocate_tensors()
it.invoke()
print("ready", flush=True)
sys.stdin.read()
"""

LADDER = r"""
import json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
steps = [("python", rss())]
def step(name, fn):
    fn()
    steps.append((name, rss()))
step("numpy", lambda: __import__("numpy"))
step("paho-mqtt", lambda: __import__("paho.mqtt.client"))
step("pydantic (BaseModel)", lambda: __import__("pydantic.main"))
step("cryptography", lambda: __import__("cryptography.hazmat.primitives.asymmetric.ed25519"))
step("ai_edge_litert", lambda: __import__("ai_edge_litert.interpreter"))
def load():
    from ai_edge_litert import interpreter as litert
    global it
    it = litert.Interpreter(model_path=sys.argv[1], num_threads=1)
    it.allocate_tensors()
    it.invoke()
step("model in LiteRT", load)
step("tinyfleet.agent.protocol", lambda: __import__("tinyfleet.agent.protocol"))
step("tinyfleet.agent.agent", lambda: __import__("tinyfleet.agent.agent"))
step("tinyfleet.agent.daemon", lambda: __import__("tinyfleet.agent.daemon"))
print(json.dumps(steps))
"""


# ---------------------------------------------------------------------- model


def _train(home: str) -> dict[str, Any]:  # pragma: no cover - runs in a spawned process
    """Train, quantize, evaluate and register the vibration recipe (small); TensorFlow here only."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tinyfleet.host.keys import init_keys
    from tinyfleet.host.pipeline import run_pipeline
    from tinyfleet.host.settings import load_settings

    settings = load_settings(Path(home), environ={})
    init_keys(settings.keys_dir)
    result = run_pipeline(settings, "vibration", small=True, latency_runs=50)
    if result.version is None:
        raise RuntimeError(f"vibration was not registered: {result.gates}")
    return {"ref": result.version.ref, "passed": result.passed}


# ---------------------------------------------------------------------- processes


def _mem(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _idle_rss(pid: int) -> dict[str, int]:
    """Memory of ``pid`` after ``IDLE_S``: the sample with the median VmRSS of ``RSS_SAMPLES``."""
    time.sleep(IDLE_S)
    samples = []
    for _ in range(RSS_SAMPLES):
        samples.append(_mem(pid))
        time.sleep(0.2)
    samples.sort(key=lambda m: m["VmRSS"])
    return samples[len(samples) // 2]


def _agent_command() -> list[str]:
    script = Path(sys.executable).with_name("tinyfleet-agent")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "tinyfleet.agent.cli"]


def _floor(model: Path) -> dict[str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOR, str(model)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the floor process did not load the model")
        return _idle_rss(proc.pid)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(10)


def _ladder(model: Path) -> list[tuple[str, int]]:
    import json

    out = subprocess.run(
        [sys.executable, "-c", LADDER, str(model)],
        capture_output=True,
        check=True,
        timeout=120,
    )
    return [(name, int(rss)) for name, rss in json.loads(out.stdout.decode().splitlines()[-1])]


def _online(engine: Any) -> bool:
    from sqlalchemy import select

    from tinyfleet.host.db.tables import DeviceRow

    with engine.connect() as c:
        return bool(
            c.execute(
                select(DeviceRow.online).where(DeviceRow.fleet == FLEET, DeviceRow.device == DEVICE)
            ).scalar()
        )


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def _memory(root: Path, ref: str) -> dict[str, Any]:
    """Run the agent daemon, roll the model out to it, read its RSS; then the floor."""
    from bench.broker import Broker
    from tinyfleet.host.fleet.rollout import RolloutSpec
    from tinyfleet.host.fleet.service import FleetService
    from tinyfleet.host.registry import Registry
    from tinyfleet.host.settings import load_settings

    broker = Broker(root / "mosquitto").start()
    service = agent = None
    try:
        settings = load_settings(root / "home", environ={}, broker_url=broker.url, fleet=FLEET)
        registry = Registry(settings.registry_dir)
        version = registry.get(ref)
        model = next(
            registry.blob_path(a.sha256)
            for a in version.artifacts
            if f"{a.format}-{a.precision}" == ARTIFACT
        )
        state = root / "agent-state"
        config = root / "agent.toml"
        config.write_text(
            f'[device]\nid = "{DEVICE}"\nfleet = "{FLEET}"\n'
            f'[broker]\nurl = "{broker.url}"\n'
            f'[security]\nhost_public_key = "{settings.keys_dir / "host.pub"}"\n'
            f'[paths]\nstate_dir = "{state}"\n'
        )
        service = FleetService(settings, registry=registry)
        service.start()
        if not service.wait_connected(10):
            raise RuntimeError("the fleet service did not connect")
        with (root / "agent.log").open("wb") as log:
            agent = subprocess.Popen(
                [*_agent_command(), "--log-level", "WARNING", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait(lambda: _online(registry.engine), 30, "agent online")
        no_model = _idle_rss(agent.pid)
        rid = service.orchestrator.create(
            RolloutSpec(ref=ref, targets=[DEVICE], waves=["100%"], soak_s=0, artifact=ARTIFACT),
            "bench",
        )
        _wait(
            lambda: (
                service.orchestrator.view(rid).row["state"]
                in ("completed", "rolled_back", "failed")
            ),
            60,
            "rollout to the agent",
        )
        final = service.orchestrator.view(rid).row
        if final["state"] != "completed":
            raise RuntimeError(f"rollout to the agent ended {final['state']}: {final['reason']}")
        active = _idle_rss(agent.pid)
        agent.terminate()
        agent.wait(20)
        floor = _floor(model)
        ladder = _ladder(model)
        return {
            "model_path": model,
            "config": config,
            "agent_no_model": no_model,
            "agent_active": active,
            "floor": floor,
            "ladder": ladder,
            "model_bytes": model.stat().st_size,
        }
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait(10)
        if service is not None:
            service.stop()
        broker.stop()


# ---------------------------------------------------------------------- inference


def _windows() -> Any:
    import numpy as np

    from tinyfleet.sim.sensors import DeviceParams, VibrationSensor

    sensor = VibrationSensor(DeviceParams.for_device("bench-0", 7), rng=np.random.default_rng(7))
    windows, _ = sensor.sample(N_WINDOWS)
    return [np.array(w, dtype=np.float32, order="C", copy=True) for w in windows]  # own memory


def _time(
    methods: dict[str, Callable[[Any], Any]],
    inputs: list[Any],
    around: dict[str, tuple[Callable[[], None], Callable[[], None]]] | None = None,
) -> dict[str, list[float]]:
    """Nanoseconds per call of each method, one figure per block; methods interleaved.

    ``around[name]`` is a (before, after) pair run outside the timed loop of that method.
    """
    clock = time.perf_counter_ns
    feed = [inputs[i % len(inputs)] for i in range(PER_BLOCK)]
    out: dict[str, list[float]] = {name: [] for name in methods}
    nothing = (lambda: None, lambda: None)
    for _ in range(BLOCKS + 1):  # the first round warms up and is not kept
        for name, fn in methods.items():
            before, after = (around or {}).get(name, nothing)
            before()
            try:
                t0 = clock()
                for x in feed:
                    fn(x)
                ns = (clock() - t0) / PER_BLOCK
            finally:
                after()
            out[name].append(ns)
    return {name: values[1:] for name, values in out.items()}


def _inference(config_path: Path, model_path: Path) -> dict[str, Any]:
    import cProfile
    import io
    import pstats

    import numpy as np
    from ai_edge_litert import interpreter as litert  # type: ignore[import-untyped]

    from tinyfleet.agent.agent import Agent
    from tinyfleet.agent.config import load_config
    from tinyfleet.agent.features import vibration_features_and_stats, vibration_features_batch
    from tinyfleet.agent.manifest import load_public_key

    cfg = load_config(config_path, environ={})
    agent = Agent(cfg, public_key=load_public_key(cfg.security.host_public_key))
    try:
        serving = agent.serving
        if serving is None:
            raise RuntimeError("the agent did not recover its committed model")
        windows = _windows()
        model = serving.activated.model
        it = litert.Interpreter(model_path=str(model_path), num_threads=1)
        it.allocate_tensors()
        inp, outp = it.get_input_details()[0], it.get_output_details()[0]
        in_idx, out_idx = int(inp["index"]), int(outp["index"])
        in_scale, in_zp = (float(v) for v in inp["quantization"])
        out_scale, out_zp = (float(v) for v in outp["quantization"])
        in_dtype = inp["dtype"]
        info = np.iinfo(in_dtype)
        lo, hi = np.float32(info.min), np.float32(info.max)
        inv = np.float32(1.0 / in_scale)
        zp_in, zp_out, s_out = np.float32(in_zp), np.float32(out_zp), np.float32(out_scale)
        shape = tuple(inp["shape"])

        # The agent computes the model's features and the sensor stats its drift statistics
        # watch in one pass; the baseline does the same work.
        monitored = serving.monitor is not None

        def features(batch: np.ndarray) -> np.ndarray:
            if monitored:
                return vibration_features_and_stats(batch)[0]
            return vibration_features_batch(batch)

        def by_hand(raw: np.ndarray) -> int:
            f = features(raw[None])
            q = np.rint(np.clip(f * inv + zp_in, lo, hi)).astype(in_dtype).reshape(shape)
            it.set_tensor(in_idx, q)
            it.invoke()
            probs = (it.get_tensor(out_idx).astype(np.float32) - zp_out) * s_out
            return int(np.argmax(probs))

        feat0 = vibration_features_batch(windows[0][None])[0]
        q0 = np.rint(np.clip(feat0 * inv + zp_in, lo, hi)).astype(in_dtype).reshape(shape)
        it.set_tensor(in_idx, q0)
        invoke = it.invoke

        def set_invoke_get(_raw: np.ndarray) -> Any:
            it.set_tensor(in_idx, q0)
            invoke()
            return it.get_tensor(out_idx)

        # The agent's own machinery without the feature pipeline: its preprocess swapped for a
        # lookup of features computed beforehand (outside the timed loop).
        both = {id(w): vibration_features_and_stats(w[None]) for w in windows}
        ready = {k: v[0] for k, v in both.items()}
        real_preprocess, real_monitor = serving.preprocess, serving.monitor

        def use_ready() -> None:
            serving.preprocess = lambda batch: ready[id(batch.base)]
            if real_monitor is not None:
                serving.monitor = lambda batch: both[id(batch.base)]

        def restore() -> None:
            serving.preprocess, serving.monitor = real_preprocess, real_monitor

        # Drift statistics alone: a second accumulator on the same profile, fed the features
        # and outputs of the same windows, closing a window (report) as often as the agent.
        from tinyfleet.agent.drift_stats import DriftAccumulator

        real_drift = serving.drift
        if real_drift is None:
            raise RuntimeError("the agent serves without drift statistics")
        acc = DriftAccumulator(real_drift.profile, n_classes=real_drift.n_classes)
        drift_window = serving.drift_window
        outputs = {}
        for w in windows:
            probs = model.invoke_one(ready[id(w)][0])
            top = int(np.argmax(probs))
            row = ready[id(w)][0]
            if monitored:
                row = np.concatenate([row.ravel(), both[id(w)][1][0]])
            outputs[id(w)] = (row, probs, top, float(probs[top]))

        def drift_only(raw: np.ndarray) -> None:
            f, probs, top, conf = outputs[id(raw)]
            acc.add(f, probs, label=top, confidence=conf)
            if acc.n >= drift_window:
                acc.report()

        def lookup_only(raw: np.ndarray) -> Any:
            return outputs[id(raw)]

        def drift_off() -> None:
            serving.drift = None

        def drift_on() -> None:
            serving.drift = real_drift

        methods: dict[str, Callable[[Any], Any]] = {
            "agent.infer(raw)": agent.infer,
            "agent.infer, drift statistics off": agent.infer,
            "agent.infer, features ready (lookup)": agent.infer,
            "by hand: features+quantize+set+invoke+get+dequantize": by_hand,
            "features only (vibration-v1)": lambda raw: features(raw[None]),
            "runtime invoke_one(features)": lambda _raw: model.invoke_one(feat0),
            "set_tensor+invoke+get_tensor": set_invoke_get,
            "invoke() alone": lambda _raw: invoke(),
            "DriftAccumulator.add (+ report per window)": drift_only,
            "the lookup drift_only does": lookup_only,
        }
        # same model, same input: the agent's answer and the bare one agree
        agree = int(agent.infer(windows[0]).label) == by_hand(windows[0])
        blocks = _time(
            methods,
            windows,
            {
                "agent.infer, features ready (lookup)": (use_ready, restore),
                "agent.infer, drift statistics off": (drift_off, drift_on),
            },
        )
        drift_records = sum(1 for r in agent.spool.peek(1_000_000) if r.kind == "drift")
        profile = cProfile.Profile()
        profile.enable()
        for i in range(PROFILE_CALLS):
            agent.infer(windows[i % len(windows)])
        profile.disable()
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("tottime").print_stats(12)
        callees = io.StringIO()
        pstats.Stats(profile, stream=callees).print_callees(r"agent\.py:\d+\(infer\)")
        return {
            "blocks_ns": blocks,
            "median_ns": {k: statistics.median(v) for k, v in blocks.items()},
            "agree": agree,
            "window": agent.window,
            "drift_window": drift_window,
            "drift_features": real_drift.n_features,
            "drift_records": drift_records,
            "runtime": model.runtime,
            "profile": text.getvalue(),
            "callees": callees.getvalue(),
        }
    finally:
        agent.close(timeout=1.0)


# ---------------------------------------------------------------------- report


def run() -> dict[str, Any]:
    from bench.broker import mosquitto_path

    if mosquitto_path() is None:
        print("skipped: mosquitto is not installed")
        return {"skipped": "mosquitto is not installed"}
    with tempfile.TemporaryDirectory(prefix="tinyfleet-bench-agent-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            trained = pool.apply(_train, (str(root / "home"),))
        print(f"model: {trained['ref']} ({ARTIFACT}), pipeline {time.perf_counter() - t0:.1f} s")
        mem = _memory(root, trained["ref"])
        inf = _inference(mem["config"], mem["model_path"])

    agent_rss = mem["agent_active"]["VmRSS"]
    floor_rss = mem["floor"]["VmRSS"]
    print(f"\nmemory (VmRSS after {IDLE_S:g} s idle; model {mem['model_bytes']:,} B)")
    for label, m in (
        ("agent, model active", mem["agent_active"]),
        ("agent, connected, no model yet", mem["agent_no_model"]),
        ("floor: libraries + model in LiteRT", mem["floor"]),
    ):
        print(
            f"  {label:<36} {m['VmRSS'] / MB:6.1f} MB  (anon {m.get('RssAnon', 0) / MB:.1f}, "
            f"file {m.get('RssFile', 0) / MB:.1f}; peak {m.get('VmHWM', 0) / MB:.1f})"
        )
    print(
        f"  agent / floor = {agent_rss / floor_rss:.2f}x, agent - floor = "
        f"{(agent_rss - floor_rss) / MB:+.1f} MB"
    )
    print("  import ladder (one process, RSS after each step):")
    prev = 0
    for name, rss in mem["ladder"]:
        print(f"    {name:<28} {rss / MB:6.1f} MB  ({(rss - prev) / MB:+.1f})")
        prev = rss

    med = inf["median_ns"]
    agent_ns = med["agent.infer(raw)"]
    hand_ns = med["by hand: features+quantize+set+invoke+get+dequantize"]
    invoke_ns = med["invoke() alone"]
    features_ns = med["features only (vibration-v1)"]
    wrapper_ns = med["runtime invoke_one(features)"]
    print(
        f"\ninference ({inf['runtime']}, {ARTIFACT}, one thread; {BLOCKS} blocks x {PER_BLOCK:,} "
        f"calls per method; window {inf['window']}; answers agree: {inf['agree']})"
    )
    for name, values in inf["blocks_ns"].items():
        print(
            f"  {name:<54} median {statistics.median(values) / 1000:8.2f} us  "
            f"(blocks {min(values) / 1000:.2f}-{max(values) / 1000:.2f})"
        )
    ready_ns = med["agent.infer, features ready (lookup)"]
    stats_ns = ready_ns - wrapper_ns
    print(
        f"  without features the agent's path costs {ready_ns / 1000:.2f} us = runtime "
        f"invoke_one {wrapper_ns / 1000:.2f} (quantize, set, invoke, get, dequantize) + "
        f"{stats_ns / 1000:.2f} (argmax, stats, counters, spool once per window, Prediction, "
        f"the lookup); that is {ready_ns / invoke_ns:.1f}x invoke() alone and "
        f"{ready_ns / med['set_tensor+invoke+get_tensor']:.1f}x set+invoke+get"
    )
    print(
        f"  with features: agent - by hand = {(agent_ns - hand_ns) / 1000:+.2f} us per call; "
        f"the feature pipeline is {features_ns / agent_ns:.0%} of agent.infer"
    )
    drift_off_ns = med["agent.infer, drift statistics off"]
    drift_ns = med["DriftAccumulator.add (+ report per window)"] - med["the lookup drift_only does"]
    print(
        f"  drift statistics ({inf['drift_features']} features, window {inf['drift_window']}, "
        f"{inf['drift_records']} drift records spooled): DriftAccumulator.add + report per "
        f"window {drift_ns / 1000:.2f} us per inference = {drift_ns / hand_ns:.2%} of the work "
        f"by hand; agent.infer with drift on - off = {(agent_ns - drift_off_ns) / 1000:+.2f} us "
        f"(a difference of two noisy medians)"
    )
    ratio_hand = agent_ns / hand_ns
    ratio_invoke = agent_ns / invoke_ns
    print(f"\n  cProfile of {PROFILE_CALLS:,} agent.infer calls: what infer calls (cumulative s)")
    for line in inf["callees"].splitlines():
        if "->" in line or line.startswith(" " * 20):
            print(f"    {line.strip()[:150]}")
    print("  top by own time:")
    lines = inf["profile"].splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    for line in lines[start : start + 9]:
        print(f"    {line.strip()[:150]}")

    checks = [
        ("agent idle RSS, model active, MB", agent_rss / MB, TARGET_RSS_MB),
        ("agent.infer / (same work by hand)", ratio_hand, TARGET_RATIO),
        ("agent.infer without drift / by hand", drift_off_ns / hand_ns, TARGET_RATIO),
        ("agent.infer / bare invoke() alone", ratio_invoke, TARGET_RATIO),
    ]
    print()
    for label, value, limit in checks:
        met = value <= limit
        off = "" if met else f"  ({value / limit:.2f}x the target)"
        print(
            f"  target {label:<40} {value:>8.2f} (≤ {limit:g})  {'met' if met else 'NOT MET'}{off}"
        )
    return {
        "model": trained["ref"],
        "artifact": ARTIFACT,
        "memory": {k: v for k, v in mem.items() if k not in ("model_path", "config")},
        "inference": {k: v for k, v in inf.items() if k not in ("profile", "callees")},
        "profile": inf["profile"],
        "ratios": {
            "agent_over_by_hand": ratio_hand,
            "agent_without_drift_over_by_hand": drift_off_ns / hand_ns,
            "agent_over_invoke": ratio_invoke,
        },
        "drift_ns_per_inference": drift_ns,
        "targets": {
            label: {"value": value, "limit": limit, "met": value <= limit}
            for label, value, limit in checks
        },
    }
