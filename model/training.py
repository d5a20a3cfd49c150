"""The one training core: `fit` runs AdamW steps over a batch stream, `evaluate` scores a model on a task.

Every trainer in Tandem drives these two: the edge's split/DLoRA trainer (the model's forward goes through the
cloud, with retries inside the cloud link), the offsite tuner (through the emulator), the emulator's distillation
(a regression loss, not a task loss) and the local PEFT yardstick in tests/reference/. What differs between them is
only how a batch becomes a loss (`loss_of`) or a hidden state (`hidden_of`); the loop, the progress bar, the
checkpoint and the step records are here once.

    result = fit(loss_of, params, endless_batches(...), FitOptions(steps=100, lr=1e-3), checkpoint=Checkpoint(dir))
    scores = evaluate(hidden_of, head, task, items, pad_id, label_ids)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

import tasks as T


@dataclass
class FitOptions:
    steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end, when a Checkpoint is given)
    progress: str | None = None  # progress-bar label; None: no bar
    progress_row: int = 0  # terminal row of the bar (several trainers in one terminal)
    postfix: Callable[[dict], dict] | None = None  # more figures for the bar, from a step's record


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # wall time of each step (forward, backward, update)
    records: list[dict] = field(default_factory=list)  # what `after_step` returned for each step, if anything
    start: int = 0  # first step run here (> 0 after a resume)


class Checkpoint:
    """`state.pt` in a folder: the trainable weights, the optimizer, the step and the step records.

    Written to a temporary file, fsynced, then renamed, so a crash leaves the previous checkpoint whole; read back
    with `weights_only=True`, so a crafted file cannot run code (records must be plain numbers, strings and lists)."""

    def __init__(self, folder: str | Path, name: str = "checkpoint.pt"):
        self.path = Path(folder) / name

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, step: int, weights: dict, opt: torch.optim.Optimizer, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save({"weights": weights, "opt": opt.state_dict(), "step": step, "records": records}, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)

    def load(self) -> dict:
        return torch.load(self.path, weights_only=True)


def endless_batches(task: T.Task, items: list[dict], batch_size: int, pad_id: int, seed: int) -> Iterator[T.Batch]:
    """Shuffled batches, epoch after epoch, each epoch with its own seed (every trainer's order)."""
    if not items:
        raise ValueError("no training examples: the training file is empty")
    epoch = 0
    while True:
        yield from T.batches(task, items, batch_size, pad_id, seed=seed + epoch, drop_last=len(items) >= batch_size)
        epoch += 1


def fit(loss_of: Callable[[object], torch.Tensor], params: list[torch.nn.Parameter], batches: Iterable,
        opts: FitOptions, *, state: Callable[[], dict] | None = None, load_state: Callable[[dict], None] | None = None,
        checkpoint: Checkpoint | None = None, before_step: Callable[[int], None] | None = None,
        after_step: Callable[[int, float, float], dict | None] | None = None,
        result: FitResult | None = None) -> FitResult:
    """AdamW on `params` for `opts.steps` steps, one batch each: loss_of(batch).backward(), then the update.

    `state()` / `load_state(d)` give and take the trainable weights for the checkpoint; with a `checkpoint` that
    exists, training resumes from it at the same batch. `before_step(step)` runs before each step (Kill & Revive),
    `after_step(step, loss, seconds)` after it, and may return a record kept in the result and the checkpoint.
    A `result` given is filled as training goes (the hooks can read the losses so far, resumed ones included)."""
    from tqdm import tqdm
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    result = FitResult() if result is None else result
    if checkpoint is not None and checkpoint.exists():
        saved = checkpoint.load()
        if load_state is not None:
            load_state(saved["weights"])
        opt.load_state_dict(saved["opt"])
        result.start, result.records = saved["step"], list(saved["records"])
        result.losses = [r["loss"] for r in result.records if "loss" in r]
    batches = iter(batches)
    for _ in range(result.start):  # resume at the same batch
        next(batches)
    bar = tqdm(total=opts.steps, initial=result.start, desc=opts.progress, disable=opts.progress is None,
               position=opts.progress_row, dynamic_ncols=True)
    for step in range(result.start, opts.steps):
        if before_step is not None:
            before_step(step)
        batch = next(batches)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_of(batch)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        result.losses.append(loss.item())
        result.seconds.append(dt)
        rec = after_step(step, result.losses[-1], dt) if after_step is not None else None
        if rec is not None:
            result.records.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}", **(opts.postfix(rec) if opts.postfix and rec else {}))
        if checkpoint is not None and opts.checkpoint_every and (step + 1) % opts.checkpoint_every == 0:
            checkpoint.save(step + 1, state() if state else {}, opt, result.records)
    bar.close()
    if checkpoint is not None:
        checkpoint.save(opts.steps, state() if state else {}, opt, result.records)
    return result


@torch.no_grad()
def evaluate(hidden_of: Callable[[T.Batch], torch.Tensor], head, task: T.Task, items: list[dict], pad_id: int,
             label_ids: list[int] | None = None, batch_size: int = 32, progress: str | None = None,
             progress_row: int = 0) -> dict:
    """Classification: accuracy of the argmax over the label words' logits. LM: perplexity of the targets.

    Batches are sorted by length (less padding; padding changes no result)."""
    from tqdm import tqdm
    if not items:
        raise ValueError("no evaluation examples: the dev file is empty")
    correct = n = ntok = 0
    nll = 0.0
    items = sorted(items, key=lambda it: len(it["ids"]))
    total = -(-len(items) // batch_size)
    for batch in tqdm(T.batches(task, items, batch_size, pad_id), total=total, desc=progress,
                      disable=progress is None, position=progress_row, leave=False, dynamic_ncols=True):
        loss, logits = T.loss_from_hidden(task, hidden_of(batch), batch, head)
        if task.kind == "lm":
            nll += loss.item() * batch.target.numel()
            ntok += batch.target.numel()
        else:
            correct += (logits[:, label_ids].argmax(-1) == batch.label).sum().item()
            n += len(batch)
    if task.kind == "lm":
        return {"perplexity": float(torch.exp(torch.tensor(nll / ntok))), "tokens": ntok}
    return {"accuracy": correct / n, "examples": n}
