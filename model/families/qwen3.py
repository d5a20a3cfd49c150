"""Qwen3: a Llama-shaped decoder with RMSNorm on q and k inside attention (norms, not LoRA sites)."""
from __future__ import annotations

from model.families.llama import LlamaFamily


class Qwen3Family(LlamaFamily):
    name = "qwen3"
    model_types = ("qwen3",)
