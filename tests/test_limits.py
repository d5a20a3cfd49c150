"""Per-client limits (cloud/budgets.py, cloud/sessions.py): each is RESOURCE_EXHAUSTED naming the limit, and
another client is unaffected. A client that holds many silent streams and sessions slows another client's steps
by at most 2x and never blocks the health check; a 16 MB session request pins no more than a normal one."""
from __future__ import annotations

import statistics
import sys
import threading
import time
from dataclasses import fields, is_dataclass

import grpc
import pytest
import torch

from cloud.sessions import CloudConfig
from protocol import pb
from tests.conftest import CloudHandle, make_edge, sst2_batches
from tests.raw_client import Client, begin, ended_with, open_streams, wait_until

pytestmark = pytest.mark.usefixtures("one_thread")

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def make_cloud(tiny):
    handles = []

    def make(max_message_mb: int = 8, **config) -> CloudHandle:
        config.setdefault("max_tokens_per_step", 4096)
        config.setdefault("step_timeout", 10.0)
        handles.append(CloudHandle(tiny.model, CloudConfig(**config), max_message_mb=max_message_mb))
        return handles[-1]
    yield make
    for h in handles:
        h.stop()


# ---- each limit ------------------------------------------------------------------------------------------------------
def test_max_streams_per_client(make_cloud, tiny):
    cloud = make_cloud(max_streams_per_client=3, begin_timeout=60.0)
    alice, bob = Client(cloud, tiny, "alice"), Client(cloud, tiny, "bob")
    sid_a, sid_b = alice.open(), bob.open()
    gate = threading.Event()
    held = [alice.held_stream(gate) for _ in range(3)]
    wait_until(lambda: open_streams(cloud, "alice") == 3, what="alice's three silent streams")
    code, details = alice.step(sid_a)
    assert code == EXHAUSTED and "max_streams_per_client" in details, (code, details)
    assert bob.step(sid_b)[0] == grpc.StatusCode.OK  # bob has streams of his own
    gate.set()
    assert [ended_with(r) for r in held] == [grpc.StatusCode.CANCELLED] * 3  # they ended without a Begin
    wait_until(lambda: open_streams(cloud, "alice") == 0, what="alice's streams to be freed")
    assert alice.step(sid_a)[0] == grpc.StatusCode.OK


def test_a_silent_stream_is_dropped_after_begin_timeout(make_cloud, tiny):
    cloud = make_cloud(max_streams_per_client=1, begin_timeout=0.5)
    alice = Client(cloud, tiny, "alice")
    sid = alice.open()
    gate = threading.Event()
    try:
        assert ended_with(alice.held_stream(gate)) == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        gate.set()
    wait_until(lambda: open_streams(cloud, "alice") == 0, what="the stream slot to be freed")
    assert alice.step(sid)[0] == grpc.StatusCode.OK  # its one slot is free again


def test_max_sessions_per_client(make_cloud, tiny):
    cloud = make_cloud(max_sessions_per_client=3, max_sessions=10)
    alice, bob = Client(cloud, tiny, "alice"), Client(cloud, tiny, "bob")
    sids = [alice.open() for _ in range(3)]
    code, details = alice.open_status()
    assert code == EXHAUSTED and "max_sessions_per_client" in details, (code, details)
    assert bob.step(bob.open())[0] == grpc.StatusCode.OK  # bob opens and uses his own
    alice.stub.CloseSession(pb.SessionRef(session_id=sids[0]), metadata=alice.md, timeout=10)
    assert alice.open_status()[0] == grpc.StatusCode.OK  # a closed session frees its place


def test_max_steps_per_second(make_cloud, tiny):
    cloud = make_cloud(max_steps_per_second=2.0)
    alice, bob = Client(cloud, tiny, "alice"), Client(cloud, tiny, "bob")
    sid_a, sid_b = alice.open(), bob.open()
    t0 = time.monotonic()
    codes = [alice.step(sid_a) for _ in range(10)]
    elapsed = time.monotonic() - t0
    assert [c for c, _ in codes[:2]] == [grpc.StatusCode.OK] * 2  # the burst: as many as the rate
    refused = [d for c, d in codes if c == EXHAUSTED]
    assert len(refused) >= 10 - (2 + 2 * elapsed + 1), (codes, elapsed)  # a token bucket of 2 per second
    assert refused and all("max_steps_per_second" in d for d in refused), codes
    assert all(c in (grpc.StatusCode.OK, EXHAUSTED) for c, _ in codes)
    assert [bob.step(sid_b)[0] for _ in range(2)] == [grpc.StatusCode.OK] * 2  # bob's bucket is his own
    time.sleep(0.6)
    assert alice.step(sid_a)[0] == grpc.StatusCode.OK  # the bucket refills


