"""A user's own classification task, from a JSON task file (`--task-file`), and the checks that need a tokenizer.

    {"name": "intent",                                   optional; default: the file's name
     "prompt": "Message: {text}\\nIntent:",                the prompt; {field} is that field of each example
     "labels": ["greeting", "farewell", "question"],     label words, class 0, 1, 2 ... (names = the words)
           or {"hi": "greeting", "bye": "farewell", ...}  label name (as the data may give it) -> label word
     "text_fields": ["text"],                            optional: the fields the prompt uses (checked against it)
     "max_len": 128}                                     optional: tokens kept per example

As in the built-in tasks the model answers with the label word right after the prompt, so a word gets a leading
space unless it has one or the prompt ends in whitespace ("Intent:" + " greeting"); the word's first token is the
answer token, and the words' first tokens must differ for the model's tokenizer. Labels in the data may be class
numbers 0..n-1 or label names; any other label is an error.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from tasks.builtin import TASKS, Task
from tasks.errors import DataError
from tasks.files import read_text

KEYS = ("name", "prompt", "labels", "text_fields", "max_len")
_loaded: dict[tuple, Task] = {}


def load_task_file(path) -> Task:
    """The task a task file describes (read again only when the file changes)."""
    p = Path(path)
    text = read_text(p, "--task-file")
    key = (str(p.resolve()), text)
    if key not in _loaded:
        _loaded[key] = _parse(p, text)
    return _loaded[key]


def _parse(p: Path, text: str) -> Task:
    def bad(problem, field=None, fix=None, line=None):
        return DataError(problem, path=p, line=line, field=field, fix=fix)

    spec = _spec(text, bad)
    prompt = spec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("missing or not text", field="prompt", fix='give the prompt, e.g. "Message: {text}\\nIntent:"')
    fields = _prompt_fields(prompt, bad)
    if "text_fields" in spec:
        _check_text_fields(spec["text_fields"], fields, bad)
    names, words = _labels(spec.get("labels"), bad)
    words = [w if w[:1].isspace() or prompt[-1:].isspace() else " " + w for w in words]
    max_len = spec.get("max_len", 128)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise bad(f"{max_len!r} is not a token count", field="max_len", fix="give a whole number, e.g. 128")
    name = spec.get("name", p.stem)
    if not isinstance(name, str) or not name.strip():
        raise bad("must be text", field="name", fix='e.g. "intent"')
    return Task(name.strip(), "classify", prompt, words, max_len, label_names=names, source=str(p))


def _spec(text: str, bad) -> dict:
    """The file's JSON object, with only known keys."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"not valid JSON ({e.msg}, column {e.colno})", line=e.lineno,
                  fix='write the task as one JSON object: {"prompt": "... {text} ...", "labels": [...]}') from None
    if not isinstance(spec, dict):
        raise bad(f"is a JSON {type(spec).__name__}, not an object", fix='write {"prompt": ..., "labels": [...]}')
    for k in spec:
        if k not in KEYS:
            raise bad("unknown key", field=k, fix=f"use only the keys {', '.join(KEYS)}")
    return spec


def _prompt_fields(prompt: str, bad) -> list[str]:
    """The fields the prompt template uses, each a plain {name}; at least one."""
    try:
        parts = list(string.Formatter().parse(prompt))
    except ValueError as e:
        raise bad(f"is not a valid template ({e})", field="prompt",
                  fix="write fields as {name} and literal braces as {{ and }}") from None
    fields = []
    for _, f, spec_, conv in parts:
        if f is None:
            continue
        if not f.isidentifier() or spec_ or conv:
            raise bad(f"{{{f}{'!' + conv if conv else ''}{':' + spec_ if spec_ else ''}}} is not a plain field",
                      field="prompt", fix="name fields by their column or key only, e.g. {text}")
        fields.append(f)
    if not fields:
        raise bad("uses no field of the examples", field="prompt", fix="put the text in it as {text} (or your column)")
    return fields


