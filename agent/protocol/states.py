"""State machines and ordering rules of the protocol: pure, table-driven, no I/O.

Three machines (the agent's model lifecycle, a rollout, one device within a
rollout) are each an enum of states, an enum of events and a transition table;
``StateMachine.transition`` raises ``IllegalTransitionError`` for any pair that is
not in the table.  Three small functions decide what to do with a desired-state
generation, a model version and a presence session number.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Generic, Literal, TypeVar

from tinyfleet.agent.protocol.codec import ProtocolError

__all__ = [
    "AGENT_MACHINE",
    "DEVICE_ROLLOUT_MACHINE",
    "ROLLOUT_MACHINE",
    "AgentEvent",
    "AgentPhase",
    "DesiredClass",
    "DeviceRolloutEvent",
    "DeviceRolloutStatus",
    "IllegalTransitionError",
    "RolloutEvent",
    "RolloutPhase",
    "SessionClass",
    "StateMachine",
    "VersionCheck",
    "agent_transition",
    "check_version",
    "classify_desired",
    "classify_session",
    "device_rollout_transition",
    "rollout_transition",
]

S = TypeVar("S", bound=Enum)
E = TypeVar("E", bound=Enum)


class IllegalTransitionError(ProtocolError):
    """An event arrived in a state whose transition table has no entry for it."""


@dataclass(frozen=True)
class StateMachine(Generic[S, E]):
    """A transition table with a start state; states without outgoing edges are terminal."""

    name: str
    initial: S
    table: Mapping[tuple[S, E], S]
    terminal: frozenset[S] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", MappingProxyType(dict(self.table)))
        states = {s for s, _ in self.table} | set(self.table.values()) | {self.initial}
        sources = {s for s, _ in self.table}
        object.__setattr__(self, "terminal", frozenset(states - sources))

    def transition(self, state: S, event: E) -> S:
        """The state after ``event`` in ``state``; ``IllegalTransitionError`` if not allowed."""
        try:
            return self.table[(state, event)]
        except KeyError:
            allowed = ", ".join(sorted(e.value for e in self.events(state))) or "none (terminal)"
            raise IllegalTransitionError(
                f"{self.name}: event '{event.value}' is not allowed in state '{state.value}' "
                f"(allowed: {allowed})"
            ) from None

    def events(self, state: S) -> frozenset[E]:
        """Events with a transition out of ``state``."""
        return frozenset(e for s, e in self.table if s == state)

    def reachable(self, start: S | None = None) -> frozenset[S]:
        """States reachable from ``start`` (default: the initial state), itself included."""
        seen = {start if start is not None else self.initial}
        frontier = list(seen)
        while frontier:
            here = frontier.pop()
            for (s, _), nxt in self.table.items():
                if s == here and nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        return frozenset(seen)


# ---------------------------------------------------------------- agent model lifecycle


class AgentPhase(StrEnum):
    """Where the agent is in bringing its desired model into service (``ReportedState.phase``)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    ACTIVATING = "activating"
    HEALTH_CHECK = "health_check"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class AgentEvent(StrEnum):
    """What moves the agent's lifecycle forward."""

    DESIRED_MODEL = "desired_model"  # a new desired state names a model to run
    DESIRED_NONE = "desired_none"  # a new desired state names no model: stop serving
    DOWNLOADED = "downloaded"  # every chunk received and verified
    VERIFIED = "verified"  # whole-file sha256 and size match the signed manifest
    STAGED = "staged"  # written to the inactive slot and fsynced
    ACTIVATED = "activated"  # slot pointer swapped (rename) and the model loaded
    HEALTHY = "healthy"  # health check passed: commit
    UNHEALTHY = "unhealthy"  # health check failed: swap back
    ERROR = "error"  # any step failed (digest, signature, load, storage, timeout, ...)
    RESUME_PREVIOUS = "resume_previous"  # after a failure: the previous model is serving
    RESUME_NONE = "resume_none"  # after a failure: there is no previous model


_A = AgentPhase
_AE = AgentEvent

