"""The yardstick: ordinary local LoRA training of the whole model with Hugging Face PEFT.

Split and DLoRA training must reproduce these losses step for step (tests) and are timed against them (bench).
"""
from __future__ import annotations

import time

import peft
import torch

import tasks as T
from model.lora import LoRASet


def peft_model(model, lora: LoRASet):
    """Wrap `model` with PEFT LoRA at the same sites as `lora`, and copy `lora`'s initial weights in."""
    pm = peft.get_peft_model(model, lora.peft_config())
    peft.set_peft_model_state_dict(pm, lora.peft_state_dict())
    return pm


def hidden(pm, batch: T.Batch) -> torch.Tensor:
    backbone = pm.base_model.model.base_model  # LlamaModel, GPT2Model ...: the decoder without its LM head
    return backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state


def train_steps(pm, task: T.Task, batches, lr: float) -> tuple[list[float], list[float]]:
    """Train on each batch once with AdamW; returns (losses, step seconds)."""
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    head = pm.base_model.model.get_output_embeddings()
    losses, times = [], []
    pm.train()
    for batch in batches:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = T.loss_from_hidden(task, hidden(pm, batch), batch, head)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, times


@torch.no_grad()
def evaluate(pm, task: T.Task, items, pad_id: int, label_ids, batch_size: int = 32) -> float:
    pm.eval()
    head = pm.base_model.model.get_output_embeddings()
    correct = n = 0
    for batch in T.batches(task, items, batch_size, pad_id):
        _, logits = T.loss_from_hidden(task, hidden(pm, batch), batch, head)
        correct += (logits[:, label_ids].argmax(-1) == batch.label).sum().item()
        n += len(batch)
    return correct / n
