"""Cost model: shapes from config.json, hand-computed FLOPs, memory against what autograd keeps, time arithmetic and
the monotonic behaviour a user relies on when asking "what if"."""
from __future__ import annotations

import dataclasses

import pytest

from sim.costmodel import (PATHS, Workload, activation_elements_per_token, block_compute, predict, predict_all)
from sim.profiles import DeviceProfile, LinkProfile, device_profile, link_profile, rate_link
from sim.shape import load_shape, shape_from_dict

# H=8, I=16, 4 blocks, 2 heads of 4 (1 KV head), vocab 10: small enough to count FLOPs by hand.
HAND = shape_from_dict("hand", dict(hidden_size=8, intermediate_size=16, num_hidden_layers=4, num_attention_heads=2,
                                    num_key_value_heads=1, vocab_size=10, tie_word_embeddings=True))
W = Workload(batch=2, seq=3, rank=2, k=1, m=1)
DEV = DeviceProfile("test", flops=1e3, memory_bandwidth=1e12, memory=1e12, dtype_bytes=4, codec=1e12, source="test")
FAST = rate_link(1e9, rtt=0.0)


def test_shipped_configs_have_the_published_parameter_counts():
    assert load_shape("smollm2").total_params == 134_515_008
    assert load_shape("llama-7b").total_params == 6_738_415_616
    assert load_shape("llama-70b").total_params == 68_976_648_192
    s = load_shape("smollm2-135m")
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.head_dim, s.q_dim, s.kv_dim) == (576, 30, 9, 3, 64, 576, 192)


def test_a_config_json_path_loads(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, '
                                          '"num_hidden_layers": 4, "num_attention_heads": 2, "vocab_size": 10}')
    s = load_shape(str(tmp_path))
    assert (s.kv_heads, s.head_dim, s.tied_embeddings) == (2, 4, False)
    with pytest.raises(FileNotFoundError):
        load_shape(str(tmp_path / "nope"))


def test_block_flops_by_hand():
    # linears: q 8x8, k 8x4, v 8x4, o 8x8, gate/up/down 8x16 -> 576 weights; t = B*T = 6 tokens
    fwd = block_compute(HAND, 2, 3, backward=False)
    assert fwd.forward == 2 * 6 * 576 + 4 * 2 * 3 * 3 * 8  # 6912 linear + 576 attention
    frozen = block_compute(HAND, 2, 3)
    assert frozen.backward == 6912 + 2 * 576  # input gradients of the linears, attention backward twice its forward
    lowest = block_compute(HAND, 2, 3, input_grad=False)
    assert lowest.backward == 6912 - 2 * 6 * (64 + 32 + 32) + 2 * 576  # no q/k/v input gradients
    trained = block_compute(HAND, 2, 3, train_weights=True)
    assert trained.backward == 2 * 6912 + 2 * 576
    lora = block_compute(HAND, 2, 3, lora=("q_proj", "v_proj"), rank=2)
    assert lora.forward - fwd.forward == 2 * 6 * 2 * ((8 + 8) + (8 + 4))  # 672


def test_split_and_dlora_flops_by_hand():
    split = predict(HAND, "split", W, DEV, DEV, FAST)
    assert split.cloud.flops == 2 * (7488 + 8064)  # two frozen cloud blocks, forward + input-gradient backward
    # edge: block 0 (LoRA, no input gradient) + block 3 (LoRA) + LM head at B positions (forward + dX)
    assert split.edge.flops == (7488 + 672 + 6528 + 1344) + (7488 + 672 + 8064 + 1344) + 2 * 320
    dlora = predict(HAND, "dlora", W, DEV, DEV, FAST)
    assert dlora.edge.flops - split.edge.flops == 2 * (672 + 1344)  # the cloud blocks' LoRA, on the edge
    assert dlora.cloud.flops == split.cloud.flops


