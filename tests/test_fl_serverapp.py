"""The ServerApp's round logic on an in-process Grid: every strategy, deadlines, guards.

The Grid here answers with the real numpy trainer (what the ClientApp runs) in this
process, so each strategy's aggregation, the deadline, the non-finite filter and
the too-few-nodes failure are checked in seconds; test_fl_engine.py runs the same
ServerApp on a real SuperLink with real SuperNodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from tinyfleet.agent.fl.errors import FLTooFewNodesError
from tinyfleet.agent.fl.trainer import TrainConfig, evaluate, train
from tinyfleet.host.fl.config import FLJob, FLRunConfig
from tinyfleet.host.fl.serverapp import run_server, save_weights
from tinyfleet.host.fl.simdata import dense_weights, device_data, non_iid_probs

Client = Callable[[Message], Message | None]


class LocalGrid(Grid):
    """Delivers each pushed message to an in-process client; replies wait to be pulled."""

    def __init__(self, clients: dict[int, Client], delay: dict[int, float] | None = None) -> None:
        self.clients = clients
        self.delay = delay or {}
        self.pending: dict[str, tuple[float, Message | None]] = {}
        self.n = 0

    def set_run(self, run: Any) -> None:  # pragma: no cover
        pass

    @property
    def run(self) -> Any:  # pragma: no cover
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.clients)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            self.n += 1
            mid = f"m{self.n}"
            m.metadata.__dict__["_message_id"] = mid
            node = m.metadata.dst_node_id
            ready = time.monotonic() + self.delay.get(node, 0.0)
            self.pending[mid] = (ready, self.clients[node](m))
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = time.monotonic()
        out = []
        for mid in list(message_ids):
            ready, reply = self.pending.get(mid, (0.0, None))
            if reply is not None and ready <= now:
                out.append(reply)
                del self.pending[mid]
        return out

    def send_and_receive(  # pragma: no cover - the DeadlineGrid never calls it in fast mode
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError


def trainer_client(x: np.ndarray, y: np.ndarray, poison: bool = False) -> Client:
    def answer(msg: Message) -> Message:
        weights = msg.content.array_records["arrays"].to_numpy_ndarrays()
        cfg = msg.content.config_records["config"]
        res = train(
            weights,
            x,
            y,
            TrainConfig(
                epochs=int(cfg["local-epochs"]),
                seed=0,
                proximal_mu=float(cfg.get("proximal-mu", 0.0)),
            ),
        )
        out = res.weights
        if poison:
            out = [w.copy() for w in out]
            out[5][0, 0] = np.nan
        metrics = MetricRecord(
            {
                "num-examples": res.num_examples,
                "train-loss": res.loss,
                "train-acc": res.accuracy,
                "eval-acc": 0.5,
                "compute-s": 0.01,
            }
        )
        return Message(RecordDict({"arrays": ArrayRecord(out), "metrics": metrics}), reply_to=msg)  # type: ignore[arg-type]

    return answer


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[list[np.ndarray], dict[int, Any], Path]:
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0
    devs = [device_data(f"s-{i}", 160, 3, class_probs=non_iid_probs(i)) for i in range(4)]
    val = device_data("s-val", 200, 4)
    w0 = dense_weights(np.concatenate([d.x for d in devs]), seed=0)
    np.savez(tmp_path / "val.npz", x=val.x, y=val.y)
    save_weights(tmp_path / "w0.npz", w0)
    return w0, {10 + i: d for i, d in enumerate(devs)}, tmp_path


def _job(tmp: Path, **cfg: Any) -> FLJob:
    return FLJob(
        config=FLRunConfig(**cfg),
        initial_weights=str(tmp / "w0.npz"),
        validation=str(tmp / "val.npz"),
        output=str(tmp / "out"),
    )


@pytest.mark.parametrize(
    "strategy",
    [
        {"strategy": "fedavg"},
        {"strategy": "fedprox", "proximal_mu": 0.05},
        {"strategy": "fedmedian"},
        {"strategy": "krum", "krum_malicious": 1},
    ],
)
def test_every_strategy_learns_and_drops_a_nan_update(setup: Any, strategy: dict[str, Any]) -> None:
    _, devs, tmp = setup
    clients = {n: trainer_client(d.x, d.y, poison=(n == 13)) for n, d in devs.items()}
    (tmp / "out").mkdir()
    res = run_server(
        LocalGrid(clients), _job(tmp, rounds=2, min_clients=4, local_epochs=2, **strategy), run_id=7
    )
    assert res.ok and res.run_id == 7 and len(res.rounds) == 2
    for r in res.rounds:
        assert r.sampled == [10, 11, 12, 13] and sorted(r.aggregated) == [10, 11, 12]
        assert [(d.node, d.reason) for d in r.dropped] == [(13, "non-finite update (NaN or inf)")]
        assert r.val_acc is not None and not r.timed_out
    assert (res.rounds[-1].val_acc or 0) > (res.initial_val_acc or 0) + 0.2
    assert res.nodes == [10, 11, 12] and Path(res.weights_file or "").exists()


def test_deadline_aggregates_what_arrived_and_rests_the_straggler(setup: Any) -> None:
    _, devs, tmp = setup
    clients = {n: trainer_client(d.x, d.y) for n, d in devs.items()}
    grid = LocalGrid(clients, delay={12: 60.0})
    (tmp / "out").mkdir()
    t0 = time.monotonic()
    res = run_server(grid, _job(tmp, rounds=2, min_clients=3, round_timeout_s=0.5), run_id=1)
    assert time.monotonic() - t0 < 5
    first, second = res.rounds
    assert first.timed_out and 0.5 <= first.wall_s < 2.0
    assert [(d.node, d.reason) for d in first.dropped] == [
        (12, "no reply within the round timeout (0.5 s)")
    ]
    assert sorted(first.aggregated) == [10, 11, 13]
    assert 12 not in second.sampled and not second.timed_out


def test_too_few_nodes_and_no_updates(setup: Any) -> None:
    w0, devs, tmp = setup
    clients = {n: trainer_client(d.x, d.y, poison=True) for n, d in devs.items()}
    (tmp / "out").mkdir()
    t0 = time.monotonic()
    with pytest.raises(FLTooFewNodesError, match=r"only 4 node\(s\) connected within 0.3 s"):
        run_server(LocalGrid(clients), _job(tmp, min_clients=6, node_wait_s=0.3), run_id=1)
    assert time.monotonic() - t0 < 3
    with pytest.raises(Exception, match=r"no round aggregated any update .*non-finite"):
        run_server(LocalGrid(clients), _job(tmp, rounds=1, min_clients=2), run_id=1)
    before = evaluate(w0, devs[10].x, devs[10].y)  # the initial weights were never replaced
    assert np.isfinite(before[0])


def test_max_samples_reaches_the_clients_which_train_on_their_newest_samples(
    setup: Any, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from flwr.app import ConfigRecord

    from tinyfleet.agent.fl.clientapp import _load
    from tinyfleet.agent.labels import LabelBuffer

    _, devs, tmp = setup
    seen: list[Any] = []
    clients = {n: trainer_client(d.x, d.y) for n, d in devs.items()}

    def recording(client: Client) -> Client:
        def answer(msg: Message) -> Message | None:
            seen.append(dict(msg.content.config_records["config"]))
            return client(msg)

        return answer

    (tmp / "out").mkdir()
    grid = LocalGrid({n: recording(c) for n, c in clients.items()})
    run_server(grid, _job(tmp, rounds=1, min_clients=4, max_samples=7), run_id=1)
    assert seen and all(cfg["max-samples"] == 7 for cfg in seen)

    # the ClientApp's loader keeps the newest samples of the label buffer
    buf = LabelBuffer(tmp_path / "labels.db")
    for i in range(20):
        buf.add(np.full(3, float(i), dtype=np.float32), i % 2, preprocess="p", model="m@1")
    buf.close()
    node = SimpleNamespace(node_config={"data-path": str(tmp_path / "labels.db")})
    x, y = _load(node, ConfigRecord({"max-samples": 7, "preprocess": "p"}), 1)  # type: ignore[arg-type]
    assert x[:, 0].tolist() == [float(i) for i in range(13, 20)] and len(y) == 7
    x, _ = _load(node, ConfigRecord({"preprocess": "p"}), 1)  # type: ignore[arg-type]
    assert len(x) == 20
