"""The simulator knows every PEFT method (issue 13): its bytes equal a real gRPC step's for carried DoRA, carried
(IA)³, bottleneck adapters, prompt tuning, P-tuning and carried prefix tuning; the methods' compute by hand; which
paths each method has; `tandem sim --peft`."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sim.compute import Workload, attention_flops, block_compute, prefix_params
from sim.costmodel import PATHS, path_problem, paths_for, predict, predict_all
from sim.events import simulate
from sim.profiles import DeviceProfile, rate_link
from sim.shape import shape_from_dict
from sim.wire import IA3_FEEDFORWARD, IA3_TARGETS, method_setup, step_traffic
from tests.conftest import make_edge, sst2_batches

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- against real training steps (tiny Llama, real edge and cloud over gRPC on loopback) ---------------------------
def kill_every_other(em, step):
    em.cloud.killed = set(em.cloud.lora_blocks[step % 2::2])


REAL = {
    "dora-carried": dict(cloud_lora="carried", lora_dora=True),
    "dora-carried+kr-mixed": dict(cloud_lora="carried", lora_dora=True, lora_r=3, kr=kill_every_other,
                                  wire_up="bf16", wire_down="int8", lora_targets=("o_proj", "up_proj", "down_proj")),
    "dora-split": dict(cloud_lora="none", lora_dora=True),
    "ia3-carried": dict(peft="ia3", cloud_lora="carried"),
    "ia3-carried-own-targets-int8": dict(peft="ia3", cloud_lora="carried", wire_up="int8", wire_down="bf16",
                                         ia3_targets=("q_proj", "up_proj", "down_proj"), ia3_feedforward=("up_proj",)),
    "ia3-split": dict(peft="ia3", cloud_lora="none"),
    "adapter-dlora": dict(peft="adapter", cloud_lora="edge"),
    "adapter-dlora-bf16": dict(peft="adapter", cloud_lora="edge", wire_up="bf16", wire_down="bf16"),
    "prompt": dict(peft="prompt"),
    "prompt-7-int8": dict(peft="prompt", prompt_tokens=7, wire_up="int8", wire_down="int8"),
    "ptuning": dict(peft="ptuning", prompt_tokens=5),
    "prefix-carried": dict(peft="prefix", cloud_lora="carried", prefix_tokens=5),
    "prefix-projection-bf16-int8": dict(peft="prefix", cloud_lora="carried", prefix_tokens=3, prefix_projection=16,
                                        wire_up="bf16", wire_down="int8"),
    "prefix-v1-int8": dict(peft="prefix", cloud_lora="carried", prefix_tokens=1, wire_up="int8", wire_down="fp16"),
}


def sim_setup(shape, kw: dict, em):
    """The simulator's setup for the edge flags `kw`, with the blocks the edge ran this step."""
    setup = method_setup(shape, kw.get("peft", "lora"), kw.get("cloud_lora", "none"), 1, 1,
                         kw.get("wire_up", "fp32"), kw.get("wire_down", "fp32"),
                         kw.get("lora_targets", kw.get("ia3_targets")), kw.get("lora_r", 8), kw.get("lora_dora", False),
                         kw.get("ia3_feedforward"), prompt_tokens=kw.get("prompt_tokens", 20),
                         prefix_tokens=kw.get("prefix_tokens", 20), prefix_projection=kw.get("prefix_projection"))
    if setup.lora_blocks:
        setup = dataclasses.replace(setup, active_blocks=tuple(em.cloud.active_blocks()))
    return setup


