"""One cloud forward and one backward for the steps of many sessions (continuous batching of the frozen segment).

Steps without LoRA exchanges (frozen split, the carried mode) need nothing from their edge between `begin` and
`output_grad`, so the cloud can run several sessions' steps as one batch: their rows are stacked (right-padded to
the longest sequence, masked), each session's rows get its own carried LoRA (`RowsLoRA`) or none, and the results
are cut back apart. Rows never mix in a decoder block (attention, norms and linears are per row), so a session's
result is the one it gets alone, up to float rounding. DLoRA steps, which wait on their edge inside the forward,
run alone (cloud/step_runner.py).

One compute thread runs the batches, so concurrent steps no longer fight over the cores:

  forward    a step's worker submits its job and waits. The thread takes the first queued job, waits up to `window`
             seconds for more (at once if the cloud was busy: whatever queued meanwhile goes in), up to `max_tokens`
             padded tokens, splits the jobs into groups of similar length (a group is padded to its longest only
             while that adds at most `pad_slack` of its real tokens) and runs each group's forward.
  backward   each train job's worker sends `hidden`, receives its edge's output gradient and hands it in. A group
             runs its backward when every train job's gradient is in, or `window` seconds after the first came: a
             slow or failing edge delays nobody past the window. A late gradient gets its own backward on the kept
             graph; a job whose worker gave up (`abandon`) is dropped, and the graph goes when no job waits.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cloud.compute import CarriedLoRA, CloudSegment
from model.tuners.lora import lora_delta

log = logging.getLogger("tandem.cloud")


@dataclass(eq=False)
class Job:
    """One session's step in a batch: its input, its carried LoRA (or None), and what the batch hands back."""
    blocks: range
    hidden: torch.Tensor  # [B, T, H]
    mask: torch.Tensor  # [B, T]
    lora: CarriedLoRA | None
    train: bool
    arrived: float = field(default_factory=time.monotonic)
    out: torch.Tensor | None = None
    grad: torch.Tensor | None = None  # dL/d out, from the edge
    input_grad: torch.Tensor | None = None
    seconds: float = 0.0  # this job's share of the batch's compute
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    group: "Group | None" = None

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


class RowsLoRALinear(nn.Module):
    """A frozen linear over a stacked batch, plus each session's carried LoRA on its own rows only."""

    def __init__(self, base: nn.Module, pieces: list[tuple[int, int, torch.Tensor, torch.Tensor, float] | None],
                 rows: list[tuple[int, int]]):
        super().__init__()
        self.base, self.pieces, self.rows = base, pieces, rows

    def forward(self, x):
        out = self.base(x)
        parts = []
        for (start, stop), piece in zip(self.rows, self.pieces):
            if piece is None:
                parts.append(out.new_zeros((stop - start, *out.shape[1:])))
            else:
                a, b, scaling = piece
                parts.append(lora_delta(x[start:stop], a, b, scaling).to(out.dtype))
        return out + torch.cat(parts)


class RowsLoRA:
    """The sites of a stacked batch: each job's carried LoRA on its rows (`wrap` as compute.CarriedLoRA's)."""

    def __init__(self, jobs: list[Job], rows: list[tuple[int, int]]):
        self.jobs, self.rows = jobs, rows
        loras = [j.lora for j in jobs if j.lora is not None]
        self.active = set().union(*(lo.active for lo in loras))
        self.sites = list(dict.fromkeys(s for lo in loras for s in lo.sites))

    def wrap(self, base: nn.Module, block: int, site: str, widths: dict[str, int]) -> nn.Module:
        pieces = []
        for j in self.jobs:
            w = j.lora.weights.get((block, site)) if j.lora is not None else None
            pieces.append(None if w is None else (*w, j.lora.scaling))
        return RowsLoRALinear(base, pieces, self.rows)


class Group:
    """Jobs that ran as one forward; their backward waits for their gradients (see the module docstring)."""

    def __init__(self, jobs: list[Job], x: torch.Tensor, out: torch.Tensor, rows: list[tuple[int, int]]):
        self.jobs, self.x, self.out, self.rows = jobs, x, out, rows
        self.waiting = [j for j in jobs if j.train]  # train jobs whose backward has not run
        self.first_grad: float | None = None

    def ready(self, now: float, window: float) -> list[Job]:
        """The jobs to run backward for now: all with a gradient once all are in, or once the window ran out."""
        have = [j for j in self.waiting if j.grad is not None]
        if have and (len(have) == len(self.waiting) or now >= self.first_grad + window):
            return have
        return []


def pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    return t if t.shape[1] == length else F.pad(t, (0, 0, 0, length - t.shape[1]) if t.dim() == 3
                                                 else (0, length - t.shape[1]))


def length_groups(jobs: list[Job], pad_slack: float) -> list[list[Job]]:
    """Jobs of the same cloud blocks, sorted by sequence length, cut where padding to the longest would add more
    than `pad_slack` of the group's real tokens."""
    out: list[list[Job]] = []
    for blocks in dict.fromkeys(j.blocks for j in jobs):
        group: list[Job] = []
        for j in sorted((j for j in jobs if j.blocks == blocks), key=lambda j: j.hidden.shape[1]):
            cand = group + [j]
            rows, real = sum(c.hidden.shape[0] for c in cand), sum(c.tokens for c in cand)
            if group and rows * j.hidden.shape[1] > (1 + pad_slack) * real:
                out.append(group)
                cand = [j]
            group = cand
        out.append(group)
    return out


