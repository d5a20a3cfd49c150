"""Reported bytes match the tensor shapes exactly, and both ends of the wire count the same bytes."""
from __future__ import annotations

import pytest
import torch

from protocol import GRPC_PREFIX_BYTES, pb, wire_size
from protocol.tensors import encode
from tests.conftest import make_edge, sst2_batches

H, Q, KV = 64, 64, 32  # tiny-llama: hidden, q_proj out, v_proj out
WIRE = {"fp32": 4, "bf16": 2, "fp16": 2}


def expected_payload(B, T, mode, up, down, lora_blocks):
    """Raw tensor bytes of one training step, from the shapes alone."""
    eu, ed = WIRE[up], WIRE[down]
    bt = B * T
    payload_up = bt * H * eu + bt * 1 + bt * H * eu  # Begin.hidden + Begin.attention_mask (bool) + OutputGrad
    payload_down = bt * H * ed * 2  # Hidden + InputGrad
    if mode == "edge":
        n = len(lora_blocks)
        payload_down += n * (bt * H * ed + bt * (Q + KV) * ed)  # LoRA input x; dL/d outputs (q, v)
        payload_up += n * (bt * (Q + KV) * eu + bt * H * eu)  # LoRA outputs (q, v); dL/d x
    return payload_up, payload_down


@pytest.mark.parametrize("mode,up,down", [("none", "fp32", "fp32"), ("edge", "fp32", "fp32"),
                                          ("edge", "bf16", "fp16")])
def test_bytes_per_step_match_shapes_and_the_clouds_count(cloud, tiny, mode, up, down):
    em, _, link = make_edge(cloud, tiny, cloud_lora=mode, wire_up=up, wire_down=down)
    records = []
    for b in sst2_batches(3):
        loss, _ = em.loss(b)
        loss.backward()
        tr = em.cloud.last_traffic
        B, T = b.input_ids.shape
        pu, pd = expected_payload(B, T, mode, up, down, em.cloud.lora_blocks)
        assert (tr.payload_up, tr.payload_down) == (pu, pd)
        n_msgs = 2 + 2 * len(em.cloud.lora_blocks)
        assert (tr.messages_up, tr.messages_down) == (n_msgs, n_msgs)
        # wire bytes = payload + protobuf framing + 5-byte gRPC prefix per message: small and bounded
        assert 0 < tr.bytes_up - pu < n_msgs * (GRPC_PREFIX_BYTES + 80)
        assert 0 < tr.bytes_down - pd < n_msgs * (GRPC_PREFIX_BYTES + 80)
        records.append(tr)
    stats = link.close()
    # The cloud counted the same bytes on its side of the wire, independently.
    assert stats.bytes_received == sum(r.bytes_up for r in records)
    assert stats.bytes_sent == sum(r.bytes_down for r in records)
    assert stats.steps == 3


def test_wire_size_is_protobuf_size_plus_grpc_prefix():
    t = torch.ones(2, 3, 4)
    msg = pb.EdgeMessage(output_grad=pb.OutputGrad(grad=encode(t)))
    # 96 data bytes + tensor fields (dtype 2, shape 2+3, data 2+96 -> 105) + OutputGrad/oneof headers (2 + 2)
    assert msg.ByteSize() == 96 + 2 + (2 + 3) + 2 + 2 + 2
    assert wire_size(msg) == msg.ByteSize() + 5