_AGENT_TABLE: dict[tuple[AgentPhase, AgentEvent], AgentPhase] = {
    (_A.IDLE, _AE.DESIRED_MODEL): _A.DOWNLOADING,
    (_A.IDLE, _AE.DESIRED_NONE): _A.IDLE,
    (_A.ACTIVE, _AE.DESIRED_MODEL): _A.DOWNLOADING,
    (_A.ACTIVE, _AE.DESIRED_NONE): _A.IDLE,
    (_A.DOWNLOADING, _AE.DOWNLOADED): _A.VERIFYING,
    (_A.VERIFYING, _AE.VERIFIED): _A.STAGING,
    (_A.STAGING, _AE.STAGED): _A.ACTIVATING,
    (_A.ACTIVATING, _AE.ACTIVATED): _A.HEALTH_CHECK,
    (_A.HEALTH_CHECK, _AE.HEALTHY): _A.ACTIVE,
    # Before the swap nothing changed on the device: the step simply failed.
    (_A.DOWNLOADING, _AE.ERROR): _A.FAILED,
    (_A.VERIFYING, _AE.ERROR): _A.FAILED,
    (_A.STAGING, _AE.ERROR): _A.FAILED,
    # From the swap on, a failure swaps the slot pointer back.
    (_A.ACTIVATING, _AE.ERROR): _A.ROLLED_BACK,
    (_A.HEALTH_CHECK, _AE.UNHEALTHY): _A.ROLLED_BACK,
    (_A.HEALTH_CHECK, _AE.ERROR): _A.ROLLED_BACK,
    # A newer desired state supersedes work that has not reached the swap yet.
    (_A.DOWNLOADING, _AE.DESIRED_MODEL): _A.DOWNLOADING,
    (_A.VERIFYING, _AE.DESIRED_MODEL): _A.DOWNLOADING,
    (_A.STAGING, _AE.DESIRED_MODEL): _A.DOWNLOADING,
    (_A.DOWNLOADING, _AE.DESIRED_NONE): _A.IDLE,
    (_A.VERIFYING, _AE.DESIRED_NONE): _A.IDLE,
    (_A.STAGING, _AE.DESIRED_NONE): _A.IDLE,
    # After a failure the previous model (if any) keeps serving.
    (_A.FAILED, _AE.RESUME_PREVIOUS): _A.ACTIVE,
    (_A.FAILED, _AE.RESUME_NONE): _A.IDLE,
    (_A.FAILED, _AE.DESIRED_MODEL): _A.DOWNLOADING,
    (_A.FAILED, _AE.DESIRED_NONE): _A.IDLE,
    (_A.ROLLED_BACK, _AE.RESUME_PREVIOUS): _A.ACTIVE,
    (_A.ROLLED_BACK, _AE.RESUME_NONE): _A.IDLE,
    (_A.ROLLED_BACK, _AE.DESIRED_MODEL): _A.DOWNLOADING,
    (_A.ROLLED_BACK, _AE.DESIRED_NONE): _A.IDLE,
}

AGENT_MACHINE: StateMachine[AgentPhase, AgentEvent] = StateMachine(
    "agent", AgentPhase.IDLE, _AGENT_TABLE
)
"""The agent's model lifecycle.  After a restart it starts in ``active`` if a committed
model is on disk, else in ``idle`` (a crash mid-way leaves the committed slot serving)."""


def agent_transition(phase: AgentPhase, event: AgentEvent) -> AgentPhase:
    """Next agent phase; ``IllegalTransitionError`` if ``event`` is not allowed in ``phase``."""
    return AGENT_MACHINE.transition(phase, event)


# ---------------------------------------------------------------- rollout


class RolloutPhase(StrEnum):
    """State of a rollout as the orchestrator persists it."""

    PENDING = "pending"
    RUNNING = "running"  # desired state sent to the current wave; waiting for reports
    SOAKING = "soaking"  # the wave converged; watching its health for the soak time
    PAUSED = "paused"
    ABORTING = "aborting"  # rolling the waves sent so far back to their previous model
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"  # stopped without rolling back
    FAILED = "failed"


class RolloutEvent(StrEnum):
    """What moves a rollout forward (operators, abort rules, device reports, timers)."""

    START = "start"
    WAVE_DONE = "wave_done"  # every device of the wave succeeded, failed or timed out
    NEXT_WAVE = "next_wave"  # soak passed and a wave remains
    FINISH = "finish"  # soak passed on the last wave
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"  # operator abort or an abort rule fired: roll back
    CANCEL = "cancel"  # operator stop without rolling back
    ROLLBACK_DONE = "rollback_done"
    ROLLBACK_FAILED = "rollback_failed"
    ERROR = "error"  # the rollout cannot continue (artifact gone, ...)


_R = RolloutPhase
_RE = RolloutEvent

_ROLLOUT_TABLE: dict[tuple[RolloutPhase, RolloutEvent], RolloutPhase] = {
    (_R.PENDING, _RE.START): _R.RUNNING,
    (_R.PENDING, _RE.PAUSE): _R.PAUSED,
    (_R.PENDING, _RE.ABORT): _R.ABORTED,  # nothing was sent: nothing to roll back
    (_R.PENDING, _RE.CANCEL): _R.ABORTED,
    (_R.RUNNING, _RE.WAVE_DONE): _R.SOAKING,
    (_R.RUNNING, _RE.PAUSE): _R.PAUSED,
    (_R.RUNNING, _RE.ABORT): _R.ABORTING,
    (_R.RUNNING, _RE.CANCEL): _R.ABORTED,
    (_R.RUNNING, _RE.ERROR): _R.FAILED,
    (_R.SOAKING, _RE.NEXT_WAVE): _R.RUNNING,
    (_R.SOAKING, _RE.FINISH): _R.COMPLETED,
    (_R.SOAKING, _RE.PAUSE): _R.PAUSED,
    (_R.SOAKING, _RE.ABORT): _R.ABORTING,
    (_R.SOAKING, _RE.CANCEL): _R.ABORTED,
    (_R.SOAKING, _RE.ERROR): _R.FAILED,
    (_R.PAUSED, _RE.RESUME): _R.RUNNING,
    (_R.PAUSED, _RE.ABORT): _R.ABORTING,
    (_R.PAUSED, _RE.CANCEL): _R.ABORTED,
    # An operator may roll a finished rollout back.
    (_R.COMPLETED, _RE.ABORT): _R.ABORTING,
    (_R.ABORTING, _RE.ROLLBACK_DONE): _R.ROLLED_BACK,
    (_R.ABORTING, _RE.ROLLBACK_FAILED): _R.FAILED,
}

