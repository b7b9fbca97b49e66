"""The device agent: converges on its desired state, serves inference, reports.

``Agent`` is a ``LinkHandler``: a driver (one thread per agent on a device, or one
thread for thousands of simulated agents) calls it on connect, disconnect and
message; ``tick()`` is called about once a second for timers.  Handlers stay short:
downloads advance chunk by chunk, and the slow part of an activation (verify,
stage, load, health check) runs on an executor, so one slow device never stalls
the others sharing a driver.

State kept on disk under ``state_dir``::

    agent.json        session counter, last processed generation, last failure
    models/           the A/B model store (store.py) and downloads in progress
    telemetry.db      the telemetry spool (spool.py)
    labels.db         labelled samples for federated retraining (labels.py; opened on first use)

Every message from the broker is parsed and validated before it is acted on; a
bad one is logged, counted, reported (``message_rejected`` event and the
``rejected_messages`` counter) and otherwise ignored.
"""

from __future__ import annotations

import json
import logging
import resource
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tinyfleet.agent import features
from tinyfleet.agent.activation import (
    Activated,
    ActivationError,
    activate,
    activate_slot,
    reason_code,
)
from tinyfleet.agent.config import AgentConfig
from tinyfleet.agent.drift_stats import DriftAccumulator
from tinyfleet.agent.errors import ManifestError, SignatureError, TinyfleetError
from tinyfleet.agent.faults import crash_point
from tinyfleet.agent.fl.supervisor import SuperNodeSupervisor, count_labelled
from tinyfleet.agent.labels import LabelBuffer, LabelError, check_label
from tinyfleet.agent.link import BaseLinkHandler, BrokerConfig, Link, Will
from tinyfleet.agent.manifest import ManifestArtifact, SignedManifest, verify_manifest
from tinyfleet.agent.profiles import DeviceProfile, get_profile
from tinyfleet.agent.protocol import (
    ActiveModel,
    AgentPhase,
    Capabilities,
    ChunkRequest,
    DesiredState,
    DeviceEvent,
    DownloadProgress,
    ErrorCode,
    EventKind,
    HostPresence,
    Presence,
    ProtocolError,
    ReportedError,
    ReportedState,
    SignedDesiredState,
    TelemetryBatch,
    Topics,
    classify_desired,
    classify_session,
    decode,
    encode,
    verify_desired,
)
from tinyfleet.agent.protocol.messages import PROTOCOL_REVISION_FL, DriftReport
from tinyfleet.agent.protocol.topics import TopicKind
from tinyfleet.agent.runtime import available_runtimes, load_model
from tinyfleet.agent.spool import Spool
from tinyfleet.agent.store import ModelStore, write_atomic
from tinyfleet.agent.transfer import BlobSpec, Download

