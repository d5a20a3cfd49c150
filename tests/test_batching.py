"""One cloud forward for many sessions: batched results equal each session's step run alone, whatever the padding,
and a session whose edge stalls inside a batched step delays nobody else."""
from __future__ import annotations

import copy
import threading

import grpc
import pytest
import torch

from cloud.batching import Job, StepBatcher, length_groups
from cloud.compute import CarriedLoRA, CloudSegment
from cloud.sessions import CloudConfig
from tests.conftest import CloudHandle, make_edge, sst2_batches, train_edge_steps

BLOCKS = range(1, 5)


def frozen(tiny):
    model = copy.deepcopy(tiny.model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def carried(segment: CloudSegment, seed: int, blocks=BLOCKS, targets=("q_proj", "v_proj"), r: int = 4):
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for b in blocks:
        for t in targets:
            n_in, n_out = segment.site_dims(b, t)
            weights[b, t] = (torch.randn(r, n_in, generator=g).requires_grad_(True),
                             (0.1 * torch.randn(n_out, r, generator=g)).requires_grad_(True))
    return CarriedLoRA(weights, 2.0)


def session_inputs(seed: int, B: int, T: int, H: int, pad_from: int | None = None):
    g = torch.Generator().manual_seed(seed)
    hidden, grad = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
    return hidden, mask, grad


def alone(segment, hidden, mask, grad, lora):
    """The step run by itself: output, input gradient, carried LoRA gradients."""
    lora = None if lora is None else CarriedLoRA({k: (a.detach().clone().requires_grad_(True),
                                                      b.detach().clone().requires_grad_(True))
                                                  for k, (a, b) in lora.weights.items()}, lora.scaling)
    x = hidden.clone().requires_grad_(True)
    out = segment.forward(x, mask, BLOCKS, lora)
    out.backward(grad)
    grads = {k: (a.grad, b.grad) for k, (a, b) in lora.weights.items()} if lora else {}
    return out.detach(), x.grad, grads


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def run_together(batcher, jobs, grads):
    """Each job from its own worker thread, as the service runs them: forward, then backward with its gradient."""
    results, errors = {}, []

    def worker(i, job):
        try:
            out = batcher.forward(job, 60)
            results[i] = (out, batcher.backward(job, grads[i], 60))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


@pytest.mark.parametrize("pad_slack", [10.0, 0.0], ids=["padded-together", "by-length"])
def test_batched_steps_equal_each_session_alone(tiny, pad_slack):
    segment = CloudSegment(frozen(tiny))
    H = tiny.model.config.hidden_size
    # ragged: lengths 7, 12, 12, 5; one frozen-split session, three with their own carried LoRA (one on two blocks)
    specs = [(2, 7, 3, carried(segment, 1)), (3, 12, 9, None), (1, 12, None, carried(segment, 2, blocks=(2, 4))),
             (2, 5, 2, carried(segment, 3, targets=("o_proj", "up_proj", "down_proj")))]
    inputs = [session_inputs(10 + i, B, T, H, pad) for i, (B, T, pad, _) in enumerate(specs)]
    expected = [alone(segment, h, m, g, lo) for (h, m, g), (*_, lo) in zip(inputs, specs)]

    batcher = StepBatcher(segment, window=2.0, pad_slack=pad_slack)  # a long window: all four meet in one batch
    try:
        jobs = [Job(BLOCKS, h, m, lo, True) for (h, m, _), (*_, lo) in zip(inputs, specs)]
        results = run_together(batcher, jobs, [g for _, _, g in inputs])
        groups = length_groups(jobs, pad_slack)
        assert batcher.jobs_run == 4 and batcher.batches == len(groups)
        assert len(groups) == (1 if pad_slack > 1 else 3)  # by length: 5 | 7 | 12, 12
    finally:
        batcher.stop()
    for i, (job, (out, x_grad, lora_grads)) in enumerate(zip(jobs, expected)):
        got_out, got_grad = results[i]
        assert got_out.shape == out.shape and rel(got_out, out) <= 1e-5, i
        assert rel(got_grad, x_grad) <= 1e-5, i
        for key, (ga, gb) in lora_grads.items():
            a, b = job.lora.weights[key]
            assert rel(a.grad, ga) <= 1e-5 and rel(b.grad, gb) <= 1e-5, (i, key)


def test_a_stalled_gradient_delays_no_one_and_still_gets_its_backward(tiny):
    segment = CloudSegment(frozen(tiny))
    H = tiny.model.config.hidden_size
    inputs = [session_inputs(20 + i, 2, 6, H) for i in range(2)]
    lora = [carried(segment, 5), carried(segment, 6)]
    expected = [alone(segment, h, m, g, lo) for (h, m, g), lo in zip(inputs, lora)]
    batcher = StepBatcher(segment, window=0.05)
    try:
        jobs = [Job(BLOCKS, h, m, lo, True) for (h, m, _), lo in zip(inputs, lora)]
        outs = [None, None]
        threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, batcher.forward(jobs[i], 60)))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert batcher.batches == 1  # both in one forward (the window waits for the second)
        # session 0's edge answers; session 1's stalls: session 0's backward runs without it
        grad0 = batcher.backward(jobs[0], inputs[0][2], 60)
        assert rel(grad0, expected[0][1]) <= 1e-5
        assert jobs[1].grad is None and jobs[1].input_grad is None and jobs[1] in jobs[0].group.waiting
        # the late gradient gets its own backward on the kept graph, with the same result as alone
        grad1 = batcher.backward(jobs[1], inputs[1][2], 60)
        assert rel(grad1, expected[1][1]) <= 1e-5
        for key, (ga, gb) in expected[1][2].items():
            a, b = jobs[1].lora.weights[key]
            assert rel(a.grad, ga) <= 1e-5 and rel(b.grad, gb) <= 1e-5
        assert not batcher._groups  # the graph is gone once nobody waits
    finally:
        batcher.stop()


