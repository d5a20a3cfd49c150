"""The PEFT methods Tandem trains (`--peft`), one file each with the same shape as PEFT's tuners: the config, the
layer math, and the set of every trainable weight of one model with how it attaches and saves in PEFT's format.

    method    file         PEFT type       what it trains                               FedAvg
    lora      lora.py      LORA            B A per site (rsLoRA scaling, DoRA magnitude)  yes (exact in B A: FFA)
    ia3       ia3.py       IA3             a scaling vector per site                    yes (exact)
    adapter   adapter.py   (none: Tandem's) a bottleneck MLP after attention and the MLP    yes (weights average)
    prompt    prompt.py    PROMPT_TUNING   virtual token embeddings before the input    yes (exact)
    ptuning   prompt.py    P_TUNING        a prompt encoder that makes them             yes (encoder weights)
    prefix    prefix.py    PREFIX_TUNING   keys and values in front of every layer      yes (the prefixes)

How each crosses the cut in each --cloud-lora mode is declared once, in protocol/step.py `WIRE_PATTERNS`. Every
set has `parameters()`, `peft_config(base_name)`, `peft_state_dict()`, `load_peft_state_dict(state)`,
`save_peft(path, base_name)`; a site method (lora, ia3) also `attach(model, blocks)` and `site(block, name)`, whose
`carried()` gives the SiteWeights fields the carried mode sends; an input method (prompt, ptuning) `prepend`; prefix
tuning `prefixes()`, every layer's keys and values of the step.
"""
from __future__ import annotations

from dataclasses import dataclass

from protocol.step import WIRE_PATTERNS


@dataclass(frozen=True)
class Method:
    name: str
    peft_type: str  # peft.PeftType's name
    kind: str  # "sites": it adapts linears of blocks; "input": it prepends virtual tokens; "prefix": keys and values
    options: tuple[str, ...]  # its own flags (their dests); giving one with another method is an error
    fedavg: str  # what averaging the clients' weights means for it

    @property
    def cloud_modes(self) -> dict[str, str]:
        """--cloud-lora mode -> the wire pattern it uses (protocol/step.py)."""
        return WIRE_PATTERNS[self.name]


LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_freeze_a", "lora_dora", "lora_rslora")
PROMPT_OPTIONS = ("prompt_tokens", "prompt_init_text")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", "LORA", "sites", LORA_OPTIONS,
           "averaging A and B is not averaging B A; with --lora-freeze-a (FFA-LoRA) it is exact, except for DoRA, "
           "whose adapted weight m (W + s B A) / ||W + s B A|| is not linear in B and m"),
    Method("ia3", "IA3", "sites", ("ia3_targets", "ia3_feedforward"),
           "exact per site: the adapted weight (W scaled by the vector) is linear in the vector, so the mean vector "
           "gives the mean adapted weight"),
    Method("adapter", "BOTTLENECK", "sites", ("adapter_reduction", "adapter_targets"),
           "the adapters' weights average (their nonlinear output is not the average's output)"),
    Method("prompt", "PROMPT_TUNING", "input", PROMPT_OPTIONS,
           "exact: the virtual token embeddings are the parameters, and average as vectors"),
    Method("ptuning", "P_TUNING", "input", (*PROMPT_OPTIONS, "ptuning_hidden"),
           "the encoder's weights average (devices exchange them, not PEFT's saved tokens); the encoder's output, "
           "the virtual tokens, is not the mean of the devices' outputs"),
    Method("prefix", "PREFIX_TUNING", "prefix", ("prefix_tokens", "prefix_projection"),
           "the prefixes (or, with --prefix-projection, the encoder's weights) average; attention is not linear in "
           "them, so the mean prefix is not the mean of the devices' models"),
)}


def prompt_config(method: str, options: dict):
    """prompt's or ptuning's PromptConfig from the options by flag name (see `method_set`)."""
    from model.tuners.prompt import PromptConfig
    o = options
    return PromptConfig(method, o["prompt_tokens"], o["prompt_init_text"], o["ptuning_hidden"])


def prefix_config(options: dict):
    """prefix tuning's PrefixConfig from the options by flag name (see `method_set`)."""
    from model.tuners.prefix import PrefixConfig
    return PrefixConfig(options["prefix_tokens"], options["prefix_projection"])


def method_set(model, method: str, blocks: list[int], options: dict, tokenizer=None):
    """The method's set of trainable weights, built from the full model (DoRA's magnitudes start from the base weights'
    norms, a prompt's tokens from the embedding): a site method (lora, ia3, adapter) at `blocks`, prefix tuning at
    every layer (PEFT's PrefixTuningConfig has no layer choice), an input method (prompt, ptuning) at none.

    `options` holds the method's options by their flag names (each Method's `options`: lora_r, ia3_targets, ...;
    lists as tuples, an unset one None), as the edge (edge/methods.py) and the federation's devices
    (protocol/federation.py) both give them: one builder, so the server's global adapter has the devices' shape."""
    o = options
    if method == "lora":
        from model.tuners.lora import LoRAConfig, LoRASet
        return LoRASet(model, LoRAConfig(o["lora_r"], o["lora_alpha"], o["lora_dropout"], tuple(o["lora_targets"]),
                                         blocks, o["lora_rslora"], o["lora_dora"]))
    if method == "ia3":
        from model.tuners.ia3 import IA3Config, IA3Set
        return IA3Set(model, IA3Config(tuple(o["ia3_targets"]), tuple(o["ia3_feedforward"]), blocks))
    if method == "adapter":
        from model.tuners.adapter import AdapterConfig, AdapterSet
        return AdapterSet(model, AdapterConfig(o["adapter_reduction"], tuple(o["adapter_targets"]), blocks))
    if method == "prefix":
        from model.tuners.prefix import PrefixSet
        return PrefixSet(model, prefix_config(o))
    from model.tuners.prompt import PromptSet
    return PromptSet(model, prompt_config(method, o), tokenizer)
