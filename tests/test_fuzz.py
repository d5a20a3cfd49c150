"""Fuzz the cloud: well over 1,000 generated bad messages of every kind, each answered with its documented status
(cloud/rpc.py) while another client trains undisturbed.

Every message kind the cloud reads is covered: Begin, LoraReply, OutputGrad and LoraGradReply at every point of a
DLoRA train step, messages out of order or of no kind, a stream that ends early, raw undecodable bytes on the Step
stream (sent through a raw channel call that skips the client's serializer), and garbage OpenSessionRequest and
SessionRef on the unary calls. The generator is seeded; each case makes exactly one thing wrong and its expected
status is derived from what it made wrong, never from what the server answers:

    undecodable bytes, a message of no kind, malformed tensors (dtype, shape, byte count, NaN/Inf, rank, int8
    scales), a LoRA message for the wrong block or group, bad cut / wire dtype / LoRA sites     INVALID_ARGUMENT
    a message of the wrong kind for the step's position; protocol or model mismatch              FAILED_PRECONDITION
    an unknown session id (huge, empty, junk)                                                    NOT_FOUND
    another client's session                                                                     PERMISSION_DENIED
    no or a wrong token                                                                          UNAUTHENTICATED
    a well-formed hidden state with more tokens (or cost) than a step may have; a message over
    the server's size limit                                                                      RESOURCE_EXHAUSTED
    the edge ends the stream before the step is done                                             CANCELLED

Meanwhile a legitimate client trains with DLoRA; its steps must continue, its losses stay finite, and it never
needs a retry. No INTERNAL, no traceback in the log, and the server still serves at the end.

    TANDEM_FUZZ_CASES=5000 pytest tests/test_fuzz.py     # more cases (default 1500); TANDEM_FUZZ_SEED to vary
"""
from __future__ import annotations

import logging
import math
import os
import queue
import random
import threading
import time
from collections import Counter

import grpc
import pytest
import torch

from cloud.sessions import CloudConfig
from model.load import fingerprint
from protocol import AUTH_HEADER, PROTOCOL_VERSION, pb
from tests.conftest import TOKENS, CloudHandle, make_edge, sst2_batches
from tests.fuzz_cases import Generator
from tests.fuzz_messages import (C, LORA_BLOCKS, MAX_MESSAGE_MB, MAX_TOKENS, OK, TARGETS, WIRES, Case, Ctx, Dims,
                                 good_tensor)

pytestmark = pytest.mark.usefixtures("one_thread")

N_CASES = int(os.environ.get("TANDEM_FUZZ_CASES", "1500"))
SEED = int(os.environ.get("TANDEM_FUZZ_SEED", "1234"))
WORKERS = 4
METHOD = "/tandem.v1.Backbone/"


