"""Federated training on Flower's deployment engine: a real SuperLink, real SuperNodes.

One SuperLink and three SuperNodes serve the module: two with labelled buffers of
simulated, non-IID (one drifted) devices, one whose buffer holds a poisoned
feature (values near float32's limit) so its update overflows to non-finite
numbers.  The kill test starts its own node and SIGKILLs it mid-round; the TLS test
runs its own SuperLink with node authentication.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tinyfleet.agent.fl.data import save_npz_data
from tinyfleet.agent.fl.errors import FLError, FLTooFewNodesError, FLUnsupportedModel
from tinyfleet.agent.fl.process import descendants
from tinyfleet.agent.fl.supernode import SuperNodeProcess, generate_node_keys
from tinyfleet.agent.fl.trainer import TrainConfig, evaluate, train
from tinyfleet.host.fl.run import FLRunConfig, run_federated, start_run, wait_run
from tinyfleet.host.fl.simdata import dense_weights, device_data, non_iid_probs
from tinyfleet.host.fl.superlink import SuperLink, generate_tls_files
from tinyfleet.sim.sensors import Drift

SEED = 7


class Fleet:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.superlink = SuperLink(root / "superlink").start()
        good = [
            device_data("fl-a", 240, SEED, class_probs=non_iid_probs(0)),
            device_data(
                "fl-b", 240, SEED, class_probs=non_iid_probs(2), drift=Drift(gain_factor=1.4)
            ),
        ]
        poisoned = device_data("fl-c", 120, SEED)
        poisoned.x[:, 3] = 3e38  # a broken sensor channel: finite, but overflows in training
        small = device_data("fl-e", 20, SEED)  # too few samples for the runs below
        self.val = device_data("fl-val", 200, SEED + 1)
        pooled = np.concatenate([d.x for d in good])
        # the parent: a weak start (one epoch on a little pooled data)
        w0 = dense_weights(pooled, seed=SEED)
        y0 = np.concatenate([d.y for d in good])
        self.parent = train(w0, pooled[:60], y0[:60], TrainConfig(epochs=1, seed=0)).weights
        self.nodes: dict[str, SuperNodeProcess] = {}
        for d in [*good, poisoned, small]:
            path = save_npz_data(_mk(root / d.device_id) / "labels.npz", d.x, d.y)
            self.nodes[d.device_id] = SuperNodeProcess(
                self.superlink.address, path, home=root / d.device_id
            ).start()
        self.ids = {name: n.wait_connected(30) for name, n in self.nodes.items()}

    def close(self) -> None:
        stoppers = [threading.Thread(target=n.stop) for n in self.nodes.values()]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        self.superlink.stop()


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("fl"))
    try:
        yield f
    finally:
        tops = [n.pid for n in f.nodes.values() if n.alive()] + [f.superlink.pid]
        tree = [p for top in tops if top for p in (top, *descendants(top))]
        f.close()
    # every process of the tree is gone: SuperLink, SuperExecs, ServerApps, SuperNodes
    assert len(tree) >= 2 * len(tops) and not [p for p in tree if _running(p)]


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def test_rounds_converge_and_poisoned_update_is_dropped(fleet: Fleet, tmp_path: Path) -> None:
    cfg = FLRunConfig(
        rounds=2,
        min_clients=4,
        min_samples=50,
        local_epochs=3,
        batch_size=32,
        learning_rate=0.003,
        round_timeout_s=30,
        seed=1,
    )
    res = run_federated(fleet.superlink, cfg, fleet.parent, (fleet.val.x, fleet.val.y), tmp_path)

    before = evaluate(fleet.parent, fleet.val.x, fleet.val.y)[1]
    after = evaluate(res.weights, fleet.val.x, fleet.val.y)[1]
    assert res.initial_val_acc == pytest.approx(before)
    assert [r.round for r in res.rounds] == [1, 2]
    assert res.rounds[-1].val_acc == pytest.approx(after, abs=1e-6)
    assert after > before + 0.1 and res.rounds[1].val_acc >= res.rounds[0].val_acc - 0.02
    good = {fleet.ids["fl-a"], fleet.ids["fl-b"]}
    bad, small = fleet.ids["fl-c"], fleet.ids["fl-e"]
    assert set(res.nodes) == good
    for r in res.rounds:
        assert set(r.sampled) == good | {bad, small} and set(r.aggregated) == good
        reasons = {d.node: d.reason for d in r.dropped}
        assert reasons.keys() == {bad, small}
        assert reasons[bad] == "non-finite update (NaN or inf)"
        assert "only 20 labelled samples; the run needs 50" in reasons[small]
        assert all(c.num_examples == 240 and c.eval_acc is not None for c in r.clients)
        assert all(c.bytes_up > 10_000 and c.bytes_down > 10_000 for c in r.clients)
        assert not r.timed_out
    # layout and dtypes of the parent kept (the host can Keras-set_weights them)
    assert [w.shape for w in res.weights] == [w.shape for w in fleet.parent]
    assert [w.dtype for w in res.weights] == [w.dtype for w in fleet.parent]
    assert int(res.weights[2]) == int(fleet.parent[2])


def test_too_few_nodes_fail_fast_with_reason(fleet: Fleet, tmp_path: Path) -> None:
    cfg = FLRunConfig(rounds=1, min_clients=5, node_wait_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(FLTooFewNodesError, match=r"only 4 node\(s\) connected .* min_clients=5"):
        run_federated(fleet.superlink, cfg, fleet.parent, None, tmp_path)
    assert time.monotonic() - t0 < 15


def test_bad_inputs_refused_before_a_run(fleet: Fleet, tmp_path: Path) -> None:
    conv = [np.zeros((3, 3, 1, 8), np.float32), np.zeros(8, np.float32)]
    with pytest.raises(FLUnsupportedModel):
        run_federated(fleet.superlink, FLRunConfig(), conv, None, tmp_path)
    with pytest.raises(FLError, match="validation set"):
        run_federated(
            fleet.superlink,
            FLRunConfig(),
            fleet.parent,
            (fleet.val.x[:, :4], fleet.val.y),
            tmp_path,
        )
    with pytest.raises(ValueError, match="strategy"):
        FLRunConfig(strategy="fedsgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rounds"):
        FLRunConfig(rounds=0)
    with pytest.raises(ValueError, match="extra"):
        FLRunConfig(roundz=3)  # type: ignore[call-arg]


def test_killed_supernode_mid_round_run_finishes(fleet: Fleet, tmp_path: Path) -> None:
    d = device_data("fl-d", 240, SEED)
    path = save_npz_data(_mk(tmp_path / "fl-d") / "labels.npz", d.x, d.y)
    node = SuperNodeProcess(fleet.superlink.address, path, home=tmp_path / "fl-d").start()
    victim = node.wait_connected(30)
    timeout = 15.0  # generous: four ClientApps start at once on a shared 2-core machine
    cfg = FLRunConfig(
        strategy="fedprox",
        proximal_mu=0.1,
        rounds=2,
        min_clients=2,
        min_samples=50,
        round_timeout_s=timeout,
        local_epochs=2,
        seed=2,
    )
    t0 = time.monotonic()
    run_id, out = start_run(
        fleet.superlink, cfg, fleet.parent, (fleet.val.x, fleet.val.y), tmp_path / "run"
    )
    try:
        deadline = time.monotonic() + 30
        while not any("flwr-clientapp" in _cmdline(p) for p in descendants(node.pid or 0)):
            assert time.monotonic() < deadline, "the node's ClientApp never started"
            time.sleep(0.05)
        node.kill()
        res = wait_run(fleet.superlink, run_id, out, cfg, timeout=90)
    finally:
        node.stop()
    first, second = res.rounds
    assert victim in first.sampled and victim not in first.aggregated
    assert (victim, f"no reply within the round timeout ({timeout:g} s)") in [
        (d.node, d.reason) for d in first.dropped
    ]
    assert first.timed_out and timeout <= first.wall_s < timeout + 1.5
    assert victim not in second.sampled  # sat out after missing the deadline
    assert set(second.aggregated) == {fleet.ids["fl-a"], fleet.ids["fl-b"]}
    assert second.val_acc is not None and res.initial_val_acc is not None
    assert second.wall_s < timeout
    assert time.monotonic() - t0 < 2 * timeout + 30


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_tls_and_node_auth_refuse_unregistered_node(tmp_path: Path) -> None:
    tls = generate_tls_files(tmp_path / "pki")
    with pytest.raises(FLError, match="needs TLS"):
        SuperLink(tmp_path / "x", supernode_auth=True)
    link = SuperLink(tmp_path / "superlink", tls=tls, supernode_auth=True).start()
    nodes: list[SuperNodeProcess] = []
    try:
        known_key, known_pub = generate_node_keys(tmp_path / "keys", "known")
        stranger_key, _ = generate_node_keys(tmp_path / "keys", "stranger")
        registered = link.register_node(known_pub, name="known")
        d = device_data("fl-tls", 160, SEED)
        paths = [save_npz_data(_mk(tmp_path / n) / "labels.npz", d.x, d.y) for n in ("a", "b")]
        known = SuperNodeProcess(
            link.address,
            paths[0],
            home=tmp_path / "a",
            root_certificates=tls.ca_cert,
            auth_private_key=known_key,
        )
        stranger = SuperNodeProcess(
            link.address,
            paths[1],
            home=tmp_path / "b",
            root_certificates=tls.ca_cert,
            auth_private_key=stranger_key,
        )
        nodes = [known.start(), stranger.start()]
        assert known.wait_connected(30) == registered
        with pytest.raises(FLError, match="Failed to activate SuperNode"):
            stranger.wait_connected(30)
        assert not stranger.alive()
        w0 = dense_weights(d.x, seed=1)
        res = run_federated(
            link,
            FLRunConfig(strategy="fedmedian", rounds=1, min_clients=1, local_epochs=2),
            w0,
            (d.x, d.y),
            tmp_path / "run",
        )
        assert res.nodes == [registered] and not res.rounds[0].dropped
        assert (res.rounds[0].val_acc or 0) > (res.initial_val_acc or 0)
    finally:
        for n in nodes:
            n.stop()
        link.stop()
