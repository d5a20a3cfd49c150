"""The pieces tests/test_fuzz.py's cases are made of: the fuzz cloud's limits, the model's dimensions, bytes that do
not decode, tensors with one defect, and the Case / Ctx records (tests/fuzz_cases.py generates the cases)."""
from __future__ import annotations

import random
from dataclasses import dataclass

import grpc
import torch
from google.protobuf.message import DecodeError

from model.sites import site_groups
from protocol import AUTH_HEADER, PROTOCOL_VERSION, pb
from protocol.tensors import encode

C = grpc.StatusCode
INVALID, PRECONDITION, NOT_FOUND = C.INVALID_ARGUMENT, C.FAILED_PRECONDITION, C.NOT_FOUND
DENIED, UNAUTH, EXHAUSTED = C.PERMISSION_DENIED, C.UNAUTHENTICATED, C.RESOURCE_EXHAUSTED
CANCELLED, OK = C.CANCELLED, C.OK

MAX_TOKENS = 4096  # the fuzz cloud's max_tokens_per_step (at reference_seq_len 512)
MAX_MESSAGE_MB = 8  # the fuzz cloud's gRPC message limit
TARGETS = ("q_proj", "v_proj", "down_proj")  # two input groups: attn_in (q, v) and mlp_out (down, input width I)
LORA_BLOCKS = (1, 2, 3, 4)  # every cloud block of tiny-llama cut at k = m = 1
WIRES = {"fp32": pb.FLOAT32, "bf16": pb.BFLOAT16, "fp16": pb.FLOAT16, "int8": pb.INT8}
ALL_DTYPES = (pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16, pb.INT8, pb.INT64, pb.BOOL)
UNKNOWN_DTYPES = (0, 7, 8, 99, 2**31 - 1, -1, -(2**31))


# ---- the model's dimensions, as an edge knows them -------------------------------------------------------------------
@dataclass(frozen=True)
class Dims:
    H: int
    widths: dict  # target -> output width
    x_width: dict  # input group -> width of its shared input
    L: int
    groups: tuple

    @staticmethod
    def of(model) -> "Dims":
        block = model.model.layers[1]
        mods = {"q_proj": block.self_attn.q_proj, "v_proj": block.self_attn.v_proj, "down_proj": block.mlp.down_proj}
        return Dims(model.config.hidden_size, {t: m.out_features for t, m in mods.items()},
                    {"attn_in": mods["q_proj"].in_features, "mlp_out": mods["down_proj"].in_features},
                    model.config.num_hidden_layers, site_groups("llama", TARGETS))


def step_cost(batch, seq, block_params, hidden):
    return batch * seq * (2.0 * block_params + 4.0 * seq * hidden)


# ---- undecodable bytes -----------------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def proto_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def garbage(rng: random.Random, message_type, string_fields: list[tuple[int, ...]]) -> tuple[bytes, str]:
    """Bytes that are not a valid `message_type`, and how they are broken. `string_fields`: paths of field
    numbers to a string field (for invalid UTF-8, which proto3 refuses)."""
    how = rng.choice(["wire type", "field 0", "truncated length", "truncated varint", "bad utf-8", "end group",
                      "nested", "random"])
    tail = rng.randbytes(rng.randint(0, 64))
    if how == "wire type":  # wire types 6 and 7 do not exist
        data = _varint(rng.randint(1, 2**29 - 1) << 3 | rng.choice([6, 7])) + tail
    elif how == "field 0":
        data = bytes([rng.choice([0, 1, 2, 5])]) + tail
    elif how == "truncated length":
        n = rng.randint(1, 1 << 20)
        data = _varint(rng.randint(1, 8) << 3 | 2) + _varint(n) + rng.randbytes(rng.randint(0, min(n - 1, 64)))
    elif how == "truncated varint":
        data = _varint(rng.randint(1, 8) << 3 | 0) + b"\x80" * rng.randint(1, 9)
    elif how == "bad utf-8":
        payload = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"ok\xfe"])
        *outer, last = rng.choice(string_fields)
        data = proto_field(last, payload)
        for number in reversed(outer):
            data = proto_field(number, data)
    elif how == "end group":  # an END_GROUP tag with no group open
        data = _varint(rng.randint(1, 8) << 3 | 4) + tail
    elif how == "nested":  # a valid outer field whose content does not parse
        data = proto_field(rng.randint(1, 4), bytes([7]) + tail)
    else:
        data = b""
        for _ in range(1000):
            data = rng.randbytes(rng.randint(1, 256))
            try:
                message_type.FromString(data)
            except DecodeError:
                break
    try:  # the generator's own check: these bytes must not parse
        message_type.FromString(data)
    except DecodeError:
        return data, f"undecodable ({how})"
    return garbage(rng, message_type, string_fields)


