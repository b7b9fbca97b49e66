"""Federated runs without Flower: requests, cohort eligibility, CLI errors, fl in desired state.

Device rows are written the way the ingest writes them (presence, reported state);
versions are real registered versions; desired states are really signed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from agent_support import make_tflite, register_version
from sqlalchemy.orm import Session

from tinyfleet.agent.protocol import SignedDesiredState, Topics, verify_desired
from tinyfleet.agent.protocol.messages import FLSettings
from tinyfleet.host.cli import main
from tinyfleet.host.db.tables import DeviceRow, FLRunRow
from tinyfleet.host.errors import FLCohortError, UsageError
from tinyfleet.host.fl.coordinator import FLCoordinator
from tinyfleet.host.fleet.publish import DesiredPublisher
from tinyfleet.host.keys import init_keys, load_signing_key
from tinyfleet.host.registry import Registry
from tinyfleet.host.settings import HostSettings, load_settings

FLEET = "default"


class Recorder:
    """Where the publisher's MQTT link would be: records what would go out."""

    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        self.sent.append((topic, payload))
        return len(self.sent)


class World:
    def __init__(self, tmp: Path, tflite: Path) -> None:
        self.settings: HostSettings = load_settings(tmp / "home", environ={}, fleet=FLEET)
        init_keys(self.settings.keys_dir)
        self.signer = load_signing_key(self.settings.keys_dir)
        self.registry = Registry(self.settings.registry_dir)
        self.v1 = register_version(self.registry, self.signer, tflite)
        self.v2 = register_version(self.registry, self.signer, tflite.with_name("m2.tflite"))
        self.link = Recorder()
        self.desired = DesiredPublisher(
            self.link,  # type: ignore[arg-type]
            Topics(FLEET),
            self.signer,
            FLEET,
            self.registry.engine,
        )
        self.coord = FLCoordinator(self.settings, self.registry, desired=self.desired)

    def device(
        self,
        device: str,
        *,
        tags: tuple[str, ...] = ("line-a",),
        profile: str = "rpi4",
        online: bool = True,
        version: Any = "v1",
        revision: int = 2,
        samples: int | None = 100,
    ) -> None:
        v = getattr(self, version) if version else None
        with Session(self.registry.engine) as s, s.begin():
            now = datetime.now(UTC)
            row = DeviceRow(
                fleet=FLEET,
                device=device,
                profile=profile,
                tags=list(tags),
                groups=[],
                capabilities={"runtimes": ["litert"], "protocol_revision": revision},
                session=1,
                online=online,
                last_seen=now,
                reported={"fl": {"state": "disabled", "samples": samples, "restarts": 0}}
                if samples is not None
                else None,
                reported_generation=0,
                active_model=None if v is None else v.model,
                active_version=None if v is None else v.number,
                active_sha256=None if v is None else v.sha256,
                desired_generation=0,
                updated_at=now,
            )
            s.add(row)
            if v is not None:
                self.desired.assign(s, device, v.info, v.sha256)

    def stored(self, device: str) -> SignedDesiredState:
        with Session(self.registry.engine) as s:
            row = s.get(DeviceRow, (FLEET, device))
            assert row is not None and row.desired is not None
            return SignedDesiredState.model_validate(row.desired)


@pytest.fixture(scope="module")
def tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tflite(root / "m2.tflite", 2)
    return make_tflite(root / "m1.tflite", 1)


@pytest.fixture
def world(tmp_path: Path, tflite: Path) -> World:
    import shutil

    shutil.copy(tflite.with_name("m2.tflite"), tmp_path / "m2.tflite")
    shutil.copy(tflite, tmp_path / "m1.tflite")
    return World(tmp_path, tmp_path / "m1.tflite")


def cli(capfd: pytest.CaptureFixture[str], home: Path, *args: str) -> tuple[int, Any, str]:
    capfd.readouterr()
    code = main(["--home", str(home), *args])
    cap = capfd.readouterr()
    out: Any = json.loads(cap.out) if "--json" in args and cap.out.strip() else cap.out
    return code, out, cap.err


