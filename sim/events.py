"""Many edges on one cloud GPU: an event-driven simulation of N edges running the same step, sharing the cloud.

Each edge repeats the phases of one step (sim.costmodel.StepCost.phases): its own compute and its own link take the
time they take alone (every edge has its own access link; the cloud's NIC is assumed not to be the bottleneck), while
every cloud phase becomes a job in the cloud's queue. The cloud runs one batch at a time: it takes the oldest job and
up to `max_batch - 1` more waiting jobs with the same key (same blocks, same direction, so the same weights; none
for a job the cloud runs alone, Phase.alone) and runs them together in max(sum FLOPs / FLOP/s, weights read once /
memory bandwidth) + the per-job overhead. Batching thus saves weight reads and fixed overheads, never FLOPs.

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


def _cloud_span(cost: StepCost, cloud: DeviceProfile) -> tuple[int, int, int]:
    """The step's first and last cloud phase and its memory slots; raises when the step cannot share a cloud."""
    cloud_idx = [i for i, p in enumerate(cost.phases) if p.where == "cloud"]
    if not cloud_idx:
        raise ValueError(f"path {cost.path} does not use the cloud per step")
    slots = memory_slots(cost, cloud)
    if slots < 1:
        raise ValueError(f"one step's cloud activations ({cost.cloud.activation_bytes / 1e9:.1f} GB) do not fit "
                         f"next to the weights on {cloud.name}")
    return cloud_idx[0], cloud_idx[-1], slots


class _Simulation:
    """One run: a heap of phase ends, each edge's place in its steps, and the cloud's queues of waiting jobs."""

    def __init__(self, cost: StepCost, n_edges: int, cloud: DeviceProfile, *, steps: int, warmup: int,
                 max_batch: int):
        self.phases = cost.phases
        self.first_c, self.last_c, self.slots = _cloud_span(cost, cloud)
        self.cloud, self.steps, self.warmup, self.max_batch = cloud, steps, warmup, max_batch
        self.events: list[tuple[float, int, int]] = []  # (time, tie-break, edge): the edge's current phase ends
        self.counter = 0
        self.pos = [-1] * n_edges  # phase each edge is in (-1: not started yet)
        self.step_no = [0] * n_edges
        self.step_start = [0.0] * n_edges
        self.finished_steps: list[tuple[float, float]] = []  # (end time, duration) of steps past warm-up
        self.warm_at = [math.inf] * n_edges
        self.done_at = [math.inf] * n_edges
        self.waiting: dict[str, deque[_Job]] = {}  # per key, oldest first (a key's jobs are all first jobs or none are)
        self.in_flight = self.max_in_flight = 0
        self.cloud_free_at = 0.0
        self.busy: list[tuple[float, float]] = []
        self.batches: list[int] = []

    @staticmethod
    def key(p: Phase, edge: int) -> str:
        """The queue of a cloud job: its phase's key, or its own edge's when the cloud runs it alone."""
        return f"{p.key}@{edge}" if p.alone else p.key

    def push(self, t: float, edge: int):
        heapq.heappush(self.events, (t, self.counter, edge))
        self.counter += 1

    def start(self, edge: int, t: float):
        self.step_start[edge] = t
        self.push(t, edge)

    def run_cloud(self, t: float):
        """If the cloud is free, start the next batch: the oldest job that may start, plus same-key jobs."""
        if t < self.cloud_free_at:
            return
        ready = [q[0] for q in self.waiting.values() if q and (not q[0].first or self.in_flight < self.slots)]
        if not ready:
            return
        head = min(ready, key=lambda j: j.order)
        q = self.waiting[self.key(head.phase, head.edge)]
        n = min(len(q), self.max_batch, self.slots - self.in_flight if head.first else len(q))
        batch = [q.popleft() for _ in range(n)]
        self.in_flight += sum(j.first for j in batch)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.cloud_free_at = t + cloud_job_seconds(self.cloud, sum(j.phase.flops for j in batch),
                                                   head.phase.weight_bytes, sum(j.phase.tokens for j in batch))
        self.busy.append((t, self.cloud_free_at))
        self.batches.append(n)
        for j in batch:
            self.push(self.cloud_free_at, j.edge)
            self.in_flight -= j.last  # freed when this batch ends; nothing else runs before then

    def _end_step(self, t: float, e: int) -> bool:
        """Edge `e` finished a step at `t`: count it, and start the next one unless that was its last (False)."""
        self.step_no[e] += 1
        if self.step_no[e] == self.warmup:
            self.warm_at[e] = t
        elif self.step_no[e] > self.warmup:
            self.finished_steps.append((t, t - self.step_start[e]))
        if self.step_no[e] == self.steps:
            self.done_at[e] = t
            return False
        self.pos[e], self.step_start[e] = 0, t
        return True

    def _enter_phase(self, t: float, e: int):
        """Edge `e` enters its next phase at `t`: a cloud job joins its queue, anything else just takes its time."""
        p = self.phases[self.pos[e]]
        if p.where == "cloud":
            job = _Job(e, p, self.pos[e] == self.first_c, self.pos[e] == self.last_c, self.counter)
            self.waiting.setdefault(self.key(p, e), deque()).append(job)
            self.counter += 1
        else:
            self.push(t + p.seconds, e)

    def run(self):
        while self.events:
            t, _, e = heapq.heappop(self.events)
            self.pos[e] += 1
            if self.pos[e] == len(self.phases) and not self._end_step(t, e):
                self.run_cloud(t)
                continue
            self._enter_phase(t, e)
            self.run_cloud(t)
            if not self.events and any(self.waiting.values()):
                raise RuntimeError("simulation deadlocked: cloud jobs wait but nothing else runs")

    def result(self, alone: float) -> SharedResult:
        """Means over the window in which every edge is past its warm-up and none has finished."""
        lo, hi = max(self.warm_at), min(self.done_at)
        if not hi > lo:
            lo, hi = 0.0, max(self.done_at)
        finished = self.finished_steps
        window = [d for end, d in finished if lo <= end <= hi] or [d for _, d in finished]
        busy_s = sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in self.busy)
        n_steps = sum(1 for end, _ in finished if lo <= end <= hi)
        return SharedResult(len(self.pos), sum(window) / len(window), alone, busy_s / (hi - lo), n_steps / (hi - lo),
                            sum(self.batches) / len(self.batches), self.max_in_flight, self.slots)


def simulate(cost: StepCost, n_edges: int, cloud: DeviceProfile, *, steps: int = 12, warmup: int = 2,
             max_batch: int = 16, batching: bool = True, seed: int = 0) -> SharedResult:
    """Run `n_edges` edges for `steps` steps each; see the module docstring for the model."""
    run = _Simulation(cost, n_edges, cloud, steps=steps, warmup=warmup, max_batch=max_batch if batching else 1)
    alone = sum(p.seconds for p in cost.phases)
    rng = random.Random(seed)
    for e in range(n_edges):  # stagger the starts over one step, as independent users would
        run.start(e, rng.uniform(0, alone) if n_edges > 1 else 0.0)
    run.run()
    return run.result(alone)


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
