"""The model pipeline end to end through the ``tinyfleet`` command (small configurations)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tinyfleet.host.cli import main


def run(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    """Run the CLI with pytest capturing file descriptors (the JSON goes to fd 1)."""
    capfd.readouterr()  # drop output of earlier steps
    code = main([*args])
    cap = capfd.readouterr()
    out: Any = cap.out
    if "--json" in args and cap.out.strip():
        out = json.loads(cap.out)
    return code, out, cap.err


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    h = tmp_path_factory.mktemp("home")
    assert main(["--home", str(h), "keys", "init"]) == 0
    return h


@pytest.fixture(scope="module")
def digits(home: Path) -> dict[str, Any]:
    out = home / "digits.json"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    saved = os.dup(1)
    os.dup2(fd, 1)
    try:
        code = main(["--home", str(home), "pipeline", "digits", "--small", "--json", "-q"])
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(fd)
    assert code == 0, out.read_text()
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _by(result: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(a["format"], a["precision"]): a for a in result["artifacts"]}


def test_digits_artifacts_meet_targets(digits: dict[str, Any]) -> None:
    assert digits["ok"] and digits["passed"] and digits["version"]["status"] == "ready"
    arts = _by(digits)
    assert set(arts) == {
        ("tflite", "float32"),
        ("tflite", "int8"),
        ("onnx", "float32"),
        ("onnx", "int8"),
    }
    for a in arts.values():
        for key in ("format", "precision", "accuracy", "bytes", "latency_p50_ms", "latency_p99_ms"):
            assert a[key] is not None
    f32, i8 = arts[("tflite", "float32")], arts[("tflite", "int8")]
    assert abs(f32["accuracy"] - i8["accuracy"]) <= 0.010
    assert i8["bytes"] <= 0.30 * f32["bytes"]
    o32, o8 = arts[("onnx", "float32")], arts[("onnx", "int8")]
    assert abs(o32["accuracy"] - o8["accuracy"]) <= 0.015
    assert i8["arena_bytes"] > 0 and f32["arena_bytes"] is None
    fits = {f["profile"]: f for f in i8["fits"]}
    assert fits["cortex-m4"]["fits"] and fits["cortex-m4"]["latency_is_estimate"]


def test_reported_arena_allocates_and_2k_less_does_not(digits: dict[str, Any]) -> None:
    from tinyfleet.sim.mcu import arena_allocates

    i8 = _by(digits)[("tflite", "int8")]
    data = Path(i8["path"]).read_bytes()
    assert arena_allocates(data, i8["arena_bytes"])
    assert not arena_allocates(data, i8["arena_bytes"] - 2048)


def test_vibration_int8_on_held_out_devices(home: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capfd, "--home", str(home), "pipeline", "vibration", "--small", "--json", "-q"
    )
    assert code == 0, out
    i8 = _by(out)[("tflite", "int8")]
    assert i8["accuracy"] >= 0.95
    lineage = out["version"]["lineage"]
    assert (
        lineage["recipe"] == "vibration" and lineage["data_fingerprint"] == out["data_fingerprint"]
    )
    assert lineage["quantization"]["tflite-int8"]["inference_input_type"] == "int8"
    assert lineage["code_version"] and lineage["seed"] == out["seed"]

    # the drift reference profile: the model's features, then the sensor stats of the
    # validation windows (what the features do not see: per-axis mean, running speed)
    from tinyfleet.agent import drift
    from tinyfleet.agent.drift import ReferenceBundle
    from tinyfleet.agent.features import FEATURE_NAMES, VIBRATION_MONITOR_NAMES
    from tinyfleet.host.registry import Registry
    from tinyfleet.host.settings import load_settings

    settings = load_settings(home, environ={})
    registry = Registry(settings.registry_dir, settings.database_url)
    info = registry.get(f"vibration@{out['version']['number']}")
    bundle = ReferenceBundle.from_bytes(registry.blob_path(info.reference.sha256).read_bytes())
    profile = bundle.profile
    assert profile.monitor == "vibration-v1" and profile.n_inputs == len(FEATURE_NAMES)
    names = [f.name for f in profile.features]
    assert names == FEATURE_NAMES + VIBRATION_MONITOR_NAMES
    inner = profile.features[-1].edges[drift.TAIL_EDGES : -drift.TAIL_EDGES]
    # the validation fleet runs at 22-30 Hz: the speed's quantile edges lie there
    assert 20.0 < inner[0] < inner[-1] < 32.0
    assert len(profile.features[0].edges) == drift.DEFAULT_BINS - 1  # no tails on features
    data = np.load(Path(out["run"]) / "data.npz")
    assert data["m_val"].shape == (len(data["x_val"]), len(VIBRATION_MONITOR_NAMES))
    assert data["m_eval"].shape == (len(data["x_eval"]), len(VIBRATION_MONITOR_NAMES))


def test_registry_commands(
    home: Path, digits: dict[str, Any], capfd: pytest.CaptureFixture[str]
) -> None:
    h = ["--home", str(home)]
    code, out, _ = run(capfd, *h, "models", "list", "--json")
    assert code == 0 and any(v["model"] == "digits" for v in out["versions"])
    ref = f"digits@{digits['version']['number']}"
    code, out, _ = run(capfd, *h, "models", "show", ref, "--json")
    assert code == 0 and out["version"]["manifest"]["signature"]
    code, out, _ = run(capfd, *h, "models", "promote", ref, "production", "--json")
    assert code == 0
    code, out, _ = run(capfd, *h, "models", "verify", "digits@production", "--json")
    assert code == 0 and out["verify"]["ok"]
    code, out, _ = run(capfd, *h, "models", "show", "digits@99", "--json")
    assert code == 12 and out["error"]["name"] == "not-found"
    code, text, _ = run(capfd, *h, "models", "list")
    assert code == 0 and ref in text


def test_tampered_artifact_manifest_expired_refused(
    home: Path, digits: dict[str, Any], capfd: pytest.CaptureFixture[str]
) -> None:
    ref = f"digits@{digits['version']['number']}"
    blob = next((home / "registry" / "blobs").rglob(_by(digits)[("tflite", "int8")]["sha256"]))
    original = blob.read_bytes()
    os.chmod(blob, 0o644)
    try:
        blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        code, _, err = run(capfd, "--home", str(home), "models", "verify", ref)
        assert (code == 8 and "sha256" in err.lower()) or "digest" in err.lower()
    finally:
        blob.write_bytes(original)
    assert run(capfd, "--home", str(home), "models", "verify", ref)[0] == 0
    db = home / "registry" / "registry.db"
    con = sqlite3.connect(db)
    (manifest,) = con.execute(
        "SELECT v.manifest FROM versions v JOIN models m ON m.id = v.model_id "
        "WHERE m.name = 'digits' AND v.number = ?",
        (digits["version"]["number"],),
    ).fetchone()
    doc = json.loads(manifest)
    tampered = json.loads(manifest)
    tampered["manifest"]["classes"][0] = "zero"
    con.execute(
        "UPDATE versions SET manifest = ? WHERE manifest = ?", (json.dumps(tampered), manifest)
    )
    con.commit()
    try:
        code, _, err = run(capfd, "--home", str(home), "models", "verify", ref)
        assert code == 8 and "signature" in err.lower()
    finally:
        con.execute(
            "UPDATE versions SET manifest = ? WHERE manifest = ?",
            (json.dumps(doc), json.dumps(tampered)),
        )
        con.commit()
        con.close()


def test_bring_your_own_model(
    tmp_path: Path, home: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from agent_support import make_tflite, reference_inputs

    tflite = make_tflite(tmp_path / "mine.tflite", 5)
    x, y = reference_inputs(1, 200)
    np.save(tmp_path / "cal.npy", x[:100])
    np.save(tmp_path / "x.npy", x[100:])
    np.save(tmp_path / "y.npy", y[100:])
    h = ["--home", str(home)]
    code, out, _ = run(
        capfd,
        *h,
        "models",
        "import",
        str(tflite),
        "--name",
        "mine",
        "--calibration",
        str(tmp_path / "cal.npy"),
        "--eval",
        str(tmp_path / "x.npy"),
        str(tmp_path / "y.npy"),
        "--json",
        "-q",
    )
    assert code == 0, out
    assert out["version"]["model"] == "mine" and out["artifacts"][0]["accuracy"] is not None
    # wrong calibration shape: one clear line, exit 7, nothing registered
    np.save(tmp_path / "bad.npy", np.zeros((10, 5), np.float32))
    code, _, err = run(
        capfd,
        *h,
        "models",
        "import",
        str(tflite),
        "--name",
        "mine",
        "--calibration",
        str(tmp_path / "bad.npy"),
        "-q",
    )
    assert code == 7 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # corrupted model file: exit 5
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 4 + b"TFL3" + os.urandom(200))
    code, _, err = run(
        capfd,
        *h,
        "models",
        "import",
        str(junk),
        "--name",
        "junk",
        "--calibration",
        str(tmp_path / "cal.npy"),
        "-q",
    )
    assert code == 5 and "Traceback" not in err
    code, out, _ = run(capfd, *h, "models", "list", "junk", "--json")
    assert code == 12 and out["error"]["name"] == "not-found"  # nothing was registered


def test_gate_failure_registers_rejected_and_cannot_be_promoted(
    home: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    h = ["--home", str(home)]
    code, out, _ = run(
        capfd,
        *h,
        "pipeline",
        "vibration",
        "--small",
        "--set",
        "gates.max_bytes=100",
        "--json",
        "-q",
    )
    assert code == 13 and out["passed"] is False
    ref = f"vibration@{out['version']['number']}"
    assert out["version"]["status"] == "rejected"
    assert any("max_bytes" in r for r in out["version"]["rejection_reasons"])
    code, out, err = run(capfd, *h, "models", "promote", ref, "production")
    assert code == 11 and "rejected" in err


def test_missing_key_and_unwritable_home(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capfd, "--home", str(tmp_path / "nokeys"), "pipeline", "digits", "--small", "-q"
    )
    assert code == 9 and "keys init" in err
    ro = tmp_path / "ro"
    ro.write_text("a file, not a folder")
    code, _, err = run(capfd, "--home", str(ro), "models", "list")
    assert code == 10 and "Traceback" not in err
    code, _, err = run(
        capfd, "--home", str(tmp_path), "--db", "postgresql://u@127.0.0.1:1/x", "models", "list"
    )
    assert code == 10 and "127.0.0.1:1" in err
