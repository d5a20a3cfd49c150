"""Model families Tandem cuts, one module each with the same shape (`base.Family`), and the registry.

`family_of(model)` picks the driver from `model.config.model_type`; anything else (an encoder, an architecture
without a driver) is refused in one line that names the supported families (model/sites.py)."""
from __future__ import annotations

from model.families.base import Family, linear_dims
from model.families.gemma import GemmaFamily
from model.families.gpt2 import GPT2Family
from model.families.llama import LlamaFamily
from model.families.phi3 import Phi3Family
from model.families.qwen3 import Qwen3Family
from model.sites import FAMILY_OF, UnsupportedModel, check_supported

_CLASSES = {cls.name: cls for cls in (LlamaFamily, Qwen3Family, GemmaFamily, Phi3Family, GPT2Family)}
FAMILIES: dict[str, type[Family]] = {kind: _CLASSES[fam] for kind, fam in FAMILY_OF.items()}  # model_type -> class


def _is_encoder(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_encoder_decoder", False)) or any("MaskedLM" in a for a in archs)


def family_of(model) -> Family:
    """The family driver of a loaded model, or UnsupportedModel (a ValueError) in one line."""
    config = model.config
    kind = getattr(config, "model_type", None) or type(model).__name__
    check_supported(kind, encoder=_is_encoder(config))
    return FAMILIES[kind]()


__all__ = ["Family", "FAMILIES", "GPT2Family", "GemmaFamily", "LlamaFamily", "Phi3Family", "Qwen3Family",
           "UnsupportedModel", "family_of", "linear_dims"]
