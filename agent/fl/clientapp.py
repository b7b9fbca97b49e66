"""The ClientApp: local training of the received weights on this node's labelled data.

Flower starts a new ``flwr-clientapp`` process for every message, so this module is
kept light (flwr's app types, numpy and the numpy trainer; no TensorFlow): it is
what each node pays per round before any training.

A ``train`` message carries ``arrays`` (the global weights in Keras'
``get_weights()`` order) and ``config`` (``local-epochs``, ``batch-size``,
``learning-rate``, ``proximal-mu``, ``min-samples``, ``seed``, ``server-round`` and,
optionally, ``preprocess``: the feature pipeline whose samples the label buffer gives).
The reply carries the trained ``arrays`` and one ``metrics`` record:
``num-examples``, ``train-loss``/``train-acc`` (after training), ``eval-loss``/
``eval-acc`` (the *received* global weights on the local data: client-side
evaluation folded into the train reply, so a round needs one message per node),
``compute-s`` (load + evaluate + train) and ``startup-s`` (process start to
handler).  A node with fewer than ``min-samples`` samples, unreadable data or a
model the trainer cannot train answers with an error reply giving the reason.
"""

from __future__ import annotations

import os
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp

from tinyfleet.agent.fl.data import load_local_data
from tinyfleet.agent.fl.errors import FLDataError, FLError
from tinyfleet.agent.fl.trainer import TrainConfig, evaluate, train

__all__ = ["ERROR_CODE", "app"]

ERROR_CODE = 4000
"""Error code of a reply in which this ClientApp refuses a task (reason given)."""


def _startup_seconds() -> float:
    """Seconds since this process was created (from /proc; 0 where unavailable)."""
    try:
        stat = open("/proc/self/stat").read()  # noqa: SIM115
        start_ticks = int(stat[stat.rfind(")") + 2 :].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])  # noqa: SIM115
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


app = ClientApp()


def _cfg(config: ConfigRecord, key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FLError(f"config {key!r} must be a number; got {value!r}")
    return float(value)


def _train_config(config: ConfigRecord) -> tuple[TrainConfig, int]:
    try:
        tc = TrainConfig(
            epochs=int(_cfg(config, "local-epochs", 1)),
            batch_size=int(_cfg(config, "batch-size", 32)),
            learning_rate=_cfg(config, "learning-rate", 0.003),
            proximal_mu=_cfg(config, "proximal-mu", 0.0),
            seed=int(_cfg(config, "seed", 0)) + int(_cfg(config, "server-round", 0)),
        )
    except ValueError as exc:
        raise FLError(f"bad training config: {exc}") from exc
    return tc, int(_cfg(config, "min-samples", 1))


def _load(
    context: Context, config: ConfigRecord, min_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    path = context.node_config.get("data-path")
    if not isinstance(path, str) or not path:
        raise FLDataError("this SuperNode has no data-path in its node config")
    preprocess = config.get("preprocess")
    newest = config.get("max-samples")
    x, y = load_local_data(
        path,
        preprocess if isinstance(preprocess, str) and preprocess else None,
        int(newest) if isinstance(newest, int) and newest > 0 else None,
    )
    if x.shape[0] < min_samples:
        raise FLDataError(f"only {x.shape[0]} labelled samples; the run needs {min_samples}")
    return x, y


def _refuse(msg: Message, exc: Exception) -> Message:
    return Message(Error(code=ERROR_CODE, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


@app.train()
def _train(msg: Message, context: Context) -> Message:
    startup = _startup_seconds()
    t0 = time.perf_counter()
    try:
        arrays = msg.content.array_records["arrays"]
        config = msg.content.config_records.get("config", ConfigRecord())
        weights = arrays.to_numpy_ndarrays()
        tc, min_samples = _train_config(config)
        x, y = _load(context, config, min_samples)
        eval_loss, eval_acc = evaluate(weights, x, y)
        result = train(weights, x, y, tc)
    except (FLError, KeyError) as exc:
        return _refuse(msg, exc)
    metrics = MetricRecord(
        {
            "num-examples": int(result.num_examples),
            "train-loss": float(result.loss),
            "train-acc": float(result.accuracy),
            "eval-loss": float(eval_loss),
            "eval-acc": float(eval_acc),
            "compute-s": time.perf_counter() - t0,
            "startup-s": startup,
        }
    )
    reply = RecordDict(
        {"arrays": ArrayRecord(result.weights), "metrics": metrics}  # type: ignore[dict-item]
    )
    return Message(reply, reply_to=msg)


@app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    """A separate evaluation phase (only used when evaluation is not folded into train)."""
    startup = _startup_seconds()
    t0 = time.perf_counter()
    try:
        weights = msg.content.array_records["arrays"].to_numpy_ndarrays()
        config = msg.content.config_records.get("config", ConfigRecord())
        _, min_samples = _train_config(config)
        x, y = _load(context, config, min_samples)
        loss, acc = evaluate(weights, x, y)
    except (FLError, KeyError) as exc:
        return _refuse(msg, exc)
    metrics = MetricRecord(
        {
            "num-examples": int(x.shape[0]),
            "eval-loss": float(loss),
            "eval-acc": float(acc),
            "compute-s": time.perf_counter() - t0,
            "startup-s": startup,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
