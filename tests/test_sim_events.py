"""N edges on one cloud: the event simulation agrees with the single-edge model and behaves as queueing should."""
from __future__ import annotations

import dataclasses

import pytest

from sim.costmodel import Workload, predict
from sim.events import memory_slots, saturation, simulate, sweep
from sim.profiles import device_profile, rate_link
from sim.shape import load_shape

SHAPE = load_shape("llama-7b")
W = Workload(batch=8, seq=256, wire_up="bf16", wire_down="bf16")
EDGE, CLOUD = device_profile("rtx-4090"), device_profile("h100-sxm")


def cost(path="split", rate=1e9):
    return predict(SHAPE, path, W, EDGE, CLOUD, rate_link(rate))


@pytest.mark.parametrize("path", ["split", "dlora"])
def test_one_edge_alone_matches_the_step_model(path):
    c = cost(path)
    r = simulate(c, 1, CLOUD, steps=5)
    assert r.step_s == pytest.approx(c.step_s, rel=1e-9)
    assert r.cloud_utilisation == pytest.approx(c.cloud.seconds / c.step_s, rel=1e-6)
    assert r.mean_batch == 1.0


def test_more_edges_load_the_cloud_more_and_never_beyond_full():
    rs = sweep(cost(), CLOUD, [1, 2, 4, 8, 16, 32])
    utils = [r.cloud_utilisation for r in rs]
    assert utils == sorted(utils) and utils[-1] <= 1.0 + 1e-9 and utils[-1] > 0.95
    steps = [r.step_s for r in rs]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(steps, steps[1:]))
    assert rs[-1].step_s > 2 * rs[0].step_s  # past saturation, everyone waits
    # compute-bound: the saturated cloud delivers about one step per cloud-step of work (batching saves only the
    # per-job overhead and weight reads)
    assert rs[-1].steps_per_s == pytest.approx(1 / cost().cloud.seconds, rel=0.1)


def test_memory_caps_steps_in_flight():
    small = dataclasses.replace(CLOUD, memory=cost().cloud.weight_bytes + 3.5 * cost().cloud.activation_bytes)
    assert memory_slots(cost(), small) == 3
    r = simulate(cost(rate=100e6), 16, small)
    assert r.max_in_flight <= 3
    assert r.step_s > 1.5 * r.alone_step_s


def test_batching_helps_a_memory_bound_cloud():
    slow_memory = dataclasses.replace(CLOUD, memory_bandwidth=0.2e12)  # weight reads dominate each job
    c = predict(SHAPE, "split", dataclasses.replace(W, batch=1, seq=64), EDGE, slow_memory, rate_link(1e9))
    batched = simulate(c, 32, slow_memory, batching=True)
    alone = simulate(c, 32, slow_memory, batching=False)
    assert batched.mean_batch > 1.5
    assert batched.steps_per_s > 1.3 * alone.steps_per_s


def test_saturation_is_the_first_n_that_no_longer_keeps_up():
    c = cost()
    point = saturation(c, CLOUD)
    r = point.result
    assert r.cloud_utilisation >= 0.95 or r.slowdown >= 1.10
    before = simulate(c, point.n - 1, CLOUD, steps=8)
    assert before.cloud_utilisation < 0.95 and before.slowdown < 1.10
    assert point.compute_bound_n == pytest.approx(c.step_s / c.cloud.seconds)
