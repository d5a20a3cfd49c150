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
    warmup_steps: int = 0  # steps whose learning rate rises linearly from 0 towards `lr` (0: none)
    schedule: str = "constant"  # after the warmup: "constant", or "linear" / "cosine" decay to 0 at `steps`
    max_grad_norm: float | None = None  # clip the gradients' total L2 norm to this before each update (None: no)
    grad_accum_steps: int = 1  # batches per step: each backpropagates its loss / n, then one update

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.warmup_steps < 0 or self.grad_accum_steps < 1:
            raise ValueError("need warmup_steps >= 0 and grad_accum_steps >= 1")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError("max_grad_norm must be > 0 (or None: no clipping)")


SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning rate of step i as a fraction of the peak: Hugging Face's schedules (get_scheduler), so a
    warmup starts at 0 and linear/cosine reach 0 at `total`."""
    import math

    def factor(i: int) -> float:
        if i < warmup:
            return i / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (i - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return factor


def lr_scheduler(opt: torch.optim.Optimizer, opts: FitOptions, start: int = 0):
    """A LambdaLR for `opts`' schedule, positioned at step `start` (a resume), or None when the rate is constant."""
    if opts.schedule == "constant" and opts.warmup_steps == 0:
        return None
    for group in opt.param_groups:
        group["initial_lr"] = opts.lr  # the peak, also after a resume (the checkpoint holds the last rate used)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(opts.schedule, opts.warmup_steps, opts.steps),
                                             last_epoch=start - 1)


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # wall time of each step (forward, backward, update)
    records: list[dict] = field(default_factory=list)  # what `after_step` returned for each step, if anything
    start: int = 0  # first step run here (> 0 after a resume)
    lrs: list[float] = field(default_factory=list)  # learning rate of each step run here


class CheckpointError(ValueError):
    """A file where the checkpoint should be that is not one (the CLI prints the message, not a traceback)."""


class Checkpoint:
    """`checkpoint.pt` in a folder: the trainable weights, the optimizer, the step and the step records.

    Written atomically with mode 0600 (privacy/security/files.py: temporary file, fsync, rename, fsync of the folder),
    so a crash leaves the previous checkpoint whole; read back with `weights_only=True`, so a crafted file cannot run
    code: one that needs more than tensors, numbers, strings, lists and dicts is refused with a CheckpointError."""

    KEYS = ("weights", "opt", "step", "records")

    def __init__(self, folder: str | Path, name: str = "checkpoint.pt"):
        self.path = Path(folder) / name

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, step: int, weights: dict, opt: torch.optim.Optimizer, records: list[dict]) -> None:
        from privacy.security.files import atomic_writer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(self.path, 0o600) as f:
            torch.save({"weights": weights, "opt": opt.state_dict(), "step": step, "records": records}, f)

    def load(self) -> dict:
        import pickle
        refused = CheckpointError(f"{self.path} is not a Tandem checkpoint (refusing to unpickle it): delete it or "
                                  "choose another --out-dir")
        try:
            saved = torch.load(self.path, weights_only=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError) as e:  # a global weights_only refuses, or no pickle
            raise refused from e
        if not isinstance(saved, dict) or any(k not in saved for k in self.KEYS):
            raise refused
        return saved


def endless_batches(task: T.Task, items: list[dict], batch_size: int, pad_id: int, seed: int) -> Iterator[T.Batch]:
    """Shuffled batches, epoch after epoch, each epoch with its own seed (every trainer's order)."""
    if not items:
        raise ValueError("no training examples: the training file is empty")
    epoch = 0
    while True:
        yield from T.batches(task, items, batch_size, pad_id, seed=seed + epoch, drop_last=len(items) >= batch_size)
        epoch += 1


