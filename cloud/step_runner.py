"""One step on the cloud, start to end: decode the edge's `begin`, run the cloud segment, answer, and run the
backward when the edge's gradient arrives. The autograd graph lives only inside this call.

The stream (cloud/stream.py) carries and checks the messages; the segment (cloud/compute.py) computes.
"""
from __future__ import annotations

import time

import grpc
import torch

from cloud.batching import Job, StepBatcher
from cloud.budgets import StepCostLimit
from cloud.compute import CarriedLoRA, CarriedPrefix, CloudSegment, StepBranches
from cloud.sessions import CloudError, Session, quote
from cloud.stream import CloudStream
from protocol import pb
from protocol.step import CARRIED_PARAMS, carried_shapes, carried_sites
from protocol.tensors import encode

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SITE_FIELDS = tuple(dict.fromkeys(f for fields in CARRIED_PARAMS.values() for f in fields))  # SiteWeights' tensors
NAMES = {"a": "LoRA A", "b": "LoRA B", "magnitude": "DoRA magnitude", "scale": "(IA)³ scale",
         "prefix_key": "prefix key", "prefix_value": "prefix value"}


def check_begin(begin, sess: Session, H: int, cost: StepCostLimit, stream: CloudStream, dtype, device):
    """The hidden state and mask of `begin`, decoded and checked; the active DLoRA blocks."""
    like = torch.empty(0, dtype=dtype, device=device)
    shape = list(begin.hidden.shape)
    if len(shape) == 3 and shape[2] == H and all(d > 0 for d in shape):
        cost.check(shape[0], shape[1])  # before decoding: refuse what costs too much without touching its bytes
    hidden = stream.decode(begin.hidden, [None, None, H], like, "hidden",
                           max_elements=cost.config.max_tokens_per_step * H)
    B, T, _ = hidden.shape
    if B == 0 or T == 0:
        raise CloudError(INVALID, f"hidden: empty batch or sequence (shape {[B, T, H]})")
    mask = stream.decode(begin.attention_mask, [B, T], None, "attention_mask", dtypes=[pb.BOOL, pb.INT64])
    active = set(begin.active_blocks)  # empty: no LoRA site runs this step (Kill & Revive may kill all)
    if not active <= set(sess.lora_blocks):
        raise CloudError(INVALID, f"active blocks {sorted(active - set(sess.lora_blocks))[:8]} have no LoRA sites")
    if begin.lora_weights and not sess.carried:
        raise CloudError(INVALID, "lora_weights in a session that did not open the carried mode")
    return hidden, mask.long().to(device), sorted(active)


def carried_lora(begin, sess: Session, segment: CloudSegment, active: list[int], stream: CloudStream,
                 like: torch.Tensor) -> CarriedLoRA:
    """The site weights that came with `begin`, checked (one per target of each active block, in that order, with
    exactly the fields and shapes of the session's carried method) and decoded as autograd leaves."""
    want = carried_sites(active, sess.targets)
    if len(begin.lora_weights) != len(want):
        raise CloudError(INVALID, f"begin carries {len(begin.lora_weights)} site weights; the active blocks and "
                         f"targets need {len(want)}")
    weights, method = {}, sess.carried
    for i, (w, (b, t)) in enumerate(zip(begin.lora_weights, want)):
        if (w.block, w.target) != (b, t):
            raise CloudError(INVALID, f"lora_weights[{i}] is for {w.block}/{quote(w.target)}; expected {b}/{t}")
        shapes = segment.prefix_shapes(sess.prefix_tokens) if method == "prefix" else \
            carried_shapes(method, sess.lora_rank, *segment.site_dims(b, t), t in sess.feedforward)
        if stray := [f for f in SITE_FIELDS if f not in shapes and w.HasField(f)]:
            raise CloudError(INVALID, f"lora_weights[{i}] sets {', '.join(stray)}, which carried {method} has not")
        weights[b, t] = tuple(stream.decode(getattr(w, f), shape, like, f"{NAMES[f]} {b}/{t}")
                              .requires_grad_(begin.train) for f, shape in shapes.items())
    if method == "prefix":
        return CarriedPrefix(weights, sess.prefix_tokens)
    return CarriedLoRA(weights, sess.lora_scaling, method, sess.feedforward, segment.base_weight)


