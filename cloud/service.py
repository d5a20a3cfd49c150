"""The cloud backbone service: one frozen backbone, many concurrent edge sessions.

A session is a small record (owner, cut, wire dtypes, DLoRA sites) with a TTL. A training step is one `Step`
stream: the autograd graph of the cloud segment lives only inside that stream, from the forward until the edge's
gradient arrives, and is dropped when the stream ends, fails or times out. Nothing about the edge's data is kept.

Every request is checked before it touches the model; a bad one is refused with a precise gRPC status and the
service goes on serving everyone else:
  UNAUTHENTICATED      missing or unknown token / client certificate
  PERMISSION_DENIED    a session that belongs to another client
  NOT_FOUND            unknown or expired session
  FAILED_PRECONDITION  protocol version or model fingerprint mismatch; messages out of order
  INVALID_ARGUMENT     malformed tensors: wrong shape, dtype, byte count, NaN/Inf; bad cut
  RESOURCE_EXHAUSTED   more tokens than the cloud accepts per step, too many sessions (gRPC itself refuses
                       messages over the size limit with the same code)
  DEADLINE_EXCEEDED    the edge did not answer within the step timeout
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch

from model.load import fingerprint
from model.segments import BlockRun, Cut, cut_of, family_of
from privacy.security.tokens import AuthError, check_token
from protocol import PROTOCOL_VERSION, pb, pb_grpc, wire_size
from protocol.tensors import WIRE_DTYPES, WireError, decode, encode

log = logging.getLogger("tandem.cloud")
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Session:
    id: str
    owner: str
    cut: Cut
    wire_up: int
    wire_down: int
    targets: list[str]
    lora_blocks: list[int]
    last_used: float = field(default_factory=time.monotonic)
    steps: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    cloud_seconds: float = 0.0
    busy: bool = False


@dataclass
class CloudConfig:
    max_tokens_per_step: int = 16384
    max_sessions: int = 64
    ttl_seconds: float = 600.0
    step_timeout: float = 120.0  # seconds the cloud waits for any one edge reply inside a step


class _StepAbort(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


class _Channel:
    """The cloud's side of one Step stream: ordered receive with timeout, send, and byte counting."""

    def __init__(self, requests, timeout: float):
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.timeout = timeout
        self.bytes_in = self.bytes_out = 0
        self.wait_seconds = 0.0  # time blocked on the edge (DLoRA replies): not cloud compute
        threading.Thread(target=self._pump, args=(requests,), daemon=True).start()

    def _pump(self, requests):
        try:
            for msg in requests:
                self.inbox.put(msg)
        except Exception as e:  # stream cancelled by the peer
            self.inbox.put(e)
        self.inbox.put(None)

    def recv(self, expect: str):
        t0 = time.perf_counter()
        try:
            msg = self.inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise _StepAbort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no {expect} from the edge within {self.timeout}s")
        finally:
            self.wait_seconds += time.perf_counter() - t0
        if msg is None or isinstance(msg, Exception):
            raise _StepAbort(grpc.StatusCode.CANCELLED, f"the edge closed the stream before sending {expect}")
        self.bytes_in += wire_size(msg)
        if msg.WhichOneof("kind") != expect:
            raise _StepAbort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"expected {expect}, got {msg.WhichOneof('kind')} (messages out of order)")
        return getattr(msg, expect)

    def send(self, msg: pb.CloudMessage):
        self.bytes_out += wire_size(msg)
        self.outbox.put(msg)


