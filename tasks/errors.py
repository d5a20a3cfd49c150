"""The user-facing data error: one line naming the file, the line, the field, what is wrong and how to fix it."""
from __future__ import annotations


class DataError(ValueError):
    """A data file, a task file or a data setting the user must fix. `tandem` prints `str(e)` as one line (exit 2).

        train.tsv line 3, field 'label': 'great' is not a label of sst2; fix: use 0..1 or a label name (negative,
        positive)
    """

    def __init__(self, problem: str, *, path=None, line: int | None = None, field: str | None = None,
                 fix: str | None = None):
        self.problem, self.path, self.line, self.field, self.fix = problem, path, line, field, fix
        super().__init__(self.message())

    def message(self) -> str:
        where = ", ".join(p for p in (str(self.path) if self.path is not None else None,
                                      f"line {self.line}" if self.line is not None else None,
                                      f"field {self.field!r}" if self.field is not None else None) if p)
        text = f"{where}: {self.problem}" if where else self.problem
        if self.fix:
            text += f"; fix: {self.fix}"
        return " ".join(text.split())  # one line, whatever a value held


def shown(value, limit: int = 40) -> str:
    """A value as an error message quotes it: repr, cut to `limit` characters."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 4] + "...'"
