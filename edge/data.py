"""The edge's private data: checked whole before any model loads, then encoded. It never leaves the edge."""
from __future__ import annotations

import tasks as T
from edge.config import EdgeConfig


def check_data(cfg: EdgeConfig) -> T.Task:
    """Everything about the data that needs no model, checked before one loads: the task (file), the training and
    (if evaluated) dev files whole (tasks/files.py: existence, UTF-8, parsing, columns, labels, not empty), the
    shard and the dev count. Raises tasks.DataError naming file, line, field and the fix; returns the task."""
    d = cfg.data
    task = T.resolve_task(d.task, d.task_file)
    if d.num_shards < 1 or not 0 <= d.shard < d.num_shards:
        raise T.DataError(f"shard {d.shard} of {d.num_shards} does not exist", field="shard",
                          fix="give 0 <= --shard < --num-shards")
    n = T.check_split(task, "train", d.train_file, "--train-file")
    if n is not None and n <= d.shard:
        raise T.DataError(f"has {n} examples: shard {d.shard} of {d.num_shards} gets none", path=d.train_file,
                          field="shard", fix="give more examples or fewer shards")
    if cfg.eval.before or cfg.eval.after:
        if cfg.eval.examples < 1:
            raise T.DataError(f"{cfg.eval.examples} dev examples", field="eval_examples",
                              fix="evaluate one or more (--eval-examples), or pass --no-eval-before --no-eval-after")
        T.check_split(task, "dev", d.dev_file, "--dev-file")
    return task


def load_items(cfg: EdgeConfig, tokenizer, split: str) -> list[dict]:
    """The split's examples, checked (tasks.DataError) and encoded: this shard of train, the first dev ones."""
    d = cfg.data
    task = T.resolve_task(d.task, d.task_file)
    path = d.train_file if split == "train" else d.dev_file
    flag = "--train-file" if split == "train" else "--dev-file"
    items = T.encode(task, T.load_split(task, split, path, flag), tokenizer,
                     source=str(path) if path else f"{task.name} {split}")
    if not items:  # a language model's text shorter than one window
        raise T.DataError(f"has too little text: not one window of {task.max_len + 1} tokens", path=path,
                          fix="give more text")
    if split == "train":
        return items[d.shard::d.num_shards]
    return items[:cfg.eval.examples]
