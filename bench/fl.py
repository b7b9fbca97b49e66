"""Federated rounds on Flower's deployment engine: round time with 2 / 4 / 8 SuperNodes, overhead vs compute, bytes; FL vs centralised accuracy on a drifted cohort.

Everything is real: one ``flower-superlink`` and N ``flower-supernode`` processes
on this machine (insecure, loopback), the tinyfleet Flower App (numpy ClientApp,
ServerApp with FedAvg), started with ``flwr run``.  Devices are simulated
vibration sensors with a drift (gain x1.8, speed x1.2) and non-IID class mixes;
each node's buffer holds 240 labelled windows' features.

Round time.  For N = 2, 4, 8 and two set-ups, in the same run:
* tuned: SuperExec task polls every 50 ms (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``
  on the SuperLink and every SuperNode), the ServerApp's ``DeadlineGrid`` pulling
  replies every 50 ms with a per-round deadline, client-side evaluation folded into
  the train reply (one message per node and round);
* Flower's defaults (baseline): SuperExec polls every 1 s, the stock Grid
  ``send_and_receive`` (3 s between pulls), a separate evaluate phase per round.
A round is timed in the ServerApp from sampling to the end of its validation;
local compute is the slowest aggregated node's load + evaluate + train time
(reported by the ClientApp); overhead = round − compute.  "ClientApp start" is the
time from the ``flwr-clientapp`` process' creation to the handler (Flower's own
imports and task pull), measured in the process.  The overhead of the node that
replied last is split into Flower's polls and transfers (its reply time minus its
ClientApp start and compute: the SuperNode's fixed 3 s idle sleep and 0.5 s reply
poll, the SuperExec's task poll, HTTP) and its ClientApp start; "ServerApp outside
the train phase" is sampling, aggregation, validation (and, with Flower's
defaults, the separate evaluate phase).  Bytes are the model arrays per
node and round (down + up; protobuf framing excluded).  The first round (cold:
FAB unpacked, caches) is left out of the medians.

Accuracy.  Parent: the numpy trainer on 12 undrifted devices (30 epochs).  The
8 drifted devices' buffers: federated FedAvg for 8 rounds x 2 local epochs (the
N = 8 tuned run) vs centralised training on their pooled buffers for 16 epochs
(same trainer, learning rate, batch size), both from the parent; accuracies on
held-out drifted windows of those 8 devices (100 each).
Targets (docs DESIGN): overhead ≤ 3.5 s per round with 2 SuperNodes and ≤ 6 s
with 8; a ClientApp that starts in ≤ 0.5 s; FL within 2 points of centralised.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from tinyfleet.agent.fl.data import save_npz_data
from tinyfleet.agent.fl.supernode import SuperNodeProcess
from tinyfleet.agent.fl.trainer import TrainConfig, evaluate, train
from tinyfleet.host.fl.run import FLResult, FLRunConfig, run_federated
from tinyfleet.host.fl.simdata import DeviceData, dense_weights, device_data, non_iid_probs
from tinyfleet.host.fl.superlink import SuperLink
from tinyfleet.sim.sensors import Drift

SEED = 11
DRIFT = Drift(gain_factor=1.8, speed_factor=1.2)
NODES = (2, 4, 8)
ROUNDS_TUNED = 4
ROUNDS_BASELINE = 3
ACC_ROUNDS, ACC_EPOCHS = 8, 2
LR, BATCH = 0.003, 32
TARGET_OVERHEAD = {2: 3.5, 8: 6.0}
TARGET_START_S = 0.5
TARGET_ACC_GAP = 0.02


def cohort(n: int) -> tuple[list[DeviceData], DeviceData]:
    """Buffers of ``n`` drifted, non-IID devices and their held-out drifted windows."""
    bufs = [
        device_data(f"fl-{i:02d}", 240, SEED, drift=DRIFT, class_probs=non_iid_probs(i))
        for i in range(n)
    ]
    held = [device_data(f"fl-{i:02d}", 100, SEED + 1, drift=DRIFT) for i in range(n)]
    x = np.concatenate([d.x for d in held])
    y = np.concatenate([d.y for d in held])
    return bufs, DeviceData("held-out", x, y)


def parent_weights() -> list[np.ndarray]:
    base = [device_data(f"base-{i:02d}", 200, SEED + 2) for i in range(12)]
    x = np.concatenate([d.x for d in base])
    y = np.concatenate([d.y for d in base])
    w0 = dense_weights(x, seed=SEED)
    return train(w0, x, y, TrainConfig(epochs=30, batch_size=64, learning_rate=LR, seed=0)).weights


def _start_fleet(
    root: Path, bufs: list[DeviceData], poll: float
) -> tuple[SuperLink, list[SuperNodeProcess]]:
    link = SuperLink(root / "superlink", poll_interval=poll).start()
    nodes = []
    for d in bufs:
        home = root / d.device_id
        home.mkdir(parents=True, exist_ok=True)
        path = save_npz_data(home / "labels.npz", d.x, d.y)
        nodes.append(SuperNodeProcess(link.address, path, home=home, poll_interval=poll).start())
    for n in nodes:
        n.wait_connected(60)
    return link, nodes


def _stop_fleet(link: SuperLink, nodes: list[SuperNodeProcess]) -> None:
    threads = [threading.Thread(target=n.stop) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    link.stop()


def _summary(res: FLResult) -> dict[str, Any]:
    warm = res.rounds[1:] or res.rounds
    starts = [c.startup_s for r in warm for c in r.clients if c.startup_s is not None]
    bytes_node = [c.bytes_down + c.bytes_up for r in warm for c in r.clients]
    # the slowest node's reply, split: Flower's polls and transfers (the SuperNode's 3 s idle
    # sleep and 0.5 s reply poll, the SuperExec's task poll) vs the ClientApp process start
    polling, starting = [], []
    for r in warm:
        timed = [c for c in r.clients if c.reply_s is not None]
        if timed:
            c = max(timed, key=lambda c: c.reply_s or 0.0)
            polling.append((c.reply_s or 0.0) - (c.startup_s or 0.0) - (c.compute_s or 0.0))
            starting.append(c.startup_s or 0.0)
    return {
        "polling_transfer_s": statistics.median(polling) if polling else None,
        "slowest_start_s": statistics.median(starting) if starting else None,
        "server_side_s": statistics.median(r.round_s - r.wall_s for r in warm),
        "round_s": statistics.median(r.round_s for r in warm),
        "compute_s": statistics.median(r.compute_max_s for r in warm),
        "overhead_s": statistics.median(r.overhead_s for r in warm),
        "clientapp_start_s": statistics.median(starts) if starts else None,
        "clientapp_start_max_s": max(starts) if starts else None,
        "bytes_per_node_round": int(statistics.median(bytes_node)) if bytes_node else 0,
        "first_round_s": res.rounds[0].round_s,
        "submit_s": res.submit_s,
        "run_start_s": res.seconds - res.submit_s - res.serverapp_s,
        "run_total_s": res.seconds,
        "rounds": len(res.rounds),
        "dropped": len(res.dropped),
        "val_acc": res.final_val_acc,
    }


def _one(
    n: int, tuned: bool, parent: list[np.ndarray], rounds: int, workdir: Path
) -> tuple[dict[str, Any], FLResult]:
    bufs, held = cohort(n)
    link, nodes = _start_fleet(workdir, bufs, 0.05 if tuned else 1.0)
    try:
        cfg = FLRunConfig(
            rounds=rounds,
            min_clients=n,
            local_epochs=ACC_EPOCHS,
            batch_size=BATCH,
            learning_rate=LR,
            round_timeout_s=120,
            seed=SEED,
            fast_grid=tuned,
            fold_evaluation=tuned,
        )
        res = run_federated(link, cfg, parent, (held.x, held.y), workdir / "run")
    finally:
        _stop_fleet(link, nodes)
    return _summary(res), res


def _import_cost() -> dict[str, float]:
    """Seconds to import flwr's clientapp runner alone, and tinyfleet's ClientApp on top."""
    code = (
        "import time; t=time.perf_counter(); import flwr.supernode.cli.flwr_clientapp; "
        "a=time.perf_counter(); import tinyfleet.agent.fl.clientapp; b=time.perf_counter(); "
        "print(a-t, b-a)"
    )
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        a, b = (float(v) for v in out.stdout.split())
        runs.append((a, b))
    return {
        "flwr_clientapp_import_s": statistics.median(r[0] for r in runs),
        "tinyfleet_clientapp_import_s": statistics.median(r[1] for r in runs),
    }


def run() -> dict[str, Any]:
    parent = parent_weights()
    out: dict[str, Any] = {"tuned": {}, "baseline": {}, "loadavg_start": os.getloadavg()}
    print(f"machine load average at start: {out['loadavg_start'][0]:.1f} ({os.cpu_count()} cores)")
    fl8: FLResult | None = None
    with tempfile.TemporaryDirectory(prefix="bench-fl-") as tmp:
        root = Path(tmp)
        for n in NODES:
            rounds = ACC_ROUNDS if n == 8 else ROUNDS_TUNED
            summary, res = _one(n, True, parent, rounds, root / f"tuned-{n}")
            out["tuned"][n] = summary
            if n == 8:
                fl8 = res
            print(_line(f"tuned    N={n}", summary), flush=True)
        for n in NODES:
            summary, _ = _one(n, False, parent, ROUNDS_BASELINE, root / f"base-{n}")
            out["baseline"][n] = summary
            print(_line(f"defaults N={n}", summary), flush=True)
    out["imports"] = _import_cost()
    print(
        f"imports: flwr-clientapp runner {out['imports']['flwr_clientapp_import_s']:.2f} s, "
        f"tinyfleet ClientApp on top {out['imports']['tinyfleet_clientapp_import_s']:.3f} s"
    )
    for n in NODES:
        t, b = out["tuned"][n], out["baseline"][n]
        print(
            f"N={n}: round {b['round_s']:.2f} s -> {t['round_s']:.2f} s "
            f"({b['round_s'] / t['round_s']:.2f}x faster); "
            f"overhead {b['overhead_s']:.2f} s -> {t['overhead_s']:.2f} s"
        )
    out["loadavg_end"] = os.getloadavg()
    print(f"machine load average at end: {out['loadavg_end'][0]:.1f}")
    out["accuracy"] = _accuracy(parent, fl8)
    out["targets"] = _targets(out)
    return out


def _accuracy(parent: list[np.ndarray], fl: FLResult | None) -> dict[str, Any]:
    bufs, held = cohort(8)
    x = np.concatenate([d.x for d in bufs])
    y = np.concatenate([d.y for d in bufs])
    cfg = TrainConfig(epochs=ACC_ROUNDS * ACC_EPOCHS, batch_size=BATCH, learning_rate=LR, seed=1)
    central = train(parent, x, y, cfg).weights
    acc = {
        "parent": evaluate(parent, held.x, held.y)[1],
        "centralised": evaluate(central, held.x, held.y)[1],
        "federated": evaluate(fl.weights, held.x, held.y)[1] if fl is not None else None,
        "federated_per_round": [r.val_acc for r in fl.rounds] if fl is not None else [],
    }
    print(
        f"accuracy on held-out drifted windows: parent {acc['parent']:.3f}, centralised "
        f"{acc['centralised']:.3f}, federated {acc['federated'] or float('nan'):.3f} "
        f"(FedAvg, {ACC_ROUNDS} rounds x {ACC_EPOCHS} epochs, 8 nodes)"
    )
    return acc


def _targets(out: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, Any] = {}
    for n, limit in TARGET_OVERHEAD.items():
        got = out["tuned"][n]["overhead_s"]
        t[f"overhead_{n}"] = {"target_s": limit, "measured_s": got, "met": got <= limit}
        print(
            f"target: overhead with {n} SuperNodes <= {limit} s: {got:.2f} s "
            + ("met" if got <= limit else f"MISSED by {got - limit:.2f} s")
        )
    start = out["tuned"][2]["clientapp_start_s"] or 0.0
    t["clientapp_start"] = {
        "target_s": TARGET_START_S,
        "measured_s": start,
        "met": start <= TARGET_START_S,
    }
    print(
        f"target: ClientApp start <= {TARGET_START_S} s: {start:.2f} s "
        + ("met" if start <= TARGET_START_S else f"MISSED by {start - TARGET_START_S:.2f} s")
    )
    acc = out["accuracy"]
    if acc["federated"] is not None:
        gap = acc["centralised"] - acc["federated"]
        t["accuracy_gap"] = {
            "target": TARGET_ACC_GAP,
            "measured": gap,
            "met": gap <= TARGET_ACC_GAP,
        }
        print(
            f"target: FL within {TARGET_ACC_GAP * 100:.0f} points of centralised: "
            f"{gap * 100:+.1f} points " + ("met" if gap <= TARGET_ACC_GAP else "MISSED")
        )
    return t


def _line(label: str, s: dict[str, Any]) -> str:
    return (
        f"{label}: round {s['round_s']:.2f} s = compute {s['compute_s']:.2f} s + overhead "
        f"{s['overhead_s']:.2f} s (slowest node: Flower polls+transfer "
        f"{s['polling_transfer_s'] or 0:.2f} s, ClientApp start {s['slowest_start_s'] or 0:.2f} s; "
        f"ServerApp outside the train phase {s['server_side_s']:.2f} s); "
        f"ClientApp start {s['clientapp_start_s'] or 0:.2f} s "
        f"(max {s['clientapp_start_max_s'] or 0:.2f}); {s['bytes_per_node_round']:,} B per node "
        f"and round; first round {s['first_round_s']:.2f} s; dropped {s['dropped']}; "
        f"`flwr run` {s['submit_s']:.2f} s, then ServerApp start {s['run_start_s']:.2f} s"
    )
