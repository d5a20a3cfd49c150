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
from protocol.step import UP_KINDS, StepPlan, Traffic, carried_sites
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


# ---- the messages ---------------------------------------------------------------------------------------------------
# The tensor field of each message kind; REPEATED kinds carry one tensor per target of their LoRA group.
REPEATED = {"lora_reply", "lora_grad_request"}
TENSOR_FIELD = {"begin": "hidden", "lora_request": "x", "lora_reply": "outputs", "hidden": "hidden",
                "output_grad": "grad", "lora_grad_request": "grads", "lora_grad_reply": "grad", "input_grad": "grad"}


CARRIED_FIELD = {"begin": "lora_weights", "input_grad": "lora_grads"}  # carried mode: weights up, their grads down


def build(kind: str, fields: tuple, shapes, dtype: int):
    """A message of `kind` with the scalar `fields` ((name, value) pairs) set and its tensor field filled with
    zero bytes of `shapes` in wire `dtype` (Begin also gets its [B, T] bool mask; Hidden/InputGrad a cloud time).
    A `carried` field is ((block, target, A shape, B shape), ...): the carried mode's SiteWeights."""
    m = (pb.EdgeMessage if kind in UP_KINDS else pb.CloudMessage)()
    inner = getattr(m, kind)
    for name, value in fields:
        if name == "carried":
            for block, target, a_shape, b_shape in value:
                w = getattr(inner, CARRIED_FIELD[kind]).add(block=block, target=target)
                _fill(w.a, a_shape, dtype)
                _fill(w.b, b_shape, dtype)
        elif isinstance(value, tuple):
            getattr(inner, name).extend(value)
        else:
            setattr(inner, name, value)
    field = getattr(inner, TENSOR_FIELD[kind])
    for shape in (shapes if kind in REPEATED else [shapes]):
        _fill(field.add() if kind in REPEATED else field, shape, dtype)
    if kind == "begin":
        _fill(inner.attention_mask, shapes[:2], pb.BOOL)
    if kind in ("hidden", "input_grad"):
        inner.cloud_seconds = CLOUD_SECONDS
    return m


def _varint_class(v: int) -> int:
    """The smallest value whose varint has the same length as `v` (0 stays 0: proto3 omits it). Swapping a value
    for its class leaves every message size unchanged, so sizes can be cached per class and stay exact."""
    if v == 0:
        return 0
    return 1 << (7 * ((v.bit_length() - 1) // 7))


@lru_cache(maxsize=512)
def _sized(kind: str, fields: tuple, shapes, dtype: int) -> tuple[int, int]:
    msg = build(kind, fields, shapes, dtype)
    return wire_size(msg), tensor_payload(msg)


# ---- one step -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WireSetup:
    """What fixes the traffic of a remote step: the cut, the wire dtypes and the cloud blocks' LoRA.

    `lora_blocks` are the cloud blocks with LoRA (empty: frozen split): computed by the edge (DLoRA), or, when
    `carried`, applied by the cloud from weights of rank `lora_rank` sent with Begin. `active_blocks` is the subset
    that runs this step (Kill & Revive); None means all of `lora_blocks`. The edge always sends its active list in
    Begin when it has cloud LoRA (it is empty only in frozen split)."""
    k: int = 1
    m: int = 1
    wire_up: str = "fp32"
    wire_down: str = "fp32"
    lora_targets: tuple[str, ...] = ()
    lora_blocks: tuple[int, ...] = ()
    active_blocks: tuple[int, ...] | None = None
    carried: bool = False
    lora_rank: int = 8

    def active(self) -> tuple[int, ...]:
        return tuple(sorted(self.lora_blocks if self.active_blocks is None else self.active_blocks))

    def groups(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """DLoRA's input groups of the targets, in execution order, each with its targets in `lora_targets` order
        (the carried mode exchanges nothing: no groups)."""
        return () if self.carried else site_groups("llama", self.lora_targets)


def cloud_blocks(shape: ModelShape, k: int, m: int) -> tuple[int, ...]:
    if k < 1 or m < 1 or k + m >= shape.layers:
        raise ValueError(f"need k >= 1, m >= 1 and k + m < {shape.layers}, got k={k}, m={m}")
    return tuple(range(k, shape.layers - m))


def dlora_setup(shape: ModelShape, k: int = 1, m: int = 1, wire_up: str = "fp32", wire_down: str = "fp32",
                targets: tuple[str, ...] = ("q_proj", "v_proj"), active_fraction: float = 1.0,
                carried: bool = False, rank: int = 8) -> WireSetup:
    """LoRA on every cloud block, DLoRA or `carried`; with `active_fraction` < 1 (Kill & Revive) that share of
    blocks, evenly spread."""
    blocks = cloud_blocks(shape, k, m)
    n = max(0, min(len(blocks), round(active_fraction * len(blocks))))
    active = tuple(blocks[int(i * len(blocks) / n)] for i in range(n)) if n else ()
    return WireSetup(k, m, wire_up, wire_down, tuple(targets), blocks, None if n == len(blocks) else active,
                     carried, rank)


def carried_setup(shape: ModelShape, k: int = 1, m: int = 1, wire_up: str = "fp32", wire_down: str = "fp32",
                  targets: tuple[str, ...] = ("q_proj", "v_proj"), active_fraction: float = 1.0,
                  rank: int = 8) -> WireSetup:
    """The carried mode on every cloud block (see dlora_setup)."""
    return dlora_setup(shape, k, m, wire_up, wire_down, targets, active_fraction, carried=True, rank=rank)


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

    def carried(side: str) -> tuple:  # the carried weights (begin) or their gradients (input_grad)
        if not (setup.carried and side in CARRIED_FIELD):
            return ()
        r = setup.lora_rank
        return (("carried", tuple((v(b), t, (r, shape.linear(t)[0]), (shape.linear(t)[1], r))
                                  for b, t in carried_sites(active, setup.lora_targets))),)

    def args(m) -> tuple:  # (scalar fields, tensor shape(s), wire dtype) of message m
        if m.kind == "begin":
            blocks = tuple(v(b) for b in active) if setup.lora_blocks else ()
            return (("session_id", "0" * SESSION_ID_CHARS), ("step", v(step)), ("train", train),
                    ("active_blocks", blocks)) + carried("begin"), H, up
        if m.kind in ("hidden", "input_grad", "output_grad"):
            return carried(m.kind), H, up if m.direction == "up" else down
        side = 0 if m.kind in ("lora_request", "lora_grad_reply") else 1  # the branch's input or its outputs
        sizes = shapes(m.group, side)
        return (("block", v(m.block)), ("group", m.group)), sizes[0] if side == 0 else sizes, \
            up if m.direction == "up" else down

    traffic = Traffic()
    for m in plan.messages():
        traffic.record(m, *_sized(m.kind, *args(m)))
    return traffic
