"""Fault injection for crash tests.

``TINYFLEET_AGENT_CRASH_AT=<point>`` makes the agent process exit abruptly
(``os._exit(137)``: no cleanup, like a power cut or SIGKILL) when it reaches that
point of an activation.  Unset in production; read at each point so a test can
arm it per process.
"""

from __future__ import annotations

import os

CRASH_POINTS = (
    "after_download",
    "after_verify",
    "mid_stage",
    "after_stage",
    "after_swap",
    "before_commit",
)


def crash_point(name: str) -> None:
    if os.environ.get("TINYFLEET_AGENT_CRASH_AT") == name:
        os._exit(137)
