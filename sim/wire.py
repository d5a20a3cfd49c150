"""Exact wire bytes of one training step, counted by building the very protobuf messages the edge and cloud send.

The order of the messages is not written here: `step_traffic` walks `protocol.step.StepPlan.messages()`, the
same description the edge's link and the cloud's stream follow, and builds each message it names.

"Wire bytes" are what `protocol.wire_size` counts (protobuf size of the EdgeMessage/CloudMessage + the 5-byte gRPC
prefix): the same number the edge and the cloud report. Tensors are built with zero bytes of the right length, so
sizes are exact whatever the values. Sizes are cached per distinct message so that 70B-sized steps stay cheap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from model.sites import site_groups
from protocol import pb, wire_size
from protocol.step import StepPlan, Traffic
from protocol.tensors import WIRE_DTYPES, payload_bytes, tensor_payload
from sim.shape import ModelShape

SESSION_ID_CHARS = 32  # uuid4().hex
CLOUD_SECONDS = 0.125  # any nonzero double: a set proto3 double always takes 9 bytes


def _fill(t: pb.Tensor, shape, dtype: int) -> None:
    """Set `t` to a tensor of `shape` in wire `dtype` whose data (and int8 scales) are zero bytes of the exact
    length (filled in place: copying a large sub-message would copy its bytes again)."""
    shape = tuple(shape)
    t.dtype = dtype
    t.shape.extend(shape)
    n = math.prod(shape)
    if dtype == pb.INT8:
        rows = n // shape[-1] if shape and shape[-1] else 0
        t.data = bytes(n)
        t.scale = bytes(4 * rows)
    else:
        t.data = bytes(payload_bytes(shape, dtype))


# ---- the messages, one builder each (also used by tests to compare with real encodings) --------------------------
def begin(step: int, train: bool, hidden: tuple[int, ...], up: int, active_blocks=(),
          session_id: str = "0" * SESSION_ID_CHARS, mask_dtype: int = pb.BOOL) -> pb.EdgeMessage:
    m = pb.EdgeMessage()
    b = m.begin
    b.session_id, b.step, b.train = session_id, step, train
    _fill(b.hidden, hidden, up)
    _fill(b.attention_mask, hidden[:2], mask_dtype)
    b.active_blocks.extend(active_blocks)
    return m


def lora_request(block: int, group: str, x: tuple[int, ...], down: int) -> pb.CloudMessage:
    m = pb.CloudMessage()
    r = m.lora_request
    r.block, r.group = block, group
    _fill(r.x, x, down)
    return m


def lora_reply(block: int, group: str, outputs: list[tuple[int, ...]], up: int) -> pb.EdgeMessage:
    m = pb.EdgeMessage()
    r = m.lora_reply
    r.block, r.group = block, group
    for shape in outputs:
        _fill(r.outputs.add(), shape, up)
    return m


def hidden_msg(hidden: tuple[int, ...], down: int) -> pb.CloudMessage:
    m = pb.CloudMessage()
    _fill(m.hidden.hidden, hidden, down)
    m.hidden.cloud_seconds = CLOUD_SECONDS
    return m


def output_grad(hidden: tuple[int, ...], up: int) -> pb.EdgeMessage:
    m = pb.EdgeMessage()
    _fill(m.output_grad.grad, hidden, up)
    return m


def lora_grad_request(block: int, group: str, grads: list[tuple[int, ...]], down: int) -> pb.CloudMessage:
    m = pb.CloudMessage()
    r = m.lora_grad_request
    r.block, r.group = block, group
    for shape in grads:
        _fill(r.grads.add(), shape, down)
    return m


def lora_grad_reply(block: int, group: str, x: tuple[int, ...], up: int) -> pb.EdgeMessage:
    m = pb.EdgeMessage()
    r = m.lora_grad_reply
    r.block, r.group = block, group
    _fill(r.grad, x, up)
    return m


def input_grad(hidden: tuple[int, ...], down: int) -> pb.CloudMessage:
    m = pb.CloudMessage()
    _fill(m.input_grad.grad, hidden, down)
    m.input_grad.cloud_seconds = CLOUD_SECONDS
    return m


BUILDERS = {"begin": begin, "lora_request": lora_request, "lora_reply": lora_reply, "hidden": hidden_msg,
            "output_grad": output_grad, "lora_grad_request": lora_grad_request, "lora_grad_reply": lora_grad_reply,
            "input_grad": input_grad}


def _varint_class(v: int) -> int:
    """The smallest value whose varint has the same length as `v` (0 stays 0: proto3 omits it). Swapping a value
    for its class leaves every message size unchanged, so sizes can be cached per class and stay exact."""
    if v == 0:
        return 0
    return 1 << (7 * ((v.bit_length() - 1) // 7))


@lru_cache(maxsize=512)
def _sized(kind: str, args: tuple) -> tuple[int, int]:
    msg = BUILDERS[kind](*args)
    return wire_size(msg), tensor_payload(msg)


# ---- one step -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WireSetup:
    """What fixes the traffic of a remote step: the cut, the wire dtypes and the DLoRA sites.

    `lora_blocks` are the cloud blocks whose LoRA the edge computes (empty: frozen split). `active_blocks` is the
    subset that runs this step (Kill & Revive); None means all of `lora_blocks`. The edge always sends its active
    list in Begin when it has cloud LoRA (it is empty only in frozen split)."""
    k: int = 1
    m: int = 1
    wire_up: str = "fp32"
    wire_down: str = "fp32"
    lora_targets: tuple[str, ...] = ()
    lora_blocks: tuple[int, ...] = ()
    active_blocks: tuple[int, ...] | None = None

    def active(self) -> tuple[int, ...]:
        return tuple(sorted(self.lora_blocks if self.active_blocks is None else self.active_blocks))

    def groups(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Input groups of the targets, in execution order, each with its targets in `lora_targets` order."""
        return site_groups("llama", self.lora_targets)


