"""The cloud's half of one `Step` stream: ordered receive with a timeout, send, byte counts, and the LoRA exchange.

Every message in either direction goes through `protocol.step.StepProtocol`, which knows the step's order and
counts its bytes; this module adds the transport (a reader thread that turns the request iterator into a queue, so
that a silent edge times out) and the encoding of the DLoRA exchange with the session's wire dtypes.
"""
from __future__ import annotations

import queue
import threading
import time

import grpc
import torch

from cloud.sessions import CloudError, Session
from protocol import pb
from protocol.step import ProtocolError, StepProtocol
from protocol.tensors import WireError, decode, encode

_CLOSED = object()


class CloudStream:
    def __init__(self, requests, timeout: float):
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.timeout = timeout
        self.protocol = StepProtocol()  # its LoRA groups are bound once the session is known
        self.session: Session | None = None
        self.wait_seconds = 0.0  # time blocked on the edge (its DLoRA replies): not cloud compute
        threading.Thread(target=self._read, args=(requests,), daemon=True, name="tandem-step-reader").start()

    def _read(self, requests):
        try:
            for msg in requests:
                self.inbox.put(msg)
        except Exception:  # the peer cancelled the stream
            pass
        self.inbox.put(_CLOSED)

    # ---- ordered transport --------------------------------------------------------------------------------------
    def recv(self, timeout: float | None = None):
        """The next edge message, checked against the step's order; returns (kind, inner message)."""
        t0 = time.perf_counter()
        want = self.protocol.next()
        try:
            msg = self.inbox.get(timeout=timeout or self.timeout)
        except queue.Empty:
            raise CloudError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"no {want} from the edge within {timeout or self.timeout}s") from None
        finally:
            self.wait_seconds += time.perf_counter() - t0
        if msg is _CLOSED:
            raise CloudError(grpc.StatusCode.CANCELLED, f"the edge closed the stream before sending {want}")
        try:
            return self.protocol.observe(msg)
        except ProtocolError as e:
            raise CloudError(e.code, e.message) from None

    def send(self, msg: pb.CloudMessage) -> None:
        self.protocol.observe(msg)
        self.outbox.put(msg)

    def end(self) -> None:
        """Wake the RPC's response generator: the edge went away (the step's thread then fails on its own)."""
        self.outbox.put(None)

    def finish(self, last: pb.CloudMessage | None) -> None:
        """Send the step's last message (already counted by `protocol.observe`), then end the response stream."""
        if last is not None:
            self.outbox.put(last)
        self.outbox.put(None)

    # ---- decoding with the session's settings -------------------------------------------------------------------
    def decode(self, t: pb.Tensor, shape, like: torch.Tensor | None = None, what: str = "tensor", **kw):
        s = self.session
        try:
            return decode(t, shape=shape, dtypes=kw.pop("dtypes", [s.wire_up]),
                          out_dtype=like.dtype if like is not None else torch.float32,
                          device=like.device if like is not None else "cpu", what=what, **kw)
        except WireError as e:
            raise CloudError(e.code, str(e)) from None

    # ---- the DLoRA exchange (cloud/compute.LoRAExchange) --------------------------------------------------------
    def outputs(self, block: int, group: str, x: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
        self.send(pb.CloudMessage(lora_request=pb.LoraRequest(block=block, group=group,
                                                              x=encode(x, self.session.wire_down))))
        _, reply = self.recv()
        if len(reply.outputs) != len(widths):
            raise CloudError(grpc.StatusCode.INVALID_ARGUMENT, f"lora_reply {block}/{group} has "
                             f"{len(reply.outputs)} outputs; expected {len(widths)}")
        return [self.decode(t, [*x.shape[:-1], w], x, f"lora output {block}/{group}")
                for t, w in zip(reply.outputs, widths)]

    def input_grad(self, block: int, group: str, grads: list[torch.Tensor], x_shape) -> torch.Tensor:
        self.send(pb.CloudMessage(lora_grad_request=pb.LoraGradRequest(
            block=block, group=group, grads=[encode(g, self.session.wire_down) for g in grads])))
        _, reply = self.recv()
        return self.decode(reply.grad, list(x_shape), grads[0], f"lora input grad {block}/{group}")
