"""Server side of federated retraining: SuperLink process, ServerApp, run API."""
