"""Sessions: who owns which session, its cut and wire settings, its TTL, and the service-wide limits.

A session is a small record; nothing about the edge's data is kept in it. Every failure is a `CloudError` carrying
the gRPC status the RPC layer answers with.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import grpc

from model.segments import Cut

log = logging.getLogger("tandem.cloud")


class CloudError(Exception):
    """A refusal with its gRPC status. Messages never quote client input untruncated."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def quote(value, limit: int = 40) -> str:
    """Client input inside an error or log line: repr-escaped and cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass
class CloudConfig:
    max_tokens_per_step: int = 16384  # tokens of one step at reference_seq_len; longer sequences cost more (budgets.py)
    reference_seq_len: int = 512
    max_sessions: int = 64
    max_sessions_per_client: int = 16
    ttl_seconds: float = 600.0
    step_timeout: float = 120.0  # seconds the cloud waits for any one edge message inside a step
    begin_timeout: float = 10.0  # seconds a new Step stream may take to send its first message
    max_streams_per_client: int = 8  # open Step streams of one client
    max_steps_per_client: int = 2  # steps of one client computing at once (more wait their turn)
    max_steps_per_second: float = 50.0  # step starts per second of one client
    compute_threads: int = 32  # threads that run steps' compute (a DLoRA step holds one while the edge answers)
    # run steps without LoRA exchanges (split, carried) of many sessions as one batch: on, off, or auto = on when the
    # backbone is on a GPU (on CPU, bench/multi_tenant.py measured unbatched steps in parallel threads faster)
    batching: Literal["auto", "on", "off"] = "auto"
    batch_window: float = 0.005  # seconds a batch waits for more steps (and for its gradients) when the cloud is idle
    batch_max_tokens: int = 65536  # padded tokens of one batch
    max_prefix_tokens: int = 128  # prefix tuning: the most virtual keys and values a session may put in front
    capture_dir: str | None = None  # audits only: record every message of every step here (privacy/audit/capture.py)


@dataclass
class Session:
    id: str
    owner: str
    cut: Cut
    wire_up: int
    wire_down: int
    targets: list[str]
    lora_blocks: list[int]
    groups: tuple = ()  # DLoRA: input groups of `targets`, in execution order (model/sites.py); else ()
    carried: str = ""  # carried mode: the method ("lora", "dora", "ia3", "prefix") whose weights of `lora_blocks`
    # come with each step's begin; "": not carried
    lora_rank: int = 0  # carried LoRA, DoRA: r of those weights
    lora_scaling: float = 0.0  # carried LoRA, DoRA: alpha / r (rsLoRA: alpha / sqrt(r))
    feedforward: tuple = ()  # carried (IA)³: the targets scaled at their input
    branch_on_output: bool = False  # DLoRA-style branches that read the site's output (bottleneck adapters)
    prefix_tokens: int = 0  # carried prefix: V, the keys and values each block's prefix puts in front
    last_used: float = field(default_factory=time.monotonic)
    steps: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    cloud_seconds: float = 0.0
    busy: bool = False


class SessionTable:
    """Open sessions, with ownership checks, one running step per session, and expiry after `ttl_seconds`."""

    def __init__(self, config: CloudConfig):
        self.config = config
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._reap, daemon=True, name="tandem-session-reaper").start()

    def open(self, owner: str, **fields) -> Session:
        with self._lock:
            if len(self._sessions) >= self.config.max_sessions:
                raise CloudError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"{self.config.max_sessions} sessions already open (limit max_sessions)")
            if sum(s.owner == owner for s in self._sessions.values()) >= self.config.max_sessions_per_client:
                raise CloudError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"this client already holds "
                                 f"{self.config.max_sessions_per_client} sessions (limit max_sessions_per_client)")
            sess = Session(uuid.uuid4().hex, owner, **fields)
            self._sessions[sess.id] = sess
        return sess

    def get(self, sid: str, owner: str) -> Session:
        with self._lock:
            sess = self._sessions.get(sid)
        if sess is None:
            raise CloudError(grpc.StatusCode.NOT_FOUND, f"unknown or expired session {quote(sid)}")
        if sess.owner != owner:
            raise CloudError(grpc.StatusCode.PERMISSION_DENIED, f"session {quote(sid)} belongs to another client")
        return sess

    def close(self, sess: Session) -> None:
        with self._lock:
            self._sessions.pop(sess.id, None)

    def acquire(self, sess: Session) -> None:
        """Mark the session's one step as running."""
        with self._lock:
            if sess.busy:
                raise CloudError(grpc.StatusCode.FAILED_PRECONDITION, f"session {sess.id} already has a step running")
            sess.busy = True

    def release(self, sess: Session, *, ok: bool, bytes_in: int, bytes_out: int, seconds: float) -> None:
        """End the step: account it and free the session (before the edge can see the step's end)."""
        with self._lock:
            sess.busy = False
            sess.last_used = time.monotonic()
            sess.steps += ok
            sess.bytes_received += bytes_in
            sess.bytes_sent += bytes_out
            sess.cloud_seconds += seconds

    def expire_idle(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            dead = [s.id for s in self._sessions.values()
                    if not s.busy and now - s.last_used > self.config.ttl_seconds]
            for sid in dead:
                del self._sessions[sid]
        for sid in dead:
            log.info("session %s expired", sid)
        return dead

    def _reap(self):
        while not self._stop.wait(min(5.0, self.config.ttl_seconds / 4)):
            self.expire_idle()

    def stop(self):
        self._stop.set()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, sid: str) -> bool:
        return sid in self._sessions

    def __getitem__(self, sid: str) -> Session:
        return self._sessions[sid]
