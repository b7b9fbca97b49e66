"""The ServerApp: federated rounds with a Flower strategy, deadlines and guarded aggregation.

Runs inside the ``flwr-serverapp`` process the SuperLink starts.  Reads the job
file named by the run config (``job``), then:

* waits up to ``node_wait_s`` for ``min_clients`` connected nodes before each round
  and fails fast with a clear reason when they do not come;
* samples ``fraction_fit`` of the connected nodes (at least ``min_clients``);
* pushes the round and polls for replies every ``poll_interval_s`` until all are in
  or ``round_timeout_s`` is over (``DeadlineGrid``); late replies are ignored;
* drops error replies (the node's reason is kept) and updates with a non-finite
  value, then aggregates the rest with the chosen strategy (FedAvg, FedProx,
  FedMedian, Krum from ``flwr.serverapp.strategy``);
* evaluates the aggregated weights on the host's validation set (numpy forward);
* writes ``result.json`` and ``weights.npz`` to the job's output folder.
"""

from __future__ import annotations

import json
import random
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.app import RecordDict as FlwrRecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, Krum

from tinyfleet.agent.fl.errors import FLError, FLTooFewNodesError
from tinyfleet.agent.fl.trainer import evaluate
from tinyfleet.host.fl.config import (
    DroppedUpdate,
    FLJob,
    FLResultFile,
    FLRunConfig,
    NodeRound,
    RoundMetrics,
)

__all__ = ["DeadlineGrid", "app", "load_weights", "run_server", "save_weights"]

app = ServerApp()


