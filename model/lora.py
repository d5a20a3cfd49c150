"""LoRA weights that live apart from the weights they adapt, saved in the PEFT format.

Why not PEFT's own layers: PEFT wraps a base `nn.Linear` in place, so it needs the base weights in the same process.
In DLoRA the edge holds the LoRA of blocks whose base weights stay on the cloud, so here a LoRA is a free-standing
module `delta(x) = scaling * B(A(dropout(x)))`, initialised exactly as PEFT does (A Kaiming-uniform, B zero), that
is either hooked onto a local `nn.Linear` or fed by the cloud over the wire. `save_peft`/`load_peft` write and read
PEFT's files (`adapter_config.json` via `peft.LoraConfig`, `adapter_model.safetensors` with PEFT's key names), so
`peft.PeftModel.from_pretrained(full_model, path)` loads what the edge trained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model.segments import family_of, linear_dims


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    blocks: list[int] = field(default_factory=list)  # which blocks carry LoRA

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, cfg: LoRAConfig):
        super().__init__()
        self.lora_A = nn.Linear(in_features, cfg.r, bias=False)
        self.lora_B = nn.Linear(cfg.r, out_features, bias=False)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling = cfg.scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling


def site_key(block: int, target: str) -> str:
    return f"{block}/{target}"


class LoRASet(nn.Module):
    """Every LoRA of one model: sites (block, target) -> LoRA. Built from the model's shapes, no base weights needed."""

    def __init__(self, model, cfg: LoRAConfig, *, shapes_from=None):
        super().__init__()
        self.cfg = cfg
        self.family = family_of(model)
        self.prefixes: dict[str, str] = {}
        self.sites = nn.ModuleDict()
        probe = self.family.blocks(shapes_from or model)
        for b in cfg.blocks:
            for t in cfg.targets:
                self.sites[site_key(b, t).replace("/", ":")] = LoRA(*linear_dims(self.family.target_module(probe[b], t)),
                                                                    cfg)
                self.prefixes[site_key(b, t)] = f"{self.family.block_prefix(b)}.{self.family.target_path(probe[b], t)}"

    def site(self, block: int, target: str) -> LoRA:
        return self.sites[f"{block}:{target}"]

    def attach(self, model, blocks) -> list:
        """Hook the LoRA of `blocks` onto the local base linears: y = W x + delta(x). Returns the hook handles."""
        handles = []
        model_blocks = self.family.blocks(model)
        for b in blocks:
            for t in self.cfg.targets:
                lora = self.site(b, t)
                lin = self.family.target_module(model_blocks[b], t)
                handles.append(lin.register_forward_hook(lambda mod, inp, out, lora=lora: out + lora(inp[0]).to(out.dtype)))
        return handles

    # ---- PEFT format -------------------------------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, prefix in self.prefixes.items():
            lora = self.site(*_split(key))
            out[f"base_model.model.{prefix}.lora_A.weight"] = lora.lora_A.weight.detach().cpu().contiguous()
            out[f"base_model.model.{prefix}.lora_B.weight"] = lora.lora_B.weight.detach().cpu().contiguous()
        return out

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = []
        for key, prefix in self.prefixes.items():
            lora = self.site(*_split(key))
            for part, lin in (("lora_A", lora.lora_A), ("lora_B", lora.lora_B)):
                name = next((n for n in (f"base_model.model.{prefix}.{part}.weight",
                                         f"base_model.model.{prefix}.{part}.default.weight") if n in state), None)
                if name is None:
                    missing.append(f"{prefix}.{part}")
                    continue
                if state[name].shape != lin.weight.shape:
                    raise ValueError(f"{name}: shape {tuple(state[name].shape)} != {tuple(lin.weight.shape)}")
                with torch.no_grad():
                    lin.weight.copy_(state[name])
        if missing:
            raise KeyError(f"adapter lacks {len(missing)} LoRA weights, e.g. {missing[:3]}")

    def peft_config(self, base_model_name: str = ""):
        import peft
        cfg = self.cfg
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=list(cfg.targets), layers_to_transform=sorted(cfg.blocks),
                               layers_pattern=self.family.layers_pattern,
                               fan_in_fan_out=self.family.fan_in_fan_out,
                               base_model_name_or_path=base_model_name or None,
                               task_type="CAUSAL_LM")

    def save_peft(self, path: str | Path, base_model_name: str = "") -> Path:
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.peft_config(base_model_name).save_pretrained(str(path))
        save_file(self.peft_state_dict(), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        return path

    def load_peft(self, path: str | Path) -> None:
        from safetensors.torch import load_file
        self.load_peft_state_dict(load_file(str(Path(path) / "adapter_model.safetensors")))


def _split(key: str) -> tuple[int, str]:
    b, t = key.split("/")
    return int(b), t