# ---- the driver ------------------------------------------------------------------------------------------------------
class Worker:
    """One fuzzing client (alice): its own channel and sessions (one per wire dtype, and one with no LoRA), so no
    two of its steps ever share a session."""

    def __init__(self, address: str, tiny, dims: Dims):
        self.dims = dims
        limit = 64 << 20  # larger than the server's: the server, not this client, refuses oversized messages
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", limit),
                                                               ("grpc.max_receive_message_length", limit)])
        ident = lambda b: b  # noqa: E731 - send the bytes as they are
        self.step = self.channel.stream_stream(METHOD + "Step", request_serializer=ident,
                                               response_deserializer=pb.CloudMessage.FromString)
        self.open = self.channel.unary_unary(METHOD + "OpenSession", request_serializer=ident,
                                             response_deserializer=pb.OpenSessionReply.FromString)
        self.close = self.channel.unary_unary(METHOD + "CloseSession", request_serializer=ident,
                                              response_deserializer=pb.SessionStats.FromString)
        self.md = md("alice")
        fp = fingerprint(tiny.model)
        self.sessions = {}
        for name, wire in [*WIRES.items(), ("plain", pb.FLOAT32)]:
            lora = name != "plain"
            req = pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION, model_fingerprint=fp,
                                        edge_bottom_blocks=1, edge_top_blocks=1, wire_dtype_up=wire,
                                        wire_dtype_down=pb.FLOAT32, lora_targets=TARGETS if lora else (),
                                        lora_blocks=LORA_BLOCKS if lora else ())
            self.sessions[name] = (self.open(req.SerializeToString(), metadata=self.md, timeout=30).session_id, wire)

    def run(self, case: Case) -> tuple[grpc.StatusCode, str]:
        metadata = md(case.metadata) if isinstance(case.metadata, str) else case.metadata
        try:
            if case.rpc != "Step":
                call = self.open if case.rpc == "OpenSession" else self.close
                call(case.payload, metadata=metadata, timeout=30)
                return OK, ""
            return self._step(case, metadata)
        except grpc.RpcError as e:
            return e.code(), e.details() or ""

    def _step(self, case: Case, metadata) -> tuple[grpc.StatusCode, str]:
        sid, wire = self.sessions[case.session]
        rng = random.Random(f"{case.kind}|{case.label}|{case.at}|{case.batch}|{case.seq}")  # the good messages
        outbox: queue.Queue = queue.Queue()
        B, T, H = case.batch, case.seq, self.dims.H
        ups = [0]

        def send(ctx: Ctx, good) -> bool:
            """Send the step's next up message, or the bad one in its place; False once the stream is closed."""
            i = ups[0]
            ups[0] += 1
            if i == case.at:
                p = case.payload
                p = p(ctx) if callable(p) else p
                if isinstance(p, tuple):  # (bytes, what exactly is wrong), known once the shapes are
                    p, detail = p
                    case.label += f": {detail}" if detail else ""
                if p is not None:
                    outbox.put(p)
                outbox.put(None)
                return False
            outbox.put(good().SerializeToString())
            return True

        def ctx(kind, block=None, group=None):
            return Ctx(kind, block, group, B, T, wire, sid)

        responses = self.step(iter(outbox.get, None), metadata=metadata, timeout=30)
        try:
            begin = lambda: pb.EdgeMessage(begin=pb.Begin(  # noqa: E731
                session_id=sid, train=case.train, active_blocks=case.active,
                hidden=good_tensor(rng, [B, T, H], wire), attention_mask=good_tensor(rng, [B, T], pb.BOOL)))
            if send(ctx("begin"), begin):
                for msg in responses:
                    kind = msg.WhichOneof("kind")
                    if kind == "lora_request":
                        r = msg.lora_request
                        widths = [self.dims.widths[t] for t in dict(self.dims.groups)[r.group]]
                        good = lambda r=r, w=widths: pb.EdgeMessage(lora_reply=pb.LoraReply(  # noqa: E731
                            block=r.block, group=r.group, outputs=[good_tensor(rng, [B, T, x], wire) for x in w]))
                        ok = send(ctx("lora_reply", r.block, r.group), good)
                    elif kind == "hidden" and case.train:
                        ok = send(ctx("output_grad"), lambda: pb.EdgeMessage(output_grad=pb.OutputGrad(
                            grad=good_tensor(rng, [B, T, H], wire))))
                    elif kind == "lora_grad_request":
                        r = msg.lora_grad_request
                        ok = send(ctx("lora_grad_reply", r.block, r.group), lambda r=r: pb.EdgeMessage(
                            lora_grad_reply=pb.LoraGradReply(block=r.block, group=r.group, grad=good_tensor(
                                rng, [B, T, self.dims.x_width[r.group]], wire))))
                    else:  # hidden of a forward-only step, or input_grad: the step is done
                        outbox.put(None)
                        ok = False
                    if not ok:
                        break
            for _ in responses:  # drain to the status
                pass
            return OK, ""
        finally:
            outbox.put(None)
            responses.cancel()  # a no-op once the call has ended


def md(client: str):
    return [(AUTH_HEADER, f"Bearer {TOKENS[client]}")]


# ---- the test --------------------------------------------------------------------------------------------------------
@pytest.fixture
def fuzz_cloud(tiny):
    handle = CloudHandle(tiny.model, CloudConfig(max_tokens_per_step=MAX_TOKENS, step_timeout=10.0,
                                                 max_sessions=64, max_sessions_per_client=32,
                                                 max_steps_per_second=1e9, max_streams_per_client=16),
                         max_message_mb=MAX_MESSAGE_MB)
    yield handle
    handle.stop()


class Trainer(threading.Thread):
    """The legitimate client: bob trains with DLoRA on the same cloud, recording each step's loss and time."""

    def __init__(self, cloud, tiny):
        super().__init__(daemon=True)
        self.em, _, self.link = make_edge(cloud, tiny, client="bob", cloud_lora="edge")
        self.opt = torch.optim.AdamW(self.em.lora.parameters(), lr=1e-2)
        self.batches = sst2_batches(8)
        self.losses: list[tuple[float, float]] = []  # (time, loss)
        self.failures: list[BaseException] = []
        self.stop = threading.Event()

    def run(self):
        try:
            i = 0
            while not self.stop.is_set():
                self.opt.zero_grad()
                loss, _ = self.em.loss(self.batches[i % len(self.batches)])
                loss.backward()
                self.opt.step()
                self.losses.append((time.monotonic(), loss.item()))
                i += 1
        except BaseException as e:  # noqa: BLE001 - any failure of the innocent client fails the test
            self.failures.append(e)


