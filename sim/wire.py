"""Exact wire bytes of one training step, counted by building the very protobuf messages the edge and cloud send.

The order of the messages is not written here: `step_traffic` walks `protocol.step.StepPlan.messages()`, the
same description the edge's link and the cloud's stream follow, and builds each message it names.

"Wire bytes" are what `protocol.wire_size` counts (protobuf size of the EdgeMessage/CloudMessage + the 5-byte gRPC
prefix): the same number the edge and the cloud report. Tensors are built with zero bytes of the right length, so
sizes are exact whatever the values. Sizes are cached per distinct message so that 70B-sized steps stay cheap.

Every PEFT method's step is one of protocol/step.py's wire patterns (`method_setup` reads WIRE_PATTERNS): frozen
split, input-only (prompt and P-tuning: every hidden state V tokens longer), DLoRA's exchanges, or carried (Begin's
SiteWeights hold each site's parameters in the shapes `protocol.step.carried_shapes` gives for LoRA, DoRA or (IA)³,
or each cloud block's prefix, `prefix_shapes`' [kv heads, V, head dim] key and value, batch-free; InputGrad their
gradients), all through the one `step_traffic`. Prefix tuning's hidden states keep their T tokens: it adds keys and
values in the cloud's attention, not tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from model.sites import site_groups
from protocol import pb, wire_size
from protocol.step import (CARRIED_PARAMS, PREFIX_TARGET, UP_KINDS, WIRE_PATTERNS, StepPlan, Traffic, carried_shapes,
                           carried_sites, prefix_shapes)
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
    A `carried` field is ((block, target, ((SiteWeights field, shape), ...)), ...): the carried mode's SiteWeights,
    each with the fields of its carried method (LoRA a, b; DoRA also magnitude; (IA)³ scale; a prefix's key, value)."""
    m = (pb.EdgeMessage if kind in UP_KINDS else pb.CloudMessage)()
    inner = getattr(m, kind)
    for name, value in fields:
        if name == "carried":
            for block, target, params in value:
                w = getattr(inner, CARRIED_FIELD[kind]).add(block=block, target=target)
                for param, param_shape in params:
                    _fill(getattr(w, param), param_shape, dtype)
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
    """What fixes the traffic of a remote step: the cut, the wire dtypes and what the cloud blocks carry.

    `lora_blocks` are the cloud blocks with adapted sites (empty: frozen split), LoRA on `lora_targets`: computed by
    the edge (DLoRA), or, when `carried`, applied by the cloud from weights sent with Begin: those of the carried
    `method` (protocol/step.py CARRIED_PARAMS: "lora", "dora" or "ia3"; LoRA and DoRA of rank `lora_rank`, (IA)³ a
    vector per site, scaling the input of the `feedforward` targets). `active_blocks` is the subset that runs this
    step (Kill & Revive); None means all of `lora_blocks`. The edge always sends its active list in Begin when it
    has cloud sites (it is empty only in frozen split). `virtual_tokens`: prompt / P-tuning's V tokens, which the
    edge puts before every sequence, so every hidden state on the wire is V tokens longer. Carried prefix tuning
    (`method` "prefix") has the one target PREFIX_TARGET per block and `prefix_tokens` V: each block's key and value
    [kv heads, V, head dim] ride Begin; the hidden states keep their length."""
    k: int = 1
    m: int = 1
    wire_up: str = "fp32"
    wire_down: str = "fp32"
    lora_targets: tuple[str, ...] = ()
    lora_blocks: tuple[int, ...] = ()
    active_blocks: tuple[int, ...] | None = None
    carried: bool = False
    lora_rank: int = 8
    method: str = "lora"
    feedforward: tuple[str, ...] = ()
    virtual_tokens: int = 0
    branch_on_output: bool = False  # the edge-computed branch reads each site's output (bottleneck adapters)
    prefix_tokens: int = 0  # carried prefix tuning: V keys and values in front of every cloud block's attention

    def active(self) -> tuple[int, ...]:
        return tuple(sorted(self.lora_blocks if self.active_blocks is None else self.active_blocks))

    def groups(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """DLoRA's input groups of the targets, in execution order, each with its targets in `lora_targets` order
        (the carried mode exchanges nothing: no groups)."""
        return () if self.carried else site_groups("llama", self.lora_targets)

    def carried_shapes(self, shape: ModelShape, target: str) -> dict[str, list[int]]:
        """The carried parameters of `target` at one block, by SiteWeights field (protocol/step.py carried_shapes,
        or for a prefix prefix_shapes, with the kv heads and head dim PEFT sizes it by, as the cloud does)."""
        if self.method == "prefix":
            return prefix_shapes(shape.kv_heads, self.prefix_tokens, shape.head_dim)
        return carried_shapes(self.method, self.lora_rank, *shape.linear(target), target in self.feedforward)


def cloud_blocks(shape: ModelShape, k: int, m: int) -> tuple[int, ...]:
    if k < 1 or m < 1 or k + m >= shape.layers:
        raise ValueError(f"need k >= 1, m >= 1 and k + m < {shape.layers}, got k={k}, m={m}")
    return tuple(range(k, shape.layers - m))


def dlora_setup(shape: ModelShape, k: int = 1, m: int = 1, wire_up: str = "fp32", wire_down: str = "fp32",
                targets: tuple[str, ...] = ("q_proj", "v_proj"), active_fraction: float = 1.0,
                carried: bool = False, rank: int = 8, method: str = "lora",
                feedforward: tuple[str, ...] = ()) -> WireSetup:
    """Sites on every cloud block, DLoRA or `carried` (of `method`); with `active_fraction` < 1 (Kill & Revive)
    that share of blocks, evenly spread."""
    if method not in CARRIED_PARAMS:
        raise ValueError(f"carried method {method!r} is not one of {', '.join(CARRIED_PARAMS)}")
    if not carried and method != "lora":
        raise ValueError(f"{method} has no edge-computed (DLoRA) form: only LoRA's branch runs without the base "
                         "weights")
    if feedforward and method != "ia3":
        raise ValueError(f"feed-forward targets are (IA)³'s, not {method}'s")
    if stray := [t for t in feedforward if t not in targets]:
        raise ValueError(f"feed-forward targets {','.join(stray)} are not among the targets {','.join(targets)}")
    blocks = cloud_blocks(shape, k, m)
    n = max(0, min(len(blocks), round(active_fraction * len(blocks))))
    active = tuple(blocks[int(i * len(blocks) / n)] for i in range(n)) if n else ()
    return WireSetup(k, m, wire_up, wire_down, tuple(targets), blocks, None if n == len(blocks) else active,
                     carried, rank, method, tuple(feedforward))


def carried_setup(shape: ModelShape, k: int = 1, m: int = 1, wire_up: str = "fp32", wire_down: str = "fp32",
                  targets: tuple[str, ...] = ("q_proj", "v_proj"), active_fraction: float = 1.0,
                  rank: int = 8, method: str = "lora", feedforward: tuple[str, ...] = ()) -> WireSetup:
    """The carried mode of `method` ("lora", "dora", "ia3") on every cloud block (see dlora_setup)."""
    return dlora_setup(shape, k, m, wire_up, wire_down, targets, active_fraction, carried=True, rank=rank,
                       method=method, feedforward=feedforward)


# ---- the PEFT methods ---------------------------------------------------------------------------------------------
SITE_METHODS = ("lora", "ia3", "adapter")  # methods that adapt linears of blocks (LoRA, DoRA, (IA)³, bottleneck)
ADAPTER_TARGETS = ("o_proj", "down_proj")  # bottleneck adapters' default sites (model/tuners/adapter.py)
INPUT_METHODS = ("prompt", "ptuning")  # methods that train virtual tokens before the input (no block sites)
PREFIX_METHODS = ("prefix",)  # keys and values in front of every layer's attention (the cloud's carried)
SIM_METHODS = SITE_METHODS + INPUT_METHODS + PREFIX_METHODS  # the --peft methods (of WIRE_PATTERNS) the sim models

# (IA)³'s targets when none are given: PEFT's defaults for Llama-family models (peft.utils.constants
# TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING; the edge reads them there,
# tests/test_sim_methods.py checks these against it).
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)


