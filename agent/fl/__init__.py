"""Device side of federated retraining: numpy trainer, SuperNode process, ClientApp.

Nothing here imports flwr at module level: ``clientapp`` is imported only inside
the ``flwr-clientapp`` process that Flower starts, and ``supernode`` only runs the
``flower-supernode`` command.
"""
