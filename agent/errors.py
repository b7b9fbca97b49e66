"""Errors of the device agent and of the code it shares with the host.

A small hierarchy: callers catch ``TinyfleetError`` at a boundary (a CLI command,
a daemon's message handler) and turn it into one clear line; nothing below that
boundary prints or exits.  Each class carries the process exit code that a
command line tool uses when the error ends it (documented in docs/exit-codes.md).
"""

from __future__ import annotations


class TinyfleetError(Exception):
    """Base of every error tinyfleet raises on purpose."""

    exit_code: int = 1


class ConfigError(TinyfleetError):
    """A configuration file, option or environment variable is invalid."""

    exit_code = 3


class ModelFileError(TinyfleetError):
    """A model file is missing, unreadable, corrupted or of an unsupported kind."""

    exit_code = 5


class RuntimeUnavailableError(TinyfleetError):
    """No inference runtime for this artifact format is installed."""

    exit_code = 6


class ManifestError(TinyfleetError):
    """A manifest or artifact failed verification."""

    exit_code = 8


class SignatureError(ManifestError):
    """A signature (manifest or desired state) does not match the pinned host key."""


class ExpiredManifestError(ManifestError):
    """The manifest's validity period is over (or has not begun)."""


class DigestMismatchError(ManifestError):
    """An artifact's bytes do not match the sha256 or size in the manifest."""


class DowngradeError(ManifestError):
    """A lower version was offered without an explicit, signed rollback."""