def test_bad_requests_end_with_one_clear_line(
    world: World, capfd: pytest.CaptureFixture[str]
) -> None:
    home = world.settings.home
    cases = [
        (["--cohort", "tag:line a"], 2, "cohort 'tag:line a': use tag:NAME"),
        (["--cohort", "shelf:x"], 2, "cohort 'shelf:x'"),
        (["--cohort", "tag:line-a", "--strategy", "fedsgd"], 2, "strategy: Input should be"),
        (["--cohort", "tag:line-a", "--rounds", "0"], 2, "rounds:"),
        (["--cohort", "tag:line-a", "--rounds", "101"], 2, "rounds:"),
        (["--cohort", "tag:line-a", "--strategy", "fedprox"], 2, "needs a proximal term"),
        (["--cohort", "tag:line-a", "--round-timeout", "0"], 2, "round_timeout_s:"),
        (["--cohort", "tag:line-a", "--model", "nope@1"], 12, "no model named 'nope'"),
        (["--cohort", "pump-404", "--model", "tiny@1"], 2, "no such device"),
    ]
    for args, code, text in cases:
        got, _, err = cli(capfd, home, "fl", "run", *args)
        assert got == code, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], (args, err)
        assert "Traceback" not in err


def test_cohort_too_small_fails_fast_naming_each_reason(
    world: World, capfd: pytest.CaptureFixture[str]
) -> None:
    world.device("ok-1")
    world.device("mcu-1", profile="cortex-m4")
    world.device("off-1", online=False)
    world.device("old-1", version="v2")
    world.device("rev-1", revision=1)
    world.device("few-1", samples=3)
    world.device("other-1", tags=("line-b",))
    code, _, err = cli(
        capfd, world.settings.home, "fl", "run", "-c", "tag:line-a", "--model", "tiny@1"
    )
    assert code == FLCohortError.exit_code == 45
    assert len(err.strip().splitlines()) == 1
    assert "1 eligible device(s), the run needs at least 2" in err
    for text in (
        "mcu-1: MCU-class device (cortex-m4) cannot train",
        "off-1: offline",
        "old-1: serves tiny@2, not tiny@1",
        "rev-1: agent speaks protocol revision 1",
        "few-1: 3 labelled samples < 32",
    ):
        assert text in err, text
    assert "other-1" not in err  # not in the cohort
    code, out, _ = cli(capfd, world.settings.home, "fl", "run", "-c", "tag:line-a", "--json")
    assert code == 45 and out["ok"] is False and out["error"]["name"] == "fl-cohort"
    assert world.coord.list_runs() == []  # nothing stored


def test_request_stores_a_run_and_busy_devices_are_excluded(
    world: World, capfd: pytest.CaptureFixture[str]
) -> None:
    for d in ("a-1", "a-2", "a-3"):
        world.device(d)
    world.device("mcu-1", profile="esp32-s3")
    home = world.settings.home
    code, out, err = cli(
        capfd,
        home,
        "fl",
        "run",
        "--cohort",
        "tag:line-a",
        "--rounds",
        "4",
        "--strategy",
        "fedmedian",
        "--min-clients",
        "3",
        "--json",
    )
    assert code == 0, err
    run = out["run"]
    assert run["state"] == "requested" and run["model"] == "tiny" and run["parent_version"] == 1
    assert run["devices"] == ["a-1", "a-2", "a-3"]
    assert run["excluded"] == {"mcu-1": "MCU-class device (esp32-s3) cannot train"}
    assert run["config"]["rounds"] == 4 and run["config"]["strategy"] == "fedmedian"
    assert run["cohort"] == ["tag:line-a"] and run["trigger"] == "manual"

    code, out, _ = cli(capfd, home, "fl", "list", "--json")
    assert code == 0 and [r["id"] for r in out["runs"]] == [run["id"]]
    code, out, _ = cli(capfd, home, "fl", "status", run["id"], "--json")
    assert code == 0 and out["run"]["devices"] == ["a-1", "a-2", "a-3"]
    code, _, err = cli(capfd, home, "fl", "status", "fl-nope")
    assert code == 12 and "no federated run fl-nope" in err
    code, text, _ = cli(capfd, home, "fl", "status", run["id"])
    assert code == 0 and "fedmedian, 4 rounds" in text and "[requested]" in text

    # the same devices cannot be in two runs at once
    with pytest.raises(FLCohortError, match=f"in federated run {run['id']}"):
        world.coord.request("tag:line-a", 2, "fedavg")
    # the retrain policy's trigger never raises
    assert world.coord.on_retrain("line-a", ["a-1", "a-2"]) is None


