"""Reading data: the shared sets and a user's TSV/CSV/JSONL (or plain text), every row checked on the way in.

A user file is read whole and checked before anything else happens: it must exist, be UTF-8, parse (one JSON object
per JSONL line; a header row naming the columns, then as many fields per row, in TSV/CSV), have every field the
task's prompt uses (`sentence` and `text` stand for each other) and a `label` that is a class number 0..n-1 or one
of the task's label names (case does not matter). Anything else is a DataError naming the file, line and field.
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
from pathlib import Path

from tasks.builtin import TASKS, Task, data_root
from tasks.errors import DataError, shown

ALIASES = {"sentence": "text", "text": "sentence"}  # a file may name its text column either way
csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))  # long examples are the encoder's business (it warns)


def file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return "jsonl" if suffix in (".jsonl", ".ndjson", ".json") else "csv" if suffix == ".csv" else "tsv"


def read_text(path, flag: str | None = None) -> str:
    """The file's text: it must exist and be UTF-8 (a BOM is dropped)."""
    p = Path(path)
    if not p.exists():
        raise DataError("no such file", path=p, fix=f"give an existing file to {flag}" if flag else "check the path")
    if p.is_dir():
        raise DataError("is a folder, not a file", path=p, fix=f"give a file to {flag}" if flag else "name a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot be read ({e.strerror})", path=p, fix="check the file's permissions") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"byte 0x{data[e.start]:02x} is not UTF-8 (Latin-1 or another encoding?)", path=p, line=line,
                        fix=f"save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {p.name} > utf8-{p.name}`") from None


def read_rows(path, flag: str | None = None, columns: list[str] | None = None
              ) -> tuple[list[str] | None, list[tuple[int, dict]]]:
    """(the header's columns, or None for JSONL; [(line number, row)]) of a TSV, CSV or JSONL file. `columns`, the
    ones the task needs, only make the fix of an empty file precise."""
    p = Path(path)
    text, fmt = read_text(p, flag), file_format(p)
    if not text.strip():
        cols = columns or ["sentence", "label"]
        raise DataError("is empty: no examples", path=p, fix="put one example per line in it" + (
            f", under a header line naming the columns ({', '.join(cols)})" if fmt != "jsonl" else
            f" as a JSON object with the keys {', '.join(cols)}"))
    if fmt == "jsonl":
        rows = []
        for i, raw in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028 and kin
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON ({e.msg}, column {e.colno})", path=p, line=i,
                                fix='write one JSON object per line, e.g. {"sentence": "...", "label": 1}') from None
            if not isinstance(obj, dict):
                raise DataError(f"is a JSON {type(obj).__name__}, not an object", path=p, line=i,
                                fix='write one JSON object per line, e.g. {"sentence": "...", "label": 1}')
            rows.append((i, obj))
        return None, rows
    sep = "," if fmt == "csv" else "\t"
    name = "comma" if fmt == "csv" else "tab"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep,
                        quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE)
    try:
        header = next(reader)
        columns = [c.strip() for c in header]
        seen = set()
        for c in columns:
            if c in seen:
                raise DataError(f"the header names column {c!r} twice", path=p, line=reader.line_num, field=c,
                                fix="give every column its own name")
            seen.add(c)
        rows = []
        for row in reader:
            if len(row) != len(columns):
                if not "".join(row).strip():  # a blank line
                    continue
                more = len(row) > len(columns)
                raise DataError(f"has {len(row)} {name}-separated fields, the header has {len(columns)}", path=p,
                                line=reader.line_num, fix=(("a value holds a tab: TSV values cannot; use CSV or "
                                                            "JSONL" if fmt == "tsv" else "quote values that hold a "
                                                            "comma") if more else "give every column a value"))
            rows.append((reader.line_num, dict(zip(columns, row))))
    except csv.Error as e:
        raise DataError(f"cannot be parsed as {fmt.upper()} ({e})", path=p, line=reader.line_num,
                        fix="check the quoting on this line") from None
    return columns, rows


def label_of(task: Task, value, *, path=None, line=None) -> int:
    """A class index from a label as a file gives it: a number 0..n-1 or a label name; anything else is an error."""
    names = task.label_names
    n = task.num_classes
    fix = f"use a class number 0..{n - 1} or a label name ({', '.join(names)})"
    where = {"path": path, "line": line, "field": "label"}
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError("no label", **where, fix=fix)
    if isinstance(value, bool):
        raise DataError(f"{value!r} is not a label of {task.name}", **where, fix=fix)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        s = value.strip()
        if re.fullmatch(r"[+-]?\d+", s):
            value = int(s)
        else:
            lookup = {w.strip().casefold(): i for i, w in enumerate(task.label_words)}
            lookup.update({nm.casefold(): i for i, nm in enumerate(names)})
            if s.casefold() in lookup:
                return lookup[s.casefold()]
            raise DataError(f"{shown(s)} is not a label of {task.name}", **where, fix=fix)
    if not isinstance(value, int):
        raise DataError(f"{shown(value)} is not a class number or a label name", **where, fix=fix)
    if not 0 <= value < n:
        raise DataError(f"label {value} is out of range: {task.name} has {n} classes, 0..{n - 1}", **where, fix=fix)
    return value


