"""Tensor <-> protobuf `Tensor`, with the wire dtypes fp32, bf16, fp16 and int8 (per-row absmax).

Decoding validates everything a hostile or broken peer could get wrong (unknown dtype, byte count that does not
match the shape, NaN/Inf, too many elements, wrong shape) and raises `WireError` carrying the gRPC status to return.
"""
from __future__ import annotations

import math
from typing import Literal, get_args

import grpc
import numpy as np
import torch

from protocol import pb

WIRE_DTYPES = {"fp32": pb.FLOAT32, "bf16": pb.BFLOAT16, "fp16": pb.FLOAT16, "int8": pb.INT8}
Wire = Literal["fp32", "bf16", "fp16", "int8"]  # the names of WIRE_DTYPES, as a type for configs and flags
assert set(get_args(Wire)) == set(WIRE_DTYPES)
_ELEM_BYTES = {pb.FLOAT32: 4, pb.BFLOAT16: 2, pb.FLOAT16: 2, pb.INT8: 1, pb.INT64: 8, pb.BOOL: 1}
_TORCH = {pb.FLOAT32: torch.float32, pb.BFLOAT16: torch.bfloat16, pb.FLOAT16: torch.float16, pb.INT64: torch.int64,
          pb.BOOL: torch.bool}


MAX_RANK = 8  # no tensor on the wire has more dimensions; a longer shape is refused before it is quoted


class WireError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def wire_dtype(name: str) -> int:
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise ValueError(f"wire dtype must be one of {sorted(WIRE_DTYPES)}, got {name!r}") from None


def payload_bytes(shape, dtype: int) -> int:
    """Raw bytes of a tensor of `shape` on the wire in `dtype` (int8 includes its float32 per-row scales)."""
    n = math.prod(shape)
    extra = 4 * (n // shape[-1]) if dtype == pb.INT8 and len(shape) and shape[-1] else 0
    return n * _ELEM_BYTES[dtype] + extra


def tensor_payload(msg) -> int:
    """Raw tensor bytes (data + int8 scales) inside any message, found by walking its fields."""
    if isinstance(msg, pb.Tensor):
        return len(msg.data) + len(msg.scale)
    total = 0
    for fd, value in msg.ListFields():
        if fd.message_type is not None:
            total += sum(tensor_payload(v) for v in (value if fd.is_repeated else [value]))
    return total


def encode(t: torch.Tensor, dtype: int = pb.FLOAT32) -> pb.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    shape = list(t.shape)
    if dtype == pb.INT8:
        rows = t.float().reshape(-1, shape[-1] if shape else 1)
        scale = rows.abs().amax(dim=1).clamp_min(1e-30) / 127.0
        q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return pb.Tensor(dtype=dtype, shape=shape, data=q.numpy().tobytes(), scale=scale.numpy().tobytes())
    if dtype == pb.BFLOAT16:
        data = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    else:
        data = t.to(_TORCH[dtype]).contiguous().numpy().tobytes()
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def decode(msg: pb.Tensor, *, shape=None, dtypes=None, max_elements: int | None = None, finite: bool = True,
           out_dtype: torch.dtype = torch.float32, device="cpu", what: str = "tensor") -> torch.Tensor:
    """Check and decode. `shape` may use None for free dims. Raises WireError with the gRPC code to send."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if msg.dtype not in _ELEM_BYTES:
        raise WireError(bad, f"{what}: unknown dtype {msg.dtype}")
    if dtypes is not None and msg.dtype not in dtypes:
        names = [pb.DType.Name(d) for d in dtypes]
        raise WireError(bad, f"{what}: dtype {pb.DType.Name(msg.dtype)} not accepted here (expected one of {names})")
    got = tuple(msg.shape)
    if len(got) > MAX_RANK:
        raise WireError(bad, f"{what}: rank {len(got)} is more than {MAX_RANK}")
    if any(d < 0 for d in got):
        raise WireError(bad, f"{what}: negative dimension in shape {got}")
    if shape is not None and (len(got) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got))):
        raise WireError(bad, f"{what}: shape {list(got)} does not match expected {list(shape)}")
    n = math.prod(got)  # after the shape check: a malformed tensor is INVALID_ARGUMENT whatever its size
    if max_elements is not None and n > max_elements:
        raise WireError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what}: {n} elements exceeds the limit {max_elements}")
    if len(msg.data) != n * _ELEM_BYTES[msg.dtype]:
        raise WireError(bad, f"{what}: {len(msg.data)} data bytes do not fit shape {list(got)} of "
                             f"{pb.DType.Name(msg.dtype)}")
    if msg.dtype == pb.INT8:
        width = got[-1] if got else 0
        rows = n // width if width else 0
        if len(msg.scale) != 4 * rows:
            raise WireError(bad, f"{what}: int8 needs {rows} float32 scales, got {len(msg.scale)} bytes")
        if n and not rows:
            raise WireError(bad, f"{what}: an int8 tensor needs rows (a last dimension), got shape {list(got)}")
        q = torch.from_numpy(np.frombuffer(msg.data, dtype=np.int8).copy()).float().reshape(rows, width)
        scale = torch.from_numpy(np.frombuffer(msg.scale, dtype=np.float32).copy())
        t = (q * scale[:, None]).reshape(got)
    elif msg.dtype == pb.BFLOAT16:
        t = torch.from_numpy(np.frombuffer(msg.data, dtype=np.int16).copy()).view(torch.bfloat16).reshape(got)
    else:
        np_dtype = {pb.FLOAT32: np.float32, pb.FLOAT16: np.float16, pb.INT64: np.int64, pb.BOOL: np.bool_}[msg.dtype]
        t = torch.from_numpy(np.frombuffer(msg.data, dtype=np_dtype).copy()).reshape(got)
    if t.is_floating_point():
        if finite and not torch.isfinite(t).all():
            raise WireError(bad, f"{what}: contains NaN or Inf")
        t = t.to(out_dtype)
    return t.to(device)
