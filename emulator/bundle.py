"""The files that travel in offsite-tuning: the cloud's bundle (adapter + emulator) and the data owner's adapter.

Both are a folder with a `manifest.json` that records the sha256 of every other file in it:

    bundle/                                    adapter/
      manifest.json                              manifest.json
      weights.safetensors                        adapter.safetensors          (mode "full": the adapter blocks)
      tokenizer/tokenizer.json, ...              peft/adapter_model.safetensors (mode "lora", PEFT format,
                                                 peft/adapter_config.json        keyed to the full model)

Tensors are named as in the full model (`model.layers.29.mlp.up_proj.weight`), so a bundle shows which blocks it
holds: the adapter blocks and the kept emulator blocks, never the dropped ones. `load_bundle` turns a bundle into
an ordinary Hugging Face model with fewer layers (the data owner's model), `compact_model` does the same from the full
model on the cloud.

To travel, a folder is zipped and sealed: see `emulator/transport.py`.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import torch

from emulator.prune import fit_linears_to
from privacy.security.files import write_atomic

BUNDLE_FORMAT = "tandem-offsite-bundle/1"
ADAPTER_FORMAT = "tandem-offsite-adapter/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


class BundleError(RuntimeError):
    """A bundle or adapter cannot be used: the message says what is wrong with it."""


# ------------------------------------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Layout:
    """Which blocks of an L-block model go where. All indices are the full model's."""
    num_layers: int
    bottom: tuple[int, ...]  # adapter blocks at the bottom (trainable at the data owner)
    top: tuple[int, ...]  # adapter blocks at the top (trainable)
    emulator: tuple[int, ...]  # kept middle blocks (frozen, lossy stand-in for the whole middle)

    @property
    def adapter(self) -> tuple[int, ...]:
        return self.bottom + self.top

    @property
    def kept(self) -> tuple[int, ...]:
        """Blocks the data owner's model runs, in order."""
        return self.bottom + self.emulator + self.top

    @property
    def middle(self) -> tuple[int, ...]:
        return tuple(range(len(self.bottom), self.num_layers - len(self.top)))

    @property
    def drop_ratio(self) -> float:
        return 1 - len(self.emulator) / len(self.middle)

    def position(self, block: int) -> int:
        """Index of full-model block `block` inside the data owner's (compact) model."""
        return self.kept.index(block)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_json(d: dict) -> "Layout":
        return Layout(int(d["num_layers"]), tuple(d["bottom"]), tuple(d["top"]), tuple(d["emulator"]))


_BLOCK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")  # Llama-style `model.layers.12.`, GPT-2 `transformer.h.12.`


def block_of(name: str) -> int | None:
    """The block index in a tensor name like `model.layers.12.mlp.up_proj.weight` (None outside the blocks)."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def renumber(name: str, mapping: dict[int, int]) -> str:
    """Rename a tensor from one block numbering to another (full model <-> compact model)."""
    m = _BLOCK.search(name)
    return name if m is None else f"{name[:m.start(1)]}{mapping[int(m.group(1))]}{name[m.end(1):]}"


# --------------------------------------------------------------------------------------------- compact models

def compact_config(config: dict, layout: Layout):
    """The Hugging Face config of the compact model: the full model's, with only the kept blocks."""
    from transformers import CONFIG_MAPPING
    cfg = dict(config)
    cfg.pop("quantization_config", None)
    cfg["num_hidden_layers"] = len(layout.kept)
    if isinstance(cfg.get("layer_types"), list):  # per-layer settings (sliding window models) follow their blocks
        cfg["layer_types"] = [cfg["layer_types"][b] for b in layout.kept]
    return CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)


def model_from_state(config: dict, layout: Layout, state: dict[str, torch.Tensor], dtype=torch.float32,
                     attn_implementation: str = "sdpa"):
    """Build the compact model (len(layout.kept) blocks) from full-model-named tensors of exactly those blocks."""
    from transformers import AutoModelForCausalLM
    cfg = compact_config(config, layout)
    cfg._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    to_compact = {b: j for j, b in enumerate(layout.kept)}
    state = {renumber(k, to_compact): v for k, v in state.items()}
    fit_linears_to(model, state)  # MLPs pruned at build (emulator/prune.py) are stored narrower
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = [k for k in missing if k == "lm_head.weight" and cfg.tie_word_embeddings]
    if set(missing) - set(tied) or unexpected:
        raise BundleError(f"weights do not fit the layout: missing {sorted(set(missing) - set(tied))[:4]}, "
                          f"unexpected {sorted(unexpected)[:4]}")
    model.tie_weights()
    return model.eval()


