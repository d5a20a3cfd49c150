"""Bearer tokens: file handling, every refusal, constant-work comparison, and a real gRPC call's metadata."""
from __future__ import annotations

import json
import stat
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from privacy.security import tokens as T
from privacy.security.tokens import AuthError, bearer_metadata, check_token, load_tokens, make_tokens


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens.json"
    return path, make_tokens(path, ["edge-0", "edge-1", "edge-2"])


def test_make_and_load(token_file):
    path, table = token_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == table
    assert sorted(table) == ["edge-0", "edge-1", "edge-2"]
    assert len(set(table.values())) == 3 and all(len(t) >= 40 for t in table.values())
    assert load_tokens(path) == {t: c for c, t in table.items()}


def test_check_token_names_the_client(token_file):
    path, table = token_file
    tokens = load_tokens(path)
    assert check_token([("authorization", f"Bearer {table['edge-1']}")], tokens) == "edge-1"
    assert check_token(bearer_metadata(table["edge-2"]), tokens) == "edge-2"
    assert check_token({"Authorization": f"bearer {table['edge-0']}".encode()}, tokens) == "edge-0"


@pytest.mark.parametrize("metadata, message", [
    (None, "missing 'authorization'"),
    ([("x-other", "1")], "missing 'authorization'"),
    ([("authorization", "Basic abc")], "must be 'Bearer <token>'"),
    ([("authorization", "Bearer")], "must be 'Bearer <token>'"),
    ([("authorization", "Bearer " + "x" * 43)], "unknown bearer token"),
])
def test_refusals(token_file, metadata, message):
    tokens = load_tokens(token_file[0])
    with pytest.raises(AuthError, match=message) as e:
        check_token(metadata, tokens)
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_near_miss_and_duplicate_header_are_refused(token_file):
    path, table = token_file
    tokens = load_tokens(path)
    good = table["edge-0"]
    for bad in (good[:-1], good + "A", good[:-1] + ("A" if good[-1] != "A" else "B")):
        with pytest.raises(AuthError, match="unknown bearer token"):
            check_token(bearer_metadata(bad), tokens)
    with pytest.raises(AuthError, match="more than one"):
        check_token(bearer_metadata(good) + bearer_metadata(table["edge-1"]), tokens)


def test_every_token_is_compared(token_file, monkeypatch):
    """The first token matching must not end the loop early (timing would tell which client it was)."""
    path, table = token_file
    tokens = load_tokens(path)
    calls = []
    real = T.hmac.compare_digest
    monkeypatch.setattr(T.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert check_token(bearer_metadata(next(iter(tokens))), tokens) == tokens[next(iter(tokens))]
    assert len(calls) == 3


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ("[]", "non-empty JSON object"),
    ("{}", "non-empty JSON object"),
    ('{"a": "short"}', "at least 20 characters"),
    ('{"a": 12345678901234567890123}', "at least 20 characters"),
    ('{"a": "%s", "b": "%s"}' % ("t" * 30, "t" * 30), "share a token"),
])
def test_bad_token_files(tmp_path, content, message):
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_tokens(path)


class GuardedHealth(health.HealthServicer):
    """Health check that only answers callers with a valid token, and records who they were."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens, self.callers = tokens, []

    def Check(self, request, context):
        try:
            self.callers.append(check_token(context.invocation_metadata(), self.tokens))
        except AuthError as e:
            context.abort(e.code, str(e))
        return super().Check(request, context)


def test_real_grpc_metadata(token_file):
    path, table = token_file
    servicer = GuardedHealth(load_tokens(path))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            stub.Check(health_pb2.HealthCheckRequest(), metadata=bearer_metadata(table["edge-2"]), timeout=10)
            assert servicer.callers == ["edge-2"]
            with pytest.raises(grpc.RpcError) as e:
                stub.Check(health_pb2.HealthCheckRequest(), metadata=bearer_metadata("y" * 43), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert e.value.details() == "unknown bearer token"
    finally:
        server.stop(0)
