"""A/B model store and atomic activation, with real LiteRT models and signed manifests."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from agent_support import Version, make_tflite, register_version

from tinyfleet.agent.activation import ActivationError, activate, activate_slot, reason_code
from tinyfleet.agent.errors import (
    DigestMismatchError,
    DowngradeError,
    ExpiredManifestError,
    SignatureError,
)
from tinyfleet.agent.faults import CRASH_POINTS
from tinyfleet.agent.runtime import load_model
from tinyfleet.agent.store import ModelStore


@pytest.fixture(scope="session")
def tflites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("tflite")
    return [make_tflite(d / f"m{seed}.tflite", seed) for seed in (1, 2, 3)]


@pytest.fixture
def versions(tmp_path: Path, tflites: list[Path], signing_key: Any) -> list[Version]:
    from tinyfleet.host.registry import Registry

    reg = Registry(tmp_path / "registry")
    return [register_version(reg, signing_key, p) for p in tflites]


def _activate(store: ModelStore, v: Version, key: Any, generation: int = 1, **kw: Any) -> Any:
    return activate(
        store,
        v.manifest_json,
        v.sha256,
        v.model_path,
        v.reference_path,
        public_key=key.public_key,
        generation=generation,
        loader=load_model,
        **kw,
    )


def test_activate_commit_and_switch_slots(
    tmp_path: Path, versions: list[Version], signing_key: Any
) -> None:
    store = ModelStore(tmp_path / "state")
    first = _activate(store, versions[0], signing_key)
    assert first.content.slot == "a" and store.current().artifact.sha256 == versions[0].sha256
    assert first.health.agreement == 1.0 and first.health.samples == 6
    second = _activate(store, versions[1], signing_key, generation=2, min_version=1)
    assert second.content.slot == "b"
    assert store.current().artifact.sha256 == versions[1].sha256
    assert store.previous().artifact.sha256 == versions[0].sha256  # rollback target kept
    assert store.find(versions[0].sha256).slot == "a"
    third = _activate(store, versions[2], signing_key, generation=3, min_version=2)
    assert third.content.slot == "a"  # replaces the non-current slot, never the current one
    assert store.previous().artifact.sha256 == versions[1].sha256


def test_refusals_leave_current_model(
    tmp_path: Path, versions: list[Version], signing_key: Any
) -> None:
    from tinyfleet.host.keys import SigningKey

    store = ModelStore(tmp_path / "state")
    _activate(store, versions[1], signing_key)
    cur = store.current()
    # wrong signature (another host's key is pinned)
    with pytest.raises(SignatureError):
        _activate(store, versions[2], SigningKey.generate())
    # downgrade without an explicit rollback
    with pytest.raises(DowngradeError) as exc:
        _activate(store, versions[0], signing_key, min_version=2)
    assert reason_code(exc.value) == "downgrade"
    # expired manifest
    with pytest.raises(ExpiredManifestError):
        _activate(store, versions[2], signing_key, now=datetime.now(UTC) + timedelta(days=400))
    # corrupted artifact bytes
    bad = tmp_path / "bad.tflite"
    data = bytearray(versions[2].model_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError):
        activate(
            store,
            versions[2].manifest_json,
            versions[2].sha256,
            bad,
            versions[2].reference_path,
            public_key=signing_key.public_key,
            generation=5,
            loader=load_model,
        )
    # tampered manifest JSON
    tampered = versions[2].manifest_json.replace(b'"version":3', b'"version":9')
    assert tampered != versions[2].manifest_json
    with pytest.raises(SignatureError):
        activate(
            store,
            tampered,
            versions[2].sha256,
            versions[2].model_path,
            versions[2].reference_path,
            public_key=signing_key.public_key,
            generation=6,
            loader=load_model,
        )
    after = store.current()
    assert (
        after is not None and after.artifact.sha256 == cur.artifact.sha256 and store.trial() is None
    )
    # explicit rollback is allowed
    rolled = _activate(
        store, versions[0], signing_key, generation=7, min_version=2, allow_rollback=True
    )
    assert rolled.content.manifest.version == 1


def test_health_check_failures(tmp_path: Path, tflites: list[Path], signing_key: Any) -> None:
    from tinyfleet.host.registry import Registry

    reg = Registry(tmp_path / "registry")
    good = register_version(reg, signing_key, tflites[0])
    slow = register_version(reg, signing_key, tflites[1], latency_budget_ms=0.0)
    wrong = register_version(reg, signing_key, tflites[2], corrupt_expected=True)
    store = ModelStore(tmp_path / "state")
    _activate(store, good, signing_key)
    for v, text in ((slow, "latency"), (wrong, "disagree")):
        with pytest.raises(ActivationError) as exc:
            _activate(store, v, signing_key, generation=2)
        assert exc.value.code == "health_check" and text in exc.value.message
        assert store.current().artifact.sha256 == good.sha256 and store.trial() is None


def test_corrupted_current_slot_falls_back(
    tmp_path: Path, versions: list[Version], signing_key: Any
) -> None:
    store = ModelStore(tmp_path / "state")
    _activate(store, versions[0], signing_key)
    _activate(store, versions[1], signing_key, generation=2)
    with open(store.current().model_path, "r+b") as f:
        f.seek(100)
        f.write(b"garbage")
    rec = ModelStore(tmp_path / "state").recover()
    assert rec.current is not None and rec.current.artifact.sha256 == versions[0].sha256
    assert any("failed verification" in p for p in rec.problems)


CRASH_SCRIPT = """
import sys
from pathlib import Path
from tinyfleet.agent.activation import activate
from tinyfleet.agent.manifest import load_public_key
from tinyfleet.agent.runtime import load_model
from tinyfleet.agent.store import ModelStore
state, manifest, sha, model, ref, pub = sys.argv[1:7]
activate(ModelStore(Path(state)), Path(manifest).read_bytes(), sha, Path(model), Path(ref),
         public_key=load_public_key(Path(pub)), generation=2, loader=load_model)