def test_an_edge_that_stalls_in_a_batched_step_over_grpc_does_not_hold_up_another(tiny):
    """Over gRPC: a raw client takes `hidden` and never sends its gradient; a real edge in the same cloud keeps
    training, each of its steps well inside its own 20 s RPC deadline and with no retry allowed."""
    cloud = CloudHandle(tiny.model, CloudConfig(max_tokens_per_step=4096, step_timeout=60.0, batching="on",
                                                batch_window=0.2))
    try:
        from tests.test_service_errors import begin, open_session, stub_for
        stub, md, channel = stub_for(cloud, "bob")
        sid = open_session(stub, md, tiny).session_id
        outbox: list = [begin(sid, train=True)]
        stalled = stub.Step(iter(outbox), metadata=md, timeout=60)  # the iterator ends: no output_grad follows
        assert next(stalled).WhichOneof("kind") == "hidden"
        em, _, link = make_edge(cloud, tiny, timeout=20.0, patience=0.0)
        losses = train_edge_steps(em, sst2_batches(3))
        assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
        link.close()
        with pytest.raises(grpc.RpcError):
            list(stalled)
        channel.close()
    finally:
        cloud.stop()


def test_batching_off_runs_each_step_alone_with_the_same_losses(tiny):
    losses = {}
    for batching in ("on", "off"):
        cloud = CloudHandle(tiny.model, CloudConfig(max_tokens_per_step=4096, step_timeout=5.0, batching=batching))
        try:
            em, _, link = make_edge(cloud, tiny, cloud_lora="carried")
            losses[batching] = train_edge_steps(em, sst2_batches(4))
            link.close()
            assert (cloud.service.batcher is None) == (batching == "off")
            if batching == "on":
                assert cloud.service.batcher.jobs_run == 4
        finally:
            cloud.stop()
    assert max(abs(a - b) / abs(b) for a, b in zip(losses["on"], losses["off"])) <= 1e-5
