"""Retries live in the edge's link and its autograd Function: a backward whose cloud went away is replayed on a
fresh session (forward again, then backward) with the same gradients, and a forward-only call (evaluation) waits
out a short outage. Real servers on a real port, restarted; nothing is mocked."""
from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from cloud.rpc import BackboneService, make_server
from cloud.sessions import CloudConfig
from tests.conftest import TOKENS, free_port, make_edge, randomize_lora_b, sst2_batches


class Restartable:
    def __init__(self, model, port: int):
        self.model, self.port, self.address = model, port, f"127.0.0.1:{port}"
        self.server = None
        self.start()

    def start(self):
        svc = BackboneService(copy.deepcopy(self.model), {v: k for k, v in TOKENS.items()}, CloudConfig(step_timeout=5))
        self.service = svc
        self.server, _ = make_server(svc, self.address)
        self.server.start()

    def stop(self):
        self.service.stop()
        self.server.stop(0).wait()


@pytest.fixture
def restartable(tiny):
    cloud = Restartable(tiny.model, free_port())
    yield cloud
    cloud.stop()


def edge(cloud, tiny):
    em, _, link = make_edge(cloud, tiny, cloud_lora="edge")
    link.cfg.backoff, link.cfg.max_backoff = 0.1, 0.5
    randomize_lora_b(em.lora)
    return em, link


def grads(em) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in em.lora.named_parameters() if p.grad is not None}


def test_backward_after_a_cloud_restart_is_replayed_with_the_same_gradients(tiny, restartable):
    batch = sst2_batches(1)[0]
    ref, ref_link = edge(restartable, tiny)
    loss_ref, _ = ref.loss(batch)
    loss_ref.backward()
    ref_link.close()

    em, link = edge(restartable, tiny)
    first_session = link.session.session_id
    loss, _ = em.loss(batch)
    restartable.stop()  # the cloud goes away between the forward and the backward: its graph is lost
    restartable.start()
    loss.backward()
    assert link.session.session_id != first_session  # the link reopened a session on the new cloud
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    want, got = grads(ref), grads(em)
    assert want.keys() == got.keys() and len(got) > 0
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-7), name
    link.close()


def test_a_forward_only_call_waits_out_a_short_outage(tiny, restartable):
    batch = sst2_batches(1)[0]
    em, link = edge(restartable, tiny)
    with torch.no_grad():
        _, logits_ref = em.loss(batch)
    restartable.stop()
    threading.Timer(1.0, restartable.start).start()
    t0 = time.monotonic()
    with torch.no_grad():
        _, logits = em.loss(batch)
    assert time.monotonic() - t0 >= 0.9  # it really waited for the restart
    assert torch.allclose(logits, logits_ref, atol=1e-6)
    link.close()


def test_a_callers_mistake_is_not_retried(tiny, restartable, caplog):
    em, link = edge(restartable, tiny)
    link.metadata = [("authorization", "Bearer not-a-token")]
    from edge.link import StepFailed
    with pytest.raises(StepFailed) as e, torch.no_grad(), caplog.at_level("WARNING", logger="tandem.edge"):
        em.loss(sst2_batches(1)[0])
    assert e.value.code.name == "UNAUTHENTICATED"
    assert not [r for r in caplog.records if "retry" in r.getMessage()]  # a permanent error: no second attempt
    link.metadata = [("authorization", f"Bearer {TOKENS['alice']}")]
    link.close()
