"""The cloud's compute for one step: the frozen cloud blocks forward and backward, with no RPC in sight.

A session with LoRA on cloud blocks puts a branch on each adapted linear, as PEFT's `LoraLayer` wraps its base
layer: y = base(x) + branch(x). Each such site is an explicit module handed the step's context as a constructor
argument: for each step the cloud runs a shallow copy of each active block in which the adapted linears are replaced
by wrappers (`with_submodules`; parameters are shared, nothing is copied). No hook and no thread-local state is
involved, so concurrent steps of different sessions never see each other's sites. The step's `sites` object says
which blocks and sites are adapted and builds the wrapper (`wrap`):

  StepBranches / EdgeBranchLinear    DLoRA: the branch is computed on the edge, reached through an `exchange`
                                     (`LoRAExchange`: over gRPC the cloud's half of the Step stream, cloud/stream.py;
                                     in a test a local LoRA). The cloud never holds the LoRA weights.
  CarriedLoRA / CarriedLoRALinear,   carried mode: the weights (LoRA, DoRA, (IA)³) came with the step; the site is
  CarriedDoRALinear,                 computed here, with model/tuners/' math, on autograd leaves whose gradients go
  CarriedIA3Linear                   back to the edge. Nothing outlives the step.
  CarriedPrefix                      carried prefix tuning: each block's keys and values came with the step; no
                                     linear is wrapped, the segment's context puts them in front (model/tuners/prefix.py).
"""
from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import nn

from model.segments import family_of, linear_dims
from model.tuners.ia3 import ia3_forward
from model.tuners.lora import dora_adapted, lora_delta
from model.tuners.prefix import LayerPrefixes
from protocol.step import prefix_shapes


