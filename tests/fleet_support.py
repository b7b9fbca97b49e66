"""A host (fleet service, registry, key) and simulated devices on a private Mosquitto."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_support import Version, make_tflite, register_version
from mqtt_broker import MosquittoBroker

from tinyfleet.host.fleet.rollout import RolloutSpec
from tinyfleet.host.fleet.service import FleetService
from tinyfleet.host.keys import SigningKey, init_keys, load_signing_key
from tinyfleet.host.registry import Registry
from tinyfleet.host.settings import HostSettings, load_settings
from tinyfleet.sim.fleet import DeviceSpec, InProcessFleet, provision


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@dataclass
class Host:
    settings: HostSettings
    registry: Registry
    signer: SigningKey

    @property
    def public_key_path(self) -> Path:
        return self.settings.keys_dir / "host.pub"

    def version(self, tflite: Path, **kw: Any) -> Version:
        return register_version(self.registry, self.signer, tflite, **kw)


def make_host(home: Path, broker: MosquittoBroker, fleet: str = "test") -> Host:
    host, port = broker.address
    settings = load_settings(home, environ={}, broker_url=f"mqtt://{host}:{port}", fleet=fleet)
    init_keys(settings.keys_dir)
    return Host(settings, Registry(settings.registry_dir), load_signing_key(settings.keys_dir))


@contextmanager
def running_service(host: Host, **kw: Any) -> Iterator[FleetService]:
    service = FleetService(
        host.settings, registry=host.registry, signer=host.signer, step_interval=0.1, **kw
    )
    service.start()
    try:
        assert service.wait_connected(10)
        yield service
    finally:
        service.stop()


def device_configs(host: Host, root: Path, specs: list[DeviceSpec]) -> list[Any]:
    return [
        provision(
            root,
            spec,
            fleet=host.settings.fleet,
            broker_url=host.settings.broker_url,
            host_public_key=host.public_key_path,
            heartbeat_s=1.0,
            window=20,
            chunk_timeout_s=1.0,
        )
        for spec in specs
    ]


@contextmanager
def running_fleet(configs: list[Any]) -> Iterator[InProcessFleet]:
    fleet = InProcessFleet(configs, tick_s=0.2)
    fleet.start()
    try:
        wait_until(lambda: fleet.connected() == len(configs), 20)
        yield fleet
    finally:
        fleet.stop()


def start_rollout(service: FleetService, ref: str, targets: list[str], **kw: Any) -> str:
    spec = RolloutSpec(ref=ref, targets=targets, artifact="tflite-float32", **kw)
    return service.orchestrator.create(spec, "tests")


def wait_rollout(
    service: FleetService, rid: str, states: tuple[str, ...], timeout: float = 60.0
) -> Any:
    return wait_until(
        lambda: (v := service.orchestrator.view(rid)).row["state"] in states and v, timeout
    )


def tflites(root: Path, seeds: tuple[int, ...] = (1, 2, 3)) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    return [make_tflite(root / f"m{s}.tflite", s) for s in seeds]