"""


@pytest.mark.parametrize("point", [p for p in CRASH_POINTS if p != "after_download"])
def test_crash_at_every_step_leaves_a_working_model(
    point: str, tmp_path: Path, versions: list[Version], signing_key: Any
) -> None:
    store = ModelStore(tmp_path / "state")
    _activate(store, versions[0], signing_key)
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(versions[1].manifest_json)
    pub = tmp_path / "host.pub"
    pub.write_text(signing_key.public_key_pem)
    env = {**os.environ, "TINYFLEET_AGENT_CRASH_AT": point}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CRASH_SCRIPT,
            str(tmp_path / "state"),
            str(manifest),
            versions[1].sha256,
            str(versions[1].model_path),
            str(versions[1].reference_path),
            str(pub),
        ],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    # restart: the committed model serves and loads
    store = ModelStore(tmp_path / "state")
    rec = store.recover()
    assert rec.current is not None
    assert rec.current.artifact.sha256 == versions[0].sha256  # nothing was committed
    model = load_model(rec.current.model_path, "tflite")
    assert model.predict(__import__("numpy").zeros((1, 8), "float32")).shape == (1, 3)
    model.close()
    # and converging again works
    again = _activate(store, versions[1], signing_key, generation=2, min_version=1)
    assert store.current().artifact.sha256 == versions[1].sha256 == again.content.artifact.sha256
    if point in ("after_swap", "before_commit"):
        assert rec.interrupted is not None and rec.interrupted.slot == again.content.slot


def test_activate_slot_reuses_staged_content(
    tmp_path: Path, versions: list[Version], signing_key: Any
) -> None:
    store = ModelStore(tmp_path / "state")
    _activate(store, versions[0], signing_key)
    _activate(store, versions[1], signing_key, generation=2)
    prev = store.previous()
    back = activate_slot(store, prev, generation=3, loader=load_model)
    assert store.current().artifact.sha256 == versions[0].sha256 == back.content.artifact.sha256