def cloud_blocks(shape: ModelShape, k: int, m: int) -> tuple[int, ...]:
    if k < 1 or m < 1 or k + m >= shape.layers:
        raise ValueError(f"need k >= 1, m >= 1 and k + m < {shape.layers}, got k={k}, m={m}")
    return tuple(range(k, shape.layers - m))


def dlora_setup(shape: ModelShape, k: int = 1, m: int = 1, wire_up: str = "fp32", wire_down: str = "fp32",
                targets: tuple[str, ...] = ("q_proj", "v_proj"), active_fraction: float = 1.0) -> WireSetup:
    """DLoRA on every cloud block; with `active_fraction` < 1 (Kill & Revive) that share of blocks, evenly spread."""
    blocks = cloud_blocks(shape, k, m)
    n = max(0, min(len(blocks), round(active_fraction * len(blocks))))
    active = tuple(blocks[int(i * len(blocks) / n)] for i in range(n)) if n else ()
    return WireSetup(k, m, wire_up, wire_down, tuple(targets), blocks, None if n == len(blocks) else active)


def step_traffic(shape: ModelShape, setup: WireSetup, batch: int, seq: int, step: int = 1,
                 train: bool = True) -> Traffic:
    """All messages of one step of `batch` sequences of `seq` tokens (the padded length the edge sends)."""
    up, down = WIRE_DTYPES[setup.wire_up], WIRE_DTYPES[setup.wire_down]
    H = (batch, seq, shape.hidden)
    active = setup.active()
    if any(b not in setup.lora_blocks for b in active):
        raise ValueError(f"active blocks {active} are not all LoRA blocks {setup.lora_blocks}")
    plan = StepPlan(train, active, setup.groups() if active else ())
    v = _varint_class  # exact sizes, cached per varint length (see _varint_class)

    def shapes(group: str, side: int):  # side 0: input, 1: output of each target of the group
        return tuple((batch, seq, shape.linear(t)[side]) for t in plan.targets(group))

    def args(m) -> tuple:
        if m.kind == "begin":
            return v(step), train, H, up, tuple(v(b) for b in active) if setup.lora_blocks else ()
        if m.kind in ("hidden", "input_grad"):
            return H, down
        if m.kind == "output_grad":
            return H, up
        side, dtype = {"lora_request": (0, down), "lora_reply": (1, up), "lora_grad_request": (1, down),
                       "lora_grad_reply": (0, up)}[m.kind]
        sizes = shapes(m.group, side)
        return v(m.block), m.group, sizes[0] if side == 0 else sizes, dtype

    traffic = Traffic()
    for m in plan.messages():
        traffic.record(m, *_sized(m.kind, args(m)))
    return traffic