def test_parent_defaults_to_the_model_the_cohort_serves(world: World) -> None:
    world.device("b-1", version="v2", tags=("line-b",))
    world.device("b-2", version="v2", tags=("line-b",))
    world.device("b-3", version="v1", tags=("line-b",))
    rid = world.coord.request("tag:line-b", 2, "fedavg")  # b-3 is out: it serves tiny@1
    view = world.coord.view(rid)
    assert (view["model"], view["parent_version"], view["devices"]) == ("tiny", 2, ["b-1", "b-2"])
    assert view["excluded"] == {"b-3": "serves tiny@1, not tiny@2"}
    with Session(world.registry.engine) as s, s.begin():
        s.delete(s.get(FLRunRow, rid))

    from tinyfleet.host.fleet.retrain import CohortKey

    world.coord.options.retrain.update(rounds=7, strategy="krum")
    rid = world.coord.on_retrain(CohortKey("line-b", "tiny", 2), ["b-1"])
    assert rid is not None
    view = world.coord.view(rid)
    assert (view["model"], view["parent_version"], view["trigger"]) == ("tiny", 2, "policy")
    assert view["devices"] == ["b-1", "b-2"] and view["cohort"] == ["tag:line-b"]
    assert (view["config"]["rounds"], view["config"]["strategy"]) == (7, "krum")
    assert world.coord.on_retrain(CohortKey("line-b", "tiny", 2), ["b-1"]) is None  # busy
    with pytest.raises(UsageError, match="rounds"):
        world.coord.request("tag:line-b", 0, "fedavg")


def test_set_fl_keeps_the_model_and_rollouts_keep_fl(world: World) -> None:
    world.device("d-1")
    before = world.stored("d-1").desired
    fl = FLSettings(enabled=True, superlink="10.0.0.5:9092", run="fl-1", min_samples=50)
    with Session(world.registry.engine) as s, s.begin():
        gen, payload = world.desired.set_fl(s, "d-1", fl)
    signed = SignedDesiredState.model_validate_json(payload)
    desired = verify_desired(signed, world.signer.public_key, device="d-1")
    assert gen == desired.generation == before.generation + 1
    assert desired.model == before.model and desired.fl == fl and desired.rollout_id is None

    # a rollout (assign without fl) keeps the fl it finds
    with Session(world.registry.engine) as s, s.begin():
        world.desired.assign(s, "d-1", world.v2.info, world.v2.sha256, rollout_id="r-1")
    after = world.stored("d-1").desired
    assert after.model is not None and after.model.version == 2 and after.fl == fl
    # cleared: the model stays
    with Session(world.registry.engine) as s, s.begin():
        world.desired.set_fl(s, "d-1", None)
    cleared = world.stored("d-1").desired
    assert cleared.fl is None and cleared.model == after.model
    assert cleared.generation == after.generation + 1


