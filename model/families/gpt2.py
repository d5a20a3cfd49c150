"""GPT-2: learned positions added to the token embedding, Conv1D projections, `transformer.h[i]` blocks.

`c_proj` is the name of two linears of a block (`attn.c_proj`, `mlp.c_proj`): the target `c_proj` names both, as in
PEFT, and they are two sites with different inputs (model/sites.py)."""
from __future__ import annotations

import torch

from model.families.base import Family


class GPT2Family(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    layers_pattern = "h"
    fan_in_fan_out = True

    def blocks(self, model):
        return model.transformer.h

    def embedding(self, model):
        return model.transformer.wte

    def finish_embed(self, model, h):
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        return model.transformer.drop(h + model.transformer.wpe(positions))

    def final_norm(self, model):
        return model.transformer.ln_f

    def block_prefix(self, i):
        return f"transformer.h.{i}"

    def run_block(self, block, hidden, ctx):
        out = block(hidden, None, ctx["attention_mask"], position_ids=ctx["position_ids"])
        return out[0] if isinstance(out, tuple) else out
