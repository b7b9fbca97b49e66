"""A Flower SuperNode process for this device, pointed at its local labelled data.

Only runs the ``flower-supernode`` command (Flower is imported in that process,
never here).  The node gets ``data-path`` in its node config, which the ClientApp
(``tinyfleet.agent.fl.clientapp``) reads, and ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``
in its environment so its SuperExec starts each ClientApp without waiting a second.

Authentication: with ``auth_private_key`` the node signs its requests with an EC
key (OpenSSH format, NIST curve); the SuperLink accepts it only once the matching
public key is registered (``SuperLink.register_node``).  ``generate_node_keys``
makes such a pair.  TLS: ``root_certificates`` is the CA that signed the
SuperLink's certificate; without it the connection is ``--insecure``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from tinyfleet.agent.fl.errors import FLError, FLTimeoutError
from tinyfleet.agent.fl.process import ManagedProcess, flower_command, flower_env

__all__ = ["DEFAULT_POLL_INTERVAL", "SuperNodeProcess", "generate_node_keys", "log_reason"]

DEFAULT_POLL_INTERVAL = 0.2
"""Seconds between the SuperExec's task polls (Flower's default is 1 s).

Measured on the 2-core bench machine, an idle SuperNode with its SuperExec costs
~7.8 % of a core at 0.05 s, ~1.9 % at 0.2 s and ~0.6 % at 1 s: 0.2 s adds ~0.1 s
per round on average and leaves the cores to the ClientApps."""

NodeConfigValue = str | int | float | bool

_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


def _toml_value(value: NodeConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def generate_node_keys(directory: Path, name: str = "supernode") -> tuple[Path, Path]:
    """A new P-384 key pair for SuperNode authentication: (private key, public key) paths.

    Both in OpenSSH format as Flower reads them; the private key file is mode 0600.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = directory / name
    public = directory / f"{name}.pub"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public


class SuperNodeProcess:
    """Start, watch and stop one ``flower-supernode`` for this device.

    ``superlink`` is the SuperLink's ``host:port``; ``data_path`` the node's labelled
    data (the agent's ``labels.db`` or an ``.npz``).  ``port`` is the node's own
    Runtime API port (each SuperNode on one machine needs its own; default: a free
    one).  ``node_config`` adds keys to the node config (``data-path`` is always set).
    ``home`` holds the log file (``supernode.log``) and Flower's files for this node.
    """

    def __init__(
        self,
        superlink: str,
        data_path: Path,
        *,
        port: int | None = None,
        node_config: Mapping[str, NodeConfigValue] | None = None,
        root_certificates: Path | None = None,
        auth_private_key: Path | None = None,
        env: Mapping[str, str] | None = None,
        home: Path | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_wait_time: float | None = None,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", superlink):
            raise FLError(f"SuperLink address must be host:port; got {superlink!r}")
        if not (0.01 <= poll_interval <= 5.0):
            raise FLError(f"poll_interval must be within 0.01..5 s; got {poll_interval}")
        self.superlink = superlink
        self.data_path = Path(data_path).absolute()
        self.port = port if port is not None else _free_port()
        self.root_certificates = root_certificates
        self.auth_private_key = auth_private_key
        self.home = Path(home) if home is not None else self.data_path.parent / "supernode"
        self.poll_interval = poll_interval
        config: dict[str, NodeConfigValue] = {"data-path": str(self.data_path)}
        for key, value in (node_config or {}).items():
            if not _KEY_RE.match(key):
                raise FLError(f"node config key {key!r} is not a plain lower-case name")
            if not isinstance(value, str | int | float | bool):
                raise FLError(f"node config {key!r} must be a string, number or bool")
            config[key] = value
        self.node_config = config
        command = [flower_command("flower-supernode")]
        if root_certificates is not None:
            command += ["--root-certificates", str(root_certificates)]
        else:
            command += ["--insecure"]
        command += ["--superlink", superlink, "--port", str(self.port), "--host", "127.0.0.1"]
        command += ["--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())]
        if auth_private_key is not None:
            command += ["--auth-supernode-private-key", str(auth_private_key)]
        if max_wait_time is not None:
            command += ["--max-wait-time", str(max_wait_time)]
        full_env = flower_env(env)
        full_env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(poll_interval)
        full_env["FLWR_HOME"] = str(self.home / "flwr")
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self._proc = ManagedProcess(command, self.home / "supernode.log", env=full_env)
        self._log_offset = 0

    @property
    def command(self) -> list[str]:
        return list(self._proc.command)

    @property
    def log_file(self) -> Path:
        return self._proc.log_file

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def start(self) -> SuperNodeProcess:
        """Start the node (no-op if running); returns at once, see ``wait_connected``."""
        if not self._proc.alive():
            self.home.mkdir(parents=True, exist_ok=True)
            try:
                self._log_offset = self.log_file.stat().st_size
            except OSError:
                self._log_offset = 0
            self._proc.start()
        return self

    def alive(self) -> bool:
        return self._proc.alive()

    def returncode(self) -> int | None:
        return self._proc.returncode()

    def node_id(self) -> int | None:
        """The id the SuperLink gave this run of the node, once it has connected."""
        text = self._proc.log_text()[self._log_offset :]
        found = _NODE_ID.findall(text)
        return int(found[-1]) if found else None

    def wait_connected(self, timeout: float = 30.0) -> int:
        """Block until the node has registered with the SuperLink; its node id."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            node = self.node_id()
            if node is not None:
                self._proc.remember_tree()
                return node
            if not self._proc.alive():
                reason = log_reason(self._proc.log_text()[self._log_offset :])
                raise FLError(f"SuperNode exited with code {self._proc.returncode()}: {reason}")
            time.sleep(0.05)
        raise FLTimeoutError(
            f"SuperNode did not connect to {self.superlink} within {timeout} s "
            f"(log: {self.log_file})"
        )

    def kill(self) -> None:
        """SIGKILL the SuperNode (a crash); its SuperExec and ClientApps exit after it."""
        self._proc.kill()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the node and every process it started."""
        self._proc.stop(timeout)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log_reason(text: str) -> str:
    """The error Flower logged (its ERROR line and the lines after it), else the last lines."""
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("ERROR"):
            picked = [lines[i].removeprefix("ERROR").lstrip(" :")]
            picked += [ln for ln in lines[i + 1 : i + 4] if not ln.startswith(("INFO", "For more"))]
            return " ".join(picked)
    return " | ".join(lines[-3:]) or "no output"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
