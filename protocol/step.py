"""One training step on the wire, described once: which message comes next, and what it weighs.

A step is one bidirectional `Step` stream. Its messages, in order (DLoRA adds the LoRA exchanges; a forward-only
step ends after `hidden`):

    up    begin                                      hidden state after the edge's bottom blocks, mask, active blocks
    down  lora_request     }  per active block,      the LoRA input x of that block's input group
    up    lora_reply       }  per input group         scaling * B A x, one per target of the group
    down  hidden                                     output of the cloud segment
    up    output_grad                                dL/d(cloud output)              (train only, from here on)
    down  lora_grad_request }  reverse block order,  dL/d(LoRA output) per target
    up    lora_grad_reply   }  reverse group order    dL/d x
    down  input_grad                                 dL/d(begin.hidden); the stream ends

The carried mode (`--cloud-lora carried`) has no exchanges: `begin` carries the trainable weights of the active cloud
blocks (`lora_weights`: LoRA, DoRA or (IA)³ parameters, or prefix tuning's keys and values) and `input_grad` returns their gradients (`lora_grads`), so
its plan is frozen split's. Which pattern each PEFT method uses in each mode is `WIRE_PATTERNS`, below.

`StepPlan.messages()` is that list for one step; it is the only place the order is written. `StepProtocol` walks it
on either side of a live stream (the edge's link and the cloud's stream both feed every message they send or
receive through `observe`), refusing a message out of order with the status to return, and counting wire bytes and
tensor payload per direction; the simulator (sim/wire.py) walks the same plan to predict a step's traffic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import grpc

from protocol import wire_size
from protocol.tensors import tensor_payload

# Where the cloud blocks' LoRA lives: none (frozen split), edge (DLoRA: the edge computes each branch from the LoRA
# input the cloud sends), carried (the edge sends the weights with each step and gets their gradients back).
CloudLoRA = Literal["none", "edge", "carried"]
UP, DOWN = "up", "down"  # up: edge -> cloud
UP_KINDS = ("begin", "lora_reply", "output_grad", "lora_grad_reply")  # EdgeMessage.kind
DOWN_KINDS = ("lora_request", "hidden", "lora_grad_request", "input_grad")  # CloudMessage.kind
LORA_KINDS = ("lora_request", "lora_reply", "lora_grad_request", "lora_grad_reply")  # carry block and group


# How each PEFT method crosses the cut, per --cloud-lora mode: the one declaration edge, cloud and simulator read.
#   frozen       only the hidden state, the mask and their gradients cross (the method lives on the edge's blocks)
#   input-only   the same messages; the sequence the cloud sees is longer by the method's virtual tokens
#   edge-branch  DLoRA: the cloud sends each site group's input, the edge answers with the branch outputs
#   carried      the sites' parameters ride `begin` (SiteWeights), their gradients `input_grad`
WirePattern = Literal["frozen", "input-only", "edge-branch", "carried"]
WIRE_PATTERNS: dict[str, dict[str, WirePattern]] = {
    "lora": {"none": "frozen", "edge": "edge-branch", "carried": "carried"},
    "ia3": {"none": "frozen", "carried": "carried"},  # a vector per site: cheaper carried than as a branch
    "adapter": {"none": "frozen", "edge": "edge-branch"},  # the branch reads the site's output (branch_on_output)
    "prompt": {"none": "input-only"},
    "ptuning": {"none": "input-only"},
    "prefix": {"carried": "carried"},  # every layer has a prefix, the cloud's too: they ride each step
}
# carried: the SiteWeights fields set for each carried method (DoRA is LoRA with use_dora)
CARRIED_PARAMS = {"lora": ("a", "b"), "dora": ("a", "b", "magnitude"), "ia3": ("scale",),
                  "prefix": ("prefix_key", "prefix_value")}
PREFIX_TARGET = "prefix"  # a carried prefix's SiteWeights.target: one per block, not per linear


def carried_shapes(method: str, r: int, n_in: int, n_out: int, feedforward: bool = False) -> dict[str, list[int]]:
    """The shape of each carried parameter of one site with `n_in` inputs and `n_out` outputs."""
    if method == "ia3":
        return {"scale": [1, n_in] if feedforward else [n_out, 1]}
    shapes = {"a": [r, n_in], "b": [n_out, r]}
    if method == "dora":
        shapes["magnitude"] = [n_out]
    return shapes


def prefix_shapes(kv_heads: int, num_virtual: int, head_dim: int) -> dict[str, list[int]]:
    """The shape of each carried parameter of one block's prefix (one for the whole batch)."""
    return {"prefix_key": [kv_heads, num_virtual, head_dim], "prefix_value": [kv_heads, num_virtual, head_dim]}


def carried_sites(active_blocks, targets) -> list[tuple[int, str]]:
    """The carried mode's (block, target) pairs in the order `Begin.lora_weights` and `InputGrad.lora_grads` hold
    them: every target of each active block, blocks ascending."""
    return [(b, t) for b in active_blocks for t in targets]