def ia3_sites(targets=None, feedforward=None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(targets, feed-forward targets) of (IA)³ as the edge resolves them (model/tuners/ia3.py IA3Set): no targets
    = PEFT's defaults, whose feed-forward ones apply unless others are given; given targets scale at their input
    only the feed-forward ones given."""
    if not targets:
        return IA3_TARGETS, tuple(feedforward or IA3_FEEDFORWARD)
    return tuple(targets), tuple(feedforward or ())


def method_setup(shape: ModelShape, peft: str = "lora", cloud_lora: str = "none", k: int = 1, m: int = 1,
                 wire_up: str = "fp32", wire_down: str = "fp32", targets: tuple[str, ...] | None = None,
                 rank: int = 8, dora: bool = False, feedforward: tuple[str, ...] | None = None,
                 active_fraction: float = 1.0, prompt_tokens: int = 20, prefix_tokens: int = 20,
                 prefix_projection: int | None = None) -> WireSetup:
    """The wire setup of `tandem edge train --peft PEFT --cloud-lora MODE`, from the method's wire pattern in that
    mode (protocol/step.py WIRE_PATTERNS): frozen, input-only (V = `prompt_tokens` more tokens), edge-branch (DLoRA)
    or carried (LoRA, DoRA with `dora`, (IA)³, or prefix tuning's V = `prefix_tokens` keys and values per cloud
    block). `targets` None or empty: the method's default (LoRA q,v; (IA)³ PEFT's, whose `feedforward` default is
    PEFT's too, as the edge resolves --ia3-targets / --ia3-feedforward). `prefix_projection` (the encoder MLP's
    hidden size, or None) changes only the edge's compute, never the wire: it is checked here, as the edge does."""
    modes = WIRE_PATTERNS.get(peft)
    if modes is None or peft not in SIM_METHODS:
        raise ValueError(f"the simulator does not model --peft {peft}: it knows {', '.join(SIM_METHODS)}")
    if cloud_lora not in modes:
        raise ValueError(f"--peft {peft} takes --cloud-lora {' or '.join(modes)}, not {cloud_lora}")
    if dora and peft != "lora":
        raise ValueError(f"DoRA is a LoRA variant: --peft {peft} has none")
    pattern = modes[cloud_lora]
    if peft == "prefix":
        return prefix_setup(shape, k, m, wire_up, wire_down, prefix_tokens, prefix_projection, active_fraction)
    if pattern == "frozen":
        return WireSetup(k, m, wire_up, wire_down)
    if pattern == "input-only":
        if prompt_tokens < 1:
            raise ValueError(f"--prompt-tokens must be at least 1, got {prompt_tokens}")
        return WireSetup(k, m, wire_up, wire_down, virtual_tokens=prompt_tokens)
    if peft == "adapter":  # edge-branch: DLoRA's messages, each carrying a site's output and the adapter's output
        from dataclasses import replace
        return replace(dlora_setup(shape, k, m, wire_up, wire_down, tuple(targets or ADAPTER_TARGETS),
                                   active_fraction), branch_on_output=True)
    if peft == "ia3":
        targets, feedforward = ia3_sites(targets, feedforward)
        return carried_setup(shape, k, m, wire_up, wire_down, tuple(targets), active_fraction, rank, "ia3",
                             tuple(feedforward))
    targets = targets or ("q_proj", "v_proj")
    if pattern == "edge-branch":
        if dora:
            raise ValueError("DoRA needs the base weights where its branch runs: carried or none, not edge (DLoRA)")
        return dlora_setup(shape, k, m, wire_up, wire_down, tuple(targets), active_fraction, rank=rank)
    return carried_setup(shape, k, m, wire_up, wire_down, tuple(targets), active_fraction, rank,
                         "dora" if dora else "lora")