class LoRAExchange(Protocol):
    def outputs(self, block: int, group: str, x: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
        """scaling * B A x for each target of the group (the edge computes it)."""

    def input_grad(self, block: int, group: str, grads: list[torch.Tensor], x_shape) -> torch.Tensor:
        """dL/dx (of shape `x_shape`) of the group's shared input, from dL/d(output) of each target."""


class _EdgeBranch(torch.autograd.Function):
    """Forward: the group's branch outputs from the exchange. Backward: the input gradient from the exchange."""

    @staticmethod
    def forward(ctx, x, exchange: LoRAExchange, block: int, group: str, widths: list[int]):
        ctx.exchange, ctx.block, ctx.group, ctx.x_shape = exchange, block, group, tuple(x.shape)
        return tuple(exchange.outputs(block, group, x, widths))

    @staticmethod
    def backward(ctx, *grads):
        return ctx.exchange.input_grad(ctx.block, ctx.group, list(grads), ctx.x_shape), None, None, None, None


class StepBranches:
    """The DLoRA branches of one step: the active blocks, the session's input groups, and the group outputs that
    have been fetched but not yet added (q and v share one input, so one exchange serves both)."""

    def __init__(self, exchange: LoRAExchange, active_blocks, groups: tuple[tuple[str, tuple[str, ...]], ...],
                 on_output: bool = False):
        self.exchange = exchange
        self.on_output = on_output  # the branch reads the site's output (bottleneck adapters), not its input
        self.active = set(active_blocks)
        self.groups = groups
        self.group_of = {t: g for g, ts in groups for t in ts}
        self._pending: dict[tuple[int, str], torch.Tensor] = {}

    def delta(self, block: int, target: str, x: torch.Tensor, widths: dict[str, int]) -> torch.Tensor:
        if (block, target) not in self._pending:
            group = self.group_of[target]
            group_targets = dict(self.groups)[group]
            outs = _EdgeBranch.apply(x, self.exchange, block, group, [widths[t] for t in group_targets])
            self._pending.update({(block, t): o for t, o in zip(group_targets, outs)})
        return self._pending.pop((block, target))


    def wrap(self, base: nn.Module, block: int, site: str, widths: dict[str, int]) -> nn.Module:
        return EdgeBranchLinear(base, block, site, self, widths, self.on_output)

    @property
    def sites(self):
        return self.group_of


class EdgeBranchLinear(nn.Module):
    """A frozen cloud linear plus a branch computed on the edge: y + branches.delta(block, target, x) for y = base(x)
    (LoRA), or y + branches.delta(block, target, y) with `on_output` (a bottleneck adapter after the linear)."""

    def __init__(self, base: nn.Module, block: int, target: str, branches: StepBranches, widths: dict[str, int],
                 on_output: bool = False):
        super().__init__()
        self.base, self.block, self.target, self.branches, self.widths = base, block, target, branches, widths
        self.on_output = on_output

    def forward(self, x):
        out = self.base(x)
        return out + self.branches.delta(self.block, self.target, out if self.on_output else x, self.widths).to(out.dtype)


class CarriedLoRALinear(nn.Module):
    """A frozen cloud linear plus a LoRA whose weights came with the step: base(x) + scaling * B A x."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float):
        super().__init__()
        self.base, self.a, self.b, self.scaling = base, a, b, scaling

    def forward(self, x):
        out = self.base(x)
        return out + lora_delta(x, self.a, self.b, self.scaling).to(out.dtype)


class CarriedDoRALinear(nn.Module):
    """A frozen cloud linear plus a DoRA whose A, B and magnitude came with the step (model/tuners/lora.py)."""

    def __init__(self, base: nn.Module, weight: torch.Tensor, a, b, magnitude, scaling: float):
        super().__init__()
        self.base, self.weight, self.a, self.b, self.magnitude, self.scaling = base, weight, a, b, magnitude, scaling

    def forward(self, x):
        return dora_adapted(self.base, self.weight, x, self.base(x), self.a, self.b, self.magnitude, self.scaling)


class CarriedIA3Linear(nn.Module):
    """A frozen cloud linear rescaled by an (IA)³ vector that came with the step (model/tuners/ia3.py)."""

    def __init__(self, base: nn.Module, scale: torch.Tensor, feedforward: bool):
        super().__init__()
        self.base, self.scale, self.feedforward = base, scale, feedforward

    def forward(self, x):
        return ia3_forward(self.base, x, self.scale, self.feedforward)


class CarriedLoRA:
    """The carried weights of one step: (block, site) -> the tensors of protocol/step.py CARRIED_PARAMS[method], in
    that order ((A, B) for LoRA, (A, B, m) for DoRA, (l,) for (IA)³), autograd leaves when training."""

    def __init__(self, weights: dict[tuple[int, str], tuple[torch.Tensor, ...]], scaling: float,
                 method: str = "lora", feedforward=(), base_weight=None):
        self.weights, self.scaling, self.method = weights, scaling, method
        self.feedforward = set(feedforward)
        self.base_weight = base_weight  # DoRA: a base linear -> its weight as [out, in]
        self.active = {b for b, _ in weights}
        self.sites = list(dict.fromkeys(s for _, s in weights))

    def wrap(self, base: nn.Module, block: int, site: str, widths: dict[str, int]) -> nn.Module:
        w = self.weights[block, site]
        if self.method == "ia3":
            return CarriedIA3Linear(base, w[0], site in self.feedforward)
        if self.method == "dora":
            return CarriedDoRALinear(base, self.base_weight(base), *w, self.scaling)
        return CarriedLoRALinear(base, *w, self.scaling)


class CarriedPrefix(CarriedLoRA):
    """The carried prefixes of one step: (block, "prefix") -> (key, value), each [kv heads, V, head dim], autograd
    leaves when training. No site is wrapped: the segment's context holds them (`prefix`)."""

    def __init__(self, weights: dict[tuple[int, str], tuple[torch.Tensor, ...]], num_virtual: int):
        super().__init__(weights, 0.0, "prefix")
        self.active, self.sites = set(), []
        self.prefix = LayerPrefixes(num_virtual, {b: w for (b, _), w in weights.items()})


def with_submodules(module: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A shallow copy of `module` in which the submodules at the dotted paths are replaced. Everything else (other
    submodules, parameters, buffers) is shared with the original, which stays untouched."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    heads: dict[str, dict[str, nn.Module]] = {}
    for path, new in replacements.items():
        head, _, rest = path.partition(".")
        if rest:
            heads.setdefault(head, {})[rest] = new
        else:
            clone._modules[head] = new
    for head, sub in heads.items():
        clone._modules[head] = with_submodules(module._modules[head], sub)
    return clone


class CloudSegment:
    """Blocks [first, stop) of a frozen model, run for one step with or without DLoRA branches."""

    def __init__(self, model):
        self.model = model
        self.family = family_of(model)
        self.blocks = self.family.blocks(model)
        self._paths: dict[tuple[int, str], str] = {}
        self._widths: dict[int, dict[str, int]] = {}
        for b, block in enumerate(self.blocks):  # every site of the family, by site name (model/sites.py)
            self._widths[b] = {}
            for s in self.family.input_groups:
                try:
                    module = self.family.site_module(block, s)
                except ValueError:
                    continue
                self._paths[b, s] = self.family.site_path(s)
                self._widths[b][s] = linear_dims(module)[1]

    def base_weight(self, lin: nn.Module) -> torch.Tensor:
        """A base linear's weight as [out, in] (GPT-2's Conv1D holds it as [in, out]; a --quantize linear's is
        de-quantized, cloud/quantize.py); DoRA's norm needs it."""
        from cloud.quantize import dense_weight
        return lin.weight.T if self.family.fan_in_fan_out else dense_weight(lin)

    def prefix_shapes(self, num_virtual: int) -> dict[str, list[int]]:
        """The carried fields of one block's prefix and their shapes (kv heads, as PEFT sizes them for GQA)."""
        c = self.model.config
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return prefix_shapes(heads, num_virtual, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    def site_dims(self, b: int, site: str) -> tuple[int, int]:
        """(in, out) features of a site of block b."""
        return linear_dims(self.blocks[b].get_submodule(self._paths[b, site]))

    def _block_for_step(self, b: int, sites) -> nn.Module:
        block = self.blocks[b]
        if sites is None or b not in sites.active:
            return block
        subs = {}
        for s in sites.sites:  # site names; the module path inside the block is where the wrapper goes
            path = self._paths[b, s]
            subs[path] = sites.wrap(block.get_submodule(path), b, s, self._widths[b])
        return with_submodules(block, subs)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, blocks: range, sites=None) -> torch.Tensor:
        """The blocks over `hidden`; `sites` (StepBranches, CarriedLoRA, ...; None: frozen) adapts some of them."""
        ctx = self.family.context(self.model, hidden, mask, getattr(sites, "prefix", None))
        for b in blocks:
            hidden = self.family.run_block(self._block_for_step(b, sites), hidden, ctx)
        return hidden
