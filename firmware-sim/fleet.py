"""Many real agents in one process: provisioning, an in-process fleet and its chaos controls.

Each simulated device is the real ``tinyfleet.agent.agent.Agent`` with its own
state folder, identity (device id, tags, profile), MQTT connection and pinned
host key.  All of a process's agents share one ``SelectorDriver`` thread for
their connections, one small executor for activations, one timer thread that
calls ``tick()`` and one delay thread (slow links, timed chaos).  The fleet
launcher (``tinyfleet sim up``, ``launcher.py``) runs several such processes to
use every core.

Device profiles: a Pi-class device (``kind = "linux"``) runs its model on LiteRT
(no XNNPACK, to keep many interpreters cheap); an MCU-class device runs it under
TensorFlow Lite Micro with the measured arena and refuses what does not fit its
RAM and flash (``tinyfleet.sim.mcu.mcu_loader``).  ``DeviceSpec.ram_bytes`` /
``flash_bytes`` override a profile's limits for one device.

Chaos, per device (every call is safe from any thread):

- ``kill``: the process of the device dies: its TCP connection drops without
  DISCONNECT (the broker publishes its last will), nothing is flushed;
  ``restart`` starts a new agent on the same state folder (it recovers from disk);
- ``disconnect``: the network goes away for ``seconds`` (connection dropped, no
  reconnect attempt before then); the agent keeps running;
- ``slow_link``: every message to the device and every acknowledgement of its own
  publishes arrives ``delay_s`` late;
- ``full_disk``: the telemetry spool's database may not grow (what SQLite sees
  on a full disk; downloads and the model store are not affected);
- ``clock_skew``: the agent's clock jumps by ``seconds`` (its timers: heartbeat,
  chunk timeouts).  Wall-clock timestamps are the process's and are not skewed.

An exception in one device's agent (a handler, a tick, an inference) is logged and
counted for that device only; the others keep running.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyfleet.agent.agent import Agent
from tinyfleet.agent.config import AgentConfig
from tinyfleet.agent.drivers import SelectorDriver
from tinyfleet.agent.link import Link
from tinyfleet.agent.manifest import load_public_key
from tinyfleet.agent.profiles import DeviceProfile, get_profile
from tinyfleet.agent.runtime import load_model

__all__ = [
    "DeviceSpec",
    "InProcessFleet",
    "SensorFeed",
    "device_profile",
    "provision",
]


@dataclass
class DeviceSpec:
    """Identity of one simulated device (and, optionally, its own memory limits)."""

    device: str
    tags: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    profile: str = "rpi4"
    ram_bytes: int | None = None
    """Overrides the profile's RAM (e.g. an MCU board with less SRAM)."""
    flash_bytes: int | None = None
    """Overrides the profile's flash."""


def device_profile(spec: DeviceSpec) -> DeviceProfile:
    """The profile of ``spec`` with its overrides applied."""
    base = get_profile(spec.profile)
    changes: dict[str, Any] = {}
    if spec.ram_bytes is not None:
        changes["ram_bytes"] = spec.ram_bytes
    if spec.flash_bytes is not None:
        changes["flash_bytes"] = spec.flash_bytes
    return base.model_copy(update=changes) if changes else base


def provision(
    root: Path,
    spec: DeviceSpec,
    *,
    fleet: str,
    broker_url: str,
    host_public_key: Path,
    heartbeat_s: float = 5.0,
    window: int = 100,
    chunk_timeout_s: float = 3.0,
    username: str | None = None,
    password_file: Path | None = None,
) -> AgentConfig:
    """The configuration of one device, with its state folder under ``root``.

    The host key is pinned by path (``security.host_public_key``); broker
    credentials, when the broker needs them, are a username and a password file.
    """
    broker: dict[str, Any] = {"url": broker_url}
    if username is not None:
        broker["username"] = username
    if password_file is not None:
        broker["password_file"] = str(password_file)
    return AgentConfig.model_validate(
        {
            "device": {
                "id": spec.device,
                "fleet": fleet,
                "tags": spec.tags,
                "groups": spec.groups,
                "profile": spec.profile,
            },
            "broker": broker,
            "security": {"host_public_key": str(host_public_key)},
            "paths": {"state_dir": str(root / spec.device)},
            "telemetry": {"heartbeat_s": heartbeat_s, "window": window},
            "download": {"chunk_timeout_s": chunk_timeout_s},
        }
    )


