"""Command-line flags from (nested) dataclasses, and the dataclasses back from the flags' values.

    add_flags(parser, EdgeConfig)              one --flag per leaf field; each group is an argument group
    build(EdgeConfig, vars(args))              the nested config from the parsed flags
    build(EdgeConfig, {"lora_r": 4}, strict=True)   ... or from any {flag name: value} (tests, benches)

Hand-written: transformers.HfArgumentParser only takes flat dataclasses (a dataclass-typed field is an error), and
tyro, which nests, would be a new dependency that spells every flag with its group (`--link.address`).

A field whose type is a dataclass is a group; its fields' flags are their names, prefixed by the group field's
`metadata["prefix"]` if it has one (`lora.r` -> --lora-r); its `metadata["title"]` heads their part of --help. A
field's `metadata["flag"]` names its flag outright (`lora.cloud` -> --cloud-lora); a group field's
`metadata["flags"]` / `metadata["helps"]` rename / document the fields of a dataclass kept elsewhere (`link.address`
-> --cloud). Help is a field's `metadata["help"]`, else its trailing
`# comment` in the class source; choices are `metadata["choices"]` or a Literal type. bool: --x / --no-x;
tuple[str, ...]: comma-separated.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import threading
import types
import typing
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Flag:
    dest: str  # the flag's name with underscores ("lora_r"), the argparse dest
    path: tuple[str, ...]  # where its value goes in the nested config (("lora", "r"))
    kind: object  # bool, tuple, or the type values are parsed with
    default: object
    help: str
    choices: tuple | None
    group: str | None  # the group field it belongs to (None: a top-level field)


_SOURCE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _comments(cls) -> dict[str, str]:
    """The trailing `# comment` of each field's line in the class source (and its dataclass bases'), read once per
    class under a lock: `inspect.getsource` parses the module, and CPython 3.11's parser is not safe to run from two
    threads at once (the demo's edge threads build their configs together: "AST constructor recursion depth
    mismatch")."""
    with _SOURCE_LOCK:
        return _read_comments(cls)


def _read_comments(cls) -> dict[str, str]:
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, re.M):
            out[m.group(1)] = m.group(2).strip()
    return out


def _kind(hint) -> tuple[object, tuple | None]:
    """(how a value is parsed, its choices) from a field's type."""
    origin, args = typing.get_origin(hint), [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is typing.Literal:
        return type(args[0]), tuple(args)
    if origin in (typing.Union, types.UnionType):
        return _kind(args[0])
    if origin is tuple:
        return tuple, None
    return hint, None


def flags_of(cls, default=None, *, prefix: str = "", names: Mapping | None = None, helps: Mapping | None = None,
             path: tuple[str, ...] = (), group: str | None = None) -> list[Flag]:
    """Every leaf field of `cls` (recursing into groups) as a Flag; defaults from `default` (else `cls()`)."""
    default = cls() if default is None else default
    hints, comments = typing.get_type_hints(cls), _comments(cls)
    out: list[Flag] = []
    for f in dataclasses.fields(cls):
        value, meta = getattr(default, f.name), f.metadata
        if dataclasses.is_dataclass(hints[f.name]):
            sub = "_".join(p for p in (prefix, meta.get("prefix", "")) if p)
            out += flags_of(hints[f.name], value, prefix=sub, names=meta.get("flags"), helps=meta.get("helps"),
                            path=(*path, f.name), group=group or meta.get("title", f.name))
            continue
        dest = meta.get("flag") or (names or {}).get(f.name) or "_".join(p for p in (prefix, f.name) if p)
        kind, choices = _kind(hints[f.name])
        text = meta.get("help") or (helps or {}).get(f.name) or comments.get(f.name, "")
        out.append(Flag(dest, (*path, f.name), kind, value, text, meta.get("choices") or choices, group))
    return out


def _show(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def add_flags(parser, cls, *, skip=(), aliases: Mapping[str, list[str]] | None = None,
              helps: Mapping[str, str] | None = None) -> list[Flag]:
    """Add a --flag for every leaf field of `cls` to `parser` (or an argument group), except the dests in `skip`.
    `aliases` adds more spellings of a flag; `helps` documents fields that have no comment (by dest)."""
    groups: dict[str, object] = {}
    table = [fl for fl in flags_of(cls) if fl.dest not in skip]
    for fl in table:
        if fl.group is not None and fl.group not in groups:
            groups[fl.group] = parser.add_argument_group(fl.group)
        target = parser if fl.group is None else groups[fl.group]
        text = (fl.help or (helps or {}).get(fl.dest, "")).replace("%", "%%")
        flags = ["--" + fl.dest.replace("_", "-"), *(aliases or {}).get(fl.dest, [])]
        kw: dict = {"dest": fl.dest, "default": fl.default}
        if fl.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _csv if fl.kind is tuple else fl.kind
            if fl.choices:
                kw["choices"] = fl.choices
            text += " (comma-separated)" if fl.kind is tuple else ""
        text += f" (default: {_show(fl.default)})"
        target.add_argument(*flags, help=text.strip(), **kw)
    return table


def build(cls, values: Mapping, *, strict: bool = False):
    """`cls()` with the values of the flags named in `values` put where they belong. Names that are no flag of
    `cls` are ignored (an argparse namespace has others), or with `strict` raise TypeError."""
    table = {fl.dest: fl for fl in flags_of(cls)}
    if strict and (unknown := set(values) - set(table)):
        raise TypeError(f"{cls.__name__} has no option {', '.join(sorted(unknown))}")
    tree: dict = {}
    for dest, fl in table.items():
        if dest in values:
            node = tree
            for name in fl.path[:-1]:
                node = node.setdefault(name, {})
            node[fl.path[-1]] = values[dest]
    return _fill(cls(), tree)


def _fill(obj, tree: dict):
    return dataclasses.replace(obj, **{k: _fill(getattr(obj, k), v) if isinstance(v, dict) else v
                                       for k, v in tree.items()})
