"""The yardstick: ordinary local LoRA training of the whole model with Hugging Face PEFT.

Split and DLoRA training must reproduce these losses step for step (tests) and are timed against them (bench).
The loop and the scoring are the one training core's (`model.training.fit` / `evaluate`); what is PEFT's here is the
model: `peft_model` wraps the whole model, and `hidden` runs it locally.
"""
from __future__ import annotations

import peft
import torch

import tasks as T
from model.tuners.lora import LoRASet
from model.training import FitOptions, evaluate as evaluate_model, fit


def peft_model(model, lora: LoRASet):
    """Wrap `model` with PEFT LoRA at the same sites as `lora`, and copy `lora`'s initial weights in."""
    pm = peft.get_peft_model(model, lora.peft_config())
    peft.set_peft_model_state_dict(pm, lora.peft_state_dict())
    return pm


def hidden(pm, batch: T.Batch) -> torch.Tensor:
    backbone = pm.base_model.model.base_model  # LlamaModel, GPT2Model ...: the decoder without its LM head
    return backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state


def train_steps(pm, task: T.Task, batches, lr: float, hidden_of=hidden) -> tuple[list[float], list[float]]:
    """Train on each batch once with AdamW; returns (losses, step seconds). `hidden_of(pm, batch)`: the final hidden
    state (a prompt-learning PeftModel's own forward, which puts its virtual tokens or prefixes in)."""
    batches = list(batches)
    head = pm.get_base_model().get_output_embeddings()
    pm.train()
    run = fit(lambda batch: T.loss_from_hidden(task, hidden_of(pm, batch), batch, head)[0],
              [p for p in pm.parameters() if p.requires_grad], batches, FitOptions(steps=len(batches), lr=lr))
    return run.losses, run.seconds


def evaluate(pm, task: T.Task, items, pad_id: int, label_ids, batch_size: int = 32) -> float:
    """Accuracy of the argmax over the label words' logits."""
    pm.eval()
    return evaluate_model(lambda batch: hidden(pm, batch), pm.base_model.model.get_output_embeddings(), task, items,
                          pad_id, label_ids, batch_size)["accuracy"]
