"""Errors of the simulator (exit codes 50-54, documented in docs/exit-codes.md)."""

from __future__ import annotations

from tinyfleet.agent.errors import TinyfleetError

__all__ = ["FleetSizeError", "ScenarioError", "SimControlError", "SimStateError"]


class ScenarioError(TinyfleetError):
    """A simulator scenario file is malformed or impossible (the message names file, key, reason)."""

    exit_code = 50


class FleetSizeError(TinyfleetError):
    """The simulated fleet does not fit this machine (file descriptors or memory); figures given."""

    exit_code = 51


class SimStateError(TinyfleetError):
    """No simulator runs in this home (status, down, chaos), or one already does (up)."""

    exit_code = 52


class SimControlError(TinyfleetError):
    """A simulator worker did not answer on its control socket, or refused a command."""

    exit_code = 53
