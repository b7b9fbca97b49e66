"""A child process with its own log file, stopped together with everything it started.

Flower's ``flower-superlink`` and ``flower-supernode`` each start a
``flower-superexec`` in a new session, which starts one ``flwr-serverapp`` /
``flwr-clientapp`` process per task.  Those leave the process group, so stopping
only the parent can leave them behind for a while (they watch their parent's pid).
``ManagedProcess.stop`` collects the whole tree from ``/proc`` before it signals,
then terminates and, if needed, kills every process of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tinyfleet.agent.fl.errors import FLError

__all__ = ["ManagedProcess", "descendants", "flower_command", "flower_env"]


def flower_command(name: str) -> str:
    """Path of a Flower console script (``flower-supernode``…), next to this Python first."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FLError(
            f"{name} not found: install Flower (the agent's `fl` extra: pip install 'tinyfleet[fl]')"
        )
    return found


def flower_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this environment) with Flower's scripts' folder first on PATH.

    Flower starts ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by
    name, so they must be found on PATH even when this Python's venv is not activated.
    """
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(flower_command("flower-superexec")).parent)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    env["PATH"] = os.pathsep.join([bin_dir, *parts])
    return env


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return children
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) >= 2:
            children.setdefault(int(rest[1]), []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children = _children_map()
    out: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0): look at its state
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2] != "Z"
    except OSError:
        return True


class ManagedProcess:
    """One command run in the background, its output appended to ``log_file``."""

    def __init__(
        self,
        command: Sequence[str],
        log_file: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.command = list(command)
        self.log_file = Path(log_file)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._tree: set[int] = set()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        if self.alive():
            return
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self._tree = set()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def remember_tree(self) -> None:
        """Note the current descendants (so a later stop finds them even if re-parented)."""
        if self.proc is not None:
            self._tree.update(descendants(self.proc.pid))

    def _signal_all(self, pids: Sequence[int], sig: signal.Signals) -> None:
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)

    def kill(self) -> None:
        """SIGKILL the main process only (a crash, as a test or a chaos control makes one)."""
        if self.proc is not None and self.proc.poll() is None:
            self.remember_tree()
            self.proc.kill()
            self.proc.wait(5)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process and all it started; SIGKILL what is left after ``timeout``."""
        if self.proc is None:
            return
        self.remember_tree()
        tree = sorted(self._tree)
        if self.proc.poll() is None:
            self.proc.terminate()
        self._signal_all(tree, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is None or any(_alive(p) for p in tree):
                time.sleep(0.05)
                continue
            break
        if self.proc.poll() is None:
            self.proc.kill()
        left = [p for p in tree if _alive(p)]
        self._signal_all(left, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._tree = set()
