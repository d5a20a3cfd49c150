"""Waiting on the devices of a federation: a `Grid` whose waits end, and the errors its runs stop with."""
from __future__ import annotations

import threading
import time

from flwr.app import Message
from flwr.serverapp import Grid


class FederationStopped(RuntimeError):
    """The run was told to stop (under `tandem federate`: its driver gave up on the simulation backend)."""


class DevicesTimeout(TimeoutError):
    """Too few devices connected, or none answered, within device-timeout."""


class BoundedGrid:
    """A `Grid` whose waits end. `send_and_receive` pushes the messages and pulls replies until all are in or `timeout`
    has passed, as Flower's grids do, but fails when no device at all has answered within `device_timeout` (a backend
    or SuperNodes that never came up would otherwise hold the ServerApp for the whole round-timeout), and stops within
    a poll (the grid's `pull_interval`, else 1 s) once `stop` is set. `wait_for_nodes` waits for devices to connect,
    as long. Delegates the rest."""

    def __init__(self, grid: Grid, device_timeout: float, stop: threading.Event | None = None):
        self._grid = grid
        self.device_timeout = device_timeout
        self.stop = stop
        self.poll = min(1.0, float(getattr(grid, "pull_interval", 1.0)))

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def get_node_ids(self):
        return self._grid.get_node_ids()

    def check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise FederationStopped("the federation was stopped before it finished")

    def _sleep(self, seconds: float) -> None:
        if self.stop is not None:
            self.stop.wait(seconds)
        else:
            time.sleep(seconds)

    def wait_for_nodes(self, n: int, what: str) -> list[int]:
        deadline = time.time() + self.device_timeout
        while len(node_ids := list(self._grid.get_node_ids())) < n:
            self.check()
            if time.time() > deadline:
                raise DevicesTimeout(
                    f"{what}: only {len(node_ids)} of the {n} devices it needs connected within device-timeout "
                    f"{self.device_timeout:g}s; start the SuperNodes (and check that they reach the SuperLink), or "
                    f"lower min-nodes, or raise device-timeout")
            self._sleep(1.0)
        return node_ids

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        self.check()
        pending = set(self._grid.push_messages(messages))
        t0 = time.time()
        end = float("inf") if timeout is None else t0 + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            now = time.time()
            if not replies and now - t0 > self.device_timeout:
                raise DevicesTimeout(
                    f"none of the {len(messages)} devices asked answered within device-timeout "
                    f"{self.device_timeout:g}s: their backend or SuperNodes did not come up, or they cannot run the "
                    f"ClientApp; check the devices' logs, or raise device-timeout if they are just slow")
            if now >= end:
                break
            self._sleep(self.poll)
            self.check()
        return replies
