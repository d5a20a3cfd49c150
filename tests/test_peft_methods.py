"""The PEFT methods other than plain LoRA across the cut — rsLoRA, DoRA, (IA)³ — give the same model as PEFT's own
implementation trained locally on the full model with the same placement; bad method options fail before any step."""
from __future__ import annotations

import copy

import pytest
import torch

import tasks as T
from edge.config import EdgeConfig
from edge.methods import check_method
from protocol import pb
from protocol.step import StepPlan
from tests.conftest import assert_peft_reproduces_edge, make_edge, sst2_batches, train_edge_steps
from tests.reference import peft_local as ref

STEPS, LR = 20, 1e-2
CASES = {  # name -> (flags, what the cloud blocks carry)
    "rslora-edge": (dict(lora_rslora=True, cloud_lora="edge"), None),
    "rslora-carried": (dict(lora_rslora=True, cloud_lora="carried"), "lora"),
    "dora-local": (dict(lora_dora=True, cloud_lora="none"), None),
    "dora-carried": (dict(lora_dora=True, cloud_lora="carried", lora_targets=("q_proj", "v_proj", "down_proj")),
                     "dora"),
    "ia3-local": (dict(peft="ia3", cloud_lora="none"), None),
    "ia3-carried": (dict(peft="ia3", cloud_lora="carried"), "ia3"),
}


def perturb(tuner, seed: int = 1, std: float = 0.05) -> None:
    """PEFT starts LoRA's B at zero and (IA)³ at one; a perturbed start makes the checks see every path at step 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuner.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def edge_logits(em, batch):
    _, logits = em.loss(batch)
    return logits


@pytest.mark.parametrize("case", CASES)
def test_twenty_steps_match_peft_and_the_adapter_loads_there(cloud, tiny, tmp_path, case):
    flags, carried = CASES[case]
    em, _, link = make_edge(cloud, tiny, **flags)
    assert em.cloud.carried == carried
    perturb(em.lora)
    pm = ref.peft_model(copy.deepcopy(tiny.model), em.lora)  # PEFT's implementation, same sites, same weights
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == sum(p.numel() for p in em.lora.parameters())
    batches = sst2_batches(STEPS)
    ref_losses, _ = ref.train_steps(pm, T.TASKS["sst2"], batches, LR)
    split_losses = train_edge_steps(em, batches, LR)
    rel = [abs(a - b) / abs(b) for a, b in zip(split_losses, ref_losses)]
    assert max(rel) <= 1e-4, rel
    assert split_losses[-1] < split_losses[0]
    if carried:  # what rode the last step: exactly the method's fields for every site of every cloud block
        fields = {"lora": {"a", "b"}, "dora": {"a", "b", "magnitude"}, "ia3": {"scale"}}[carried]
        sent = em.cloud.carried_weights()
        assert len(sent) == len(em.cloud.lora_blocks) * len(em.cloud.targets)
        assert all({f.name for f, v in w.ListFields() if isinstance(v, pb.Tensor)} == fields for w in sent)

    assert_peft_reproduces_edge(em, tiny.model, tmp_path / "adapter", batches[:3])
    link.close()


def test_ia3_carries_vectors_not_activations(cloud, tiny):
    """(IA)³ on the cloud's blocks: each step carries one vector per site up and its gradient down, a few hundred
    bytes per block, and no exchange: the step's messages are frozen split's."""
    em, _, link = make_edge(cloud, tiny, peft="ia3", cloud_lora="carried")
    batch = sst2_batches(1)[0]
    train_edge_steps(em, [batch], LR)
    traffic = em.cloud.last_traffic
    assert [m.kind for m in traffic.messages] == [e.kind for e in StepPlan(train=True).messages()]  # no exchange
    vectors = sum(p.numel() for b in em.cloud.lora_blocks for t in em.cloud.targets
                  for p in em.lora.site(b, t).carried().values())
    assert vectors == len(em.cloud.lora_blocks) * (2 * 32 + 128)  # k, v: [out = 32, 1]; down_proj: [1, in = 128]
    tokens = batch.input_ids.numel()
    begin, _, _, input_grad = traffic.messages
    assert begin.payload_bytes == tokens * 64 * 4 + tokens + 4 * vectors  # hidden fp32, mask one byte, vectors fp32
    assert input_grad.payload_bytes == tokens * 64 * 4 + 4 * vectors  # dL/d hidden, the vectors' gradients
    link.close()


BAD = {  # flags -> the fix the one line names
    (("peft", "ia3"), ("lora_r", 4)): "--lora-r is an option of --peft lora, not of --peft ia3",
    (("ia3_targets", ("k_proj",)),): "--ia3-targets is an option of --peft ia3, not of --peft lora",
    (("peft", "ia3"), ("cloud_lora", "edge")): "--peft ia3 takes --cloud-lora none or carried",
    (("lora_dora", True), ("cloud_lora", "edge")): "--lora-dora needs the base weights",
    (("peft", "prompt"), ("cloud_lora", "carried")): "--peft prompt takes --cloud-lora none, not carried",
    (("peft", "prompt"), ("prompt_tokens", 0)): "--prompt-tokens must be at least 1",
    (("peft", "ptuning"), ("prompt_init_text", "great")): "--prompt-init-text is prompt tuning's",
    (("peft", "ia3"), ("kr", True)): "--kr (Kill & Revive) switches LoRA blocks",
    (("peft", "adapter"), ("cloud_lora", "carried")): "--peft adapter takes --cloud-lora none or edge",
    (("adapter_reduction", 8),): "--adapter-reduction is an option of --peft adapter, not of --peft lora",
}


@pytest.mark.parametrize("flags", BAD, ids=lambda f: ",".join(k for k, _ in f))
def test_bad_method_options_are_one_line_before_anything_loads(flags):
    with pytest.raises(ValueError) as e:
        check_method(EdgeConfig.of(**dict(flags)))
    assert BAD[flags] in str(e.value) and "\n" not in str(e.value)


def test_a_target_the_family_lacks_is_refused_before_any_step(cloud, tiny):
    with pytest.raises(ValueError, match="no module 'c_attn' in a llama block"):
        make_edge(cloud, tiny, peft="ia3", ia3_targets=("c_attn",))
    with pytest.raises(ValueError, match="not among the \\(IA\\)³ targets"):
        make_edge(cloud, tiny, peft="ia3", ia3_targets=("k_proj",), ia3_feedforward=("down_proj",))


def local_adapter_losses(tiny, blocks, state, batches) -> list[float]:
    """Tandem's own bottleneck adapters on the whole model, in one process (the yardstick: no library has them)."""
    from model.training import FitOptions, fit
    from model.tuners.adapter import AdapterConfig, AdapterSet
    model = copy.deepcopy(tiny.model)
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = AdapterSet(model, AdapterConfig(blocks=blocks))
    adapters.load_peft_state_dict(state)
    adapters.attach(model, blocks)
    def hidden(b):
        return model.base_model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
    run = fit(lambda b: T.loss_from_hidden(T.TASKS["sst2"], hidden(b), b, model.get_output_embeddings())[0],
              list(adapters.parameters()), batches, FitOptions(steps=len(batches), lr=LR))
    return run.losses


