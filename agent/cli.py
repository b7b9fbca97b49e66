"""``tinyfleet-agent``: the device daemon's command line (argparse: no extra dependencies).

tinyfleet-agent run [--config PATH]            run the agent (systemd: Type=notify)
tinyfleet-agent check-config [--config PATH]   validate the configuration and exit
tinyfleet-agent status [--config PATH]         what is installed and committed on disk
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tinyfleet.agent.config import load_config
from tinyfleet.agent.errors import TinyfleetError


def _status(config_path: Path | None) -> dict[str, object]:
    from tinyfleet.agent.store import ModelStore

    cfg = load_config(config_path)
    state = cfg.paths.state_dir
    store = ModelStore(state / "models")
    cur = store.current()
    try:
        persisted = json.loads((state / "agent.json").read_text())
    except (OSError, ValueError):
        persisted = {}
    return {
        "device": cfg.device.id,
        "fleet": cfg.device.fleet,
        "state_dir": str(state),
        "active": None
        if cur is None
        else {"model": cur.label, "slot": cur.slot, "sha256": cur.artifact.sha256},
        "generation": persisted.get("generation"),
        "session": persisted.get("session"),
        "last_failure": persisted.get("failed"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyfleet-agent", description="tinyfleet device agent")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run the agent until SIGTERM"),
        ("check-config", "validate the configuration and exit"),
        ("status", "show what is installed on this device"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--config", type=Path, default=None, help="default /etc/tinyfleet/agent.toml"
        )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "check-config":
            cfg = load_config(args.config)
            cfg.broker_password()
            from tinyfleet.agent.manifest import load_public_key

            load_public_key(Path(cfg.security.host_public_key))
            print(
                f"ok: device {cfg.device.id} in fleet {cfg.device.fleet}, broker {cfg.broker.url}"
            )
            return 0
        if args.command == "status":
            print(json.dumps(_status(args.config), indent=2))
            return 0
        from tinyfleet.agent.daemon import run

        return run(load_config(args.config))
    except TinyfleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
