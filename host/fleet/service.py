"""The host's fleet service: one process that talks to the fleet.

It owns the host's MQTT connection and runs, on top of it:

* ingest of presence, reported state, telemetry and events into the database;
* the artifact publisher (retained chunks) and chunk-request answers;
* the rollout orchestrator, stepped a few times a second.

Everything it knows is in the database, so the CLI (and later the fleet status
API) read and command it through the same tables, and a restart resumes where
it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from tinyfleet.agent.drivers import ThreadDriver
from tinyfleet.agent.link import BaseLinkHandler, BrokerConfig, Link, Will
from tinyfleet.agent.protocol import (
    ChunkRequest,
    HostPresence,
    ProtocolError,
    Topics,
    decode,
    encode,
)
from tinyfleet.agent.protocol.topics import TopicKind
from tinyfleet.host.fleet.drift import monitor_for_service
from tinyfleet.host.fleet.ingest import Ingest
from tinyfleet.host.fleet.publish import ArtifactPublisher, DesiredPublisher
from tinyfleet.host.fleet.retrain import RetrainTrigger
from tinyfleet.host.fleet.rollout import Orchestrator
from tinyfleet.host.keys import SigningKey, load_signing_key
from tinyfleet.host.registry import Registry
from tinyfleet.host.settings import HostSettings

HOST_VERSION = "0.1.0"


class FleetService(BaseLinkHandler):
    def __init__(
        self,
        settings: HostSettings,
        *,
        registry: Registry | None = None,
        signer: SigningKey | None = None,
        step_interval: float = 0.2,
        logger: logging.Logger | None = None,
        retrain_trigger: RetrainTrigger | None = None,
    ) -> None:
        self.settings = settings
        self.log = logger or logging.getLogger("tinyfleet.host.service")
        self.registry = registry or Registry(settings.registry_dir, settings.database_url)
        self.signer = signer or load_signing_key(settings.keys_dir)
        self.fleet = settings.fleet
        self.topics = Topics(self.fleet)
        self.step_interval = step_interval
        # A session number that grows across restarts (milliseconds since the epoch).
        self.session = int(time.time() * 1000)
        self.link = Link(
            # A persistent session: what devices send while the service restarts is queued
            # by the broker (QoS 1) and delivered when it is back.
            BrokerConfig.from_url(
                settings.broker_url, client_id=f"tf-host-{self.fleet}", persistent_session=True
            ),
            self,
            logger=self.log.getChild("link"),
            # A wave publishes one desired state per device at once: paho's default
            # queue bound (1,000) refused some of them in a 1,000-device wave.
            max_queued=1_000_000,
        )
        self.driver = ThreadDriver(self.link, name=f"host-{self.fleet}")
        self.ingest = Ingest(self.registry.engine, self.fleet, logger=self.log.getChild("ingest"))
        # Drift scores, alerts (log, DB, host/events, webhook) and the retrain policy.
        self.drift = monitor_for_service(
            settings.drift,
            self.registry,
            self.fleet,
            publish=self.link.publish,
            topic=self.topics.host_events(),
            trigger=retrain_trigger,
            logger=self.log.getChild("drift"),
        )
        if settings.drift.enabled:
            self.ingest.on_telemetry.append(self.drift.on_telemetry)
        self.artifacts = ArtifactPublisher(
            self.link, self.topics, self.registry.blob_path, logger=self.log.getChild("artifacts")
        )
        self.desired = DesiredPublisher(
            self.link, self.topics, self.signer, self.fleet, self.registry.engine
        )
        self.orchestrator = Orchestrator(
            self.registry.engine,
            self.registry,
            self.desired,
            self.artifacts,
            self.fleet,
            logger=self.log.getChild("rollout"),
        )
        # Federated runs: requested through the database, executed on their own thread.
        from tinyfleet.host.fl.coordinator import FLCoordinator

        self.fl = FLCoordinator(
            settings,
            self.registry,
            desired=self.desired,
            orchestrator=self.orchestrator,
            logger=self.log.getChild("fl"),
            connected=lambda: self.link.connected,
        )
        # Sustained drift on a cohort starts a federated run unless the caller decides.
        if retrain_trigger is None and self.drift.retrain is not None:
            self.drift.retrain.trigger = self.fl.on_retrain
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self.connected = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.drift.start()
        self.ingest.start()
        self.driver.start()
        self._loop = threading.Thread(target=self._run, name="fleet-loop", daemon=True)
        self._loop.start()
        self.fl.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.fl.stop(timeout)
        if self._loop is not None:
            self._loop.join(timeout)
        if self.link.connected:
            self.link.publish(
                self.topics.host_presence(), encode(self._presence("offline")), 1, True
            )
        self.driver.stop(timeout)
        self.ingest.stop(timeout)
        self.drift.stop(timeout)

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return self.connected.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            if self.link.connected:
                try:
                    self.orchestrator.step()
                except Exception:  # the loop must survive anything one step does
                    self.log.exception("orchestrator step failed")
            self._stop.wait(max(0.0, self.step_interval - (time.monotonic() - t0)))

    # ------------------------------------------------------------------ link handler

    def _presence(self, status: str) -> HostPresence:
        return HostPresence(
            status=status, session=self.session, ts=datetime.now(UTC), version=HOST_VERSION
        )  # type: ignore[arg-type]

    def before_connect(self, link: Link) -> None:
        link.set_will(Will(self.topics.host_presence(), encode(self._presence("offline")), 1, True))

    def on_connected(self, link: Link, session_present: bool) -> None:
        # Subscribe before announcing: agents hold telemetry until the host is online, and
        # must not flush into a broker that has no subscription for it yet.
        link.subscribe(self.topics.host_subscriptions())
        link.publish(self.topics.host_presence(), encode(self._presence("online")), 1, True)
        self.artifacts.reset()  # the broker may have lost retained chunks: publish again on use
        n = self.desired.republish_all()
        self.log.info("connected; republished %d desired states", n)
        self.connected.set()

    def on_disconnected(self, link: Link, reason: str) -> None:
        self.connected.clear()
        level = logging.INFO if self._stop.is_set() else logging.WARNING
        self.log.log(level, "disconnected from the broker: %s", reason)

    def on_message(self, link: Link, topic: str, payload: bytes, retained: bool) -> None:
        try:
            parsed = self.topics.parse(topic)
        except ProtocolError as exc:
            self.log.debug("ignored %s: %s", topic, exc)
            return
        if parsed.kind is TopicKind.CHUNK_REQUEST:
            try:
                req = decode(ChunkRequest, payload)
                if req.device != parsed.device:
                    raise ProtocolError(
                        f"chunk request names {req.device} on {parsed.device}'s topic"
                    )
                self.artifacts.on_request(req)
            except ProtocolError as exc:
                self.log.info("bad chunk request on %s: %s", topic, exc)
            return
        self.ingest.submit(topic, payload)

    def stats(self) -> dict[str, Any]:
        return {
            "connected": self.link.connected,
            "link": vars(self.link.stats),
            "artifacts": self.artifacts.stats(),
            "drift": dataclasses.asdict(self.drift.stats),
            "ingest": vars(self.ingest.stats)
            if hasattr(self.ingest.stats, "__dict__")
            else self.ingest.stats,
        }
