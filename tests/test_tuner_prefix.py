"""Prefix tuning / P-tuning v2 (model/tuners/prefix.py): keys and values trained on the edge in front of every
layer's attention, the cloud blocks' carried with each step.

Through the gRPC cloud it trains as PEFT's own implementation does on the full model; the adapter it saves is PEFT's
and loads with `PeftModel.from_pretrained`; the cloud receives exactly the cloud blocks' prefixes and returns their
gradients; and what cannot work is refused before any step, in one line.
"""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import tasks as T
from edge.config import EdgeConfig
from edge.methods import check_method
from model.segments import BlockRun, EdgeBottom, EdgeTop, cut_of
from model.tuners.prefix import PrefixConfig, PrefixSet
from protocol import pb
from protocol.step import StepPlan
from tests.cli_helpers import refused
from tests.conftest import (TOKENS, CloudHandle, assert_peft_reproduces_edge, make_edge, sst2_batches,
                            train_edge_steps)
from tests.reference import peft_local as ref

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, LR, V = 20, 1e-2, 5
L, KV_HEADS, HEAD_DIM, H = 6, 2, 16, 64  # tiny-llama: 6 blocks, GQA with 2 of 4 heads for keys and values
PROJECTIONS = {"v2": None, "projection": 16}


def peft_reference(model, ps: PrefixSet):
    """PEFT's own model of the set's config on a copy of the full model, with the set's weights (the whole encoder:
    PEFT's saved form holds only its output)."""
    pm = peft.get_peft_model(copy.deepcopy(model), ps.peft_config())
    pm.prompt_encoder["default"].load_state_dict(ps.encoder.state_dict())
    return pm


def peft_hidden(pm, batch: T.Batch) -> torch.Tensor:
    out = pm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return out.hidden_states[-1]


def train_peft(pm, batches) -> list[float]:
    return ref.train_steps(pm, T.TASKS["sst2"], batches, LR, hidden_of=peft_hidden)[0]


