"""(IA)³ (Liu et al. 2022): learned vectors that rescale some linears' outputs (keys, values) or inputs (the MLP's
inner activation, PEFT's `feedforward_modules`), in the PEFT format.

The same shape as LoRA's file: the config, the layer math (`ia3_forward`, written once: the edge's hooks and the
cloud's carried sites both call it), and the set of every vector of one model with how it attaches and saves.
Vectors start at 1 (the model unchanged), as PEFT's `init_ia3_weights=True`; each is held in PEFT's shape, (out, 1)
for an output-scaled site and (1, in) for a feed-forward one, so the state dict is PEFT's as it is.

On the cloud's blocks (IA)³ travels in the carried mode: a vector per site is a few KB, far less than the activations
an edge-computed branch would need (`tandem sim` counts both), so there is no DLoRA form of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from model.segments import family_of, linear_dims
from model.tuners.base import SiteModules, copy_from_state, load_adapter_state, save_adapter


@dataclass
class IA3Config:
    # target strings as PEFT reads `target_modules`; () = PEFT's default for the model type
    targets: tuple[str, ...] = ()
    feedforward: tuple[str, ...] = ()  # the targets scaled at their input; () with default targets = PEFT's default
    blocks: list[int] = field(default_factory=list)  # which blocks carry vectors


def default_targets(model_type: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """PEFT's (IA)³ defaults for a model type: (targets, feed-forward targets)."""
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)
    if model_type not in TARGETS:
        raise ValueError(f"PEFT has no (IA)³ default targets for {model_type}: give --ia3-targets and --ia3-feedforward")
    return tuple(TARGETS[model_type]), tuple(FF.get(model_type, ()))


def ia3_scale(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t * l over the last dim, computed in the vector's dtype, returned in t's."""
    return (t.to(scale.dtype) * scale.flatten()).to(t.dtype)


def ia3_forward(base: nn.Module, x: torch.Tensor, scale: torch.Tensor, feedforward: bool) -> torch.Tensor:
    """PEFT's `IA3Linear.forward`: base(x * l) for a feed-forward site, base(x) * l otherwise."""
    return base(ia3_scale(x, scale)) if feedforward else ia3_scale(base(x), scale)


class IA3(nn.Module):
    """The vector of one site, in PEFT's shape."""

    def __init__(self, in_features: int, out_features: int, feedforward: bool):
        super().__init__()
        self.feedforward = feedforward
        self.ia3_l = nn.Parameter(torch.ones((1, in_features) if feedforward else (out_features, 1)))

    def carried(self) -> dict[str, torch.Tensor]:
        """The parameters the carried mode sends for this site, by their SiteWeights field (protocol/step.py)."""
        return {"scale": self.ia3_l}


class IA3Set(SiteModules):
    """Every (IA)³ vector of one model: sites (block, site) -> IA3. `cfg.targets` / `cfg.feedforward` hold site
    names (model/sites.py) once built."""

    peft_type = "IA3"

    def __init__(self, model, cfg: IA3Config, *, shapes_from=None):
        super().__init__()
        self.family = family_of(model)
        targets, feedforward = cfg.targets, cfg.feedforward
        if not targets:
            targets, default_ff = default_targets(model.config.model_type)
            feedforward = feedforward or default_ff
        self.site_names = self.family.sites(targets)
        ff_sites = self.family.sites(feedforward) if feedforward else ()
        if stray := [s for s in ff_sites if s not in self.site_names]:
            raise ValueError(f"--ia3-feedforward {','.join(stray)} is not among the (IA)³ targets "
                             f"({','.join(self.site_names)}): feed-forward sites must be targets too")
        self.cfg = replace(cfg, targets=self.site_names, feedforward=tuple(ff_sites))
        self.targets = self.site_names
        self._build(self.family.blocks(shapes_from or model), cfg.blocks, self.site_names,
                    lambda lin, s: IA3(*linear_dims(lin), s in ff_sites))

    def attach(self, model, blocks) -> list:
        """Scale the local linears of `blocks`: a pre-hook on a feed-forward site's input, a hook on another's
        output. Returns the hook handles."""
        handles = []
        model_blocks = self.family.blocks(model)
        for b in blocks:
            for s in self.site_names:
                v, lin = self.site(b, s), self.family.site_module(model_blocks[b], s)
                if v.feedforward:
                    handles.append(lin.register_forward_pre_hook(lambda mod, inp, v=v: (ia3_scale(inp[0], v.ia3_l),)))
                else:
                    handles.append(lin.register_forward_hook(lambda mod, inp, out, v=v: ia3_scale(out, v.ia3_l)))
        return handles

    # ---- PEFT format -------------------------------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"base_model.model.{prefix}.ia3_l": self.site(b, s).ia3_l.detach().cpu().contiguous()
                for (b, s), prefix in self.prefixes.items()}

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        copy_from_state(state, [(prefix, "ia3_l", self.site(b, s).ia3_l) for (b, s), prefix in self.prefixes.items()],
                        "(IA)³ vectors")

    def peft_config(self, base_model_name: str = ""):
        """PEFT's IA3Config. It has no `layers_to_transform`, so the sites are named one by one, as a regular
        expression of their module paths (PEFT full-matches a string `target_modules`)."""
        import re
        import peft

        def pattern(sites) -> str:
            return "|".join(re.escape(p) for (b, s), p in self.prefixes.items() if s in sites)
        return peft.IA3Config(target_modules=pattern(self.cfg.targets),
                              feedforward_modules=pattern(self.cfg.feedforward) or None,
                              fan_in_fan_out=self.family.fan_in_fan_out,
                              base_model_name_or_path=base_model_name or None, task_type="CAUSAL_LM")

    def save_peft(self, path: str | Path, base_model_name: str = "") -> Path:
        return save_adapter(path, self.peft_config, self.peft_state_dict(), base_model_name)

    def load_peft(self, path: str | Path) -> None:
        self.load_peft_state_dict(load_adapter_state(path))
