"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): virtual token embeddings trained in front of
the input, in the PEFT format (PEFT's PROMPT_TUNING and P_TUNING).

The same shape as LoRA's and (IA)³'s files: the config, the modules, and the set with how it attaches and saves. The
modules are PEFT's own (`PromptEmbedding`, `PromptEncoder` with PEFT's default MLP), built from the same PEFT config
`peft_config()` returns, so the edge trains exactly what `peft.get_peft_model` would. `prepend` is what
`PeftModelForCausalLM.forward` does for these methods: the V prompts go before the token embeddings (in their dtype)
and the attention mask gets V ones in front. Nothing attaches to a block: every block stays frozen, and the cloud
sees a sequence longer by V ("input-only" in protocol/step.py `WIRE_PATTERNS`).

PEFT saves both methods as `{"prompt_embeddings": [V, H]}`: the virtual tokens themselves. For P-tuning that is the
encoder's output, not the encoder: `PeftModel.from_pretrained` loads it into an encoder in inference mode (an
embedding table, no MLP), and so does `load_peft_state_dict` here. The encoder's own weights are in `state_dict()`
(the checkpoint); PEFT's format has no place for them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from model.segments import family_of
from model.tuners.base import SavedTableSet

PROMPT_METHODS = {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}


@dataclass
class PromptConfig:
    method: str = "prompt"  # "prompt" (PEFT's PROMPT_TUNING) | "ptuning" (P_TUNING: a prompt encoder)
    num_virtual_tokens: int = 20
    init_text: str | None = None  # prompt: PEFT's prompt_tuning_init="TEXT" with this text; None = RANDOM
    encoder_hidden: int | None = None  # ptuning: PEFT's encoder_hidden_size; None = the model's hidden size


def check_prompt_config(cfg: PromptConfig) -> None:
    """Each mistake as one line naming the flag (--prompt-tokens, --prompt-init-text, --ptuning-hidden)."""
    if cfg.method not in PROMPT_METHODS:
        raise ValueError(f"a prompt method is one of {', '.join(PROMPT_METHODS)}, got {cfg.method!r}")
    if not isinstance(cfg.num_virtual_tokens, int) or cfg.num_virtual_tokens < 1:
        raise ValueError(f"--prompt-tokens must be at least 1, got {cfg.num_virtual_tokens}")
    if cfg.init_text is not None and cfg.method != "prompt":
        raise ValueError("--prompt-init-text is prompt tuning's (--peft prompt); P-tuning's encoder makes the tokens")
    if cfg.init_text is not None and not cfg.init_text.strip():
        raise ValueError("--prompt-init-text is empty: give the text whose token embeddings start the prompt")
    if cfg.encoder_hidden is not None and cfg.method != "ptuning":
        raise ValueError("--ptuning-hidden is P-tuning's (--peft ptuning): prompt tuning has no encoder")
    if cfg.encoder_hidden is not None and cfg.encoder_hidden < 1:
        raise ValueError(f"--ptuning-hidden must be at least 1, got {cfg.encoder_hidden}")