class _RemoteLoRA(torch.autograd.Function):
    """Forward: send the LoRA input of one block's input group to the edge, get the LoRA outputs back.
    Backward: send the output gradients, get the input gradient back. The LoRA weights never come here."""

    @staticmethod
    def forward(ctx, x, chan, sess, block, group, group_targets):
        ctx.chan, ctx.sess, ctx.block, ctx.group = chan, sess, block, group
        chan.send(pb.CloudMessage(lora_request=pb.LoraRequest(block=block, group=group, x=encode(x, sess.wire_down))))
        reply = chan.recv("lora_reply")
        if (reply.block, reply.group, len(reply.outputs)) != (block, group, len(group_targets)):
            raise _StepAbort(INVALID, f"lora_reply for {reply.block}/{reply.group} with {len(reply.outputs)} outputs;"
                                      f" expected {block}/{group} with {len(group_targets)}")
        outs = []
        for t, msg in zip(group_targets, reply.outputs):
            outs.append(decode(msg, shape=[*x.shape[:-1], None], dtypes=[sess.wire_up], out_dtype=x.dtype,
                               device=x.device, what=f"lora output {block}/{t}"))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.chan.send(pb.CloudMessage(lora_grad_request=pb.LoraGradRequest(
            block=ctx.block, group=ctx.group, grads=[encode(g, ctx.sess.wire_down) for g in grads])))
        reply = ctx.chan.recv("lora_grad_reply")
        if (reply.block, reply.group) != (ctx.block, ctx.group):
            raise _StepAbort(INVALID, f"lora_grad_reply for {reply.block}/{reply.group}, expected {ctx.block}/{ctx.group}")
        g = decode(reply.grad, shape=list(grads[0].shape[:-1]) + [None], dtypes=[ctx.sess.wire_up],
                   out_dtype=grads[0].dtype, device=grads[0].device, what=f"lora input grad {ctx.block}")
        return g, None, None, None, None, None


