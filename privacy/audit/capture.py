"""A capture: every message of every step as it crossed between the cloud and an edge, kept for an audit.

Off unless the operator points the cloud at a folder (`tandem cloud serve --capture-dir DIR`, CloudConfig.capture_dir);
the cloud logs a warning when it is on. `Capture(folder)` creates `folder` with mode 0700 if it does not exist and
appends each message to `<session id>.capture` there, a file of mode 0600 starting with `MAGIC`, one record per
message:

    header   struct "<BBQIHI": direction (0 up: edge -> cloud, 1 down), kind (its place in protocol.step's UP_KINDS
             or DOWN_KINDS), step, exchange, session id bytes, message bytes
    then     the session id (UTF-8), then the serialized EdgeMessage (up) or CloudMessage (down)

`exchange` numbers a session's Step streams in the order their `begin` was recorded: a step number alone does not
name one stream (the evaluation passes, the micro-batches of one step and a replayed step share it). Session ids are
quoted by the client before the cloud has checked them, so only the cloud's own form (32 hex digits) names a file;
any other id is recorded, cut to 64 characters, in `unknown-sessions.capture`.

Beside it, `<session id>.session.json` (0600) holds the settings the session was opened with (the cut, the LoRA
sites, the wire dtypes, the carried rank and scaling): `session_settings` reads them back.

`read_capture(file or folder)` yields the records back as `Record`s, reading headers only: a record reads and
parses its message from the file when asked (`message`, `inner`).
`exchanges(records)` groups them into one `Exchange` per stream.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from google.protobuf.message import DecodeError

from protocol import GRPC_PREFIX_BYTES, pb
from protocol.step import DOWN, DOWN_KINDS, UP, UP_KINDS

log = logging.getLogger("tandem.audit")
MAGIC = b"TANDEM-CAPTURE-1\n"
HEADER = struct.Struct("<BBQIHI")
SUFFIX = ".capture"
SETTINGS = ".session.json"
UNKNOWN = "unknown-sessions"
_DIRECTIONS = (UP, DOWN)
_KINDS = {UP: UP_KINDS, DOWN: DOWN_KINDS}
_PARSE = {UP: pb.EdgeMessage, DOWN: pb.CloudMessage}
_SESSION_ID = re.compile(r"[0-9a-f]{32}")


class Capture:
    """Appends messages to one file per session; `record` may be called from many threads at once."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._exchanges: dict[str, int] = {}  # session -> index of its latest exchange

    def path_of(self, session_id: str) -> Path:
        name = session_id if _SESSION_ID.fullmatch(session_id) else UNKNOWN
        return self.folder / f"{name}{SUFFIX}"

    def session_opened(self, session_id: str, settings: dict) -> None:
        """The settings of a session the cloud opened (its id is the cloud's own), next to its messages."""
        data = json.dumps(settings, sort_keys=True).encode()
        with self._lock:
            _append(self.folder / f"{session_id}{SETTINGS}", data, magic=b"")

    def record(self, session_id: str, step: int, direction: str, message) -> None:
        """Append one message (an EdgeMessage going up, a CloudMessage going down) of `session_id`'s step."""
        data, kind = message.SerializeToString(), message.WhichOneof("kind")
        sid = session_id[:64].encode("utf-8", "backslashreplace")
        path = self.path_of(session_id)
        key = session_id if path.stem != UNKNOWN else UNKNOWN  # unknown ids share one counter: no growth per id
        with self._lock:
            n = self._exchanges.get(key, -1) + (kind == "begin")
            self._exchanges[key] = n
            head = HEADER.pack(_DIRECTIONS.index(direction), _KINDS[direction].index(kind), step, max(n, 0),
                               len(sid), len(data))
            _append(path, head + sid + data)


