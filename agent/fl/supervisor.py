"""The agent's supervision of its Flower SuperNode, driven by the desired state's ``fl``.

The host enables federated retraining for a device by setting ``fl`` in its desired
state (``enabled``, the SuperLink's ``host:port``, the run, the minimum number of
labelled samples, optionally the SuperLink's TLS root certificate).  The agent hands
that to ``SuperNodeSupervisor.configure`` (cheap, any thread) and calls ``poll`` from
its timer (``Agent.tick``, never the MQTT callback thread); ``poll`` does the work:

* starts a SuperNode (``tinyfleet.agent.fl.supernode.SuperNodeProcess``) whose
  node-config ``data-path`` is the agent's labelled buffer (``<state_dir>/labels.db``),
  reported ``starting`` until the node has registered with the SuperLink, then ``running``;
* restarts it with exponential backoff (full jitter, 1 s doubling to 60 s; the count
  resets once it ran for a minute) if it dies while enabled;
* restarts it when the SuperLink address, run or certificate change;
* stops it when ``fl`` is disabled or absent, and on ``close``;
* with ``node_auth``, authenticates the SuperNode with the device's own key pair
  (``<state_dir>/fl/auth/supernode``, made on first use) and reports the public key
  (``FLStatus.public_key``), also while not yet enabled, so the host can register it;
* refuses, with a reason, when the device is MCU-class (it cannot train), when flwr
  is not installed (the agent's ``fl`` extra), or when the buffer holds fewer
  labelled samples than the run needs.

What it knows is reported as ``ReportedState.fl`` (``FLStatus``: state, reason, run,
samples, restarts); what happens is returned by ``poll`` as device events
(``fl_started``, ``fl_stopped``, ``fl_exited``, ``fl_refused``).  A refusal is not a
``ReportedError``: that field concerns model generations, and a rollout reads it.

Nothing here imports flwr: the SuperNode is another process.  Nothing here raises
out of ``poll``: a failure to start counts as an exit and is retried.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinyfleet.agent.profiles import DeviceProfile
from tinyfleet.agent.protocol.messages import EventKind, FLSettings, FLState, FLStatus

__all__ = [
    "DEFAULT_MIN_SAMPLES",
    "LABELS_FILE",
    "SuperNodeSupervisor",
    "count_labelled",
    "flwr_installed",
]

LABELS_FILE = "labels.db"
"""The agent's labelled buffer, relative to its state folder."""

DEFAULT_MIN_SAMPLES = 32
"""Labelled samples needed when the desired state does not say."""

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
STABLE_S = 60.0
"""A SuperNode that ran this long resets the backoff."""
COUNT_EVERY_S = 30.0
"""How often the labelled buffer is counted while ``fl`` is enabled (and at once when it
changes)."""
IDLE_COUNT_EVERY_S = 600.0
"""How often it is counted otherwise: a changed count is a new report, and a fleet of idle
devices collecting labels should not republish its reported state every 30 s."""
STOP_TIMEOUT_S = 5.0

Event = tuple[EventKind, str]


def flwr_installed() -> bool:
    """Whether flwr (the agent's ``fl`` extra) is importable, without importing it."""
    return importlib.util.find_spec("flwr") is not None


def count_labelled(path: Path) -> int | None:
    """Labelled samples in the agent's buffer at ``path``: 0 if it does not exist, None if unreadable."""
    if not path.exists():
        return 0
    try:
        from tinyfleet.agent.labels import LabelBuffer  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    try:
        opener = getattr(LabelBuffer, "open_readonly", None)
        buf: Any = opener(path) if callable(opener) else LabelBuffer(path)
        try:
            for name in ("count", "__len__"):
                fn = getattr(buf, name, None)
                if callable(fn):
                    return int(fn())
            _, y = buf.load()
            return len(y)
        finally:
            close = getattr(buf, "close", None)
            if callable(close):
                close()
    except Exception:  # a damaged buffer: unknown, reported as such
        logging.getLogger("tinyfleet.agent.fl").exception("cannot count %s", path)
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _default_process(**kw: Any) -> Any:
    from tinyfleet.agent.fl.supernode import SuperNodeProcess

    return SuperNodeProcess(**kw)


def _alive(proc: Any) -> bool:
    value = proc.alive
    return bool(value() if callable(value) else value)


def _exit_code(proc: Any) -> int | None:
    for name in ("returncode", "exit_code"):
        value = getattr(proc, name, None)
        if callable(value):
            value = value()
        if isinstance(value, int):
            return value
    popen = getattr(proc, "process", None) or getattr(proc, "proc", None)
    code = getattr(popen, "returncode", None)
    return code if isinstance(code, int) else None


