"""Nothing is lost on a crash: the edge survives a cloud restart, and an edge restart resumes from its checkpoint."""
from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from cloud.rpc import BackboneService, make_server
from cloud.sessions import CloudConfig
from edge.trainer import EdgeConfig, train
from tests.conftest import TOKENS


def start_cloud(tiny, port=0):
    svc = BackboneService(copy.deepcopy(tiny.model), {v: k for k, v in TOKENS.items()}, CloudConfig(step_timeout=5))
    server, port = make_server(svc, f"127.0.0.1:{port}")
    server.start()
    return server, port


def test_edge_survives_a_cloud_restart(tiny, tmp_path):
    server, port = start_cloud(tiny)
    restarted = {}

    def crash_and_restart(em, step):
        if step == 4 and not restarted:
            server.stop(0).wait()  # the cloud dies mid-training, every session with it
            threading.Timer(1.5, lambda: restarted.update(s=start_cloud(tiny, port)[0])).start()

    cfg = EdgeConfig.of(cloud=f"127.0.0.1:{port}", token=TOKENS["alice"], model="tiny-llama", cloud_lora="edge",
                        steps=8, batch_size=4, eval_before=False, eval_after=False, progress=False, lr=1e-2)
    m = train(cfg, loaded=copy.deepcopy(tiny), step_hook=crash_and_restart).metrics
    assert "s" in restarted  # the cloud really went down and came back during training
    assert [r["step"] for r in m["steps"]] == list(range(8))
    assert m["steps"][-1]["loss"] < m["steps"][0]["loss"]
    restarted["s"].stop(0)


def test_edge_resumes_from_its_checkpoint_after_a_crash(tiny, tmp_path):
    server, port = start_cloud(tiny)
    base = dict(cloud=f"127.0.0.1:{port}", token=TOKENS["alice"], model="tiny-llama", cloud_lora="edge", steps=6,
                batch_size=4, eval_before=False, eval_after=False, progress=False, lr=1e-2, checkpoint_every=3)
    full = train(EdgeConfig.of(**base, out_dir=str(tmp_path / "a")), loaded=copy.deepcopy(tiny))

    class Crash(Exception):
        pass

    def crash(em, step):
        if step == 4:
            raise Crash()

    with pytest.raises(Crash):  # the edge dies at step 4, after the checkpoint of step 3
        train(EdgeConfig.of(**base, out_dir=str(tmp_path / "b")), loaded=copy.deepcopy(tiny), step_hook=crash)
    resumed = train(EdgeConfig.of(**base, out_dir=str(tmp_path / "b")), loaded=copy.deepcopy(tiny))
    # steps 0-2 came from the checkpoint, 3-5 were trained again: the same run as without the crash
    assert [r["step"] for r in resumed.metrics["steps"]] == list(range(6))
    a = [r["loss"] for r in full.metrics["steps"]]
    b = [r["loss"] for r in resumed.metrics["steps"]]
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-5
    wa, wb = full.adapter(), resumed.adapter()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    server.stop(0)


def test_an_outage_longer_than_the_backoff_is_waited_out_and_the_loss_curve_is_unchanged(tiny):
    """The cloud is down for several seconds (a real restart: every session lost); the edge keeps retrying for
    `--patience` seconds, reopens its session and resumes at the same step, so its losses equal an uninterrupted
    run's. The outage is shortened by options (patience, backoff), not mocked."""
    def run(outage: float | None) -> list[float]:
        server, port = start_cloud(tiny)
        state = {"server": server}

        def outage_at_step_3(em, step):
            if outage is not None and step == 3 and "down_at" not in state:
                state["server"].stop(0).wait()
                state["down_at"] = time.monotonic()
                threading.Timer(outage, lambda: state.update(server=start_cloud(tiny, port)[0],
                                                             up_at=time.monotonic())).start()

        cfg = EdgeConfig.of(cloud=f"127.0.0.1:{port}", token=TOKENS["alice"], model="tiny-llama", cloud_lora="edge",
                            steps=6, batch_size=4, eval_before=False, eval_after=False, progress=False, lr=1e-2,
                            patience=120.0, backoff=0.2, max_backoff=1.0)
        losses = [r["loss"] for r in train(cfg, loaded=copy.deepcopy(tiny), step_hook=outage_at_step_3).metrics["steps"]]
        if outage is not None:
            assert state["up_at"] - state["down_at"] >= outage  # the cloud really was away that long
        state["server"].stop(0)
        return losses

    assert run(outage=6.0) == pytest.approx(run(outage=None), rel=1e-6)
