"""Tasks: the public data sets, their prompts, and batching. Everything here runs on the data owner's side.

Classification tasks are instruction-style: the prompt ends where the answer starts, the label word's first token is
the answer token, the loss is cross-entropy of the next-token logits at the last prompt position, and accuracy
compares the logits of the label words only. WikiText-2 is plain language modelling (perplexity).

Data comes from `../shared/data` (or $TANDEM_DATA), or from any user file in the same shape: TSV/CSV with a
`sentence`/`text` column and a `label` column, or JSONL with the same keys (MRPC: `sentence1`, `sentence2`).
"""
from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch


def data_root() -> Path:
    if os.environ.get("TANDEM_DATA"):
        return Path(os.environ["TANDEM_DATA"])
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        for up in (base, *base.parents):
            cand = up / "shared" / "data"
            if (cand / "sst2").is_dir():
                return cand
    raise FileNotFoundError("no data folder found: set TANDEM_DATA to the folder holding sst2/, mrpc/, agnews/, "
                            "wikitext2/ (the project's ../shared/data)")


@dataclass
class Task:
    name: str
    kind: str  # "classify" or "lm"
    template: str = ""  # prompt with {fields}
    label_words: list[str] = field(default_factory=list)  # index = class id
    max_len: int = 128

    def prompt(self, ex: dict) -> str:
        return self.template.format(**ex)


TASKS = {
    "sst2": Task("sst2", "classify", "Review: {sentence}\nIs the sentiment of this review positive or negative?\n"
                 "Answer:", [" negative", " positive"], max_len=96),
    "mrpc": Task("mrpc", "classify", "Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"
                 "Do these two sentences mean the same thing, yes or no?\nAnswer:", [" no", " yes"], max_len=160),
    "agnews": Task("agnews", "classify", "News: {text}\nIs this news about world, sports, business or science?\n"
                   "Answer:", [" world", " sports", " business", " science"], max_len=128),
    "wikitext2": Task("wikitext2", "lm", max_len=128),
}
AGNEWS_LABELS = {"World": 0, "Sports": 1, "Business": 2, "Sci/Tech": 3}


def _read_table(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    delim = "," if path.suffix == ".csv" else "\t"
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f, delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL))


def _normalize(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        ex = {k: (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k is not None}
        if "text" in ex and "sentence" not in ex:
            ex["sentence"] = ex["text"]
        if "sentence" in ex and "text" not in ex:
            ex["text"] = ex["sentence"]
        ex["label"] = int(ex["label"])
        out.append(ex)
    return out


def _split(rows: list, dev_size: int, seed: int = 1234) -> tuple[list, list]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[dev_size:], rows[:dev_size]


def load_split(task: str, split: str, path: str | Path | None = None) -> list:
    """Examples of `task` ("train" or "dev"). With `path`, read that user file instead (all of it)."""
    t = TASKS[task]
    if path is not None:
        path = Path(path)
        if t.kind == "lm":
            return [path.read_text(encoding="utf-8")]
        return _normalize(_read_table(path))
    root = data_root()
    if task == "sst2":
        return _normalize(_read_table(root / "sst2" / f"{split}.tsv"))
    if task == "mrpc":  # only the train split ships: hold out 800 pairs as dev
        rows = [{"sentence1": r["#1 String"], "sentence2": r["#2 String"], "label": r["Quality"]}
                for r in _read_table(root / "mrpc" / "msr_paraphrase_train.txt")]
        train, dev = _split(_normalize(rows), 800)
        return train if split == "train" else dev
    if task == "agnews":  # only the dev split ships: hold out 2000 as our dev
        with open(root / "agnews" / "dev.tsv", encoding="utf-8", newline="") as f:
            rows = [{"text": r[0], "label": AGNEWS_LABELS[r[1]]} for r in csv.reader(f, delimiter="\t",
                                                                                   quoting=csv.QUOTE_NONE) if len(r) == 2]
        train, dev = _split(_normalize(rows), 2000)
        return train if split == "train" else dev
    if task == "wikitext2":  # one validation file ships: first 90 % of lines train, the rest dev
        lines = (root / "wikitext2" / "valid.txt").read_text(encoding="utf-8").splitlines()
        cut = int(len(lines) * 0.9)
        return ["\n".join(lines[:cut]) if split == "train" else "\n".join(lines[cut:])]
    raise KeyError(task)


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


def encode(task: Task, examples: list, tokenizer, pad_id: int | None = None) -> list[dict]:
    """Tokenize once. Classification: one item per example; LM: fixed windows of max_len+1 tokens."""
    if task.kind == "lm":
        ids = tokenizer("\n".join(examples), add_special_tokens=False)["input_ids"]
        n = task.max_len + 1
        return [{"ids": ids[i:i + n]} for i in range(0, len(ids) - n + 1, n)]
    label_ids = label_token_ids(task, tokenizer)
    out = []
    for ex in examples:
        ids = tokenizer(task.prompt(ex), add_special_tokens=False)["input_ids"][-task.max_len:]
        out.append({"ids": ids, "label": ex["label"], "target": label_ids[ex["label"]]})
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

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + (ord(c) % 300) for c in text]}
    return CharTok()
