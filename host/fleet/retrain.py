"""Retrain policy: sustained drift on a cohort starts a federated retraining run.

The drift monitor calls ``RetrainPolicy.evaluate`` for every cohort whose devices
changed, with the devices whose alert has been open for at least
``sustained_windows`` windows.  The policy triggers when there are at least
``min_devices`` of them and they are at least ``min_fraction`` of the cohort, unless a
run was triggered for the same model version (any cohort of it) less than
``cooldown_s`` ago.  The cooldown is read from ``retrain_decisions`` (the last
``triggered`` row), so a restarted host does not trigger again.  Every decision is a
row there; repeated ``too_few_devices``/``cooldown``/``no_trigger`` rows of a cohort
are written at most every ``decision_interval_s`` unless the outcome changes.

``trigger(cohort, devices)`` starts the run and returns its id (``None``: declined);
it must return promptly (it runs in the monitor's thread).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, func, insert, select

from tinyfleet.host.db.engine import writer
from tinyfleet.host.db.tables import RetrainDecisionRow
from tinyfleet.host.fleet.drift_rules import RetrainSettings

__all__ = ["DECISIONS", "CohortKey", "RetrainPolicy", "RetrainTrigger"]

DECISIONS = ("triggered", "cooldown", "too_few_devices", "no_trigger", "declined", "trigger_failed")


@dataclass(frozen=True, order=True)
class CohortKey:
    """A cohort: devices with ``tag`` (``*``: all) serving ``model@version``."""

    tag: str
    model: str
    version: int

    @property
    def key(self) -> str:
        return f"{self.tag}|{self.model}@{self.version}"

    @property
    def model_ref(self) -> str:
        return f"{self.model}@{self.version}"

    @classmethod
    def parse(cls, key: str) -> CohortKey:
        tag, _, ref = key.rpartition("|")
        model, _, version = ref.partition("@")
        if not tag or not model or not version.isdigit():
            raise ValueError(f"not a cohort key: {key!r} (TAG|MODEL@VERSION)")
        return cls(tag, model, int(version))


RetrainTrigger = Callable[[CohortKey, list[str]], str | None]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class RetrainPolicy:
    def __init__(
        self,
        engine: Engine,
        fleet: str,
        settings: RetrainSettings,
        trigger: RetrainTrigger | None = None,
        *,
        logger: logging.Logger | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.engine = engine
        self._writes = writer(engine)
        self.fleet = fleet
        self.settings = settings
        self.trigger = trigger
        self.log = logger or logging.getLogger("tinyfleet.host.drift.retrain")
        self._clock = clock or (lambda: datetime.now(UTC))
        self._last: dict[str, tuple[str, datetime, int]] = {}

    def evaluate(self, cohort: CohortKey, size: int, sustained: list[str]) -> str | None:
        """Decide for one cohort; the decision recorded (``None``: nothing to decide/record)."""
        s = self.settings
        if not s.enabled or not sustained:
            self._last.pop(cohort.key, None)
            return None
        now = self._clock()
        devices = sorted(sustained)
        fraction = len(devices) / max(size, 1)
        run_id: str | None = None
        detail = f"{len(devices)} of {size} devices drifting for >= {s.sustained_windows} windows"
        if len(devices) < s.min_devices or fraction < s.min_fraction:
            decision = "too_few_devices"
            detail += f" (need {s.min_devices} and {s.min_fraction:.0%})"
        else:
            last = self._last_trigger(cohort)
            if last is not None and now - last < timedelta(seconds=s.cooldown_s):
                decision = "cooldown"
                until = last + timedelta(seconds=s.cooldown_s)
                detail += f"; {cohort.model_ref} retrained at {last:%Y-%m-%dT%H:%M:%SZ}, "
                detail += f"cooldown until {until:%Y-%m-%dT%H:%M:%SZ}"
            elif self.trigger is None:
                decision = "no_trigger"
                detail += "; no retraining trigger is configured"
            else:
                try:
                    run_id = self.trigger(cohort, devices)
                except Exception as exc:
                    decision = "trigger_failed"
                    detail += f"; trigger failed: {type(exc).__name__}: {exc}"
                    self.log.exception("retrain trigger for %s failed", cohort.key)
                else:
                    decision = "triggered" if run_id else "declined"
        if decision != "triggered" and not self._due(cohort.key, decision, len(devices), now):
            return None
        self._last[cohort.key] = (decision, now, len(devices))
        with self._writes.begin() as conn:
            conn.execute(
                insert(RetrainDecisionRow),
                {
                    "fleet": self.fleet,
                    "cohort": cohort.key,
                    "decision": decision,
                    "devices": devices,
                    "cohort_size": size,
                    "run_id": run_id,
                    "detail": detail[:1000],
                    "decided_at": now,
                },
            )
        level = logging.WARNING if decision in ("triggered", "trigger_failed") else logging.INFO
        self.log.log(level, "retrain %s: %s (%s)", cohort.key, decision, detail)
        return decision

    def _due(self, key: str, decision: str, n: int, now: datetime) -> bool:
        last = self._last.get(key)
        if last is None or last[0] != decision or last[2] != n:
            return True
        return (now - last[1]).total_seconds() >= self.settings.decision_interval_s

    def _last_trigger(self, cohort: CohortKey) -> datetime | None:
        t = RetrainDecisionRow.__table__.c
        with self.engine.connect() as conn:
            value = conn.execute(
                select(func.max(t.decided_at)).where(
                    t.fleet == self.fleet,
                    t.decision == "triggered",
                    t.cohort.like("%|" + _like_escape(cohort.model_ref), escape="\\"),
                )
            ).scalar()
        if value is None:
            return None
        if isinstance(value, str):  # SQLite's MAX() returns the stored text
            value = datetime.fromisoformat(value)
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
