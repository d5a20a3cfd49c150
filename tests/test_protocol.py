"""The wire format: generated code is reproducible from the .proto, tensors round-trip within known bounds."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from protocol import pb
from protocol.generate import OUT, generate
from protocol.tensors import WireError, decode, encode, payload_bytes


def test_generated_code_matches_the_proto(tmp_path):
    generate(tmp_path)
    for f in ("tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py", "__init__.py"):
        assert (tmp_path / f).read_text() == (OUT / f).read_text(), f"{f} is stale: run python -m protocol.generate"


def test_fp32_round_trip_is_exact():
    t = torch.randn(3, 5, 7)
    assert torch.equal(decode(encode(t)), t)


@pytest.mark.parametrize("dtype,rel", [(pb.BFLOAT16, 2 ** -8), (pb.FLOAT16, 2 ** -11)])
def test_half_precision_error_bounded_by_mantissa(dtype, rel):
    t = torch.randn(4, 9, 33) * 10
    back = decode(encode(t, dtype))
    assert ((back - t).abs() <= t.abs() * rel + 1e-6).all()
    assert not torch.equal(back, t)


def test_int8_per_row_absmax_error_at_most_half_a_step():
    t = torch.randn(6, 10, 64) * torch.logspace(-3, 3, 10)[None, :, None]  # rows of very different scale
    msg = encode(t, pb.INT8)
    assert len(msg.data) == t.numel() and len(msg.scale) == 4 * 60
    back = decode(msg)
    step = t.abs().amax(-1, keepdim=True) / 127
    assert ((back - t).abs() <= step / 2 + 1e-7 * step).all()
    assert payload_bytes(t.shape, pb.INT8) == len(msg.data) + len(msg.scale)


def test_int8_keeps_zero_rows_exact():
    t = torch.zeros(2, 3, 8)
    assert torch.equal(decode(encode(t, pb.INT8)), t)


def test_bool_and_int64():
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert torch.equal(decode(encode(m, pb.BOOL)), m)
    ids = torch.tensor([[5, 2 ** 40]])
    assert torch.equal(decode(encode(ids, pb.INT64)), ids)


@pytest.mark.parametrize("mutate,code,words", [
    (lambda m: setattr(m, "data", m.data[:-1]), grpc.StatusCode.INVALID_ARGUMENT, "data bytes"),
    (lambda m: m.shape.__setitem__(0, -2), grpc.StatusCode.INVALID_ARGUMENT, "negative"),
    (lambda m: setattr(m, "dtype", 99), grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype"),
])
def test_malformed_tensors_are_refused(mutate, code, words):
    msg = encode(torch.randn(2, 4))
    mutate(msg)
    with pytest.raises(WireError) as e:
        decode(msg)
    assert e.value.code == code and words in str(e.value)


def test_shape_dtype_limit_and_nan_checks():
    msg = encode(torch.randn(2, 4))
    with pytest.raises(WireError, match="shape"):
        decode(msg, shape=[2, 5])
    with pytest.raises(WireError, match="not accepted"):
        decode(msg, dtypes=[pb.BFLOAT16])
    with pytest.raises(WireError) as e:
        decode(msg, max_elements=7)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    bad = torch.randn(2, 4)
    bad[1, 1] = float("inf")
    with pytest.raises(WireError, match="NaN or Inf"):
        decode(encode(bad))
    assert decode(msg, shape=[None, 4]).shape == (2, 4)


def test_proto_declares_a_version():
    from protocol import PROTOCOL_VERSION
    assert PROTOCOL_VERSION >= 1
    assert "protocol_version" in Path(__file__).parents[1].joinpath("protocol/tandem.proto").read_text()