def examples_of(task: Task, columns: list[str] | None, rows: list[tuple[int, dict]], path=None) -> list[dict]:
    """Checked examples: text fields stripped (`sentence` and `text` both set), `label` a class index."""
    if not rows:
        raise DataError("has a header but no examples", path=path, fix="add one example per line under the header")
    fields = task.fields
    needed = [*fields, "label"]
    if columns is not None:
        for f in needed:
            if f not in columns and ALIASES.get(f) not in columns:
                alias = f" ({f!r} may also be called {ALIASES[f]!r})" if f in ALIASES else ""
                raise DataError(f"no {f!r} column (the header has: {', '.join(map(repr, columns))})", path=path,
                                line=1, field=f, fix=f"name the columns on the first line: {', '.join(needed)}{alias}"
                                + (", or give a --task-file whose prompt uses your columns" if f != "label" else ""))
    quick = {str(i): i for i in range(task.num_classes)}  # the common case, without label_of's parsing
    out = []
    for line, raw in rows:
        ex = {k: (v.strip() if isinstance(v, str) else v) for k, v in raw.items()}
        for a, b in ALIASES.items():
            if a in ex and b not in ex:
                ex[b] = ex[a]
        for f in fields:
            if f not in ex:
                raise DataError(f"no {f!r} key", path=path, line=line, field=f,
                                fix=f"give every line the keys {', '.join(needed)}")
            v = ex[f]
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = ex[f] = str(v)
            if not isinstance(v, str):
                raise DataError(f"is {shown(v)}, not text", path=path, line=line, field=f, fix="give it a string")
            if not v:
                raise DataError("is empty", path=path, line=line, field=f,
                                fix="give every example its text, or remove the line")
        if "label" not in ex:
            raise DataError("no 'label' key", path=path, line=line, field="label",
                            fix=f"give every line the keys {', '.join(needed)}")
        label = ex["label"]
        ex["label"] = quick[label] if label.__class__ is str and label in quick else label_of(task, label, path=path,
                                                                                                line=line)
        out.append(ex)
    return out


def load_file(task: Task, path, flag: str | None = None) -> list:
    """A user's file for `task`, checked: classification examples, or [the whole text] for a language model."""
    if task.kind == "lm":
        text = read_text(path, flag)
        if not text.strip():
            raise DataError("is empty: no text", path=Path(path), fix="give plain text to train on")
        return [text]
    columns, rows = read_rows(path, flag, [*task.fields, "label"])
    return examples_of(task, columns, rows, Path(path))


SHARED = {"sst2": "sst2/{split}.tsv", "mrpc": "mrpc/msr_paraphrase_train.txt", "agnews": "agnews/dev.tsv",
          "wikitext2": "wikitext2/valid.txt"}


def shared_file(task: Task, split: str) -> Path:
    """The shared data file `task`'s `split` comes from; a DataError if it is not there."""
    if task.name not in SHARED or TASKS.get(task.name) is not task:
        raise DataError(f"task {task.name!r} (from {task.source or 'code'}) has no shared data", field=f"{split}_file",
                        fix="give its data with --train-file and --dev-file")
    path = data_root() / SHARED[task.name].format(split=split)
    if not path.is_file():
        raise DataError(f"the shared {task.name} {split} data is missing", path=path,
                        fix="set TANDEM_DATA to the folder holding the shared data, or give --train-file/--dev-file")
    return path


def _split(rows: list, dev_size: int, seed: int = 1234) -> tuple[list, list]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[dev_size:], rows[:dev_size]


def load_split(task: str | Task, split: str, path=None, flag: str | None = None) -> list:
    """Examples of `task` ("train" or "dev"). With `path`, read that user file instead (all of it), checked."""
    t = TASKS[task] if isinstance(task, str) else task
    if path is not None:
        return load_file(t, path, flag)
    file = shared_file(t, split)
    if t.name == "sst2":
        return load_file(t, file)
    if t.name == "mrpc":  # only the train split ships: hold out 800 pairs as dev
        _, rows = read_rows(file)
        rows = [(i, {"sentence1": r.get("#1 String"), "sentence2": r.get("#2 String"), "label": r.get("Quality")})
                for i, r in rows]
        train, dev = _split(examples_of(t, None, rows, file), 800)
        return train if split == "train" else dev
    if t.name == "agnews":  # only the dev split ships, without a header: hold out 2000 as our dev
        reader = csv.reader(io.StringIO(read_text(file), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = [(reader.line_num, {"text": r[0], "label": r[1]}) for r in reader if len(r) == 2]
        train, dev = _split(examples_of(t, None, rows, file), 2000)
        return train if split == "train" else dev
    # wikitext2: one validation file ships: first 90 % of lines train, the rest dev
    lines = read_text(file).splitlines()
    cut = int(len(lines) * 0.9)
    return ["\n".join(lines[:cut]) if split == "train" else "\n".join(lines[cut:])]


def check_split(task: Task, split: str, path=None, flag: str | None = None) -> int | None:
    """What `load_split` would refuse, refused now: a user file is read and checked whole (returns its number of
    examples); the shared data (known good) is only looked for (returns None)."""
    if path is not None:
        return len(load_file(task, path, flag))
    shared_file(task, split)
    return None