def test_step_cost_counts_long_sequences_as_costlier(make_cloud, tiny):
    """1024 tokens as 8 x 128 or 32 x 32 are fine; the same 1024 tokens as one sequence (or 2 x 512) cost several
    times more (attention grows with the square of the length) and are refused."""
    cloud = make_cloud(max_tokens_per_step=1024, reference_seq_len=128)
    alice, bob = Client(cloud, tiny, "alice"), Client(cloud, tiny, "bob")
    sid_a, sid_b = alice.open(), bob.open()
    for batch, seq in [(8, 128), (32, 32), (1024, 1)]:
        assert alice.step(sid_a, batch, seq) == (grpc.StatusCode.OK, ""), (batch, seq)
    for batch, seq in [(1, 1024), (2, 512), (4, 256)]:
        code, details = alice.step(sid_a, batch, seq)
        assert code == EXHAUSTED and "max_tokens_per_step" in details and "x the cloud's limit" in details, \
            (batch, seq, code, details)
    assert bob.step(sid_b, 8, 128)[0] == grpc.StatusCode.OK
    assert alice.step(sid_a, 8, 128)[0] == grpc.StatusCode.OK  # a refused step leaves the session usable


def test_max_steps_per_client_queues_the_client_not_the_others(make_cloud, tiny):
    """A client's steps beyond max_steps_per_client wait their turn (no error); another client's do not wait."""
    cloud = make_cloud(max_steps_per_client=1, step_timeout=60.0)
    alice, bob = Client(cloud, tiny, "alice"), Client(cloud, tiny, "bob")
    lora = alice.open(lora_targets=["q_proj", "v_proj"], lora_blocks=[1])
    plain, sid_b = alice.open(), bob.open()
    gate = threading.Event()
    stalled = alice.held_stream(gate, begin(lora, active_blocks=[1]))  # holds alice's one compute slot
    first = next(stalled)
    assert first.WhichOneof("kind") == "lora_request"
    second: list = []
    th = threading.Thread(target=lambda: second.append(alice.step(plain)))
    th.start()
    time.sleep(0.5)
    assert not second and not cloud.service.sessions[plain].busy  # waiting its turn, not refused
    assert bob.step(sid_b)[0] == grpc.StatusCode.OK  # bob does not wait behind alice
    gate.set()  # alice's first step ends (she never answered): her second one runs
    assert ended_with(stalled) == grpc.StatusCode.CANCELLED
    th.join(30)
    assert second == [(grpc.StatusCode.OK, "")]


# ---- what a large request pins ---------------------------------------------------------------------------------------
def deep_size(obj, seen=None) -> int:
    """Bytes of `obj` and everything it holds (lists, tuples, dicts, sets, dataclasses, objects' __dict__)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return size
    if isinstance(obj, dict):
        return size + sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return size + sum(deep_size(v, seen) for v in obj)
    if is_dataclass(obj):
        return size + sum(deep_size(getattr(obj, f.name), seen) for f in fields(obj))
    return size + (deep_size(vars(obj), seen) if hasattr(obj, "__dict__") else 0)


def test_a_16mb_session_request_pins_no_more_than_a_normal_one(make_cloud, tiny):
    cloud = make_cloud(max_message_mb=64)
    alice = Client(cloud, tiny, "alice")
    targets, blocks = ["q_proj", "v_proj"], [1, 2, 3, 4]
    normal = alice.open(lora_targets=targets, lora_blocks=blocks)
    big_request = alice.request(lora_targets=targets * 750_000, lora_blocks=blocks * 1_000_000)
    assert big_request.ByteSize() >= 16_000_000
    big = alice.stub.OpenSession(big_request, metadata=alice.md, timeout=60).session_id
    a, b = cloud.service.sessions[normal], cloud.service.sessions[big]
    assert (b.targets, b.lora_blocks, b.groups) == (a.targets, a.lora_blocks, a.groups) == (
        targets, blocks, (("attn_in", ("q_proj", "v_proj")),))
    assert deep_size(b) == deep_size(a) < 10_000
    assert alice.step(big) == (grpc.StatusCode.OK, "")  # and it is an ordinary session
    # megabytes of distinct unknown targets, or of out-of-range blocks: refused with a short message, nothing kept
    before = len(cloud.service.sessions)
    for kw in ({"lora_targets": [f"t{i}" for i in range(200_000)], "lora_blocks": blocks},
               {"lora_targets": targets, "lora_blocks": list(range(1, 1_000_000))}):
        code, details = alice.open_status(**kw)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 1000, (code, len(details))
    assert len(cloud.service.sessions) == before


# ---- stalls ----------------------------------------------------------------------------------------------------------
def timed_steps(em, opt, batches, n: int) -> list[float]:
    """n train steps of the edge model `em` (each finite); each one's wall time."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss, _ = em.loss(batches[i % len(batches)])
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        assert torch.isfinite(loss)
    return times


