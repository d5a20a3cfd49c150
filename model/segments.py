"""Cutting a decoder into three segments: edge-bottom | cloud | edge-top.

    edge-bottom = embedding + blocks [0, k)          (touches raw tokens: stays on the edge)
    cloud       = blocks [k, L - m)                  (frozen; runs on the cloud)
    edge-top    = blocks [L - m, L) + norm + LM head (touches labels: stays on the edge)

Between segments only a hidden state [B, T, H] and the attention mask [B, T] travel, so the wire protocol does not
depend on the model family. What is family-specific (where the blocks live, how a block is called, which linear
layers share an input) sits in one small `Family` class; Llama is implemented, others (GPT-2, BERT) add a class.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from model.sites import FAMILY_OF, INPUT_GROUPS


class Family(ABC):
    """How to drive one model family block by block."""
    name: str = ""  # the family's key in model/sites.py
    # LoRA target -> the group of targets that read the same input (they travel together in DLoRA): model/sites.py
    input_groups: dict[str, str] = {}
    layers_pattern: str = "layers"  # PEFT's name for the block list
    fan_in_fan_out: bool = False  # PEFT's flag for weights stored [in, out] (GPT-2's Conv1D)

    @abstractmethod
    def blocks(self, model) -> nn.ModuleList:
        """The list of transformer blocks."""

    @abstractmethod
    def embedding(self, model) -> nn.Embedding:
        """The token embedding module."""

    def embed(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> the first block's input (families with learned positions add them here)."""
        return self.embedding(model)(input_ids)

    @abstractmethod
    def final_norm(self, model) -> nn.Module:
        """The norm before the LM head."""

    @abstractmethod
    def block_prefix(self, i: int) -> str:
        """Module path of block i in the full model (PEFT keys are built on it)."""

    def context(self, model, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Per-forward inputs every block needs (mask, positions), rebuilt locally on each side from the mask:
        right padding and positions 0..T-1, exactly as the unsplit model computes them."""
        from transformers.masking_utils import create_causal_mask
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=position_ids)
        return {"attention_mask": mask, "position_ids": position_ids}

    @abstractmethod
    def run_block(self, block, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """One block forward."""

    def target_module(self, block: nn.Module, target: str) -> nn.Linear:
        for name, mod in block.named_modules():
            if name.split(".")[-1] == target:
                return mod
        raise KeyError(f"no module {target!r} in block")

    def target_path(self, block: nn.Module, target: str) -> str:
        for name, _ in block.named_modules():
            if name.split(".")[-1] == target:
                return name
        raise KeyError(f"no module {target!r} in block")


class LlamaFamily(Family):
    """Llama, Mistral, Qwen2, SmolLM2 and other `model.layers[i]` decoders with rotary positions."""
    name = "llama"
    input_groups = INPUT_GROUPS["llama"]

    def blocks(self, model):
        return model.model.layers

    def embedding(self, model):
        return model.model.embed_tokens

    def final_norm(self, model):
        return model.model.norm

    def block_prefix(self, i):
        return f"model.layers.{i}"

    def context(self, model, hidden, attention_mask):
        ctx = super().context(model, hidden, attention_mask)
        ctx["position_embeddings"] = model.model.rotary_emb(hidden, position_ids=ctx["position_ids"])
        return ctx

    def run_block(self, block, hidden, ctx):
        out = block(hidden, **ctx)
        return out[0] if isinstance(out, tuple) else out


class GPT2Family(Family):
    """GPT-2: learned positions added to the token embedding, Conv1D projections, `transformer.h[i]` blocks."""
    name = "gpt2"
    input_groups = INPUT_GROUPS["gpt2"]
    layers_pattern = "h"
    fan_in_fan_out = True

    def blocks(self, model):
        return model.transformer.h

    def embedding(self, model):
        return model.transformer.wte

    def embed(self, model, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return model.transformer.drop(model.transformer.wte(input_ids) + model.transformer.wpe(positions))

    def final_norm(self, model):
        return model.transformer.ln_f

    def block_prefix(self, i):
        return f"transformer.h.{i}"

    def run_block(self, block, hidden, ctx):
        out = block(hidden, None, ctx["attention_mask"], position_ids=ctx["position_ids"])
        return out[0] if isinstance(out, tuple) else out


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or of GPT-2's Conv1D (whose weight is stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)


FAMILIES = {kind: {"llama": LlamaFamily, "gpt2": GPT2Family}[fam] for kind, fam in FAMILY_OF.items()}


def family_of(model) -> Family:
    kind = model.config.model_type
    if kind not in FAMILIES:
        raise ValueError(f"model family {kind!r} has no segment driver yet; known: {sorted(FAMILIES)}")
    return FAMILIES[kind]()


@dataclass(frozen=True)
class Cut:
    """Where the model is cut: k edge-bottom blocks, m edge-top blocks, of L in all."""
    k: int
    m: int
    L: int

    def __post_init__(self):
        if self.k < 1 or self.m < 1 or self.k + self.m >= self.L:
            raise ValueError(f"need k >= 1, m >= 1 and k + m < {self.L} blocks, got k={self.k}, m={self.m}")

    @property
    def bottom(self) -> range:
        return range(0, self.k)

    @property
    def cloud(self) -> range:
        return range(self.k, self.L - self.m)

    @property
    def top(self) -> range:
        return range(self.L - self.m, self.L)


def cut_of(model, k: int, m: int) -> Cut:
    return Cut(k, m, len(family_of(model).blocks(model)))


class BlockRun(nn.Module):
    """Run a contiguous range of blocks of `model` (no copy: the blocks stay where they are)."""

    def __init__(self, model, block_ids: range):
        super().__init__()
        self.family = family_of(model)
        self._model = [model]  # a list, so the whole model is not registered as a submodule
        self.block_ids = block_ids
        self.blocks = nn.ModuleList(self.family.blocks(model)[i] for i in block_ids)

    def forward(self, hidden, attention_mask):
        ctx = self.family.context(self._model[0], hidden, attention_mask)
        for block in self.blocks:
            hidden = self.family.run_block(block, hidden, ctx)
        return hidden


class EdgeBottom(nn.Module):
    def __init__(self, model, cut: Cut):
        super().__init__()
        self.embedding = family_of(model).embedding(model)
        self.run = BlockRun(model, cut.bottom)

    def forward(self, input_ids, attention_mask):
        return self.run(self.run.family.embed(self.run._model[0], input_ids), attention_mask)


class EdgeTop(nn.Module):
    """Last m blocks and the final norm; `lm_head` is applied by the loss (only where it is needed)."""

    def __init__(self, model, cut: Cut):
        super().__init__()
        self.run = BlockRun(model, cut.top)
        self.norm = family_of(model).final_norm(model)
        self.lm_head = model.get_output_embeddings()

    def forward(self, hidden, attention_mask):
        return self.norm(self.run(hidden, attention_mask))


def drop_blocks(model, block_ids) -> None:
    """Free the weights of blocks this side does not run (the edge drops the cloud's blocks)."""
    blocks = family_of(model).blocks(model)
    for i in block_ids:
        blocks[i] = nn.Module()
