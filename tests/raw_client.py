"""A raw client of the cloud for tests/test_limits.py: one channel and token, steps and held streams that return
statuses, and waits on the cloud's stream counts."""
from __future__ import annotations

import threading
import time

import grpc
import torch

from model.load import fingerprint
from protocol import AUTH_HEADER, PROTOCOL_VERSION, pb, pb_grpc
from protocol.tensors import encode
from tests.conftest import TOKENS

H = 64  # tiny-llama hidden size


class Client:
    """A raw client of the cloud: one channel, its token, and small helpers that return statuses."""

    def __init__(self, cloud, tiny, name: str):
        self.channel = grpc.insecure_channel(cloud.address, options=[("grpc.max_send_message_length", 64 << 20),
                                                                     ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.BackboneStub(self.channel)
        self.md = [(AUTH_HEADER, f"Bearer {TOKENS[name]}")]
        self.fingerprint = fingerprint(tiny.model)

    def request(self, **kw) -> pb.OpenSessionRequest:
        req = dict(protocol_version=PROTOCOL_VERSION, model_fingerprint=self.fingerprint, edge_bottom_blocks=1,
                   edge_top_blocks=1, wire_dtype_up=pb.FLOAT32, wire_dtype_down=pb.FLOAT32)
        req.update(kw)
        return pb.OpenSessionRequest(**req)

    def open(self, **kw) -> str:
        return self.stub.OpenSession(self.request(**kw), metadata=self.md, timeout=30).session_id

    def open_status(self, **kw) -> tuple[grpc.StatusCode, str]:
        try:
            self.open(**kw)
        except grpc.RpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""

    def step(self, sid: str, batch: int = 2, seq: int = 5, **kw) -> tuple[grpc.StatusCode, str]:
        """One forward-only step; its status and details."""
        try:
            replies = list(self.stub.Step(iter([begin(sid, batch, seq, **kw)]), metadata=self.md, timeout=30))
        except grpc.RpcError as e:
            return e.code(), e.details()
        assert [r.WhichOneof("kind") for r in replies] == ["hidden"]
        return grpc.StatusCode.OK, ""

    def held_stream(self, gate: threading.Event, *first: pb.EdgeMessage):
        """A Step stream that sends `first` (nothing: a silent stream) and then nothing more until `gate` is set.
        Returns the response iterator (iterate it to see how the cloud ended the stream)."""
        def requests():
            yield from first
            gate.wait(300)
        return self.stub.Step(requests(), metadata=self.md, timeout=300)


def begin(sid, batch=2, seq=5, train=False, active_blocks=()):
    return pb.EdgeMessage(begin=pb.Begin(session_id=sid, train=train, hidden=encode(torch.randn(batch, seq, H)),
                                         attention_mask=encode(torch.ones(batch, seq, dtype=torch.bool), pb.BOOL),
                                         active_blocks=active_blocks))


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def open_streams(cloud, client: str) -> int:
    return cloud.service.budgets._streams.get(client, 0)


def ended_with(responses) -> grpc.StatusCode:
    try:
        for _ in responses:
            pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK
