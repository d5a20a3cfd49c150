"""Gemma: Llama-shaped blocks; the embedding is scaled by sqrt(hidden) and its RMSNorms multiply by (1 + weight).

Both live inside modules the segments call as they are (the norms in every block and the final `model.norm`), so
only the scale needs care: transformers >= 4.5x puts it in the embedding module (`GemmaTextScaledWordEmbedding`),
older versions multiply in `GemmaModel.forward`; `embed` applies it here exactly when the module does not.
"""
from __future__ import annotations

import torch

from model.families.llama import LlamaFamily


class GemmaFamily(LlamaFamily):
    name = "gemma"
    model_types = ("gemma",)

    def finish_embed(self, model, h):
        if not hasattr(self.embedding(model), "embed_scale"):  # the scale is the model's forward's: do as it does
            h = h * torch.tensor(model.config.hidden_size ** 0.5, dtype=h.dtype)
        return h