@pytest.mark.parametrize("cloud_lora", ["none", "edge"])
def test_bottleneck_adapters_match_a_local_run_and_reload(cloud, tiny, tmp_path, cloud_lora):
    """Adapters after o_proj and down_proj: 20 split steps (DLoRA-style branches on the cloud's blocks with --cloud-lora
    edge: the cloud sends each site's output) give the losses of the same adapters trained in one process on the
    full model; the saved folder loads back and reproduces the edge's logits."""
    from model.tuners.adapter import AdapterConfig, AdapterSet
    em, _, link = make_edge(cloud, tiny, peft="adapter", cloud_lora=cloud_lora)
    perturb(em.lora, std=0.02)
    blocks = em.lora.cfg.blocks
    assert blocks == ([0, 5] if cloud_lora == "none" else list(range(6)))
    batches = sst2_batches(STEPS)
    ref_losses = local_adapter_losses(tiny, blocks, em.lora.peft_state_dict(), batches)
    split_losses = train_edge_steps(em, batches, LR)
    rel = [abs(a - b) / abs(b) for a, b in zip(split_losses, ref_losses)]
    assert max(rel) <= 1e-4, rel
    assert split_losses[-1] < split_losses[0]
    if cloud_lora == "edge":  # two groups per cloud block (attn_out, mlp_out), each a request and a reply both ways
        assert em.cloud.last_traffic.messages_down == 2 + 2 * 2 * len(em.cloud.lora_blocks)

    em.lora.save_peft(tmp_path / "adapter", "tiny-llama")
    model = copy.deepcopy(tiny.model)
    again = AdapterSet(model, AdapterConfig(blocks=blocks))
    again.load_peft(tmp_path / "adapter")
    again.attach(model, blocks)
    em.eval()
    with torch.no_grad():
        for b in batches[:3]:
            full = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            rows = torch.arange(len(b))
            assert (edge_logits(em, b) - full[rows, b.answer_pos]).abs().max().item() <= 1e-4
    link.close()
