"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): trainable key/value prefixes in every layer's
attention, in the PEFT format (PEFT's PREFIX_TUNING).

The same shape as the other tuners' files: the config, the layer math, and the set with how it attaches and saves.
The module is PEFT's own `PrefixEncoder`, built from the `PrefixTuningConfig` that `peft_config()` returns, so the
edge trains exactly what `peft.get_peft_model` would: without `--prefix-projection` its table *is* the prefixes
(P-tuning v2); with it, a table of V token vectors and an MLP make them (Li & Liang's reparametrisation).

The layer math is what `PeftModelForCausalLM` does for this method: each layer's attention gets V more keys and
values in front (its cache holds them: `prefix_cache`), the mask V ones in front, and the real tokens positions
V..V+T-1 (the model counts the cache's V as seen tokens). `LayerPrefixes` is what one segment needs: its blocks'
prefixes and V; the edge's segments and the cloud's build their context from it (model/families/base.py), so the
arithmetic is written once.

Every block has a prefix, the cloud's too, so prefix tuning crosses the cut only as "carried" (protocol/step.py
`WIRE_PATTERNS`): the edge computes all layers' prefixes each step, sends the cloud blocks' with `begin`
(`SiteWeights.prefix_key`, `prefix_value`, each [kv heads, V, head dim], batch-free) and gets their gradients back.

PEFT saves the method as `{"prompt_embeddings": [V, layers x 2 x kv dim]}`: the prefixes themselves, for a
projection the MLP's output; `PeftModel.from_pretrained` loads that into a table with no MLP, and so does
`load_peft_state_dict` here. Families whose layers are not all full attention with their own keys and values (sliding
windows, per-layer attention types, shared KV) are refused by `check_prefix_family`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from model.segments import family_of
from model.tuners.base import SavedTableSet



@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 20  # V: keys and values added in front of every layer's attention
    projection: int | None = None  # PEFT's prefix_projection with this encoder_hidden_size; None: no MLP (v2)


def check_prefix_config(cfg: PrefixConfig) -> None:
    """Each mistake as one line naming the flag (--prefix-tokens, --prefix-projection)."""
    if not isinstance(cfg.num_virtual_tokens, int) or cfg.num_virtual_tokens < 1:
        raise ValueError(f"--prefix-tokens must be at least 1, got {cfg.num_virtual_tokens}")
    if cfg.projection is not None and cfg.projection < 1:
        raise ValueError(f"--prefix-projection must be at least 1 (the MLP's hidden size), got {cfg.projection}")


def check_prefix_family(model) -> None:
    """Prefix tuning here needs a Llama-shaped decoder whose every layer is full causal attention with its own keys
    and values (one mask per segment, each block's prefix at its own layer index); one line naming what is not."""
    from model.families import LlamaFamily
    config = model.config
    if type(family_of(model)) is not LlamaFamily:
        raise ValueError(f"--peft prefix runs on Llama-shaped decoders (Llama, SmolLM2, Mistral, Qwen2) here; this "
                         f"model is {config.model_type}: use --peft prompt or lora")
    if getattr(config, "sliding_window", None) is not None or set(getattr(config, "layer_types", None) or ()) - {
            "full_attention"}:
        raise ValueError(f"--peft prefix needs full attention in every layer; this {config.model_type} has "
                         "sliding-window layers: use --peft prompt or lora")


@dataclass
class LayerPrefixes:
    """The prefixes one segment runs with: block -> (key, value), each [kv heads, V, head dim] (one for the whole
    batch), and V. A block of the model that this segment does not run has none here."""
    num_virtual: int
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]

    def only(self, blocks) -> "LayerPrefixes":
        return LayerPrefixes(self.num_virtual, {b: self.kv[b] for b in blocks})


def prefix_cache(prefixes: LayerPrefixes, batch: int, num_layers: int, like: torch.Tensor):
    """The cache PEFT hands the model (`DynamicCache` of every layer's prefix, expanded over the batch, in `like`'s
    dtype): a layer's attention puts its V keys and values in front of the step's. Layers this segment does not run
    get zeros (never read: only a block's own layer index is updated)."""
    from transformers import DynamicCache
    some_k = next(iter(prefixes.kv.values()))[0]
    zeros = torch.zeros((batch, *some_k.shape), dtype=like.dtype, device=like.device)

    def expand(t):
        return t.to(like.dtype).unsqueeze(0).expand(batch, *t.shape)

    layers = [tuple(map(expand, prefixes.kv[i])) if i in prefixes.kv else (zeros, zeros) for i in range(num_layers)]
    return DynamicCache(layers)


class PrefixSet(SavedTableSet):
    """Every layer's prefixes of one model: `encoder` is PEFT's PrefixEncoder. Built from the full model's config."""

    def __init__(self, model, cfg: PrefixConfig):
        super().__init__()
        check_prefix_config(cfg)
        check_prefix_family(model)
        from peft.tuners.prefix_tuning import PrefixEncoder
        from peft.utils.other import _prepare_prompt_learning_config
        self.peft_type = "PREFIX_TUNING"
        self.family = family_of(model)
        self.cfg = cfg
        self.num_virtual: int = cfg.num_virtual_tokens
        # layers, kv heads and kv dim as get_peft_model fills them from the model's config (GQA: the kv heads)
        self._dims = _prepare_prompt_learning_config(self._config(fill=False), model.config)
        self.num_layers = self._dims.num_layers
        self.heads = self._dims.num_attention_heads
        self.head_dim = self._dims.token_dim // self.heads
        self.inference = False  # True once loaded from PEFT's saved form (a projection's output only)
        self.encoder = PrefixEncoder(self._dims)
        self.register_buffer("prompt_tokens", torch.arange(self.num_virtual), persistent=False)

    # ---- the prefixes --------------------------------------------------------------------------------------------
    def flat(self) -> torch.Tensor:
        """[V, layers x 2 x kv dim]: PeftModel.get_prompt's encoder output for one sequence."""
        if self.inference:
            return self.encoder.embedding.weight
        return self.encoder(self.prompt_tokens.unsqueeze(0))[0]

    def prefixes(self) -> LayerPrefixes:
        """Every layer's (key, value), as get_prompt splits the encoder's output: view [V, 2L, heads, head dim],
        layer l's key is slice 2l and its value 2l + 1, each permuted to [heads, V, head dim]."""
        V, L = self.num_virtual, self.num_layers
        per = self.flat().view(V, 2 * L, self.heads, self.head_dim).permute(1, 2, 0, 3)
        return LayerPrefixes(V, {layer: (per[2 * layer], per[2 * layer + 1]) for layer in range(L)})

    def prefix_shape(self) -> list[int]:
        return [self.heads, self.num_virtual, self.head_dim]

    # ---- PEFT format ---------------------------------------------------------------------------------------------
    def _config(self, fill: bool = True, base_model_name: str = "", inference_mode: bool = False):
        import peft
        c = self.cfg
        kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=c.num_virtual_tokens,
                  base_model_name_or_path=base_model_name or None, inference_mode=inference_mode,
                  num_transformer_submodules=1, prefix_projection=c.projection is not None)
        if c.projection is not None:
            kw["encoder_hidden_size"] = c.projection
        if fill:
            d = self._dims
            kw.update(token_dim=d.token_dim, num_layers=d.num_layers, num_attention_heads=d.num_attention_heads)
        return peft.PrefixTuningConfig(**kw)

    def peft_config(self, base_model_name: str = ""):
        """PEFT's PrefixTuningConfig (training form: `get_peft_model` builds this set's encoder)."""
        return self._config(base_model_name=base_model_name)

    # ---- PEFT's saved form (model/tuners/base.py SavedTableSet): the prefixes, [V, layers x 2 x kv dim]; with a
    # projection the MLP's output, loaded back as PEFT's inference encoder
    _tokens_flag = "--prefix-tokens"

    @property
    def _width(self) -> int:
        return 2 * self.num_layers * self._dims.token_dim

    def _output(self) -> torch.Tensor:
        return self.flat()

    def _inference_encoder(self):
        if self.cfg.projection is None:
            return None
        from peft.tuners.prefix_tuning import PrefixEncoder
        return PrefixEncoder(replace(self._dims, inference_mode=True))


__all__ = ["LayerPrefixes", "PrefixConfig", "PrefixSet", "check_prefix_config", "check_prefix_family",
           "prefix_cache"]