def session_settings(path: str | Path, session_id: str) -> dict | None:
    """The settings `session_opened` recorded for `session_id` beside the capture at `path` (a file or its folder)."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    f = folder / f"{session_id}{SETTINGS}"
    return json.loads(f.read_text()) if _SESSION_ID.fullmatch(session_id) and f.is_file() else None


def _append(path: Path, data: bytes, magic: bytes = MAGIC) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # whatever the umask or an older file's mode
        if os.fstat(fd).st_size == 0:
            data = magic + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


@dataclass
class Record:
    """One message as it crossed. `size` is its serialized length; `wire_bytes` adds the gRPC prefix. The message
    is read from `file` at `offset` each time it is asked for."""
    session: str
    step: int
    exchange: int
    direction: str
    kind: str
    size: int
    file: Path
    offset: int

    @property
    def wire_bytes(self) -> int:
        return self.size + GRPC_PREFIX_BYTES

    @property
    def message(self):
        """The EdgeMessage (up) or CloudMessage (down)."""
        parse = _PARSE[self.direction]
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        try:
            msg = parse.FromString(data)
        except DecodeError:
            msg = None
        if msg is None or len(data) < self.size or msg.WhichOneof("kind") != self.kind:
            raise ValueError(f"{self.file}: the message at byte {self.offset} is not the {self.kind} its record "
                             "names (the file changed, or is no capture)")
        return msg

    @property
    def inner(self):
        """The message of its kind (a Begin, a LoraReply, ...)."""
        return getattr(self.message, self.kind)


def capture_files(path: str | Path) -> list[Path]:
    """The capture files `path` names: itself, or every `*.capture` in a folder (sorted). Missing: FileNotFoundError."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob(f"*{SUFFIX}"))
        if not files:
            raise FileNotFoundError(f"{path} holds no capture (*{SUFFIX} files from `tandem cloud serve --capture-dir`)")
        return files
    if not path.exists():
        raise FileNotFoundError(f"no capture at {path}")
    return [path]


def read_capture(path: str | Path) -> Iterator[Record]:
    """Every record of a capture file, or of every capture file in a folder. A file that is not a capture is a
    ValueError; a last record cut short (the cloud stopped while writing it) ends that file with a warning."""
    for file in capture_files(path):
        yield from _read_file(file)


def _read_file(file: Path) -> Iterator[Record]:
    with open(file, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{file} is not a Tandem capture (it does not start with {MAGIC.strip().decode()})")
        size = os.fstat(f.fileno()).st_size
        while head := f.read(HEADER.size):
            start = f.tell() - len(head)
            if len(head) < HEADER.size or start + HEADER.size + sum(HEADER.unpack(head)[-2:]) > size:
                log.warning("%s: the record at byte %d is cut short; the records before it are read", file, start)
                return
            d, kind, step, exchange, n_sid, n_msg = HEADER.unpack(head)
            if d >= len(_DIRECTIONS) or kind >= len(_KINDS[_DIRECTIONS[d]]):
                raise ValueError(f"{file}: the record at byte {start} names no message kind: not a Tandem capture")
            direction = _DIRECTIONS[d]
            sid = f.read(n_sid).decode("utf-8", "replace")
            yield Record(sid, step, exchange, direction, _KINDS[direction][kind], n_msg, file, f.tell())
            f.seek(n_msg, os.SEEK_CUR)


@dataclass
class Exchange:
    """One Step stream of a session: its records in the order they crossed (the first is its `begin`, read once
    and kept; the others are read from the file when asked for)."""
    session: str
    step: int
    index: int
    records: list[Record] = field(default_factory=list)

    @functools.cached_property
    def begin(self):
        return self.records[0].inner

    @property
    def train(self) -> bool:
        return bool(self.begin.train)

    def of_kind(self, kind: str) -> list:
        """The inner messages of one kind, in order."""
        return [r.inner for r in self.records if r.kind == kind]


def exchanges(records: Iterable[Record]) -> list[Exchange]:
    """Group records into exchanges, each session's in the order they started (records before any `begin` of
    their session are dropped: they cannot be placed)."""
    out: dict[tuple[str, int], Exchange] = {}
    for r in records:
        key = (r.session, r.exchange)
        if key not in out:
            if r.kind != "begin":
                continue
            out[key] = Exchange(r.session, r.step, r.exchange)
        out[key].records.append(r)
    return list(out.values())


__all__ = ["Capture", "Exchange", "Record", "capture_files", "exchanges", "read_capture"]
