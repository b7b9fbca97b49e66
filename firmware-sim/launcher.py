"""The fleet launcher: N simulated devices in k worker processes, a supervisor, chaos.

``up`` (``tinyfleet sim up``) writes ``<home>/sim/config.json`` and starts a
supervisor (daemonised, or in the foreground).  The supervisor splits the devices
over ``workers`` processes (default: the machine's cores); each worker runs an
``InProcessFleet`` (the real agent code: its own MQTT connection, state folder
under ``<home>/sim/devices/<id>``, identity and pinned host key per device) and a
``ScenarioFeed`` for its share, and answers JSON lines on a Unix socket of its
own (the control channel).  When every worker answers, the supervisor writes
``<home>/sim/state.json`` (pids, devices per worker, sockets, broker, scenario);
it restarts a worker that dies and, on SIGTERM, stops every worker (a clean stop,
then SIGTERM, then SIGKILL) and removes the state file.  Workers also die with
the supervisor (``PR_SET_PDEATHSIG``), so no process is left behind.

``status`` asks every worker for per-device connected/serving/model/inferences;
``down`` stops the supervisor and checks that no process is left; ``chaos`` sends
a chaos command (kill, restart, disconnect, slow-link, full-disk, clock-skew) to
the workers holding the selected devices.  Control requests::

    {"cmd": "ping"} | {"cmd": "status"} | {"cmd": "stats"} | {"cmd": "stop"}
    {"cmd": "kill", "devices": [...], "restart_after": 5.0}
    {"cmd": "restart" | "disconnect" | "slow_link" | "full_disk" | "clock_skew",
     "devices": [...], "seconds": ..., "delay_s": ...}

Each answer is one JSON line: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.

Capacity: ``check_capacity`` refuses a fleet that this machine cannot hold (file
descriptors per worker against ``RLIMIT_NOFILE``'s hard limit, resident memory
against ``MemAvailable``), naming the figures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tinyfleet.agent.errors import ConfigError
from tinyfleet.sim.errors import FleetSizeError, SimControlError, SimStateError
from tinyfleet.sim.scenario import Scenario, default_scenario, load_scenario

__all__ = [
    "CHAOS_ACTIONS",
    "LogCounts",
    "SimPaths",
    "WorkerProcess",
    "ask",
    "chaos",
    "check_capacity",
    "down",
    "select_devices",
    "status",
    "up",
]

FDS_PER_DEVICE = 6
"""Measured 5.1 per device serving a model (socket, spool database, model files); margin."""
FDS_PER_WORKER = 64
"""Python, libraries, the selector, the control socket."""
RSS_PER_DEVICE = 1.0 * 1024 * 1024
"""bench/rollout.py measures 0.65 MB per device (model loaded); margin."""
RSS_PER_WORKER = 80 * 1024 * 1024
"""A worker's base: Python, numpy, paho, pydantic, cryptography, LiteRT (~60 MB measured)."""
READY_TIMEOUT_S = 120.0
CHAOS_ACTIONS = ("kill", "restart", "disconnect", "slow_link", "full_disk", "clock_skew")
_SOCKET_MAX = 100  # sun_path is 108 bytes on Linux

log = logging.getLogger("tinyfleet.sim.launcher")


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class SimPaths:
    """Where a simulator keeps its files under a tinyfleet home."""

    home: Path

    @property
    def root(self) -> Path:
        return self.home / "sim"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def devices(self) -> Path:
        return self.root / "devices"

    @property
    def supervisor_log(self) -> Path:
        return self.root / "supervisor.log"

    def worker_spec(self, k: int) -> Path:
        return self.root / f"worker-{k}.json"

    def worker_log(self, k: int) -> Path:
        return self.root / f"worker-{k}.log"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SimStateError(f"{path}: unreadable ({exc}); remove it if no simulator runs") from None


def _alive(pid: int | None, marker: str = "tinyfleet") -> bool:
    """Whether ``pid`` runs and is one of ours (its command line names tinyfleet: the
    launcher's processes, or ``tinyfleet sim up --foreground``), not a recycled pid."""
    if not pid:
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[0] == "Z":  # a zombie has exited
        return False
    # An exiting process has released its memory and shows an empty command line before
    # it is gone: still running (``down`` waits for it), not a recycled pid.
    return not cmd or marker.encode() in cmd


