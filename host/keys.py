"""The host's Ed25519 signing key: creation, safe loading and manifest signing.

Layout of a key directory (``<home>/keys`` by default)::

    host.key   PEM PKCS#8 private key, mode 0600 from creation on
    host.pub   PEM SubjectPublicKeyInfo public key (pinned on devices)
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from tinyfleet.agent.manifest import (
    Manifest,
    SignedManifest,
    canonical_bytes,
    key_id,
    public_key_bytes,
)
from tinyfleet.agent.protocol import DesiredState, SignedDesiredState, sign_desired
from tinyfleet.host.errors import KeyError_

__all__ = [
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "KeyPair",
    "SigningKey",
    "init_keys",
    "load_signing_key",
]

PRIVATE_KEY_FILE = "host.key"
PUBLIC_KEY_FILE = "host.pub"


@dataclass(frozen=True)
class KeyPair:
    """Where ``init_keys`` wrote a key pair, and the key's id."""

    private_path: Path
    public_path: Path
    key_id: str
    public_key_pem: str


class SigningKey:
    """An Ed25519 private key that signs manifests."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self._public = private_key.public_key()
        self._key_id = key_id(self._public)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public

    @property
    def public_key_pem(self) -> str:
        """The public key as PEM text (what a device pins)."""
        return self._public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    @property
    def public_key_b64(self) -> str:
        """The raw 32-byte public key in base64 (a one-line alternative to PEM)."""
        return base64.b64encode(public_key_bytes(self._public)).decode("ascii")

    @property
    def key_id(self) -> str:
        return self._key_id

    def sign_desired(self, desired: DesiredState) -> SignedDesiredState:
        """Sign a device's desired state (verified by the agent with the pinned key)."""
        return sign_desired(desired, self._key)

    def sign_manifest(self, manifest: Manifest) -> SignedManifest:
        """Sign ``canonical_bytes(manifest)``; the manifest must name this key's id."""
        if manifest.key_id != self._key_id:
            raise KeyError_(
                f"manifest names key {manifest.key_id} but this signing key is {self._key_id}"
            )
        signature = self._key.sign(canonical_bytes(manifest))
        return SignedManifest(
            manifest=manifest, signature=base64.b64encode(signature).decode("ascii")
        )

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key held in memory only (tests, ephemeral tools)."""
        return cls(Ed25519PrivateKey.generate())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file created with ``mode``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def init_keys(directory: Path, *, force: bool = False) -> KeyPair:
    """Create ``host.key`` (mode 0600 from creation) and ``host.pub`` in ``directory``.

    Refuses to replace an existing key unless ``force``.  Raises ``KeyError_``.
    """
    directory = Path(directory)
    private_path = directory / PRIVATE_KEY_FILE
    public_path = directory / PUBLIC_KEY_FILE
    if not force and (private_path.exists() or public_path.exists()):
        raise KeyError_(
            f"a signing key already exists in {directory}; replacing it orphans every "
            f"device that pins it (use --force to replace it anyway)"
        )
    private = Ed25519PrivateKey.generate()
    signer = SigningKey(private)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_new(private_path, pem, 0o600)
        _write_new(public_path, signer.public_key_pem.encode("ascii"), 0o644)
    except OSError as exc:
        raise KeyError_(f"cannot write the signing key in {directory}: {exc}") from exc
    return KeyPair(
        private_path=private_path,
        public_path=public_path,
        key_id=signer.key_id,
        public_key_pem=signer.public_key_pem,
    )


def load_signing_key(directory: Path) -> SigningKey:
    """Load ``host.key`` from ``directory``.

    Raises ``KeyError_`` if it is missing, unreadable, not an Ed25519 key, or
    accessible by group or others (POSIX).
    """
    path = Path(directory) / PRIVATE_KEY_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyError_(
            f"no signing key at {path}; run `tinyfleet keys init` to create one"
        ) from None
    except OSError as exc:
        raise KeyError_(f"cannot read signing key {path}: {exc.strerror or exc}") from exc
    if os.name == "posix" and st.st_mode & 0o077:
        raise KeyError_(
            f"signing key {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyError_(f"cannot read signing key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyError_(f"signing key {path} is not a valid unencrypted PEM key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_(f"signing key {path} is a {type(key).__name__}, not Ed25519")
    return SigningKey(key)
