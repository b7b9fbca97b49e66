"""Where drift alerts go besides the database: the log, MQTT ``host/events``, a webhook.

A sink's ``emit`` is called in the drift monitor's thread and must not block: the
log and MQTT sinks only queue (paho keeps QoS 1 messages while the link is down);
the webhook sink puts the event on a bounded queue that its own thread POSTs, with
full-jitter exponential backoff between attempts.  No sink ever raises into the
monitor: failures are logged and counted.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from tinyfleet.agent.protocol import HostEvent, encode
from tinyfleet.host.fleet.drift_rules import WebhookSettings

__all__ = [
    "AlertEvent",
    "AlertSink",
    "LogSink",
    "MqttSink",
    "WebhookSink",
    "WebhookStats",
]

EventKind = Literal["drift_alert", "drift_cleared"]


@dataclass(frozen=True)
class AlertEvent:
    """An alert opened (``drift_alert``) or cleared (``drift_cleared``)."""

    kind: EventKind
    alert_id: int
    fleet: str
    device: str | None
    rule: str
    cohort: str
    model: str
    version: int
    value: float
    windows: int
    ts: datetime = field(default_factory=lambda: datetime.now(UTC))
    reason: str = ""

    def payload(self) -> dict[str, Any]:
        """The JSON object that MQTT and webhook consumers receive as ``payload``."""
        return {
            "alert_id": self.alert_id,
            "fleet": self.fleet,
            "device": self.device,
            "rule": self.rule,
            "cohort": self.cohort,
            "model": f"{self.model}@{self.version}",
            "value": round(float(self.value), 6),
            "windows": self.windows,
            "reason": self.reason,
        }

    def host_event(self) -> HostEvent:
        return HostEvent(kind=self.kind, ts=self.ts, payload=self.payload())

    def webhook_body(self) -> bytes:
        body = {
            "kind": self.kind,
            "ts": self.ts.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            **self.payload(),
        }
        return json.dumps(body, sort_keys=True).encode()


class AlertSink(Protocol):
    def emit(self, event: AlertEvent) -> None: ...

    def close(self, timeout: float = 5.0) -> None: ...


class LogSink:
    """One log line per alert event (WARNING when opened, INFO when cleared)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("tinyfleet.host.drift.alerts")

    def emit(self, event: AlertEvent) -> None:
        who = event.device or f"cohort {event.cohort}"
        if event.kind == "drift_alert":
            self.log.warning(
                "drift alert #%d: %s, rule %s = %.3f (%s@%d, cohort %s)",
                event.alert_id,
                who,
                event.rule,
                event.value,
                event.model,
                event.version,
                event.cohort,
            )
        else:
            self.log.info(
                "drift alert #%d cleared: %s, rule %s after %d windows%s",
                event.alert_id,
                who,
                event.rule,
                event.windows,
                f" ({event.reason})" if event.reason else "",
            )

    def close(self, timeout: float = 5.0) -> None:
        return None


class MqttSink:
    """Publishes a ``HostEvent`` on ``host/events`` (QoS 1, not retained) through ``publish``."""

    def __init__(
        self,
        publish: Callable[[str, bytes, int, bool], object],
        topic: str,
        logger: logging.Logger | None = None,
    ) -> None:
        self._publish = publish
        self.topic = topic
        self.log = logger or logging.getLogger("tinyfleet.host.drift.mqtt")
        self.published = 0
        self.failed = 0

    def emit(self, event: AlertEvent) -> None:
        try:
            mid = self._publish(self.topic, encode(event.host_event()), 1, False)
        except Exception as exc:  # the link refused it; the database still has the alert
            self.failed += 1
            self.log.warning("could not publish drift event on %s: %s", self.topic, exc)
            return
        if mid is None:
            self.failed += 1
        else:
            self.published += 1

    def close(self, timeout: float = 5.0) -> None:
        return None


@dataclass
class WebhookStats:
    queued: int = 0
    delivered: int = 0
    attempts: int = 0
    retries: int = 0
    failed: int = 0
    """Events given up after ``max_attempts`` (or refused with a 4xx other than 408/429)."""
    dropped: int = 0
    """Events refused because the queue was full."""


class WebhookSink:
    """POSTs each event as JSON to ``settings.url`` from its own thread.

    A 2xx answer delivers the event; a connection error, a timeout, 408, 429 or a 5xx
    is retried after ``uniform(0, min(cap, base * 2**attempt))`` seconds, up to
    ``max_attempts`` attempts; any other 4xx is final.  Events wait in a bounded
    queue: when it is full the new event is dropped and counted, ingest never waits.
    Delivery is in order and at least once (a consumer de-duplicates on
    ``alert_id`` + ``kind``).
    """

    def __init__(
        self,
        settings: WebhookSettings,
        logger: logging.Logger | None = None,
        *,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        if not settings.url:
            raise ValueError("the webhook sink needs a url")
        self.settings = settings
        self.url = settings.url
        self.log = logger or logging.getLogger("tinyfleet.host.drift.webhook")
        self.stats = WebhookStats()
        self._queue: deque[AlertEvent] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._busy = False
        self._sleep = sleep or (lambda s: not self._stop.wait(s))
        self._thread = threading.Thread(target=self._run, name="drift-webhook", daemon=True)
        self._thread.start()

    def emit(self, event: AlertEvent) -> None:
        with self._cond:
            if len(self._queue) >= self.settings.queue_max:
                self.stats.dropped += 1
                if self.stats.dropped == 1 or self.stats.dropped % 100 == 0:
                    self.log.warning(
                        "webhook queue full (%d): dropped %d events so far",
                        self.settings.queue_max,
                        self.stats.dropped,
                    )
                return
            self._queue.append(event)
            self.stats.queued += 1
            self._cond.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued event is delivered or given up."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Try to deliver what is queued for up to ``timeout`` s, then stop."""
        self.flush(timeout)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(0.5)
                if not self._queue:
                    return
                event = self._queue.popleft()
                self._busy = True
            try:
                self._deliver(event)
            except Exception:  # a bug must not end the thread
                self.log.exception("webhook delivery of alert #%d failed", event.alert_id)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _deliver(self, event: AlertEvent) -> None:
        s = self.settings
        body = event.webhook_body()
        headers = {"Content-Type": "application/json", "User-Agent": "tinyfleet-host"}
        if s.bearer_token:
            headers["Authorization"] = f"Bearer {s.bearer_token}"
        last = ""
        for attempt in range(1, s.max_attempts + 1):
            self.stats.attempts += 1
            retry, last = self._post(body, headers)
            if last == "":
                self.stats.delivered += 1
                return
            if not retry or attempt == s.max_attempts:
                break
            self.stats.retries += 1
            delay = random.uniform(0.0, min(s.backoff_cap_s, s.backoff_base_s * 2**attempt))
            if not self._sleep(delay):
                break  # stopping
        self.stats.failed += 1
        self.log.warning(
            "webhook %s: gave up on alert #%d (%s) after %d attempts: %s",
            self.url,
            event.alert_id,
            event.kind,
            min(attempt, s.max_attempts),
            last,
        )

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[bool, str]:
        """One attempt: ``(retryable, error)``; the error is ``""`` on success."""
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.settings.timeout_s) as resp:
                resp.read(65536)
                return False, ""
        except urllib.error.HTTPError as exc:
            code = exc.code
            return (code in (408, 429) or code >= 500), f"HTTP {code}"
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return True, f"{type(exc).__name__}: {reason}"
