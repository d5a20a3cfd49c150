"""LoRA (and its variants rsLoRA and DoRA): weights that live apart from the weights they adapt, in the PEFT format.

Why not PEFT's own layers: PEFT wraps a base `nn.Linear` in place, so it needs the base weights in the same process.
In DLoRA the edge holds the LoRA of blocks whose base weights stay on the cloud, so here a LoRA is a free-standing
module `delta(x) = scaling * B(A(dropout(x)))`, initialised exactly as PEFT does (A Kaiming-uniform, B zero), that
is either hooked onto a local `nn.Linear` or fed by the cloud over the wire. `save_peft`/`load_peft` write and read
PEFT's files (`adapter_config.json` via `peft.LoraConfig`, `adapter_model.safetensors` with PEFT's key names), so
`peft.PeftModel.from_pretrained(full_model, path)` loads what the edge trained.

Variants, as PEFT's `LoraConfig` names them: `use_rslora` scales by alpha / sqrt(r) instead of alpha / r;
`use_dora` (DoRA, Liu et al. 2024) adds a magnitude vector m [out] per site, initialised to the row norms of the base
weight, and computes PEFT's `DoraLinearLayer` (`dora_delta`): the branch needs the base weight W, so DoRA runs
where W is — on the edge's own blocks, or on the cloud with the weights carried (never DLoRA's edge-computed branch).
The layer math (`lora_delta`, `dora_delta`) is written once here; the edge's hooks and the cloud's carried sites
(cloud/compute.py) both call it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.segments import family_of, linear_dims
from model.tuners.base import _module_key, copy_from_state, load_adapter_state, save_adapter


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # target strings as PEFT reads `target_modules`; () = the family's default (model/sites.py default_targets)
    targets: tuple[str, ...] = ()
    blocks: list[int] = field(default_factory=list)  # which blocks carry LoRA
    use_rslora: bool = False  # rsLoRA: scale by alpha / sqrt(r)
    use_dora: bool = False  # DoRA: a magnitude vector per site; needs the base weights where the branch runs

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * B A x for A [r, in], B [out, r], computed in the weights' dtype."""
    return F.linear(F.linear(x.to(a.dtype), a), b) * scaling


