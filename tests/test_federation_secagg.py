"""SecAgg+ on gives the same aggregate as off, within its quantization error, and the server never sees an adapter.

One Flower simulation (Ray, 3 devices): the ServerApp sends the same round twice, once in plain Flower messages and
once through SecAgg+, to devices that run the real client mods around a deterministic stand-in for training (each
device moves the adapter by its own fixed random amount), and compares the two FedAvg aggregates.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from cloud.federation.secagg import SecAggConfig, secure_train_round
from cloud.federation.strategies import FedAvgLoRA
from cloud.federation.strategies.base import arrays_to_record, record_to_arrays
from cloud.federation.traffic import MeteredGrid
from edge.federation.mods import clip_when_asked, secaggplus_when_asked

A, B = "m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight"
START = {A: np.random.default_rng(7).normal(0, 0.05, (8, 64)), B: np.zeros((32, 8))}
WEIGHTS = {0: 100, 1: 200, 2: 300}  # examples per device
SECAGG = SecAggConfig(num_shares=1.0, reconstruction_threshold=0.5, clipping_range=8.0, quantization_range=1 << 22,
                      max_weight=1000.0)


def trained(pid: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + pid)
    return {k: v + rng.normal(0, 0.02, v.shape) for k, v in START.items()}


client = ClientApp()


@client.train(mods=[secaggplus_when_asked, clip_when_asked])
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    metrics = MetricRecord({"num-examples": WEIGHTS[pid], "partition-id": pid, "train-loss": float(pid),
                            "split-step-bytes-up": [pid, pid]})
    return Message(RecordDict({"arrays": arrays_to_record(trained(pid)), "metrics": metrics}), reply_to=msg)


RESULT: dict = {}
server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    while len(list(grid.get_node_ids())) < 3:
        time.sleep(0.5)
    metered = MeteredGrid(grid)
    strategy = FedAvgLoRA(min_train_nodes=3, min_available_nodes=3)
    metered.phase = ("plain", 1)
    msgs = strategy.configure_train(1, arrays_to_record(START), ConfigRecord({}), metered)
    RESULT["plain"] = record_to_arrays(strategy.aggregate_train(1, metered.send_and_receive(msgs))[0])
    metered.phase = ("secagg", 1)
    msgs = list(strategy.configure_train(1, arrays_to_record(START), ConfigRecord({}), metered))
    replies, per_client = secure_train_round(metered, context, 1, msgs, SECAGG)
    arrays, metrics = strategy.aggregate_train(1, replies)
    RESULT.update(secure=record_to_arrays(arrays), metrics=dict(metrics), per_client=per_client,
                  plain_traffic=metered.totals(("plain", 1)), secure_traffic=metered.totals(("secagg", 1)))


def test_secaggplus_aggregate_equals_the_plain_one_within_quantization_error():
    tests_dir = str(Path(__file__).resolve().parent)  # Ray's workers import this module's ClientApp
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    run_simulation(server_app=server, client_app=client, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": 2, "logging_level": "ERROR", "log_to_driver": False}})
    assert set(RESULT) >= {"plain", "secure"}, "the ServerApp did not finish"
    devices = [trained(pid) for pid in WEIGHTS]
    w = np.array(list(WEIGHTS.values()), dtype=np.float64)
    q = SECAGG.quantization_range
    q_ratio = np.round(w / SECAGG.max_weight * q)  # SecAgg+ quantizes the weights ...
    step = 2 * SECAGG.clipping_range / q  # ... and every weighted value, by stochastic rounding (< 1 step each)
    bound = len(w) * step / (q_ratio.sum() / q)
    for k in (A, B):
        exact = sum(wi * d[k] for wi, d in zip(w, devices)) / w.sum()
        np.testing.assert_allclose(RESULT["plain"][k], exact, atol=1e-6)
        with_q_weights = sum(qi * d[k] for qi, d in zip(q_ratio, devices)) / q_ratio.sum()
        err = np.abs(RESULT["secure"][k] - with_q_weights).max()
        assert err <= bound + 1e-7, (k, err, bound)
        weight_err = np.abs(with_q_weights - exact).max()
        assert np.abs(RESULT["secure"][k] - RESULT["plain"][k]).max() <= bound + weight_err + 1e-6
        assert min(np.abs(RESULT["secure"][k] - d[k]).max() for d in devices) > 10 * bound  # not one device's
    # the server saw the adapter go out, and only masked vectors come back
    adapter_size = sum(v.size * 4 for v in START.values())
    assert RESULT["plain_traffic"]["adapter_up"] == 3 * adapter_size
    assert RESULT["secure_traffic"]["adapter_down"] == 3 * adapter_size
    assert RESULT["secure_traffic"]["adapter_up"] == 0
    # the devices' metrics still arrive (they are not masked), lists included
    assert sorted(m["partition-id"] for _, m in RESULT["per_client"]) == [0, 1, 2]
    assert all(m["split-step-bytes-up"] == [m["partition-id"]] * 2 for _, m in RESULT["per_client"])
    assert RESULT["metrics"]["num-examples"] == 600
