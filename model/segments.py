"""Cutting a decoder into three segments: edge-bottom | cloud | edge-top.

    edge-bottom = embedding + blocks [0, k)          (touches raw tokens: stays on the edge)
    cloud       = blocks [k, L - m)                  (frozen; runs on the cloud)
    edge-top    = blocks [L - m, L) + norm + LM head (touches labels: stays on the edge)

Between segments only a hidden state [B, T, H] and the attention mask [B, T] travel, so the wire protocol does not
depend on the model family. What is family-specific (where the blocks live, how a block is called) sits in one
small `Family` class per family, in the package model/families/ (Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3,
GPT-2); which linears are LoRA sites and which share an input is model/sites.py. `family_of` and `FAMILIES` are
re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from model.families import (FAMILIES, GPT2Family, Family, GemmaFamily, LlamaFamily, Phi3Family, Qwen3Family,
                            UnsupportedModel, family_of, linear_dims)


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

    def forward(self, hidden, attention_mask, prefix=None):
        """`prefix`: prefix tuning's per-layer keys and values (model/tuners/prefix.py LayerPrefixes), or None."""
        ctx = self.family.context(self._model[0], hidden, attention_mask, prefix)
        for block in self.blocks:
            hidden = self.family.run_block(block, hidden, ctx)
        return hidden


class EdgeBottom(nn.Module):
    def __init__(self, model, cut: Cut):
        super().__init__()
        self.embedding = family_of(model).embedding(model)
        self.run = BlockRun(model, cut.bottom)

    def token_embeds(self, input_ids):
        """Token ids -> their embeddings, the model's `inputs_embeds` (an input PEFT method prepends to these)."""
        return self.embedding(input_ids)

    def forward(self, input_ids, attention_mask, token_embeds=None, prefix=None):
        """Token ids (or their embeddings, `token_embeds`) -> the bottom blocks' output."""
        h = self.token_embeds(input_ids) if token_embeds is None else token_embeds
        return self.run(self.run.family.finish_embed(self.run._model[0], h), attention_mask, prefix)


class EdgeTop(nn.Module):
    """Last m blocks and the final norm; `lm_head` is applied by the loss (only where it is needed)."""

    def __init__(self, model, cut: Cut):
        super().__init__()
        self.run = BlockRun(model, cut.top)
        self.norm = family_of(model).final_norm(model)
        self.lm_head = model.get_output_embeddings()

    def forward(self, hidden, attention_mask, prefix=None):
        return self.norm(self.run(hidden, attention_mask, prefix))


def drop_blocks(model, block_ids) -> None:
    """Free the weights of blocks this side does not run (the edge drops the cloud's blocks)."""
    blocks = family_of(model).blocks(model)
    for i in block_ids:
        blocks[i] = nn.Module()


__all__ = ["BlockRun", "Cut", "EdgeBottom", "EdgeTop", "FAMILIES", "Family", "GPT2Family", "GemmaFamily",
           "LlamaFamily", "Phi3Family", "Qwen3Family", "UnsupportedModel", "cut_of", "drop_blocks", "family_of",
           "linear_dims"]
