"""The gRPC face of the cloud: authentication, the three RPCs, and the server. Thin: sessions live in
cloud/sessions.py, the stream in cloud/stream.py, the compute in cloud/compute.py and cloud/step_runner.py.

Every request is checked before it touches the model; a bad one is refused with a precise gRPC status and the
service goes on serving everyone else:
  UNAUTHENTICATED      missing or unknown token / client certificate
  PERMISSION_DENIED    a session that belongs to another client
  NOT_FOUND            unknown or expired session
  FAILED_PRECONDITION  protocol version or model fingerprint mismatch; messages out of order
  INVALID_ARGUMENT     malformed tensors: wrong shape, dtype, byte count, NaN/Inf, empty; bad cut or LoRA sites
  RESOURCE_EXHAUSTED   more tokens than the cloud accepts per step, too many sessions (gRPC itself refuses
                       messages over the size limit with the same code)
  DEADLINE_EXCEEDED    the edge did not answer within the step timeout
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc

from cloud.compute import CloudSegment
from cloud.sessions import CloudConfig, CloudError, SessionTable, quote
from cloud.step_runner import run_step
from cloud.stream import CloudStream
from model.load import fingerprint
from model.segments import cut_of
from model.sites import FAMILY_OF, site_groups
from privacy.security.tokens import AuthError, check_token
from protocol import PROTOCOL_VERSION, pb, pb_grpc
from protocol.tensors import WIRE_DTYPES

log = logging.getLogger("tandem.cloud")
INVALID = grpc.StatusCode.INVALID_ARGUMENT


class BackboneService(pb_grpc.BackboneServicer):
    def __init__(self, model, tokens: dict[str, str] | None, config: CloudConfig = CloudConfig(),
                 allow_cert_identity: bool = False):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.segment = CloudSegment(self.model)
        self.family_name = FAMILY_OF[model.config.model_type]
        self.fingerprint = fingerprint(model)
        self.tokens = tokens  # token -> client name; None = clients are named by their TLS certificate
        self.allow_cert_identity = allow_cert_identity
        self.config = config
        self.sessions = SessionTable(config)

    def expire_idle(self) -> list[str]:
        return self.sessions.expire_idle()

    def stop(self):
        self.sessions.stop()

    # ---- identity -----------------------------------------------------------------------------------------------
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

    # ---- RPCs ---------------------------------------------------------------------------------------------------
    def OpenSession(self, request, context):
        client = self._client(context)
        try:
            sess = self.sessions.open(client, **self._session_fields(request))
        except CloudError as e:
            context.abort(e.code, e.message)
        log.info("session %s opened by %s: cut %s, LoRA blocks %d", sess.id, quote(client), sess.cut,
                 len(sess.lora_blocks))
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
                             f"not this cloud's backbone {self.fingerprint}")
        try:
            cut = cut_of(self.model, request.edge_bottom_blocks, request.edge_top_blocks)
        except ValueError as e:
            raise CloudError(INVALID, str(e)) from None
        for d in (request.wire_dtype_up, request.wire_dtype_down):
            if d not in WIRE_DTYPES.values():
                raise CloudError(INVALID, f"wire dtype {d} is not one of {sorted(WIRE_DTYPES)}")
        targets, blocks = list(dict.fromkeys(request.lora_targets)), sorted(set(request.lora_blocks))
        try:
            groups = site_groups(self.family_name, targets)
        except ValueError as e:
            raise CloudError(INVALID, str(e)[:200]) from None
        if blocks and not targets:
            raise CloudError(INVALID, "LoRA blocks given without LoRA targets")
        if any(b not in cut.cloud for b in blocks):
            raise CloudError(INVALID, f"LoRA blocks are not all cloud blocks {cut.cloud.start}..{cut.cloud.stop - 1}")
        return dict(cut=cut, wire_up=request.wire_dtype_up, wire_down=request.wire_dtype_down, targets=targets,
                    lora_blocks=blocks, groups=groups if blocks else ())

    def CloseSession(self, request, context):
        client = self._client(context)
        try:
            sess = self.sessions.get(request.session_id, client)
        except CloudError as e:
            context.abort(e.code, e.message)
        self.sessions.close(sess)
        return pb.SessionStats(session_id=sess.id, steps=sess.steps, bytes_received=sess.bytes_received,
                               bytes_sent=sess.bytes_sent, cloud_compute_seconds=sess.cloud_seconds)

    def Step(self, request_iterator, context):
        client = self._client(context)
        stream = CloudStream(request_iterator, self.config.step_timeout)
        context.add_callback(stream.end)  # the edge went away: wake the response generator at once
        try:
            _, begin = stream.recv()
            sess = self.sessions.get(begin.session_id, client)
            self.sessions.acquire(sess)
        except CloudError as e:
            context.abort(e.code, e.message)
        stream.session = sess
        stream.protocol.bind(sess.groups)  # the step's plan now knows the session's LoRA groups
        result: dict = {}
        threading.Thread(target=self._run, args=(sess, begin, stream, result), daemon=True,
                         name="tandem-step").start()
        for msg in iter(stream.outbox.get, None):
            yield msg
        if "error" in result:
            context.abort(*result["error"])

    def _run(self, sess, begin, stream: CloudStream, result: dict):
        last, seconds = None, 0.0
        try:
            last, seconds = run_step(self.segment, sess, begin, stream, self.config.max_tokens_per_step)
        except CloudError as e:
            result["error"] = (e.code, e.message)
        except Exception as e:  # a bug must not take the service down
            log.exception("step failed")
            result["error"] = (grpc.StatusCode.INTERNAL, f"cloud step failed: {type(e).__name__}")
        if "error" in result:
            log.warning("session %s step refused: %s %s", sess.id, result["error"][0].name, result["error"][1])
        # Free the session before the edge can see the end of the step, so its next step never finds it busy.
        t = stream.protocol.traffic
        self.sessions.release(sess, ok="error" not in result, bytes_in=t.bytes_up, bytes_out=t.bytes_down,
                              seconds=seconds)
        stream.finish(last if "error" not in result else None)


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
