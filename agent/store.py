"""The agent's model store: two slots on disk and a crash-safe activation journal.

Layout under ``<state>/models``::

    slots/a/ , slots/b/     model, reference.json, manifest.json (signed), meta.json
    CURRENT                 committed slot: what serves after any restart
    TRIAL                   an activation in progress: slot, generation, attempts
    staging/                downloads in progress (see transfer.py)

Activation writes the new version into the slot that is *not* current (a
temporary folder, fsync, rename), records a TRIAL, loads and health-checks it,
and only then replaces CURRENT (write to a temporary file, fsync, rename, fsync
folder).  A crash at any point leaves CURRENT naming a complete, verified slot:
on start, ``recover()`` drops an unfinished TRIAL, so the previous model serves
and the agent converges again.  Two slots are also what a future shadow
(challenger) model needs: the store can hand out either slot's content.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyfleet.agent.errors import ManifestError
from tinyfleet.agent.faults import crash_point
from tinyfleet.agent.manifest import (
    Manifest,
    ManifestArtifact,
    SignedManifest,
    digest,
    parse_signed_manifest,
    verify_artifact,
)

SLOTS = ("a", "b")
MODEL_FILE = "model"
REFERENCE_FILE = "reference.json"
MANIFEST_FILE = "manifest.json"
META_FILE = "meta.json"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _copy_synced(src: Path, dst: Path) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1024 * 1024)
        fo.flush()
        os.fsync(fo.fileno())


@dataclass(frozen=True)
class SlotContent:
    """A complete slot: a verified model and its reference bundle."""

    slot: str
    signed: SignedManifest
    artifact: ManifestArtifact
    path: Path

    @property
    def manifest(self) -> Manifest:
        return self.signed.manifest

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def reference_path(self) -> Path:
        return self.path / REFERENCE_FILE

    @property
    def label(self) -> str:
        return f"{self.manifest.model}@{self.manifest.version}"


@dataclass(frozen=True)
class Trial:
    slot: str
    generation: int
    sha256: str
    attempts: int


@dataclass(frozen=True)
class Recovery:
    """What ``recover()`` found at start-up."""

    interrupted: Trial | None
    current: SlotContent | None
    problems: list[str]


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.slots_dir = root / "slots"
        self.staging_dir = root / "staging"
        for d in (self.slots_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ reading

    def _read_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None

    def read_slot(self, slot: str, *, check_digest: bool = True) -> SlotContent | None:
        """The slot's content if it is complete and its model matches its manifest."""
        path = self.slots_dir / slot
        meta = self._read_json(path / META_FILE)
        if not isinstance(meta, dict):
            return None
        try:
            signed = parse_signed_manifest((path / MANIFEST_FILE).read_bytes())
            artifact = next(a for a in signed.manifest.artifacts if a.sha256 == meta.get("sha256"))
            if check_digest:
                verify_artifact(artifact, path / MODEL_FILE)
                ref_sha, ref_size = digest(path / REFERENCE_FILE)
                ref = signed.manifest.reference
                if (ref_sha, ref_size) != (ref.sha256, ref.size):
                    return None
        except (OSError, StopIteration, ManifestError):
            return None
        return SlotContent(slot=slot, signed=signed, artifact=artifact, path=path)

    def current_slot_name(self) -> str | None:
        cur = self._read_json(self.root / "CURRENT")
        if isinstance(cur, dict) and cur.get("slot") in SLOTS:
            return str(cur["slot"])
        return None

    def current(self) -> SlotContent | None:
        name = self.current_slot_name()
        return None if name is None else self.read_slot(name)

    def other(self, slot: str | None) -> str:
        return "b" if slot == "a" else "a"

    def previous(self) -> SlotContent | None:
        """The non-current slot if it holds a complete, verified model (rollback target)."""
        return self.read_slot(self.other(self.current_slot_name()))

    def find(self, sha256: str) -> SlotContent | None:
        """A slot that already holds this artifact (no download needed)."""
        for slot in SLOTS:
            meta = self._read_json(self.slots_dir / slot / META_FILE)
            if isinstance(meta, dict) and meta.get("sha256") == sha256:
                content = self.read_slot(slot)
                if content is not None:
                    return content
        return None

    def trial(self) -> Trial | None:
        t = self._read_json(self.root / "TRIAL")
        if not isinstance(t, dict):
            return None
        try:
            return Trial(str(t["slot"]), int(t["generation"]), str(t["sha256"]), int(t["attempts"]))
        except (KeyError, TypeError, ValueError):
            return None

    # ------------------------------------------------------------------ writing

    def stage(
        self, signed_manifest: bytes, artifact: ManifestArtifact, model: Path, reference: Path
    ) -> SlotContent:
        """Write a verified model into the non-current slot, atomically."""
        slot = self.other(self.current_slot_name())
        final = self.slots_dir / slot
        tmp = self.slots_dir / f".{slot}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _copy_synced(model, tmp / MODEL_FILE)
        _copy_synced(reference, tmp / REFERENCE_FILE)
        (tmp / MANIFEST_FILE).write_bytes(signed_manifest)
        meta = {"sha256": artifact.sha256, "staged_at": time.time()}
        (tmp / META_FILE).write_text(json.dumps(meta))
        for name in (MANIFEST_FILE, META_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        crash_point("mid_stage")
        # The old content of this slot is not current (CURRENT names the other one), so
        # replacing it can't leave the device without a model.
        old = self.slots_dir / f".{slot}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(self.slots_dir)
        shutil.rmtree(old, ignore_errors=True)
        content = self.read_slot(slot)
        if content is None:
            raise ManifestError(f"slot {slot}: staged content failed verification")
        return content

    def begin_trial(self, slot: str, generation: int, sha256: str) -> Trial:
        prior = self.trial()
        attempts = 1
        if prior is not None and prior.sha256 == sha256 and prior.generation == generation:
            attempts = prior.attempts + 1
        t = Trial(slot, generation, sha256, attempts)
        write_atomic(self.root / "TRIAL", json.dumps(t.__dict__).encode())
        return t

    def commit(self, content: SlotContent) -> None:
        """Make ``content`` the model that serves after any restart."""
        record = {
            "slot": content.slot,
            "model": content.manifest.model,
            "version": content.manifest.version,
            "sha256": content.artifact.sha256,
            "committed_at": time.time(),
        }
        write_atomic(self.root / "CURRENT", json.dumps(record).encode())
        self.end_trial()

    def end_trial(self) -> None:
        try:
            (self.root / "TRIAL").unlink()
            fsync_dir(self.root)
        except FileNotFoundError:
            pass

    def recover(self) -> Recovery:
        """At start-up: drop an interrupted activation and check the committed slot."""
        problems: list[str] = []
        interrupted = self.trial()
        if interrupted is not None:
            problems.append(
                f"activation of {interrupted.sha256[:12]} in slot {interrupted.slot} was interrupted "
                f"(attempt {interrupted.attempts}); previous model restored"
            )
        for leftover in self.slots_dir.glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True)
        name = self.current_slot_name()
        current = None if name is None else self.read_slot(name)
        if name is not None and current is None:
            problems.append(f"committed slot {name} failed verification")
            fallback = self.read_slot(self.other(name))
            if fallback is not None:
                self.commit(fallback)
                current = fallback
                problems.append(f"fell back to slot {fallback.slot} ({fallback.label})")
        return Recovery(interrupted=interrupted, current=current, problems=problems)