@pytest.mark.parametrize("name", REAL)
def test_a_real_step_of_every_method_crosses_exactly_the_simulated_messages(cloud, tiny, name):
    """Three training steps (AdamW on the edge's weights) through the gRPC cloud: every message the edge's link
    counted (kind, direction, wire bytes, payload bytes) is the one the simulator predicts, in the same order."""
    kw = dict(REAL[name])
    kill = kw.pop("kr", None)
    em, _, link = make_edge(cloud, tiny, **kw)
    shape = shape_from_dict("tiny-llama", tiny.model.config.to_dict())
    opt = torch.optim.AdamW(em.lora.parameters(), lr=1e-2)
    for step, b in enumerate(sst2_batches(3)):
        if kill:
            kill(em, step)
        em.cloud.step = step
        opt.zero_grad(set_to_none=True)
        loss, _ = em.loss(b)
        loss.backward()
        opt.step()
        setup = sim_setup(shape, kw, em)
        assert tuple(em.cloud.targets) == setup.lora_targets  # the carried sites, in the edge's order
        B, T = b.input_ids.shape
        real = em.cloud.last_traffic
        sim = step_traffic(shape, setup, B, T, step=step)
        assert real.messages == sim.messages
        assert (real.bytes_up, real.bytes_down) == (sim.bytes_up, sim.bytes_down)
    assert link.close().steps == 3


def test_ia3_defaults_are_peft_s():
    from model.tuners.ia3 import default_targets
    assert default_targets("llama") == (IA3_TARGETS, IA3_FEEDFORWARD)


# ---- the cost model ------------------------------------------------------------------------------------------------
# H=8, I=16, 4 blocks, 2 heads of 4 (1 KV head), vocab 10: small enough to count FLOPs by hand.
HAND = shape_from_dict("hand", dict(hidden_size=8, intermediate_size=16, num_hidden_layers=4, num_attention_heads=2,
                                    num_key_value_heads=1, vocab_size=10, tie_word_embeddings=True))
W = Workload(batch=2, seq=3, rank=2, k=1, m=1)  # t = 6 tokens; blocks 1 and 2 on the cloud
DEV = DeviceProfile("test", flops=1e3, memory_bandwidth=1e12, memory=1e12, dtype_bytes=4, codec=1e12, source="test")
FAST = rate_link(1e9, rtt=0.0)


def cost(path, **kw):
    return predict(HAND, path, dataclasses.replace(W, **kw), DEV, DEV, FAST)


def test_carried_ia3_costs_the_cloud_elementwise_scales_only():
    # default sites: k (out 4), v (out 4) scaled at their output, down_proj (in 16) at its input: d = 24 per block
    split, ia3 = cost("split"), cost("carried", peft="ia3")
    t, d = 6, 4 + 4 + 16
    assert ia3.cloud.flops - split.cloud.flops == 2 * (t * d + 3 * t * d)  # forward t*d, backward 3*t*d
    assert ia3.cloud.flops / split.cloud.flops < 1.1
    # the edge trains the vectors of its two blocks (local) and of the two cloud blocks (carried)
    assert ia3.edge.trained_params == 4 * d


def test_carried_dora_costs_the_cloud_the_weight_norm_every_step():
    lora, dora = cost("carried"), cost("carried", dora=True)
    t, r = 6, 2
    per_site = lambda i, o: 2 * o * r * i + 3 * o * i + 3 * t * o + 6 * t * o  # noqa: E731  norm, rescale fwd + bwd
    assert dora.cloud.flops - lora.cloud.flops == 2 * (per_site(8, 8) + per_site(8, 4))  # q and v, 2 cloud blocks
    assert dora.edge.trained_params - lora.edge.trained_params == 4 * (8 + 4)  # a magnitude [out] per site
    read = lambda c: sum(p.weight_bytes for p in c.phases if p.where == "cloud")  # noqa: E731
    assert read(dora) - read(lora) == 2 * 2 * (8 * 8 + 8 * 4) * 4  # the norm reads each site's W again
    assert dora.cloud.weight_bytes == lora.cloud.weight_bytes  # the same weights in memory


