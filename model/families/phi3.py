"""Phi-3: Llama-shaped blocks with fused projections, `self_attn.qkv_proj` and `mlp.gate_up_proj`.

A LoRA on a fused linear adapts the whole fused output, as PEFT does with target `qkv_proj`; an optional
`sliding_window` gives the sliding-window mask (Family.context), as Phi3Model does."""
from __future__ import annotations

from model.families.llama import LlamaFamily


class Phi3Family(LlamaFamily):
    name = "phi3"
    model_types = ("phi3",)