def _resume(saved: dict, opt: torch.optim.Optimizer, result: FitResult,
            load_state: Callable[[dict], None] | None) -> None:
    """Put a loaded checkpoint back: the weights (through `load_state`), the optimizer, the step and the records."""
    if load_state is not None:
        load_state(saved["weights"])
    opt.load_state_dict(saved["opt"])
    result.start, result.records = saved["step"], list(saved["records"])
    result.losses = [r["loss"] for r in result.records if "loss" in r]


def _update(loss_of: Callable[[object], torch.Tensor], params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
            sched, micro: list, max_grad_norm: float | None, lrs: list[float]) -> float:
    """One optimizer step over the batches `micro` (each backpropagates its loss / len(micro)), clipped to
    `max_grad_norm`; appends the rate used to `lrs` and returns the step's loss (the batches' mean)."""
    accum = len(micro)
    opt.zero_grad(set_to_none=True)
    if accum == 1:
        loss = loss_of(micro[0])
        loss.backward()
        loss_value = loss.item()
    else:
        loss_value = 0.0
        for batch in micro:
            loss = loss_of(batch)
            (loss / accum).backward()
            loss_value += loss.item() / accum
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    lrs.append(opt.param_groups[0]["lr"])
    opt.step()
    if sched is not None:
        sched.step()
    return loss_value


def _checkpoint_due(step: int, every: int) -> bool:
    """Whether a checkpoint is written after `step` (0-based) at a cadence of `every` steps (0: never mid-run)."""
    return bool(every) and (step + 1) % every == 0


def fit(loss_of: Callable[[object], torch.Tensor], params: list[torch.nn.Parameter], batches: Iterable,
        opts: FitOptions, *, state: Callable[[], dict] | None = None, load_state: Callable[[dict], None] | None = None,
        checkpoint: Checkpoint | None = None, before_step: Callable[[int], None] | None = None,
        after_step: Callable[[int, float, float], dict | None] | None = None,
        result: FitResult | None = None) -> FitResult:
    """AdamW on `params` for `opts.steps` steps, one batch each: loss_of(batch).backward(), then the update.

    With `opts.grad_accum_steps` n > 1 a step takes n batches, backpropagates each one's loss / n and updates once
    (its loss is their mean); `opts.max_grad_norm` clips the gradients before the update; `opts.warmup_steps` and
    `opts.schedule` set each step's learning rate (`lr_factor`). The defaults are plain AdamW at a constant rate.

    `state()` / `load_state(d)` give and take the trainable weights for the checkpoint; with a `checkpoint` that
    exists, training resumes from it at the same batch. `before_step(step)` runs before each step (Kill & Revive),
    `after_step(step, loss, seconds)` after it, and may return a record kept in the result and the checkpoint.
    A `result` given is filled as training goes (the hooks can read the losses so far, resumed ones included)."""
    from tqdm import tqdm
    params = list(params)
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    result = FitResult() if result is None else result
    if checkpoint is not None and checkpoint.exists():
        _resume(checkpoint.load(), opt, result, load_state)
    sched, accum = lr_scheduler(opt, opts, result.start), opts.grad_accum_steps
    batches = iter(batches)
    for _ in range(result.start * accum):  # resume at the same batch
        next(batches)
    bar = tqdm(total=opts.steps, initial=result.start, desc=opts.progress, disable=opts.progress is None,
               position=opts.progress_row, dynamic_ncols=True)
    for step in range(result.start, opts.steps):
        if before_step is not None:
            before_step(step)
        micro = [next(batches) for _ in range(accum)]
        t0 = time.perf_counter()
        loss_value = _update(loss_of, params, opt, sched, micro, opts.max_grad_norm, result.lrs)
        dt = time.perf_counter() - t0
        result.losses.append(loss_value)
        result.seconds.append(dt)
        rec = after_step(step, result.losses[-1], dt) if after_step is not None else None
        if rec is not None:
            result.records.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}", **(opts.postfix(rec) if opts.postfix and rec else {}))
        if checkpoint is not None and _checkpoint_due(step, opts.checkpoint_every):
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
