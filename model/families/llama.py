"""Llama and the decoders shaped like it: `model.layers[i]` blocks, rotary positions, q/k/v/o and gate/up/down."""
from __future__ import annotations

from model.families.base import Family


class LlamaFamily(Family):
    """Llama, Mistral, Qwen2, SmolLM2. Qwen3, Gemma and Phi-3 subclass it (their own modules)."""
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")

    def blocks(self, model):
        return model.model.layers

    def embedding(self, model):
        return model.model.embed_tokens

    def final_norm(self, model):
        return model.model.norm

    def block_prefix(self, i):
        return f"model.layers.{i}"

    def context(self, model, hidden, attention_mask, prefix=None):
        ctx = super().context(model, hidden, attention_mask, prefix)
        ctx["position_embeddings"] = model.model.rotary_emb(hidden, position_ids=ctx["position_ids"])
        ctx["layer_types"] = getattr(model.config, "layer_types", None)
        return ctx

    def run_block(self, block, hidden, ctx):
        mask = ctx["attention_mask"]
        if isinstance(mask, dict):  # one mask per attention type (Qwen2 / Qwen3 `layer_types`)
            kind = getattr(block.self_attn, "layer_type", None) or ctx["layer_types"][block.self_attn.layer_idx]
            mask = mask[kind]
        out = block(hidden, attention_mask=mask, position_ids=ctx["position_ids"],
                    position_embeddings=ctx["position_embeddings"], cache=ctx.get("cache"))
        return out[0] if isinstance(out, tuple) else out