def check_prefix(prefix_tokens: int, prefix_projection: int | None = None) -> None:
    """Prefix tuning's options, each mistake one line naming the flag (model/tuners/prefix.py's check)."""
    from model.tuners.prefix import PrefixConfig, check_prefix_config
    check_prefix_config(PrefixConfig(prefix_tokens, prefix_projection))


def prefix_setup(shape: ModelShape, k: int = 1, m: int = 1, wire_up: str = "fp32", wire_down: str = "fp32",
                 prefix_tokens: int = 20, prefix_projection: int | None = None,
                 active_fraction: float = 1.0) -> WireSetup:
    """Carried prefix tuning: every cloud block's prefix rides each step (the one target PREFIX_TARGET per block,
    as the edge's RemoteCloud sends it). Every layer has its prefix every step: no Kill & Revive."""
    check_prefix(prefix_tokens, prefix_projection)
    if active_fraction != 1.0:
        raise ValueError(f"--peft prefix puts a prefix in every layer every step: no Kill & Revive (--active-fraction "
                         f"1, not {active_fraction:g})")
    return WireSetup(k, m, wire_up, wire_down, (PREFIX_TARGET,), cloud_blocks(shape, k, m), None, True,
                     method="prefix", prefix_tokens=prefix_tokens)


def step_traffic(shape: ModelShape, setup: WireSetup, batch: int, seq: int, step: int = 1,
                 train: bool = True) -> Traffic:
    """All messages of one step of `batch` sequences of `seq` tokens (the padded length of the batch; prompt and
    P-tuning send `setup.virtual_tokens` more per sequence; a prefix's keys and values ride Begin, batch-free)."""
    up, down = WIRE_DTYPES[setup.wire_up], WIRE_DTYPES[setup.wire_down]
    seq = seq + setup.virtual_tokens
    H = (batch, seq, shape.hidden)
    active = setup.active()
    if any(b not in setup.lora_blocks for b in active):
        raise ValueError(f"active blocks {active} are not all LoRA blocks {setup.lora_blocks}")
    plan = StepPlan(train, active, setup.groups() if active else ())
    v = _varint_class  # exact sizes, cached per varint length (see _varint_class)

    def shapes(group: str, side: int):  # side 0: the branch's input (a site's output for adapters), 1: its output
        return tuple((batch, seq, shape.linear(t)[1 if setup.branch_on_output else side]) for t in plan.targets(group))

    def carried(side: str) -> tuple:  # the carried weights (begin) or their gradients (input_grad), same shapes
        if not (setup.carried and side in CARRIED_FIELD):
            return ()
        params = {t: tuple((f, tuple(s)) for f, s in setup.carried_shapes(shape, t).items())
                  for t in setup.lora_targets}
        return (("carried", tuple((v(b), t, params[t]) for b, t in carried_sites(active, setup.lora_targets))),)

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
