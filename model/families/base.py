"""The shape every model family has: where its blocks live, how one block is called, where its LoRA sites sit.

One subclass per family, each in its own module of this package (like PEFT's tuners): `llama.py` (Llama, Mistral,
Qwen2), `qwen3.py`, `gemma.py`, `phi3.py`, `gpt2.py`. Which linears of a block are sites, and which of them read
the same input, is not here but in the torch-free table `model/sites.py` (the simulator reads it too).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from model import sites as S


class Family(ABC):
    """How to drive one model family block by block."""
    name: str = ""  # the family's key in model/sites.py
    model_types: tuple[str, ...] = ()  # HF model_type values it drives (model/sites.py FAMILY_OF)
    # site name -> the input group of sites that read the same input (they travel together in DLoRA)
    input_groups: dict[str, str] = {}
    layers_pattern: str = "layers"  # PEFT's name for the block list
    fan_in_fan_out: bool = False  # PEFT's flag for weights stored [in, out] (GPT-2's Conv1D)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            cls.input_groups = S.input_groups(cls.name)

    # ---- the model's parts -----------------------------------------------------------------------------------
    @abstractmethod
    def blocks(self, model) -> nn.ModuleList:
        """The list of transformer blocks."""

    @abstractmethod
    def embedding(self, model) -> nn.Embedding:
        """The token embedding module."""

    def embed(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> the first block's input."""
        return self.finish_embed(model, self.embedding(model)(input_ids))

    def finish_embed(self, model, h: torch.Tensor) -> torch.Tensor:
        """Token embeddings (the model's `inputs_embeds`, virtual tokens included) -> the first block's input:
        families with learned positions or a scale outside the embedding module add them here."""
        return h

    @abstractmethod
    def final_norm(self, model) -> nn.Module:
        """The norm before the LM head."""

    @abstractmethod
    def block_prefix(self, i: int) -> str:
        """Module path of block i in the full model (PEFT keys are built on it)."""

    def context(self, model, hidden: torch.Tensor, attention_mask: torch.Tensor, prefix=None) -> dict:
        """Per-forward inputs every block needs (mask, positions), rebuilt locally on each side from the mask:
        right padding and positions 0..T-1, exactly as the unsplit model computes them. Models with per-layer
        attention types (`config.layer_types`: Qwen2, Qwen3) get one mask per type; a `sliding_window` without
        layer types (Mistral, Phi-3) gets the sliding-window mask, as their own forward does.

        `prefix` (model/tuners/prefix.py LayerPrefixes): prefix tuning's V keys and values in front of every layer,
        as PEFT runs it: the cache holds them (`ctx["cache"]`), the mask gets V ones in front and the tokens
        positions V..V+T-1."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
        config = model.config
        V, cache = 0, None
        if prefix is not None:
            from model.tuners.prefix import prefix_cache
            V = prefix.num_virtual
            cache = prefix_cache(prefix, hidden.shape[0], config.num_hidden_layers, hidden)
            ones = torch.ones(hidden.shape[0], V, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat((ones, attention_mask), dim=1)
        position_ids = torch.arange(V, V + hidden.shape[1], device=hidden.device).unsqueeze(0)
        kw = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
                  position_ids=position_ids)
        types = getattr(config, "layer_types", None)
        if types:
            mask = {"full_attention": create_causal_mask(**kw)}
            if "sliding_attention" in types:
                mask["sliding_attention"] = create_sliding_window_causal_mask(**kw)
        elif getattr(config, "sliding_window", None) is not None:
            mask = create_sliding_window_causal_mask(**kw)
        else:
            mask = create_causal_mask(**kw)
        return {"attention_mask": mask, "position_ids": position_ids, "cache": cache}

    @abstractmethod
    def run_block(self, block, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """One block forward."""

    # ---- LoRA sites ------------------------------------------------------------------------------------------
    def default_targets(self) -> tuple[str, ...]:
        return S.default_targets(self.name)

    def sites(self, targets) -> tuple[str, ...]:
        """Site names of the linears the target strings name, as PEFT matches `target_modules` (model/sites.py)."""
        return S.resolve_targets(self.name, targets)

    def site_path(self, site: str) -> str:
        """Module path of a site inside a block."""
        return S.site_path(self.name, site)

    def site_module(self, block: nn.Module, site: str) -> nn.Module:
        path = self.site_path(site)
        try:
            return block.get_submodule(path)
        except AttributeError:
            raise ValueError(f"this {self.name} block has no {path}") from None

    def target_module(self, block: nn.Module, target: str) -> nn.Module:
        """The one linear a target names (a site name, or any target naming a single site)."""
        return self.site_module(block, self._single(target))

    def target_path(self, block: nn.Module, target: str) -> str:
        return self.site_path(self._single(target))

    def _single(self, target: str) -> str:
        names = self.sites([target])
        if len(names) != 1:
            raise ValueError(f"{target!r} names {len(names)} linears of a {self.name} block: {', '.join(names)}")
        return names[0]


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or of GPT-2's Conv1D (whose weight is stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)
