"""The edge's connection to the cloud: a gRPC channel, a session, and one `Step` stream per step.

`StepStream` is the edge's half of one step. It sends and receives the messages in order, counts every byte as it
is serialized on the wire (protobuf size + 5-byte gRPC prefix) and the raw tensor payload, per direction.
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import Message

from protocol import AUTH_HEADER, PROTOCOL_VERSION, pb, pb_grpc, wire_size
from protocol.tensors import payload_bytes


class StepFailed(RuntimeError):
    """The cloud refused or aborted the step. `code` is the gRPC status; the session stays usable for a retry."""

    def __init__(self, code, details: str):
        super().__init__(f"{code.name if code else 'ERROR'}: {details}")
        self.code, self.details = code, details


@dataclass
class Traffic:
    """Bytes of one step. wire = serialized gRPC messages; payload = raw tensor bytes inside them."""
    bytes_up: int = 0
    bytes_down: int = 0
    payload_up: int = 0
    payload_down: int = 0
    messages_up: int = 0
    messages_down: int = 0
    cloud_seconds: float = 0.0
    wait_seconds: float = 0.0  # time blocked waiting for the cloud (network + cloud compute)

    def add(self, other: "Traffic"):
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


def tensor_payload(msg) -> int:
    """Raw tensor bytes in a message (data + int8 scales), found by walking its fields."""
    if isinstance(msg, pb.Tensor):
        return len(msg.data) + len(msg.scale)
    total = 0
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        items = [value] if isinstance(value, Message) else value  # a message, or a repeated field of them
        total += sum(tensor_payload(v) for v in items)
    return total


@dataclass
class LinkConfig:
    address: str
    token: str | None = None
    tls_dir: str | None = None  # folder with ca.pem (and client cert/key for mTLS), from `tandem certs`
    client_name: str | None = None  # which client certificate to present
    timeout: float = 300.0  # seconds one RPC may take
    max_message_mb: int = 256
    retries: int = 6  # a step that fails for a transient reason is run again this many times, with backoff
    backoff: float = 1.0  # seconds before the first retry; doubles each time, up to max_backoff
    max_backoff: float = 30.0


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

    def wait_ready(self, timeout: float = 60.0):
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def open(self, *, fingerprint: str, k: int, m: int, wire_up: int, wire_down: int, lora_targets=(),
             lora_blocks=()) -> pb.OpenSessionReply:
        req = pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION, model_fingerprint=fingerprint,
                                    edge_bottom_blocks=k, edge_top_blocks=m, wire_dtype_up=wire_up,
                                    wire_dtype_down=wire_down, lora_targets=list(lora_targets),
                                    lora_blocks=list(lora_blocks))
        try:
            self.session = self.stub.OpenSession(req, metadata=self.metadata, timeout=self.cfg.timeout)
        except grpc.RpcError as e:
            raise StepFailed(e.code(), e.details()) from None
        return self.session

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

    def stream(self) -> "StepStream":
        return StepStream(self)


class StepStream:
    """One step's bidirectional stream. `send` and `recv(kind)` in protocol order; `close` ends it."""

    def __init__(self, link: CloudLink):
        self.outbox: queue.Queue = queue.Queue()
        self.traffic = Traffic()
        self._responses = link.stub.Step(iter(self.outbox.get, None), metadata=link.metadata,
                                         timeout=link.cfg.timeout)
        self.closed = False

    def send(self, **kind):
        msg = pb.EdgeMessage(**kind)
        self.traffic.bytes_up += wire_size(msg)
        self.traffic.payload_up += tensor_payload(msg)
        self.traffic.messages_up += 1
        self.outbox.put(msg)

    def recv(self, *expect: str):
        t0 = time.perf_counter()
        try:
            msg = next(self._responses)
        except StopIteration:
            raise StepFailed(None, f"the cloud ended the step before sending {expect}") from None
        except grpc.RpcError as e:
            self.close()
            raise StepFailed(e.code(), e.details()) from None
        finally:
            self.traffic.wait_seconds += time.perf_counter() - t0
        self.traffic.bytes_down += wire_size(msg)
        self.traffic.payload_down += tensor_payload(msg)
        self.traffic.messages_down += 1
        kind = msg.WhichOneof("kind")
        if kind not in expect:
            self.close()
            raise StepFailed(None, f"expected {expect} from the cloud, got {kind}")
        inner = getattr(msg, kind)
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


__all__ = ["CloudLink", "LinkConfig", "StepStream", "StepFailed", "Traffic", "payload_bytes", "tensor_payload"]