def test_prompt_runs_every_block_on_t_plus_v_tokens():
    V = 5
    p = cost("split", peft="prompt", prompt_tokens=V)
    assert p.cloud.flops == 2 * block_compute(HAND, 2, 3 + V).flops  # attention grows with (T + V)^2
    longer = cost("split", seq=3 + V)
    assert (p.bytes_up, p.bytes_down) == (longer.bytes_up, longer.bytes_down)  # the wire: a longer sequence
    # the edge: blocks 0 and 3 frozen on T + V tokens, block 0 passing gradients down to the prompts; head at B
    assert p.edge.flops == 2 * block_compute(HAND, 2, 3 + V).flops + 2 * (2 * 8 * 10 * 2)  # head fwd + dX
    assert p.edge.trained_params == V * 8
    pt = cost("split", peft="ptuning", prompt_tokens=V, ptuning_hidden=6)
    assert pt.edge.flops - p.edge.flops == 3 * 2 * V * (8 * 6 + 6 * 6 + 6 * 8)  # the encoder MLP, fwd + bwd
    assert pt.edge.trained_params == V * 8 + (8 * 6 + 6) + (6 * 6 + 6) + (6 * 8 + 8)


def test_each_method_has_the_paths_of_its_wire_patterns():
    assert paths_for(W) == PATHS
    assert "dlora" not in paths_for(dataclasses.replace(W, peft="ia3"))
    assert "dlora" not in paths_for(dataclasses.replace(W, dora=True))
    assert set(paths_for(dataclasses.replace(W, peft="prompt"))) == set(PATHS) - {"dlora", "carried"}
    for kw, path in ((dict(peft="ia3"), "dlora"), (dict(peft="prompt"), "carried"), (dict(dora=True), "dlora")):
        assert path_problem(path, dataclasses.replace(W, **kw))
        with pytest.raises(ValueError):
            cost(path, **kw)
    assert "does not model" in path_problem("split", dataclasses.replace(W, peft="bottleneck"))
    rows = predict_all(HAND, dataclasses.replace(W, peft="ptuning"), DEV, DEV, FAST)
    assert [c.path for c in rows] == list(paths_for(dataclasses.replace(W, peft="ptuning")))


def test_federated_exchanges_each_methods_adapter():
    lora, dora, ia3 = cost("federated"), cost("federated", dora=True), cost("federated", peft="ia3")
    prompt = cost("federated", peft="prompt", prompt_tokens=5)
    n, header = W.local_steps, 128
    assert lora.bytes_up * n == 4 * 4 * 2 * ((8 + 8) + (8 + 4)) + header * 4 * 4
    assert dora.bytes_up * n == lora.bytes_up * n + 4 * 4 * (8 + 4) + header * 4 * 2
    assert ia3.bytes_up * n == 4 * 4 * 24 + header * 4 * 3
    assert prompt.bytes_up * n == 4 * 5 * 8 + header


def test_the_cloud_runs_carried_dora_and_ia3_steps_alone():
    w = dataclasses.replace(W, batch=4, seq=64)
    for kw, batched in ((dict(), True), (dict(dora=True), False), (dict(peft="ia3"), False),
                        (dict(peft="prefix"), False), (dict(peft="prefix", prefix_projection=8), False)):
        c = predict(HAND, "carried", dataclasses.replace(w, **kw), DEV, DEV, FAST)
        assert all(p.alone != batched for p in c.phases if p.where == "cloud")
        assert (simulate(c, 4, DEV).mean_batch > 1) == batched