def full_state_for(model, layout: Layout) -> dict[str, torch.Tensor]:
    """The tensors of the full `model` that a bundle with `layout` carries: no dropped block, no tied copy."""
    keep = set(layout.kept)
    state = {}
    for name, t in model.state_dict().items():
        b = block_of(name)
        if b is not None and b not in keep:
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[name] = t
    return state


def compact_model(full, layout: Layout, attn_implementation: str = "sdpa"):
    """The data owner's model (adapter + emulator) cut from the full model: a copy, the full model is untouched."""
    state = {k: v.detach().clone() for k, v in full_state_for(full, layout).items()}
    return model_from_state(full.config.to_dict(), layout, state, dtype=next(full.parameters()).dtype,
                            attn_implementation=attn_implementation)


# ------------------------------------------------------------------------------------------------- manifests

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safe_relpath(name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name or not p.parts or name != str(p) or name == MANIFEST:
        raise BundleError(f"unsafe or reserved file name in manifest: {name!r}")
    return name


def write_manifest(folder: str | Path, manifest: dict) -> dict:
    """Record the sha256 of every file under `folder` (except the manifest) and write `manifest.json`."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = sha256_bytes(p.read_bytes())
    manifest = {**manifest, "files": files}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def verify_dir(folder: str | Path, fmt: str) -> dict:
    """Read `manifest.json`, check its format and every file's sha256. Returns the manifest."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise BundleError(f"{folder} has no {MANIFEST}: not a Tandem offsite bundle or adapter")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except ValueError as e:
        raise BundleError(f"{folder / MANIFEST} is not valid JSON: {e}") from None
    if manifest.get("format") != fmt:
        raise BundleError(f"{folder} is a {manifest.get('format')!r}, expected a {fmt!r}")
    for name, digest in manifest.get("files", {}).items():
        path = folder / safe_relpath(name)
        if not path.is_file():
            raise BundleError(f"{folder}: file {name} listed in the manifest is missing")
        if sha256_bytes(path.read_bytes()) != digest:
            raise BundleError(f"{folder}: {name} does not match its manifest hash (corrupt or tampered)")
    return manifest


def manifest_digest(manifest: dict) -> str:
    """Identifies a bundle: the sha256 of its canonical manifest (which holds every file's hash)."""
    return sha256_bytes(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())


# ------------------------------------------------------------------------------------------------- loading

@dataclass
class Emulated:
    """A verified bundle, loaded: the data owner's model (adapter blocks + emulator), its tokenizer and manifest."""
    model: torch.nn.Module
    tokenizer: object | None
    manifest: dict
    layout: Layout

    @property
    def adapter_positions(self) -> list[int]:
        """Where the adapter blocks sit inside `model` (the compact numbering)."""
        return [self.layout.position(b) for b in self.layout.adapter]


def load_bundle(folder: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> Emulated:
    """Verify a bundle folder (format, every file's sha256) and load it as a compact Hugging Face model."""
    from safetensors.torch import load_file
    folder = Path(folder)
    manifest = verify_dir(folder, BUNDLE_FORMAT)
    if manifest["files"].get(WEIGHTS) is None:
        raise BundleError(f"{folder}: the manifest lists no {WEIGHTS}")
    layout = Layout.from_json(manifest["layout"])
    state = load_file(str(folder / WEIGHTS))
    stray = sorted({block_of(k) for k in state} - {None} - set(layout.kept))
    if stray:
        raise BundleError(f"{folder}: carries weights of blocks {stray}, which its layout does not keep")
    model = model_from_state(manifest["config"], layout, {k: v.to(dtype) for k, v in state.items()}, dtype,
                             attn_implementation)
    tokenizer = None
    if "tokenizer/tokenizer_config.json" in manifest["files"]:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
    return Emulated(model, tokenizer, manifest, layout)
