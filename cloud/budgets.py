"""Per-client budgets, so that no client can stall or starve another.

A client (one bearer token or one client certificate) may hold at most `max_streams_per_client` open Step streams,
run at most `max_steps_per_client` steps' compute at once (more wait their turn, in arrival order), start at most
`max_steps_per_second` steps per second (a token bucket), and hold at most `max_sessions_per_client` sessions.
Exceeding a limit is RESOURCE_EXHAUSTED with a message naming the limit. A stream that sends nothing costs a
coroutine, not a thread, and is dropped after `begin_timeout` seconds; the health check is served by the same
event loop and never waits behind a step's compute (which runs in worker threads).

The cost of one step is bounded too, not its token count alone: attention grows with the square of the sequence
length, so a step of B sequences of T tokens costs B·T·(2·P + 4·T·H) FLOPs per block (P the block's weights,
H the hidden size), and it may cost no more than `max_tokens_per_step` tokens at `reference_seq_len`.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict

import grpc

from cloud.sessions import CloudConfig, CloudError

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def step_cost(batch: int, seq: int, block_params: int, hidden: int) -> float:
    """FLOPs of one block's forward for `batch` sequences of `seq` tokens (linear layers + attention)."""
    return batch * seq * (2.0 * block_params + 4.0 * seq * hidden)


class StepCostLimit:
    def __init__(self, config: CloudConfig, block_params: int, hidden: int):
        self.config, self.block_params, self.hidden = config, block_params, hidden

    def check(self, batch: int, seq: int) -> None:
        c = self.config
        ref = c.reference_seq_len
        limit = step_cost(max(1, c.max_tokens_per_step // ref), ref, self.block_params, self.hidden)
        cost = step_cost(batch, seq, self.block_params, self.hidden)
        if cost > limit:
            raise CloudError(EXHAUSTED, f"a step of {batch} x {seq} tokens costs {cost / limit:.2f}x the cloud's limit "
                             f"({c.max_tokens_per_step} tokens at sequence length {ref}; limit max_tokens_per_step): "
                             "send fewer or shorter sequences")


class ClientBudgets:
    def __init__(self, config: CloudConfig):
        self.config = config
        self._streams: dict[str, int] = defaultdict(int)
        self._steps: dict[str, asyncio.Semaphore] = {}
        self._bucket: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)

    @contextlib.contextmanager
    def stream(self, client: str):
        """Hold one of the client's stream slots for the life of a Step stream."""
        if self._streams[client] >= self.config.max_streams_per_client:
            raise CloudError(EXHAUSTED, f"this client already has {self._streams[client]} open Step streams "
                             f"(limit max_streams_per_client)")
        self._streams[client] += 1
        try:
            yield
        finally:
            self._streams[client] -= 1
            if not self._streams[client]:
                del self._streams[client]

    def take_step(self, client: str) -> None:
        """One step start from the client's token bucket (rate max_steps_per_second, burst of the same size)."""
        rate = self.config.max_steps_per_second
        now = time.monotonic()
        tokens, last = self._bucket.get(client, (rate, now))
        tokens = min(rate, tokens + (now - last) * rate)
        if tokens < 1.0:
            self._bucket[client] = (tokens, now)
            raise CloudError(EXHAUSTED, f"this client starts more than {rate:g} steps per second "
                             "(limit max_steps_per_second)")
        self._bucket[client] = (tokens - 1.0, now)

    def compute_slot(self, client: str) -> asyncio.Semaphore:
        """The client's share of the compute threads: at most max_steps_per_client steps run at once."""
        if client not in self._steps:
            self._steps[client] = asyncio.Semaphore(self.config.max_steps_per_client)
        return self._steps[client]