class BackboneService(pb_grpc.BackboneServicer):
    def __init__(self, model, tokens: dict[str, str] | None, config: CloudConfig = CloudConfig(),
                 allow_cert_identity: bool = False):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.family = family_of(model)
        self.fingerprint = fingerprint(model)
        self.tokens = tokens  # token -> client name; None = clients are named by their TLS certificate
        self.allow_cert_identity = allow_cert_identity
        self.config = config
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device
        self._stop = threading.Event()
        self._local = threading.local()
        self._install_site_hooks()
        threading.Thread(target=self._reap, daemon=True).start()

    # ---- identity and sessions ----------------------------------------------------------------------------------
    def _client(self, context) -> str:
        if self.allow_cert_identity:
            from privacy.security.certs import peer_client_name
            name = peer_client_name(context)
            if name:
                return name
        if self.tokens is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        try:
            return check_token(context.invocation_metadata(), self.tokens)
        except AuthError as e:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

    def _session(self, sid: str, client: str, context) -> Session:
        with self.lock:
            sess = self.sessions.get(sid)
        if sess is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown or expired session {sid!r}")
        if sess.owner != client:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"session {sid!r} belongs to another client")
        return sess

    def _reap(self):
        while not self._stop.wait(min(5.0, self.config.ttl_seconds / 4)):
            self.expire_idle()

    def expire_idle(self) -> list[str]:
        now = time.monotonic()
        with self.lock:
            dead = [s.id for s in self.sessions.values()
                    if not s.busy and now - s.last_used > self.config.ttl_seconds]
            for sid in dead:
                del self.sessions[sid]
        for sid in dead:
            log.info("session %s expired", sid)
        return dead

    def stop(self):
        self._stop.set()

    # ---- RPCs ---------------------------------------------------------------------------------------------------
    def OpenSession(self, request, context):
        client = self._client(context)
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"protocol version {request.protocol_version} is not "
                          f"supported: this cloud speaks version {PROTOCOL_VERSION}; upgrade the edge client")
        if request.model_fingerprint != self.fingerprint:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"edge model {request.model_fingerprint} is not this "
                          f"cloud's backbone {self.fingerprint}")
        try:
            cut = cut_of(self.model, request.edge_bottom_blocks, request.edge_top_blocks)
        except ValueError as e:
            context.abort(INVALID, str(e))
        for d in (request.wire_dtype_up, request.wire_dtype_down):
            if d not in WIRE_DTYPES.values():
                context.abort(INVALID, f"wire dtype {d} is not one of {sorted(WIRE_DTYPES)}")
        targets = list(request.lora_targets)
        blocks = list(request.lora_blocks)
        unknown = [t for t in targets if t not in self.family.input_groups]
        if unknown or (blocks and not targets):
            context.abort(INVALID, f"unknown LoRA targets {unknown}; known: {sorted(self.family.input_groups)}")
        if any(b not in cut.cloud for b in blocks):
            context.abort(INVALID, f"LoRA blocks {blocks} are not all cloud blocks {list(cut.cloud)}")
        with self.lock:
            if len(self.sessions) >= self.config.max_sessions:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.config.max_sessions} sessions already open")
            sess = Session(uuid.uuid4().hex, client, cut, request.wire_dtype_up, request.wire_dtype_down, targets,
                           sorted(set(blocks)))
            self.sessions[sess.id] = sess
        log.info("session %s opened by %s: cut %s, LoRA blocks %d", sess.id, client, cut, len(sess.lora_blocks))
        return pb.OpenSessionReply(session_id=sess.id, first_cloud_block=cut.cloud.start,
                                   last_cloud_block=cut.cloud.stop - 1, hidden_size=self.model.config.hidden_size,
                                   max_tokens_per_step=self.config.max_tokens_per_step,
                                   ttl_seconds=int(self.config.ttl_seconds))

    def CloseSession(self, request, context):
        client = self._client(context)
        sess = self._session(request.session_id, client, context)
        with self.lock:
            self.sessions.pop(sess.id, None)
        return pb.SessionStats(session_id=sess.id, steps=sess.steps, bytes_received=sess.bytes_received,
                               bytes_sent=sess.bytes_sent, cloud_compute_seconds=sess.cloud_seconds)

    def Step(self, request_iterator, context):
        client = self._client(context)
        chan = _Channel(request_iterator, self.config.step_timeout)
        try:
            first = chan.recv("begin")
        except _StepAbort as e:
            context.abort(e.code, e.message)
        sess = self._session(first.session_id, client, context)
        with self.lock:
            if sess.busy:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"session {sess.id} already has a step running")
            sess.busy = True
        result: dict = {}
        threading.Thread(target=self._run_step, args=(sess, first, chan, result), daemon=True).start()
        while True:
            try:
                msg = chan.outbox.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():  # the edge went away; the worker times out and frees the step
                    return
                continue
            if msg is None:
                break
            yield msg
        if "error" in result:
            context.abort(*result["error"])

    # ---- the cloud segment --------------------------------------------------------------------------------------
    def _run_step(self, sess: Session, begin, chan: _Channel, result: dict):
        last = None
        try:
            last = self._compute(sess, begin, chan)
        except (_StepAbort, WireError) as e:
            result["error"] = (e.code, str(e))
        except Exception as e:  # a bug must not take the service down
            log.exception("step failed")
            result["error"] = (grpc.StatusCode.INTERNAL, f"cloud step failed: {type(e).__name__}: {e}")
        if "error" in result:
            log.warning("session %s step refused: %s %s", sess.id, result["error"][0].name, result["error"][1])
        if last is not None:
            chan.bytes_out += wire_size(last)
        # Free the session before the edge can see the end of the step, so its next step never finds it busy.
        with self.lock:
            sess.busy = False
            sess.last_used = time.monotonic()
            sess.steps += "error" not in result
            sess.bytes_received += chan.bytes_in
            sess.bytes_sent += chan.bytes_out
        if last is not None:
            chan.outbox.put(last)
        chan.outbox.put(None)

    def _compute(self, sess: Session, begin, chan: _Channel) -> pb.CloudMessage:
        """Run the step; returns the last message (Hidden or InputGrad), sent once the session is released."""
        H = self.model.config.hidden_size
        dt = next(self.model.parameters()).dtype
        try:
            hidden = decode(begin.hidden, shape=[None, None, H], dtypes=[sess.wire_up], out_dtype=dt,
                            device=self.device, what="hidden", max_elements=self.config.max_tokens_per_step * H)
            B, T, _ = hidden.shape
            mask = decode(begin.attention_mask, shape=[B, T], dtypes=[pb.BOOL, pb.INT64], device=self.device,
                          what="attention_mask").long()
        except WireError as e:
            raise _StepAbort(e.code, str(e))
        active = set(begin.active_blocks)  # empty: no LoRA site runs this step (Kill & Revive may kill all)
        if not active <= set(sess.lora_blocks):
            raise _StepAbort(INVALID, f"active blocks {sorted(active - set(sess.lora_blocks))} have no LoRA sites")
        self._local.step = {"sess": sess, "chan": chan, "active": active, "pending": {}}
        t0, w0 = time.perf_counter(), chan.wait_seconds
        try:
            with torch.set_grad_enabled(begin.train):
                x = hidden.requires_grad_(begin.train)
                out = BlockRun(self.model, sess.cut.cloud)(x, mask)
        finally:
            self._local.step = None
        fwd = time.perf_counter() - t0 - (chan.wait_seconds - w0)
        hidden_msg = pb.CloudMessage(hidden=pb.Hidden(hidden=encode(out, sess.wire_down), cloud_seconds=fwd))
        sess.cloud_seconds += fwd
        if not begin.train:
            return hidden_msg
        chan.send(hidden_msg)
        grad_msg = chan.recv("output_grad")
        try:
            grad = decode(grad_msg.grad, shape=list(out.shape), dtypes=[sess.wire_up], out_dtype=out.dtype,
                          device=self.device, what="output grad")
        except WireError as e:
            raise _StepAbort(e.code, str(e))
        t0, w0 = time.perf_counter(), chan.wait_seconds
        torch.autograd.backward(out, grad)
        bwd = time.perf_counter() - t0 - (chan.wait_seconds - w0)
        sess.cloud_seconds += bwd
        return pb.CloudMessage(input_grad=pb.InputGrad(grad=encode(x.grad, sess.wire_down), cloud_seconds=bwd))

    def _install_site_hooks(self):
        """One permanent hook per linear layer that can carry LoRA. Many steps run at once in different threads,
        so a hook acts only for the step running in its own thread (thread-local), and only at that session's
        active sites. The first target of an input group asks the edge for the whole group's outputs; each target
        then adds its own: q and v (same input) cost one round trip per block."""
        for b, block in enumerate(self.family.blocks(self.model)):
            for t in self.family.input_groups:
                try:
                    lin = self.family.target_module(block, t)
                except KeyError:
                    continue
                lin.register_forward_hook(lambda mod, inp, out, b=b, t=t: self._site_hook(b, t, inp[0], out))

    def _site_hook(self, block: int, target: str, x, out):
        step = getattr(self._local, "step", None)
        if step is None or block not in step["active"] or target not in step["sess"].targets:
            return None
        sess, group = step["sess"], self.family.input_groups[target]
        pending = step["pending"]
        if (block, target) not in pending:
            group_targets = [t for t in sess.targets if self.family.input_groups[t] == group]
            outs = _RemoteLoRA.apply(x, step["chan"], sess, block, group, group_targets)
            pending.update({(block, t): o for t, o in zip(group_targets, outs)})
        return out + pending.pop((block, target))


def make_server(service: BackboneService, address: str, *, credentials=None, max_workers: int = 32,
                max_message_mb: int = 256) -> tuple[grpc.Server, int]:
    """A gRPC server for `service` at host:port (port 0 picks a free one). Returns (server, port)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    limit = max_message_mb * 1024 * 1024
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=[("grpc.max_receive_message_length", limit),
                                  ("grpc.max_send_message_length", limit)])
    pb_grpc.add_BackboneServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("tandem.v1.Backbone", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.health = health_servicer
    return server, port
