"""A private Mosquitto for benchmarks: own config folder, a free port on 127.0.0.1, no persistence.

The system broker on 1883 is never used.  ``sys_interval`` turns on the broker's
``$SYS`` statistics (published every that many seconds), read with ``SysCounters``.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

STARTUP_TIMEOUT_S = 10.0


def mosquitto_path() -> str | None:
    """Path of the mosquitto binary, or None when it is not installed."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Broker:
    """One mosquitto process with its config and log in ``workdir``."""

    def __init__(self, workdir: Path, *, sys_interval: int = 0, extra_config: str = "") -> None:
        binary = mosquitto_path()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"sys_interval {sys_interval}",
        ]
        if os.geteuid() == 0:
            lines.append(f"user {getpass.getuser()}")  # do not drop to the "mosquitto" user
        if extra_config:
            lines.append(extra_config.strip())
        self.config_path.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> Broker:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self._proc.returncode}:\n{self.log()[-2000:]}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SysCounters:
    """The broker's latest ``$SYS/broker/...`` values, from a subscriber of its own."""

    TOPICS = (
        "$SYS/broker/bytes/sent",
        "$SYS/broker/bytes/received",
        "$SYS/broker/messages/sent",
        "$SYS/broker/messages/received",
        "$SYS/broker/publish/messages/dropped",
    )

    def __init__(self, broker: Broker) -> None:
        import paho.mqtt.client as mqtt

        self.values: dict[str, int] = {}
        self.updates = 0
        self._cond = threading.Condition()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sys")
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.subscribe([(t, 0) for t in self.TOPICS])
        self._client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        with self._cond:
            try:
                self.values[f"{parts[-2]}_{parts[-1]}"] = int(msg.payload)
            except ValueError:
                return
            if parts[-2:] == ["bytes", "sent"]:
                self.updates += 1  # changes every interval: this subscriber receives bytes
            self._cond.notify_all()

    def fresh(self, timeout: float = 5.0) -> dict[str, int]:
        """Values from the broker's next publication after now."""
        with self._cond:
            target = self.updates + 1
            if not self._cond.wait_for(lambda: self.updates >= target, timeout):
                raise RuntimeError("no $SYS update from the broker (is sys_interval set?)")
        time.sleep(0.05)  # the other counters of the same publication
        with self._cond:
            return dict(self.values)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
