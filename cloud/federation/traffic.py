"""Counting what Flower carries between the ServerApp and the devices.

A Flower message travels as a tree of content-addressed objects (Message -> RecordDict -> ArrayRecord -> Array ->
ArrayChunk, ...), each pushed once as its deflated bytes. `message_bytes` sums those (identical objects, e.g. two
all-zero chunks, travel once); the gRPC framing of the push calls is not counted. `adapter_bytes` is the raw tensor
payload inside: elements x item size of every array, the adapter's size in its wire dtype.

`MeteredGrid` wraps the ServerApp's `Grid` and adds every message sent to a node and every reply from it to the
current `phase` (e.g. ("train", 3)); it sees everything that goes through the grid, SecAgg+'s extra stages included.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def message_bytes(msg: Message) -> int:
    """Bytes of the deflated objects that make up `msg`, each distinct object once."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


def adapter_bytes(msg: Message) -> int:
    """Raw tensor bytes of every ArrayRecord in `msg` (0 for an error reply)."""
    if msg.has_error():
        return 0
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
               for rec in msg.content.array_records.values() for a in rec.values() if a.dtype)


class MeteredGrid:
    """A `Grid` that counts bytes per phase and node, in both directions. Delegates everything else."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.phase: tuple = ("setup", 0)
        # phase -> node -> {"down": .., "up": .., "adapter_down": .., "adapter_up": .., "messages_down": .., ...}
        self.counts: dict[tuple, dict[int, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            self._count(msg.metadata.dst_node_id, "down", msg)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for msg in replies:
            self._count(msg.metadata.src_node_id, "up", msg)
        return replies

    def _count(self, node: int, direction: str, msg: Message) -> None:
        row = self.counts[self.phase][node]
        row[direction] += message_bytes(msg)
        row[f"adapter_{direction}"] += adapter_bytes(msg)
        row[f"messages_{direction}"] += 1

    def totals(self, phase: tuple) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for row in self.counts.get(phase, {}).values():
            for k, v in row.items():
                out[k] += v
        return dict(out)