def while_pinging(health, ping, measure):
    """measure()'s value, and (status, seconds) of the health check `ping`, every 50 ms, all through it."""
    pings, stop = [], threading.Event()

    def pinger():
        while not stop.is_set():
            t0 = time.perf_counter()
            status = health.Check(ping, timeout=10).status
            pings.append((status, time.perf_counter() - t0))
            time.sleep(0.05)
    th = threading.Thread(target=pinger)
    th.start()
    try:
        return measure(), pings
    finally:
        stop.set()
        th.join(30)


def test_silent_streams_and_many_sessions_slow_another_client_at_most_2x(make_cloud, tiny):
    """Alice holds every stream and session she may (some streams silent, some stalled mid-step holding her
    compute slots) for the whole measurement; bob's median DLoRA train step stays within 2x of his own baseline,
    measured before and after in the same test, and the health check answers throughout."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    streams, sessions = 8, 16
    cloud = make_cloud(max_streams_per_client=streams, max_sessions_per_client=sessions, max_steps_per_client=2,
                       begin_timeout=300.0, step_timeout=300.0)
    em, _, link = make_edge(cloud, tiny, client="bob", cloud_lora="edge")
    opt = torch.optim.AdamW(em.lora.parameters(), lr=1e-2)
    batches = sst2_batches(4)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(cloud.address))
    ping = health_pb2.HealthCheckRequest(service="tandem.v1.Backbone")

    def bob_steps(n: int) -> list[float]:
        return timed_steps(em, opt, batches, n)

    bob_steps(2)  # warm-up
    before = statistics.median(bob_steps(7))

    alice = Client(cloud, tiny, "alice")
    sids = [alice.open(lora_targets=["q_proj", "v_proj"], lora_blocks=[1, 2, 3, 4]) for _ in range(sessions)]
    assert alice.open_status()[0] == EXHAUSTED
    gate = threading.Event()
    stalled = [alice.held_stream(gate, begin(sid, train=True, active_blocks=[1, 2, 3, 4])) for sid in sids[:3]]
    silent = [alice.held_stream(gate) for _ in range(streams - len(stalled))]
    try:
        wait_until(lambda: open_streams(cloud, "alice") == streams, what="alice's streams")
        # two steps hold alice's compute slots, waiting on her for a LoRA reply; the third waits its turn
        wait_until(lambda: sum(cloud.service.sessions[s].busy for s in sids) == 2, what="alice's stalled steps")
        assert alice.step(sids[-1])[0] == EXHAUSTED  # she holds all she may

        during, pings = while_pinging(health, ping, lambda: statistics.median(bob_steps(7)))
        assert open_streams(cloud, "alice") == streams  # still held when the measurement ended
        assert sum(cloud.service.sessions[s].busy for s in sids) == 2
    finally:
        gate.set()
    assert {ended_with(s) for s in stalled + silent} == {grpc.StatusCode.CANCELLED}
    after = statistics.median(bob_steps(7))
    baseline = max(before, after)
    assert pings and all(s == health_pb2.HealthCheckResponse.SERVING for s, _ in pings)
    assert during <= 2 * baseline, f"bob's median step {during:.3f}s with alice stalling vs {before:.3f}s / " \
                                   f"{after:.3f}s without"
    print(f"\nbob's median step: {before:.3f}s before, {during:.3f}s with alice holding {streams} streams and "
          f"{sessions} sessions, {after:.3f}s after; health checks: {len(pings)}, slowest "
          f"{max(t for _, t in pings):.3f}s")
    link.close()