def dora_delta(x: torch.Tensor, base_out: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """What DoRA adds to the base output, as PEFT's `DoraLinearLayer.forward`: with the norm n = ||W + s B A|| of each
    output row (not differentiated, as in the paper's section 4.3) and g = m / n,
    (g - 1) * (W x) + g * s * B A x. `base_out` is W x without the bias; `weight` is W as [out, in]."""
    x = x.to(a.dtype)
    norm = torch.linalg.norm(weight.to(a.dtype) + scaling * (b @ a).detach(), dim=1).detach()
    g = magnitude / norm
    return (g - 1) * base_out.to(a.dtype) + g * lora_delta(x, a, b, scaling)


def dora_adapted(base: nn.Module, weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """The base linear's output `out` = base(x) with DoRA's `dora_delta` added (its W x is `out` less the bias)."""
    bias = getattr(base, "bias", None)
    base_out = out - bias if bias is not None else out
    return out + dora_delta(x, base_out, weight, a, b, magnitude, scaling).to(out.dtype)


class LoRA(nn.Module):
    """The LoRA of one site. With `weight` (the base W as [out, in]) and cfg.use_dora, also DoRA's magnitude."""

    def __init__(self, in_features: int, out_features: int, cfg: LoRAConfig, weight: torch.Tensor | None = None):
        super().__init__()
        self.lora_A = nn.Linear(in_features, cfg.r, bias=False)
        self.lora_B = nn.Linear(cfg.r, out_features, bias=False)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling = cfg.scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude = None
        if cfg.use_dora:  # B = 0 at the start, so ||W + s B A|| = ||W||
            self.lora_magnitude = nn.Parameter(torch.linalg.norm(weight.detach().float(), dim=1))

    @property
    def in_features(self) -> int:
        """Width of what the branch reads (the site's input)."""
        return self.lora_A.in_features

    def forward(self, x):
        """scaling * B A dropout(x): the branch alone (LoRA and rsLoRA; DLoRA's edge computes this)."""
        return self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling

    def adapted(self, base: nn.Module, weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The base linear's output `out` = base(x) with this site's adaptation added."""
        if self.lora_magnitude is None:
            return out + self(x).to(out.dtype)
        return dora_adapted(base, weight, self.dropout(x), out, self.lora_A.weight, self.lora_B.weight,
                            self.lora_magnitude, self.scaling)

    def carried(self) -> dict[str, torch.Tensor]:
        """The parameters the carried mode sends for this site, by their SiteWeights field (protocol/step.py)."""
        out = {"a": self.lora_A.weight, "b": self.lora_B.weight}
        if self.lora_magnitude is not None:
            out["magnitude"] = self.lora_magnitude
        return out


def site_key(block: int, site: str) -> str:
    return f"{block}/{site}"


class LoRASet(nn.Module):
    """Every LoRA of one model: sites (block, site) -> LoRA. Built from the model's shapes, no base weights needed.

    The target strings resolve to sites as PEFT resolves `target_modules` (model/sites.py): GPT-2's `c_proj` is two
    sites, `attn.c_proj` and `mlp.c_proj`. `cfg.targets` then holds the site names (each a target naming one
    site, so the PEFT config written names the same modules); `targets` keeps the strings as given."""

    peft_type = "LORA"

    def __init__(self, model, cfg: LoRAConfig, *, shapes_from=None):
        super().__init__()
        self.family = family_of(model)
        self.targets = tuple(cfg.targets) or self.family.default_targets()
        self.site_names = self.family.sites(self.targets)
        self.cfg = replace(cfg, targets=self.site_names)
        self.prefixes: dict[str, str] = {}
        self.sites = nn.ModuleDict()
        probe = self.family.blocks(shapes_from or model)
        if cfg.use_dora and shapes_from is not None:
            raise ValueError("DoRA needs the base weights of every adapted block, not only their shapes")
        for b in cfg.blocks:
            for s in self.site_names:
                lin = self.family.site_module(probe[b], s)
                weight = self.weight(lin) if cfg.use_dora else None
                self.sites[_module_key(b, s)] = LoRA(*linear_dims(lin), cfg, weight)
                self.prefixes[site_key(b, s)] = f"{self.family.block_prefix(b)}.{self.family.site_path(s)}"

    def weight(self, lin: nn.Module) -> torch.Tensor:
        """A base linear's weight as [out, in] (GPT-2's Conv1D holds it as [in, out])."""
        return lin.weight.T if self.family.fan_in_fan_out else lin.weight

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
                handles.append(lin.register_forward_hook(
                    lambda mod, inp, out, lora=lora: lora.adapted(mod, self.weight(mod), inp[0], out)))
        return handles

    # ---- PEFT format -------------------------------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, prefix in self.prefixes.items():
            lora = self.site(*_split(key))
            out[f"base_model.model.{prefix}.lora_A.weight"] = lora.lora_A.weight.detach().cpu().contiguous()
            out[f"base_model.model.{prefix}.lora_B.weight"] = lora.lora_B.weight.detach().cpu().contiguous()
            if lora.lora_magnitude is not None:
                out[f"base_model.model.{prefix}.lora_magnitude_vector"] = lora.lora_magnitude.detach().cpu().contiguous()
        return out

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        wanted = []
        for key, prefix in self.prefixes.items():
            lora = self.site(*_split(key))
            wanted += [(prefix, "lora_A.weight", lora.lora_A.weight), (prefix, "lora_B.weight", lora.lora_B.weight)]
            if lora.lora_magnitude is not None:
                wanted.append((prefix, "lora_magnitude_vector", lora.lora_magnitude))
        copy_from_state(state, wanted, "LoRA weights")

    def peft_config(self, base_model_name: str = ""):
        import peft
        cfg = self.cfg
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=list(cfg.targets), layers_to_transform=sorted(cfg.blocks),
                               layers_pattern=self.family.layers_pattern,
                               fan_in_fan_out=self.family.fan_in_fan_out,
                               use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                               base_model_name_or_path=base_model_name or None,
                               task_type="CAUSAL_LM")

    def save_peft(self, path: str | Path, base_model_name: str = "") -> Path:
        """adapter_config.json and adapter_model.safetensors in `path` (model/tuners/base.py `save_adapter`)."""
        return save_adapter(path, self.peft_config, self.peft_state_dict(), base_model_name)

    def load_peft(self, path: str | Path) -> None:
        self.load_peft_state_dict(load_adapter_state(path))


def _split(key: str) -> tuple[int, str]:
    b, t = key.split("/")
    return int(b), t