def _sim_loader(path: Any, fmt: Any = None) -> Any:
    # Many interpreters share a process here: skip XNNPACK's per-interpreter workspace.
    return load_model(path, fmt, delegate=False)


class _Delays:
    """One thread running callables at their due time (slow links, timed chaos)."""

    def __init__(self, log: logging.Logger) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._log = log
        self._thread = threading.Thread(target=self._run, name="sim-delays", daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + max(0.0, delay), next(self._seq), fn))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:
                self._log.exception("delayed call failed")

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(5)


class _SlowLink:
    """Stands between a link and its agent: messages and acks reach the agent late."""

    def __init__(self, agent: Agent, delay_s: float, delays: _Delays) -> None:
        self.agent = agent
        self.delay_s = delay_s
        self._delays = delays

    def before_connect(self, link: Link) -> None:
        self.agent.before_connect(link)

    def on_connected(self, link: Link, session_present: bool) -> None:
        self.agent.on_connected(link, session_present)

    def on_disconnected(self, link: Link, reason: str) -> None:
        self.agent.on_disconnected(link, reason)

    def on_message(self, link: Link, topic: str, payload: bytes, retained: bool) -> None:
        agent = self.agent
        self._delays.call_later(
            self.delay_s, lambda: agent.on_message(link, topic, payload, retained)
        )

    def on_published(self, link: Link, mid: int) -> None:
        agent = self.agent
        self._delays.call_later(self.delay_s, lambda: agent.on_published(link, mid))


