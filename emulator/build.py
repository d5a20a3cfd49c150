"""Build an offsite-tuning bundle on the cloud: adapter blocks + a compressed, frozen emulator of the middle.

    full model:  [b0 b1] [b2 b3 b4 b5 ... b26 b27] [b28 b29]     (SmolLM2: 30 blocks)
    bundle:      [b0 b1] [b2 b5 b8 ... b24 b27]    [b28 b29]     adapter = 2 bottom + 2 top, drop 0.6: 10 of 26 kept

The emulator keeps middle blocks uniformly (the paper's layer drop: evenly spaced, the first and last middle block
always kept). Optionally it is distilled toward the full middle on public text (WikiText-2): the bottom adapter's
output goes into both the full middle (teacher) and the emulator (student), and the emulator's blocks learn to give
the same hidden states (the paper's squared error, made relative, plus a per-token term), and optionally the same
gradients downward (emulator/distill.py).
The adapter blocks and the embedding are never changed, so the data owner starts from the real model's adapter.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import tasks as T
from emulator import prune, quality
from emulator.bundle import BUNDLE_FORMAT, WEIGHTS, Layout, compact_model, full_state_for, renumber, write_manifest
from emulator.distill import MiddlePair, dev_batches, distill, held_out_error, wikitext_batches, wikitext_items
from emulator.tune import hidden
from model.load import DTYPES, fingerprint, load_model
from model.segments import family_of


@dataclass
class BuildConfig:
    model: str = "smollm2"
    bottom: int = 2  # adapter blocks at the bottom
    top: int = 2  # adapter blocks at the top
    drop: float = 0.6  # fraction of the middle blocks dropped (SmolLM2: 0.6 keeps 10 of 26; see bench/offsite.py)
    mlp_keep: float = 1.0  # share of each kept middle block's MLP neurons kept, down projection refit (prune.py)
    mlp_batches: int = 24  # WikiText-2 batches the MLP pruning measures its neurons on
    distill_steps: int = 0  # 0: no distillation (bench/offsite_sweep.py: on SmolLM2 it lowered the plug-in)
    distill_lr: float = 3e-4
    distill_batch: int = 8
    distill_seq: int = 64
    distill_warmup: int = 0  # distillation steps of linear warmup
    distill_schedule: str = "constant"  # after the warmup: "constant", "linear" or "cosine" (model.training.fit)
    distill_max_grad_norm: float | None = None  # gradient clipping during distillation (None: none)
    distill_gradient_weight: float = 0.0  # > 0: also match the gradients passed down (distill.py; no plug-in gain)
    distill_eval_batches: int = 4  # held-out WikiText-2 batches to measure the emulator's error before and after
    alignment_batches: int = 2  # held-out WikiText-2 batches for the gradient alignment check (0: skip)
    quality_task: str = "sst2"  # public task whose zero-shot gap (full vs emulator) the manifest records ('': none)
    quality_examples: int = 100  # its first dev examples measured
    dtype: str = "float32"  # how the weights are stored in the bundle
    seed: int = 0
    progress: bool = True


def uniform_drop(middle: list[int], drop: float) -> list[int]:
    """Keep round(len * (1 - drop)) evenly spaced blocks of `middle`, always the first and the last."""
    if not 0 <= drop < 1:
        raise ValueError(f"drop ratio must be in [0, 1), got {drop}")
    n = max(1, round(len(middle) * (1 - drop)))
    if n == 1:
        return [middle[0]]
    stride = (len(middle) - 1) / (n - 1)
    return [middle[round(i * stride)] for i in range(n)]


def make_layout(num_layers: int, bottom: int, top: int, drop: float) -> Layout:
    if bottom < 1 or top < 1 or bottom + top >= num_layers:
        raise ValueError(f"need bottom >= 1, top >= 1 and bottom + top < {num_layers}, got {bottom} + {top}")
    middle = list(range(bottom, num_layers - top))
    return Layout(num_layers, tuple(range(bottom)), tuple(range(num_layers - top, num_layers)),
                  tuple(uniform_drop(middle, drop)))


def check_config(cfg: BuildConfig) -> None:
    """The build settings a user can get wrong, checked before any model loads (ValueError naming the fix)."""
    if not 0 <= cfg.drop < 1:
        raise ValueError(f"--drop must be in [0, 1), got {cfg.drop}")
    if not 0 < cfg.mlp_keep <= 1:
        raise ValueError(f"--mlp-keep must be in (0, 1] (1: whole MLPs), got {cfg.mlp_keep}")
    if cfg.mlp_keep < 1 and cfg.mlp_batches < 1:
        raise ValueError(f"--mlp-batches must be >= 1 to prune MLPs, got {cfg.mlp_batches}")


def emulator_model(full, layout: Layout, tokenizer, cfg: BuildConfig):
    """The data owner's model before distillation: the kept blocks cut from `full`, and (cfg.mlp_keep < 1) each kept
    middle block's MLP pruned to its most energetic neurons with the down projection refit (emulator/prune.py) on
    WikiText-2 train. Returns (model, record of the pruning or None)."""
    emu = compact_model(full, layout)
    if cfg.mlp_keep >= 1:
        return emu, None
    data = wikitext_batches(tokenizer, cfg, "train", cfg.mlp_batches)
    full_blocks, emu_blocks = family_of(full).blocks(full), family_of(emu).blocks(emu)
    grams = prune.activation_grams(full, [full_blocks[b] for b in layout.emulator], data)
    widths = {str(b): prune.prune_mlp(emu_blocks[layout.position(b)], grams[i], cfg.mlp_keep)
              for i, b in enumerate(layout.emulator)}
    return emu, {"keep": cfg.mlp_keep, "widths": widths, "data": "wikitext2 (train part)",
                 "tokens": int(sum(b.attention_mask.sum() for b in data)), "refit": "least squares",
                 "ridge": prune.RIDGE}


def gradient_alignment(full, emu, layout: Layout, tokenizer, batches: int = 2, seq: int = 64) -> dict[str, float]:
    """How well the emulator stands in for the middle where offsite tuning needs it: for each adapter block, the
    cosine between its gradient through the emulator and through the full model (LM loss on held-out WikiText-2).

    The data owner follows the first gradients; an adapter block whose gradients point elsewhere than the full
    model's learns something that will not carry over to the plug-in. The cloud measures this on public text."""
    task = T.TASKS["wikitext2"]
    pad = getattr(tokenizer, "pad_token_id", 0) or 0
    data = [b for b, _ in zip(T.batches(task, wikitext_items(tokenizer, "dev", seq), 8, pad), range(batches))]

    def grads(model, where: dict[int, int]) -> dict[int, torch.Tensor]:
        blocks = family_of(model).blocks(model)
        params = {b: list(blocks[i].parameters()) for b, i in where.items()}
        flat = [p for ps in params.values() for p in ps]
        was = [p.requires_grad for p in flat]
        for p in flat:
            p.requires_grad_(True)
        total = {b: 0.0 for b in where}
        for batch in data:
            loss, _ = T.loss_from_hidden(task, hidden(model, batch), batch, model.get_output_embeddings())
            g = iter(torch.autograd.grad(loss, flat))
            for b, ps in params.items():
                total[b] = total[b] + torch.cat([next(g).flatten() for _ in ps])
        for p, w in zip(flat, was):
            p.requires_grad_(w)
        return total

    ref = grads(full, {b: b for b in layout.adapter})
    got = grads(emu, {b: layout.position(b) for b in layout.adapter})
    return {str(b): round(torch.nn.functional.cosine_similarity(ref[b], got[b], dim=0).item(), 4)
            for b in layout.adapter}