def test_a_run_interrupted_by_a_restart_is_failed_and_fl_cleared(world: World) -> None:
    world.device("e-1")
    world.device("e-2")
    rid = world.coord.request(["e-1", "device:e-2"], 2, "fedavg")
    with Session(world.registry.engine) as s, s.begin():
        row = s.get(FLRunRow, rid)
        assert row is not None
        row.state = "training"
        for d in ("e-1", "e-2"):
            world.desired.set_fl(
                s, d, FLSettings(enabled=True, superlink="127.0.0.1:9092", run=rid)
            )
    assert world.coord.recover() == [rid]
    view = world.coord.view(rid)
    assert view["state"] == "failed" and view["finished_at"] is not None
    assert view["reason"] == "interrupted by a host restart while training"
    assert world.stored("e-1").desired.fl is None and world.stored("e-2").desired.fl is None
    topics = sorted(t for t, _ in world.link.sent)
    assert topics == [Topics(FLEET).desired("e-1"), Topics(FLEET).desired("e-2")]
    assert world.coord.recover() == []  # once


def test_a_run_whose_parent_model_is_gone_fails_with_the_reason(world: World) -> None:
    """The coordinator thread executes a requested run; the parent has no run folder."""
    world.device("f-1")
    world.device("f-2")
    rid = world.coord.request("tag:line-a", 2, "fedavg")
    world.coord.options = world.coord.options.model_copy(update={"poll_s": 0.05})
    world.coord.start()
    try:
        import time

        deadline = time.monotonic() + 20
        while world.coord.view(rid)["state"] not in ("failed", "registered", "rejected"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        world.coord.stop()
    view = world.coord.view(rid)
    assert view["state"] == "failed"
    assert view["reason"] == "enabling: tiny@1 names no run folder in its lineage"
    assert world.stored("f-1").desired.fl is None  # never enabled


def _register_with_run(world: World, tflite: Path, run_name: str) -> Any:
    """A version whose lineage names a run folder with a float Keras model and data."""

    import keras  # type: ignore[import-untyped]
    import numpy as np
    from agent_support import N_CLASSES, N_FEATURES, reference_inputs

    run = world.settings.runs_dir / run_name
    run.mkdir(parents=True)
    model = keras.Sequential(
        [
            keras.Input((N_FEATURES,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(N_CLASSES, activation="softmax"),
        ]
    )
    model.save(run / "model.keras")
    x, y = reference_inputs()
    np.savez(run / "data.npz", x_cal=x, x_val=x, y_val=y, x_eval=x, y_eval=y)
    return register_version(
        world.registry, world.signer, tflite, x=x, y=y, lineage={"run": run_name}
    )


def test_devices_that_never_start_a_supernode_fail_the_run_and_fl_is_cleared(
    world: World, tmp_path: Path
) -> None:
    """A real SuperLink is started; no device reports a running SuperNode in time."""
    import socket

    try:
        from tinyfleet.agent.fl.process import flower_command

        flower_command("flower-superlink")
    except Exception as exc:
        pytest.skip(f"Flower not available: {exc}")
    world.v3 = _register_with_run(world, tmp_path / "m1.tflite", "tiny-run")  # type: ignore[attr-defined]
    world.device("g-1", version="v3")
    world.device("g-2", version="v3")
    rid = world.coord.request("tag:line-a", 2, "fedavg", model="tiny@3", enable_timeout_s=1.0)
    assert world.coord.execute(rid) == "failed"
    view = world.coord.view(rid)
    assert view["reason"].startswith(
        "enabling: 0 device(s) started a SuperNode, the run needs 2; "
        "g-1: no running SuperNode reported within 1 s"
    ), view["reason"]
    # fl was set (with the SuperLink's address and the run), then cleared again
    host, _, port = view["superlink"].rpartition(":")
    sent = [SignedDesiredState.model_validate_json(p).desired for _, p in world.link.sent]
    assert [(d.device, d.fl is not None) for d in sent] == [
        ("g-1", True),
        ("g-2", True),
        ("g-1", False),
        ("g-2", False),
    ]
    assert (
        sent[0].fl is not None
        and sent[0].fl.run == rid
        and sent[0].fl.superlink == view["superlink"]
    )
    assert world.stored("g-1").desired.fl is None and world.stored("g-2").desired.fl is None
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=1):
        pass  # the SuperLink is gone