def step_sites(begin, sess: Session, segment: CloudSegment, active: list[int], stream: CloudStream, like):
    """The step's adapted sites: DLoRA branches, carried weights, or None (frozen, or every block killed)."""
    if not active:
        return None
    if sess.carried:
        return carried_lora(begin, sess, segment, active, stream, like)
    return StepBranches(stream, active, sess.groups, sess.branch_on_output)


def carried_grads(sites, wire: int) -> list:
    """The gradients of the carried weights, in begin's order."""
    if not isinstance(sites, CarriedLoRA):
        return []
    return [pb.SiteWeights(block=b, target=t, **{f: encode(_grad(w), wire)
                                                 for f, w in zip(CARRIED_PARAMS[sites.method], ws)})
            for (b, t), ws in sites.weights.items()]


def _grad(t: torch.Tensor) -> torch.Tensor:
    return t.grad if t.grad is not None else torch.zeros_like(t)


def run_step(segment: CloudSegment, sess: Session, begin, stream: CloudStream, cost: StepCostLimit,
             batcher: StepBatcher | None = None) -> tuple:
    """Run the step; returns (last message, cloud compute seconds). The last message (hidden for a forward-only
    step, input_grad for a train step) is counted but not yet sent: the caller frees the session first. With a
    batcher, a frozen or carried-LoRA step runs in a batch with other sessions' steps (cloud/batching.py); DLoRA,
    carried DoRA, (IA)³ and prefix steps run alone."""
    p = next(segment.model.parameters())
    hidden, mask, active = check_begin(begin, sess, segment.model.config.hidden_size, cost, stream, p.dtype, p.device)
    sites = step_sites(begin, sess, segment, active, stream, hidden)
    if batcher is not None and (sites is None or isinstance(sites, CarriedLoRA) and sites.method == "lora"):
        return run_batched(batcher, sess, begin, stream, Job(sess.cut.cloud, hidden, mask, sites, begin.train))
    t0, w0 = time.perf_counter(), stream.wait_seconds
    with torch.set_grad_enabled(begin.train):
        x = hidden.requires_grad_(begin.train)
        out = segment.forward(x, mask, sess.cut.cloud, sites)
    fwd = time.perf_counter() - t0 - (stream.wait_seconds - w0)
    hidden_msg = pb.CloudMessage(hidden=pb.Hidden(hidden=encode(out, sess.wire_down), cloud_seconds=fwd))
    if not begin.train:
        stream.count(hidden_msg)
        return hidden_msg, fwd
    stream.send(hidden_msg)
    _, grad_msg = stream.recv()
    grad = stream.decode(grad_msg.grad, list(out.shape), out, "output grad")
    t0, w0 = time.perf_counter(), stream.wait_seconds
    torch.autograd.backward(out, grad)
    bwd = time.perf_counter() - t0 - (stream.wait_seconds - w0)
    last = pb.CloudMessage(input_grad=pb.InputGrad(grad=encode(x.grad, sess.wire_down), cloud_seconds=bwd,
                                                   lora_grads=carried_grads(sites, sess.wire_down)))
    stream.count(last)
    return last, fwd + bwd


def run_batched(batcher: StepBatcher, sess: Session, begin, stream: CloudStream, job: Job) -> tuple:
    """The step as one job of a batch: the same messages as run alone; the compute is the batch's."""
    try:
        out = batcher.forward(job, stream.timeout)
        hidden_msg = pb.CloudMessage(hidden=pb.Hidden(hidden=encode(out, sess.wire_down), cloud_seconds=job.seconds))
        if not begin.train:
            stream.count(hidden_msg)
            return hidden_msg, job.seconds
        stream.send(hidden_msg)
        _, grad_msg = stream.recv()
        grad = stream.decode(grad_msg.grad, list(out.shape), out, "output grad")
        fwd = job.seconds
        grad_in = batcher.backward(job, grad, stream.timeout)
    except TimeoutError as e:
        batcher.abandon(job)
        raise CloudError(grpc.StatusCode.DEADLINE_EXCEEDED, str(e)) from None
    except BaseException:
        batcher.abandon(job)
        raise
    last = pb.CloudMessage(input_grad=pb.InputGrad(grad=encode(grad_in, sess.wire_down), cloud_seconds=job.seconds - fwd,
                                                   lora_grads=carried_grads(job.lora, sess.wire_down)))
    stream.count(last)
    return last, job.seconds
