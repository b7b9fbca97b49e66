"""Many real agents in one process: provisioning and an in-process fleet.

Each simulated device is the real ``tinyfleet.agent.agent.Agent`` with its own
state folder, identity (device id, tags, profile), MQTT connection and pinned
host key.  All of a process's agents share one ``SelectorDriver`` thread for
their connections, one small executor for activations, and one timer thread
that calls ``tick()``.  The fleet launcher (``tinyfleet sim up``) runs several
such processes to use every core.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyfleet.agent.agent import Agent
from tinyfleet.agent.config import AgentConfig
from tinyfleet.agent.drivers import SelectorDriver
from tinyfleet.agent.manifest import load_public_key
from tinyfleet.agent.runtime import load_model


@dataclass
class DeviceSpec:
    """Identity of one simulated device."""

    device: str
    tags: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    profile: str = "rpi4"


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
) -> AgentConfig:
    """The configuration of one device, with its state folder under ``root``."""
    return AgentConfig.model_validate(
        {
            "device": {
                "id": spec.device,
                "fleet": fleet,
                "tags": spec.tags,
                "groups": spec.groups,
                "profile": spec.profile,
            },
            "broker": {"url": broker_url},
            "security": {"host_public_key": str(host_public_key)},
            "paths": {"state_dir": str(root / spec.device)},
            "telemetry": {"heartbeat_s": heartbeat_s, "window": window},
            "download": {"chunk_timeout_s": chunk_timeout_s},
        }
    )


def _sim_loader(path: Any, fmt: Any = None) -> Any:
    # Many interpreters share a process here: skip XNNPACK's per-interpreter workspace.
    return load_model(path, fmt, delegate=False)


class InProcessFleet:
    """N real agents on one selector thread, with a shared timer and activation pool."""

    def __init__(
        self,
        configs: Iterable[AgentConfig],
        *,
        tick_s: float = 0.5,
        activation_threads: int = 2,
        logger: logging.Logger | None = None,
        loader: Callable[..., Any] = _sim_loader,
    ) -> None:
        self.log = logger or logging.getLogger("tinyfleet.sim.fleet")
        self.executor = ThreadPoolExecutor(activation_threads, thread_name_prefix="sim-activate")
        self.driver = SelectorDriver(name="sim-links", logger=self.log.getChild("links"))
        self.tick_s = tick_s
        self.agents: dict[str, Agent] = {}
        keys: dict[str, Any] = {}
        for cfg in configs:
            path = str(cfg.security.host_public_key)
            if path not in keys:
                keys[path] = load_public_key(Path(path))
            agent = Agent(
                cfg,
                public_key=keys[path],
                executor=self.executor,
                loader=loader,
                logger=self.log.getChild(cfg.device.id),
                password=cfg.broker_password(),
            )
            self.agents[cfg.device.id] = agent
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._ticks, name="sim-ticks", daemon=True)

    def start(self) -> None:
        for agent in self.agents.values():
            self.driver.add(agent.link)
        self.driver.start()
        self._timer.start()

    def _ticks(self) -> None:
        while not self._stop.wait(self.tick_s):
            for agent in list(self.agents.values()):
                try:
                    agent.tick()
                except Exception:  # one device's bug never stops the others
                    self.log.exception("%s: tick failed", agent.device)

    def kill(self, device: str) -> None:
        """Drop a device abruptly: no offline presence, no clean disconnect (its will fires)."""
        agent = self.agents.pop(device)
        self.driver.remove(agent.link, timeout=0.0)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._timer.join(timeout)
        for agent in self.agents.values():
            try:
                agent.close(timeout=1.0)
            except Exception:
                self.log.exception("%s: close failed", agent.device)
        self.driver.stop(timeout)
        self.executor.shutdown(wait=True)

    def connected(self) -> int:
        return sum(1 for a in self.agents.values() if a.link.connected)

    def states(self) -> dict[str, Any]:
        return {d: a.reported_state() for d, a in self.agents.items()}


class SensorFeed:
    """Feeds each agent vibration windows from its own simulated sensor, at a fixed rate.

    The application on a real device does this; here every device's sensor has its
    own parameters (``DeviceParams.for_device``), the fleet seed, and a label mix.
    Inference errors (e.g. no model yet) are counted, never raised.
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
            for d in fleet.agents
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
