"""The ``tinyfleet`` command line (host side)."""

from tinyfleet.host.cli.app import app, main

__all__ = ["app", "main"]
