"""What every tuner shares: writing an adapter folder in the PEFT format, and naming parameters as PEFT does.

A tuner's set (LoRASet, IA3Set, PromptSet) gives its `peft_config(base_name)` and `peft_state_dict()`; this file
writes them where `peft.PeftModel.from_pretrained(full_model, path)` reads them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn


def save_adapter(path: str | Path, peft_config: Callable[[str], object], state: dict[str, torch.Tensor],
                 base_model_name: str = "") -> Path:
    """adapter_config.json (PEFT's own JSON, from `peft_config(base)`) and adapter_model.safetensors in `path`, each
    written atomically (temporary file, fsync, rename): a crash leaves every file whole, the old one or the new one.
    `base_model_name` is the model spec trained on; the config names it as model/load.py `adapter_base_name` resolves
    it (an absolute folder, SmolLM2's HF folder), so `AutoPeftModelForCausalLM.from_pretrained(path)` finds the base
    from anywhere."""
    import tempfile
    from safetensors.torch import save
    from model.load import adapter_base_name
    from privacy.security.files import write_atomic
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    base = adapter_base_name(base_model_name)
    with tempfile.TemporaryDirectory(prefix=".adapter_config.", dir=path) as tmp:  # PEFT's own JSON, then moved
        peft_config(base).save_pretrained(tmp)
        config = (Path(tmp) / "adapter_config.json").read_bytes()
    write_atomic(path / "adapter_config.json", config)
    write_atomic(path / "adapter_model.safetensors", save(state, metadata={"format": "pt"}))
    return path


def load_adapter_state(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def peft_key(module_prefix: str, name: str) -> str:
    """PEFT's key of a parameter `name` of the module at `module_prefix` (adapter name removed, as PEFT saves)."""
    return f"base_model.model.{module_prefix}.{name}"


def find_key(state: dict, module_prefix: str, name: str) -> str | None:
    """The key of `name` in a PEFT state dict, as saved (no adapter name) or as a live model holds it (`lora_A.default
    .weight`, `ia3_l.default`, `lora_magnitude_vector.default.weight`)."""
    head, _, tail = name.rpartition(".")
    forms = [name, f"{head}.default.{tail}" if head else f"{name}.default", f"{name}.default.weight"]
    return next((k for k in (peft_key(module_prefix, f) for f in forms) if k in state), None)


def copy_from_state(state: dict, wanted, what: str) -> None:
    """Copy each (module prefix, PEFT name, parameter) of `wanted` from a PEFT state dict, shapes checked; a missing
    one is a KeyError counting them all (`what` names them: "LoRA weights")."""
    missing = []
    for prefix, part, param in wanted:
        name = find_key(state, prefix, part)
        if name is None:
            missing.append(f"{prefix}.{part}")
            continue
        if state[name].shape != param.shape:
            raise ValueError(f"{name}: shape {tuple(state[name].shape)} != {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(state[name])
    if missing:
        raise KeyError(f"adapter lacks {len(missing)} {what}, e.g. {missing[:3]}")


STATE_KEY = "prompt_embeddings"  # PEFT's one key for the prompt-learning methods (prompt, P-, prefix tuning)


class SavedTableSet(nn.Module):
    """What the prompt-learning sets share (PromptSet, PrefixSet): PEFT saves one table, `prompt_embeddings`, the
    encoder's output for the V virtual tokens; a set whose encoder has an MLP loads it as PEFT's inference form, a
    table with no MLP (what `PeftModel.from_pretrained` builds; training it on trains the table directly).

    A subclass has `peft_type`, `num_virtual`, `encoder` (whose `embedding.weight` is the table), `inference`,
    `_config(base_model_name=, inference_mode=)`, and gives `_output()` (the encoder's output, [V, width]),
    `_width`, `_tokens_flag` (the flag that sets V) and `_inference_encoder()` (PEFT's inference form of its
    encoder, or None when the encoder's table already is what PEFT saves)."""

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's saved form (PeftModel.get_prompt_embedding_to_save): the encoder's output, [V, width]."""
        with torch.no_grad():
            return {STATE_KEY: self._output().detach().cpu().contiguous()}

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load PEFT's saved form into the table (first switching an MLP encoder to PEFT's inference form)."""
        key = next((k for k in (STATE_KEY, f"{STATE_KEY}.default") if k in state), None)
        if key is None:
            raise KeyError(f"adapter lacks {STATE_KEY!r} (a {self.peft_type} adapter holds only that), it has "
                           f"{sorted(state)[:3]}")
        weights = state[key]
        want = (self.num_virtual, self._width)
        if tuple(weights.shape) != want:
            raise ValueError(f"{key}: shape {tuple(weights.shape)} != {want} ({self._tokens_flag} {want[0]} here)")
        table = self.encoder.embedding.weight
        if not self.inference and (encoder := self._inference_encoder()) is not None:
            self.encoder, self.inference = encoder.to(table.device, table.dtype), True
            table = self.encoder.embedding.weight
        with torch.no_grad():
            table.copy_(weights.to(table.dtype))

    def save_peft(self, path: str | Path, base_model_name: str = "") -> Path:
        """adapter_config.json (inference_mode true, as PeftModel.save_pretrained writes it) and
        adapter_model.safetensors in `path` (`save_adapter`)."""
        return save_adapter(path, lambda base: self._config(base_model_name=base, inference_mode=True),
                            self.peft_state_dict(), base_model_name)

    def load_peft(self, path: str | Path) -> None:
        self.load_peft_state_dict(load_adapter_state(path))


class SiteModules(nn.Module):
    """What the (IA)³ and adapter sets share: `sites`, (block, site name) -> that site's module, made by
    `make(base linear, site name)` from a model's blocks, and `prefixes`, each one's module path in the full model."""

    def _build(self, blocks_of, blocks, site_names, make) -> None:
        self.prefixes: dict[tuple[int, str], str] = {}
        self.sites = nn.ModuleDict()
        for b in blocks:
            for s in site_names:
                self.sites[_module_key(b, s)] = make(self.family.site_module(blocks_of[b], s), s)
                self.prefixes[b, s] = f"{self.family.block_prefix(b)}.{self.family.site_path(s)}"

    def site(self, block: int, site: str) -> nn.Module:
        return self.sites[_module_key(block, site)]


def _module_key(block: int, site: str) -> str:  # a ModuleDict key: no dots (GPT-2's `attn.c_proj` -> `attn-c_proj`)
    return f"{block}:{site.replace('.', '-')}"