@dataclass(frozen=True)
class Expected:
    """One message of a step: its kind, direction and, for the LoRA exchanges, the block and input group."""
    kind: str
    direction: str
    block: int | None = None
    group: str | None = None

    def __str__(self) -> str:
        return self.kind if self.block is None else f"{self.kind} {self.block}/{self.group}"


@dataclass(frozen=True)
class StepPlan:
    """What fixes a step's message sequence: train or forward only, the active DLoRA blocks (ascending) and the
    input groups of the session's targets, in execution order, each with its targets (model/sites.py). A session
    without exchanges (frozen split, carried mode) has no groups."""
    train: bool
    active_blocks: tuple[int, ...] = ()
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def messages(self) -> list[Expected]:
        groups = [g for g, _ in self.groups] if self.active_blocks else []
        out = [Expected("begin", UP)]
        for b in self.active_blocks:
            for g in groups:
                out += [Expected("lora_request", DOWN, b, g), Expected("lora_reply", UP, b, g)]
        out.append(Expected("hidden", DOWN))
        if not self.train:
            return out
        out.append(Expected("output_grad", UP))
        for b in reversed(self.active_blocks):
            for g in reversed(groups):
                out += [Expected("lora_grad_request", DOWN, b, g), Expected("lora_grad_reply", UP, b, g)]
        out.append(Expected("input_grad", DOWN))
        return out

    def targets(self, group: str) -> tuple[str, ...]:
        return dict(self.groups)[group]


@dataclass(frozen=True)
class WireMessage:
    """One message as it crossed: kind, direction, serialized size and raw tensor bytes."""
    kind: str
    direction: str
    wire_bytes: int
    payload_bytes: int
    block: int | None = None
    group: str | None = None


@dataclass
class Traffic:
    """Bytes of one step. wire = serialized gRPC messages (`protocol.wire_size`); payload = raw tensor bytes."""
    bytes_up: int = 0
    bytes_down: int = 0
    payload_up: int = 0
    payload_down: int = 0
    messages_up: int = 0
    messages_down: int = 0
    cloud_seconds: float = 0.0  # cloud compute the cloud reported (hidden, input_grad)
    wait_seconds: float = 0.0  # time this side spent blocked waiting for the other
    messages: list[WireMessage] = field(default_factory=list)  # every message, in the order it crossed

    def record(self, expected: Expected, wire: int, payload: int) -> None:
        d = expected.direction
        setattr(self, f"bytes_{d}", getattr(self, f"bytes_{d}") + wire)
        setattr(self, f"payload_{d}", getattr(self, f"payload_{d}") + payload)
        setattr(self, f"messages_{d}", getattr(self, f"messages_{d}") + 1)
        self.messages.append(WireMessage(expected.kind, d, wire, payload, expected.block, expected.group))

    @property
    def round_trips(self) -> int:
        """Sequential request/answer exchanges: each waits for the other side before the step goes on."""
        return len(self.messages) // 2


class ProtocolError(Exception):
    """A message that does not fit the step: `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class StepProtocol:
    """One side's view of a running step. `groups` are the session's input groups (StepPlan.groups); the plan of
    the step is fixed by its `begin` message (train flag and active blocks)."""

    def __init__(self, groups: tuple[tuple[str, tuple[str, ...]], ...] = ()):
        self.groups = groups
        self.plan: StepPlan | None = None
        self._messages = [Expected("begin", UP)]
        self._pos = 0
        self.traffic = Traffic()

    def bind(self, groups) -> None:
        """Set the session's input groups after `begin` (the cloud learns the session from it)."""
        self.groups = groups
        if self.plan is not None:
            self.plan = StepPlan(self.plan.train, self.plan.active_blocks, groups)
            self._messages = self.plan.messages()

    @property
    def done(self) -> bool:
        return self.plan is not None and self._pos == len(self._messages)

    def next(self) -> Expected | None:
        return self._messages[self._pos] if self._pos < len(self._messages) else None

    def observe(self, msg) -> tuple[str, object]:
        """Check an EdgeMessage or CloudMessage against the plan, count it; returns (kind, inner message)."""
        kind = msg.WhichOneof("kind")
        want = self.next()
        if want is None:
            raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, f"{kind} after the step ended")
        if kind != want.kind:
            raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"expected {want.kind}, got {kind} (messages out of order)")
        inner = getattr(msg, kind)
        if kind in LORA_KINDS and (inner.block, inner.group) != (want.block, want.group):
            raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{kind} for block {inner.block} group {inner.group[:32]!r}; expected {want}")
        if kind == "begin":
            self.plan = StepPlan(inner.train, tuple(sorted(set(inner.active_blocks))), self.groups)
            self._messages = self.plan.messages()
        self._pos += 1
        self.traffic.record(want, wire_size(msg), tensor_payload(msg))
        return kind, inner