class InProcessFleet:
    """N real agents on one selector thread, with a shared timer and activation pool."""

    def __init__(
        self,
        configs: Iterable[AgentConfig],
        *,
        tick_s: float = 0.5,
        activation_threads: int = 2,
        logger: logging.Logger | None = None,
        loader: Callable[..., Any] | None = None,
        specs: Iterable[DeviceSpec] = (),
    ) -> None:
        self.log = logger or logging.getLogger("tinyfleet.sim.fleet")
        self.executor = ThreadPoolExecutor(activation_threads, thread_name_prefix="sim-activate")
        self.driver = SelectorDriver(name="sim-links", logger=self.log.getChild("links"))
        self.tick_s = tick_s
        self._loader = loader
        self._keys: dict[str, Any] = {}
        self.configs: dict[str, AgentConfig] = {c.device.id: c for c in configs}
        by_id = {s.device: s for s in specs}
        self.profiles: dict[str, DeviceProfile] = {
            d: device_profile(by_id.get(d) or DeviceSpec(d, profile=c.device.profile))
            for d, c in self.configs.items()
        }
        self.agents: dict[str, Agent] = {}
        self.killed: set[str] = set()
        self.crashes: dict[str, int] = {}
        """Exceptions raised by each device's agent in a tick (the device keeps running)."""
        self.clock_skew: dict[str, float] = {}
        self._chaos: dict[str, set[str]] = {}
        self._lock = threading.RLock()
        for device in self.configs:
            self.agents[device] = self._make_agent(device)
        self._stop = threading.Event()
        self._started = False
        self._timer = threading.Thread(target=self._ticks, name="sim-ticks", daemon=True)
        self.delays = _Delays(self.log)

    def _loader_for(self, profile: DeviceProfile) -> Callable[..., Any]:
        if self._loader is not None:
            return self._loader
        if profile.kind == "mcu":
            from tinyfleet.sim.mcu import mcu_loader

            return mcu_loader(profile)
        return _sim_loader

    def _make_agent(self, device: str) -> Agent:
        cfg = self.configs[device]
        path = str(cfg.security.host_public_key)
        if path not in self._keys:
            self._keys[path] = load_public_key(Path(path))
        profile = self.profiles[device]
        skew = self.clock_skew.get(device, 0.0)
        return Agent(
            cfg,
            public_key=self._keys[path],
            executor=self.executor,
            loader=self._loader_for(profile),
            logger=self.log.getChild(device),
            password=cfg.broker_password(),
            profile=profile,
            clock=(lambda: time.monotonic() + skew) if skew else time.monotonic,
        )

    def start(self) -> None:
        for agent in self.agents.values():
            self.driver.add(agent.link)
        self.driver.start()
        self._timer.start()
        self._started = True

    def _ticks(self) -> None:
        while not self._stop.wait(self.tick_s):
            for device, agent in list(self.agents.items()):
                try:
                    agent.tick()
                except Exception:  # one device's bug never stops the others
                    self.crashes[device] = self.crashes.get(device, 0) + 1
                    self.log.exception("%s: tick failed", device)

    # ------------------------------------------------------------------ chaos

    def _agent(self, device: str) -> Agent:
        agent = self.agents.get(device)
        if agent is None:
            state = "killed" if device in self.killed else "not in this fleet"
            raise KeyError(f"{device}: {state}")
        return agent

    def kill(self, device: str) -> None:
        """The device's process dies: the connection drops without DISCONNECT (its will fires)."""
        with self._lock:
            agent = self._agent(device)
            del self.agents[device]
            self.killed.add(device)
            self._chaos.pop(device, None)
        link = agent.link
        done = threading.Event()
        driver = self.driver

        def drop() -> None:
            try:
                link._gen += 1  # cancels a scheduled reconnect
                driver._abort_socket(link)  # no DISCONNECT: the broker sends the will
                driver._finish_close(link)
            finally:
                done.set()

        driver._call(drop)
        done.wait(5.0)
        # What dies with the process: its open files (no offline presence, no goodbye).
        try:
            agent.spool.close()
        except Exception:
            self.log.debug("%s: spool close after kill", device, exc_info=True)

    def restart(self, device: str) -> None:
        """Start a killed device again: a new agent process on the same state folder."""
        with self._lock:
            if device not in self.killed:
                if device in self.agents:
                    return
                raise KeyError(f"{device}: not in this fleet")
            agent = self._make_agent(device)
            self.killed.discard(device)
            self.agents[device] = agent
        if self._started:
            self.driver.add(agent.link)

    def disconnect(self, device: str, seconds: float) -> None:
        """Drop the device's connection now; it tries to reconnect only after ``seconds``."""
        if seconds <= 0:
            raise ValueError("seconds must be > 0")
        link = self._agent(device).link
        driver = self.driver
        done = threading.Event()

        def cut() -> None:
            try:
                if link._driver is driver:
                    driver._fail(link, "chaos: network down")
                    driver._schedule(link, seconds)  # replaces the backoff's reconnect
            finally:
                done.set()

        driver._call(cut)
        done.wait(5.0)
        self._mark(device, "disconnected", seconds)

    def slow_link(self, device: str, delay_s: float, seconds: float | None = None) -> None:
        """Deliver everything to the device ``delay_s`` late (for ``seconds``, or until 0)."""
        if delay_s < 0:
            raise ValueError("delay must be >= 0")
        agent = self._agent(device)
        link = agent.link
        if delay_s == 0:
            link.handler = agent
            self._unmark(device, "slow_link")
            return
        link.handler = _SlowLink(agent, delay_s, self.delays)
        self._mark(device, "slow_link", None)
        if seconds is not None:
            self.delays.call_later(seconds, lambda: self._end_slow(device, agent))

    def _end_slow(self, device: str, agent: Agent) -> None:
        if self.agents.get(device) is agent:
            agent.link.handler = agent
            self._unmark(device, "slow_link")

    def full_disk(self, device: str, full: bool = True, seconds: float | None = None) -> None:
        """The telemetry spool may not grow (``full``) or may again."""
        agent = self._agent(device)
        spool = agent.spool
        with spool._lock:
            conn = spool._db()
            if full:
                pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
                conn.execute(f"PRAGMA max_page_count = {pages}")
            else:
                conn.execute("PRAGMA max_page_count = 4294967294")
        if full:
            self._mark(device, "full_disk", None)
            if seconds is not None:
                self.delays.call_later(seconds, lambda: self._end_full(device, agent))
        else:
            self._unmark(device, "full_disk")

    def _end_full(self, device: str, agent: Agent) -> None:
        if self.agents.get(device) is agent:
            self.full_disk(device, False)

    def skew_clock(self, device: str, seconds: float) -> None:
        """The agent's clock jumps by ``seconds`` (kept across a restart of the device)."""
        agent = self._agent(device)
        self.clock_skew[device] = seconds
        base = time.monotonic
        agent.clock = (lambda: base() + seconds) if seconds else base
        if seconds:
            self._mark(device, "clock_skew", None)
        else:
            self._unmark(device, "clock_skew")

    def _mark(self, device: str, what: str, seconds: float | None) -> None:
        with self._lock:
            self._chaos.setdefault(device, set()).add(what)
        if seconds is not None:
            self.delays.call_later(seconds, lambda: self._unmark(device, what))

    def _unmark(self, device: str, what: str) -> None:
        with self._lock:
            self._chaos.get(device, set()).discard(what)

    # ------------------------------------------------------------------ state

    def device_status(self, device: str) -> dict[str, Any]:
        """Connected, phase, serving model, chaos in force (for ``sim status``)."""
        agent = self.agents.get(device)
        if agent is None:
            return {
                "device": device,
                "alive": False,
                "connected": False,
                "serving": None,
                "phase": "killed" if device in self.killed else "unknown",
                "chaos": ["killed"] if device in self.killed else [],
                "crashes": self.crashes.get(device, 0),
                "profile": self.profiles[device].name if device in self.profiles else None,
            }
        serving = agent.serving
        return {
            "device": device,
            "alive": True,
            "connected": agent.link.connected,
            "serving": None if serving is None else serving.label,
            "phase": agent.phase.value,
            "error": None if agent.error is None else agent.error.code.value,
            "inferences": 0 if serving is None else serving.stats.total,
            "chaos": sorted(self._chaos.get(device, ())),
            "crashes": self.crashes.get(device, 0),
            "profile": self.profiles[device].name,
        }

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._timer.is_alive():
            self._timer.join(timeout)
        self.delays.stop()
        for agent in list(self.agents.values()):
            try:
                agent.close(timeout=1.0)
            except Exception:
                self.log.exception("%s: close failed", agent.device)
        self.driver.stop(timeout)
        self.executor.shutdown(wait=True)

    def connected(self) -> int:
        return sum(1 for a in list(self.agents.values()) if a.link.connected)

    def states(self) -> dict[str, Any]:
        return {d: a.reported_state() for d, a in list(self.agents.items())}


