"""Many edges on one cloud GPU: an event-driven simulation of N edges running the same step, sharing the cloud.

Each edge repeats the phases of one step (sim.costmodel.StepCost.phases): its own compute and its own link take the
time they take alone (every edge has its own access link; the cloud's NIC is assumed not to be the bottleneck), while
every cloud phase becomes a job in the cloud's queue. The cloud runs one batch at a time: it takes the oldest job and
up to `max_batch - 1` more waiting jobs with the same key (same blocks, same direction, so the same weights) and runs
them together in max(sum FLOPs / FLOP/s, weights read once / memory bandwidth) + the per-job overhead. Batching thus
saves weight reads and fixed overheads, never FLOPs.

Memory: a step holds its cloud activations from its first forward job until its last backward job (the autograd
graph lives for the whole step). A new step's first job waits until that much cloud memory is free, which caps the
number of steps in flight.

Reported (measured over the window in which every edge is past its warm-up and none has finished): mean step time,
cloud utilisation (busy time / window), steps per second, mean batch size, steps in flight at most.
"""
from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass

from sim.costmodel import Phase, StepCost, cloud_job_seconds
from sim.profiles import DeviceProfile


@dataclass(frozen=True)
class SharedResult:
    n_edges: int
    step_s: float  # mean step time per edge
    alone_step_s: float  # the same step with the cloud to itself
    cloud_utilisation: float
    steps_per_s: float  # all edges together
    mean_batch: float
    max_in_flight: int
    memory_slots: int  # steps whose activations fit on the cloud at once

    @property
    def slowdown(self) -> float:
        return self.step_s / self.alone_step_s


