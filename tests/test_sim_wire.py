"""The simulator's bytes per step are exact: equal to real encodings of every message, and to what real training
runs (edge and cloud over gRPC) count for split, DLoRA, DLoRA + Kill & Revive and int8 wires."""
from __future__ import annotations

import copy

import pytest
import torch

from protocol import pb, wire_size
from protocol.tensors import encode
from sim.shape import load_shape, shape_from_dict
from sim.wire import WireSetup, cloud_blocks, dlora_setup, step_traffic
from tests.conftest import TOKENS

TINY = shape_from_dict("tiny-llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                          tie_word_embeddings=True))
SID = "0123456789abcdef0123456789abcdef"  # a uuid4 hex is 32 characters


def real_step(shape, setup: WireSetup, B: int, T: int, step: int) -> list[tuple[str, int]]:
    """Every message of one step, built with protocol.tensors.encode from random tensors, as the edge and cloud do."""
    up, down = (getattr(pb, {"fp32": "FLOAT32", "bf16": "BFLOAT16", "fp16": "FLOAT16", "int8": "INT8"}[d])
                for d in (setup.wire_up, setup.wire_down))
    H = shape.hidden
    r = lambda *s: torch.randn(*s)  # noqa: E731
    q, kv = shape.q_dim, shape.kv_dim
    active = list(setup.active())
    out = [("up", pb.EdgeMessage(begin=pb.Begin(
        session_id=SID, step=step, train=True, hidden=encode(r(B, T, H), up),
        attention_mask=encode(torch.ones(B, T, dtype=torch.bool), pb.BOOL),
        active_blocks=active if setup.lora_blocks else [])))]
    for b in active:
        out.append(("down", pb.CloudMessage(lora_request=pb.LoraRequest(block=b, group="attn_in",
                                                                        x=encode(r(B, T, H), down)))))
        out.append(("up", pb.EdgeMessage(lora_reply=pb.LoraReply(
            block=b, group="attn_in", outputs=[encode(r(B, T, q), up), encode(r(B, T, kv), up)]))))
    out.append(("down", pb.CloudMessage(hidden=pb.Hidden(hidden=encode(r(B, T, H), down), cloud_seconds=0.0123))))
    out.append(("up", pb.EdgeMessage(output_grad=pb.OutputGrad(grad=encode(r(B, T, H), up)))))
    for b in reversed(active):
        out.append(("down", pb.CloudMessage(lora_grad_request=pb.LoraGradRequest(
            block=b, group="attn_in", grads=[encode(r(B, T, q), down), encode(r(B, T, kv), down)]))))
        out.append(("up", pb.EdgeMessage(lora_grad_reply=pb.LoraGradReply(block=b, group="attn_in",
                                                                          grad=encode(r(B, T, H), up)))))
    out.append(("down", pb.CloudMessage(input_grad=pb.InputGrad(grad=encode(r(B, T, H), down), cloud_seconds=1.5))))
    return [(d, wire_size(m)) for d, m in out]


SETUPS = {
    "split": WireSetup(),
    "split-int8": WireSetup(wire_up="int8", wire_down="int8"),
    "split-bf16-fp16": WireSetup(wire_up="bf16", wire_down="fp16"),
    "dlora": dlora_setup(TINY),
    "dlora-kr": dlora_setup(TINY, active_fraction=0.5),
    "dlora-int8": dlora_setup(TINY, wire_up="int8", wire_down="int8"),
}


@pytest.mark.parametrize("name", SETUPS)
@pytest.mark.parametrize("step", [0, 1, 200])
def test_every_message_matches_a_real_encoding(name, step):
    setup = SETUPS[name]
    real = real_step(TINY, setup, 3, 11, step)
    sim = step_traffic(TINY, setup, 3, 11, step=step)
    assert [(m.direction, m.wire_bytes) for m in sim.messages] == real
    assert sim.bytes_up == sum(n for d, n in real if d == "up")
    assert sim.bytes_down == sum(n for d, n in real if d == "down")


def test_block_indices_past_one_varint_byte_stay_exact():
    shape = load_shape("llama-70b")  # 80 blocks: indices are all < 128; make a deeper one
    deep = shape_from_dict("deep", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=140,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=320))
    setup = dlora_setup(deep, k=1, m=1)
    assert max(setup.lora_blocks) >= 128
    real = real_step(deep, setup, 1, 2, 300)
    assert [(m.direction, m.wire_bytes) for m in step_traffic(deep, setup, 1, 2, step=300).messages] == real
    assert len(cloud_blocks(shape, 1, 1)) == 78