# --------------------------------------------------------------------------- capacity


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_capacity(devices: int, workers: int) -> dict[str, Any]:
    """Refuse (``FleetSizeError``) a fleet this machine cannot hold; the figures otherwise."""
    if devices < 1:
        raise FleetSizeError(f"a fleet needs at least 1 device, not {devices}")
    if workers < 1:
        raise FleetSizeError(f"at least 1 worker process, not {workers}")
    per_worker = -(-devices // workers)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds = FDS_PER_WORKER + FDS_PER_DEVICE * per_worker
    if hard != resource.RLIM_INFINITY and fds > hard:
        most = (hard - FDS_PER_WORKER) // FDS_PER_DEVICE * workers
        raise FleetSizeError(
            f"{devices} devices in {workers} worker(s) need ~{fds:,} file descriptors per worker "
            f"({per_worker} devices x {FDS_PER_DEVICE} + {FDS_PER_WORKER}); the limit "
            f"(RLIMIT_NOFILE hard) is {hard:,}: at most ~{max(0, most):,} devices, or more workers"
        )
    need = workers * RSS_PER_WORKER + devices * RSS_PER_DEVICE
    avail = _mem_available()
    if avail is not None and need > 0.9 * avail:
        most = int((0.9 * avail - workers * RSS_PER_WORKER) // RSS_PER_DEVICE)
        raise FleetSizeError(
            f"{devices} devices in {workers} worker(s) need ~{need / 2**20:,.0f} MB of memory "
            f"({RSS_PER_DEVICE / 2**20:g} MB per device + {RSS_PER_WORKER / 2**20:.0f} MB per "
            f"worker); {avail / 2**20:,.0f} MB are available: at most ~{max(0, most):,} devices"
        )
    return {
        "fds_per_worker": fds,
        "fd_limit": None if hard == resource.RLIM_INFINITY else hard,
        "memory_bytes": int(need),
        "memory_available": avail,
    }


# --------------------------------------------------------------------------- logs


class LogCounts(logging.Handler):
    """Counts WARNING+ records by (level, logger without the device id, message template)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}
        self._mutex = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        parts = record.name.split(".")
        if record.name.startswith("tinyfleet.sim.fleet.") and len(parts) > 3:
            parts[3] = "<device>"
        key = f"{record.levelname} {'.'.join(parts)}: {record.msg}"
        with self._mutex:
            self.counts[key] = self.counts.get(key, 0) + 1
            if key in self.examples:
                return
        try:
            text = record.getMessage()
        except Exception:  # a bad format string must not break the count
            text = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f" [{type(exc).__name__}: {exc}]"
        with self._mutex:
            self.examples[key] = text[:400]

    def take(self) -> dict[str, Any]:
        with self._mutex:
            out = {
                k: {"count": n, "example": self.examples.get(k, "")} for k, n in self.counts.items()
            }
            self.counts, self.examples = {}, {}
        return out

    def install(self, *, propagate: bool = False) -> LogCounts:
        """Count the project's warnings and errors (and stop them reaching the root logger)."""
        logger = logging.getLogger("tinyfleet")
        logger.addHandler(self)
        logger.propagate = propagate
        if logger.level == logging.NOTSET or logger.level > logging.WARNING:
            logger.setLevel(logging.WARNING)
        return self


# --------------------------------------------------------------------------- control channel


def ask(sock_path: str | Path, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One request to a worker's control socket; its answer (``SimControlError`` if none)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        raise SimControlError(f"worker at {sock_path} does not answer: {exc}") from None
    try:
        answer = json.loads(buf)
    except ValueError:
        raise SimControlError(f"worker at {sock_path} sent no valid answer") from None
    if not isinstance(answer, dict):
        raise SimControlError(f"worker at {sock_path} sent no valid answer")
    if not answer.get("ok"):
        raise SimControlError(f"worker at {sock_path}: {answer.get('error', 'refused')}")
    return answer


class _ControlServer:
    """JSON lines on a Unix socket, one thread; ``handle(request) -> answer``."""

    def __init__(self, path: str, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.path = path
        self._handle = handle
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)
        self._sock.listen(16)
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="sim-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                try:
                    buf = b""
                    while not buf.endswith(b"\n"):
                        chunk = conn.recv(1 << 16)
                        if not chunk:
                            break
                        buf += chunk
                    try:
                        req = json.loads(buf)
                        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                            raise ValueError("a request is a JSON object with a 'cmd'")
                        answer = self._handle(req)
                    except Exception as exc:  # one bad request never stops the server
                        answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                    conn.sendall(json.dumps(answer, default=str).encode() + b"\n")
                except OSError:
                    continue

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        self._thread.join(2)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# --------------------------------------------------------------------------- worker


def _proc_mem() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Worker:
    """What runs inside one worker process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from tinyfleet.sim.fleet import DeviceSpec, InProcessFleet, provision
        from tinyfleet.sim.scenario import ScenarioFeed

        self.spec = spec
        self.logs = LogCounts().install()
        with contextlib.suppress(ImportError):  # the runtime every Pi-class device loads
            import ai_edge_litert.interpreter  # type: ignore[import-untyped]  # noqa: F401
        self.base_mem = _proc_mem()
        root = Path(spec["root"])
        specs = [DeviceSpec(**d) for d in spec["devices"]]
        pw_dir = Path(spec["password_dir"]) if spec.get("password_dir") else None
        configs = [
            provision(
                root,
                s,
                fleet=spec["fleet"],
                broker_url=spec["broker_url"],
                host_public_key=Path(spec["host_public_key"]),
                heartbeat_s=spec.get("heartbeat_s", 5.0),
                window=spec.get("window", 100),
                chunk_timeout_s=spec.get("chunk_timeout_s", 3.0),
                username=s.device if pw_dir is not None else None,
                password_file=pw_dir / s.device if pw_dir is not None else None,
            )
            for s in specs
        ]
        self.fleet = InProcessFleet(
            configs,
            specs=specs,
            tick_s=spec.get("tick_s", 0.5),
            activation_threads=spec.get("activation_threads", 2),
        )
        self.built_mem = _proc_mem()
        self.feed: ScenarioFeed | None = None
        if spec.get("feed", True) and spec.get("scenario"):
            scenario = Scenario.model_validate(spec["scenario"])
            self.feed = ScenarioFeed(self.fleet, scenario, start_epoch=spec.get("start_epoch"))
        self.stop_event = threading.Event()

    def start(self) -> None:
        self.fleet.start()
        if self.feed is not None:
            self.feed.start()

    def stop(self) -> None:
        if self.feed is not None:
            self.feed.stop()
        self.fleet.stop()

    # ------------------------------------------------------------------ commands

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        fleet = self.fleet
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid(), "devices": len(fleet.configs)}
        if cmd == "status":
            return {
                "ok": True,
                "pid": os.getpid(),
                "devices": [fleet.device_status(d) for d in fleet.configs],
                "feed": None if self.feed is None else self.feed.snapshot(),
                "mem": _proc_mem(),
            }
        if cmd == "stats":
            return {"ok": True, **self.stats()}
        if cmd == "stop":
            self.stop_event.set()
            return {"ok": True}
        if cmd not in CHAOS_ACTIONS:
            raise ValueError(f"unknown command {cmd!r}")
        devices = req.get("devices")
        if not isinstance(devices, list) or not devices:
            raise ValueError(f"{cmd}: 'devices' must be a non-empty list")
        unknown = [d for d in devices if d not in fleet.configs]
        if unknown:
            raise ValueError(f"{cmd}: not in this worker: {', '.join(map(str, unknown[:5]))}")
        done: list[str] = []
        skipped: dict[str, str] = {}
        for d in devices:
            try:
                self._chaos_one(cmd, d, req)
                done.append(d)
            except KeyError as exc:  # e.g. already killed
                skipped[d] = str(exc.args[0] if exc.args else exc)
        return {"ok": True, "done": done, "skipped": skipped}

    def _chaos_one(self, cmd: str, d: str, req: dict[str, Any]) -> None:
        fleet = self.fleet
        seconds = req.get("seconds")
        if cmd == "kill":
            fleet.kill(d)
            after = req.get("restart_after")
            if after is not None:
                fleet.delays.call_later(float(after), lambda: self._restart_quiet(d))
        elif cmd == "restart":
            fleet.restart(d)
        elif cmd == "disconnect":
            fleet.disconnect(d, float(seconds or 10.0))
        elif cmd == "slow_link":
            fleet.slow_link(
                d, float(req.get("delay_s", 0.5)), None if seconds is None else float(seconds)
            )
        elif cmd == "full_disk":
            fleet.full_disk(d, True, None if seconds is None else float(seconds))
        elif cmd == "clock_skew":
            fleet.skew_clock(d, float(seconds or 0.0))

    def _restart_quiet(self, device: str) -> None:
        with contextlib.suppress(KeyError):
            self.fleet.restart(device)

    def stats(self) -> dict[str, Any]:
        """Link totals, what every device serves, memory (the rollout benchmark reads this)."""
        keys = ("bytes_in", "messages_in", "bytes_out", "messages_out", "publish_failures")
        totals = dict.fromkeys(keys, 0)
        serving: list[tuple[int | None, str | None]] = []
        reconnects = errors = 0
        for agent in list(self.fleet.agents.values()):
            st = agent.link.stats
            for k in keys:
                totals[k] += getattr(st, k)
            reconnects += st.reconnects
            s = agent.serving
            if s is None:
                serving.append((None, None))
            else:
                serving.append((s.activated.content.manifest.version, s.since.isoformat()))
            errors += agent.error is not None
        return {
            **totals,
            "reconnects": reconnects,
            "errors": errors,
            "serving": serving,
            "mem": _proc_mem(),
            "base_mem": self.base_mem,
            "built_mem": self.built_mem,
            "devices": len(self.fleet.agents),
            "connected": self.fleet.connected(),
            "logs": self.logs.take(),
            "feed": None if self.feed is None else self.feed.snapshot(),
        }


def worker_main(spec_path: str) -> int:  # pragma: no cover - runs in a worker process
    """``python -m tinyfleet.sim.launcher worker SPEC``: one worker until stopped."""
    spec = json.loads(Path(spec_path).read_text())
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    worker = _Worker(spec)
    stop = worker.stop_event
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    server = _ControlServer(spec["socket"], worker.handle)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.close()
        worker.stop()
    return 0


class WorkerProcess:
    """One worker process and its control socket (the supervisor and the benchmark use it)."""

    def __init__(self, spec: dict[str, Any], spec_path: Path, log_path: Path) -> None:
        self.spec = spec
        self.spec_path = spec_path
        self.log_path = log_path
        self.socket: str = spec["socket"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        _write_json(self.spec_path, self.spec)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tinyfleet.sim.launcher", "worker", str(self.spec_path)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                preexec_fn=_die_with_parent,
                close_fds=True,
            )
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise SimControlError(
                    f"worker {self.spec['index']} exited while starting: {self.last_log_line()}"
                )
            if os.path.exists(self.socket):
                with contextlib.suppress(SimControlError):
                    ask(self.socket, {"cmd": "ping"}, timeout=5)
                    return
            if time.monotonic() > deadline:
                raise SimControlError(
                    f"worker {self.spec['index']} not ready within {timeout:g} s: "
                    f"{self.last_log_line()}"
                )
            time.sleep(0.1)

    def ask(self, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        return ask(self.socket, request, timeout)

    def last_log_line(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln]
        except OSError:
            return "no log"
        return lines[-1][:300] if lines else "no output"

    def stop(self, timeout: float = 20.0) -> None:
        """Clean stop (the agents say goodbye), then SIGTERM, then SIGKILL."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(SimControlError):
            ask(self.socket, {"cmd": "stop"}, timeout=5)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _socket_dir(root: Path) -> Path:
    if len(str(root / "worker-999.sock")) <= _SOCKET_MAX:
        return root
    return Path(tempfile.mkdtemp(prefix="tfsim-"))


def worker_specs(config: dict[str, Any], paths: SimPaths) -> list[dict[str, Any]]:
    """Split the devices of ``config`` over its workers (round-robin by device)."""
    scenario = Scenario.model_validate(config["scenario"])
    specs = scenario.device_specs()
    overrides = config.get("device_overrides") or {}
    k = config["workers"]
    sock_dir = Path(config.get("socket_dir") or paths.root)
    out = []
    for w in range(k):
        mine = []
        for s in specs[w::k]:
            d = asdict(s)
            d.update(overrides.get(s.device, {}))
            mine.append(d)
        out.append(
            {
                "index": w,
                "devices": mine,
                "root": str(paths.devices),
                "fleet": config["fleet"],
                "broker_url": config["broker_url"],
                "host_public_key": config["host_public_key"],
                "password_dir": config.get("password_dir"),
                "heartbeat_s": config.get("heartbeat_s", 5.0),
                "window": config.get("window", 100),
                "chunk_timeout_s": config.get("chunk_timeout_s", 3.0),
                "tick_s": config.get("tick_s", 0.5),
                "feed": config.get("feed", True),
                "scenario": config["scenario"],
                "start_epoch": config["start_epoch"],
                "socket": str(sock_dir / f"worker-{w}.sock"),
            }
        )
    return out


# --------------------------------------------------------------------------- supervisor


def supervise(home: Path, *, ready: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Run the supervisor of ``<home>/sim`` until SIGTERM/SIGINT (or until it cannot start)."""
    paths = SimPaths(home)
    config = _read_json(paths.config)
    if config is None:
        raise SimStateError(f"{paths.config}: no simulator configuration")
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    paths.devices.mkdir(parents=True, exist_ok=True)
    workers = [
        WorkerProcess(spec, paths.worker_spec(spec["index"]), paths.worker_log(spec["index"]))
        for spec in worker_specs(config, paths)
    ]
    restarts = [0] * len(workers)

    def state(status: str, reason: str | None = None) -> dict[str, Any]:
        return {
            "status": status,
            "reason": reason,
            "supervisor_pid": os.getpid(),
            "started": config["start_epoch"],
            "fleet": config["fleet"],
            "broker_url": config["broker_url"],
            "scenario_file": config.get("scenario_file"),
            "devices": sum(len(w.spec["devices"]) for w in workers),
            "workers": [
                {
                    "index": w.spec["index"],
                    "pid": w.pid,
                    "socket": w.socket,
                    "log": str(w.log_path),
                    "restarts": restarts[i],
                    "devices": [d["device"] for d in w.spec["devices"]],
                }
                for i, w in enumerate(workers)
            ],
        }

    try:
        for w in workers:
            w.start()
        timeout = READY_TIMEOUT_S + len(workers[0].spec["devices"]) / 50.0
        for w in workers:
            w.wait_ready(timeout)
    except Exception as exc:
        _write_json(paths.state, state("failed", str(exc)))
        for w in workers:
            w.kill()
        log.error("simulator did not start: %s", exc)
        return 1
    current = state("running")
    _write_json(paths.state, current)
    log.info("simulator running: %d devices in %d workers", current["devices"], len(workers))
    if ready is not None:
        ready(current)
    try:
        while not stop.wait(1.0):
            for i, w in enumerate(workers):
                if not w.alive() and not stop.is_set():
                    restarts[i] += 1
                    log.error(
                        "worker %d (pid %s) died: %s; restarting it (restart %d)",
                        i,
                        w.pid,
                        w.last_log_line(),
                        restarts[i],
                    )
                    try:
                        w.start().wait_ready(READY_TIMEOUT_S)
                    except SimControlError as exc:
                        log.error("worker %d did not restart: %s", i, exc)
                    _write_json(paths.state, state("running"))
    finally:
        threads = [threading.Thread(target=w.stop) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for w in workers:
            w.kill()
        with contextlib.suppress(FileNotFoundError):
            paths.state.unlink()
        log.info("simulator stopped")
    return 0


# --------------------------------------------------------------------------- commands


def running_state(home: Path) -> dict[str, Any]:
    """The state of the simulator running in ``home`` (``SimStateError`` if none runs)."""
    paths = SimPaths(home)
    st = _read_json(paths.state)
    if st is None or st.get("status") != "running" or not _alive(st.get("supervisor_pid")):
        raise SimStateError(f"no simulator runs in {home} (start one with: tinyfleet sim up)")
    return dict(st)


def up(
    home: Path,
    *,
    devices: int | None = None,
    scenario: Scenario | str | Path | None = None,
    profiles: dict[str, float] | None = None,
    workers: int | None = None,
    broker_url: str,
    fleet: str,
    host_public_key: Path,
    foreground: bool = False,
    feed: bool = True,
    password_dir: Path | None = None,
    heartbeat_s: float = 5.0,
    window: int = 100,
    chunk_timeout_s: float = 3.0,
    tick_s: float = 0.5,
    device_overrides: dict[str, dict[str, Any]] | None = None,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Start a simulator in ``home``; the running state (daemon) or the exit state (foreground).

    ``scenario`` is a ``Scenario``, a scenario file, or None (``devices`` Pi-class
    devices, no drift).  ``devices`` and ``profiles`` override the scenario's fleet.
    ``device_overrides`` maps a device id to ``DeviceSpec`` fields (e.g. ``ram_bytes``).
    """
    paths = SimPaths(home)
    existing = _read_json(paths.state)
    if existing is not None and _alive(existing.get("supervisor_pid")):
        raise SimStateError(
            f"a simulator already runs in {home} (pid {existing['supervisor_pid']}); "
            "stop it with: tinyfleet sim down"
        )
    scenario_file: str | None = None
    if scenario is None:
        if devices is None:
            raise FleetSizeError("give a number of devices (--devices N) or a scenario")
        if devices < 1:
            raise FleetSizeError(f"a fleet needs at least 1 device, not {devices}")
        sc = default_scenario(devices, profiles)
    else:
        if not isinstance(scenario, Scenario):
            scenario_file = str(Path(scenario).resolve())
            scenario = load_scenario(scenario)
        sc = scenario
        if devices is not None or profiles is not None:
            if devices is not None and devices < 1:
                raise FleetSizeError(f"a fleet needs at least 1 device, not {devices}")
            sc = sc.with_overrides(devices=devices, profiles=profiles)
    k = workers or os.cpu_count() or 1
    k = max(1, min(k, sc.fleet.devices))
    capacity = check_capacity(sc.fleet.devices, k)
    if not Path(host_public_key).is_file():
        raise ConfigError(f"host public key {host_public_key} not found (tinyfleet keys init)")
    if password_dir is not None:
        missing = [d for d in sc.device_ids() if not (Path(password_dir) / d).is_file()]
        if missing:
            raise ConfigError(
                f"--password-dir {password_dir}: no password file for {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
    paths.root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        paths.state.unlink()
    config = {
        "fleet": fleet,
        "broker_url": broker_url,
        "host_public_key": str(Path(host_public_key).resolve()),
        "workers": k,
        "scenario": sc.model_dump(mode="json"),
        "scenario_file": scenario_file,
        "feed": feed,
        "password_dir": None if password_dir is None else str(Path(password_dir).resolve()),
        "heartbeat_s": heartbeat_s,
        "window": window,
        "chunk_timeout_s": chunk_timeout_s,
        "tick_s": tick_s,
        "device_overrides": device_overrides or {},
        "start_epoch": time.time(),
        "socket_dir": str(_socket_dir(paths.root)),
        "capacity": capacity,
    }
    _write_json(paths.config, config)
    if foreground:
        code = supervise(home, ready=on_ready)
        return {"status": "stopped" if code == 0 else "failed", "exit_code": code}
    with open(paths.supervisor_log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tinyfleet.sim.launcher", "supervise", str(home)],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + READY_TIMEOUT_S + sc.fleet.devices / 25.0
    while True:
        st = _read_json(paths.state)
        if st is not None and st.get("supervisor_pid") == proc.pid:
            if st["status"] == "running":
                return dict(st)
            proc.wait(10)
            raise SimControlError(f"the simulator did not start: {st.get('reason')}")
        if proc.poll() is not None:
            raise SimControlError(
                f"the simulator supervisor exited ({proc.returncode}): "
                f"{_last_line(paths.supervisor_log)}"
            )
        if time.monotonic() > deadline:
            proc.terminate()
            raise SimControlError("the simulator did not start in time; see " + str(paths.root))
        time.sleep(0.1)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def status(home: Path, timeout: float = 30.0) -> dict[str, Any]:
    """The running simulator: per worker its pid and devices, per device its status."""
    st = running_state(home)
    devices: list[dict[str, Any]] = []
    workers = []
    for w in st["workers"]:
        entry = {"index": w["index"], "pid": w["pid"], "devices": len(w["devices"])}
        try:
            answer = ask(w["socket"], {"cmd": "status"}, timeout)
        except SimControlError as exc:
            entry["error"] = str(exc)
            devices += [
                {"device": d, "worker": w["index"], "unreachable": True} for d in w["devices"]
            ]
        else:
            entry.update(
                alive=True,
                rss_bytes=answer["mem"].get("VmRSS"),
                feed=answer.get("feed"),
                connected=sum(1 for d in answer["devices"] if d.get("connected")),
            )
            devices += [{**d, "worker": w["index"]} for d in answer["devices"]]
        workers.append(entry)
    summary = {
        "devices": len(devices),
        "connected": sum(1 for d in devices if d.get("connected")),
        "serving": sum(1 for d in devices if d.get("serving")),
        "killed": sum(1 for d in devices if d.get("phase") == "killed"),
        "inferences": sum(int(d.get("inferences") or 0) for d in devices),
        "models": _count(d.get("serving") for d in devices if d.get("serving")),
    }
    return {
        "supervisor_pid": st["supervisor_pid"],
        "broker_url": st["broker_url"],
        "fleet": st["fleet"],
        "scenario_file": st.get("scenario_file"),
        "uptime_s": round(time.time() - st["started"], 1),
        "summary": summary,
        "workers": workers,
        "device_status": devices,
    }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def down(home: Path, timeout: float = 60.0) -> dict[str, Any]:
    """Stop the simulator in ``home``; make sure none of its processes is left."""
    paths = SimPaths(home)
    st = _read_json(paths.state)
    if st is None:
        raise SimStateError(f"no simulator runs in {home}")
    pid = st.get("supervisor_pid")
    worker_pids = [w.get("pid") for w in st.get("workers", []) if w.get("pid")]
    stopped = False
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        stopped = True
    killed = []
    for wp in worker_pids:
        if _alive(wp):  # the supervisor was gone or stuck: finish its workers
            with contextlib.suppress(ProcessLookupError):
                os.kill(wp, signal.SIGKILL)
            killed.append(wp)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in [pid, *worker_pids]) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in [pid, *worker_pids] if _alive(p)]
    if left:
        raise SimControlError(f"processes still running after sim down: {left}")
    with contextlib.suppress(FileNotFoundError):
        paths.state.unlink()
    return {
        "stopped": stopped,
        "devices": st.get("devices"),
        "workers": len(worker_pids),
        "killed_workers": killed,
    }


def select_devices(
    all_devices: list[str],
    *,
    devices: list[str] | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> list[str]:
    """``devices`` (checked against the fleet) or a seeded ``fraction`` of the fleet (>= 1)."""
    import numpy as np

    if (devices is None) == (fraction is None):
        raise ConfigError("select devices with --devices ID,... or --fraction F (one of the two)")
    if devices is not None:
        known = set(all_devices)
        unknown = [d for d in devices if d not in known]
        if unknown:
            raise ConfigError(f"unknown device {unknown[0]!r} (not in the running simulator)")
        return list(dict.fromkeys(devices))
    assert fraction is not None
    if not 0 < fraction <= 1:
        raise ConfigError(f"--fraction must be in (0, 1], not {fraction}")
    k = max(1, round(fraction * len(all_devices)))
    order = np.random.default_rng(seed).permutation(len(all_devices))
    return sorted(all_devices[int(i)] for i in order[:k])


def chaos(
    home: Path,
    action: str,
    *,
    devices: list[str] | None = None,
    fraction: float | None = None,
    seed: int = 0,
    **params: Any,
) -> dict[str, Any]:
    """Send ``action`` (one of ``CHAOS_ACTIONS``) to the workers holding the selected devices."""
    if action not in CHAOS_ACTIONS:
        raise ConfigError(f"unknown chaos action {action!r} (known: {', '.join(CHAOS_ACTIONS)})")
    st = running_state(home)
    owner = {d: w for w in st["workers"] for d in w["devices"]}
    chosen = select_devices(list(owner), devices=devices, fraction=fraction, seed=seed)
    done: list[str] = []
    skipped: dict[str, str] = {}
    for w in st["workers"]:
        mine = [d for d in chosen if owner[d] is w]
        if not mine:
            continue
        answer = ask(w["socket"], {"cmd": action, "devices": mine, **params})
        done += answer.get("done", [])
        skipped.update(answer.get("skipped", {}))
    return {"action": action, "devices": sorted(done), "skipped": skipped, **params}


# --------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - process entry points
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "worker":
        return worker_main(args[1])
    if len(args) == 2 and args[0] == "supervise":
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        return supervise(Path(args[1]))
    sys.stderr.write("usage: python -m tinyfleet.sim.launcher worker SPEC | supervise HOME\n")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
