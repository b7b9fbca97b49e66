"""The host's Flower SuperLink, run as a managed child process.

``SuperLink(workdir)`` starts ``flower-superlink`` on a free loopback port (or the
given host/port) with its own ``FLWR_HOME`` under ``workdir`` (never inside the
app folder: ``flwr run`` packs that folder), runtime dependency installation
disabled, the SuperExec polling every ``poll_interval`` s, and its log in
``workdir/superlink.log``.  ``stop()`` ends it and every process it started.

TLS: pass ``tls=TLSFiles(ca, cert, key)`` (``generate_tls_files`` makes a private
CA and a server certificate for local trials).  Node authentication
(``supernode_auth=True``, needs TLS): only SuperNodes whose public key was
registered with ``register_node`` may connect.  The ``flwr`` CLI reads the
connection ``tinyfleet`` from ``workdir/flwr-home/config.toml``; ``cli_env()`` is
the environment to run it with.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tinyfleet.agent.fl.errors import FLError, FLTimeoutError
from tinyfleet.agent.fl.process import ManagedProcess, flower_command, flower_env
from tinyfleet.agent.fl.supernode import DEFAULT_POLL_INTERVAL, log_reason

__all__ = ["CONNECTION", "SuperLink", "TLSFiles", "generate_tls_files"]

CONNECTION = "tinyfleet"
"""Name of the SuperLink connection in the ``flwr`` CLI's config.toml."""


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a TLS-enabled SuperLink: the CA, its certificate and key."""

    ca_cert: Path
    cert: Path
    key: Path

    def check(self) -> None:
        for name, p in (
            ("CA certificate", self.ca_cert),
            ("certificate", self.cert),
            ("key", self.key),
        ):
            if not Path(p).is_file():
                raise FLError(f"SuperLink TLS {name} {p} does not exist")


def generate_tls_files(
    directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 30
) -> TLSFiles:
    """A private CA and a server certificate for ``hosts`` (for trials and tests)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("tinyfleet FL CA"))
        .issuer_name(name("tinyfleet FL CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    alt: list[x509.GeneralName] = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return files


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SuperLink:
    """A ``flower-superlink`` process owned by the host (one per FL run or service)."""

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        tls: TLSFiles | None = None,
        supernode_auth: bool = False,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        database: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        if supernode_auth and tls is None:
            raise FLError("SuperNode authentication needs TLS: pass tls=TLSFiles(...)")
        if tls is not None:
            tls.check()
        self.workdir = Path(workdir).absolute()
        self.host = host
        self.port = port if port is not None else _free_port(host)
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.flwr_home = self.workdir / "flwr-home"
        command = [flower_command("flower-superlink"), "--host", host, "--port", str(self.port)]
        if tls is None:
            command.append("--insecure")
        else:
            command += [
                "--ssl-ca-certfile",
                str(tls.ca_cert),
                "--ssl-certfile",
                str(tls.cert),
                "--ssl-keyfile",
                str(tls.key),
            ]
        if supernode_auth:
            command.append("--enable-supernode-auth")
        command.append("--disable-runtime-dependency-installation")
        if database is not None:
            command += ["--database", str(database)]
        full_env = flower_env(env)
        full_env["FLWR_HOME"] = str(self.flwr_home)
        full_env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(poll_interval)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self._env = full_env
        self._proc = ManagedProcess(command, self.workdir / "superlink.log", env=full_env)

    @property
    def address(self) -> str:
        """``host:port`` for SuperNodes and the ``flwr`` CLI (one port serves all APIs)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self._proc.log_file

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def root_certificates(self) -> Path | None:
        """The CA file SuperNodes verify this SuperLink with (None when insecure)."""
        return self.tls.ca_cert if self.tls is not None else None

    def cli_env(self) -> dict[str, str]:
        """Environment for the ``flwr`` CLI (its FLWR_HOME holds the connection)."""
        return dict(self._env)

    def _write_cli_config(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "{self.address}"',
        ]
        if self.tls is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.tls.ca_cert}"')
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 30.0) -> SuperLink:
        """Start the SuperLink and wait until its port accepts connections."""
        if self._proc.alive():
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_cli_config()
        self._proc.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._proc.alive():
                raise FLError(
                    f"flower-superlink exited with code {self._proc.returncode()}: "
                    + log_reason(self._proc.log_text())
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            # uvicorn runs the app's lifespan (state, SuperExec) before it binds the port
            self._proc.remember_tree()
            return self
        self.stop()
        raise FLTimeoutError(
            f"SuperLink did not accept connections on {self.address} within {timeout} s "
            f"(log: {self.log_file})"
        )

    def alive(self) -> bool:
        return self._proc.alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the SuperLink, its SuperExec and any ServerApp still running."""
        self._proc.stop(timeout)

    def __enter__(self) -> SuperLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this SuperLink (output captured)."""
        return subprocess.run(
            [flower_command("flwr"), *args],
            env=self.cli_env(),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def register_node(self, public_key: Path, name: str | None = None) -> int:
        """Register a SuperNode's public key (OpenSSH, NIST EC); returns the node id."""
        if not self.supernode_auth:
            raise FLError("this SuperLink runs without node authentication; nothing to register")
        args = ["supernode", "register", str(public_key), CONNECTION, "--format", "json"]
        if name:
            args += ["--name", name]
        res = self.flwr(*args)
        payload = _last_json(res.stdout)
        if res.returncode != 0 or not payload.get("success"):
            reason = payload.get("error-message") or (res.stderr or res.stdout).strip()[-300:]
            raise FLError(f"registering SuperNode key {public_key} failed: {reason}")
        return int(str(payload["node-id"]))


def _last_json(text: str) -> dict[str, object]:
    """The last JSON object printed by the flwr CLI (it may print other lines first)."""
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
            return value if isinstance(value, dict) else {}
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return {}
