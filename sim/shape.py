"""A decoder's shapes, read from a Hugging Face `config.json` alone (no weights, no transformers import).

Everything the simulator computes (FLOPs, parameter counts, tensor shapes on the wire) follows from these few
numbers. Shipped configs: `smollm2-135m` (the model Tandem runs here), `llama-7b` and `llama-70b` (shapes of the
Llama-2 checkpoints, which we cannot run here but want to predict).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from model.sites import input_groups

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "llama2-7b": "llama-7b",
           "llama2-70b": "llama-70b"}

# LoRA target -> input group (targets of one group read the same input and travel together in DLoRA): the Llama
# family's table in model/sites.py, the one the edge and the cloud use.
INPUT_GROUPS = input_groups("llama")


@dataclass(frozen=True)
class ModelShape:
    """Shapes of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2): L blocks of attention + SwiGLU MLP."""
    name: str
    hidden: int  # H
    intermediate: int  # I
    layers: int  # L
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """Every linear layer of one block: name -> (in_features, out_features). No biases (Llama)."""
        H, I = self.hidden, self.intermediate
        return {"q_proj": (H, self.q_dim), "k_proj": (H, self.kv_dim), "v_proj": (H, self.kv_dim),
                "o_proj": (self.q_dim, H), "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}

    def linear(self, target: str) -> tuple[int, int]:
        try:
            return self.linears()[target]
        except KeyError:
            raise ValueError(f"unknown LoRA target {target!r}; known: {sorted(self.linears())}") from None

    @property
    def block_params(self) -> int:
        """Weights of one block: its linears and two RMSNorm scales."""
        return sum(i * o for i, o in self.linears().values()) + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """Final norm plus the LM head (zero extra weights when tied to the embedding)."""
        return self.hidden + (0 if self.tied_embeddings else self.vocab * self.hidden)

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.layers * self.block_params + self.head_params

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        """LoRA weights of one block: A [r, in] and B [out, r] per target."""
        return sum(rank * (i + o) for i, o in (self.linear(t) for t in targets))


def _from_dict(name: str, cfg: dict) -> ModelShape:
    kind = cfg.get("model_type", "llama")
    if kind not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"{name}: model_type {kind!r} is not a Llama-family decoder the simulator knows")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return ModelShape(name=name, hidden=hidden, intermediate=int(cfg["intermediate_size"]),
                      layers=int(cfg["num_hidden_layers"]), heads=heads,
                      kv_heads=int(cfg.get("num_key_value_heads") or heads),
                      head_dim=int(cfg.get("head_dim") or hidden // heads), vocab=int(cfg["vocab_size"]),
                      tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def shipped() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_shape(spec: str) -> ModelShape:
    """A shipped name (`smollm2-135m`, `llama-7b`, `llama-70b`; `smollm2` works too), a config.json, or a folder
    holding one."""
    name = ALIASES.get(spec, spec)
    if (CONFIG_DIR / f"{name}.json").exists():
        path = CONFIG_DIR / f"{name}.json"
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no model config {spec!r}: use one of {shipped()}, a config.json or a folder "
                                    "holding one")
        name = path.parent.name if path.name == "config.json" else path.stem
    return _from_dict(name, json.loads(path.read_text()))


def shape_from_dict(name: str, cfg: dict) -> ModelShape:
    """A shape from an in-memory config dict (tests, or a transformers config's `to_dict()`)."""
    return _from_dict(name, cfg)
