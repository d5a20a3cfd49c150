"""The gRPC face of the cloud: authentication, the three RPCs, and the server. Thin: sessions live in
cloud/sessions.py, the stream in cloud/stream.py, the compute in cloud/compute.py and cloud/step_runner.py.

Every request is checked before it touches the model; a bad one is refused with a precise gRPC status and the
service goes on serving everyone else:
  UNAUTHENTICATED      missing or unknown token / client certificate; a token and a certificate of two clients
  PERMISSION_DENIED    a session that belongs to another client
  NOT_FOUND            unknown or expired session
  FAILED_PRECONDITION  protocol version or model fingerprint mismatch; messages out of order; a second step at once
  INVALID_ARGUMENT     undecodable bytes; malformed tensors: wrong shape, width, rank, dtype, byte count, NaN/Inf,
                       empty; bad cut or LoRA sites; a LoRA message for the wrong block or group
  RESOURCE_EXHAUSTED   a step that costs more than the cloud accepts (budgets.py), too many sessions (all clients,
                       or one client), too many open streams or step starts per second of one client (gRPC itself
                       refuses messages over the size limit with the same code)
  DEADLINE_EXCEEDED    the edge sent no first message within begin_timeout, or no answer within the step timeout
  CANCELLED            the edge closed the stream in the middle of a step
Client input is quoted in answers and logs only escaped and cut short (`sessions.quote`).

Identity: a bearer token names the client (`tandem tokens`); with mutual TLS (`--require-client-cert`) the client
certificate's common name does. With both, they must name the same client, or the call is UNAUTHENTICATED.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError

from cloud.batching import StepBatcher
from cloud.budgets import ClientBudgets, StepCostLimit
from cloud.compute import CloudSegment
from cloud.sessions import CloudConfig, CloudError, SessionTable, quote
from cloud.step_runner import run_step
from cloud.stream import CloudStream, Malformed
from model.load import fingerprint
from model.segments import cut_of
from model.sites import FAMILY_OF, site_groups
from privacy.security.tokens import AuthError, check_token
from protocol import PROTOCOL_VERSION, pb
from protocol.step import CARRIED_PARAMS, PREFIX_TARGET
from protocol.tensors import WIRE_DTYPES

log = logging.getLogger("tandem.cloud")
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SERVICE = "tandem.v1.Backbone"


class BackboneService:
    """The servicer, on grpc.aio: every RPC is a coroutine on one event loop, so a stream that sends nothing holds no
    thread and the health check never queues behind training; a step's compute runs in `compute_threads` threads."""

    def __init__(self, model, tokens: dict[str, str] | None, config: CloudConfig = CloudConfig(),
                 allow_cert_identity: bool = False):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.segment = CloudSegment(self.model)
        self.family_name = FAMILY_OF[model.config.model_type]
        self.fingerprint = fingerprint(model)
        p = next(model.parameters())
        self.description = (f"{model.config.model_type}, {len(self.segment.blocks)} blocks, hidden "
                            f"{model.config.hidden_size}, {str(p.dtype).removeprefix('torch.')}")
        self.tokens = tokens  # token -> client name; None = clients are named by their TLS certificate
        self.allow_cert_identity = allow_cert_identity
        self.config = config
        self.sessions = SessionTable(config)
        self.budgets = ClientBudgets(config)
        block0 = self.segment.blocks[0]
        self.cost = StepCostLimit(config, sum(p.numel() for p in block0.parameters()), model.config.hidden_size)
        self.compute = futures.ThreadPoolExecutor(config.compute_threads, thread_name_prefix="tandem-step")
        if config.batching not in ("auto", "on", "off"):
            raise ValueError(f"batching must be auto, on or off, got {config.batching!r}")
        batch = config.batching == "on" or (config.batching == "auto" and p.device.type == "cuda")
        self.batcher = StepBatcher(self.segment, config.batch_window, config.batch_max_tokens) if batch else None
        self.capture = None
        if config.capture_dir:  # an audit: loud, and only where the operator points
            from privacy.audit.capture import Capture
            self.capture = Capture(config.capture_dir)
            log.warning("CAPTURE ON: every message of every step is recorded in %s (an audit, not for production)",
                        config.capture_dir)

    def expire_idle(self) -> list[str]:
        return self.sessions.expire_idle()

    def stop(self):
        self.sessions.stop()
        if self.batcher is not None:
            self.batcher.stop()
        self.compute.shutdown(wait=False, cancel_futures=True)

    # ---- identity -----------------------------------------------------------------------------------------------
    def _client(self, context) -> str:
        """The calling client's name, from its client certificate (mutual TLS) or its bearer token. With both, they
        must name the same client."""
        cert = None
        if self.allow_cert_identity:
            from privacy.security.certs import peer_client_name
            cert = peer_client_name(context)
        if self.tokens is None:
            if cert:
                return cert
            raise CloudError(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        try:
            name = check_token(context.invocation_metadata(), self.tokens)
        except AuthError as e:
            raise CloudError(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None
        if cert and cert != name:
            raise CloudError(grpc.StatusCode.UNAUTHENTICATED, f"the token is {quote(name)}'s but the client "
                             f"certificate is {quote(cert)}'s: a client must present its own token and certificate")
        return name

    # ---- RPCs ---------------------------------------------------------------------------------------------------
    async def OpenSession(self, request, context):
        try:
            if isinstance(request, Malformed):
                raise CloudError(INVALID, request.message)
            client = self._client(context)
            # off the event loop: deduplicating a large request must not delay the health check or other clients
            session_fields = await asyncio.get_running_loop().run_in_executor(None, self._session_fields, request)
            sess = self.sessions.open(client, **session_fields)
        except CloudError as e:
            await context.abort(e.code, e.message)
        log.info("session %s opened by %s: cut %s, LoRA blocks %d%s", sess.id, quote(client), sess.cut,
                 len(sess.lora_blocks), f" (carried {sess.carried})" if sess.carried else "")
        if self.capture is not None:
            self.capture.session_opened(sess.id, dict(
                k=request.edge_bottom_blocks, m=request.edge_top_blocks, lora_targets=sess.targets,
                lora_blocks=sess.lora_blocks, carried=bool(sess.carried), carried_method=sess.carried,
                lora_rank=sess.lora_rank,
                lora_scaling=sess.lora_scaling, feedforward=list(sess.feedforward), wire_up=sess.wire_up,
                wire_down=sess.wire_down, prefix_tokens=sess.prefix_tokens))
        return pb.OpenSessionReply(session_id=sess.id, first_cloud_block=sess.cut.cloud.start,
                                   last_cloud_block=sess.cut.cloud.stop - 1, hidden_size=self.model.config.hidden_size,
                                   max_tokens_per_step=self.config.max_tokens_per_step,
                                   ttl_seconds=int(self.config.ttl_seconds))

    def _session_fields(self, request) -> dict:
        if request.protocol_version != PROTOCOL_VERSION:
            raise CloudError(grpc.StatusCode.FAILED_PRECONDITION, f"protocol version {request.protocol_version} is "
                             f"not supported: this cloud speaks version {PROTOCOL_VERSION}; upgrade the edge client")
        if request.model_fingerprint != self.fingerprint:
            raise CloudError(grpc.StatusCode.FAILED_PRECONDITION, f"edge model {quote(request.model_fingerprint)} is "
                             f"not this cloud's backbone {self.fingerprint} ({self.description}): the edge must load "
                             "the same model with the same dtype")
        try:
            cut = cut_of(self.model, request.edge_bottom_blocks, request.edge_top_blocks)
        except ValueError as e:
            raise CloudError(INVALID, str(e)) from None
        for d in (request.wire_dtype_up, request.wire_dtype_down):
            if d not in WIRE_DTYPES.values():
                raise CloudError(INVALID, f"wire dtype {d} is not one of {sorted(WIRE_DTYPES)}")
        targets, blocks = list(dict.fromkeys(request.lora_targets)), sorted(set(request.lora_blocks))
        prefix = request.carried_lora and request.carried_method == "prefix"
        if prefix:  # one prefix per block, no linear sites: its target is the block's prefix
            if targets:
                raise CloudError(INVALID, "a carried prefix session names no lora_targets (a block's prefix is its site)")
            targets = [PREFIX_TARGET]
        try:
            groups = () if prefix else site_groups(self.family_name, targets)
        except ValueError as e:
            raise CloudError(INVALID, str(e)[:200]) from None
        if blocks and not targets:
            raise CloudError(INVALID, "LoRA blocks given without LoRA targets")
        if any(b not in cut.cloud for b in blocks):
            raise CloudError(INVALID, f"LoRA blocks are not all cloud blocks {cut.cloud.start}..{cut.cloud.stop - 1}")
        carried = self._carried_fields(request, blocks, targets)
        return dict(cut=cut, wire_up=request.wire_dtype_up, wire_down=request.wire_dtype_down, targets=targets,
                    lora_blocks=blocks, groups=groups if blocks and not carried["carried"] else (),
                    branch_on_output=request.branch_on_output and bool(blocks) and not carried["carried"], **carried)

    def _carried_fields(self, request, blocks: list[int], targets: list[str]) -> dict:
        """The carried method's session fields, checked: the method, LoRA's rank and scaling, (IA)³'s feed-forward
        targets."""
        method = request.carried_method or "lora"
        if request.feedforward_targets and not (request.carried_lora and method == "ia3"):
            raise CloudError(INVALID, "feedforward_targets belong to carried ia3 sessions only")
        if request.prefix_tokens and not (request.carried_lora and method == "prefix"):
            raise CloudError(INVALID, "prefix_tokens belong to carried prefix sessions only")
        if not (request.carried_lora and blocks):
            return dict(carried="")
        if method not in CARRIED_PARAMS:
            raise CloudError(INVALID, f"carried method {quote(method)} is not one of {', '.join(CARRIED_PARAMS)}")
        if method == "ia3":
            feedforward = tuple(dict.fromkeys(request.feedforward_targets))
            if stray := [t for t in feedforward if t not in targets]:
                raise CloudError(INVALID, f"feed-forward targets {quote(','.join(stray))} are not lora_targets")
            return dict(carried=method, feedforward=feedforward)
        if method == "prefix":
            return dict(carried=method, prefix_tokens=self._prefix_tokens(request.prefix_tokens))
        narrowest = min(min(self.segment.site_dims(b, t)) for b in blocks for t in targets)
        if not 1 <= request.lora_rank <= narrowest:
            raise CloudError(INVALID, f"carried LoRA rank {request.lora_rank} is not within 1..{narrowest}")
        if not math.isfinite(request.lora_scaling) or not 0 < abs(request.lora_scaling) <= 1e4:
            raise CloudError(INVALID, f"carried LoRA scaling {request.lora_scaling} is not finite, nonzero "
                             "and at most 1e4 in size")
        return dict(carried=method, lora_rank=request.lora_rank, lora_scaling=request.lora_scaling)

    def _prefix_tokens(self, V: int) -> int:
        """A carried prefix's V, checked against the cloud's limit and its model (full attention in every layer)."""
        from model.tuners.prefix import check_prefix_family
        limit = self.config.max_prefix_tokens
        if not 1 <= V <= limit:
            raise CloudError(INVALID, f"prefix_tokens {V} is not within 1..{limit} (this cloud's max_prefix_tokens)")
        try:
            check_prefix_family(self.model)
        except ValueError as e:
            raise CloudError(INVALID, str(e)) from None
        return V

    async def CloseSession(self, request, context):
        try:
            if isinstance(request, Malformed):
                raise CloudError(INVALID, request.message)
            sess = self.sessions.get(request.session_id, self._client(context))
        except CloudError as e:
            await context.abort(e.code, e.message)
        self.sessions.close(sess)
        return pb.SessionStats(session_id=sess.id, steps=sess.steps, bytes_received=sess.bytes_received,
                               bytes_sent=sess.bytes_sent, cloud_compute_seconds=sess.cloud_seconds)

    async def Step(self, request_iterator, context):
        try:
            client = self._client(context)
            with self.budgets.stream(client):
                stream = CloudStream(context, asyncio.get_running_loop(), self.config.step_timeout, self.capture)
                _, begin = await stream.read(self.config.begin_timeout)
                sess = self.sessions.get(begin.session_id, client)
                self.budgets.take_step(client)
                async with self.budgets.compute_slot(client):
                    self.sessions.acquire(sess)
                    stream.bind(sess)  # the step's plan now knows the session's LoRA groups
                    last = await asyncio.get_running_loop().run_in_executor(self.compute, self._run, sess, begin,
                                                                            stream)
            await context.write(last)
        except CloudError as e:
            await context.abort(e.code, e.message)

    def _run(self, sess, begin, stream: CloudStream):
        """The step's compute, in a worker thread; frees the session (before the edge can see the step's end, so
        its next step never finds it busy) whatever happens."""
        last, seconds, error = None, 0.0, None
        try:
            last, seconds = run_step(self.segment, sess, begin, stream, self.cost, self.batcher)
        except CloudError as e:
            error = e
        except Exception as e:  # a bug must not take the service down
            log.exception("step failed")
            error = CloudError(grpc.StatusCode.INTERNAL, f"cloud step failed: {type(e).__name__}")
        t = stream.protocol.traffic
        self.sessions.release(sess, ok=error is None, bytes_in=t.bytes_up, bytes_out=t.bytes_down, seconds=seconds)
        if error is not None:
            log.warning("session %s step refused: %s %s", sess.id, error.code.name, error.message)
            raise error
        return last


def _safe(parse, what: str):
    """A request deserializer that turns undecodable bytes into `Malformed` (answered INVALID_ARGUMENT) instead of
    an exception (which gRPC answers INTERNAL, with a traceback in the log)."""
    def deserialize(data: bytes):
        try:
            return parse(data)
        except (DecodeError, ValueError, RuntimeError) as e:
            return Malformed(what, e)
    return deserialize


def _handlers(service: BackboneService) -> grpc.GenericRpcHandler:
    out = lambda m: m.SerializeToString()  # noqa: E731
    return grpc.method_handlers_generic_handler(SERVICE, {
        "OpenSession": grpc.unary_unary_rpc_method_handler(
            service.OpenSession, _safe(pb.OpenSessionRequest.FromString, "OpenSessionRequest"), out),
        "CloseSession": grpc.unary_unary_rpc_method_handler(
            service.CloseSession, _safe(pb.SessionRef.FromString, "SessionRef"), out),
        "Step": grpc.stream_stream_rpc_method_handler(
            service.Step, _safe(pb.EdgeMessage.FromString, "EdgeMessage"), out)})


class Server:
    """A grpc.aio server on its own event-loop thread, driven from ordinary code: start(), stop(grace).wait()."""

    def __init__(self, service: BackboneService, address: str, credentials, max_message_mb: int):
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from grpc_health.v1._async import HealthServicer
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="tandem-cloud-loop")
        self._thread.start()
        limit = max_message_mb * 1024 * 1024

        async def build():
            server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                              ("grpc.max_send_message_length", limit)])
            server.add_generic_rpc_handlers((_handlers(service),))
            health = HealthServicer()
            for name in ("", SERVICE):
                await health.set(name, health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(health, server)
            port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
            return server, health, port

        self._server, self._health, self.port = self._call(build())
        self.health = _Health(self)

    def _call(self, coro, timeout: float | None = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self):
        self._call(self._server.start())

    def stop(self, grace: float | None) -> "Server":
        """Stop serving (running RPCs get `grace` seconds) and end the loop; `.wait()` joins its thread."""
        self._call(self._server.stop(grace), timeout=None)
        self.loop.call_soon_threadsafe(self.loop.stop)
        return self

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


class _Health:
    def __init__(self, server: Server):
        self._server = server

    def enter_graceful_shutdown(self):
        self._server._call(self._server._health.enter_graceful_shutdown())


def make_server(service: BackboneService, address: str, *, credentials=None,
                max_message_mb: int = 256) -> tuple[Server, int]:
    """A gRPC server for `service` at host:port (port 0 picks a free one). Returns (server, port)."""
    server = Server(service, address, credentials, max_message_mb)
    return server, server.port