def test_prefix_attention_sees_v_more_keys_everywhere_and_only_the_begin_and_input_grad_grow():
    """Carried prefix tuning: every block's attention is T x (V + T) (its FLOPs grow with V, linearly), the linears
    still run on T tokens; the hidden states keep their T tokens, begin and input_grad carry each cloud block's
    key and value [kv heads, V, head dim]; the edge trains V x L x 2 x kv_dim (a table) and steps its optimizer."""
    split = cost("split")
    B, T, q_dim, kv_heads, head_dim, L = 2, 3, 8, 1, 4, 4
    flops = {}
    for V in (1, 5, 9):
        p = cost("carried", peft="prefix", prefix_tokens=V)
        assert attention_flops(HAND, B, T, V) - attention_flops(HAND, B, T) == 4 * B * T * V * q_dim
        assert p.cloud.flops == 2 * block_compute(HAND, B, T, prefix=V).flops
        assert p.cloud.flops - split.cloud.flops == 2 * 3 * 4 * B * T * V * q_dim  # 2 blocks, attention fwd + 2 bwd
        flops[V] = p.cloud.flops
        carried = 2 * 2 * kv_heads * V * head_dim * 4  # 2 cloud blocks, key and value, fp32
        assert p.payload_up - split.payload_up == p.payload_down - split.payload_down == carried
        assert p.messages == split.messages and p.round_trips == split.round_trips
        # the edge: its two frozen blocks' attention on V more keys, block 0 passing no gradient below it (its
        # prefix's comes from its attention); the head at B positions, forward and dX; the table computes nothing
        bottom, top = block_compute(HAND, B, T, input_grad=False, prefix=V), block_compute(HAND, B, T, prefix=V)
        assert p.edge.flops == bottom.flops + top.flops + 2 * (2 * 8 * 10 * B)
        assert bottom.flops - block_compute(HAND, B, T, input_grad=False).flops == 3 * 4 * B * T * V * q_dim
        assert p.edge.trained_params == V * L * 2 * kv_heads * head_dim
        local = cost("local-peft", peft="prefix", prefix_tokens=V)
        assert local.edge.trained_params == p.edge.trained_params
    assert flops[9] - flops[5] == flops[5] - flops[1] > 0
    proj = cost("carried", peft="prefix", prefix_tokens=5, prefix_projection=6)
    table = cost("carried", peft="prefix", prefix_tokens=5)
    kv = kv_heads * head_dim
    assert proj.edge.flops - table.edge.flops == 3 * 2 * 5 * (kv * 6 + 6 * L * 2 * kv)  # the encoder MLP, fwd + bwd
    assert proj.edge.trained_params == 5 * kv + kv * 6 + 6 + 6 * L * 2 * kv + L * 2 * kv
    assert (proj.bytes_up, proj.bytes_down) == (table.bytes_up, table.bytes_down)  # the wire never sees the MLP


@pytest.mark.parametrize("projection", [None, 16])
def test_prefix_parameters_are_prefix_sets(tiny, projection):
    """The trained weights the cost model counts are PrefixSet's (PEFT's PrefixEncoder: token_dim = kv_dim for GQA)."""
    from model.tuners.prefix import PrefixConfig, PrefixSet
    shape = shape_from_dict("tiny-llama", tiny.model.config.to_dict())
    assert shape.kv_heads < shape.heads  # GQA: the prefixes are sized by the kv heads
    for V in (1, 7):
        w = Workload(peft="prefix", prefix_tokens=V, prefix_projection=projection)
        ps = PrefixSet(tiny.model, PrefixConfig(V, projection))
        assert prefix_params(shape, w) == sum(p.numel() for p in ps.parameters())
        assert ps.prefix_shape() == [shape.kv_heads, V, shape.head_dim]


def test_prefix_has_only_the_carried_remote_path_and_its_mistakes_are_one_line():
    w = dataclasses.replace(W, peft="prefix")
    assert set(paths_for(w)) == set(PATHS) - {"split", "dlora"}
    assert "--cloud-lora carried" in path_problem("split", w) and "--cloud-lora carried" in path_problem("dlora", w)
    assert "--prefix-tokens must be at least 1" in path_problem("carried", dataclasses.replace(w, prefix_tokens=0))
    assert "--prefix-projection" in path_problem("local-peft", dataclasses.replace(w, prefix_projection=0))
    shape = HAND
    for kw, needle in ((dict(cloud_lora="none"), "takes --cloud-lora carried"),
                       (dict(cloud_lora="carried", prefix_tokens=0), "--prefix-tokens must be at least 1"),
                       (dict(cloud_lora="carried", active_fraction=0.5), "no Kill & Revive")):
        with pytest.raises(ValueError) as e:
            method_setup(shape, "prefix", **kw)
        assert needle in str(e.value) and "\n" not in str(e.value)
    setup = method_setup(shape, "prefix", "carried", prefix_tokens=4)
    assert setup.lora_targets == ("prefix",) and setup.virtual_tokens == 0 and setup.carried
    assert setup.carried_shapes(shape, "prefix") == {"prefix_key": [1, 4, 4], "prefix_value": [1, 4, 4]}


