"""TLS and mutual TLS with the certificates from privacy.security.certs, against a real gRPC server on 127.0.0.1."""
from __future__ import annotations

import stat
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from privacy.security.certs import load_channel_credentials, load_server_credentials, make_certs, peer_client_name


class RecordingHealth(health.HealthServicer):
    """The standard health service, also recording who called (the CN of the client certificate)."""

    def __init__(self):
        super().__init__()
        self.callers = []

    def Check(self, request, context):
        self.callers.append(peer_client_name(context))
        return super().Check(request, context)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("pki"), clients=("edge-0", "edge-1"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    """A second, unrelated CA: certificates from it must not be trusted by the first."""
    return make_certs(tmp_path_factory.mktemp("other-pki"), clients=("edge-0",))


def serve(cert_dir, require_client_cert: bool):
    servicer = RecordingHealth()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", load_server_credentials(cert_dir, require_client_cert))
    server.start()
    return server, port, servicer


def check(port: int, creds: grpc.ChannelCredentials, host: str = "127.0.0.1") -> int:
    with grpc.secure_channel(f"{host}:{port}", creds) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return reply.status


@pytest.fixture(scope="module")
def tls_server(certs):
    server, port, servicer = serve(certs.ca_cert.parent, require_client_cert=False)
    yield port, servicer
    server.stop(0)


@pytest.fixture(scope="module")
def mtls_server(certs):
    server, port, servicer = serve(certs.ca_cert.parent, require_client_cert=True)
    yield port, servicer
    server.stop(0)


def test_files_and_certificate_contents(certs):
    d = certs.ca_cert.parent
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["ca.pem", "ca.key", "server.pem", "server.key", "edge-0.pem", "edge-0.key", "edge-1.pem", "edge-1.key"])
    for key in (certs.ca_key, certs.server_key, *(k for _, k in certs.clients.values())):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    client = x509.load_pem_x509_certificate(certs.clients["edge-1"][0].read_bytes())
    assert server.issuer == ca.subject and client.issuer == ca.subject
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge-1"
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_client_trusting_the_ca_connects(tls_server, certs):
    port, servicer = tls_server
    assert check(port, load_channel_credentials(certs.ca_cert.parent)) == health_pb2.HealthCheckResponse.SERVING
    assert check(port, load_channel_credentials(certs.ca_cert.parent), host="localhost") == \
        health_pb2.HealthCheckResponse.SERVING
    assert servicer.callers[-1] is None  # plain TLS: the server does not know who called


def test_client_not_trusting_the_ca_is_refused(tls_server, other_certs):
    port, _ = tls_server
    with pytest.raises(grpc.RpcError) as e:
        check(port, load_channel_credentials(other_certs.ca_cert.parent))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_names_the_client(mtls_server, certs):
    port, servicer = mtls_server
    assert check(port, load_channel_credentials(certs.ca_cert.parent, "edge-1")) == \
        health_pb2.HealthCheckResponse.SERVING
    assert servicer.callers[-1] == "edge-1"
    check(port, load_channel_credentials(certs.ca_cert.parent, "edge-0"))
    assert servicer.callers[-1] == "edge-0"


def test_mutual_tls_refuses_a_client_without_certificate(mtls_server, certs):
    port, servicer = mtls_server
    n = len(servicer.callers)
    with pytest.raises(grpc.RpcError) as e:
        check(port, load_channel_credentials(certs.ca_cert.parent))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.callers) == n  # the RPC never reached the service


def test_mutual_tls_refuses_a_client_certificate_from_another_ca(mtls_server, certs, other_certs, tmp_path):
    """A client that trusts the right CA but holds a certificate signed by another one is refused."""
    (tmp_path / "ca.pem").write_bytes(certs.ca_cert.read_bytes())
    for suffix in (".pem", ".key"):
        (tmp_path / f"edge-0{suffix}").write_bytes((other_certs.ca_cert.parent / f"edge-0{suffix}").read_bytes())
    port, _ = mtls_server
    with pytest.raises(grpc.RpcError) as e:
        check(port, load_channel_credentials(tmp_path, "edge-0"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_missing_files_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_certs"):
        load_channel_credentials(tmp_path)


def test_bad_client_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="bad client name"):
        make_certs(tmp_path, clients=("server",))
