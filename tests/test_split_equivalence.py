"""Split, DLoRA and carried training through the gRPC cloud give the same model as local PEFT LoRA training."""
from __future__ import annotations

import copy

import pytest

import tasks as T
from tests.reference import peft_local as ref
from tests.conftest import (assert_peft_reproduces_edge, make_edge, randomize_lora_b, sst2_batches,
                            train_edge_steps)

STEPS, LR = 20, 1e-2


def train_split(em, batches):
    return train_edge_steps(em, batches, LR)


def max_rel_gap_to_peft(em, loaded, steps: int) -> float:
    """Train the edge (through the cloud) and PEFT on the full model from the same weights on the same batches;
    the largest relative loss difference over the steps."""
    randomize_lora_b(em.lora)
    pm = ref.peft_model(copy.deepcopy(loaded.model), em.lora)
    batches = sst2_batches(steps)
    ref_losses, _ = ref.train_steps(pm, T.TASKS["sst2"], batches, LR)
    split_losses = train_split(em, batches)
    return max(abs(a - b) / abs(b) for a, b in zip(split_losses, ref_losses))


@pytest.mark.parametrize("cloud_lora", ["none", "edge", "carried"])
def test_twenty_steps_match_local_peft(cloud, tiny, tmp_path, cloud_lora):
    em, _, link = make_edge(cloud, tiny, cloud_lora=cloud_lora)
    randomize_lora_b(em.lora)
    expected_blocks = [0, 5] if cloud_lora == "none" else [0, 1, 2, 3, 4, 5]
    assert em.lora.cfg.blocks == expected_blocks
    pm = ref.peft_model(copy.deepcopy(tiny.model), em.lora)  # same placement, same initial weights
    batches = sst2_batches(STEPS)
    assert any((b.attention_mask == 0).any() for b in batches), "padded batches must be covered"
    ref_losses, _ = ref.train_steps(pm, T.TASKS["sst2"], batches, LR)
    split_losses = train_split(em, batches)
    rel = [abs(a - b) / abs(b) for a, b in zip(split_losses, ref_losses)]
    assert max(rel) <= 1e-4, rel
    assert split_losses[-1] < split_losses[0]

    # The adapter the edge saves loads with PEFT onto the full model and reproduces the edge's logits.
    assert_peft_reproduces_edge(em, tiny.model, tmp_path / "adapter", batches[:3])
    link.close()


def test_all_linear_targets_match_local_peft(cloud, tiny):
    """LoRA on all seven linear modules of every block: four input groups per cloud block, one of them (down_proj)
    reading the MLP's [B, T, intermediate] activation rather than the hidden state."""
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    em, _, link = make_edge(cloud, tiny, cloud_lora="edge", lora_targets=targets)
    assert max_rel_gap_to_peft(em, tiny, 5) <= 1e-4
    assert em.cloud.last_traffic.messages_down == 2 + 2 * 4 * len(em.cloud.lora_blocks)
    link.close()


@pytest.mark.parametrize("cloud_lora", ["none", "edge"])
def test_gpt2_family_travels_the_same_wire(cloud_lora):
    """A second family (learned positions, Conv1D) needs a segment driver, not a new protocol."""
    from tests.conftest import CloudHandle
    from cloud.sessions import CloudConfig
    from model.load import load_model
    gpt2 = load_model("tiny-gpt2")
    handle = CloudHandle(gpt2.model, CloudConfig())
    try:
        em, _, link = make_edge(handle, gpt2, cloud_lora=cloud_lora, lora_targets=("c_attn", "c_fc"))
        assert max_rel_gap_to_peft(em, gpt2, 5) <= 1e-4
        if cloud_lora == "edge":  # c_attn and c_fc read different inputs: two round trips per cloud block
            assert em.cloud.last_traffic.messages_down == 2 + 2 * 2 * len(em.cloud.lora_blocks)
        link.close()
    finally:
        handle.stop()


def test_bf16_wire_trains_close_to_fp32(cloud, tiny):
    em32, _, l1 = make_edge(cloud, tiny, cloud_lora="edge")
    em16, _, l2 = make_edge(cloud, tiny, cloud_lora="edge", wire_up="bf16", wire_down="bf16")
    em16.lora.load_state_dict(em32.lora.state_dict())
    batches = sst2_batches(5)
    a, b = train_split(em32, batches), train_split(em16, batches)
    assert a != b  # the wire really is lossy ...
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 2e-2  # ... and training still follows fp32
    l1.close(), l2.close()
