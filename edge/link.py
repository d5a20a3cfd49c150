"""The edge's connection to the cloud: a gRPC channel, a session, one `Step` stream per step, and the retry policy.

`StepStream` is the edge's half of one step. Every message it sends or receives goes through
`protocol.step.StepProtocol`, which checks the step's order and counts wire bytes (protobuf size + 5-byte gRPC
prefix) and tensor payload per direction. `CloudLink.call` runs a whole remote exchange again when it fails for a
transient reason, with exponential backoff, reopening the session when the cloud lost it (restart, expiry): the
cloud holds nothing the edge needs, so a step can always be run again.
"""
from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass

import grpc

from protocol import AUTH_HEADER, PROTOCOL_VERSION, pb, pb_grpc
from protocol.step import ProtocolError, StepProtocol

log = logging.getLogger("tandem.edge")

# A step that fails with one of these is run again; the others are the caller's mistake and are raised at once.
TRANSIENT = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "NOT_FOUND", "INTERNAL", "RESOURCE_EXHAUSTED"}
SESSION_LOST = {"NOT_FOUND", "UNAVAILABLE"}  # reopen the session before the next attempt


class StepFailed(RuntimeError):
    """The cloud refused or aborted the step. `code` is the gRPC status; the session stays usable for a retry."""

    def __init__(self, code, details: str):
        super().__init__(f"{code.name if code else 'ERROR'}: {details}")
        self.code, self.details = code, details

    @property
    def transient(self) -> bool:
        return self.code is not None and self.code.name in TRANSIENT


@dataclass
class LinkConfig:
    address: str  # the cloud backbone service, host:port
    token: str | None = None  # bearer token for the cloud (or --token-file)
    tls_dir: str | None = None  # folder with ca.pem (and client cert/key for mTLS), from `tandem certs`
    client_name: str | None = None  # which client certificate to present
    timeout: float = 300.0  # seconds one RPC may take
    max_message_mb: int = 256  # largest gRPC message either way, in MiB
    patience: float = 300.0  # seconds a step keeps retrying a transient failure (a cloud restart, an outage)
    backoff: float = 1.0  # seconds before the first retry; doubles each time, up to max_backoff
    max_backoff: float = 30.0  # longest wait between two retries, in seconds


class CloudLink:
    def __init__(self, cfg: LinkConfig):
        self.cfg = cfg
        limit = cfg.max_message_mb * 1024 * 1024
        opts = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        if cfg.tls_dir:
            from privacy.security.certs import load_channel_credentials
            self.channel = grpc.secure_channel(cfg.address, load_channel_credentials(cfg.tls_dir, cfg.client_name),
                                               options=opts)
        else:
            self.channel = grpc.insecure_channel(cfg.address, options=opts)
        self.stub = pb_grpc.BackboneStub(self.channel)
        self.metadata = [(AUTH_HEADER, f"Bearer {cfg.token}")] if cfg.token else []
        self.session: pb.OpenSessionReply | None = None
        self._request: pb.OpenSessionRequest | None = None

    def wait_ready(self, timeout: float = 60.0):
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def open(self, *, fingerprint: str, k: int, m: int, wire_up: int, wire_down: int, lora_targets=(),
             lora_blocks=(), carried: str = "", lora_rank: int = 0, lora_scaling: float = 0.0,
             feedforward_targets=(), branch_on_output: bool = False, prefix_tokens: int = 0) -> pb.OpenSessionReply:
        """Open a session; `carried` names the carried method ("lora", "dora", "ia3", "prefix"; "" = not
        carried)."""
        self._request = pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION, model_fingerprint=fingerprint,
                                              edge_bottom_blocks=k, edge_top_blocks=m, wire_dtype_up=wire_up,
                                              wire_dtype_down=wire_down, lora_targets=list(lora_targets),
                                              lora_blocks=list(lora_blocks), carried_lora=bool(carried),
                                              lora_rank=lora_rank, lora_scaling=lora_scaling,
                                              carried_method=carried,
                                              feedforward_targets=list(feedforward_targets),
                                              branch_on_output=branch_on_output, prefix_tokens=prefix_tokens)
        return self.reopen()

    def reopen(self) -> pb.OpenSessionReply:
        """Open the session again with the same request (after the cloud restarted or the session expired)."""
        try:
            self.session = self.stub.OpenSession(self._request, metadata=self.metadata, timeout=self.cfg.timeout)
        except grpc.RpcError as e:
            hint = ""
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                hint = (" (is the cloud up at this address? If it serves TLS, give --tls-dir)" if not self.cfg.tls_dir
                        else " (is the cloud up, and does it serve TLS with this CA?)")
            raise StepFailed(e.code(), f"{e.details()}{hint}") from None
        return self.session

    def call(self, attempt):
        """Run `attempt()` (one remote exchange), again after a transient failure, until `cfg.patience` seconds have
        passed since the first failure; then the last failure is raised."""
        first_failure, n = None, 0
        while True:
            try:
                return attempt()
            except StepFailed as e:
                now = time.monotonic()
                first_failure = first_failure if first_failure is not None else now
                left = self.cfg.patience - (now - first_failure)
                if not e.transient or left <= 0:
                    raise
                wait = min(self.cfg.backoff * 2 ** n, self.cfg.max_backoff, left)
                n += 1
                log.warning("step failed (%s); retry %d in %.1fs (giving up in %.0fs)", e, n, wait, left)
                time.sleep(wait)
                if e.code.name in SESSION_LOST:
                    try:
                        self.reopen()
                    except StepFailed:
                        pass  # still down: the next attempt waits longer

    def close(self) -> pb.SessionStats | None:
        stats = None
        if self.session is not None:
            try:
                stats = self.stub.CloseSession(pb.SessionRef(session_id=self.session.session_id),
                                               metadata=self.metadata, timeout=30)
            except grpc.RpcError:
                pass
            self.session = None
        self.channel.close()
        return stats

    def stream(self, groups=()) -> "StepStream":
        return StepStream(self, groups)


class StepStream:
    """One step's bidirectional stream. `send(kind=msg)` and `recv()` in protocol order; `close` ends it."""

    def __init__(self, link: CloudLink, groups=()):
        self.outbox: queue.Queue = queue.Queue()
        self.protocol = StepProtocol(groups)
        self.traffic = self.protocol.traffic
        self._responses = link.stub.Step(iter(self.outbox.get, None), metadata=link.metadata,
                                         timeout=link.cfg.timeout)
        self.closed = False

    def send(self, **kind):
        msg = pb.EdgeMessage(**kind)
        self.protocol.observe(msg)
        self.outbox.put(msg)

    def recv(self):
        """The cloud's next message, checked against the step's order: (kind, inner message)."""
        t0 = time.perf_counter()
        try:
            msg = next(self._responses)
        except StopIteration:
            raise StepFailed(None, f"the cloud ended the step before sending {self.protocol.next()}") from None
        except grpc.RpcError as e:
            self.close()
            raise StepFailed(e.code(), e.details()) from None
        finally:
            self.traffic.wait_seconds += time.perf_counter() - t0
        try:
            kind, inner = self.protocol.observe(msg)
        except ProtocolError as e:
            self.close()
            raise StepFailed(None, f"the cloud broke the protocol: {e.message}") from None
        if kind in ("hidden", "input_grad"):
            self.traffic.cloud_seconds += inner.cloud_seconds
        return kind, inner

    def close(self):
        if not self.closed:
            self.closed = True
            self.outbox.put(None)

    def finish(self):
        """End the request side and drain the cloud's end of the stream (surfacing a late error)."""
        self.close()
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError as e:
            raise StepFailed(e.code(), e.details()) from None
