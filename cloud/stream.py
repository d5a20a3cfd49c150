"""The cloud's half of one `Step` stream: ordered receive with a timeout, send, byte counts, and the LoRA exchange.

Every message in either direction goes through `protocol.step.StepProtocol`, which knows the step's order and
counts its bytes; this module adds the transport and the encoding of the DLoRA exchange with the session's wire
dtypes. The RPC runs on grpc.aio's event loop; a step's compute runs in a worker thread and reaches the stream
through `recv` / `send`, which hand the read or write to the loop and wait for it (bounded by the step timeout).
"""
from __future__ import annotations

import asyncio
import time

import grpc
import torch

from cloud.sessions import CloudError, Session
from protocol import pb
from protocol.step import DOWN, UP, ProtocolError, StepProtocol
from protocol.tensors import WireError, decode, encode


class Malformed:
    """What the service's deserializer yields for bytes that are not a valid message (answered INVALID_ARGUMENT)."""

    def __init__(self, what: str, error: Exception):
        self.message = f"undecodable {what}: {type(error).__name__}"


class CloudStream:
    def __init__(self, context, loop: asyncio.AbstractEventLoop, timeout: float, capture=None):
        self.context, self.loop = context, loop
        self.timeout = timeout
        self.capture = capture  # privacy/audit/capture.Capture when the operator asked for one (--capture-dir)
        self.step_ref: tuple[str, int] | None = None  # (session id, step) once `bind` checked the session
        self.protocol = StepProtocol()  # its LoRA groups are bound once the session is known
        self.session: Session | None = None
        self._begin = None  # the step's begin, held back from the capture until `bind`
        self.wait_seconds = 0.0  # time blocked on the edge (its DLoRA replies): not cloud compute

    # ---- on the event loop --------------------------------------------------------------------------------------
    async def read(self, timeout: float | None = None):
        """The next edge message, checked against the step's order; returns (kind, inner message)."""
        want = self.protocol.next()
        try:
            msg = await asyncio.wait_for(self.context.read(), timeout or self.timeout)
        except asyncio.TimeoutError:
            raise CloudError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"no {want} from the edge within {timeout or self.timeout}s") from None
        if msg is grpc.aio.EOF:
            raise CloudError(grpc.StatusCode.CANCELLED, f"the edge closed the stream before sending {want}")
        if isinstance(msg, Malformed):
            raise CloudError(grpc.StatusCode.INVALID_ARGUMENT, msg.message)
        if msg.WhichOneof("kind") is None:  # empty, or a kind this protocol does not know: malformed, not out of order
            raise CloudError(grpc.StatusCode.INVALID_ARGUMENT, f"an EdgeMessage of no known kind (expected {want})")
        try:
            kind, inner = self.protocol.observe(msg)
        except ProtocolError as e:
            raise CloudError(e.code, e.message) from None
        if kind == "begin":  # captured by `bind`, once the session is known to be the caller's
            self._begin = msg
        else:
            self._capture(UP, msg)
        return kind, inner

    def bind(self, session: Session) -> None:
        """The step's session, checked: its LoRA groups fix the step's plan; the capture starts with its begin."""
        self.session = session
        self.protocol.bind(session.groups)
        if self._begin is not None:
            self.step_ref = (session.id, self._begin.begin.step)
            self._capture(UP, self._begin)

    def _capture(self, direction: str, msg) -> None:
        if self.capture is not None and self.step_ref is not None:
            self.capture.record(*self.step_ref, direction, msg)

    # ---- from the compute thread --------------------------------------------------------------------------------
    def _on_loop(self, coro, what: str):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout + 5)
        except CloudError:
            raise
        except Exception as e:  # the RPC ended (edge gone, server stopping) while we waited on it
            future.cancel()
            raise CloudError(grpc.StatusCode.CANCELLED, f"the stream ended during {what}: {type(e).__name__}") from None

    def recv(self):
        t0 = time.perf_counter()
        try:
            return self._on_loop(self.read(), f"the wait for {self.protocol.next()}")
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def count(self, msg: pb.CloudMessage) -> None:
        """Check and count a message that the RPC layer sends itself (the step's last, after the session is free)."""
        self.protocol.observe(msg)
        self._capture(DOWN, msg)

    def send(self, msg: pb.CloudMessage) -> None:
        self.count(msg)
        self._on_loop(self.context.write(msg), f"sending {msg.WhichOneof('kind')}")

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
