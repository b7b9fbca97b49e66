"""``tinyfleet-agent run``: the agent as a long-running service (systemd on a Raspberry Pi).

Stops cleanly on SIGTERM/SIGINT (offline presence, clean disconnect, spool
closed).  Under systemd with ``Type=notify`` it reports readiness and pings the
watchdog (``WATCHDOG_USEC``) from its timer loop, so a hung agent is restarted.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path

from tinyfleet.agent.agent import Agent
from tinyfleet.agent.config import AgentConfig
from tinyfleet.agent.drivers import ThreadDriver
from tinyfleet.agent.local_api import LocalServer
from tinyfleet.agent.manifest import load_public_key

TICK_S = 0.5


def sd_notify(message: str) -> bool:
    """Send a state line to systemd (no-op outside systemd)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


def run(config: AgentConfig, stop: threading.Event | None = None) -> int:
    """Run until ``stop`` is set or a termination signal arrives."""
    log = logging.getLogger(f"tinyfleet.agent.{config.device.id}")
    stop = stop or threading.Event()
    public_key = load_public_key(Path(config.security.host_public_key))
    agent = Agent(config, public_key=public_key, password=config.broker_password(), logger=log)
    driver = ThreadDriver(agent.link, name=f"agent-{config.device.id}")
    server = None
    if config.inference.socket is not None:
        server = LocalServer(agent, config.inference.socket, log.getChild("local"))
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    watchdog_s = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
    driver.start()
    if server is not None:
        server.start()
    sd_notify("READY=1")
    log.info(
        "agent %s started (fleet %s, profile %s)",
        config.device.id,
        config.device.fleet,
        agent.profile.name,
    )
    try:
        while not stop.wait(TICK_S):
            agent.tick()
            if watchdog_s:
                sd_notify("WATCHDOG=1")
    finally:
        sd_notify("STOPPING=1")
        if server is not None:
            server.stop()
        agent.close()
        driver.stop()
        log.info("agent %s stopped", config.device.id)
    return 0
