"""A real Mosquitto broker for tests: own config dir, free port, optional ACL and passwords.

Use the fixtures by importing them into a test module (the import registers them)::

    from mqtt_broker import mosquitto_fixture as mosquitto_fixture
    from mqtt_broker import mosquitto_factory_fixture as mosquitto_factory_fixture

``mosquitto`` is a broker with anonymous access and persistence; ``mosquitto_factory``
builds brokers with other options (``acl_file``, ``users``, ...).  Tests using them
need the ``mosquitto`` binary and are skipped without it.  The system broker on 1883
is never used: every broker gets a free port of its own.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import pytest

__all__ = [
    "BrokerFactory",
    "MosquittoBroker",
    "free_port",
    "mosquitto_factory_fixture",
    "mosquitto_fixture",
    "mosquitto_path",
]

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


class MosquittoBroker:
    """One mosquitto process with its config, password file, ACL, log and database in ``workdir``.

    ``config`` replaces the generated configuration entirely (it must listen on
    ``127.0.0.1:port``); the other options then only write the password file.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        acl_file: Path | None = None,
        persistence: bool = True,
        extra_config: str = "",
        port: int | None = None,
        config: str | None = None,
    ) -> None:
        binary = mosquitto_path()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.users = dict(users or {})
        self.acl_file = acl_file
        self.persistence = persistence
        self.extra_config = extra_config
        self.config = config
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.password_file = self.workdir / "passwd" if self.users else None
        self.data_dir = self.workdir / "data"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_files()

    # ---- files
    def _write_files(self) -> None:
        if self.password_file is not None:
            self._write_passwords(self.password_file)
        if self.config is not None:
            self.config_path.write_text(self.config)
            return
        lines = [
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if self.users else 'true'}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # Run as the current user instead of dropping to "mosquitto", which could
            # not read these files or write the database.
            lines.append(f"user {getpass.getuser()}")
        if self.persistence:
            self.data_dir.mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {self.data_dir}/"]
        else:
            lines.append("persistence false")
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {Path(self.acl_file).resolve()}")
        if self.extra_config:
            lines.append(self.extra_config.strip())
        self.config_path.write_text("\n".join(lines) + "\n")

    def _write_passwords(self, path: Path) -> None:
        tool = shutil.which("mosquitto_passwd")
        if tool is None:
            raise FileNotFoundError("mosquitto_passwd is not installed")
        path.unlink(missing_ok=True)
        path.touch(mode=0o600)
        for user, password in self.users.items():
            subprocess.run(
                [tool, "-b", str(path), user, password], check=True, capture_output=True, timeout=30
            )
        path.chmod(0o600)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` to connect to."""
        return self.host, self.port

    # ---- process
    @property
    def running(self) -> bool:
        """True while the mosquitto process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """Everything mosquitto wrote so far (all runs)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> MosquittoBroker:
        """Start mosquitto and wait until it accepts connections."""
        if self.running:
            return self
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self._proc.returncode} on port {self.port}:\n"
                    f"{self.log()[-2000:]}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"mosquitto did not listen on port {self.port} within {STARTUP_TIMEOUT_S} s"
        )

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM; it writes its database when persistence is on)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> MosquittoBroker:
        """Stop and start again on the same port, with the same database."""
        self.stop()
        return self.start()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"MosquittoBroker({self.host}:{self.port}, {state}, {self.workdir})"


BrokerFactory = Callable[..., MosquittoBroker]


@contextlib.contextmanager
def _brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerFactory]:
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    brokers: list[MosquittoBroker] = []

    def make(**options: object) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"), **options)  # type: ignore[arg-type]
        brokers.append(broker)
        return broker.start()

    try:
        yield make
    finally:
        for broker in brokers:
            broker.stop()


@pytest.fixture(name="mosquitto_factory")
def mosquitto_factory_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerFactory]:
    """Call with ``MosquittoBroker`` keyword options; returns a started broker, stopped after the test."""
    with _brokers(tmp_path_factory) as make:
        yield make


@pytest.fixture(name="mosquitto")
def mosquitto_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A started broker: anonymous access, persistence on, a free port; stopped after the test."""
    with _brokers(tmp_path_factory) as make:
        yield make()
