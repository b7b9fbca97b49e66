"""The agent's SuperNode supervisor: refusals, start, restart with backoff, stop.

The refusal and backoff tests drive the supervisor with a manual clock; the
process it supervises is a real child process (a sleeping Python).  The Flower
test runs a real ``flower-superlink`` and a real ``flower-supernode``, kills the
node with SIGKILL and watches the supervisor bring it back, then disables it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tinyfleet.agent.fl.process import ManagedProcess, descendants
from tinyfleet.agent.fl.supervisor import SuperNodeSupervisor
from tinyfleet.agent.profiles import get_profile
from tinyfleet.agent.protocol.messages import EventKind, FLSettings, FLState

ENABLED = FLSettings(enabled=True, superlink="127.0.0.1:9092", run="fl-test-1", min_samples=10)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Sleeper:
    """A real child process standing in for flower-supernode (the factory's product)."""

    made: list[Sleeper] = []  # noqa: RUF012 - test bookkeeping

    def __init__(self, tmp: Path, **kw: Any) -> None:
        self.kw = kw
        self.proc = ManagedProcess(
            [sys.executable, "-c", "import time; time.sleep(120)"], tmp / "sleeper.log"
        )
        Sleeper.made.append(self)

    def start(self) -> None:
        self.proc.start()

    def alive(self) -> bool:
        return self.proc.alive()

    def returncode(self) -> int | None:
        return self.proc.returncode()

    def stop(self, timeout: float = 5.0) -> None:
        self.proc.stop(timeout)


def _supervisor(tmp_path: Path, profile: str = "rpi4", **kw: Any) -> SuperNodeSupervisor:
    Sleeper.made = []
    kw.setdefault("sample_counter", lambda path: 100)
    kw.setdefault("flwr_available", lambda: True)
    kw.setdefault("process_factory", lambda **k: Sleeper(tmp_path, **k))
    return SuperNodeSupervisor(state_dir=tmp_path / "state", profile=get_profile(profile), **kw)


def kinds(events: list[tuple[EventKind, str]]) -> list[EventKind]:
    return [k for k, _ in events]


def test_mcu_device_is_refused_with_a_reason_once(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, "cortex-m4")
    assert sup.status() is None  # nothing to report before fl is asked for (no buffer)
    sup.configure(ENABLED)
    events = sup.poll()
    assert kinds(events) == [EventKind.FL_REFUSED]
    status = sup.status()
    assert status is not None and status.state is FLState.REFUSED
    assert status.reason is not None and "MCU-class" in status.reason
    assert "cortex-m4" in status.reason and status.run == "fl-test-1"
    assert sup.poll() == []  # refused once, not on every tick
    assert Sleeper.made == []  # no process was started


def test_flwr_missing_and_too_few_samples_are_refused(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, flwr_available=lambda: False)
    sup.configure(ENABLED)
    assert kinds(sup.poll()) == [EventKind.FL_REFUSED]
    assert "flwr is not installed" in (sup.status().reason or "")  # type: ignore[union-attr]

    samples = {"n": 4}
    clock = Clock()
    sup = _supervisor(
        tmp_path, sample_counter=lambda path: samples["n"], clock=clock, count_every_s=30
    )
    sup.configure(ENABLED)
    assert kinds(sup.poll()) == [EventKind.FL_REFUSED]
    status = sup.status()
    assert status is not None and status.samples == 4
    assert status.reason == "4 labelled samples; the run needs at least 10"
    samples["n"] = 50  # labelled samples arrive: the refusal lifts at the next count
    clock.t += 31
    try:
        assert kinds(sup.poll()) == [EventKind.FL_STARTED]
        assert sup.status().state is FLState.RUNNING  # type: ignore[union-attr]
        assert sup.status().samples == 50  # type: ignore[union-attr]
    finally:
        sup.close()


def test_start_restart_with_backoff_and_stop_on_disable(tmp_path: Path) -> None:
    clock = Clock()
    sup = _supervisor(tmp_path, clock=clock, backoff_base_s=2.0, backoff_cap_s=8.0)
    try:
        sup.configure(ENABLED)
        assert kinds(sup.poll()) == [EventKind.FL_STARTED]
        first = Sleeper.made[0]
        assert first.kw["superlink"] == "127.0.0.1:9092"
        assert first.kw["data_path"] == tmp_path / "state" / "labels.db"
        assert first.alive()
        assert sup.poll() == []  # running: nothing to do

        os.kill(first.proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        first.proc.proc.wait(5)  # type: ignore[union-attr]
        events = sup.poll()
        assert kinds(events) == [EventKind.FL_EXITED]
        assert "code -9" in events[0][1]
        status = sup.status()
        assert status is not None and status.state is FLState.BACKOFF and status.restarts == 1
        assert sup.poll() == []  # still backing off: no restart yet
        assert len(Sleeper.made) == 1
        clock.t += 8.1  # past the longest first backoff
        assert kinds(sup.poll()) == [EventKind.FL_STARTED]
        second = Sleeper.made[1]
        assert second.alive() and sup.status().state is FLState.RUNNING  # type: ignore[union-attr]

        # new SuperLink address: restarted with it
        sup.configure(ENABLED.model_copy(update={"superlink": "127.0.0.1:9999"}))
        assert kinds(sup.poll()) == [EventKind.FL_STOPPED, EventKind.FL_STARTED]
        assert not second.alive() and Sleeper.made[2].kw["superlink"] == "127.0.0.1:9999"

        sup.configure(None)
        assert kinds(sup.poll()) == [EventKind.FL_STOPPED]
        assert not Sleeper.made[2].alive()
        status = sup.status()
        assert status is not None and status.state is FLState.DISABLED and status.run is None
    finally:
        sup.close()
    assert not any(s.alive() for s in Sleeper.made)


def test_close_stops_the_node_and_later_polls_do_nothing(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    sup.configure(ENABLED)
    sup.poll()
    node = Sleeper.made[0]
    assert node.alive()
    sup.close()
    assert not node.alive()
    assert sup.poll() == [] and len(Sleeper.made) == 1


def test_a_supernode_left_by_a_killed_agent_is_stopped_by_the_next_one(tmp_path: Path) -> None:
    """The node runs in its own session and outlives a SIGKILLed agent (its pid file stays)."""

    class Orphan(Sleeper):
        def __init__(self, tmp: Path, **kw: Any) -> None:
            super().__init__(tmp, **kw)
            # what /proc/<pid>/cmdline shows for the real node
            self.proc.command += ["flower-supernode"]

        @property
        def pid(self) -> int | None:
            return self.proc.pid

    sup = _supervisor(tmp_path, process_factory=lambda **k: Orphan(tmp_path, **k))
    sup.configure(ENABLED)
    assert kinds(sup.poll()) == [EventKind.FL_STARTED]
    orphan = Sleeper.made[0]
    pid_file = tmp_path / "state" / "fl" / "supernode.pid"
    assert pid_file.read_text().strip() == str(orphan.proc.pid)
    # the agent dies without close(): a new agent's supervisor finds the node and stops it
    SuperNodeSupervisor(state_dir=tmp_path / "state", profile=get_profile("rpi4"))
    orphan.proc.proc.wait(5)  # type: ignore[union-attr]
    assert not orphan.alive() and not pid_file.exists()


def test_agent_reports_a_refusal_from_its_desired_state(tmp_path: Path) -> None:
    """A signed desired state with fl reaches an MCU agent's supervisor; the report says why."""
    from datetime import UTC, datetime

    from tinyfleet.agent.agent import Agent
    from tinyfleet.agent.protocol import DesiredState, encode
    from tinyfleet.host.keys import SigningKey
    from tinyfleet.sim.fleet import DeviceSpec, provision

    key = SigningKey.generate()
    pub = tmp_path / "host.pub"
    pub.write_text(key.public_key_pem)
    cfg = provision(
        tmp_path / "devices",
        DeviceSpec("mcu-1", profile="cortex-m7"),
        fleet="t",
        broker_url="mqtt://127.0.0.1:1",
        host_public_key=pub,
    )
    agent = Agent(cfg, public_key=key.public_key)
    try:
        desired = DesiredState(
            device="mcu-1",
            generation=1,
            issued_at=datetime.now(UTC),
            fl=FLSettings(enabled=True, superlink="127.0.0.1:9092", run="fl-x"),
        )
        agent.on_message(
            agent.link, agent.topics.desired("mcu-1"), encode(key.sign_desired(desired)), True
        )
        agent.tick()
        fl = agent.reported_state().fl
        assert fl is not None and fl.state is FLState.REFUSED and fl.run == "fl-x"
        assert "MCU-class device (profile cortex-m7)" in (fl.reason or "")
        assert agent.reported_state().error is None  # not a model error
    finally:
        agent.close(timeout=0.5)


# ----------------------------------------------------------------------------- real Flower


def _flower_available() -> bool:
    try:
        from tinyfleet.agent.fl.process import flower_command

        flower_command("flower-supernode")
        flower_command("flower-superlink")
        from tinyfleet.host.fl.superlink import SuperLink  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _flower_available(), reason="Flower's SuperLink/SuperNode not available")
def test_real_supernode_started_restarted_after_sigkill_and_stopped(tmp_path: Path) -> None:
    from tinyfleet.agent.fl.data import save_npz_data
    from tinyfleet.host.fl.superlink import SuperLink

    (tmp_path / "state").mkdir()
    data = save_npz_data(
        tmp_path / "state" / "labels.npz",
        np.zeros((40, 4), dtype=np.float32),
        np.zeros(40, dtype=np.int64),
    )
    link = SuperLink(tmp_path / "superlink")
    link.start()
    sup = SuperNodeSupervisor(
        state_dir=tmp_path / "state",
        profile=get_profile("rpi4"),
        data_path=data,
        sample_counter=lambda path: 40,
        backoff_base_s=0.2,
        backoff_cap_s=0.5,
    )
    try:
        sup.configure(FLSettings(enabled=True, superlink=link.address, run="fl-real"))
        assert kinds(sup.poll()) == [EventKind.FL_STARTED]
        node = sup.process
        assert sup.status().state is FLState.STARTING  # type: ignore[union-attr]
        first_id = node.wait_connected(30)
        assert first_id > 0
        sup.poll()
        assert sup.status().state is FLState.RUNNING  # type: ignore[union-attr]
        tree = [node.pid, *descendants(node.pid)]

        node.kill()  # SIGKILL: a crash
        deadline = time.monotonic() + 20
        seen: list[EventKind] = []
        while time.monotonic() < deadline and EventKind.FL_STARTED not in seen:
            seen += kinds(sup.poll())
            time.sleep(0.1)
        assert seen == [EventKind.FL_EXITED, EventKind.FL_STARTED]
        assert sup.process is not node and sup.status().restarts == 1  # type: ignore[union-attr]
        assert sup.process.wait_connected(30) > 0  # the new node registers again

        survivor = sup.process
        sup.configure(FLSettings(enabled=False))
        assert kinds(sup.poll()) == [EventKind.FL_STOPPED]
        assert not survivor.alive()
        pids = [survivor.pid, *tree]
        time.sleep(0.3)
        alive = [p for p in pids if p is not None and _pid_alive(p)]
        assert alive == [], f"left behind: {alive}"
    finally:
        sup.close()
        link.stop()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2] != "Z"
    except OSError:
        return False