def randomize(ps: PrefixSet, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ps.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ---------------------------------------------------------------------------------------------- the set vs PEFT

@pytest.mark.parametrize("kind", PROJECTIONS)
def test_the_segments_with_prefixes_are_peft_s_forward(tiny, kind):
    """PEFT's own encoder and parameter count; the saved form is get_peft_model_state_dict's; the three segments run
    with the set's prefixes give PEFT's final hidden state on padded batches (positions from V, V ones in the mask)."""
    ps = PrefixSet(tiny.model, PrefixConfig(V, PROJECTIONS[kind]))
    randomize(ps)
    pm = peft_reference(tiny.model, ps).eval()
    assert type(pm.prompt_encoder["default"]) is type(ps.encoder)
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == sum(p.numel() for p in ps.parameters())
    ours, theirs = ps.peft_state_dict(), peft.get_peft_model_state_dict(pm)
    assert set(ours) == set(theirs) == {"prompt_embeddings"}
    assert ours["prompt_embeddings"].shape == (V, L * 2 * KV_HEADS * HEAD_DIM)
    assert torch.equal(ours["prompt_embeddings"], theirs["prompt_embeddings"])
    pre = ps.prefixes()
    assert sorted(pre.kv) == list(range(L)) and pre.kv[3][0].shape == (KV_HEADS, V, HEAD_DIM)
    model, cut = tiny.model, cut_of(tiny.model, 1, 1)
    for b in sst2_batches(2):
        assert (b.attention_mask == 0).any()
        with torch.no_grad():
            h = EdgeBottom(model, cut)(b.input_ids, b.attention_mask, prefix=pre)
            h = BlockRun(model, cut.cloud)(h, b.attention_mask, pre.only(cut.cloud))
            h = EdgeTop(model, cut)(h, b.attention_mask, pre)
            want = peft_hidden(pm, b)
        real = b.attention_mask.bool()
        assert (h - want)[real].abs().max().item() <= 1e-5


def test_projection_saves_its_output_and_loads_as_peft_s_inference_table(tiny, tmp_path):
    """--prefix-projection sets PEFT's prefix_projection and encoder_hidden_size; the saved prefixes load back as a
    table with no MLP (PEFT's inference form) giving the same prefixes; a wrong --prefix-tokens is refused by shape."""
    ps = PrefixSet(tiny.model, PrefixConfig(V, 16))
    cfg = ps.peft_config()
    assert cfg.prefix_projection and cfg.encoder_hidden_size == 16 and cfg.num_attention_heads == KV_HEADS
    ps.save_peft(tmp_path / "a")
    again = PrefixSet(tiny.model, PrefixConfig(V, 16))
    again.load_peft(tmp_path / "a")
    assert again.inference and not hasattr(again.encoder, "transform")
    assert torch.equal(again.peft_state_dict()["prompt_embeddings"], ps.peft_state_dict()["prompt_embeddings"])
    with pytest.raises(ValueError, match="--prefix-tokens"):
        PrefixSet(tiny.model, PrefixConfig(V + 1)).load_peft(tmp_path / "a")


# ------------------------------------------------------------------------------------ through the gRPC cloud

@pytest.mark.parametrize("kind", PROJECTIONS)
def test_twenty_steps_match_peft_and_the_adapter_loads_in_peft(cloud, tiny, tmp_path, kind):
    em, _, link = make_edge(cloud, tiny, peft="prefix", cloud_lora="carried", prefix_tokens=V,
                            prefix_projection=PROJECTIONS[kind])
    ps = em.lora
    assert isinstance(ps, PrefixSet) and em.cloud.carried == "prefix" and em.cloud.lora_blocks == [1, 2, 3, 4]
    randomize(ps)  # PEFT's start is random too; a fixed one makes the reference the same model
    pm = peft_reference(tiny.model, ps)
    batches = sst2_batches(STEPS)
    ref_losses = train_peft(pm, batches)
    split_losses = train_edge_steps(em, batches, LR)
    rel = [abs(a - b) / abs(b) for a, b in zip(split_losses, ref_losses)]
    assert max(rel) <= 1e-4, rel
    assert split_losses[-1] < split_losses[0]
    gap = ps.peft_state_dict()["prompt_embeddings"] - peft.get_peft_model_state_dict(pm)["prompt_embeddings"]
    assert gap.abs().max().item() <= 1e-4

    full = assert_peft_reproduces_edge(em, tiny.model, tmp_path / "adapter", batches[:3])
    assert full.peft_config["default"].peft_type == "PREFIX_TUNING"
    link.close()


def test_the_cloud_receives_each_cloud_block_s_prefix_and_returns_its_gradient(cloud, tiny):
    """Per step: frozen split's messages; begin carries one SiteWeights per cloud block with exactly prefix_key and
    prefix_value [kv heads, V, head dim] (batch-free), input_grad their gradients; the bytes are exact."""
    em, _, link = make_edge(cloud, tiny, peft="prefix", cloud_lora="carried", prefix_tokens=V)
    batch = sst2_batches(1)[0]
    seen = []
    send = em.cloud.link.stream

    def spy(groups):
        stream = send(groups)
        orig = stream.send
        stream.send = lambda **kw: (seen.append(kw), orig(**kw))[1]
        return stream
    em.cloud.link.stream = spy
    train_edge_steps(em, [batch], LR)
    traffic = em.cloud.last_traffic
    assert [m.kind for m in traffic.messages] == [e.kind for e in StepPlan(train=True).messages()]
    begin = seen[0]["begin"]
    assert [(w.block, w.target) for w in begin.lora_weights] == [(b, "prefix") for b in (1, 2, 3, 4)]
    for w in begin.lora_weights:
        assert {f.name for f, v in w.ListFields() if isinstance(v, pb.Tensor)} == {"prefix_key", "prefix_value"}
        assert list(w.prefix_key.shape) == list(w.prefix_value.shape) == [KV_HEADS, V, HEAD_DIM]
    sent = 4 * 2 * KV_HEADS * V * HEAD_DIM  # floats of the cloud blocks' prefixes
    tokens = batch.input_ids.numel()
    b_msg, _, _, grad_msg = traffic.messages
    assert b_msg.payload_bytes == tokens * H * 4 + tokens + 4 * sent  # hidden fp32, mask one byte, prefixes fp32
    assert grad_msg.payload_bytes == tokens * H * 4 + 4 * sent  # dL/d hidden, the prefixes' gradients
    # the gradients reached the encoder: every layer's slice of the table moved, the cloud's included
    grad = em.lora.encoder.embedding.weight.grad.view(V, 2 * L, -1)
    assert all(grad[:, 2 * b].abs().sum() > 0 and grad[:, 2 * b + 1].abs().sum() > 0 for b in range(L))
    stats = link.close()
    assert stats.bytes_received == traffic.bytes_up and stats.bytes_sent == traffic.bytes_down


# --------------------------------------------------------------------------------------- refused before a step

BAD = {
    (("peft", "prefix"),): "--peft prefix takes --cloud-lora carried, not none",
    (("peft", "prefix"), ("cloud_lora", "carried"), ("prefix_tokens", 0)): "--prefix-tokens must be at least 1",
    (("peft", "prefix"), ("cloud_lora", "carried"), ("prefix_projection", 0)): "--prefix-projection must be at least 1",
    (("prefix_tokens", 8),): "--prefix-tokens is an option of --peft prefix, not of --peft lora",
    (("peft", "prompt"), ("prefix_projection", 8)): "--prefix-projection is an option of --peft prefix",
}


@pytest.mark.parametrize("flags", BAD, ids=lambda f: ",".join(f"{k}={v}" for k, v in f))
def test_bad_prefix_options_are_one_line_before_anything_loads(flags):
    with pytest.raises(ValueError) as e:
        check_method(EdgeConfig.of(**dict(flags)))
    assert BAD[flags] in str(e.value) and "\n" not in str(e.value)


def test_a_family_prefix_tuning_cannot_take_is_refused_before_any_step():
    """GPT-2 (learned positions, its own attention), and a Llama-shaped model with sliding-window layers."""
    from model.load import load_model
    gpt2 = load_model("tiny-gpt2")
    with pytest.raises(ValueError, match="--peft prefix runs on Llama-shaped decoders.*gpt2"):
        PrefixSet(gpt2.model, PrefixConfig(V))
    from transformers import MistralConfig, MistralForCausalLM
    mistral = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                               sliding_window=16))
    with pytest.raises(ValueError, match="full attention in every layer"):
        PrefixSet(mistral, PrefixConfig(V))


def test_a_prefix_longer_than_the_cloud_accepts_is_refused_before_any_step(tiny, tmp_path, capsys):
    """The cloud's max_prefix_tokens: the session does not open; one line naming --prefix-tokens; no step ran."""
    from cloud.sessions import CloudConfig
    small = CloudHandle(tiny.model, CloudConfig(max_prefix_tokens=8, step_timeout=5.0))
    try:
        with pytest.raises(ValueError) as e:
            make_edge(small, tiny, peft="prefix", cloud_lora="carried", prefix_tokens=9)
        msg = str(e.value)
        assert "\n" not in msg and "lower --prefix-tokens" in msg and "within 1..8" in msg, msg
        refused(capsys, ["edge", "train", "--cloud", small.address, "--token", TOKENS["alice"], "--model",
                         "tiny-llama", "--no-progress", "--peft", "prefix", "--cloud-lora", "carried",
                         "--prefix-tokens", "9", "--steps", "1", "--out-dir", str(tmp_path / "r")],
                r"lower --prefix-tokens")
        assert len(small.service.sessions) == 0
    finally:
        small.stop()