def memory_slots(cost: StepCost, cloud: DeviceProfile) -> int:
    """How many steps' cloud activations fit next to the cloud weights."""
    free = cloud.memory - cost.cloud.weight_bytes
    if cost.cloud.activation_bytes <= 0 or math.isinf(free):
        return 1 << 30
    return max(0, int(free // cost.cloud.activation_bytes))


@dataclass
class _Job:
    edge: int
    phase: Phase
    first: bool  # the step's first cloud job (takes memory)
    last: bool  # the step's last cloud job (frees it)
    order: int  # arrival order (oldest first)


def simulate(cost: StepCost, n_edges: int, cloud: DeviceProfile, *, steps: int = 12, warmup: int = 2,
             max_batch: int = 16, batching: bool = True, seed: int = 0) -> SharedResult:
    """Run `n_edges` edges for `steps` steps each; see the module docstring for the model."""
    phases = cost.phases
    cloud_idx = [i for i, p in enumerate(phases) if p.where == "cloud"]
    if not cloud_idx:
        raise ValueError(f"path {cost.path} does not use the cloud per step")
    first_c, last_c = cloud_idx[0], cloud_idx[-1]
    slots = memory_slots(cost, cloud)
    if slots < 1:
        raise ValueError(f"one step's cloud activations ({cost.cloud.activation_bytes / 1e9:.1f} GB) do not fit "
                         f"next to the weights on {cloud.name}")
    alone = sum(p.seconds for p in phases)
    rng = random.Random(seed)

    events: list[tuple[float, int, int]] = []  # (time, tie-break, edge): the edge's current phase ends
    counter = 0
    pos = [-1] * n_edges  # phase each edge is in (-1: not started yet)
    step_no = [0] * n_edges
    step_start = [0.0] * n_edges
    finished_steps: list[tuple[float, float]] = []  # (end time, duration) of steps past warm-up
    warm_at = [math.inf] * n_edges
    done_at = [math.inf] * n_edges
    waiting: dict[str, deque[_Job]] = {}  # per key, oldest first (a key's jobs are all first jobs or none are)
    in_flight = max_in_flight = 0
    cloud_free_at = 0.0
    busy: list[tuple[float, float]] = []
    batches: list[int] = []

    def push(t: float, edge: int):
        nonlocal counter
        heapq.heappush(events, (t, counter, edge))
        counter += 1

    def run_cloud(t: float):
        """If the cloud is free, start the next batch: the oldest job that may start, plus same-key jobs."""
        nonlocal cloud_free_at, in_flight, max_in_flight
        if t < cloud_free_at:
            return
        ready = [q[0] for q in waiting.values() if q and (not q[0].first or in_flight < slots)]
        if not ready:
            return
        head = min(ready, key=lambda j: j.order)
        q = waiting[head.phase.key]
        n = min(len(q), max_batch if batching else 1, slots - in_flight if head.first else len(q))
        batch = [q.popleft() for _ in range(n)]
        in_flight += sum(j.first for j in batch)
        max_in_flight = max(max_in_flight, in_flight)
        cloud_free_at = t + cloud_job_seconds(cloud, sum(j.phase.flops for j in batch), head.phase.weight_bytes,
                                              sum(j.phase.tokens for j in batch))
        busy.append((t, cloud_free_at))
        batches.append(n)
        for j in batch:
            push(cloud_free_at, j.edge)
            in_flight -= j.last  # freed when this batch ends; nothing else runs before then

    for e in range(n_edges):  # stagger the starts over one step, as independent users would
        step_start[e] = rng.uniform(0, alone) if n_edges > 1 else 0.0
        push(step_start[e], e)

    while events:
        t, _, e = heapq.heappop(events)
        pos[e] += 1
        if pos[e] == len(phases):  # the step is done
            step_no[e] += 1
            if step_no[e] == warmup:
                warm_at[e] = t
            elif step_no[e] > warmup:
                finished_steps.append((t, t - step_start[e]))
            if step_no[e] == steps:
                done_at[e] = t
                run_cloud(t)
                continue
            pos[e], step_start[e] = 0, t
        p = phases[pos[e]]
        if p.where == "cloud":
            waiting.setdefault(p.key, deque()).append(_Job(e, p, pos[e] == first_c, pos[e] == last_c, counter))
            counter += 1
        else:
            push(t + p.seconds, e)
        run_cloud(t)
        if not events and any(waiting.values()):
            raise RuntimeError("simulation deadlocked: cloud jobs wait but nothing else runs")

    lo, hi = max(warm_at), min(done_at)
    if not hi > lo:
        lo, hi = 0.0, max(done_at)
    window = [d for end, d in finished_steps if lo <= end <= hi] or [d for _, d in finished_steps]
    busy_s = sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in busy)
    n_steps = sum(1 for end, _ in finished_steps if lo <= end <= hi)
    return SharedResult(n_edges, sum(window) / len(window), alone, busy_s / (hi - lo), n_steps / (hi - lo),
                        sum(batches) / len(batches), max_in_flight, slots)


def sweep(cost: StepCost, cloud: DeviceProfile, ns, **kw) -> list[SharedResult]:
    return [simulate(cost, n, cloud, **kw) for n in ns]


def cloud_seconds_per_step(cost: StepCost) -> float:
    return sum(p.seconds for p in cost.phases if p.where == "cloud")


@dataclass(frozen=True)
class SaturationPoint:
    n: int  # the smallest N at which the cloud no longer keeps up
    limit: str  # "compute" (cloud busy >= threshold), "memory" (steps wait for activation memory) or "queueing"
    result: SharedResult  # the simulation at N
    compute_bound_n: float  # step time alone / cloud time per step: where compute alone would saturate


def saturation(cost: StepCost, cloud: DeviceProfile, threshold: float = 0.95, slowdown: float = 1.10,
               limit: int = 1024, **kw) -> SaturationPoint:
    """The smallest N at which the cloud saturates: it is busy `threshold` of the time, or edges' steps take
    `slowdown` times longer than alone (they queue for compute or for activation memory). Found by doubling from
    a lower bound, then bisecting to within 1/64 of N (exact below 128 edges)."""
    kw.setdefault("steps", 8)
    busy = cloud_seconds_per_step(cost)
    alone = sum(p.seconds for p in cost.phases)
    compute_n = alone / busy if busy > 0 else math.inf

    def saturated(r: SharedResult) -> bool:
        return r.cloud_utilisation >= threshold or r.slowdown >= slowdown

    # Below both bounds nothing can saturate: utilisation <= N * busy / alone, and memory never runs out.
    hi = max(1, min(memory_slots(cost, cloud), int(threshold * compute_n)))
    result = simulate(cost, hi, cloud, **kw)
    lo = 0
    while not saturated(result) and hi < limit:
        lo, hi = hi, min(2 * hi, limit)
        result = simulate(cost, hi, cloud, **kw)
    while hi - lo > max(1, hi // 64):
        mid = (lo + hi) // 2
        r = simulate(cost, mid, cloud, **kw)
        if saturated(r):
            hi, result = mid, r
        else:
            lo = mid
    kind = ("compute" if result.cloud_utilisation >= threshold
            else "memory" if result.max_in_flight >= result.memory_slots else "queueing")
    return SaturationPoint(hi, kind, result, compute_n)
