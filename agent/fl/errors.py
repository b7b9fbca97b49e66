"""Errors of federated training (exit codes 40-44, see docs/exit-codes.md).

Defined on the agent side because the device's trainer and SuperNode raise them;
the host re-exports them from ``tinyfleet.host.errors``.
"""

from __future__ import annotations

from tinyfleet.agent.errors import TinyfleetError

__all__ = ["FLDataError", "FLError", "FLTimeoutError", "FLTooFewNodesError", "FLUnsupportedModel"]


class FLError(TinyfleetError):
    """A federated run failed (SuperLink, SuperNode, ServerApp or run status)."""

    exit_code = 40


class FLUnsupportedModel(FLError):
    """The model's architecture cannot be trained federatedly by the device trainer."""

    exit_code = 41


class FLDataError(FLError):
    """A node's labelled training data is missing, unreadable, malformed or too small."""

    exit_code = 42


class FLTooFewNodesError(FLError):
    """Fewer nodes than the run's minimum were connected within the wait."""

    exit_code = 43


class FLTimeoutError(FLError):
    """A federated run, SuperLink or SuperNode did not finish or start in time."""

    exit_code = 44
