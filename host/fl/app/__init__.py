"""The Flower App folder (``pyproject.toml`` only): ``flwr run`` packs it into the FAB.

Its components are importable modules of the installed tinyfleet package, so the
FAB carries no code: ``tinyfleet.host.fl.serverapp:app`` and
``tinyfleet.agent.fl.clientapp:app``.
"""
