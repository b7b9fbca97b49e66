"""The fleet launcher through the CLI on a real Mosquitto: sim up/status/chaos/down, worker
processes, the control channel, crash isolation, and bad input answered in one line."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from fleet_support import make_host, wait_until
from mqtt_broker import MosquittoBroker
from mqtt_broker import mosquitto_factory_fixture as mosquitto_factory_fixture
from mqtt_broker import mosquitto_fixture as mosquitto_fixture

from tinyfleet.host.cli import main
from tinyfleet.sim import launcher

pytestmark = pytest.mark.mqtt


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _run(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    code = main(list(args))
    out, err = capfd.readouterr()
    data = json.loads(out) if "--json" in args and out.strip() else out
    return code, data, err


def test_up_status_chaos_down(
    tmp_path: Path, mosquitto: MosquittoBroker, capfd: pytest.CaptureFixture[str]
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    home = str(tmp_path / "home")
    url = host.settings.broker_url
    base = ["--home", home, "sim"]
    code, up, err = _run(
        capfd, *base, "up", "--devices", "12", "--workers", "2", "--broker", url,
        "--fleet", "test", "--heartbeat", "1", "--json",
    )  # fmt: skip
    assert code == 0, err
    st = up["sim"]
    pids = [st["supervisor_pid"], *(w["pid"] for w in st["workers"])]
    try:
        assert st["devices"] == 12 and [len(w["devices"]) for w in st["workers"]] == [6, 6]
        assert all(_alive(p) for p in pids)
        # each device: own state folder, pinned host key, own MQTT connection
        cfg = json.loads((tmp_path / "home" / "sim" / "config.json").read_text())
        assert cfg["host_public_key"] == str(host.public_key_path.resolve())

        def summary() -> dict[str, Any]:
            return launcher.status(Path(home))["summary"]

        wait_until(lambda: summary()["connected"] == 12, 20)
        # a second simulator in the same home is refused in one line
        code, _, err = _run(capfd, *base, "up", "--devices", "3", "--broker", url)
        assert code == 52 and "already runs" in err and len(err.strip().splitlines()) == 1

        code, res, _ = _run(
            capfd, *base, "chaos", "kill", "--fraction", "0.25", "--seed", "3", "--json"
        )
        assert code == 0
        killed = res["chaos"]["devices"]
        assert len(killed) == 3
        s = launcher.status(Path(home))
        assert s["summary"]["killed"] == 3 and s["summary"]["connected"] == 9
        assert all(_alive(p) for p in pids)  # killing devices never kills their worker
        code, res, _ = _run(capfd, *base, "chaos", "restart", "--devices", ",".join(killed))
        assert code == 0
        wait_until(lambda: summary()["connected"] == 12 and summary()["killed"] == 0, 20)

        victim = killed[0]
        code, res, _ = _run(capfd, *base, "chaos", "disconnect", "-d", victim, "--for", "5")
        assert code == 0

        def dev(d: str) -> dict[str, Any]:
            return next(x for x in launcher.status(Path(home))["device_status"] if x["device"] == d)

        assert not dev(victim)["connected"] and "disconnected" in dev(victim)["chaos"]
        time.sleep(1.5)
        assert not dev(victim)["connected"]  # no reconnect before the time is up
        wait_until(lambda: dev(victim)["connected"], 10)

        other = next(d for d in st["workers"][0]["devices"] if d != victim)
        for args in (
            ("slow-link", "--delay-ms", "200", "--for", "30"),
            ("full-disk",),
            ("clock-skew", "--seconds", "600"),
        ):
            code, _, err = _run(capfd, *base, "chaos", *args, "-d", other)
            assert code == 0, err
        assert set(dev(other)["chaos"]) == {"slow_link", "full_disk", "clock_skew"}
        code, text, _ = _run(capfd, *base, "status", "--per-device")
        assert code == 0 and "12 devices: 12 connected" in text and other in text

        # bad chaos input: one line each
        code, _, err = _run(capfd, *base, "chaos", "kill", "-d", "nope")
        assert code == 3 and "unknown device 'nope'" in err
        code, _, err = _run(capfd, *base, "chaos", "kill")
        assert code == 3 and "--fraction" in err
        code, _, err = _run(capfd, *base, "chaos", "disconnect", "-d", victim, "--for", "0")
        assert code == 2
    finally:
        code, res, err = _run(capfd, *base, "down", "--json")
    assert code == 0, err
    assert res["sim"]["workers"] == 2
    assert not any(_alive(p) for p in pids)  # nothing left behind
    assert not (tmp_path / "home" / "sim" / "state.json").exists()
    code, _, err = _run(capfd, *base, "status")
    assert code == 52 and "no simulator runs" in err
    code, _, err = _run(capfd, *base, "down")
    assert code == 52


def test_dead_worker_is_restarted_and_down_leaves_nothing(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    host = make_host(tmp_path / "home", mosquitto)
    home = tmp_path / "home"
    st = launcher.up(
        home,
        devices=4,
        workers=2,
        broker_url=host.settings.broker_url,
        fleet="test",
        host_public_key=host.public_key_path,
    )
    try:
        wait_until(lambda: launcher.status(home)["summary"]["connected"] == 4, 20)
        victim = st["workers"][1]["pid"]
        os.kill(victim, signal.SIGKILL)  # the whole worker process dies
        wait_until(lambda: launcher.running_state(home)["workers"][1]["pid"] != victim, 20)
        now = launcher.running_state(home)
        assert now["workers"][1]["restarts"] == 1
        wait_until(lambda: launcher.status(home)["summary"]["connected"] == 4, 20)
        # the supervisor dies without cleaning up: its workers follow it (PDEATHSIG)
        pids = [now["supervisor_pid"], *(w["pid"] for w in now["workers"])]
        os.kill(now["supervisor_pid"], signal.SIGKILL)
        wait_until(lambda: not any(_alive(p) for p in pids), 20)
    finally:
        launcher.down(home) if (home / "sim" / "state.json").exists() else None
    with pytest.raises(launcher.SimStateError):
        launcher.running_state(home)


def test_bad_input_is_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = str(tmp_path / "home")
    bad = tmp_path / "bad.toml"
    bad.write_text('[fleet]\ndevices = 5\n[[drift]]\nkind = "warp"\nselect = { fraction = 1 }\n')
    for args, code_want, text in (
        (["--scenario", str(bad)], 50, "drift.0.kind"),
        (["--devices", "90000"], 51, "90000 devices in 2 worker(s) need"),
        (["--devices", "0"], 51, "at least 1 device"),
        (["--devices", "3", "--profile", "rpi9"], 50, "rpi9"),
        (["--devices", "3", "--workers", "0"], 2, "--workers"),
        (["--devices", "3"], 3, "host public key"),
    ):
        code = main(["--home", home, "sim", "up", *args])
        err = capfd.readouterr().err
        assert code == code_want, (args, err)
        assert text in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # file descriptors: the figure and the limit are named
    monkeypatch.setattr(launcher.resource, "getrlimit", lambda _r: (1024, 4096))
    with pytest.raises(launcher.FleetSizeError, match=r"4,096.*at most ~1,344 devices"):
        launcher.check_capacity(2000, 2)
    assert launcher.check_capacity(1000, 2)["fds_per_worker"] == 64 + 6 * 500
    # memory: the need and what is available
    monkeypatch.setattr(launcher, "_mem_available", lambda: 1000 * 2**20)
    with pytest.raises(launcher.FleetSizeError, match=r"~1,160 MB.*1,000 MB are available"):
        launcher.check_capacity(1000, 2)


def test_devices_use_their_own_broker_credentials(
    tmp_path: Path, mosquitto_factory: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    ids = ["sim-00000", "sim-00001", "sim-00002"]
    users = {d: f"pw-{d}" for d in ids}
    broker = mosquitto_factory(users=users)
    host = make_host(tmp_path / "home", broker)
    home = tmp_path / "home"
    pw = tmp_path / "passwords"
    pw.mkdir()
    for d in ids[:2]:
        (pw / d).write_text(users[d] + "\n")
    args = ["--home", str(home), "sim", "up", "--devices", "3", "--workers", "1"]
    args += ["--broker", host.settings.broker_url, "--password-dir", str(pw)]
    assert main(args) == 3  # one device has no password file: refused before starting
    assert "no password file for sim-00002" in capfd.readouterr().err
    (pw / ids[2]).write_text("wrong\n")  # a wrong password: that device alone stays out
    assert main(args) == 0, capfd.readouterr().err
    try:
        wait_until(lambda: launcher.status(home)["summary"]["connected"] == 2, 20)
        time.sleep(1.0)
        by = {d["device"]: d["connected"] for d in launcher.status(home)["device_status"]}
        assert by == {"sim-00000": True, "sim-00001": True, "sim-00002": False}
        (pw / ids[2]).write_text(users[ids[2]] + "\n")  # fixed: read again at restart
        launcher.chaos(home, "kill", devices=[ids[2]])
        launcher.chaos(home, "restart", devices=[ids[2]])
        wait_until(lambda: launcher.status(home)["summary"]["connected"] == 3, 20)
    finally:
        launcher.down(home)
