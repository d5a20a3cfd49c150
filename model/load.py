"""Getting a backbone: load any model into memory (SmolLM2's fetch, verification and HF folder live in
model/smollm2.py).

`load_model(spec)` accepts:
  - "smollm2"                    the cached SmolLM2-135M-Instruct GGUF (fetched by `tandem models fetch`)
  - a path to a *.gguf file      loaded with transformers' `gguf_file=`
  - a Hugging Face model folder  anything `from_pretrained` reads (config.json + weights)
  - "tiny-llama", "tiny-gpt2", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma", "tiny-phi3"
                                 tiny random models for unit tests (seeded, no files; hidden 64)
A model of a family Tandem does not cut (model/sites.py FAMILY_OF) is refused in one line (UnsupportedModel).

`adapter_base_name(spec)` is what a saved adapter names as its base (`base_model_name_or_path`), something
`AutoPeftModelForCausalLM.from_pretrained(adapter)` can load from any directory: a folder or .gguf file as its
absolute path; "smollm2" as `smollm2_hf_folder()`, the de-quantized GGUF written once as a Hugging Face folder
(PEFT cannot pass `gguf_file=`); a tiny test config keeps its name (no files: load it with `load_model` and use
`peft.PeftModel.from_pretrained(model, adapter)`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from model.smollm2 import SMOLLM2_SHA256, ModelNotFound, sha256_of, smollm2_hf_folder, smollm2_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype choices


def adapter_base_name(spec: str) -> str:
    """The `base_model_name_or_path` an adapter trained on `spec` should name (see the module docstring):
    resolvable from any working directory. "smollm2" writes its HF folder when missing; if it cannot (the GGUF
    not fetched, no space), the alias is kept, with a warning."""
    if not spec or spec in TINY:
        return spec
    if spec == "smollm2":
        try:
            return str(smollm2_hf_folder())
        except (ModelNotFound, OSError) as e:
            import logging
            logging.getLogger("tandem").warning("adapter names its base 'smollm2', not a folder: %s", e)
            return spec
    p = Path(spec).expanduser()
    if p.suffix == ".gguf" or p.exists():
        return str(p.resolve())
    return spec


@dataclass
class Loaded:
    model: torch.nn.Module  # a *ForCausalLM
    tokenizer: object | None
    name: str


def tiny_llama_config(layers: int = 6, hidden: int = 64, vocab: int = 320):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_gpt2_config(layers: int = 4, hidden: int = 64, vocab: int = 320):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_mistral_config(layers: int = 6, hidden: int = 64, vocab: int = 320):
    """With a sliding window shorter than the test sequences, so the segments must build Mistral's own mask."""
    from transformers import MistralConfig
    return MistralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, sliding_window=8,
                         max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)


def tiny_qwen2_config(layers: int = 6, hidden: int = 64, vocab: int = 320):
    """Full attention in the first 3 blocks, a short sliding window above (`layer_types`): one mask per type."""
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                       max_window_layers=3, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)


def tiny_qwen3_config(layers: int = 6, hidden: int = 64, vocab: int = 320):
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
                       tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_gemma_config(layers: int = 6, hidden: int = 64, vocab: int = 320):
    from transformers import GemmaConfig
    return GemmaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
                       tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_phi3_config(layers: int = 6, hidden: int = 64, vocab: int = 320):
    from transformers import Phi3Config
    return Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      original_max_position_embeddings=256, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)


TINY = {"tiny-llama": (tiny_llama_config, "LlamaForCausalLM"), "tiny-gpt2": (tiny_gpt2_config, "GPT2LMHeadModel"),
        "tiny-mistral": (tiny_mistral_config, "MistralForCausalLM"), "tiny-qwen2": (tiny_qwen2_config, "Qwen2ForCausalLM"),
        "tiny-qwen3": (tiny_qwen3_config, "Qwen3ForCausalLM"), "tiny-gemma": (tiny_gemma_config, "GemmaForCausalLM"),
        "tiny-phi3": (tiny_phi3_config, "Phi3ForCausalLM")}


def check_folder_supported(folder: str | Path) -> None:
    """Refuse, in one line, a model folder whose config.json is not a decoder of a family Tandem cuts."""
    import json
    from model.sites import check_supported
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return  # from_pretrained says what is wrong with it
    archs = cfg.get("architectures") or []
    check_supported(str(cfg.get("model_type")), encoder=bool(cfg.get("is_encoder_decoder"))
                    or any("MaskedLM" in a for a in archs))


def _resolve(spec: str) -> tuple[str, str | None]:
    """Return (folder, gguf_file or None) for a model spec, or raise ModelNotFound with the fix."""
    if spec == "smollm2":
        path = smollm2_path()
        if not path.exists():
            raise ModelNotFound(f"SmolLM2 is not in the cache ({path}). Run `tandem models fetch` first.")
        return str(path.parent), path.name
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise ModelNotFound(f"no GGUF file at {p}")
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFound(f"{p} is not a Hugging Face model folder (no config.json)")
        return str(p), None
    raise ModelNotFound(f"unknown model {spec!r}: use 'smollm2' (after `tandem models fetch`), a .gguf path, "
                        f"a Hugging Face model folder, or one of {', '.join(TINY)}")


def verify(spec: str) -> None:
    """Check a cached SmolLM2 against the pinned sha256 (corrupt files are named, with the fix)."""
    if spec == "smollm2":
        path = smollm2_path()
        if path.exists() and sha256_of(path) != SMOLLM2_SHA256:
            raise ModelNotFound(f"{path} is corrupt (sha256 mismatch). Run `tandem models fetch --force`.")


def load_model(spec: str = "smollm2", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0, with_tokenizer: bool = True, attn_implementation: str = "sdpa") -> Loaded:
    import transformers
    from transformers import AutoModelForCausalLM
    if spec in TINY:
        make_config, cls = TINY[spec]
        torch.manual_seed(seed)
        cfg = make_config()
        cfg._attn_implementation = attn_implementation
        model = getattr(transformers, cls)(cfg).to(dtype=dtype, device=device)
        return Loaded(model.eval(), None, spec)
    folder, gguf = _resolve(spec)
    if not gguf:
        check_folder_supported(folder)
    if spec == "smollm2":
        verify(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    from model.quiet import quiet_loading  # no progress bars or warnings while loading, unless `tandem -v`
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                                         **kwargs)
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"could not load {spec!r}: {e}. For SmolLM2 run `tandem models fetch --force`.") from e
    model.to(device).eval()
    return Loaded(model, _tokenizer(folder, kwargs) if with_tokenizer else None, spec)


def load_tokenizer(spec: str = "smollm2"):
    """The tokenizer load_model gives for `spec`, without the weights (None for the tiny random models)."""
    if spec in TINY:
        return None
    folder, gguf = _resolve(spec)
    return _tokenizer(folder, {"gguf_file": gguf} if gguf else {})


def _tokenizer(folder, kwargs: dict):
    from transformers import AutoTokenizer
    from model.quiet import quiet_loading
    with quiet_loading():
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def fingerprint(model) -> str:
    """Identifies a backbone, however it was loaded (GGUF, HF folder): its shape and a digest of its embedding
    weights. Edge and cloud must agree on it before they exchange hidden states."""
    from model.segments import family_of
    c = model.config
    shape = [getattr(c, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                            "num_key_value_heads", "intermediate_size", "vocab_size")]
    h = hashlib.sha256(repr(shape).encode())
    h.update(family_of(model).embedding(model).weight.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]