AGENT_VERSION = "0.1.0"
MAX_ACTIVATION_ATTEMPTS = 2
DOWNLOAD_MAX_RETRIES = 6
FLUSH_BATCH = 100
HOST_PRESENCE_WAIT_S = 2.0
"""After connecting, how long telemetry waits for the retained host presence (see _host_ready)."""
MAX_DRIFT_FEATURES = 128
"""Drift statistics are kept for models with at most this many input features: a
``drift`` record carries two scores per feature and a telemetry batch of ``FLUSH_BATCH``
records must stay under the protocol's message size."""
DRIFT_DIGITS = 4
"""Decimals of the per-feature scores in a ``drift`` record."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class NoModelError(TinyfleetError):
    """The agent has no model in service yet."""

    exit_code = 16


@dataclass
class Prediction:
    label: int
    confidence: float
    probabilities: np.ndarray
    model: str
    latency_ms: float


@dataclass
class WindowStats:
    """Counters of the current telemetry window (one per serving model)."""

    size: int
    n_classes: int
    latencies: np.ndarray = field(init=False)
    hist: np.ndarray = field(init=False)
    conf_sum: float = 0.0
    count: int = 0
    window: int = 0
    total: int = 0

    def __post_init__(self) -> None:
        self.latencies = np.zeros(self.size, dtype=np.float32)
        self.hist = np.zeros(self.n_classes, dtype=np.int64)

    def add(self, label: int, confidence: float, latency_ms: float) -> bool:
        """Count one inference; True when the window is full."""
        self.latencies[self.count] = latency_ms
        self.hist[label] += 1
        self.conf_sum += confidence
        self.count += 1
        self.total += 1
        return self.count >= self.size

    def take(self) -> dict[str, Any]:
        lat = self.latencies[: self.count]
        out = {
            "kind": "inference",
            "ts": _utcnow().isoformat(),
            "window": self.window,
            "count": self.count,
            "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p99_ms": float(np.percentile(lat, 99)),
            "prediction_hist": [int(v) for v in self.hist],
            "mean_confidence": min(1.0, max(0.0, self.conf_sum / self.count)),
        }
        self.window += 1
        self.count = 0
        self.hist[:] = 0
        self.conf_sum = 0.0
        return out


@dataclass
class Serving:
    """The model in service and what inference needs around it."""

    activated: Activated
    preprocess: Callable[[np.ndarray], np.ndarray]
    stats: WindowStats
    since: datetime
    n_classes: int = 1
    n_inputs: int = 0
    """Values in one model input (the features of one sample)."""
    drift: DriftAccumulator | None = None
    """Drift statistics against the version's reference profile (None: disabled)."""
    monitor: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    """Features and sensor stats from one pass, when the profile monitors sensor stats: the
    drift statistics then count ``concat(features, stats)``; the model sees the features."""
    drift_window: int = 200
    drift_window_s: float | None = None
    drift_min_samples: int = 1
    drift_started: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards the window counters: ``infer`` may be called from several threads."""

    @property
    def label(self) -> str:
        return self.activated.content.label


@dataclass
class _Job:
    generation: int
    sha256: str
    downloads: list[Download]
    signed: bytes
    rollback: bool
    started: float


class Agent(BaseLinkHandler):
    """One device's agent."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        public_key: Ed25519PublicKey,
        executor: Executor | None = None,
        loader: Callable[..., Any] = load_model,
        logger: logging.Logger | None = None,
        password: str | None = None,
        profile: DeviceProfile | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.device = config.device.id
        self.topics = Topics(config.device.fleet)
        self.public_key = public_key
        self.profile = profile or get_profile(config.device.profile)
        self.log = logger or logging.getLogger(f"tinyfleet.agent.{self.device}")
        self.clock = clock
        self._loader = loader
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"act-{self.device}")
        self._lock = threading.RLock()
        state = config.paths.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self._state_file = state / "agent.json"
        self._persisted = self._load_state()
        self.session = int(self._persisted.get("session", 0))
        self.generation: int | None = self._persisted.get("generation")
        self._failed: dict[str, Any] | None = self._persisted.get("failed")
        self._event_seq = int(self._persisted.get("event_seq", 0))
        self.store = ModelStore(state / "models")
        self.spool = Spool(state / "telemetry.db", max_records=config.telemetry.spool_max_records)
        self._labels: LabelBuffer | None = None  # opened on the first labelled sample
        self._labels_lock = threading.Lock()
        self._deferred_events: deque[tuple[EventKind, str]] = deque(maxlen=16)
        # Federated retraining: a SuperNode driven by the desired state's ``fl``, supervised
        # from tick() (agent/fl/supervisor.py).
        self.fl = SuperNodeSupervisor(
            state_dir=state,
            profile=self.profile,
            logger=self.log.getChild("fl"),
            sample_counter=self._count_labels,
        )
        self.started = clock()
        self.phase = AgentPhase.IDLE
        self.serving: Serving | None = None
        self.desired: DesiredState | None = None
        self.error: ReportedError | None = None
        self.rejected = 0
        self.job: _Job | None = None
        self._busy = False  # an activation is running on the executor
        self._inflight: tuple[int, int] | None = None  # (mid, last seq) of the batch in flight
        # Calls into the link never happen under self._lock (paho calls us back under its own
        # lock: holding ours while calling it would invert the order).  They queue here and
        # are sent by whichever thread releases self._lock next, one sender at a time.
        self._outbox: deque[tuple[Any, ...]] = deque()
        self._drain_lock = threading.Lock()
        self._want_flush = False
        self._early_acks: deque[int] = deque(maxlen=64)
        self._reported_dirty = True
        # What the retained host/presence says (None: not known on this connection yet) and
        # the host session it came from.  Telemetry waits while the host is offline: with
        # nobody subscribed the broker would accept and drop it, and the spool would count
        # it as delivered.  Chunk requests and events are not held.
        self._host_online: bool | None = None
        self._host_session: int | None = None
        self._hold_flush_until = 0.0
        self._next_heartbeat = clock()
        self.heartbeat_s = config.telemetry.heartbeat_s
        self.window = config.telemetry.window
        self.link = Link(
            BrokerConfig.from_url(
                config.broker.url,
                client_id=f"tf-{config.device.fleet}-{self.device}",
                username=config.broker.username,
                password=password,
                protocol=config.broker.protocol,
                keepalive=config.broker.keepalive,
                ca_file=config.broker.ca_file,
                cert_file=config.broker.cert_file,
                key_file=config.broker.key_file,
            ),
            self,
            logger=self.log.getChild("link"),
        )
        self._recover()

    # ------------------------------------------------------------------ persistence

    def _load_state(self) -> dict[str, Any]:
        try:
            value = json.loads(self._state_file.read_bytes())
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        self._persisted.update(
            session=self.session,
            generation=self.generation,
            failed=self._failed,
            event_seq=self._event_seq,
        )
        write_atomic(self._state_file, json.dumps(self._persisted).encode())

    def _recover(self) -> None:
        """Start-up: serve the committed model; give up on an activation that keeps crashing."""
        rec = self.store.recover()
        for problem in rec.problems:
            self.log.warning("%s", problem)
        trial = rec.interrupted
        if trial is not None and trial.attempts >= MAX_ACTIVATION_ATTEMPTS:
            self._failed = {
                "generation": trial.generation,
                "sha256": trial.sha256,
                "code": ErrorCode.INTERNAL.value,
                "message": f"activation crashed {trial.attempts} times; not retried",
            }
            self.store.end_trial()
            self._save_state()
        if rec.current is not None:
            try:
                from tinyfleet.agent.activation import health_check, load_slot

                model, bundle = load_slot(rec.current, self._loader)
                report = health_check(model, bundle, rec.current.artifact)
                self._serve(Activated(rec.current, model, bundle, report))
                self.phase = AgentPhase.ACTIVE
            except TinyfleetError as exc:
                self.log.error("committed model %s does not serve: %s", rec.current.label, exc)
        if self._failed is not None:
            self.error = ReportedError(
                code=ErrorCode(self._failed["code"]),
                message=str(self._failed["message"])[:500],
                generation=self._failed.get("generation"),
            )

    # ------------------------------------------------------------------ link handler

    def before_connect(self, link: Link) -> None:
        with self._lock:
            self.session += 1
            self._save_state()
            link.set_will(
                Will(self.topics.presence(self.device), encode(self._presence("offline")), 1, True)
            )

    def on_connected(self, link: Link, session_present: bool) -> None:
        with self._locked():
            self._inflight = None
            # The retained host presence comes right after the SUBACK; until it does (or a
            # short wait passes: a broker without any host presence), telemetry waits.
            self._host_online = None
            self._hold_flush_until = self.clock() + HOST_PRESENCE_WAIT_S
            self._send(
                self.topics.presence(self.device), encode(self._presence("online")), retain=True
            )
            self._sub(self.topics.device_subscriptions(self.device))
            while self._deferred_events:  # e.g. drift disabled for the model recovered at start
                self._event(*self._deferred_events.popleft())
            if self.job is not None:  # resume a download: ask again for what is missing
                for d in self.job.downloads:
                    d.requested.clear()
                self._request_chunks()
            self._publish_reported()
            self._flush()

    def on_disconnected(self, link: Link, reason: str) -> None:
        with self._locked():
            self._inflight = None
            self.log.info("disconnected: %s", reason)

    def on_published(self, link: Link, mid: int) -> None:
        with self._locked():
            if self._inflight is not None and self._inflight[0] == mid:
                self.spool.ack(self._inflight[1])
                self._inflight = None
                self._flush()
            else:  # the PUBACK may beat _flush_now recording the mid
                self._early_acks.append(mid)

    def on_message(self, link: Link, topic: str, payload: bytes, retained: bool) -> None:
        with self._locked():
            try:
                parsed = self.topics.parse(topic, device=self.device)
                if not payload:
                    return  # a cleared retained message (protocol §4): ignored, not counted
                if parsed.kind is TopicKind.CHUNK:
                    assert parsed.sha256 is not None and parsed.index is not None
                    self._on_chunk(parsed.sha256, parsed.index, payload)
                elif parsed.kind is TopicKind.DESIRED:
                    self._on_desired(decode(SignedDesiredState, payload))
                elif parsed.kind is TopicKind.HOST_PRESENCE:
                    self._on_host_presence(decode(HostPresence, payload))
                else:
                    raise ProtocolError(f"unexpected topic {topic!r} for a device")
            except (ProtocolError, ManifestError) as exc:
                self._reject(topic, str(exc))
            except TinyfleetError as exc:
                self._reject(topic, str(exc))
            except Exception as exc:  # never let a message kill the agent
                self.log.exception("internal error handling %s", topic)
                self._reject(topic, f"internal error: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ desired state

    def _on_host_presence(self, presence: HostPresence) -> None:
        if classify_session(self._host_session, presence.session) == "stale":
            return  # the late will (or birth) of an earlier host process
        self._host_session = presence.session
        was = self._host_online
        self._host_online = presence.status == "online"
        if self._host_online and not was:
            self._flush()

    def _host_ready(self) -> bool:
        """Whether telemetry may go out: the host is online, or no presence came in time."""
        if self._host_online is None:
            return self.clock() >= self._hold_flush_until
        return self._host_online

    def _on_desired(self, signed: SignedDesiredState) -> None:
        try:
            desired = verify_desired(signed, self.public_key, device=self.device)
        except (SignatureError, ProtocolError) as exc:
            # Nothing in an unverified desired state is trusted, its generation included (a
            # forged high generation would lock the device out of every later update), so it
            # is not processed; on_message counts it as rejected.  The reported error still
            # says why (e.g. a host key that is not the pinned one), without a generation, and
            # never in place of the failure of a generation that was processed.
            if self.error is None or self.error.generation is None:
                code = (
                    ErrorCode.SIGNATURE
                    if isinstance(exc, SignatureError)
                    else ErrorCode.BAD_MESSAGE
                )
                self.error = ReportedError(code=code, message=str(exc)[:500] or code.value)
            raise
        kind = classify_desired(self.generation, desired.generation)
        if kind == "stale":
            # A replayed or late older desired state is a rejected message like any other
            # (counted and reported): the event alone, without the counter, would make the
            # two disagree.
            raise ProtocolError(
                f"stale desired state: generation {desired.generation} < {self.generation}"
            )
        if kind == "duplicate":
            self.desired = self.desired or desired
            self.fl.configure(desired.fl)
            self._reported_dirty = True
            if self.job is None and not self._busy and self._failed is None:
                self._converge()
            return
        self.desired = desired
        self.generation = desired.generation
        self._failed = None
        self.error = None
        if desired.telemetry is not None:
            self.heartbeat_s = float(desired.telemetry.heartbeat_s)
            self.window = desired.telemetry.window
        self.fl.configure(desired.fl)
        self._save_state()
        self._converge()

    def _converge(self) -> None:
        """Start whatever brings the serving model to the desired one."""
        desired = self.desired
        if desired is None or self._busy:
            return
        want = desired.model
        if want is None:
            self._cancel_job()
            if self.serving is not None:
                self._close_serving()
            self.phase = AgentPhase.IDLE
            self._publish_reported()
            return
        if (
            self.serving is not None
            and self.serving.activated.content.artifact.sha256 == want.artifact_sha256
        ):
            self._cancel_job()
            self.phase = AgentPhase.ACTIVE
            self._publish_reported()
            return
        if self.job is not None and self.job.sha256 == want.artifact_sha256:
            self.job.generation = desired.generation
            return
        self._cancel_job()
        signed_bytes = json.dumps(want.manifest).encode()
        try:
            manifest = verify_manifest(
                signed_bytes,
                self.public_key,
                min_version=self._min_version(want.name),
                allow_rollback=want.rollback,
            )
            artifact = next(
                (a for a in manifest.artifacts if a.sha256 == want.artifact_sha256), None
            )
            if artifact is None:
                raise ManifestError(f"artifact {want.artifact_sha256[:12]} is not in the manifest")
            self._check_fit(artifact)
        except (TinyfleetError, ValueError) as exc:
            self._fail(desired.generation, exc, want.artifact_sha256)
            return
        staged = self.store.find(want.artifact_sha256)
        if staged is not None:
            self._submit(
                lambda: activate_slot(
                    self.store, staged, generation=desired.generation, loader=self._loader
                ),
                desired.generation,
                want.artifact_sha256,
                want.rollback,
            )
            return
        ref = manifest.reference
        staging = self.store.staging_dir
        dl_cfg = self.config.download
        model_dl = Download.open(
            BlobSpec(artifact.sha256, artifact.size, artifact.chunk_size, list(artifact.chunks)),
            staging,
            window=dl_cfg.chunk_window,
            timeout=dl_cfg.chunk_timeout_s,
            clock=self.clock,
        )
        ref_dl = Download.open(
            BlobSpec(ref.sha256, ref.size, artifact.chunk_size, None),
            staging,
            window=dl_cfg.chunk_window,
            timeout=dl_cfg.chunk_timeout_s,
            clock=self.clock,
        )
        self.job = _Job(
            desired.generation,
            artifact.sha256,
            [model_dl, ref_dl],
            signed_bytes,
            want.rollback,
            self.clock(),
        )
        self.phase = AgentPhase.DOWNLOADING
        self._publish_reported()
        self._request_chunks()
        self._maybe_finish_download()

    def _min_version(self, model: str) -> int | None:
        if self.serving is None:
            return None
        m = self.serving.activated.content.manifest
        return m.version if m.model == model else None

    def _check_fit(self, artifact: ManifestArtifact) -> None:
        p = self.profile
        if artifact.size > self.config.download.max_artifact_bytes:
            raise ActivationError(
                "no_fit",
                f"artifact is {artifact.size} B, limit {self.config.download.max_artifact_bytes} B",
            )
        if p.kind == "mcu":
            if artifact.format != "tflite" or artifact.precision != "int8":
                raise ActivationError(
                    "no_fit",
                    f"{p.name} runs int8 TFLite only, not {artifact.format} {artifact.precision}",
                )
            if artifact.arena_bytes is None:
                raise ActivationError("no_fit", f"{p.name}: the manifest has no measured arena")
            need = artifact.arena_bytes + p.ram_reserve_bytes
            if need > p.ram_bytes:
                raise ActivationError(
                    "no_fit",
                    f"{p.name}: arena {artifact.arena_bytes} B + reserve {p.ram_reserve_bytes} B "
                    f"= {need} B exceeds RAM {p.ram_bytes} B",
                )
            flash = artifact.size + p.runtime_flash_bytes
            if flash > p.flash_bytes:
                raise ActivationError(
                    "no_fit", f"{p.name}: model + runtime {flash} B exceed flash {p.flash_bytes} B"
                )

    # ------------------------------------------------------------------ download

    def _request_chunks(self) -> None:
        job = self.job
        if job is None or not self.link.connected:
            return
        subs: list[tuple[str, int]] = []
        for d in job.downloads:
            subs += [(self.topics.chunk(d.spec.sha256, i), 1) for i in d.next_requests()]
        if subs:
            self._sub(subs)

    def _on_chunk(self, sha256: str, index: int, payload: bytes) -> None:
        job = self.job
        d = (
            None
            if job is None
            else next((d for d in job.downloads if d.spec.sha256 == sha256), None)
        )
        if d is None:
            return  # a chunk we no longer want (late retained delivery)
        topic = self.topics.chunk(sha256, index)
        try:
            new = d.on_chunk(index, payload)
        finally:
            if index not in d.requested:
                self._unsub([topic])
        if new:
            self._request_chunks()
            self._maybe_finish_download()
            if index % 8 == 0:
                self._reported_dirty = True

    def _maybe_finish_download(self) -> None:
        job = self.job
        if job is None or not all(d.done for d in job.downloads):
            return
        paths: list[Path] = []
        for d in job.downloads:
            try:
                paths.append(d.finish())
            except ManifestError as exc:
                # the blob is fetched again: its chunks are asked for when they time out
                self._reject(self.topics.chunk(d.spec.sha256, 0), str(exc))
                self._request_chunks()
                return
        crash_point("after_download")
        self.job = None
        model_path, ref_path = paths
        gen, sha, signed, rollback = job.generation, job.sha256, job.signed, job.rollback
        self.phase = AgentPhase.VERIFYING
        self._publish_reported()

        def work() -> Activated:
            return activate(
                self.store,
                signed,
                sha,
                model_path,
                ref_path,
                public_key=self.public_key,
                generation=gen,
                loader=self._loader,
                min_version=self._min_version_unlocked(signed),
                allow_rollback=rollback,
            )

        self._submit(work, gen, sha, rollback, cleanup=[model_path, ref_path])

    def _min_version_unlocked(self, signed: bytes) -> int | None:
        try:
            name = SignedManifest.model_validate_json(signed).manifest.model
        except ValueError:
            return None
        with self._lock:
            return self._min_version(name)

    def _cancel_job(self) -> None:
        job = self.job
        if job is None:
            return
        self.job = None
        topics = [self.topics.chunk(d.spec.sha256, i) for d in job.downloads for i in d.requested]
        if topics:
            self._unsub(topics)

    # ------------------------------------------------------------------ activation

    def _submit(
        self,
        work: Callable[[], Activated],
        generation: int,
        sha256: str,
        rollback: bool,
        cleanup: list[Path] | None = None,
    ) -> None:
        self._busy = True
        self.phase = AgentPhase.ACTIVATING
        self._publish_reported()

        def run() -> None:
            try:
                result: Activated | BaseException = work()
            except BaseException as exc:  # reported below; never lost in the executor
                result = exc
            with self._locked():
                self._busy = False
                if isinstance(result, BaseException):
                    self._fail(generation, result, sha256)
                else:
                    previous = self.serving
                    self._serve(result)
                    if previous is not None:
                        previous.activated.model.close()
                    self.phase = AgentPhase.ACTIVE
                    self.error = None
                    self._event(
                        EventKind.ROLLED_BACK if rollback else EventKind.ACTIVATED,
                        f"{result.content.label} in slot {result.content.slot}; "
                        f"health agreement {result.health.agreement:.0%}, "
                        f"median latency {result.health.latency_ms_median:.2f} ms"
                        f" (max {result.health.latency_ms_max:.2f})",
                    )
                    for p in cleanup or []:
                        p.unlink(missing_ok=True)
                    self._publish_reported()
                # a newer desired state may have arrived meanwhile
                want = self.desired.model if self.desired is not None else None
                if (self.desired is not None and self.desired.generation != generation) or (
                    want is not None
                    and self.serving is not None
                    and want.artifact_sha256 != self.serving.activated.content.artifact.sha256
                    and self._failed is None
                ):
                    self._converge()

        self.executor.submit(run)

    def _serve(self, activated: Activated) -> None:
        manifest = activated.content.manifest
        n_classes = int(np.prod(activated.content.artifact.output.shape[1:])) or len(
            manifest.classes
        )
        drift_cfg = self.config.drift
        drift = self._drift_for(activated, max(1, n_classes))
        monitor = features.get_monitor(activated.bundle.profile.monitor) if drift else None
        self.serving = Serving(
            activated=activated,
            preprocess=features.get_pipeline(manifest.preprocess),
            stats=WindowStats(self.window, max(1, n_classes)),
            since=_utcnow(),
            n_classes=max(1, n_classes),
            n_inputs=int(np.prod(activated.content.artifact.input.shape[1:])),
            drift=drift,
            monitor=None if monitor is None else monitor.features_and_stats,
            drift_window=drift_cfg.window or self.window,
            drift_window_s=drift_cfg.window_s,
            drift_min_samples=drift_cfg.min_samples,
            drift_started=time.monotonic(),
        )

    def _drift_for(self, activated: Activated, n_classes: int) -> DriftAccumulator | None:
        """The drift accumulator of a version, or None (disabled, or the profile does not fit)."""
        if not self.config.drift.enabled:
            return None
        content = activated.content
        profile = activated.bundle.profile
        n_inputs = int(np.prod(content.artifact.input.shape[1:]))
        problem = None
        # a profile may monitor sensor stats after the model's features: both are counted
        monitor = features.get_monitor(profile.monitor)
        n_stats = 0 if monitor is None else len(monitor.names)
        if profile.monitor is not None and (
            monitor is None or monitor.name != content.manifest.preprocess
        ):
            problem = (
                f"its reference profile monitors sensor stats of {profile.monitor!r}, "
                f"which this agent does not have for pipeline {content.manifest.preprocess!r}"
            )
        elif n_inputs != profile.model_inputs or n_inputs + n_stats != len(profile.features):
            problem = (
                f"the model takes {n_inputs} input features"
                + (f" and {profile.monitor} adds {n_stats} sensor stats" if n_stats else "")
                + f", its reference profile has {len(profile.features)}"
            )
        elif n_inputs + n_stats > MAX_DRIFT_FEATURES:
            problem = (
                f"{n_inputs + n_stats} input features and sensor stats; drift statistics "
                f"stop at {MAX_DRIFT_FEATURES}"
            )
        else:
            try:
                return DriftAccumulator(profile, n_classes=n_classes, eps=self.config.drift.eps)
            except ValueError as exc:
                problem = str(exc)
        self._drift_disabled(content.label, problem)
        return None

    def _drift_disabled(self, label: str, problem: str) -> None:
        """One warning and one event; inference goes on without drift statistics."""
        detail = f"drift statistics disabled for {label}: {problem}"
        self.log.warning("%s", detail)
        if self.link.connected:
            self._event(EventKind.DRIFT_DISABLED, detail)
        else:
            self._deferred_events.append((EventKind.DRIFT_DISABLED, detail))

    def _close_serving(self) -> None:
        if self.serving is not None:
            self.serving.activated.model.close()
            self.serving = None

    def _fail(self, generation: int, exc: BaseException, sha256: str | None) -> None:
        code = reason_code(exc)
        message = exc.message if isinstance(exc, ActivationError) else str(exc)
        if code == "internal":
            self.log.error("activation of generation %s failed", generation, exc_info=exc)
        else:
            self.log.warning("generation %s refused (%s): %s", generation, code, message)
        self._failed = {
            "generation": generation,
            "sha256": sha256,
            "code": code,
            "message": message[:500],
        }
        try:
            err_code = ErrorCode(code)
        except ValueError:
            err_code = ErrorCode.INTERNAL
        self.error = ReportedError(
            code=err_code, message=message[:500] or code, generation=generation
        )
        self.phase = AgentPhase.ROLLED_BACK if code == "health_check" else AgentPhase.FAILED
        self._save_state()
        self._event(
            EventKind.NO_FIT if code == "no_fit" else EventKind.ACTIVATION_FAILED,
            f"{code}: {message}",
        )
        self._publish_reported()
        # the previous model keeps serving
        self.phase = AgentPhase.ACTIVE if self.serving is not None else AgentPhase.IDLE

    # ------------------------------------------------------------------ inference

    def infer(self, raw: np.ndarray, label: int | None = None) -> Prediction:
        """Run the serving model on one raw input (before the version's feature pipeline).

        Counts the inference in the telemetry window and in the drift statistics.  With
        ``label`` (the true class, when the application knows it) the features just
        computed are also stored in the label buffer (``LabelError`` if the label is not
        a class of the model, checked before anything runs).
        """
        serving = self.serving
        if serving is None:
            raise NoModelError("no model is in service yet")
        if label is not None:
            label = check_label(label, serving.n_classes)
        t0 = time.perf_counter()
        batch = np.asarray(raw, dtype=np.float32)[None, ...]
        stats = None
        if serving.monitor is not None and serving.drift is not None:
            x, stats = serving.monitor(batch)  # one pass: the model's features + sensor stats
        else:
            x = serving.preprocess(batch)
        probs = serving.activated.model.invoke_one(x[0])
        latency = (time.perf_counter() - t0) * 1000.0
        top = int(np.argmax(probs))
        confidence = float(probs[top])
        with serving.lock:
            if serving.stats.add(top, confidence, latency):
                record = serving.stats.take()
                record["model"] = serving.label
                self.spool.append(self.session or 1, "inference", json.dumps(record).encode())
            drift = serving.drift
            if drift is not None:
                try:
                    row = x[0] if stats is None else np.concatenate([x[0].ravel(), stats[0]])
                    drift.add(row, probs, label=top, confidence=confidence)
                except ValueError as exc:  # features that do not fit the profile after all
                    serving.drift = None
                    with self._locked():
                        self._drift_disabled(serving.label, str(exc))
                else:
                    if drift.n >= serving.drift_window or (
                        serving.drift_window_s is not None
                        and drift.n >= serving.drift_min_samples
                        and time.monotonic() - serving.drift_started >= serving.drift_window_s
                    ):
                        self._spool_drift(serving, drift)
        if label is not None:
            self._store_label(serving, x[0], label)
        return Prediction(top, confidence, probs, serving.label, latency)

    def _spool_drift(self, serving: Serving, drift: DriftAccumulator) -> None:
        """Close the drift window: spool its scores as a ``drift`` record (no raw data)."""
        serving.drift_started = time.monotonic()
        scores = drift.report()
        if scores is None:
            return
        manifest = serving.activated.content.manifest
        record = {
            "kind": "drift",
            "ts": _utcnow().isoformat(),
            "model": manifest.model,
            "version": manifest.version,
            "window": scores["window"],
            "n": scores["n"],
            "psi": [round(v, DRIFT_DIGITS) for v in scores["psi"]],
            "ks": [round(v, DRIFT_DIGITS) for v in scores["ks"]],
            "js_prediction": round(scores["js_prediction"], 6),
            "mean_confidence": round(scores["mean_confidence"], 6),
            "confidence_shift": round(scores["confidence_shift"], 6),
        }
        session = self.session or 1
        try:
            DriftReport.model_validate({**record, "session": session, "seq": 0})
        except ValueError as exc:  # never expected: the scores are bounded by construction
            self.log.error("drift window %s not reported: %s", scores["window"], exc)
            return
        self.spool.append(session, "drift", json.dumps(record).encode())

    # ------------------------------------------------------------------ labelled samples

    @property
    def labels(self) -> LabelBuffer:
        """The label buffer (``<state_dir>/labels.db``), opened on first use."""
        with self._labels_lock:
            if self._labels is None:
                self._labels = LabelBuffer(
                    self.config.paths.state_dir / "labels.db",
                    capacity=self.config.labels.capacity,
                )
            return self._labels

    def _count_labels(self, path: Path) -> int | None:
        """Labelled samples, for the SuperNode supervisor: through the open buffer if any."""
        buf = self._labels
        if buf is None:
            return count_labelled(path)
        try:
            return buf.count()
        except LabelError:
            return None

    def add_label(self, raw: np.ndarray, label: int) -> None:
        """Store a labelled sample: ``raw`` through the serving version's feature pipeline.

        ``NoModelError`` when nothing serves (the features depend on the version);
        ``LabelError`` for a label that is not a class of the model or input that does
        not fit the feature pipeline.  The sample never leaves the device.
        """
        serving = self.serving
        if serving is None:
            raise NoModelError("no model is in service yet: labelled samples need its features")
        value = check_label(label, serving.n_classes)
        try:
            x = serving.preprocess(np.asarray(raw, dtype=np.float32)[None, ...])
        except ValueError as exc:
            raise LabelError(f"input does not fit the feature pipeline: {exc}") from None
        if x[0].size != serving.n_inputs:
            raise LabelError(
                f"input does not fit the model: {x[0].size} features, {serving.label} "
                f"takes {serving.n_inputs}"
            )
        self._store_label(serving, x[0], value)

    def _store_label(self, serving: Serving, features_one: np.ndarray, label: int) -> None:
        manifest = serving.activated.content.manifest
        self.labels.add(features_one, label, preprocess=manifest.preprocess, model=serving.label)

    # ------------------------------------------------------------------ reporting

    def _presence(self, status: str) -> Presence:
        return Presence(
            device=self.device,
            status=status,  # type: ignore[arg-type]
            session=max(1, self.session),
            ts=_utcnow(),
            agent_version=AGENT_VERSION,
            profile=self.profile.name,
            capabilities=Capabilities(
                runtimes=available_runtimes(),
                ram_bytes=self.profile.ram_bytes,
                protocol_revision=PROTOCOL_REVISION_FL,
            ),
            tags=self.config.device.tags,
            groups=self.config.device.groups,
        )

    def _active_model(self, serving: Serving | None) -> ActiveModel | None:
        if serving is None:
            return None
        c = serving.activated.content
        return ActiveModel(
            name=c.manifest.model,
            version=c.manifest.version,
            sha256=c.artifact.sha256,
            slot=c.slot,
            since=serving.since,
        )  # type: ignore[arg-type]

    def reported_state(self) -> ReportedState:
        with self._lock:
            progress = None
            if self.job is not None:
                d = self.job.downloads[0]
                progress = DownloadProgress(
                    sha256=d.spec.sha256, received_chunks=d.received, total_chunks=d.spec.chunks
                )
            prev = None
            if self.serving is not None:
                other = self.store.read_slot(
                    self.store.other(self.serving.activated.content.slot), check_digest=False
                )
                if other is not None:
                    prev = ActiveModel(
                        name=other.manifest.model,
                        version=other.manifest.version,
                        sha256=other.artifact.sha256,
                        slot=other.slot,
                        since=self.serving.since,
                    )  # type: ignore[arg-type]
            return ReportedState(
                device=self.device,
                session=max(1, self.session),
                ts=_utcnow(),
                generation=self.generation or 0,
                phase=self.phase,
                active=self._active_model(self.serving),
                previous=prev,
                error=self.error,
                rejected_messages=self.rejected,
                progress=progress,
                fl=self.fl.status(),
            )

    def _publish_reported(self) -> None:
        self._reported_dirty = False
        if self.link.connected:
            self._send(
                self.topics.reported(self.device), encode(self.reported_state()), retain=True
            )
        else:
            self._reported_dirty = True

    def _event(self, kind: EventKind, detail: str, topic: str | None = None) -> None:
        self._event_seq += 1
        if not self.link.connected:
            return
        event = DeviceEvent(
            device=self.device,
            session=max(1, self.session),
            seq=self._event_seq,
            ts=_utcnow(),
            kind=kind,
            detail=detail[:1000],
            topic=topic[:256] if topic else None,
        )
        self._send(self.topics.events(self.device), encode(event))

    def _reject(self, topic: str, reason: str) -> None:
        self.rejected += 1
        self.log.warning("rejected message on %s: %s", topic, reason)
        self._event(EventKind.MESSAGE_REJECTED, reason, topic)
        self._reported_dirty = True

    # ------------------------------------------------------------------ outbox

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            yield
        self._drain()

    def _send(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self._outbox.append(("pub", topic, payload, qos, retain))

    def _sub(self, filters: list[tuple[str, int]]) -> None:
        self._outbox.append(("sub", filters))

    def _unsub(self, topics: list[str]) -> None:
        self._outbox.append(("unsub", topics))

    def _drain(self) -> None:
        """Send what is queued, in order; if another thread is sending, it sends ours too."""
        while self._outbox or self._want_flush:
            if not self._drain_lock.acquire(blocking=False):
                return
            try:
                while self._outbox:
                    op = self._outbox.popleft()
                    if op[0] == "pub":
                        self.link.publish(op[1], op[2], op[3], op[4])
                    elif op[0] == "sub":
                        self.link.subscribe(op[1])
                    else:
                        self.link.unsubscribe(op[1])
                if self._want_flush:
                    self._want_flush = False
                    self._flush_now()
            finally:
                self._drain_lock.release()

    def _flush(self) -> None:
        self._want_flush = True

    def _flush_now(self) -> None:
        """Send the oldest spooled telemetry (one batch in flight; acked on PUBACK)."""
        with self._lock:
            if self._inflight is not None or not self.link.connected or not self._host_ready():
                return
            payload, last = self._telemetry_batch()
            if payload is None:
                return
            self._inflight = (-1, last)  # reserved until the mid is known
        mid = self.link.publish(self.topics.telemetry(self.device), payload, 1, False)
        with self._lock:
            if mid is None:
                self._inflight = None
            elif mid in self._early_acks:
                self._early_acks.remove(mid)
                self.spool.ack(last)
                self._inflight = None
                self._want_flush = True
            else:
                self._inflight = (mid, last)

    def _telemetry_batch(self) -> tuple[bytes | None, int]:
        records = self.spool.peek(FLUSH_BATCH)
        if not records:
            return None, 0
        batch: list[dict[str, Any]] = []
        for r in records:
            try:
                body = json.loads(r.body)
            except ValueError:
                continue
            body.update(seq=r.seq, session=min(r.session, max(1, self.session)))
            batch.append(body)
        head = {"device": self.device, "session": max(1, self.session)}
        try:
            msg = TelemetryBatch.model_validate({**head, "records": batch})
        except ValueError:
            # A record we wrote cannot be sent: drop that record only (the others of the
            # batch still go; the acknowledgement covers the whole batch), never block the queue.
            good = []
            for body in batch:
                try:
                    TelemetryBatch.model_validate({**head, "records": [body]})
                except ValueError as exc:
                    self.log.error("dropping unsendable telemetry seq %s: %s", body["seq"], exc)
                else:
                    good.append(body)
            if not good:
                self.spool.ack(records[-1].seq)
                return None, 0
            msg = TelemetryBatch.model_validate({**head, "records": good})
        return encode(msg), records[-1].seq

    # ------------------------------------------------------------------ timers

    def tick(self) -> None:
        """Timers: heartbeat, chunk timeouts, telemetry flush, deferred reports, the SuperNode."""
        self._supervise_fl()
        with self._locked():
            now = self.clock()
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + self.heartbeat_s
                self.spool.append(
                    self.session or 1, "heartbeat", json.dumps(self._heartbeat()).encode()
                )
                self._flush()
            elif self.spool.pending and self._inflight is None:
                self._flush()  # e.g. records held back until the host came online
            job = self.job
            if job is not None and self.link.connected:
                late = [(d, d.overdue()) for d in job.downloads]
                if any(idx for _, idx in late):
                    if max(d.retries for d in job.downloads) > DOWNLOAD_MAX_RETRIES:
                        self._cancel_job()
                        self._fail(
                            job.generation,
                            ActivationError("download_timeout", "chunks did not arrive"),
                            job.sha256,
                        )
                    else:
                        for d, idx in late:
                            if idx:
                                request = ChunkRequest(
                                    device=self.device, sha256=d.spec.sha256, chunks=idx
                                )
                                self._send(self.topics.chunk_request(self.device), encode(request))
                                self._sub([(self.topics.chunk(d.spec.sha256, i), 1) for i in idx])
            if self._reported_dirty:
                self._publish_reported()

    def _supervise_fl(self) -> None:
        """Start, restart or stop the SuperNode (outside the agent's lock: it runs processes)."""
        before = self.fl.status()
        events = self.fl.poll()
        if events or self.fl.status() != before:
            with self._locked():
                for kind, detail in events:
                    self._event(kind, detail)
                self._reported_dirty = True

    def _heartbeat(self) -> dict[str, Any]:
        s = self.serving
        lat = None
        if s is not None and s.stats.count:
            lat = s.stats.latencies[: s.stats.count]
        return {
            "kind": "heartbeat",
            "ts": _utcnow().isoformat(),
            "uptime_s": round(self.clock() - self.started, 3),
            "model": None if s is None else s.label,
            "inference_count": 0 if s is None else s.stats.total,
            "latency_p50_ms": None if lat is None else float(np.percentile(lat, 50)),
            "latency_p99_ms": None if lat is None else float(np.percentile(lat, 99)),
            "prediction_hist": [] if s is None else [int(v) for v in s.stats.hist],
            "rejected_messages": self.rejected,
            "spool_dropped": self.spool.dropped,
            "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }

    # ------------------------------------------------------------------ lifecycle

    def close(self, timeout: float = 5.0) -> None:
        """Say goodbye (offline presence), disconnect cleanly, release resources."""
        self.fl.close()  # the SuperNode goes with the agent
        with self._locked():
            if self.link.connected:
                self._send(
                    self.topics.presence(self.device),
                    encode(self._presence("offline")),
                    retain=True,
                )
        self.link.close(timeout)
        if self._own_executor:
            self.executor.shutdown(wait=True)
        with self._lock:
            self._close_serving()
            self.spool.close()
            with self._labels_lock:
                if self._labels is not None:
                    self._labels.close()
                    self._labels = None

    def status(self) -> dict[str, Any]:
        """A snapshot for local tools (``tinyfleet-agent status``, the local API)."""
        return self.reported_state().model_dump(mode="json")
