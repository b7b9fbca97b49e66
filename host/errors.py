"""Errors of the host toolchain.

Every error the CLI can end on is a ``TinyfleetError`` subclass with its own exit
code; ``EXIT_CODES`` is the table that docs/exit-codes.md documents and that a
test checks for completeness.
"""

from __future__ import annotations

from tinyfleet.agent.errors import (
    ConfigError,
    DigestMismatchError,
    DowngradeError,
    ExpiredManifestError,
    ManifestError,
    ModelFileError,
    RuntimeUnavailableError,
    SignatureError,
    TinyfleetError,
)
from tinyfleet.agent.fl.errors import (
    FLDataError,
    FLError,
    FLTimeoutError,
    FLTooFewNodesError,
    FLUnsupportedModel,
)
from tinyfleet.agent.labels import LabelError
from tinyfleet.agent.protocol.codec import ProtocolError
from tinyfleet.sim.errors import FleetSizeError, ScenarioError, SimControlError, SimStateError

__all__ = [
    "EXIT_CODES",
    "CalibrationError",
    "ConfigError",
    "DigestMismatchError",
    "DowngradeError",
    "ExpiredManifestError",
    "FLCohortError",
    "FLDataError",
    "FLError",
    "FLParentError",
    "FLRunFailedError",
    "FLTimeoutError",
    "FLTooFewNodesError",
    "FLUnsupportedModel",
    "GateRejectedError",
    "KeyError_",
    "LabelError",
    "ManifestError",
    "ModelFileError",
    "NotFoundError",
    "ProtocolError",
    "RecipeError",
    "RegistryError",
    "RolloutFailedError",
    "RuntimeUnavailableError",
    "SignatureError",
    "StorageError",
    "TinyfleetError",
    "UsageError",
]


class UsageError(TinyfleetError):
    """A command line argument is invalid."""

    exit_code = 2


class RecipeError(TinyfleetError):
    """A recipe is unknown or its declaration is invalid."""

    exit_code = 4


class CalibrationError(TinyfleetError):
    """Calibration or evaluation data does not fit the model (shape, dtype, count)."""

    exit_code = 7


class KeyError_(TinyfleetError):
    """The signing key is missing, unreadable or has unsafe permissions."""

    exit_code = 9


class StorageError(TinyfleetError):
    """The registry database is unreachable or the registry directory is unwritable."""

    exit_code = 10


class RegistryError(TinyfleetError):
    """A registry operation is not allowed (e.g. promoting a rejected version)."""

    exit_code = 11


class NotFoundError(RegistryError):
    """A model, version, alias or artifact does not exist."""

    exit_code = 12


class GateRejectedError(TinyfleetError):
    """A version failed its quality gates (it is registered as rejected)."""

    exit_code = 13


class RolloutFailedError(TinyfleetError):
    """A followed rollout ended without completing (rolled back, aborted or failed)."""

    exit_code = 20


class FLCohortError(TinyfleetError):
    """A federated run's cohort has too few eligible devices (the message says why each is out)."""

    exit_code = 45


class FLRunFailedError(TinyfleetError):
    """A followed federated run ended failed (the reason names the step)."""

    exit_code = 46


class FLParentError(TinyfleetError):
    """A federated run cannot start from its parent version (float model or data gone)."""

    exit_code = 47


# Exit code -> (name, help).  0 is success; 1 is an unexpected internal error.
EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("ok", "The command succeeded."),
    1: (
        "internal",
        "An unexpected internal error; the message says where, run with --debug for a traceback.",
    ),
    2: ("usage", UsageError.__doc__ or ""),
    3: ("config", ConfigError.__doc__ or ""),
    4: ("recipe", RecipeError.__doc__ or ""),
    5: ("model-file", ModelFileError.__doc__ or ""),
    6: ("runtime", RuntimeUnavailableError.__doc__ or ""),
    7: ("calibration", CalibrationError.__doc__ or ""),
    8: ("verification", ManifestError.__doc__ or ""),
    9: ("key", KeyError_.__doc__ or ""),
    10: ("storage", StorageError.__doc__ or ""),
    11: ("registry", RegistryError.__doc__ or ""),
    12: ("not-found", NotFoundError.__doc__ or ""),
    13: ("gate-rejected", GateRejectedError.__doc__ or ""),
    14: ("protocol", ProtocolError.__doc__ or ""),
    17: ("label", LabelError.__doc__ or ""),
    20: ("rollout-failed", RolloutFailedError.__doc__ or ""),
    40: ("fl-failed", FLError.__doc__ or ""),
    41: ("fl-unsupported-model", FLUnsupportedModel.__doc__ or ""),
    42: ("fl-data", FLDataError.__doc__ or ""),
    43: ("fl-too-few-nodes", FLTooFewNodesError.__doc__ or ""),
    44: ("fl-timeout", FLTimeoutError.__doc__ or ""),
    45: ("fl-cohort", FLCohortError.__doc__ or ""),
    46: ("fl-run-failed", FLRunFailedError.__doc__ or ""),
    47: ("fl-parent", FLParentError.__doc__ or ""),
    50: ("scenario", ScenarioError.__doc__ or ""),
    51: ("fleet-size", FleetSizeError.__doc__ or ""),
    52: ("sim-state", SimStateError.__doc__ or ""),
    53: ("sim-control", SimControlError.__doc__ or ""),
}