def _check_text_fields(tf, fields: list[str], bad) -> None:
    """`text_fields`, when given, lists exactly the prompt's fields."""
    if not isinstance(tf, list) or not all(isinstance(x, str) for x in tf) or not tf:
        raise bad("must be a list of field names", field="text_fields", fix='e.g. ["text"]')
    for f in fields:
        if f not in tf:
            raise bad(f"the prompt uses {{{f}}}, which is not listed", field="text_fields",
                      fix=f"add {f!r} to text_fields or take it out of the prompt")
    for f in tf:
        if f not in fields:
            raise bad(f"{f!r} is not used by the prompt", field="text_fields",
                      fix=f"put {{{f}}} in the prompt or take it out of text_fields")


def _labels(labels, bad) -> tuple[list[str], list[str]]:
    """(names, words) of two or more classes, none empty, no two with the same name or word."""
    if isinstance(labels, list) and all(isinstance(w, str) for w in labels):
        names, words = [w.strip() for w in labels], list(labels)
    elif isinstance(labels, dict) and all(isinstance(w, str) for w in labels.values()):
        names, words = [str(k).strip() for k in labels], list(labels.values())
    else:
        raise bad("missing, or not a list of label words nor a {name: word} mapping", field="labels",
                  fix='e.g. ["greeting", "farewell", "question"]')
    if len(words) < 2:
        raise bad(f"has {len(words)} label, a classifier needs two or more", field="labels", fix="list every class")
    for i, (n, w) in enumerate(zip(names, words)):
        if not n or not w.strip():
            raise bad(f"label {i} is empty", field="labels", fix="give every class a word")
        for j in range(i):
            if names[j].casefold() == n.casefold():
                raise bad(f"classes {j} and {i} are both named {n!r}", field="labels", fix="give each class its name")
            if words[j].strip() == w.strip():
                raise bad(f"classes {j} and {i} both have the word {w.strip()!r}", field="labels",
                          fix="give each class its own word")
    return names, words


def resolve_task(name: str, task_file=None) -> Task:
    """The task a config names: its task file's if it has one, else the built-in one."""
    if task_file:
        return load_task_file(task_file)
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}", field="task", fix=f"use one of {', '.join(TASKS)}, or --task-file")
    return TASKS[name]


def check_tokens(task: Task, tokenizer) -> None:
    """What only the model's tokenizer can tell: the label words' first tokens (the answer tokens) differ, and the
    prompt's end (after its last field) fits in max_len, so cutting a long example never cuts the question or the
    answer position. The test stand-in tokenizer reads characters, so every built-in word starts with the same " ":
    built-in tasks are not checked against it (custom tasks are)."""
    if task.kind != "classify" or (task.source is None and getattr(tokenizer, "stand_in", False)):
        return
    where = {"path": task.source} if task.source else {}
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in task.label_words]
    for i, w in enumerate(task.label_words):
        if not ids[i]:
            raise DataError(f"label word {w!r} has no tokens", **where, field="labels", fix="use a real word")
        for j in range(i):
            if ids[j][0] == ids[i][0]:
                raise DataError(f"label words {task.label_words[j]!r} and {w!r} start with the same token "
                                f"({ids[i][0]}), so the answer cannot tell them apart", **where, field="labels",
                                fix="choose label words whose first tokens differ (e.g. different first letters, "
                                    "or one-token words)")
    tail = ""  # the prompt's literal text after its last field
    for literal, f, _, _ in string.Formatter().parse(task.template):
        tail = "" if f is not None else tail + literal
    n = len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    if n >= task.max_len:
        raise DataError(f"the prompt after its last field is {n} tokens, max_len is {task.max_len}: cutting long "
                        "examples would cut the question and the answer position", **where, field="max_len",
                        fix=f"raise max_len above {n} or shorten the prompt's end")
