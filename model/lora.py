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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from model.segments import family_of, linear_dims


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # target strings as PEFT reads `target_modules`; () = the family's default (model/sites.py default_targets)
    targets: tuple[str, ...] = ()
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


def site_key(block: int, site: str) -> str:
    return f"{block}/{site}"


def _module_key(block: int, site: str) -> str:  # a ModuleDict key: no dots (GPT-2's `attn.c_proj` -> `attn-c_proj`)
    return f"{block}:{site.replace('.', '-')}"


class LoRASet(nn.Module):
    """Every LoRA of one model: sites (block, site) -> LoRA. Built from the model's shapes, no base weights needed.

    The target strings resolve to sites as PEFT resolves `target_modules` (model/sites.py): GPT-2's `c_proj` is two
    sites, `attn.c_proj` and `mlp.c_proj`. `cfg.targets` then holds the site names (each a target naming one
    site, so the PEFT config written names the same modules); `targets` keeps the strings as given."""

    def __init__(self, model, cfg: LoRAConfig, *, shapes_from=None):
        super().__init__()
        self.family = family_of(model)
        self.targets = tuple(cfg.targets) or self.family.default_targets()
        self.site_names = self.family.sites(self.targets)
        self.cfg = replace(cfg, targets=self.site_names)
        self.prefixes: dict[str, str] = {}
        self.sites = nn.ModuleDict()
        probe = self.family.blocks(shapes_from or model)
        for b in cfg.blocks:
            for s in self.site_names:
                self.sites[_module_key(b, s)] = LoRA(*linear_dims(self.family.site_module(probe[b], s)), cfg)
                self.prefixes[site_key(b, s)] = f"{self.family.block_prefix(b)}.{self.family.site_path(s)}"

    def site(self, block: int, site: str) -> LoRA:
        """The LoRA of one site: a site name, or any target string that names a single site."""
        key = _module_key(block, site)
        if key not in self.sites:
            key = _module_key(block, self.family._single(site))
        return self.sites[key]

    def block_sites(self, block: int) -> list[LoRA]:
        """Every LoRA of one block, in site order."""
        return [self.sites[_module_key(block, s)] for s in self.site_names]

    def attach(self, model, blocks) -> list:
        """Hook the LoRA of `blocks` onto the local base linears: y = W x + delta(x). Returns the hook handles."""
        handles = []
        model_blocks = self.family.blocks(model)
        for b in blocks:
            for s in self.site_names:
                lora = self.site(b, s)
                lin = self.family.site_module(model_blocks[b], s)
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
        """adapter_config.json and adapter_model.safetensors in `path`, each written atomically (temporary file,
        fsync, rename): a crash leaves every file whole, the old one or the new one. `base_model_name` is the model
        spec trained on; the config names it as model/load.py `adapter_base_name` resolves it (an absolute folder,
        SmolLM2's HF folder), so `AutoPeftModelForCausalLM.from_pretrained(path)` finds the base from anywhere."""
        import tempfile
        from safetensors.torch import save
        from model.load import adapter_base_name
        from privacy.security.files import write_atomic
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        base = adapter_base_name(base_model_name)
        with tempfile.TemporaryDirectory(prefix=".adapter_config.", dir=path) as tmp:  # PEFT's own JSON, then moved
            self.peft_config(base).save_pretrained(tmp)
            config = (Path(tmp) / "adapter_config.json").read_bytes()
        write_atomic(path / "adapter_config.json", config)
        write_atomic(path / "adapter_model.safetensors", save(self.peft_state_dict(), metadata={"format": "pt"}))
        return path

    def load_peft(self, path: str | Path) -> None:
        from safetensors.torch import load_file
        self.load_peft_state_dict(load_file(str(Path(path) / "adapter_model.safetensors")))


def _split(key: str) -> tuple[int, str]:
    b, t = key.split("/")
    return int(b), t

