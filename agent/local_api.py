"""Local inference for applications on the device: a Unix socket speaking JSON lines.

One request per line, one answer per line::

    {"op": "infer", "input": [[...], ...]}  -> {"ok": true, "label": 2, "confidence": 0.97,
                                                "probabilities": [...], "model": "vibration@3",
                                                "latency_ms": 0.4}
    {"op": "infer", "input": [...], "label": 2}
                                             -> the same, and the sample is stored as labelled
    {"op": "label", "input": [...], "label": 2}
                                             -> {"ok": true, "stored": 1, "samples": 812}
    {"op": "status"}                         -> {"ok": true, "status": {...reported state...}}
    anything else                            -> {"ok": false, "error": "..."}

``label`` stores a labelled sample (the features of ``input`` under the serving
version's pipeline, and the true class ``label``) in the device's label buffer for
federated retraining; nothing of it leaves the device.  ``samples`` is the number
of samples now in the buffer for that pipeline.

The socket is created with mode 0660 so that a service group can be given access;
requests larger than ``MAX_REQUEST`` bytes are refused.  The Python API is
``Agent.infer(raw)`` itself.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tinyfleet.agent.errors import TinyfleetError

if TYPE_CHECKING:
    from tinyfleet.agent.agent import Agent

MAX_REQUEST = 4 * 1024 * 1024


def handle_request(agent: Agent, line: bytes) -> dict[str, Any]:
    try:
        req = json.loads(line)
    except ValueError as exc:
        return {"ok": False, "error": f"not JSON: {exc}"}
    if not isinstance(req, dict):
        return {"ok": False, "error": "a request is a JSON object"}
    op = req.get("op")
    if op == "status":
        return {"ok": True, "status": agent.status()}
    if op not in ("infer", "label"):
        return {"ok": False, "error": f"unknown op {op!r}; use infer, label or status"}
    try:
        x = np.asarray(req.get("input"), dtype=np.float32)
    except (TypeError, ValueError) as exc:
        return {"ok": False, "error": f"input: {exc}"}
    if x.size == 0 or not np.all(np.isfinite(x)):
        return {"ok": False, "error": "input must be a non-empty array of finite numbers"}
    label = req.get("label")
    if op == "label" and label is None:
        return {"ok": False, "error": "label: required, the true class index (an integer >= 0)"}
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        return {"ok": False, "error": f"label: must be an integer class index; got {label!r}"}
    try:
        if op == "label":
            assert label is not None
            agent.add_label(x, label)
            serving = agent.serving
            preprocess = None if serving is None else serving.activated.content.manifest.preprocess
            return {"ok": True, "stored": 1, "samples": agent.labels.count(preprocess)}
        p = agent.infer(x, label=label)
    except TinyfleetError as exc:
        return {"ok": False, "error": str(exc)}
    except ValueError as exc:
        return {"ok": False, "error": f"input does not fit the model: {exc}"}
    return {
        "ok": True,
        "label": p.label,
        "confidence": p.confidence,
        "probabilities": [float(v) for v in p.probabilities],
        "model": p.model,
        "latency_ms": p.latency_ms,
    }


class LocalServer:
    """Serves ``handle_request`` on a Unix socket in a background thread."""

    def __init__(self, agent: Agent, path: Path, logger: logging.Logger | None = None) -> None:
        self.agent = agent
        self.path = path
        self.log = logger or logging.getLogger("tinyfleet.agent.local")
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    line = self.rfile.readline(MAX_REQUEST + 1)
                    if not line:
                        return
                    if len(line) > MAX_REQUEST:
                        answer: dict[str, Any] = {"ok": False, "error": "request too large"}
                        self.wfile.write(json.dumps(answer).encode() + b"\n")
                        return
                    answer = handle_request(outer.agent, line)
                    self.wfile.write(json.dumps(answer).encode() + b"\n")

        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self.server.daemon_threads = True
        os.chmod(path, 0o660)
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="local-api", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink(missing_ok=True)
