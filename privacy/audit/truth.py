"""What the edge knew, to score the attacks on a capture: a training run's batches, matched to the exchanges.

A run folder (`tandem edge train --out-dir DIR`) holds the run's settings (config.json) and its final adapter. From
the settings the auditor rebuilds the batches the edge sent, in order: the training batches (the trainer's seeded
order, model/training.endless_batches) and the dev batches of each evaluation (sorted by length, as
model/training.evaluate batches them). Each exchange of the capture is matched to the next batch of its kind
(training or forward-only) whose attention mask equals the one it carried, or to the previous one again (a replayed
step); an exchange that matches neither stays unmatched and is not scored.

The private positions of a matched row are the tokens of the example's own text, the template around it being
public (inversion.make_probe; a prompt cut to the task's max_len keeps those of its last tokens); where the
tokenizer cannot give offsets (the tests' stand-in), the row's every real position counts instead, and
`private_known` says so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import tasks as T
from edge.config import EdgeConfig
from edge.flags import build, flags_of
from model.training import endless_batches
from privacy.audit.capture import Exchange
from privacy.audit.inversion import make_probe
from privacy.defences.template import public_positions, template_ids
from protocol.tensors import decode


def run_config(run_dir: str | Path) -> EdgeConfig:
    """The EdgeConfig a run folder's config.json records (FileNotFoundError / ValueError in one line)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no run: no config.json (from `tandem edge train --out-dir`)")
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    values = {}
    for fl in flags_of(EdgeConfig):
        node = saved
        for name in fl.path:
            node = node.get(name, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            values[fl.dest] = tuple(node) if isinstance(node, list) else node
    return build(EdgeConfig, values)


@dataclass
class Truth:
    batches: dict[int, T.Batch] = field(default_factory=dict)  # exchange index -> the batch it carried
    private: dict[int, torch.Tensor] = field(default_factory=dict)  # exchange index -> [B, T] bool
    private_known: bool = True  # False: some rows count every real position
    unmatched: int = 0


class _Cursor:
    """The batches one kind of exchange carried, in order; `take(mask)` matches the next one or the last again, by
    the mask the edge sent with it (`sent_mask(batch)`: the batch's own, or --noise-template-only's)."""

    def __init__(self, make, sent_mask=lambda batch: batch.attention_mask.bool()):
        self.make, self.it, self.next, self.last = make, make(), None, None
        self.sent_mask = sent_mask

    def _peek(self):
        if self.next is None:
            self.next = next(self.it, None)
            if self.next is None:  # the dev set again: the evaluation after training
                self.it = self.make()
                self.next = next(self.it, None)
        return self.next

    def take(self, mask: torch.Tensor) -> T.Batch | None:
        nxt = self._peek()
        if nxt is not None and torch.equal(self.sent_mask(nxt), mask):
            self.last, self.next = nxt, None
            return nxt
        if self.last is not None and torch.equal(self.sent_mask(self.last), mask):
            return self.last
        return None


def _examples(cfg: EdgeConfig, task: T.Task, split: str) -> list:
    """The examples the run read, as edge/data.load_items slices them (a shard of train, the first dev ones)."""
    d = cfg.data
    path, flag = (d.train_file, "--train-file") if split == "train" else (d.dev_file, "--dev-file")
    examples = T.load_split(task, split, path, flag)
    return examples[d.shard::d.num_shards] if split == "train" else examples[:cfg.eval.examples]


def _private(task: T.Task, tokenizer, batch: T.Batch, text_of: dict) -> tuple[torch.Tensor, bool]:
    """[B, T] bool: the positions of each row's own text (every real one where that cannot be told)."""
    real = batch.attention_mask.bool()
    if task.kind == "lm":
        return real, True  # running text: all of it is the data owner's
    out, known = real.clone(), True
    for i, row in enumerate(batch.input_ids):
        n = int(real[i].sum())
        try:
            probe = make_probe(task.template, [text_of[tuple(row[:n].tolist())]], tokenizer)
        except (KeyError, TypeError):  # a tokenizer without offsets
            known = False
            continue
        whole = int(probe.attention_mask[0].sum())  # a cut prompt (tasks.encode) kept its last n tokens
        if whole < n or not torch.equal(probe.input_ids[0, whole - n:whole], row[:n]):
            known = False
            continue
        out[i, :n] = probe.private[0, whole - n:whole]
    return out, known


class RunData:
    """A run's examples encoded once, for matching any number of sessions (`match`)."""

    def __init__(self, cfg: EdgeConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.task = T.resolve_task(cfg.data.task, cfg.data.task_file)
        self.pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        splits = {s: _examples(cfg, self.task, s) for s in ("train", "dev")}
        self.items = {s: T.encode(self.task, ex, tokenizer) for s, ex in splits.items()}
        self.text_of = {tuple(it["ids"]): ex for s in splits for it, ex in zip(self.items[s], splits[s])}
        # --noise-template-only: the template's prefix and suffix ids, to rebuild the masks the edge sent
        self.template = template_ids(self.task.template, tokenizer) if cfg.noise.template_only else None

    def sent_mask(self, batch: T.Batch) -> torch.Tensor:
        """The attention mask the edge sent with `batch` (--noise-template-only masks the text's positions out)."""
        real = batch.attention_mask.bool()
        if self.template is None:
            return real
        return real & public_positions(batch.input_ids, batch.attention_mask, *self.template)

    def cursors(self) -> dict[bool, _Cursor]:
        o, e = self.cfg.optim, self.cfg.eval
        dev = sorted(self.items["dev"], key=lambda it: len(it["ids"]))
        return {True: _Cursor(lambda: endless_batches(self.task, self.items["train"], o.batch_size, self.pad, o.seed),
                              self.sent_mask),
                False: _Cursor(lambda: iter(T.batches(self.task, dev, e.batch_size, self.pad)), self.sent_mask)}

    def match(self, exchanges: list[Exchange]) -> Truth:
        """The batch each exchange of one session carried and its private positions, by index into `exchanges`
        (module docstring)."""
        cursors, truth = self.cursors(), Truth()
        for i, ex in enumerate(exchanges):
            batch = cursors[ex.train].take(decode(ex.begin.attention_mask, out_dtype=torch.bool))
            if batch is None:
                truth.unmatched += 1
                continue
            truth.batches[i] = batch
            truth.private[i], known = _private(self.task, self.tokenizer, batch, self.text_of)
            truth.private_known &= known
        return truth


def match_run(exchanges: list[Exchange], cfg: EdgeConfig, tokenizer) -> Truth:
    """`RunData(cfg, tokenizer).match(exchanges)`."""
    return RunData(cfg, tokenizer).match(exchanges)


def run_lora(run_dir: str | Path, cfg: EdgeConfig, model):
    """(the run's LoRA set holding its adapter/, that is its weights after the last update; the cloud blocks), or
    (None, []) for a split run (no LoRA on cloud blocks)."""
    from edge.runs import load_adapter
    from model.tuners.lora import LoRAConfig, LoRASet
    from model.segments import cut_of
    if cfg.lora.cloud == "none":
        return None, []
    cut = cut_of(model, cfg.k, cfg.m)
    lo = cfg.lora
    lora = LoRASet(model, LoRAConfig(lo.r, lo.alpha, lo.dropout, tuple(lo.targets),
                                     sorted([*cut.bottom, *cut.top, *cut.cloud])))
    load_adapter(lora, Path(run_dir) / "adapter")
    return lora, list(cut.cloud)


def final_deltas(run_dir: str | Path, cfg: EdgeConfig, model) -> dict:
    """ΔW of every cloud block's LoRA in the run's adapter, keyed as privacy/audit/adapter.py keys them."""
    from model.sites import site_groups
    from privacy.audit.adapter import true_deltas
    lora, blocks = run_lora(run_dir, cfg, model)
    return {} if lora is None else true_deltas(lora, site_groups(lora.family.name, lora.cfg.targets), blocks)


def final_weights(run_dir: str | Path, cfg: EdgeConfig, model) -> dict:
    """(block, target) -> (A, B) of every cloud block's LoRA in the run's adapter (what the carried mode sends)."""
    from privacy.audit.adapter import true_weights
    lora, blocks = run_lora(run_dir, cfg, model)
    return {} if lora is None else true_weights(lora, lora.cfg.targets, blocks)


__all__ = ["RunData", "Truth", "final_deltas", "final_weights", "match_run", "run_config", "run_lora"]