class SuperNodeSupervisor:
    """Starts, restarts and stops one SuperNode for one agent (see the module doc)."""

    def __init__(
        self,
        *,
        state_dir: Path,
        profile: DeviceProfile,
        data_path: Path | None = None,
        default_min_samples: int = DEFAULT_MIN_SAMPLES,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
        stable_s: float = STABLE_S,
        count_every_s: float = COUNT_EVERY_S,
        idle_count_every_s: float = IDLE_COUNT_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
        process_factory: Callable[..., Any] | None = None,
        sample_counter: Callable[[Path], int | None] = count_labelled,
        flwr_available: Callable[[], bool] = flwr_installed,
        env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.profile = profile
        self.data_path = Path(data_path) if data_path is not None else self.state_dir / LABELS_FILE
        self.workdir = self.state_dir / "fl"
        self.default_min_samples = default_min_samples
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.stable_s = stable_s
        self.count_every_s = count_every_s
        self.idle_count_every_s = idle_count_every_s
        self.clock = clock
        self.log = logger or logging.getLogger("tinyfleet.agent.fl")
        self._factory = process_factory or _default_process
        self._count = sample_counter
        self._flwr_available = flwr_available
        self.env = env
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._want: FLSettings | None = None
        self._want_changed = True
        self._ever_enabled = False
        self._proc: Any = None
        self._proc_key: tuple[Any, ...] | None = None
        self._proc_connected = False
        self._started_at = 0.0
        self._failures = 0
        self._next_start = 0.0
        self._samples: int | None = None
        self._counted_at: float | None = None
        self.restarts = 0
        self._public_key: str | None = None
        self._status: FLStatus | None = None
        self.closed = False
        self._pid_file = self.workdir / "supernode.pid"
        self._reap_orphan()

    # ------------------------------------------------------------------ inputs

    def configure(self, settings: FLSettings | None) -> None:
        """What the desired state asks for; acted on at the next ``poll``."""
        with self._lock:
            if settings != self._want:
                self._want = settings
                self._want_changed = True
                if settings is not None and settings.enabled:
                    self._ever_enabled = True

    def status(self) -> FLStatus | None:
        """What ``ReportedState.fl`` says (None: nothing to report)."""
        with self._lock:
            return self._status

    @property
    def running(self) -> bool:
        proc = self._proc
        return proc is not None and _alive(proc)

    @property
    def process(self) -> Any:
        """The current SuperNode process object (None when none runs)."""
        return self._proc

    # ------------------------------------------------------------------ the work

    def poll(self) -> list[Event]:
        """Bring the SuperNode to what is wanted; the events of what changed (never raises)."""
        if not self._poll_lock.acquire(blocking=False):
            return []
        try:
            return self._poll()
        except Exception as exc:  # never let supervision take the agent down
            self.log.exception("SuperNode supervision failed")
            self._set(FLState.BACKOFF, f"supervision error: {type(exc).__name__}: {exc}")
            return []
        finally:
            self._poll_lock.release()

    def _poll(self) -> list[Event]:
        events: list[Event] = []
        with self._lock:
            want = self._want
            changed, self._want_changed = self._want_changed, False
        now = self.clock()
        if self.closed:
            return events
        idle = want is None or not want.enabled
        samples = self._samples_now(now, force=changed, idle=idle)
        self._public_key = None
        if want is not None and want.node_auth and self.profile.kind != "mcu":
            self._public_key = self._node_key()[1].read_text().strip()
        if want is None or not want.enabled:
            if self._proc is not None:
                self._stop()
                events.append(
                    (EventKind.FL_STOPPED, "SuperNode stopped: federated retraining disabled")
                )
            self._failures = 0
            if self._public_key is not None and want is not None:
                # node_auth announced before enabling: the host registers the key first
                self._set(FLState.DISABLED, None, run=want.run, samples=samples)
            elif self._ever_enabled or samples:
                self._set(FLState.DISABLED, None, samples=samples)
            else:
                with self._lock:
                    self._status = None
            return events
        key = (want.superlink, want.run, want.root_certificates, want.node_auth)
        if self._proc is not None and self._proc_key != key:
            self._stop()
            events.append((EventKind.FL_STOPPED, "SuperNode stopped: settings changed"))
            self._next_start = now
        if self._proc is None:
            reason = self._refusal(want, samples)
            if reason is not None:
                if not self._status_is(FLState.REFUSED, reason, want.run):
                    events.append((EventKind.FL_REFUSED, reason))
                    self.log.warning("federated retraining refused: %s", reason)
                self._set(FLState.REFUSED, reason, run=want.run, samples=samples)
                return events
            if now < self._next_start:
                cur = self.status()
                self._set(
                    FLState.BACKOFF,
                    cur.reason if cur is not None else None,
                    run=want.run,
                    samples=samples,
                )
                return events
            try:
                self._start(want, key)
            except Exception as exc:
                reason = f"SuperNode did not start: {type(exc).__name__}: {exc}"
                delay = self._schedule_restart(now)
                self.log.warning("%s; retry in %.1f s", reason, delay)
                events.append((EventKind.FL_EXITED, f"{reason}; retry in {delay:.1f} s"))
                self._set(FLState.BACKOFF, reason[:500], run=want.run, samples=samples)
                return events
            self._started_at = now
            events.append(
                (EventKind.FL_STARTED, f"SuperNode started for {want.superlink} (run {want.run})")
            )
            state = FLState.RUNNING if self._connected() else FLState.STARTING
            self._set(state, None, run=want.run, samples=samples)
            return events
        if not _alive(self._proc):
            code = _exit_code(self._proc)
            self._stop()
            delay = self._schedule_restart(now)
            reason = f"SuperNode exited (code {code}); restart in {delay:.1f} s"
            self.log.warning("%s", reason)
            events.append((EventKind.FL_EXITED, reason))
            self._set(FLState.BACKOFF, reason, run=want.run, samples=samples)
            return events
        if self._failures and now - self._started_at >= self.stable_s:
            self._failures = 0
        state = FLState.RUNNING if self._connected() else FLState.STARTING
        self._set(state, None, run=want.run, samples=samples)
        return events

    def _connected(self) -> bool:
        """Whether the SuperNode has registered with the SuperLink (``starting`` until then)."""
        if self._proc_connected:
            return True
        node_id = getattr(self._proc, "node_id", None)
        if not callable(node_id):
            self._proc_connected = True  # a process that cannot tell: running once started
        else:
            try:
                self._proc_connected = node_id() is not None
            except Exception:
                self._proc_connected = False
        return self._proc_connected

    def _samples_now(self, now: float, *, force: bool, idle: bool) -> int | None:
        every = self.idle_count_every_s if idle else self.count_every_s
        if force or self._counted_at is None or now - self._counted_at >= every:
            self._samples = self._count(self.data_path)
            self._counted_at = now
        return self._samples

    def _refusal(self, want: FLSettings, samples: int | None) -> str | None:
        if self.profile.kind == "mcu":
            return (
                f"MCU-class device (profile {self.profile.name}) cannot train; "
                "excluded from federated retraining"
            )
        if not self._flwr_available():
            return "flwr is not installed (install the agent's fl extra)"
        need = want.min_samples or self.default_min_samples
        if samples is None:
            return f"the labelled buffer {self.data_path.name} cannot be read"
        if samples < need:
            return f"{samples} labelled samples; the run needs at least {need}"
        return None

    def _start(self, want: FLSettings, key: tuple[Any, ...]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        root: Path | None = None
        if want.root_certificates is not None:
            root = self.workdir / "superlink-ca.pem"
            root.write_text(want.root_certificates)
        kw: dict[str, Any] = {
            "superlink": want.superlink,
            "data_path": self.data_path,
            "port": _free_port(),
            "home": self.workdir,
        }
        if root is not None:
            kw["root_certificates"] = root
        if want.node_auth:
            kw["auth_private_key"] = self._node_key()[0]
        if self.env is not None:
            kw["env"] = self.env
        proc = self._factory(**kw)
        proc.start()
        self._proc = proc
        self._proc_connected = False
        pid = getattr(proc, "pid", None)
        if isinstance(pid, int):
            self._pid_file.write_text(f"{pid}\n")
        self._proc_key = key

    def _node_key(self) -> tuple[Path, Path]:
        """The device's SuperNode key pair (private, public), made on first use."""
        private = self.workdir / "auth" / "supernode"
        public = private.with_name("supernode.pub")
        if not (private.is_file() and public.is_file()):
            from tinyfleet.agent.fl.supernode import generate_node_keys

            generate_node_keys(private.parent, private.name)
            self.log.info("SuperNode key pair created in %s", private.parent)
        return private, public

    def _stop(self) -> None:
        proc, self._proc, self._proc_key = self._proc, None, None
        if proc is None:
            return
        try:
            proc.stop(STOP_TIMEOUT_S)
        except TypeError:
            proc.stop()
        except Exception:
            self.log.exception("stopping the SuperNode failed")
        self._pid_file.unlink(missing_ok=True)

    def _reap_orphan(self) -> None:
        """Stop a SuperNode left running by an agent process that died (its pid file).

        The node runs in its own session, so it outlives a killed agent; a restarted
        agent would otherwise run a second node for the same device.
        """
        try:
            pid = int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            cmdline = b""
        if b"flower-supernode" in cmdline:
            from tinyfleet.agent.fl.process import descendants

            for p in [pid, *descendants(pid)]:
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)
            self.log.warning("stopped SuperNode %d left running by an earlier agent process", pid)
        self._pid_file.unlink(missing_ok=True)

    def _schedule_restart(self, now: float) -> float:
        self.restarts += 1
        self._failures += 1
        cap = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (self._failures - 1))
        delay = random.uniform(self.backoff_base_s / 2, cap) if cap > 0 else 0.0
        self._next_start = now + delay
        return delay

    def _status_is(self, state: FLState, reason: str | None, run: str | None) -> bool:
        cur = self.status()
        return cur is not None and (cur.state, cur.reason, cur.run) == (state, reason, run)

    def _set(
        self,
        state: FLState,
        reason: str | None,
        *,
        run: str | None = None,
        samples: int | None = None,
    ) -> None:
        status = FLStatus(
            state=state,
            reason=None if reason is None else reason[:500],
            run=run,
            samples=samples,
            restarts=self.restarts,
            public_key=self._public_key,
        )
        with self._lock:
            self._status = status

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the SuperNode (agent shutdown); later polls do nothing."""
        with self._poll_lock:
            self.closed = True
            self._stop()