ROLLOUT_MACHINE: StateMachine[RolloutPhase, RolloutEvent] = StateMachine(
    "rollout", RolloutPhase.PENDING, _ROLLOUT_TABLE
)
"""A rollout.  The wave number is data beside the phase: ``next_wave`` increments it;
``resume`` re-enters ``running`` for the current wave (which may be done at once)."""


def rollout_transition(phase: RolloutPhase, event: RolloutEvent) -> RolloutPhase:
    """Next rollout phase; ``IllegalTransitionError`` if not allowed."""
    return ROLLOUT_MACHINE.transition(phase, event)


class DeviceRolloutStatus(StrEnum):
    """One device's status within a rollout."""

    PENDING = "pending"
    DESIRED_SENT = "desired_sent"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ROLLED_BACK = "rolled_back"


class DeviceRolloutEvent(StrEnum):
    """What changes one device's rollout status."""

    SEND = "send"  # its desired state (new generation) was published
    SUCCEED = "succeed"  # reported: that generation processed, the model active
    FAIL = "fail"  # reported: that generation processed with an error
    TIMEOUT = "timeout"  # no conclusive report within the wave's timeout
    ROLLBACK = "rollback"  # the previous desired state was sent back


_D = DeviceRolloutStatus
_DE = DeviceRolloutEvent

_DEVICE_ROLLOUT_TABLE: dict[tuple[DeviceRolloutStatus, DeviceRolloutEvent], DeviceRolloutStatus] = {
    (_D.PENDING, _DE.SEND): _D.DESIRED_SENT,
    (_D.DESIRED_SENT, _DE.SUCCEED): _D.SUCCEEDED,
    (_D.DESIRED_SENT, _DE.FAIL): _D.FAILED,
    (_D.DESIRED_SENT, _DE.TIMEOUT): _D.TIMED_OUT,
    (_D.DESIRED_SENT, _DE.ROLLBACK): _D.ROLLED_BACK,
    # Desired state is retained: a device that was late still converges.
    (_D.TIMED_OUT, _DE.SUCCEED): _D.SUCCEEDED,
    (_D.TIMED_OUT, _DE.FAIL): _D.FAILED,
    (_D.TIMED_OUT, _DE.ROLLBACK): _D.ROLLED_BACK,
    (_D.SUCCEEDED, _DE.ROLLBACK): _D.ROLLED_BACK,
    (_D.FAILED, _DE.ROLLBACK): _D.ROLLED_BACK,
}

DEVICE_ROLLOUT_MACHINE: StateMachine[DeviceRolloutStatus, DeviceRolloutEvent] = StateMachine(
    "device rollout", DeviceRolloutStatus.PENDING, _DEVICE_ROLLOUT_TABLE
)
"""One device within a rollout."""


def device_rollout_transition(
    status: DeviceRolloutStatus, event: DeviceRolloutEvent
) -> DeviceRolloutStatus:
    """Next per-device rollout status; ``IllegalTransitionError`` if not allowed."""
    return DEVICE_ROLLOUT_MACHINE.transition(status, event)


# ---------------------------------------------------------------- ordering rules

DesiredClass = Literal["new", "duplicate", "stale"]
VersionCheck = Literal["ok", "downgrade"]
SessionClass = Literal["new", "current", "stale"]


def classify_desired(current_generation: int | None, incoming: int) -> DesiredClass:
    """What an agent does with a desired state of generation ``incoming``.

    ``new`` (higher than the last processed generation, or none processed yet):
    act on it; ``duplicate`` (equal): already handled, re-report; ``stale``
    (lower): ignore.
    """
    if incoming < 1:
        raise ProtocolError(f"desired-state generation must be >= 1, got {incoming}")
    if current_generation is None or incoming > current_generation:
        return "new"
    if incoming == current_generation:
        return "duplicate"
    return "stale"


def check_version(active_version: int | None, offered_version: int, rollback: bool) -> VersionCheck:
    """``ok`` unless ``offered_version`` is lower than the active one without ``rollback``.

    The same version again is ``ok`` (a re-delivery or a new artifact of that version).
    """
    if active_version is None or offered_version >= active_version or rollback:
        return "ok"
    return "downgrade"


def classify_session(latest_session: int | None, incoming_session: int) -> SessionClass:
    """How the host treats a presence message of ``incoming_session``.

    ``new``: a later session than any seen (a birth, or the will of a session whose
    birth was missed); ``current``: the latest session (its will means offline);
    ``stale``: an older session's birth or last will, to be discarded.
    """
    if incoming_session < 1:
        raise ProtocolError(f"presence session must be >= 1, got {incoming_session}")
    if latest_session is None or incoming_session > latest_session:
        return "new"
    if incoming_session == latest_session:
        return "current"
    return "stale"