class SensorFeed:
    """Feeds each agent vibration windows from its own simulated sensor, at a fixed rate.

    The application on a real device does this; here every device's sensor has its
    own parameters (``DeviceParams.for_device``), the fleet seed, and a label mix.
    Inference errors (e.g. no model yet) are counted, never raised.  A scenario
    (drifts, label feeding, a vectorised step per window) is ``ScenarioFeed``.
    """

    def __init__(
        self,
        fleet: InProcessFleet,
        *,
        rate_hz: float = 2.0,
        seed: int = 7,
        class_probs: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1),
    ) -> None:
        import numpy as np

        from tinyfleet.sim.sensors import DeviceParams, VibrationSensor, derive_seed

        self.fleet = fleet
        self.rate_hz = rate_hz
        self.class_probs = np.asarray(class_probs, dtype=np.float64)
        self.sensors = {
            d: VibrationSensor(
                DeviceParams.for_device(d, seed),
                np.random.default_rng(derive_seed(seed, d, "feed")),
            )
            for d in fleet.configs
        }
        self._rng = np.random.default_rng(seed)
        self.inferences = 0
        self.correct = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-sensors", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def accuracy(self) -> float | None:
        return None if not self.inferences else self.correct / self.inferences

    def _run(self) -> None:
        from tinyfleet.agent.agent import NoModelError

        period = 1.0 / self.rate_hz
        while not self._stop.wait(period):
            for device, agent in list(self.fleet.agents.items()):
                sensor = self.sensors.get(device)
                if sensor is None or agent.serving is None:
                    continue
                label = int(self._rng.choice(len(self.class_probs), p=self.class_probs))
                window = sensor.window(label)
                try:
                    p = agent.infer(window)
                except NoModelError:
                    continue
                except Exception:
                    self.errors += 1
                    continue
                self.inferences += 1
                self.correct += int(p.label == sensor.last_label)
