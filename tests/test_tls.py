"""Training over TLS: bearer tokens on a TLS channel, and mutual TLS where the client certificate is the identity."""
from __future__ import annotations

import copy

import pytest
import torch

from cloud.serve import Cloud, ServeConfig
from edge.link import CloudLink, LinkConfig, StepFailed
from edge.trainer import EdgeConfig, build_edge
from privacy.security.certs import make_certs
from tests.conftest import TOKENS, sst2_batches


def one_step(em):
    loss, _ = em.loss(sst2_batches(1)[0])
    loss.backward()
    return loss.item()


def assert_unavailable(link: LinkConfig, fingerprint: str) -> None:
    """A link with these settings cannot even open a session: the connection fails (UNAVAILABLE)."""
    client = CloudLink(link)
    with pytest.raises(StepFailed) as e:
        client.open(fingerprint=fingerprint, k=1, m=1, wire_up=1, wire_down=1)
    assert e.value.code.name == "UNAVAILABLE"


def test_token_auth_over_tls(tmp_path, tiny):
    make_certs(tmp_path, clients=("edge-0",))
    cloud = Cloud(ServeConfig(model="tiny-llama", port=0, tls_dir=str(tmp_path)), model=copy.deepcopy(tiny.model),
                  tokens={v: k for k, v in TOKENS.items()})
    try:
        cfg = EdgeConfig.of(cloud=f"localhost:{cloud.port}", token=TOKENS["alice"], tls_dir=str(tmp_path),
                            model="tiny-llama", cloud_lora="edge")
        em, _, link = build_edge(cfg, loaded=copy.deepcopy(tiny))
        assert torch.isfinite(torch.tensor(one_step(em)))
        assert cloud.service.sessions[link.session.session_id].owner == "alice"
        # a plaintext client cannot talk to the TLS port
        assert_unavailable(LinkConfig(f"localhost:{cloud.port}", TOKENS["alice"], timeout=5), em.fingerprint)
    finally:
        cloud.stop(0)


def test_mutual_tls_identity_isolates_sessions(tmp_path, tiny):
    make_certs(tmp_path, clients=("edge-0", "edge-1"))
    cloud = Cloud(ServeConfig(model="tiny-llama", port=0, tls_dir=str(tmp_path), require_client_cert=True),
                  model=copy.deepcopy(tiny.model))
    try:
        def edge(name):
            cfg = EdgeConfig.of(cloud=f"localhost:{cloud.port}", tls_dir=str(tmp_path), client_name=name,
                                model="tiny-llama")
            return build_edge(cfg, loaded=copy.deepcopy(tiny))
        em0, _, link0 = edge("edge-0")
        em1, _, link1 = edge("edge-1")
        assert cloud.service.sessions[link0.session.session_id].owner == "edge-0"
        one_step(em0)
        link1.session = link0.session  # edge-1 tries to drive edge-0's session
        with pytest.raises(StepFailed) as e:
            one_step(em1)
        assert e.value.code.name == "PERMISSION_DENIED"
        # without a client certificate the handshake itself fails
        assert_unavailable(LinkConfig(f"localhost:{cloud.port}", tls_dir=str(tmp_path), timeout=5), em0.fingerprint)
    finally:
        cloud.stop(0)


def test_with_mutual_tls_and_tokens_both_must_name_the_same_client(tmp_path, tiny):
    """The identity rule: a certificate and a token of two different clients are refused; each with its own works;
    `tandem cloud health` speaks TLS to such a server."""
    from cli.main import main as tandem
    make_certs(tmp_path, clients=("edge-0", "edge-1"))
    tokens = {TOKENS["alice"]: "edge-0", TOKENS["bob"]: "edge-1"}
    cloud = Cloud(ServeConfig(model="tiny-llama", port=0, tls_dir=str(tmp_path), require_client_cert=True),
                  model=copy.deepcopy(tiny.model), tokens=tokens)
    try:
        def edge(name, token):
            cfg = EdgeConfig.of(cloud=f"localhost:{cloud.port}", tls_dir=str(tmp_path), client_name=name,
                                token=token, model="tiny-llama", patience=0)
            return build_edge(cfg, loaded=copy.deepcopy(tiny))
        em0, _, link0 = edge("edge-0", TOKENS["alice"])
        one_step(em0)
        with pytest.raises(StepFailed) as e:
            edge("edge-0", TOKENS["bob"])  # edge-0's certificate with edge-1's token
        assert e.value.code.name == "UNAUTHENTICATED" and "certificate" in e.value.details
        tandem(["cloud", "health", "--address", f"localhost:{cloud.port}", "--tls-dir", str(tmp_path),
                "--client-name", "edge-0"])  # exits non-zero unless SERVING
        with pytest.raises(SystemExit):  # plaintext against a TLS server: not serving, and said so
            tandem(["cloud", "health", "--address", f"localhost:{cloud.port}", "--timeout", "2"])
        link0.close()
    finally:
        cloud.stop(0)