def test_frozen_block_memory_matches_what_autograd_keeps():
    """Sum the tensors autograd saves through real (tiny, random) Llama blocks run like the cloud runs them."""
    import torch
    from model.segments import BlockRun
    from sim.calibrate import _llama
    shape = shape_from_dict("t", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    model = _llama(shape, 2)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    B, T = 2, 32
    x = torch.randn(B, T, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        BlockRun(model, range(2))(x, torch.ones(B, T, dtype=torch.long))
    predicted = activation_elements_per_token(shape) * B * T * 2 * 4
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.10)


def test_local_paths_send_nothing_and_remote_paths_send_exact_bytes():
    s = load_shape("smollm2")
    w = Workload(batch=4, seq=50)
    costs = {c.path: c for c in predict_all(s, w, DEV, DEV, FAST)}
    assert set(costs) == set(PATHS)
    for p in ("local-full", "local-peft", "offsite"):
        assert costs[p].bytes_total == 0 and costs[p].cloud.flops == 0
    assert costs["offsite"].one_time_bytes > 0
    assert costs["split"].bytes_up == 921_900  # exact: see tests/test_sim_wire.py for where these come from
    assert costs["dlora"].bytes_total > 30 * costs["split"].bytes_total
    # carried: split's messages plus the LoRA of the 28 cloud blocks (q, v; r = 8, fp32) up and their gradients down
    lora = 28 * s.lora_params(8, ("q_proj", "v_proj")) * 4
    assert costs["carried"].round_trips == costs["split"].round_trips == 2
    framing = costs["carried"].bytes_up - costs["split"].bytes_up - lora  # the active block list, 56 SiteWeights
    assert 0 < framing < 28 + 56 * 50
    assert costs["carried"].cloud.flops > costs["split"].cloud.flops  # the cloud runs the carried LoRA
    assert 0 < costs["federated"].bytes_up < costs["split"].bytes_up


def test_step_time_is_the_sum_of_its_sequential_phases():
    s = load_shape("smollm2")
    link = LinkProfile("l", 50e6, 20e6, 0.004, "test")
    for path in ("split", "dlora", "local-peft"):
        c = predict(s, path, Workload(batch=4, seq=50), DEV, DEV, link)
        assert sum(p.seconds for p in c.phases) == pytest.approx(c.step_s, rel=1e-9)
        assert c.latency_s == pytest.approx(c.messages * 0.002)
    c = predict(s, "split", Workload(batch=4, seq=50), DEV, DEV, link)
    up, down = c.traffic.bytes_up, c.traffic.bytes_down
    framing, eff = 1 + 9 / 16384, 1448 / 1514
    assert c.transfer_s == pytest.approx((up * 8 / 50e6 + down * 8 / 20e6) * framing / eff)


def test_what_if_monotonicity():
    s = load_shape("llama-7b")
    edge, cloud = device_profile("rtx-4090"), device_profile("h100-sxm")
    w = Workload(batch=8, seq=256, wire_up="bf16", wire_down="bf16")
    rates = [10e6, 100e6, 1e9, 10e9]
    for path in ("split", "dlora", "federated"):
        times = [predict(s, path, w, edge, cloud, rate_link(r)).step_s for r in rates]
        assert times == sorted(times, reverse=True), path
    local = [predict(s, "local-peft", w, edge, cloud, rate_link(r)).step_s for r in rates]
    assert len(set(local)) == 1
    bytes_of = lambda path, **kw: predict(s, path, dataclasses.replace(w, **kw), edge, cloud, FAST).bytes_total  # noqa
    assert bytes_of("split", batch=16) == pytest.approx(2 * bytes_of("split"), rel=1e-4)
    assert bytes_of("split", k=1) == bytes_of("split", k=10)  # the cut moves no bytes in split ...
    assert bytes_of("dlora", k=1) > bytes_of("dlora", k=10)  # ... but fewer cloud blocks mean fewer LoRA exchanges
    fractions = [bytes_of("dlora", active_fraction=f) for f in (0.25, 0.5, 1.0)]
    assert fractions == sorted(fractions)
    assert bytes_of("split", wire_up="int8", wire_down="int8") < 0.55 * bytes_of("split")
    assert bytes_of("split", wire_up="fp32", wire_down="fp32") == pytest.approx(2 * bytes_of("split"), rel=1e-4)


def test_memory_tells_what_fits():
    s = load_shape("llama-7b")
    edge, cloud = device_profile("rtx-4090"), device_profile("h100-sxm")
    w = Workload(batch=8, seq=256, wire_up="bf16", wire_down="bf16")
    c = {x.path: x for x in predict_all(s, w, edge, cloud, link_profile("100mbit"))}
    assert not c["local-full"].edge_fits  # 7B with AdamW states is far beyond 24 GB
    assert c["split"].edge_fits and c["split"].cloud_fits
    assert c["split"].edge.peak_bytes < c["local-peft"].edge.peak_bytes
    assert c["dlora"].edge.peak_bytes > c["split"].edge.peak_bytes  # it keeps the cloud LoRA inputs/outputs


def test_link_specs():
    assert link_profile("100mbit").up_bps == 100e6
    assert link_profile("1gbit", rtt=0.05).rtt == 0.05
    assert link_profile("lte").down_bps == 40e6
    with pytest.raises(ValueError):
        link_profile("fast")
    with pytest.raises(ValueError):
        device_profile("abacus")