# ---- tensors with one thing wrong ------------------------------------------------------------------------------------
def good_tensor(rng: random.Random, shape, dtype) -> pb.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    if dtype == pb.BOOL:
        return encode(torch.ones(shape, dtype=torch.bool), pb.BOOL)
    if dtype == pb.INT64:
        return encode(torch.ones(shape, dtype=torch.long), pb.INT64)
    return encode(torch.randn(shape, generator=g) * 0.05, dtype)


PER_DIM = ("zero dim", "negative dim", "huge dim")  # defects of one dimension (the systematic cases try each)


def tensor_defects(dtype: int, role: str) -> list[str]:
    """Every way `bad_tensor` can break a tensor of `dtype` in `role`."""
    out = ["dtype", "unknown dtype", "truncated", "extended", "no data", "width", "rank up", "rank down",
           *PER_DIM, "rank > 8"]
    if role != "mask":
        out += ["nan", "inf"] + (["fp16 overflow"] if dtype == pb.FLOAT16 else [])
    if dtype == pb.INT8:
        out += ["int8 scales short", "int8 scales long", "int8 scale nan"]
    return out


def bad_tensor(rng: random.Random, shape: list[int], dtype: int, role: str, how: str | None = None,
               dim: int | None = None) -> tuple[pb.Tensor, grpc.StatusCode, str]:
    """A tensor meant to be `shape` in `dtype` with one defect (`how`, at dimension `dim`; random if None), the
    status it must get, and the defect. role: "float" (fixed shape, finite, exactly `dtype`), "mask" (bool or
    int64), "hidden" (free batch and sequence; a well-formed one with too many tokens is RESOURCE_EXHAUSTED,
    checked before its bytes)."""
    floats = role != "mask"
    t = good_tensor(rng, shape, dtype)
    how = how or rng.choice(tensor_defects(dtype, role))
    dim = rng.randrange(len(shape)) if dim is None else dim
    code = INVALID
    if how == "dtype":
        accepted = {dtype} if floats else {pb.BOOL, pb.INT64}
        other = rng.choice([d for d in ALL_DTYPES if d not in accepted])
        t = good_tensor(rng, shape, other) if other not in (pb.BOOL, pb.INT64) else encode(
            torch.ones(shape, dtype=torch.bool if other == pb.BOOL else torch.long), other)
        how = f"dtype {pb.DType.Name(other)}"
    elif how == "unknown dtype":
        t.dtype = rng.choice(UNKNOWN_DTYPES)
        how = f"dtype {t.dtype}"
    elif how == "truncated":
        t.data = t.data[:-rng.randint(1, len(t.data))]
    elif how == "extended":
        t.data += rng.randbytes(rng.randint(1, 64))
    elif how == "no data":
        t.data = b""
    elif how == "width":
        w = shape[-1]
        t.shape[-1] = rng.choice([w + 1, w - 1, w * 2, w + rng.randint(2, 100)])
    elif how == "rank up":
        t.shape.insert(rng.randint(0, len(shape)), rng.choice([1, 2]))
    elif how == "rank down":
        del t.shape[rng.randrange(len(shape))]
    elif how == "zero dim":  # no elements: nothing to compute on (and no bytes)
        t.shape[dim] = 0
        t.data, t.scale = b"", b""
    elif how == "negative dim":
        t.shape[dim] = -rng.choice([1, 2, 5, 2**31, 2**62])
    elif how == "huge dim":
        t.shape[dim] = rng.choice([MAX_TOKENS + 1, 10**6, 2**31, 2**40, 2**62])
        if role == "hidden" and dim < 2:  # well-formed but too many tokens: refused before its bytes are read
            code = EXHAUSTED
    elif how == "rank > 8":
        del t.shape[:]
        t.shape.extend([1] * rng.choice([9, 16, 100, 10000]))
    elif how in ("nan", "inf", "fp16 overflow"):
        v = torch.randn(shape) * 0.05
        idx = tuple(rng.randrange(s) for s in shape)
        v[idx] = {"nan": float("nan"), "inf": rng.choice([1, -1]) * float("inf"), "fp16 overflow": 1e6}[how]
        t = encode(v, dtype)
    elif how.startswith("int8 scale"):
        _break_scales(rng, t, how)
    return t, code, f"{role} {how}" + (f" [{dim}]" if how in PER_DIM else "")


