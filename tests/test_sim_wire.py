"""The simulator's bytes per step are exact: equal to real encodings of every message, and to what real training
runs (edge and cloud over gRPC) count for split, DLoRA, DLoRA + Kill & Revive and int8 wires (the other PEFT
methods' real runs: tests/test_sim_methods.py)."""
from __future__ import annotations

import pytest
import torch

from protocol import pb, wire_size
from protocol.step import StepPlan, carried_shapes
from protocol.tensors import WIRE_DTYPES, encode
from sim.shape import load_shape, shape_from_dict
from sim.wire import WireSetup, carried_setup, cloud_blocks, dlora_setup, method_setup, step_traffic
from tests.conftest import make_edge, sst2_batches

TINY = shape_from_dict("tiny-llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                          tie_word_embeddings=True))
SID = "0123456789abcdef0123456789abcdef"  # a uuid4 hex is 32 characters


def real_step(shape, setup: WireSetup, B: int, T: int, step: int) -> list[tuple[str, int]]:
    """Every message of one step, built with protocol.tensors.encode from random tensors as the edge and cloud do,
    in the order of the one step description (protocol.step.StepPlan); prompt / P-tuning's V tokens lengthen T."""
    up, down = (WIRE_DTYPES[d] for d in (setup.wire_up, setup.wire_down))
    T = T + setup.virtual_tokens
    r = lambda *s: torch.randn(*s)  # noqa: E731
    active = list(setup.active())
    plan = StepPlan(True, tuple(active), setup.groups() if active else ())
    width = lambda t, side: shape.linear(t)[side]  # noqa: E731
    def carried(wire):  # the carried mode's SiteWeights: the fields of its method per target of each active block
        if not setup.carried:
            return []
        fields = lambda t: carried_shapes(setup.method, setup.lora_rank, width(t, 0), width(t, 1),  # noqa: E731
                                          t in setup.feedforward)
        return [pb.SiteWeights(block=b, target=t, **{f: encode(r(*s), wire) for f, s in fields(t).items()})
                for b in active for t in setup.lora_targets]

    out = []
    for m in plan.messages():
        ts = plan.targets(m.group) if m.group else ()
        if m.kind == "begin":
            msg = pb.EdgeMessage(begin=pb.Begin(
                session_id=SID, step=step, train=True, hidden=encode(r(B, T, shape.hidden), up),
                attention_mask=encode(torch.ones(B, T, dtype=torch.bool), pb.BOOL),
                active_blocks=active if setup.lora_blocks else [], lora_weights=carried(up)))
        elif m.kind == "lora_request":
            msg = pb.CloudMessage(lora_request=pb.LoraRequest(block=m.block, group=m.group,
                                                              x=encode(r(B, T, width(ts[0], 0)), down)))
        elif m.kind == "lora_reply":
            msg = pb.EdgeMessage(lora_reply=pb.LoraReply(block=m.block, group=m.group,
                                                         outputs=[encode(r(B, T, width(t, 1)), up) for t in ts]))
        elif m.kind == "hidden":
            msg = pb.CloudMessage(hidden=pb.Hidden(hidden=encode(r(B, T, shape.hidden), down), cloud_seconds=0.0123))
        elif m.kind == "output_grad":
            msg = pb.EdgeMessage(output_grad=pb.OutputGrad(grad=encode(r(B, T, shape.hidden), up)))
        elif m.kind == "lora_grad_request":
            msg = pb.CloudMessage(lora_grad_request=pb.LoraGradRequest(
                block=m.block, group=m.group, grads=[encode(r(B, T, width(t, 1)), down) for t in ts]))
        elif m.kind == "lora_grad_reply":
            msg = pb.EdgeMessage(lora_grad_reply=pb.LoraGradReply(block=m.block, group=m.group,
                                                                  grad=encode(r(B, T, width(ts[0], 0)), up)))
        else:
            msg = pb.CloudMessage(input_grad=pb.InputGrad(grad=encode(r(B, T, shape.hidden), down), cloud_seconds=1.5,
                                                          lora_grads=carried(down)))
        out.append((m.direction, wire_size(msg)))
    return out


SETUPS = {
    "split": WireSetup(),
    "split-int8": WireSetup(wire_up="int8", wire_down="int8"),
    "split-bf16-fp16": WireSetup(wire_up="bf16", wire_down="fp16"),
    "dlora": dlora_setup(TINY),
    "dlora-kr": dlora_setup(TINY, active_fraction=0.5),
    "dlora-int8": dlora_setup(TINY, wire_up="int8", wire_down="int8"),
    "carried": carried_setup(TINY),
    "carried-kr-int8": carried_setup(TINY, wire_up="int8", wire_down="int8", active_fraction=0.5, rank=3),
    "dlora-all-targets": dlora_setup(TINY, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj")),
    "dora": method_setup(TINY, "lora", "carried", dora=True),
    "dora-kr-int8": method_setup(TINY, "lora", "carried", wire_up="int8", wire_down="bf16", dora=True, rank=3,
                                 targets=("o_proj", "down_proj"), active_fraction=0.5),
    "ia3": method_setup(TINY, "ia3", "carried"),
    "ia3-int8-own-targets": method_setup(TINY, "ia3", "carried", wire_up="int8", wire_down="int8",
                                         targets=("q_proj", "up_proj", "down_proj"), feedforward=("up_proj",)),
    "prompt": method_setup(TINY, "prompt", "none"),
    "ptuning-int8": method_setup(TINY, "ptuning", "none", wire_up="int8", wire_down="int8", prompt_tokens=7),
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
    c = step_traffic(TINY, carried_setup(TINY, rank=8), B, T)  # the weights up, their gradients down, no exchange
    lora = n * 8 * ((H + TINY.q_dim) + (H + TINY.kv_dim)) * 4  # A [8, H] and B [out, 8] of q and v per block
    assert (c.payload_up - split.payload_up, c.payload_down - split.payload_down) == (lora, lora)
    assert (c.messages_up, c.messages_down, c.round_trips) == (2, 2, 2)


# ---- against real training runs (tiny Llama, real edge and cloud over gRPC on loopback) ----------------------------
def kill_every_other(em, step):
    em.cloud.killed = set(em.cloud.lora_blocks[step % 2::2])


@pytest.mark.parametrize("kw", [
    dict(cloud_lora="none"),
    dict(cloud_lora="edge"),
    dict(cloud_lora="edge", kr=kill_every_other),
    dict(cloud_lora="none", wire_up="int8", wire_down="int8"),
    dict(cloud_lora="edge", wire_up="int8", wire_down="int8"),
    dict(cloud_lora="edge", lora_targets=("q_proj", "o_proj", "up_proj", "gate_proj", "down_proj")),
    dict(cloud_lora="carried"),
    dict(cloud_lora="carried", kr=kill_every_other, wire_up="bf16", wire_down="int8", lora_targets=("o_proj", "up_proj")),
], ids=["split", "dlora", "dlora+kr", "split-int8", "dlora-int8", "dlora-mixed-groups", "carried", "carried+kr-mixed"])
def test_a_real_step_crosses_exactly_the_simulated_messages(cloud, tiny, kw):
    """The edge's link and the simulator walk the same step description: every message of a real step (kind,
    direction, block, group, wire bytes, payload bytes) is the one the simulator predicts, in the same order."""
    kill = kw.pop("kr", None)
    em, _, link = make_edge(cloud, tiny, **kw)
    shape = TINY
    for step, b in enumerate(sst2_batches(3)):
        if kill:
            kill(em, step)
        em.cloud.step = step
        loss, _ = em.loss(b)
        loss.backward()
        B, T = b.input_ids.shape
        targets = tuple(kw.get("lora_targets", ("q_proj", "v_proj")))
        if kw["cloud_lora"] != "none":
            setup = dlora_setup(shape, 1, 1, kw.get("wire_up", "fp32"), kw.get("wire_down", "fp32"), targets,
                                carried=kw["cloud_lora"] == "carried")
            setup = WireSetup(**{**setup.__dict__, "active_blocks": tuple(em.cloud.active_blocks())})
        else:
            setup = WireSetup(1, 1, kw.get("wire_up", "fp32"), kw.get("wire_down", "fp32"))
        assert em.cloud.last_traffic.messages == step_traffic(shape, setup, B, T, step=step).messages
    stats = link.close()
    assert stats.steps == 3


@pytest.mark.slow
def test_carried_moves_under_8_percent_of_dloras_bytes_on_the_demo_settings():
    """SmolLM2, the demo's defaults (SST-2, batch 8, k = m = 1, q,v, r = 8, fp32), the first client's first 80
    batches as its trainer draws them: the carried mode's bytes over DLoRA's, both ways, from tensor shapes."""
    from itertools import islice

    import tasks as T
    from cli.demo import DemoConfig
    from edge.config import EdgeConfig
    from edge.data import load_items
    from model.load import load_tokenizer
    from model.training import endless_batches
    demo = DemoConfig()
    tok = load_tokenizer("smollm2")
    cfg = EdgeConfig.of(task=demo.task, shard=0, num_shards=demo.clients, batch_size=demo.batch_size, seed=demo.seed)
    items = load_items(cfg, tok, "train")
    shape = load_shape("smollm2")
    totals = {"dlora": 0, "carried": 0}
    for b in islice(endless_batches(T.TASKS[demo.task], items, demo.batch_size, tok.pad_token_id, demo.seed),
                    demo.steps):
        B, T_ = b.input_ids.shape
        for name, setup in (("dlora", dlora_setup(shape)), ("carried", carried_setup(shape))):
            t = step_traffic(shape, setup, B, T_)
            totals[name] += t.bytes_up + t.bytes_down
    assert totals["carried"] / totals["dlora"] <= 0.08, totals