def test_federated_prefix_exchanges_its_table_or_its_encoder():
    n, header = W.local_steps, 128
    table = cost("federated", peft="prefix", prefix_tokens=5)
    assert table.bytes_up * n == 4 * 5 * 4 * 2 * 4 + header  # prompt_embeddings [V, L x 2 x kv_dim]
    proj = cost("federated", peft="prefix", prefix_tokens=5, prefix_projection=6)
    assert proj.bytes_up * n == 4 * proj.edge.trained_params + header * 5  # embedding, two linears with biases


# ---- the command line ----------------------------------------------------------------------------------------------
def test_predict_peft_lists_the_methods_paths(capsys):
    from sim.cli import main
    common = ["predict", "--model", "llama-7b", "--edge", "rtx-4090", "--cloud", "h100-sxm", "--links", "home-20-100"]
    main([*common, "--peft", "ia3", "--json"])
    rows = {r["path"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(PATHS) - {"dlora"}
    assert rows["carried"]["bytes_up"] > rows["split"]["bytes_up"]
    main([*common, "--peft", "prompt", "--prompt-tokens", "30"])
    out = capsys.readouterr().out
    assert "prompt tuning: 30 virtual tokens" in out
    assert any(line.split()[:2] == ["split", "prompt"] for line in out.splitlines())
    main([*common, "--lora-dora", "--paths", "split,carried"])
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["carried", "dora"] for line in out.splitlines())
    main([*common, "--peft", "prefix", "--prefix-tokens", "30", "--prefix-projection", "64"])
    out = capsys.readouterr().out
    assert "prefix tuning: 30 virtual keys and values" in out and "encoder MLP of hidden 64" in out
    assert any(line.split()[:2] == ["carried", "prefix"] for line in out.splitlines())
    assert not any(line.split()[:1] == ["split"] for line in out.splitlines())


@pytest.mark.parametrize("flags, needle", [
    (["--peft", "prompt", "--paths", "carried"], "--cloud-lora none"),
    (["--peft", "ia3", "--paths", "dlora"], "--peft ia3 has no dlora path"),
    (["--lora-dora", "--paths", "dlora"], "use carried"),
    (["--prompt-tokens", "5"], "--prompt-tokens is an option of --peft prompt and ptuning"),
    (["--peft", "ia3", "--lora-dora"], "--lora-dora is an option of --peft lora"),
    (["--peft", "prompt", "--prompt-tokens", "0"], "at least 1"),
    (["--peft", "ia3", "--ia3-feedforward", "q_proj"], "not among the (IA)³ targets"),
    (["--peft", "prefix", "--paths", "split"], "it takes --cloud-lora carried"),
    (["--peft", "prefix", "--paths", "dlora"], "--peft prefix has no dlora path"),
    (["--prefix-tokens", "5"], "--prefix-tokens is an option of --peft prefix, not of --peft lora"),
    (["--peft", "prompt", "--prefix-projection", "8"], "--prefix-projection is an option of --peft prefix"),
    (["--peft", "prefix", "--prefix-tokens", "0"], "--prefix-tokens must be at least 1"),
    (["--peft", "prefix", "--prefix-projection", "0"], "--prefix-projection must be at least 1"),
    (["--peft", "prefix", "--active-fraction", "0.5"], "Kill & Revive"),
])
def test_a_method_s_mistake_is_a_usage_error(flags, needle, capsys):
    from cli.main import main as tandem
    with pytest.raises(SystemExit) as e:
        tandem(["sim", "predict", "--model", "llama-7b", "--edge", "rtx-4090", "--cloud", "h100-sxm", *flags])
    assert e.value.code == 2 and needle in capsys.readouterr().err
