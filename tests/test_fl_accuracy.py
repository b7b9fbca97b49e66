"""Federated retraining of a drifted cohort vs a centralised retrain on the pooled data.

Slow (a real SuperLink and four SuperNodes for six rounds); ``python -m bench fl``
runs the eight-device version and reports the figures.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from bench.fl import ACC_EPOCHS, BATCH, LR, _start_fleet, cohort, parent_weights
from tinyfleet.agent.fl.trainer import TrainConfig, evaluate, train
from tinyfleet.host.fl.run import FLRunConfig, run_federated


@pytest.mark.slow
def test_federated_within_two_points_of_centralised(tmp_path: Path) -> None:
    rounds, n = 6, 4
    parent = parent_weights()
    bufs, held = cohort(n)
    link, nodes = _start_fleet(tmp_path, bufs, 0.2)
    try:
        cfg = FLRunConfig(
            rounds=rounds,
            min_clients=n,
            local_epochs=ACC_EPOCHS,
            batch_size=BATCH,
            learning_rate=LR,
            round_timeout_s=120,
        )
        res = run_federated(link, cfg, parent, (held.x, held.y), tmp_path / "run")
    finally:
        stops = [threading.Thread(target=node.stop) for node in nodes]
        for t in stops:
            t.start()
        for t in stops:
            t.join()
        link.stop()
    x = np.concatenate([d.x for d in bufs])
    y = np.concatenate([d.y for d in bufs])
    central = train(
        parent,
        x,
        y,
        TrainConfig(epochs=rounds * ACC_EPOCHS, batch_size=BATCH, learning_rate=LR, seed=1),
    ).weights
    before = evaluate(parent, held.x, held.y)[1]
    fed = evaluate(res.weights, held.x, held.y)[1]
    cen = evaluate(central, held.x, held.y)[1]
    assert cen > before + 0.05  # the drift hurt the parent and retraining fixes it
    assert fed >= cen - 0.02
    assert not res.dropped and len(res.nodes) == n
