"""Where the trainable branches of a block sit, per model family, with no torch import (the simulator reads it).

A *site* is one linear layer of a block that carries a LoRA (or another branch), known by its module path inside
the block (`self_attn.q_proj`, GPT-2's `attn.c_proj`). Sites that read the same input form an *input group*: in
DLoRA the cloud sends that input once per block and group, and the edge answers with one output per site of the
group. Groups run in block order and, inside a block, in `GROUP_ORDER`; the sites of a group are listed in the
order the session's targets name them. Edge, cloud and simulator all take the groups from here.

A LoRA *target* is a string as PEFT reads it (`LoraConfig(target_modules=[...])`): it names every linear of a block
whose module path is the string or ends with `.` + the string. So GPT-2's `c_proj` names two sites (attention's
output projection and the MLP's), `attn.c_proj` one. A site's *name*, the key the wire, the LoRA set and the cloud
use, is the shortest such suffix of its path that names it alone: `q_proj` for Llama's `self_attn.q_proj`,
`attn.c_proj` and `mlp.c_proj` for GPT-2's two `c_proj`. Each site name is itself a target naming just that site.
"""
from __future__ import annotations

GROUP_ORDER = ("attn_in", "attn_out", "mlp_in", "mlp_out")  # execution order inside one block

_LLAMA = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
          "self_attn.o_proj": "attn_out", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
          "mlp.down_proj": "mlp_out"}

# family -> module path inside a block -> input group: every linear of the family's block, in execution order
SITES: dict[str, dict[str, str]] = {
    "llama": _LLAMA,  # Llama, Mistral, Qwen2, SmolLM2
    "qwen3": dict(_LLAMA),  # q_norm / k_norm inside attention are norms, not sites
    "gemma": dict(_LLAMA),
    "phi3": {"self_attn.qkv_proj": "attn_in", "self_attn.o_proj": "attn_out", "mlp.gate_up_proj": "mlp_in",
             "mlp.down_proj": "mlp_out"},  # fused projections: one LoRA on each fused linear, as PEFT puts it
    "gpt2": {"attn.c_attn": "attn_in", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"},
}

# HF model_type -> family
FAMILY_OF = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "qwen3", "gemma": "gemma",
             "phi3": "phi3", "gpt2": "gpt2"}

# the LoRA targets when none are given: PEFT's defaults for the model type (phi3 has none there: its fused qkv)
DEFAULT_TARGETS = {"llama": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"),
                   "phi3": ("qkv_proj",), "gpt2": ("c_attn",)}

# model types that are encoders (or encoder-decoders): refused as such, not as "not yet"
ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
            "camembert", "mpnet", "modernbert", "ernie", "longformer", "big_bird", "convbert", "funnel", "layoutlm",
            "megatron-bert", "roformer", "squeezebert", "xlm", "flaubert", "nomic_bert", "t5", "mt5", "bart",
            "mbart", "pegasus", "marian", "whisper"}


class UnsupportedModel(ValueError):
    """The model is not a decoder of a family Tandem cuts; the message is one line naming the supported ones."""


def supported_line() -> str:
    return "Tandem cuts decoder-only models of the families " + ", ".join(FAMILY_OF)


def check_supported(model_type: str, *, encoder: bool = False) -> str:
    """The family of an HF model_type, or UnsupportedModel in one line."""
    if model_type in FAMILY_OF and not encoder:
        return FAMILY_OF[model_type]
    if encoder or model_type in ENCODERS:
        raise UnsupportedModel(f"{model_type} is not supported: it is an encoder, and {supported_line()}")
    raise UnsupportedModel(f"{model_type} is not supported: {supported_line()}")


def site_paths(family: str) -> tuple[str, ...]:
    """Module paths (inside a block) of the family's sites, in execution order."""
    return tuple(SITES[family])


def site_name(family: str, path: str) -> str:
    """The shortest suffix of `path` (whole dotted components) that names this site alone in the family's block."""
    parts = path.split(".")
    for n in range(1, len(parts) + 1):
        suffix = ".".join(parts[-n:])
        if [p for p in SITES[family] if _matches(p, suffix)] == [path]:
            return suffix
    return path


def site_path(family: str, site: str) -> str:
    """Module path inside the block of a site name."""
    paths = [p for p in SITES[family] if site_name(family, p) == site]
    if not paths:
        raise ValueError(f"no site {site!r} in a {family} block; {family} sites: {', '.join(site_names(family))}")
    return paths[0]


def site_names(family: str) -> tuple[str, ...]:
    return tuple(site_name(family, p) for p in SITES[family])


def input_groups(family: str) -> dict[str, str]:
    """Site name -> input group."""
    return {site_name(family, p): g for p, g in SITES[family].items()}


def default_targets(family: str) -> tuple[str, ...]:
    return DEFAULT_TARGETS[family]


def _matches(path: str, target: str) -> bool:
    """PEFT's rule (peft.tuners.tuners_utils.check_target_module_exists): the name or a dotted suffix of it."""
    return path == target or path.endswith("." + target)


INPUT_GROUPS: dict[str, dict[str, str]] = {f: input_groups(f) for f in SITES}  # family -> site name -> group


def target_names(family: str) -> tuple[str, ...]:
    """The short target strings of a family (the last component of each site's path), for messages."""
    return tuple(dict.fromkeys(p.split(".")[-1] for p in SITES[family]))


def resolve_targets(family: str, targets) -> tuple[str, ...]:
    """The site names that the target strings name, as PEFT matches them: in the order of the targets, each one's
    sites in execution order, without repeats. A target that names no linear of the block is refused."""
    out: list[str] = []
    for t in targets:
        hits = [p for p in SITES[family] if _matches(p, t)]
        if not hits:
            ambiguous = [p for p in SITES[family] if p.split(".")[-1] != site_name(family, p)]
            hint = f" ({' or '.join(ambiguous)} names one)" if ambiguous else ""
            raise ValueError(f"no module {t!r} in a {family} block; {family} targets: "
                             f"{', '.join(target_names(family))}{hint}")
        out += [site_name(family, p) for p in hits]
    return tuple(dict.fromkeys(out))


def site_groups(family: str, targets) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The input groups of the sites `targets` name, in execution order, each with its site names in the order
    the targets name them."""
    groups = input_groups(family)
    by_group: dict[str, list[str]] = {}
    for s in resolve_targets(family, targets):
        by_group.setdefault(groups[s], []).append(s)
    return tuple((g, tuple(by_group[g])) for g in GROUP_ORDER if g in by_group)