class StepBatcher:
    def __init__(self, segment: CloudSegment, window: float = 0.005, max_tokens: int = 65536,
                 pad_slack: float = 0.25):
        self.segment, self.window, self.max_tokens, self.pad_slack = segment, window, max_tokens, pad_slack
        self._queue: list[Job] = []
        self._groups: list[Group] = []
        self._cond = threading.Condition()
        self._stop = False
        self.batches = 0  # forwards run, and the jobs they held (for tests and the bench)
        self.jobs_run = 0
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tandem-batcher")
        self._thread.start()

    # ---- called by a step's worker ------------------------------------------------------------------------------
    def forward(self, job: Job, timeout: float) -> torch.Tensor:
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()
        return self._wait(job, timeout, "forward")

    def backward(self, job: Job, grad: torch.Tensor, timeout: float) -> torch.Tensor:
        job.done.clear()
        with self._cond:
            job.grad = grad
            g = job.group
            g.first_grad = g.first_grad if g.first_grad is not None else time.monotonic()
            self._cond.notify_all()
        self._wait(job, timeout, "backward")
        return job.input_grad

    def abandon(self, job: Job) -> None:
        """The job's worker gives up (its edge failed or timed out): nobody waits for its gradient any more."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
            g = job.group
            if g is not None and job in g.waiting:
                g.waiting.remove(job)
                if not g.waiting:
                    self._groups.remove(g)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def _wait(self, job: Job, timeout: float, what: str):
        if not job.done.wait(timeout):
            raise TimeoutError(f"the batched {what} did not run within {timeout}s")
        if job.error is not None:
            raise job.error
        return job.out

    # ---- the compute thread -------------------------------------------------------------------------------------
    def _next_work(self):
        """Wait for the next thing to run: ("backward", group, jobs) or ("forward", jobs); None when stopping."""
        with self._cond:
            while not self._stop:
                now = time.monotonic()
                for g in self._groups:
                    jobs = g.ready(now, self.window)
                    if jobs:
                        return "backward", g, jobs
                if self._queue:
                    start = self._queue[0].arrived
                    full = sum(j.tokens for j in self._queue) >= self.max_tokens
                    if full or now >= start + self.window:
                        return "forward", self._take()
                # wake for a window that ends in the future; anything else wakes us by notify (a job, a gradient)
                deadlines = [g.first_grad + self.window for g in self._groups if g.first_grad is not None]
                deadlines += [self._queue[0].arrived + self.window] if self._queue else []
                deadlines = [d for d in deadlines if d > now]
                self._cond.wait(min(deadlines) - now if deadlines else None)
        return None

    def _take(self) -> list[Job]:
        jobs, tokens = [], 0
        while self._queue and (not jobs or tokens + self._queue[0].tokens <= self.max_tokens):
            tokens += self._queue[0].tokens
            jobs.append(self._queue.pop(0))
        return jobs

    def _loop(self):
        while True:
            work = self._next_work()
            if work is None:
                return
            if work[0] == "forward":
                for jobs in length_groups(work[1], self.pad_slack):
                    self._guarded(jobs, self._run_forward, jobs)
            else:
                self._guarded(work[2], self._run_backward, work[1], work[2])

    def _guarded(self, jobs: list[Job], fn, *args) -> None:
        """Run fn; a failure fails these jobs (each worker answers its edge), never the thread."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a bug must not stop the batcher
            log.exception("batched step failed")
            for j in jobs:
                j.error = e
                if j.group is not None:
                    self.abandon(j)
                j.done.set()

    def _run_forward(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        length = max(j.hidden.shape[1] for j in jobs)
        rows, start = [], 0
        for j in jobs:
            rows.append((start, start + j.hidden.shape[0]))
            start += j.hidden.shape[0]
        train = any(j.train for j in jobs)
        x = torch.cat([pad_to(j.hidden, length) for j in jobs]).requires_grad_(train)
        mask = torch.cat([pad_to(j.mask, length) for j in jobs])
        with torch.set_grad_enabled(train):
            out = self.segment.forward(x, mask, jobs[0].blocks, RowsLoRA(jobs, rows))
        group = Group(jobs, x, out, rows)
        seconds = time.perf_counter() - t0
        total = sum(j.tokens for j in jobs)
        with self._cond:
            if group.waiting:
                self._groups.append(group)
            for j, (a, b) in zip(jobs, rows):
                j.out = out[a:b, :j.hidden.shape[1]].detach()
                j.seconds = seconds * j.tokens / total
                j.group = group if j.train else None
                j.done.set()
            self.batches += 1
            self.jobs_run += len(jobs)

    def _run_backward(self, group: Group, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        grads = []
        for j, (a, b) in zip(group.jobs, group.rows):
            g = torch.zeros_like(group.out[a:b])
            if j in jobs:
                g[:, :j.hidden.shape[1]] = j.grad
            grads.append(g)
        leaves = [w for j in jobs if j.lora is not None for pair in j.lora.weights.values() for w in pair]
        with self._cond:
            for j in jobs:
                group.waiting.remove(j)
            last = not group.waiting
            if last:
                self._groups.remove(group)
        found = torch.autograd.grad(group.out, [group.x, *leaves], torch.cat(grads), retain_graph=not last,
                                    allow_unused=True)
        for leaf, g in zip(leaves, found[1:]):
            leaf.grad = g if g is not None else torch.zeros_like(leaf)
        seconds = time.perf_counter() - t0
        total = sum(j.tokens for j in jobs)
        for j in jobs:
            a, b = group.rows[group.jobs.index(j)]
            j.input_grad = found[0][a:b, :j.hidden.shape[1]]
            j.seconds += seconds * j.tokens / total
            j.done.set()
        if last:
            group.out = group.x = None  # the graph goes with them
