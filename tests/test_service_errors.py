"""Bad input gets a precise gRPC status, sessions are isolated, and the service keeps serving everyone else."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from model.load import fingerprint
from protocol import AUTH_HEADER, PROTOCOL_VERSION, pb, pb_grpc
from protocol.tensors import encode
from tests.conftest import TOKENS, make_edge, sst2_batches

H = 64  # tiny-llama hidden size


def stub_for(cloud, client="alice"):
    channel = grpc.insecure_channel(cloud.address, options=[("grpc.max_send_message_length", 64 << 20),
                                                            ("grpc.max_receive_message_length", 64 << 20)])
    md = [(AUTH_HEADER, f"Bearer {TOKENS[client]}")] if client else []
    return pb_grpc.BackboneStub(channel), md, channel


def open_session(stub, md, tiny, **kw):
    req = dict(protocol_version=PROTOCOL_VERSION, model_fingerprint=fingerprint(tiny.model), edge_bottom_blocks=1,
               edge_top_blocks=1, wire_dtype_up=pb.FLOAT32, wire_dtype_down=pb.FLOAT32)
    req.update(kw)
    return stub.OpenSession(pb.OpenSessionRequest(**req), metadata=md)


def step_status(stub, md, *messages) -> grpc.StatusCode:
    """Send these EdgeMessages on one Step stream and return the status the cloud ends it with."""
    try:
        for _ in stub.Step(iter(messages), metadata=md, timeout=20):
            pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def begin(sid, hidden=None, mask=None, train=False, **kw):
    hidden = torch.randn(2, 5, H) if hidden is None else hidden
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool) if mask is None else mask
    t = kw.pop("hidden_msg", None) or encode(hidden)
    return pb.EdgeMessage(begin=pb.Begin(session_id=sid, train=train, hidden=t, attention_mask=encode(mask, pb.BOOL),
                                         active_blocks=kw.pop("active_blocks", ())))


def test_forward_only_step_works(cloud, tiny):
    stub, md, _ = stub_for(cloud)
    sid = open_session(stub, md, tiny).session_id
    replies = list(stub.Step(iter([begin(sid)]), metadata=md, timeout=20))
    assert [r.WhichOneof("kind") for r in replies] == ["hidden"]
    assert list(replies[0].hidden.hidden.shape) == [2, 5, H]


@pytest.mark.parametrize("client,code", [(None, grpc.StatusCode.UNAUTHENTICATED)])
def test_missing_token(cloud, tiny, client, code):
    stub, md, _ = stub_for(cloud, client)
    with pytest.raises(grpc.RpcError) as e:
        open_session(stub, md, tiny)
    assert e.value.code() == code


def test_wrong_token(cloud, tiny):
    stub, _, _ = stub_for(cloud)
    with pytest.raises(grpc.RpcError) as e:
        open_session(stub, [(AUTH_HEADER, "Bearer not-a-real-token-at-all-000")], tiny)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert step_status(stub, [(AUTH_HEADER, "Bearer nope")], begin("x")) == grpc.StatusCode.UNAUTHENTICATED


def test_second_client_cannot_use_first_clients_session(cloud, tiny):
    a, md_a, _ = stub_for(cloud, "alice")
    b, md_b, _ = stub_for(cloud, "bob")
    sid = open_session(a, md_a, tiny).session_id
    assert step_status(b, md_b, begin(sid)) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
        b.CloseSession(pb.SessionRef(session_id=sid), metadata=md_b)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert step_status(a, md_a, begin(sid)) == grpc.StatusCode.OK  # the owner still can


def test_unknown_session(cloud):
    stub, md, _ = stub_for(cloud)
    assert step_status(stub, md, begin("0" * 32)) == grpc.StatusCode.NOT_FOUND


def test_version_and_model_mismatch(cloud, tiny):
    stub, md, _ = stub_for(cloud)
    for kw in ({"protocol_version": PROTOCOL_VERSION + 1}, {"model_fingerprint": "someone-elses-model"}):
        with pytest.raises(grpc.RpcError) as e:
            open_session(stub, md, tiny, **kw)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as e:
        open_session(stub, md, tiny, protocol_version=PROTOCOL_VERSION + 1)
    assert "version" in e.value.details()


def test_bad_cut_and_sites(cloud, tiny):
    stub, md, _ = stub_for(cloud)
    for kw in ({"edge_bottom_blocks": 0}, {"edge_bottom_blocks": 3, "edge_top_blocks": 3},
               {"lora_targets": ["nonsense"], "lora_blocks": [2]}, {"lora_targets": ["q_proj"], "lora_blocks": [0]},
               {"wire_dtype_up": pb.INT64}):
        with pytest.raises(grpc.RpcError) as e:
            open_session(stub, md, tiny, **kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw


def test_carried_weights_are_checked(cloud, tiny):
    """The carried mode: bad rank or scaling at open; a Begin whose LoRA weights are missing, for the wrong site, of
    the wrong shape, NaN, or sent in a session that did not ask for the mode, INVALID_ARGUMENT; good ones run."""
    stub, md, _ = stub_for(cloud)
    carried = dict(lora_targets=["q_proj", "v_proj"], lora_blocks=[2, 3], carried_lora=True)
    for kw in ({"lora_rank": 0, "lora_scaling": 2.0}, {"lora_rank": 65, "lora_scaling": 2.0},
               {"lora_rank": 4, "lora_scaling": float("nan")}, {"lora_rank": 4, "lora_scaling": 0.0}):
        with pytest.raises(grpc.RpcError) as e:
            open_session(stub, md, tiny, **carried, **kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
    sid = open_session(stub, md, tiny, **carried, lora_rank=4, lora_scaling=2.0).session_id
    kv = tiny.model.config.num_key_value_heads * (H // tiny.model.config.num_attention_heads)

    def weights(block=2, a_shape=(4, H), nan=False):
        a = torch.randn(*a_shape)
        if nan:
            a[0, 0] = float("nan")
        return [pb.SiteWeights(block=b, target=t, a=encode(a if (b, t) == (block, "q_proj") else torch.randn(4, H)),
                               b=encode(torch.randn(H if t == "q_proj" else kv, 4)))
                for b in (2, 3) for t in ("q_proj", "v_proj")]

    def with_weights(ws, active=(2, 3), session=sid):
        msg = begin(session, active_blocks=active)
        msg.begin.lora_weights.extend(ws)
        return msg

    good = weights()
    for name, msg in [("missing", with_weights(good[:3])), ("wrong site", with_weights(good[1:] + good[:1])),
                      ("wrong shape", with_weights(weights(a_shape=(4, H + 1)))),
                      ("NaN", with_weights(weights(nan=True))),
                      ("inactive block's weights", with_weights(good, active=(2,)))]:
        assert step_status(stub, md, msg) == grpc.StatusCode.INVALID_ARGUMENT, name
    split = open_session(stub, md, tiny).session_id
    assert step_status(stub, md, with_weights(good, active=(), session=split)) == grpc.StatusCode.INVALID_ARGUMENT
    assert step_status(stub, md, with_weights(good)) == grpc.StatusCode.OK


def bad_inputs(sid):
    """(name, messages, expected status) for each kind of malformed input."""
    good = torch.randn(2, 5, H)
    nan = good.clone()
    nan[0, 1, 2] = float("nan")
    truncated = encode(good)
    truncated.data = truncated.data[:-4]
    return [
        ("malformed bytes", [begin(sid, hidden_msg=truncated)], grpc.StatusCode.INVALID_ARGUMENT),
        ("wrong shape", [begin(sid, torch.randn(2, 5, H + 1))], grpc.StatusCode.INVALID_ARGUMENT),
        ("wrong rank", [begin(sid, hidden_msg=encode(torch.randn(10, H)), mask=torch.ones(2, 5, dtype=torch.bool))],
         grpc.StatusCode.INVALID_ARGUMENT),
        ("wrong dtype", [begin(sid, hidden_msg=encode(good, pb.FLOAT16))], grpc.StatusCode.INVALID_ARGUMENT),
        ("NaN", [begin(sid, nan)], grpc.StatusCode.INVALID_ARGUMENT),
        ("mask shape", [begin(sid, good, torch.ones(2, 4, dtype=torch.bool))], grpc.StatusCode.INVALID_ARGUMENT),
        ("too many tokens", [begin(sid, torch.zeros(8, 600, H))], grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("oversized message", [begin(sid, torch.zeros(40, 1000, H))], grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("out of order", [pb.EdgeMessage(output_grad=pb.OutputGrad(grad=encode(good)))],
         grpc.StatusCode.FAILED_PRECONDITION),
        ("empty stream", [], grpc.StatusCode.CANCELLED),
    ]


def test_each_bad_input_gets_its_code_while_another_client_keeps_training(cloud, tiny):
    em, _, link = make_edge(cloud, tiny, client="bob", cloud_lora="edge")
    opt = torch.optim.AdamW(em.lora.parameters(), lr=1e-2)
    losses, failures = [], []
    stop = threading.Event()

    def bob_trains():
        try:
            for b in sst2_batches(200):
                if stop.is_set():
                    break
                opt.zero_grad()
                loss, _ = em.loss(b)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        except Exception as e:  # any failure of the innocent client fails the test
            failures.append(e)

    th = threading.Thread(target=bob_trains)
    th.start()
    stub, md, _ = stub_for(cloud, "alice")
    sid = open_session(stub, md, tiny).session_id
    seen_during = len(losses)
    for name, messages, code in bad_inputs(sid):
        assert step_status(stub, md, *messages) == code, name
    assert step_status(stub, md, begin(sid)) == grpc.StatusCode.OK  # the attacker's session itself still works
    time.sleep(0.5)
    stop.set()
    th.join()
    assert not failures, failures
    assert len(losses) > seen_during  # bob trained on while alice's bad input was refused
    assert all(torch.isfinite(torch.tensor(losses)))
    link.close()


def test_missing_lora_reply_times_out_and_the_step_can_be_retried(cloud, tiny):
    cloud.service.config.step_timeout = 0.5
    stub, md, _ = stub_for(cloud)
    sid = open_session(stub, md, tiny, lora_targets=["q_proj", "v_proj"], lora_blocks=[1, 2, 3, 4]).session_id
    gate = threading.Event()

    def stalls():  # Begin, then never answer the LoRA request
        yield begin(sid, active_blocks=[1, 2, 3, 4])
        gate.wait(5)

    responses = stub.Step(stalls(), metadata=md, timeout=10)
    first = next(responses)
    assert first.WhichOneof("kind") == "lora_request" and first.lora_request.block == 1
    with pytest.raises(grpc.RpcError) as e:
        next(responses)
    gate.set()
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The same session serves the retried step: answer every LoRA request this time.
    cloud.service.config.step_timeout = 5.0
    outbox = [begin(sid, active_blocks=[1, 2, 3, 4])]
    sizes = {"q_proj": 64, "v_proj": 32}  # tiny-llama: 4 heads x 16, 2 kv heads x 16
    kinds = []

    def requests():
        while outbox:
            yield outbox.pop(0)
            while not outbox and not done.is_set():
                time.sleep(0.01)

    done = threading.Event()
    for reply in stub.Step(requests(), metadata=md, timeout=20):
        kinds.append(reply.WhichOneof("kind"))
        if kinds[-1] == "lora_request":
            r = reply.lora_request
            outs = [encode(torch.zeros(2, 5, sizes[t])) for t in ("q_proj", "v_proj")]
            outbox.append(pb.EdgeMessage(lora_reply=pb.LoraReply(block=r.block, group=r.group, outputs=outs)))
        else:
            done.set()
    assert kinds == ["lora_request"] * 4 + ["hidden"]


def test_idle_sessions_expire(cloud, tiny):
    cloud.service.config.ttl_seconds = 0.2
    stub, md, _ = stub_for(cloud)
    sid = open_session(stub, md, tiny).session_id
    time.sleep(0.4)
    assert sid in cloud.service.expire_idle()
    assert sid not in cloud.service.sessions
    assert step_status(stub, md, begin(sid)) == grpc.StatusCode.NOT_FOUND


def test_session_limit(cloud, tiny):
    cloud.service.config.max_sessions = 2
    stub, md, _ = stub_for(cloud)
    open_session(stub, md, tiny), open_session(stub, md, tiny)
    with pytest.raises(grpc.RpcError) as e:
        open_session(stub, md, tiny)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_and_graceful_shutdown(cloud):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    channel = grpc.insecure_channel(cloud.address)
    health = health_pb2_grpc.HealthStub(channel)
    req = health_pb2.HealthCheckRequest(service="tandem.v1.Backbone")
    assert health.Check(req).status == health_pb2.HealthCheckResponse.SERVING
    cloud.server.health.enter_graceful_shutdown()
    assert health.Check(req).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_tensors_are_not_bounded_by_grpcs_4mb_default(tiny):
    from cloud.sessions import CloudConfig
    from tests.conftest import CloudHandle
    big = CloudHandle(tiny.model, CloudConfig(max_tokens_per_step=32768), max_message_mb=256)  # the serve default
    try:
        stub, md, _ = stub_for(big)
        sid = open_session(stub, md, tiny).session_id
        hidden = torch.randn(40, 500, H)  # 5.1 MB each way (short sequences: within the cost limit)
        replies = list(stub.Step(iter([begin(sid, hidden)]), metadata=md, timeout=60))
        assert replies[0].hidden.hidden.ByteSize() > 5_000_000
    finally:
        big.stop()