def test_payload_and_message_counts_follow_the_shapes():
    B, T, H = 2, 7, TINY.hidden
    split = step_traffic(TINY, WireSetup(), B, T)
    assert split.payload_up == 2 * B * T * H * 4 + B * T  # Begin.hidden + mask (bool) + OutputGrad
    assert split.payload_down == 2 * B * T * H * 4
    assert (split.messages_up, split.messages_down, split.round_trips) == (2, 2, 2)
    d = step_traffic(TINY, dlora_setup(TINY), B, T)
    n = 4  # cloud blocks of a 6-block model cut at k = m = 1
    assert d.payload_down - split.payload_down == n * B * T * (H + TINY.q_dim + TINY.kv_dim) * 4
    assert d.round_trips == 2 + 2 * n
    half = step_traffic(TINY, dlora_setup(TINY, active_fraction=0.5), B, T)
    assert split.bytes_up < half.bytes_up < d.bytes_up
    assert step_traffic(TINY, dlora_setup(TINY, active_fraction=0.0), B, T).round_trips == 2


# ---- against real training runs (tiny Llama, real edge and cloud over gRPC on loopback) ----------------------------
def run_and_predict(cloud, tiny, steps=3, step_hook=None, **kw):
    from edge.trainer import EdgeConfig, train
    shapes: list[tuple[int, ...]] = []

    def hook(em, step):
        if step == 0:  # record the (B, T) each step really sends
            em.cloud.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
        if step_hook:
            step_hook(em, step)

    cfg = EdgeConfig(cloud=cloud.address, token=TOKENS["alice"], model="tiny-llama", task="sst2", steps=steps,
                     batch_size=4, eval_before=False, eval_after=False, progress=False, **kw)
    metrics = train(cfg, loaded=copy.deepcopy(tiny), step_hook=hook)
    rows = []
    for rec, (B, T, _) in zip(metrics["steps"], shapes):
        if kw.get("cloud_lora") == "edge":
            setup = dlora_setup(TINY, 1, 1, kw.get("wire_up", "fp32"), kw.get("wire_down", "fp32"))
            setup = WireSetup(**{**setup.__dict__, "active_blocks": tuple(rec["active_blocks"])})
        else:
            setup = WireSetup(1, 1, kw.get("wire_up", "fp32"), kw.get("wire_down", "fp32"))
        rows.append((rec, step_traffic(TINY, setup, B, T, step=rec["step"])))
    assert len(rows) == steps
    return rows


def kill_every_other(em, step):
    em.cloud.killed = set(em.cloud.lora_blocks[step % 2::2])


@pytest.mark.parametrize("kw", [
    dict(cloud_lora="none"),
    dict(cloud_lora="edge"),
    dict(cloud_lora="edge", step_hook=kill_every_other),
    dict(cloud_lora="none", wire_up="int8", wire_down="int8"),
    dict(cloud_lora="edge", wire_up="int8", wire_down="int8"),
], ids=["split", "dlora", "dlora+kr", "split-int8", "dlora-int8"])
def test_predicted_bytes_equal_measured_bytes_of_real_runs(cloud, tiny, kw):
    for rec, sim in run_and_predict(cloud, tiny, **kw):
        for key in ("bytes_up", "bytes_down", "payload_up", "payload_down", "messages_up", "messages_down"):
            assert getattr(sim, key) == pytest.approx(rec[key], rel=0.01), key
            assert getattr(sim, key) == rec[key], key  # in fact exact