def run_all(workers: list[Worker], cases: list[Case]) -> list[tuple[Case, grpc.StatusCode, str] | None]:
    """Each case with its status and details, the cases dealt round-robin to the workers, all at once."""
    results: list[tuple[Case, grpc.StatusCode, str] | None] = [None] * len(cases)

    def work(w: int):
        for i in range(w, len(cases), WORKERS):
            code, details = workers[w].run(cases[i])
            results[i] = (cases[i], code, details)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(WORKERS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    return results


def assert_still_serving(worker: Worker) -> None:
    """The server is alive: health, and the fuzzer's own sessions still work."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    health = health_pb2_grpc.HealthStub(worker.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Backbone"),
                        timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    for name in ("fp32", "int8"):
        ok = Case(kind="", expect=OK, label="good step", session=name, train=True, active=LORA_BLOCKS, at=99)
        assert worker.run(ok) == (OK, "")


def test_fuzz_every_bad_message_gets_its_status_while_another_client_trains(fuzz_cloud, tiny, caplog):
    caplog.set_level(logging.INFO)
    dims = Dims.of(tiny.model)
    block_params = sum(p.numel() for p in tiny.model.model.layers[0].parameters())
    bob = Trainer(fuzz_cloud, tiny)
    bob.start()
    bob_victim = pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION, model_fingerprint=fingerprint(tiny.model),
                                       edge_bottom_blocks=1, edge_top_blocks=1, wire_dtype_up=pb.FLOAT32,
                                       wire_dtype_down=pb.FLOAT32)
    victim = bob.link.stub.OpenSession(bob_victim, metadata=md("bob"), timeout=30).session_id
    workers = [Worker(fuzz_cloud.address, tiny, dims) for _ in range(WORKERS)]
    cases = Generator(SEED, dims, block_params, victim, fingerprint(tiny.model)).cases(N_CASES)

    t0 = time.monotonic()
    results = run_all(workers, cases)
    t1 = time.monotonic()
    time.sleep(0.3)  # bob goes on after the fuzz too
    bob.stop.set()
    bob.join(timeout=60)

    # every case got exactly its documented status
    assert all(r is not None for r in results), "a fuzz worker died"
    wrong = [(c.kind, c.label, c.expect.name, code.name, details[:120]) for c, code, details in results
             if code != c.expect]
    internal = [(c.kind, c.label, details[:120]) for c, code, details in results if code == C.INTERNAL]
    by_kind = Counter(c.kind for c in cases)
    print(f"\nfuzz: {len(cases)} cases in {t1 - t0:.1f}s; per kind: {dict(by_kind)}; "
          f"statuses: {dict(Counter(r[1].name for r in results))}; bob trained {len(bob.losses)} steps")
    print(f"distinct defects: {len({c.label for c in cases})}")
    assert not internal, internal[:10]
    assert not wrong, f"{len(wrong)} of {len(cases)} cases got the wrong status: {wrong[:15]}"
    if "TANDEM_FUZZ_CASES" not in os.environ:
        assert len(cases) >= 1000 and all(by_kind[k] >= 20 for k in by_kind), by_kind
    # every message kind was hit at several points of the step
    assert {c.at for c in cases if c.kind in ("LoraReply", "LoraGradReply")} >= set(range(1, 9))

    # the legitimate client trained on throughout, finite, never even retried
    assert not bob.failures, bob.failures
    during = [loss for t, loss in bob.losses if t0 <= t <= t1]
    assert len(during) >= 3, f"bob made {len(during)} steps during {t1 - t0:.0f}s of fuzzing"
    assert all(math.isfinite(loss) for _, loss in bob.losses)
    retries = [r for r in caplog.records if r.name == "tandem.edge" and r.levelno >= logging.WARNING]
    assert not retries, [r.getMessage() for r in retries[:5]]

    assert_still_serving(workers[0])

    # a client's bad input is refused, not logged as a failure of the cloud
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR
              and (r.name.startswith("tandem.cloud") or r.name.startswith("grpc"))]
    assert not errors, [(r.name, r.getMessage()[:200]) for r in errors[:5]]
    for w in workers:
        w.channel.close()
    bob.link.close()
