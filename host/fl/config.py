"""Settings of a federated run and the files the host and the ServerApp exchange.

``run_federated`` writes a job file (``FLJob``: the run settings and the paths of
the initial weights, the validation set and the output folder) and starts the
Flower app with ``--run-config job="<path>"``; the ServerApp reads it, runs the
rounds and writes ``result.json`` (``FLResultFile``) and ``weights.npz`` there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "STRATEGIES",
    "DroppedUpdate",
    "FLJob",
    "FLResultFile",
    "FLRunConfig",
    "NodeRound",
    "RoundMetrics",
]

STRATEGIES = ("fedavg", "fedprox", "fedmedian", "krum")
Strategy = Literal["fedavg", "fedprox", "fedmedian", "krum"]


class FLRunConfig(BaseModel):
    """What a federated run does (validated; unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy = "fedavg"
    rounds: int = Field(3, ge=1, le=100)
    min_clients: int = Field(2, ge=1, le=10_000)
    """Nodes that must be connected before a round starts (else the run fails fast)."""
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0)
    """Share of connected nodes sampled for each round (at least ``min_clients``)."""
    round_timeout_s: float = Field(60.0, gt=0.0, le=86_400.0)
    """A round aggregates the replies it has when this runs out; later ones are ignored."""
    node_wait_s: float = Field(30.0, ge=0.0, le=3_600.0)
    """How long to wait for ``min_clients`` connected nodes before failing."""
    local_epochs: int = Field(1, ge=1, le=1_000)
    batch_size: int = Field(32, ge=1, le=65_536)
    learning_rate: float = Field(0.003, gt=0.0, le=10.0)
    proximal_mu: float = Field(0.0, ge=0.0, le=1_000.0)
    """FedProx's proximal weight (used by ``fedprox``; 0 with the others)."""
    krum_malicious: int = Field(0, ge=0, le=1_000)
    """Nodes Krum assumes may be malicious."""
    min_samples: int = Field(1, ge=1)
    """A node with fewer labelled samples refuses the round (error reply with the reason)."""
    max_samples: int | None = Field(None, ge=1)
    """Train on a node's newest samples only (None: all): after a drift, the newest
    samples are the ones that describe the device as it is now."""
    seed: int = 0
    preprocess: str | None = None
    """Feature pipeline of the model (e.g. ``vibration-v1``): nodes train on the label
    buffer's samples of that pipeline only (None: all, which must share one width)."""
    fast_grid: bool = True
    """Poll replies every ``poll_interval_s`` with a per-round deadline (False: Flower's stock
    ``send_and_receive``, which sleeps 3 s between pulls; for benchmarks)."""
    fold_evaluation: bool = True
    """Client-side evaluation in the train reply (False: a separate evaluate phase)."""
    poll_interval_s: float = Field(0.05, gt=0.0, le=5.0)

    @model_validator(mode="after")
    def _check(self) -> FLRunConfig:
        if self.strategy == "fedprox" and self.proximal_mu == 0.0:
            raise ValueError("strategy fedprox needs proximal_mu > 0")
        return self


class FLJob(BaseModel):
    """The job file the ServerApp reads."""

    model_config = ConfigDict(extra="forbid")

    config: FLRunConfig
    initial_weights: str
    """``.npz`` with arrays ``w0``, ``w1``, … (Keras ``get_weights()`` order)."""
    validation: str | None = None
    """``.npz`` with ``x`` and ``y``: the host's validation set (None: no server evaluation)."""
    output: str
    """Folder for ``result.json`` and ``weights.npz``."""


class DroppedUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    round: int
    node: int
    reason: str


class NodeRound(BaseModel):
    """What one node reported in one round."""

    model_config = ConfigDict(extra="forbid")

    node: int
    num_examples: int = 0
    train_loss: float | None = None
    train_acc: float | None = None
    eval_loss: float | None = None
    eval_acc: float | None = None
    compute_s: float | None = None
    startup_s: float | None = None
    reply_s: float | None = None
    """Seconds from the round's push to this reply's arrival at the ServerApp."""
    bytes_down: int = 0
    bytes_up: int = 0


class RoundMetrics(BaseModel):
    """One round: who took part, what they reported, the host's validation of the result."""

    model_config = ConfigDict(extra="forbid")

    round: int
    sampled: list[int]
    aggregated: list[int]
    """Nodes whose update went into the aggregate."""
    dropped: list[DroppedUpdate]
    clients: list[NodeRound]
    train_loss: float | None = None
    """Example-weighted mean over the aggregated nodes."""
    client_eval_acc: float | None = None
    """Example-weighted accuracy of the round's *incoming* global weights on the nodes' data."""
    val_loss: float | None = None
    val_acc: float | None = None
    """The aggregated weights on the host's validation set."""
    round_s: float = 0.0
    """The whole round in the ServerApp: sampling, train (and evaluate) phase, aggregation,
    validation."""
    wall_s: float = 0.0
    """The train phase: push of the round's messages to the last reply (or the deadline)."""
    aggregate_s: float = 0.0
    compute_max_s: float = 0.0
    """Slowest aggregated node's local compute (load + evaluate + train)."""
    overhead_s: float = 0.0
    """``round_s - compute_max_s``: what orchestration cost this round."""
    timed_out: bool = False


class FLResultFile(BaseModel):
    """``result.json``: everything the run measured (``weights.npz`` beside it)."""

    model_config = ConfigDict(extra="forbid")

    ok: bool
    error: str | None = None
    error_kind: str | None = None
    """``too-few-nodes``, ``no-updates``, ``bad-input`` or ``internal`` when not ok."""
    run_id: int
    strategy: str
    initial_val_loss: float | None = None
    initial_val_acc: float | None = None
    rounds: list[RoundMetrics] = Field(default_factory=list)
    nodes: list[int] = Field(default_factory=list)
    dropped: list[DroppedUpdate] = Field(default_factory=list)
    weights_file: str | None = None
    seconds: float = 0.0
