"""The built-in tasks (prompts, label words, label names) and where their shared data lives."""
from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from pathlib import Path


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
    label_words: list[str] = field(default_factory=list)  # index = class id; the first token answers
    max_len: int = 128  # tokens kept per example (longer prompts lose their start; the answer position stays)
    label_names: list[str] = field(default_factory=list)  # names a data file may give as labels; default: the words
    source: str | None = None  # the task file it came from (None: built in)

    def __post_init__(self):
        if not self.label_names:
            self.label_names = [w.strip() for w in self.label_words]

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    @property
    def fields(self) -> list[str]:
        """The data fields the prompt uses, in order."""
        return list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(self.template) if f))

    def prompt(self, ex: dict) -> str:
        return self.template.format(**ex)


TASKS = {
    "sst2": Task("sst2", "classify", "Review: {sentence}\nIs the sentiment of this review positive or negative?\n"
                 "Answer:", [" negative", " positive"], max_len=96),
    "mrpc": Task("mrpc", "classify", "Sentence 1: {sentence1}\nSentence 2: {sentence2}\n"
                 "Do these two sentences mean the same thing, yes or no?\nAnswer:", [" no", " yes"], max_len=160),
    "agnews": Task("agnews", "classify", "News: {text}\nIs this news about world, sports, business or science?\n"
                   "Answer:", [" world", " sports", " business", " science"], max_len=128,
                   label_names=["World", "Sports", "Business", "Sci/Tech"]),
    "wikitext2": Task("wikitext2", "lm", max_len=128),
}
AGNEWS_LABELS = {"World": 0, "Sports": 1, "Business": 2, "Sci/Tech": 3}
