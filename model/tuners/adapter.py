"""Bottleneck adapters (Houlsby et al. 2019): a small MLP after the attention's output projection and after the MLP's
down projection of each adapted block, y + up(act(down(y))), trained while the block stays frozen.

The same shape as LoRA's and (IA)³'s files: the config, the layer math (`Adapter`), and the set with how it attaches
and saves. On the cloud's blocks an adapter travels as DLoRA's LoRA does ("edge-branch" in protocol/step.py
`WIRE_PATTERNS`): the cloud sends the site's *output* y (the session says `branch_on_output`), the edge answers with
up(act(down(y))), and in the backward the cloud sends its gradient and the edge answers with dL/dy.

Written here, not taken from a library: PEFT has no bottleneck adapters, and AdapterHub's `adapters` (1.3.0, the
newest) requires transformers ~= 4.57 while Tandem runs on transformers 5. The adapter is AdapterHub's Houlsby
configuration (`double_seq_bn`: after attention and after the MLP, reduction factor 16, swish, biases), with one
change: `up` starts at zero, so the adapted model starts exactly as the base model (as LoRA's B = 0 does). The saved
folder is Tandem's format (`adapter_config.json` with `"peft_type": "BOTTLENECK"`, `adapter_model.safetensors`);
`AdapterSet.load_peft` reads it back (tests/test_peft_methods.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from model.segments import family_of, linear_dims
from model.tuners.base import SiteModules, load_adapter_state

FORMAT = "tandem-bottleneck-adapter/1"
DEFAULT_SITES = ("o_proj", "down_proj")  # after attention and after the MLP (Llama's names)
DEFAULT_SITES_BY_FAMILY = {"gpt2": ("attn.c_proj", "mlp.c_proj"), "phi3": ("o_proj", "down_proj")}


@dataclass
class AdapterConfig:
    reduction_factor: int = 16  # bottleneck = the site's output width / this
    targets: tuple[str, ...] = ()  # the linears whose output gets an adapter; () = attention's and the MLP's outputs
    blocks: list[int] = field(default_factory=list)  # which blocks carry adapters


class Adapter(nn.Module):
    """up(swish(down(y))) for a site's output y of `width` features."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.act = nn.SiLU()
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def in_features(self) -> int:
        """Width of what the branch reads (the site's output)."""
        return self.down.in_features

    def forward(self, y):
        return self.up(self.act(self.down(y.to(self.down.weight.dtype))))


class AdapterSet(SiteModules):
    """Every adapter of one model: sites (block, site) -> Adapter; `cfg.targets` holds their site names once built."""

    peft_type = "BOTTLENECK"
    branch_on_output = True  # its branch reads the site's output (LoRA's reads the input)

    def __init__(self, model, cfg: AdapterConfig, *, shapes_from=None):
        super().__init__()
        if cfg.reduction_factor < 1:
            raise ValueError(f"--adapter-reduction must be at least 1, got {cfg.reduction_factor}")
        self.family = family_of(model)
        self.site_names = self.family.sites(cfg.targets or DEFAULT_SITES_BY_FAMILY.get(self.family.name, DEFAULT_SITES))
        self.cfg = replace(cfg, targets=self.site_names)
        self.targets = self.site_names

        def make(lin, _site):
            width = linear_dims(lin)[1]
            return Adapter(width, max(1, width // cfg.reduction_factor))
        self._build(self.family.blocks(shapes_from or model), cfg.blocks, self.site_names, make)

    def attach(self, model, blocks) -> list:
        """y = W x becomes y + adapter(y) on the local linears of `blocks`. Returns the hook handles."""
        handles = []
        model_blocks = self.family.blocks(model)
        for b in blocks:
            for s in self.site_names:
                lin = self.family.site_module(model_blocks[b], s)
                handles.append(lin.register_forward_hook(
                    lambda mod, inp, out, a=self.site(b, s): out + a(out).to(out.dtype)))
        return handles

    # ---- saving (Tandem's format: no library reads bottleneck adapters on transformers 5) ---------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{prefix}.adapter.{name}": t.detach().cpu().contiguous()
                for (b, s), prefix in self.prefixes.items() for name, t in self.site(b, s).state_dict().items()}

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ours = self.peft_state_dict()
        if missing := [k for k in ours if k not in state]:
            raise KeyError(f"adapter lacks {len(missing)} bottleneck weights, e.g. {missing[:3]}")
        for (b, s), prefix in self.prefixes.items():
            a = self.site(b, s)
            part = {n: state[f"{prefix}.adapter.{n}"] for n in a.state_dict()}
            for n, t in part.items():
                if t.shape != a.state_dict()[n].shape:
                    raise ValueError(f"{prefix}.adapter.{n}: shape {tuple(t.shape)} != {tuple(a.state_dict()[n].shape)}")
            a.load_state_dict(part)

    def config_json(self, base_model_name: str = "") -> dict:
        return {"format": FORMAT, "peft_type": self.peft_type, "architecture": "bottleneck", "non_linearity": "swish",
                "reduction_factor": self.cfg.reduction_factor, "target_modules": list(self.site_names),
                "layers_to_transform": sorted(self.cfg.blocks), "base_model_name_or_path": base_model_name or None}

    def save_peft(self, path: str | Path, base_model_name: str = "") -> Path:
        """adapter_config.json and adapter_model.safetensors in `path` (Tandem's format, see the module's text),
        each written atomically."""
        from safetensors.torch import save
        from model.load import adapter_base_name
        from privacy.security.files import write_atomic
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config_json(adapter_base_name(base_model_name))
        write_atomic(path / "adapter_config.json", json.dumps(config, indent=2).encode())
        write_atomic(path / "adapter_model.safetensors", save(self.peft_state_dict(), metadata={"format": "pt"}))
        return path

    def load_peft(self, path: str | Path) -> None:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{path} is not a Tandem bottleneck adapter (format {config.get('format')!r})")
        self.load_peft_state_dict(load_adapter_state(path))