def save_weights(path: Path, weights: list[np.ndarray]) -> Path:
    """Weights as ``.npz`` with keys ``w0``, ``w1``… (order kept)."""
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays: dict[str, Any] = {f"w{i}": np.asarray(w) for i, w in enumerate(weights)}
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load_weights(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        keys = sorted(data.files, key=lambda k: int(k[1:]))
        return [np.asarray(data[k]) for k in keys]


def _nbytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


class DeadlineGrid(Grid):
    """A Grid that polls replies at its own interval, with a deadline per round.

    Wraps the Grid Flower hands the ServerApp.  ``send_and_receive`` pushes, then
    pulls every ``poll_interval`` s until every reply is in or the deadline passes
    (the earlier of ``round_timeout`` and the caller's ``timeout``).  With
    ``fast=False`` it delegates to the stock ``send_and_receive`` (3 s between
    pulls), only timing it.  Each call's timings are kept in ``calls``.
    """

    def __init__(
        self, grid: Grid, round_timeout: float, poll_interval: float = 0.05, fast: bool = True
    ) -> None:
        self._grid = grid
        self.round_timeout = round_timeout
        self.poll_interval = poll_interval
        self.fast = fast
        self.calls: list[dict[str, Any]] = []

    # -- delegation ---------------------------------------------------------------
    def set_run(self, run: Any) -> None:  # pragma: no cover - Flower sets this itself
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    # -- the round ----------------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        budget = self.round_timeout if timeout is None else min(timeout, self.round_timeout)
        down = {m.metadata.dst_node_id: _nbytes_msg(m) for m in messages}
        t0 = time.monotonic()
        arrivals: dict[int, float] = {}
        replies: list[Message] = []
        timed_out = False
        if not self.fast:
            replies = list(self._grid.send_and_receive(messages, timeout=budget))
            for r in replies:
                arrivals[r.metadata.src_node_id] = time.monotonic() - t0
        else:
            ids = set(self._grid.push_messages(messages))
            deadline = t0 + budget
            while ids:
                got = list(self._grid.pull_messages(ids))
                now = time.monotonic()
                for r in got:
                    arrivals[r.metadata.src_node_id] = now - t0
                    ids.discard(r.metadata.reply_to_message_id)
                replies.extend(got)
                if not ids:
                    break
                if now >= deadline:
                    timed_out = True
                    break
                time.sleep(min(self.poll_interval, max(0.0, deadline - now)))
        self.calls.append(
            {
                "sent": sorted(down),
                "bytes_down": down,
                "arrivals": arrivals,
                "wall_s": time.monotonic() - t0,
                "timed_out": timed_out or len(replies) < len(messages),
            }
        )
        return replies


def _nbytes_msg(msg: Message) -> int:
    try:
        return sum(_nbytes(r) for r in msg.content.array_records.values())
    except Exception:
        return 0


def _finite(record: ArrayRecord) -> bool:
    return all(
        np.all(np.isfinite(a.numpy().astype(np.float64, copy=False))) for a in record.values()
    )


class _Guard:
    """Mixed in front of a Flower strategy: node waits, sampling, guarded aggregation."""

    run_cfg: FLRunConfig
    rng: random.Random
    current: dict[str, Any]
    dgrid: DeadlineGrid
    missed: set[int]

    def _wait_nodes(self, grid: Grid) -> list[int]:
        cfg = self.run_cfg
        deadline = time.monotonic() + cfg.node_wait_s
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= cfg.min_clients:
                return nodes
            if time.monotonic() >= deadline:
                raise FLTooFewNodesError(
                    f"only {len(nodes)} node(s) connected within {cfg.node_wait_s:g} s; "
                    f"the run needs min_clients={cfg.min_clients}"
                )
            time.sleep(0.1)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        cfg = self.run_cfg
        t_round = time.monotonic()
        nodes = self._wait_nodes(grid)
        # A node that missed the last round's deadline sits this round out (the SuperLink
        # lists a crashed node as online until its heartbeats lapse) unless that would
        # leave fewer than min_clients.
        rested = [n for n in nodes if n not in self.missed]
        if len(rested) >= cfg.min_clients:
            nodes = rested
        k = min(len(nodes), max(cfg.min_clients, int(len(nodes) * cfg.fraction_fit)))
        sampled = sorted(self.rng.sample(nodes, k))
        config["server-round"] = server_round
        if cfg.strategy == "fedprox":
            config["proximal-mu"] = cfg.proximal_mu
        self.current = {"round": server_round, "sampled": sampled, "t0": t_round}
        record = FlwrRecordDict({"arrays": arrays, "config": config})
        return [
            Message(content=record, dst_node_id=n, message_type=MessageType.TRAIN) for n in sampled
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t0 = time.monotonic()
        kept: list[Message] = []
        dropped: list[DroppedUpdate] = []
        clients: list[NodeRound] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                reason = msg.error.reason or f"error code {msg.error.code}"
                dropped.append(DroppedUpdate(round=server_round, node=node, reason=reason))
                continue
            content = msg.content
            arrays = content.array_records.get("arrays")
            metrics = content.metric_records.get("metrics")
            if arrays is None or metrics is None or "num-examples" not in metrics:
                dropped.append(
                    DroppedUpdate(round=server_round, node=node, reason="malformed reply")
                )
                continue
            num = metrics["num-examples"]
            if not isinstance(num, int | float) or not np.isfinite(num) or num <= 0:
                dropped.append(
                    DroppedUpdate(round=server_round, node=node, reason="bad num-examples")
                )
                continue
            if not _finite(arrays):
                dropped.append(
                    DroppedUpdate(
                        round=server_round, node=node, reason="non-finite update (NaN or inf)"
                    )
                )
                continue
            kept.append(msg)
            clients.append(
                NodeRound(
                    node=node,
                    num_examples=int(num),
                    train_loss=_metric(metrics, "train-loss"),
                    train_acc=_metric(metrics, "train-acc"),
                    eval_loss=_metric(metrics, "eval-loss"),
                    eval_acc=_metric(metrics, "eval-acc"),
                    compute_s=_metric(metrics, "compute-s"),
                    startup_s=_metric(metrics, "startup-s"),
                    bytes_up=_nbytes(arrays),
                )
            )
        calls = self.dgrid.calls
        self.current.update(
            {"dropped": dropped, "clients": clients, "call": calls[-1] if calls else None}
        )
        result: tuple[ArrayRecord | None, MetricRecord | None] = (None, None)
        if kept:
            result = super().aggregate_train(server_round, kept)  # type: ignore[misc]
        self.current["aggregate_s"] = time.monotonic() - t0
        return result


def _metric(metrics: MetricRecord, key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) else None


def _make_strategy(cfg: FLRunConfig) -> Any:
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_fit,
        "fraction_evaluate": 0.0 if cfg.fold_evaluation else 1.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }
    base: type
    if cfg.strategy == "fedavg":
        base = FedAvg
    elif cfg.strategy == "fedprox":
        base, common["proximal_mu"] = FedProx, cfg.proximal_mu
    elif cfg.strategy == "fedmedian":
        base = FedMedian
    elif cfg.strategy == "krum":
        base, common["num_malicious_nodes"] = Krum, cfg.krum_malicious
    else:  # pragma: no cover - FLRunConfig validates the name
        raise FLError(f"unknown strategy {cfg.strategy!r}")
    cls = type(f"Guarded{base.__name__}", (_Guard, base), {})
    strategy = cls(**common)
    strategy.run_cfg = cfg
    strategy.rng = random.Random(cfg.seed)
    strategy.current = {}
    strategy.missed = set()
    return strategy


def run_server(grid: Grid, job: FLJob, run_id: int) -> FLResultFile:
    """Run the job's rounds on ``grid``; writes and returns the result (raises on failure)."""
    cfg = job.config
    out = Path(job.output)
    t_start = time.monotonic()
    initial = load_weights(Path(job.initial_weights))
    dtypes = [w.dtype for w in initial]
    val: tuple[np.ndarray, np.ndarray] | None = None
    if job.validation:
        with np.load(job.validation, allow_pickle=False) as data:
            val = (np.asarray(data["x"], np.float32), np.asarray(data["y"], np.int64))
    result = FLResultFile(ok=False, run_id=run_id, strategy=cfg.strategy)
    if val is not None:
        result.initial_val_loss, result.initial_val_acc = evaluate(initial, *val)

    strategy = _make_strategy(cfg)
    dgrid = DeadlineGrid(grid, cfg.round_timeout_s, cfg.poll_interval_s, fast=cfg.fast_grid)
    strategy.dgrid = dgrid
    rounds: list[RoundMetrics] = []
    nodes_seen: set[int] = set()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        cur = strategy.current
        call = cur.get("call") or {
            "arrivals": {},
            "bytes_down": {},
            "wall_s": 0.0,
            "timed_out": bool(cur.get("sampled")),
        }
        weights = _cast(arrays.to_numpy_ndarrays(), dtypes, initial)
        clients: list[NodeRound] = cur.get("clients", [])
        for c in clients:
            c.reply_s = call["arrivals"].get(c.node)
            c.bytes_down = int(call["bytes_down"].get(c.node, 0))
        dropped: list[DroppedUpdate] = list(cur.get("dropped", []))
        replied = {c.node for c in clients} | {d.node for d in dropped}
        for node in cur.get("sampled", []):
            if node not in replied:
                dropped.append(
                    DroppedUpdate(
                        round=server_round,
                        node=node,
                        reason=f"no reply within the round timeout ({cfg.round_timeout_s:g} s)",
                    )
                )
        strategy.missed = {d.node for d in dropped if d.reason.startswith("no reply")}
        n_total = sum(c.num_examples for c in clients)
        rm = RoundMetrics(
            round=server_round,
            sampled=list(cur.get("sampled", [])),
            aggregated=[c.node for c in clients],
            dropped=dropped,
            clients=clients,
            wall_s=float(call["wall_s"]),
            aggregate_s=float(cur.get("aggregate_s", 0.0)),
            timed_out=bool(call["timed_out"]),
        )
        if n_total:
            rm.train_loss = sum(c.num_examples * (c.train_loss or 0.0) for c in clients) / n_total
            rm.client_eval_acc = (
                sum(c.num_examples * (c.eval_acc or 0.0) for c in clients) / n_total
            )
            rm.compute_max_s = max(c.compute_s or 0.0 for c in clients)
        if val is not None:
            rm.val_loss, rm.val_acc = evaluate(weights, *val)
        rm.round_s = time.monotonic() - float(cur.get("t0", time.monotonic()))
        rm.overhead_s = max(0.0, rm.round_s - rm.compute_max_s)
        rounds.append(rm)
        nodes_seen.update(rm.aggregated)
        # a round without any usable update keeps the previous weights (Flower does too)
        return MetricRecord({"val-acc": rm.val_acc or 0.0})

    train_config = ConfigRecord(
        {
            "local-epochs": cfg.local_epochs,
            "batch-size": cfg.batch_size,
            "learning-rate": cfg.learning_rate,
            "min-samples": cfg.min_samples,
            "seed": cfg.seed,
        }
    )
    if cfg.preprocess:
        train_config["preprocess"] = cfg.preprocess
    if cfg.max_samples is not None:
        train_config["max-samples"] = cfg.max_samples
    res = strategy.start(
        grid=dgrid,
        initial_arrays=ArrayRecord(initial),  # type: ignore[arg-type]
        num_rounds=cfg.rounds,
        timeout=cfg.round_timeout_s,
        train_config=train_config,
        evaluate_fn=evaluate_fn,
    )
    final = _cast(res.arrays.to_numpy_ndarrays(), dtypes, initial) if res.arrays else initial
    if not any(r.aggregated for r in rounds):
        result.rounds = rounds
        result.dropped = [d for r in rounds for d in r.dropped]
        raise _NoUpdates(result)
    weights_file = save_weights(out / "weights.npz", final)
    result.ok = True
    result.rounds = rounds
    result.nodes = sorted(nodes_seen)
    result.dropped = [d for r in rounds for d in r.dropped]
    result.weights_file = str(weights_file)
    result.seconds = time.monotonic() - t_start
    return result


class _NoUpdates(FLError):
    def __init__(self, partial: FLResultFile) -> None:
        reasons = "; ".join(f"node {d.node}: {d.reason}" for d in partial.dropped[:5])
        super().__init__(f"no round aggregated any update ({reasons or 'no replies'})")
        self.partial = partial


def _cast(
    weights: list[np.ndarray], dtypes: list[np.dtype[Any]], initial: list[np.ndarray]
) -> list[np.ndarray]:
    """Aggregates in the parent's dtypes; integer arrays (Normalization's count) kept."""
    out = []
    for w, dt, w0 in zip(weights, dtypes, initial, strict=True):
        out.append(np.asarray(w0).copy() if np.issubdtype(dt, np.integer) else w.astype(dt))
    return out


def _write(out: Path, result: FLResultFile) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result.model_dump(mode="json"), indent=1))
    tmp.replace(out / "result.json")


@app.main()
def _main(grid: Grid, context: Context) -> None:
    job_path = context.run_config.get("job")
    if not isinstance(job_path, str) or not job_path:
        raise FLError("run config 'job' (path of the job file) is missing")
    job = FLJob.model_validate_json(Path(job_path).read_text())
    out = Path(job.output)
    run_id = int(context.run_id)
    try:
        result = run_server(grid, job, run_id)
    except FLTooFewNodesError as exc:
        _write(
            out,
            FLResultFile(
                ok=False,
                error=str(exc),
                error_kind="too-few-nodes",
                run_id=run_id,
                strategy=job.config.strategy,
            ),
        )
        raise
    except _NoUpdates as exc:
        partial = exc.partial
        partial.error, partial.error_kind = str(exc), "no-updates"
        _write(out, partial)
        raise
    except Exception as exc:
        _write(
            out,
            FLResultFile(
                ok=False,
                error=f"{type(exc).__name__}: {exc}",
                error_kind="internal",
                run_id=run_id,
                strategy=job.config.strategy,
            ),
        )
        (out / "serverapp-traceback.txt").write_text(traceback.format_exc())
        raise
    _write(out, result)