def measure_quality(full, emu, layout: Layout, tokenizer, cfg: BuildConfig) -> dict:
    """The manifest's `quality` record (emulator/quality.py): zero-shot gap, perplexity ratio, distillation error."""
    batches = dev_batches(tokenizer, cfg)
    error = held_out_error(MiddlePair(full, emu, layout), batches)
    return quality.measure(full, emu, tokenizer, batches, error, cfg.quality_task or None, cfg.quality_examples)


def build(cfg: BuildConfig, out_dir: str | Path, *, loaded=None) -> dict:
    """Make the bundle folder `out_dir` (weights, tokenizer, manifest). Returns the manifest."""
    from safetensors.torch import save_file
    check_config(cfg)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose a new folder for the bundle")
    loaded = loaded or load_model(cfg.model)
    full, tok = loaded.model, loaded.tokenizer
    layout = make_layout(len(family_of(full).blocks(full)), cfg.bottom, cfg.top, cfg.drop)
    tok_ = tok or T.tiny_tokenizer()
    emu, pruning = emulator_model(full, layout, tok_, cfg)
    record, alignment = None, {}
    if cfg.alignment_batches and cfg.distill_steps > 0:
        alignment["before_distillation"] = gradient_alignment(full, emu, layout, tok_, cfg.alignment_batches)
    if cfg.distill_steps > 0:
        record = distill(full, emu, layout, tok_, cfg)
    if cfg.alignment_batches:
        alignment["bundle"] = gradient_alignment(full, emu, layout, tok_, cfg.alignment_batches)
    quality = measure_quality(full, emu, layout, tok_, cfg)
    # The emulator's (possibly distilled) blocks replace the originals; the adapter blocks are the full model's.
    to_full = dict(enumerate(layout.kept))
    state = {renumber(k, to_full): v.detach().to(DTYPES[cfg.dtype]).contiguous()
             for k, v in emu.state_dict().items() if not (k == "lm_head.weight" and emu.config.tie_word_embeddings)}
    assert set(state) == set(full_state_for(full, layout)), "bundle tensors must be exactly the kept ones"
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    if tok is not None:
        tok.save_pretrained(str(out / "tokenizer"))
    config = full.config.to_dict()
    config.pop("quantization_config", None)
    manifest = {"format": BUNDLE_FORMAT, "family": full.config.model_type,
                "source": {"model": cfg.model, "fingerprint": fingerprint(full)},
                "config": config, "layout": layout.to_json(), "drop_ratio": round(layout.drop_ratio, 4),
                "requested_drop": cfg.drop, "mlp_pruning": pruning, "distillation": record,
                "gradient_alignment": alignment, "quality": quality,
                "dtype": cfg.dtype,
                "parameters": {"bundle": sum(t.numel() for t in state.values()),
                               "full": sum(p.numel() for p in full.parameters())}}
    return write_manifest(out, manifest)
