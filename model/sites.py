"""Where the trainable branches of a block sit, per model family, with no torch import (the simulator reads it).

A *site* is one linear layer of a block that carries a LoRA (or another branch). Sites that read the same input form
an *input group*: in DLoRA the cloud sends that input once per block and group, and the edge answers with one output
per target of the group. Groups run in block order and, inside a block, in `GROUP_ORDER`; the targets of a group
are listed in the order the session names them. Edge, cloud and simulator all take the groups from here.
"""
from __future__ import annotations

GROUP_ORDER = ("attn_in", "attn_out", "mlp_in", "mlp_out")  # execution order inside one block

# family -> target -> input group
INPUT_GROUPS: dict[str, dict[str, str]] = {
    "llama": {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out"},
    # c_proj exists in both attention and MLP, so it is not a site name of its own yet
    "gpt2": {"c_attn": "attn_in", "c_fc": "mlp_in"},
}
FAMILY_OF = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}  # HF model_type -> family


def input_groups(family: str) -> dict[str, str]:
    return INPUT_GROUPS[family]


def site_groups(family: str, targets) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The input groups of `targets` in execution order, each with its targets in the order given."""
    groups = INPUT_GROUPS[family]
    unknown = [t for t in targets if t not in groups]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown} for the {family} family; known: {sorted(groups)}")
    by_group: dict[str, list[str]] = {}
    for t in targets:
        by_group.setdefault(groups[t], []).append(t)
    return tuple((g, tuple(by_group[g])) for g in GROUP_ORDER if g in by_group)