def text_init_ids(tokenizer, text: str, n: int) -> list[int]:
    """PEFT's `PromptEmbedding` TEXT init: the text's ids (the tokenizer's default call, as PEFT calls it), cut to n
    or repeated until n."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError(f"--prompt-init-text {text!r} has no tokens for this tokenizer")
    return (ids * math.ceil(n / len(ids)))[:n]


class PromptSet(SavedTableSet):
    """The virtual tokens of one model: `encoder` is PEFT's PromptEmbedding (prompt) or PromptEncoder (ptuning).
    Built from the full model (its embedding gives the token dim and, for a text init, the start)."""

    def __init__(self, model, cfg: PromptConfig, tokenizer=None):
        super().__init__()
        check_prompt_config(cfg)
        self.peft_type = PROMPT_METHODS[cfg.method]
        from peft.tuners.p_tuning import PromptEncoder
        from peft.tuners.prompt_tuning import PromptEmbedding
        from peft.utils.other import _prepare_prompt_learning_config
        self.family = family_of(model)
        embedding = self.family.embedding(model)
        if cfg.method == "ptuning" and cfg.encoder_hidden is None:
            cfg = replace(cfg, encoder_hidden=embedding.embedding_dim)
        self.cfg = cfg
        self.num_virtual: int = cfg.num_virtual_tokens
        self.method = cfg.method
        # the token dim, layers and heads as get_peft_model fills them from the model's config
        self._dims = _prepare_prompt_learning_config(self._config(random_init=True), model.config)
        if self._dims.token_dim != embedding.embedding_dim:
            raise ValueError(f"the model's hidden size {self._dims.token_dim} is not its embedding's "
                             f"{embedding.embedding_dim}: prompt tuning needs them equal")
        self.tokenizer_name = getattr(tokenizer, "name_or_path", None) or None
        self.inference = False  # True once loaded from PEFT's saved form (P-tuning: the encoder's output only)
        if cfg.method == "prompt":
            self.encoder = PromptEmbedding(self._dims, embedding)  # RANDOM: nn.Embedding's N(0, 1), as PEFT's
            if cfg.init_text is not None:
                if tokenizer is None:
                    raise ValueError("--prompt-init-text needs the model's tokenizer")
                ids = torch.tensor(text_init_ids(tokenizer, cfg.init_text, self.num_virtual),
                                   device=embedding.weight.device)
                with torch.no_grad():  # as PEFT's TEXT init: the text's embeddings, in float32
                    self.encoder.embedding.weight = nn.Parameter(embedding(ids).detach().clone().to(torch.float32))
        else:
            self.encoder = PromptEncoder(self._dims)
        self.register_buffer("prompt_tokens", torch.arange(self.num_virtual), persistent=False)

    # ---- the virtual tokens --------------------------------------------------------------------------------------
    def prompts(self) -> torch.Tensor:
        """[1, V, H]: PeftModel.get_prompt for one sequence (an encoder in inference mode: its table as is)."""
        if self.inference:
            return self.encoder.embedding.weight.unsqueeze(0)
        return self.encoder(self.prompt_tokens.unsqueeze(0))

    def prepend(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [B, T, H], mask [B, T]) -> ([B, V + T, H], [B, V + T]), as PeftModelForCausalLM.forward: the
        prompts first, in the embeddings' dtype; ones in the mask for them (in the mask's dtype)."""
        B = embeds.shape[0]
        prompts = self.prompts().repeat(B, 1, 1).to(embeds.dtype)
        ones = torch.ones(B, self.num_virtual, dtype=mask.dtype, device=mask.device)
        return torch.cat((prompts, embeds), dim=1), torch.cat((ones, mask), dim=1)

    # ---- PEFT format -------------------------------------------------------------------------------------------
    def _config(self, random_init: bool = False, base_model_name: str = "", inference_mode: bool = False):
        import peft
        c = self.cfg
        common = dict(task_type="CAUSAL_LM", num_virtual_tokens=c.num_virtual_tokens,
                      base_model_name_or_path=base_model_name or None, inference_mode=inference_mode,
                      num_transformer_submodules=1)
        if not random_init:
            d = self._dims
            common.update(token_dim=d.token_dim, num_layers=d.num_layers, num_attention_heads=d.num_attention_heads)
        if c.method == "ptuning":
            return peft.PromptEncoderConfig(**common, encoder_reparameterization_type="MLP",
                                            encoder_hidden_size=c.encoder_hidden)
        if c.init_text is None or random_init:
            return peft.PromptTuningConfig(**common, prompt_tuning_init="RANDOM")
        return peft.PromptTuningConfig(**common, prompt_tuning_init="TEXT", prompt_tuning_init_text=c.init_text,
                                       tokenizer_name_or_path=self.tokenizer_name or base_model_name or "unknown")

    def peft_config(self, base_model_name: str = ""):
        """PEFT's PromptTuningConfig or PromptEncoderConfig (training form: `get_peft_model` builds this set)."""
        return self._config(base_model_name=base_model_name)

    # ---- PEFT's saved form (model/tuners/base.py SavedTableSet): the V virtual tokens, [V, H]; for P-tuning the
    # encoder's output, loaded back as PEFT's inference encoder
    _tokens_flag = "--prompt-tokens"

    @property
    def _width(self) -> int:
        return self._dims.token_dim

    def _output(self) -> torch.Tensor:
        return self.prompts()[0]

    def _inference_encoder(self):
        if self.method != "ptuning":
            return None
        from peft.tuners.p_tuning import PromptEncoder
        return PromptEncoder(replace(self._dims, inference_mode=True))


__all__ = ["PromptConfig", "PromptSet", "PROMPT_METHODS", "check_prompt_config", "text_init_ids"]
