"""LoRA aggregation: exact math of FedAvg (A and B apart) and FFA-LoRA on known tensors, the deviation measure,
metric aggregation, and the adapter's exact size in each wire dtype."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from cloud.federation.server_app import FederationConfig, initial_adapter, make_strategy
from cloud.federation.strategies import FedAvgLoRA, FFALoRA
from cloud.federation.strategies.base import (aggregation_deviation, arrays_to_record, lora_pairs, payload_bytes,
                                              record_to_arrays, train_metrics, weighted_mean)
from cloud.federation.traffic import adapter_bytes, message_bytes

A, B = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", \
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def reply(node: int, adapter: dict, examples: int, **metrics) -> Message:
    ins = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": arrays_to_record(adapter),
                          "metrics": MetricRecord({"num-examples": examples, **metrics})})
    return Message(content, reply_to=ins)


def started(strategy, start: dict):
    """Let the strategy send `start` as the round's global adapter (it remembers what it sent)."""
    msgs = list(strategy.configure_train(1, arrays_to_record(start), ConfigRecord({}), FakeGrid([11, 12])))
    assert len(msgs) == 2
    return msgs


def test_fedavg_averages_a_and_b_separately_and_reports_the_cross_term_error():
    start = {A: np.array([[1.0, 0.0]]), B: np.zeros((2, 1))}  # r = 1, in = 2, out = 2
    c1 = {A: np.array([[1.0, 2.0]]), B: np.array([[1.0], [0.0]])}
    c2 = {A: np.array([[3.0, -2.0]]), B: np.array([[0.0], [2.0]])}
    s = FedAvgLoRA()
    started(s, start)
    arrays, metrics = s.aggregate_train(1, [reply(11, c1, 1, **{"train-loss": 1.0}),
                                            reply(12, c2, 3, **{"train-loss": 2.0})])
    got = record_to_arrays(arrays)
    np.testing.assert_allclose(got[A], [[2.5, -1.0]])  # (1*[1,2] + 3*[3,-2]) / 4
    np.testing.assert_allclose(got[B], [[0.25], [1.5]])
    true_mean = 0.25 * c1[B] @ c1[A] + 0.75 * c2[B] @ c2[A]
    merged = got[B] @ got[A]
    expected = np.linalg.norm(merged - true_mean) / np.linalg.norm(true_mean)  # B0 A0 = 0
    assert metrics["agg-deviation"] == pytest.approx(expected, rel=1e-12)
    assert expected > 0.1  # averaging A and B apart is far from the mean update here
    assert metrics["train-loss"] == pytest.approx(1.75)
    assert metrics["num-examples"] == 4


def test_ffa_keeps_a_and_averages_b_exactly():
    rng = np.random.default_rng(0)
    start = {A: rng.normal(size=(4, 6)), B: rng.normal(size=(5, 4))}
    clients = [{A: start[A], B: rng.normal(size=(5, 4))} for _ in range(3)]
    s = FFALoRA()
    msgs = started(s, start)
    assert all(m.content["config"]["freeze-a"] is True for m in msgs)
    arrays, metrics = s.aggregate_train(1, [reply(10 + i, c, n) for i, (c, n) in enumerate(zip(clients, (1, 2, 5)))])
    got = record_to_arrays(arrays)
    np.testing.assert_array_equal(got[A], start[A].astype(np.float32))
    np.testing.assert_allclose(got[B], (clients[0][B] + 2 * clients[1][B] + 5 * clients[2][B]) / 8, rtol=1e-6)
    assert metrics["agg-deviation"] < 1e-6  # float32 rounding only: (mean B) A is the mean of B_i A
    # the same clients under FedAvg of A and B: A is shared, so FedAvg is exact too; perturb A to see it break
    moved = [{A: c[A] + rng.normal(size=c[A].shape), B: c[B]} for c in clients]
    f = FedAvgLoRA()
    started(f, start)
    _, m2 = f.aggregate_train(1, [reply(10 + i, c, 1) for i, c in enumerate(moved)])
    assert m2["agg-deviation"] > 1e-2


def test_fedavg_is_told_to_train_a():
    s = FedAvgLoRA()
    msgs = started(s, {A: np.ones((1, 2)), B: np.zeros((2, 1))})
    assert all(m.content["config"]["freeze-a"] is False for m in msgs)


def test_deviation_on_a_hand_computed_case():
    # 1x1 matrices: clients (A, B) = (1, 1) and (3, 3), equal weights; true mean of BA = 5, FedAvg gives 2 * 2 = 4
    c1, c2 = {A: np.array([[1.0]]), B: np.array([[1.0]])}, {A: np.array([[3.0]]), B: np.array([[3.0]])}
    merged = weighted_mean([c1, c2], [1, 1])
    start = {A: np.array([[0.0]]), B: np.array([[0.0]])}
    assert aggregation_deviation(merged, [c1, c2], [1, 1], start) == pytest.approx(0.2)


def test_lora_pairs_refuses_non_lora_arrays():
    assert lora_pairs([A, B]) == [(A, B)]
    with pytest.raises(ValueError):
        lora_pairs([A])
    with pytest.raises(ValueError):
        lora_pairs([A, B, "model.embed_tokens.weight"])


def test_train_metrics_sum_traffic_and_weight_the_loss():
    recs = [RecordDict({"m": MetricRecord({"num-examples": 1, "train-loss": 1.0, "split-bytes-up": 10,
                                           "split-step-bytes-up": [4, 6], "partition-id": 0})}),
            RecordDict({"m": MetricRecord({"num-examples": 3, "train-loss": 3.0, "split-bytes-up": 20,
                                           "split-step-bytes-up": [10, 10], "partition-id": 1})})]
    out = train_metrics(recs, "num-examples")
    assert out["train-loss"] == pytest.approx(2.5)
    assert out["split-bytes-up"] == 30 and out["num-examples"] == 4
    assert "split-step-bytes-up" not in out and "partition-id" not in out


@pytest.mark.parametrize("cloud_lora, blocks", [("none", 2), ("edge", 6)])
@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float16", 2)])
def test_the_adapter_travels_at_exactly_its_size_in_the_wire_dtype(tiny, cloud_lora, blocks, dtype, itemsize):
    """tiny-llama: hidden 64, 4 heads of 16, 2 KV heads -> q_proj 64 -> 64, v_proj 64 -> 32; r = 8."""
    cfg = FederationConfig(model="tiny-llama", cloud_lora=cloud_lora, adapter_dtype=dtype, lora_r=8)
    adapter = initial_adapter(tiny.model, cfg)
    per_block = 8 * (64 + 64) + 8 * (64 + 32)  # q: A r x in + B out x r; v likewise
    size = blocks * per_block * itemsize
    strategy, _ = make_strategy(cfg, 2)
    msgs = list(strategy.configure_train(1, arrays_to_record(adapter), ConfigRecord({}), FakeGrid([1, 2])))
    for msg in msgs:
        assert adapter_bytes(msg) == size
        assert payload_bytes(msg.content["arrays"]) == size
        assert str(msg.content["arrays"][A].dtype) == dtype
        # the whole Flower message: the payload plus a header per array (B = 0 chunks are deduplicated)
        assert message_bytes(msg) < size + 400 * len(adapter) + 1500
    assert np.all(record_to_arrays(msgs[0].content["arrays"])[B] == 0)  # PEFT init: B starts at zero
