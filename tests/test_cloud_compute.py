"""The cloud's compute layer without gRPC: the cloud segment with edge-branch sites, fed by a local exchange,
equals the same blocks with the LoRA hooked on locally (forward, input gradient and LoRA gradients)."""
from __future__ import annotations

import copy

import torch

from cloud.compute import CloudSegment, StepBranches, with_submodules
from model.tuners.lora import LoRAConfig, LoRASet
from model.segments import BlockRun
from model.sites import site_groups
from tests.conftest import randomize_lora_b

TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")


class LocalExchange:
    """The edge's side of DLoRA in-process: LoRA outputs and input gradients from a LoRASet."""

    def __init__(self, lora: LoRASet):
        self.lora, self.saved, self.calls = lora, {}, []

    def outputs(self, block, group, x, widths):
        self.calls.append(("outputs", block, group))
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            outs = [self.lora.site(block, t)(x) for t in dict(self.groups)[group]]
        assert [o.shape[-1] for o in outs] == widths
        self.saved[block, group] = (x, outs)
        return [o.detach() for o in outs]

    def input_grad(self, block, group, grads, x_shape):
        self.calls.append(("input_grad", block, group))
        x, outs = self.saved.pop((block, group))
        torch.autograd.backward(outs, grads)
        assert tuple(x.grad.shape) == tuple(x_shape)
        return x.grad


def test_segment_with_edge_branches_equals_locally_hooked_lora(tiny):
    torch.manual_seed(0)
    model = copy.deepcopy(tiny.model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = range(1, 5)
    lora = LoRASet(model, LoRAConfig(targets=TARGETS, blocks=list(blocks)))
    randomize_lora_b(lora)
    hidden = torch.randn(2, 7, model.config.hidden_size)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    active = [1, 3, 4]

    # reference: LoRA hooked onto the active blocks' linears, one process
    ref_lora = copy.deepcopy(lora)
    handles = ref_lora.attach(model, active)
    x_ref = hidden.clone().requires_grad_(True)
    out_ref = BlockRun(model, blocks)(x_ref, mask)
    out_ref.pow(2).sum().backward()
    for h in handles:
        h.remove()

    exchange = LocalExchange(lora)
    exchange.groups = site_groups("llama", TARGETS)
    branches = StepBranches(exchange, active, exchange.groups)
    x = hidden.clone().requires_grad_(True)
    out = CloudSegment(model).forward(x, mask, blocks, branches)
    out.pow(2).sum().backward()

    assert torch.allclose(out, out_ref, atol=1e-6)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    for name, p in lora.named_parameters():
        q = dict(ref_lora.named_parameters())[name]
        if q.grad is None:
            assert p.grad is None, name  # inactive block 2: untouched on both sides
        else:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    # one exchange per active block and input group, forward in order, backward in reverse
    groups = [g for g, _ in exchange.groups]
    forward = [("outputs", b, g) for b in active for g in groups]
    assert exchange.calls[:len(forward)] == forward
    assert exchange.calls[len(forward):] == [("input_grad", b, g) for b, g in reversed([c[1:] for c in forward])]


def test_with_submodules_shares_everything_but_the_replaced_module(tiny):
    block = tiny.model.model.layers[0]
    marker = torch.nn.Identity()
    clone = with_submodules(block, {"self_attn.q_proj": marker})
    assert clone.self_attn.q_proj is marker and block.self_attn.q_proj is not marker
    assert clone.self_attn.k_proj is block.self_attn.k_proj and clone.mlp is block.mlp
    assert clone.self_attn.k_proj.weight is block.self_attn.k_proj.weight
