"""The adaptive attacker's own edge: a shadow run of the victim's recipe on public data.

A learned defence (--noise-nopeek, or any recipe that trains the edge's k blocks) changes what the edge sends through
the edge's private weights, which the cloud never sees. The attacker who knows the recipe runs it itself: `tandem
edge train` with the victim's every flag (cut, method, defence and its settings, steps, batch, learning rate) but
its seed, on public data of the same kind (here the task's training examples that the victim's run never drew,
`write_public_file`), through a cloud of its own. That run's final adapter is the attacker's stand-in for the
victim's; `Shadow.states` runs its k blocks, and the learned inverter (privacy/audit/learned.py) trains on the
states it sends for the shadow's public examples instead of the base weights' states of WikiText-2. The attacker
never sees the victim's data or weights: the shadow shares the victim's recipe, not its adapter.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

import tasks as T
from edge.config import EdgeConfig
from edge.methods import trained_blocks, tuner_set
from edge.runs import load_adapter
from model.segments import cut_of
from model.training import endless_batches
from privacy.audit import inversion as A
from privacy.audit.truth import RunData, run_config

# the flags a shadow run must share with the victim's to stand for it: everything but the data, the seed (the
# attacker does not draw the victim's random start), the run's name and folder
RECIPE = ("k", "m", "peft", "lora", "noise", "optim", "dtype")
NOT_RECIPE = ("optim.seed",)


def recipe_differences(victim: EdgeConfig, shadow: EdgeConfig) -> list[str]:
    """The recipe's settings in which the shadow run differs from the victim's, as `name: victim's vs shadow's`."""
    def flat(cfg):
        out = {}
        for name in RECIPE:
            value = getattr(cfg, name)
            items = vars(value).items() if hasattr(value, "__dataclass_fields__") else [("", value)]
            out.update({f"{name}.{k}" if k else name: v for k, v in items})
        return out
    a, b = flat(victim), flat(shadow)
    return [f"{key}: {a[key]} vs {b[key]}" for key in a if a[key] != b[key] and key not in NOT_RECIPE]


def drawn_examples(cfg: EdgeConfig, tokenizer) -> list[dict]:
    """The training examples a run drew in its --steps x --grad-accum-steps batches, in order (repeats kept)."""
    data, o = RunData(cfg, tokenizer), cfg.optim
    order = endless_batches(data.task, data.items["train"], o.batch_size, data.pad, o.seed)  # the trainer's order
    out = []
    for _ in range(o.steps * o.grad_accum_steps):
        batch = next(order)
        out += [data.text_of[tuple(row[:n].tolist())] for row, n in zip(batch.input_ids, batch.attention_mask.sum(1))]
    return out


def write_public_file(victim: EdgeConfig, tokenizer, path: str | Path) -> int:
    """Write the task's training examples that the victim's run never drew to `path` (JSONL, one example per line,
    0600): the shadow run's --train-file. Returns how many."""
    task = T.resolve_task(victim.data.task, victim.data.task_file)
    if task.kind != "classify":
        raise ValueError(f"a shadow's public file takes a classification task; {task.name} is {task.kind}")
    # by the prompt the victim sent, not the example it maps back to: a sentence drawn under one label is left out
    # under every label
    seen = {tuple(it["ids"]) for it in T.encode(task, drawn_examples(victim, tokenizer), tokenizer)}
    examples = T.load_split(task, "train", victim.data.train_file, "--train-file")
    rows = [ex for ex, it in zip(examples, T.encode(task, examples, tokenizer)) if tuple(it["ids"]) not in seen]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(ex) + "\n" for ex in rows))
    path.chmod(0o600)
    return len(rows)


class Shadow:
    """A shadow run's adapter on the attacker's copy of the base weights, and the public examples it trained on."""

    def __init__(self, run_dir: str | Path, model, tokenizer, victim: EdgeConfig | None = None):
        self.cfg = cfg = run_config(run_dir)
        if victim is not None and (diff := recipe_differences(victim, cfg)):
            raise ValueError(f"the shadow run {run_dir} does not share the victim's recipe ({'; '.join(diff)}): "
                             "rerun it with the victim's flags")
        local, remote = trained_blocks(cfg, cut_of(model, cfg.k, cfg.m))
        self.tuner = tuner_set(model, cfg, sorted(local + remote), tokenizer)  # as the run saved it
        if not hasattr(self.tuner, "attach"):
            raise ValueError(f"a shadow of --peft {cfg.peft.method} is not supported: its weights do not hook onto "
                             "blocks (lora, ia3 and adapter do)")
        load_adapter(self.tuner, Path(run_dir) / "adapter")
        self.model, self.k = model, cfg.k
        self.task = T.resolve_task(cfg.data.task, cfg.data.task_file)
        self.pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        examples = T.load_split(self.task, "train", cfg.data.train_file, "--train-file")
        self.items = T.encode(self.task, examples[cfg.data.shard::cfg.data.num_shards], tokenizer)

    @contextmanager
    def _attached(self):
        handles = self.tuner.attach(self.model, list(range(self.k)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the shadow edge sends for these ids, before any noise: the hidden state after its k blocks."""
        with self._attached():
            return A.hidden_after(self.model, input_ids, attention_mask, [self.k])[self.k]

    def batches(self, batch_size: int, count: int, seed: int):
        """`count` padded batches of the shadow's public examples (epochs reshuffled), as (input_ids, mask)."""
        it = endless_batches(self.task, self.items, batch_size, self.pad, seed)
        for _ in range(count):
            b = next(it)
            yield b.input_ids, b.attention_mask


__all__ = ["RECIPE", "Shadow", "drawn_examples", "recipe_differences", "write_public_file"]
