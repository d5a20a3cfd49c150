"""Tokenizing examples, batching them, and the task losses. Everything here runs on the data owner's side."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from tasks.builtin import Task

log = logging.getLogger("tandem.data")


@dataclass
class Batch:
    """What the edge feeds its model. Never sent to the cloud."""
    input_ids: torch.Tensor  # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long
    answer_pos: torch.Tensor | None = None  # [B] classify: position whose next-token logits answer
    target: torch.Tensor | None = None  # [B] classify: answer token id; lm: [B, T] next-token ids, -100 = ignore
    label: torch.Tensor | None = None  # [B] classify: class index

    def to(self, device) -> "Batch":
        return Batch(*(None if v is None else v.to(device) for v in
                       (self.input_ids, self.attention_mask, self.answer_pos, self.target, self.label)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def label_token_ids(task: Task, tokenizer) -> list[int]:
    return [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in task.label_words]


def encode(task: Task, examples: list, tokenizer, pad_id: int | None = None, source: str | None = None) -> list[dict]:
    """Tokenize once. Classification: one item per example; LM: fixed windows of max_len+1 tokens.

    A prompt longer than `task.max_len` tokens loses its start (the end, with the question and the answer position,
    stays): said once per call, with the count, as a warning on the `tandem.data` logger (`source` names the data)."""
    if task.kind == "lm":
        ids = tokenizer("\n".join(examples), add_special_tokens=False)["input_ids"]
        n = task.max_len + 1
        return [{"ids": ids[i:i + n]} for i in range(0, len(ids) - n + 1, n)]
    label_ids = label_token_ids(task, tokenizer)
    out, cut = [], 0
    for ex in examples:
        ids = tokenizer(task.prompt(ex), add_special_tokens=False)["input_ids"]
        if len(ids) > task.max_len:
            cut += 1
            ids = ids[-task.max_len:]
        out.append({"ids": ids, "label": ex["label"], "target": label_ids[ex["label"]]})
    if cut:
        log.warning("%s: %d of %d examples are longer than %d tokens (the task's max_len); their start is cut, the "
                    "end of the prompt and the answer position are kept", source or task.name, cut, len(examples),
                    task.max_len)
    return out


def collate(task: Task, items: list[dict], pad_id: int) -> Batch:
    if task.kind == "lm":
        x = torch.tensor([it["ids"][:-1] for it in items])
        y = torch.tensor([it["ids"][1:] for it in items])
        return Batch(x, torch.ones_like(x), target=y)
    T = max(len(it["ids"]) for it in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, :len(it["ids"])] = torch.tensor(it["ids"])
        mask[i, :len(it["ids"])] = 1
    return Batch(ids, mask, answer_pos=mask.sum(1) - 1, target=torch.tensor([it["target"] for it in items]),
                 label=torch.tensor([it["label"] for it in items]))


def batches(task: Task, items: list[dict], batch_size: int, pad_id: int, seed: int | None = None, drop_last=False):
    """Yield batches in order (seed=None) or shuffled with `seed`, one pass."""
    order = list(range(len(items)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        yield collate(task, [items[j] for j in chunk], pad_id)


def loss_from_hidden(task: Task, hidden: torch.Tensor, batch: Batch, lm_head) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and the logits it used. Classify: only the answer positions go through the LM head."""
    if task.kind == "lm":
        logits = lm_head(hidden)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.target.flatten(),
                                                 ignore_index=-100)
        return loss, logits
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    logits = lm_head(hidden[rows, batch.answer_pos])
    return torch.nn.functional.cross_entropy(logits.float(), batch.target), logits


def tiny_tokenizer():
    """A character-level stand-in tokenizer for unit tests on tiny random models (ids < 320)."""
    class CharTok:
        pad_token_id = 0
        eos_token_id = 2
        stand_in = True  # tasks.check_tokens: the built-in label words all start with " " here

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + (ord(c) % 300) for c in text]}
    return CharTok()
