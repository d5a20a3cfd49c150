"""What the data owner tunes on: the emulator's quality, measured by the cloud on public data and recorded in the
bundle's manifest (`quality`), so the owner sees how far the emulator is from the model it stands in for.

    zero_shot           accuracy of the full model and of the emulator (adapter blocks + emulator, untuned) on the
                        first `quality_examples` dev examples of a public task (`quality_task`), and the gap
    language_model      next-token loss of both on held-out WikiText-2 windows, and the emulator's perplexity
                        divided by the full model's
    distillation_error  the emulator's held-out error against the full middle (`MiddlePair.loss` on WikiText-2
                        dev), after distillation, or as cut when it was not distilled
"""
from __future__ import annotations

import math

import torch

import tasks as T
from emulator.tune import accuracy, hidden


@torch.no_grad()
def lm_loss(model, batches: list[T.Batch]) -> float:
    """Mean next-token cross-entropy of `model` over `batches` of a language-modelling task."""
    task = T.TASKS["wikitext2"]
    head = model.get_output_embeddings()
    model.eval()
    losses = [T.loss_from_hidden(task, hidden(model, b), b, head)[0].item() for b in batches]
    return sum(losses) / max(1, len(losses))


def zero_shot(full, emu, tokenizer, task: str, examples: int) -> dict:
    """Untuned accuracy of the full model and of the emulator on the task's first `examples` dev examples."""
    spec = T.TASKS[task]
    dev = T.encode(spec, T.load_split(task, "dev")[:examples], tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    acc = [accuracy(m, spec, dev, pad, T.label_token_ids(spec, tokenizer)) for m in (full, emu)]
    return {"task": task, "examples": len(dev), "full": acc[0], "emulator": acc[1], "gap": acc[0] - acc[1]}


def language_model(full, emu, batches: list[T.Batch]) -> dict:
    """Held-out next-token loss of both models; the emulator's perplexity as a multiple of the full model's."""
    f, e = lm_loss(full, batches), lm_loss(emu, batches)
    return {"data": "wikitext2 (dev part)", "batches": len(batches), "full_loss": f, "emulator_loss": e,
            "perplexity_ratio": math.exp(e - f)}


def measure(full, emu, tokenizer, lm_batches: list[T.Batch], distillation_error: float, task: str | None,
            examples: int) -> dict:
    """The manifest's `quality` record (see the module's docstring)."""
    out = {"language_model": language_model(full, emu, lm_batches), "distillation_error": distillation_error}
    if task and examples > 0:
        out["zero_shot"] = zero_shot(full, emu, tokenizer, task, examples)
    return out