def _break_scales(rng: random.Random, t: pb.Tensor, how: str) -> None:
    """An int8 tensor's per-row scales made too few, too many, or one of them NaN / +-Inf."""
    if how == "int8 scales short":
        t.scale = t.scale[:-4 * rng.randint(1, len(t.scale) // 4)]
    elif how == "int8 scales long":
        t.scale += b"\0\0\x80\x3f" * rng.randint(1, 3)
    else:
        s = bytearray(t.scale)
        i = 4 * rng.randrange(len(s) // 4)
        s[i:i + 4] = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff"])  # NaN, +-Inf
        t.scale = bytes(s)


# ---- one case --------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    kind: str  # what is bad: Begin, LoraReply, ..., for the per-kind count
    expect: grpc.StatusCode
    label: str
    rpc: str = "Step"  # Step, OpenSession, CloseSession
    session: str = "fp32"  # which of the worker's sessions (Step)
    train: bool = True
    active: tuple = ()
    batch: int = 2
    seq: int = 4
    at: int = 0  # index among the step's up messages where the bad one goes
    payload: object = None  # bytes, an EdgeMessage, a callable(ctx) -> bytes, or None (end the stream there)
    metadata: object = "alice"  # a client name, or explicit metadata


@dataclass
class Ctx:
    """What the driver knows when it injects: the expected message and the shapes in play."""
    kind: str
    block: int | None
    group: str | None
    batch: int
    seq: int
    wire: int
    session_id: str = ""



def open_session_fields(rng: random.Random, L: int, fingerprint: str) -> tuple[bytes, grpc.StatusCode, str, object]:
    """An OpenSessionRequest (L blocks, this fingerprint) with one thing wrong: (bytes, status, what, metadata)."""
    req = dict(protocol_version=PROTOCOL_VERSION, model_fingerprint=fingerprint, edge_bottom_blocks=1,
               edge_top_blocks=1, wire_dtype_up=pb.FLOAT32, wire_dtype_down=pb.FLOAT32,
               lora_targets=list(TARGETS), lora_blocks=list(LORA_BLOCKS))
    what = rng.choice(["version", "fingerprint", "cut", "wire", "targets", "blocks", "blocks without targets",
                       "no token"])
    expect, metadata = INVALID, "alice"
    if what == "version":
        req["protocol_version"] = rng.choice([v for v in (0, 1, 3, 99, 2**32 - 1) if v != PROTOCOL_VERSION])
        expect = PRECONDITION
    elif what == "fingerprint":
        req["model_fingerprint"] = rng.choice(["", "someone-else", fingerprint + "x",
                                               "f" * rng.choice([100, 100_000, 1_000_000])])
        expect = PRECONDITION
    elif what == "cut":
        k, m = rng.choice([(0, 1), (1, 0), (0, 0), (3, 3), (L, 1), (1, L - 1), (2**32 - 1, 1), (1, 2**31)])
        req.update(edge_bottom_blocks=k, edge_top_blocks=m)
    elif what == "wire":
        req[rng.choice(["wire_dtype_up", "wire_dtype_down"])] = rng.choice([0, pb.INT64, pb.BOOL, 7, 99])
    elif what == "targets":
        bad = rng.choice(["", "nonsense", "Q_PROJ", "q_proj ", "c_attn", "lora_A", "t" * rng.choice([100, 10**6])])
        req["lora_targets"] = rng.sample([*TARGETS, bad], len(TARGETS) + 1)
    elif what == "blocks":
        req["lora_blocks"] = [*LORA_BLOCKS, rng.choice([0, 5, 6, 100, 2**32 - 1])]
    elif what == "blocks without targets":
        req["lora_targets"] = []
    else:
        metadata = rng.choice([[], [(AUTH_HEADER, "Bearer " + rng.randbytes(20).hex())]])
        expect = UNAUTH
    return pb.OpenSessionRequest(**req).SerializeToString(), expect, what, metadata
