"""`tandem sim calibrate`: measure this machine once, so predictions for *here* use measured figures.

Each figure is one microbenchmark, run as Tandem runs (fp32 on the CPU, torch's current thread count), timed as the
best of repeated runs; nothing is fitted to a training run:
  matmul_flops        a GEMM of realistic shape: [tokens, H] x [H, I] of the calibration model
  block_curve         forward + backward (input gradient, frozen weights) of `blocks` decoder blocks of the
                      calibration model's shape, run through the same code as the cloud (model.segments.BlockRun),
                      counted with the cost model's FLOP formulas, at batch x {16, 32, 64, 128} tokens. This is what
                      compute time uses (interpolated in tokens per step): it includes what a bare GEMM leaves out
                      (norms, softmax, rotary, SiLU, autograd) and how small steps run slower per FLOP.
                      block_flops is its value at batch x seq
  memory_bandwidth    copying a 256 MB tensor (read + write)
  codec_bytes_per_s   encode + serialize + parse + decode of a hidden state with protocol/tensors.py
  grpc_rtt_s          median round trip of a 1-byte message on a gRPC bidirectional stream over loopback
The result is saved as JSON ($TANDEM_HOME/sim/calibration.json, default ~/.cache/tandem/sim/).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sim.costmodel import block_compute
from sim.shape import ModelShape, load_shape


@dataclass(frozen=True)
class Calibration:
    machine: str
    threads: int
    measured_at: str
    model: str  # shape the block benchmark used
    batch: int
    seq: int
    matmul_flops: float
    block_flops: float  # at batch x seq tokens
    block_curve: list  # [[tokens, FLOP/s], ...], tokens ascending
    memory_bandwidth: float
    memory_bytes: float
    codec_bytes_per_s: float
    grpc_rtt_s: float

    def summary(self) -> str:
        curve = ", ".join(f"{t}: {f / 1e9:.0f}" for t, f in self.block_curve)
        return (f"{self.machine}, {self.threads} threads: GEMM {self.matmul_flops / 1e9:.0f} GFLOP/s; decoder block "
                f"fwd+bwd GFLOP/s by tokens per step {{{curve}}} ({self.model}, batch {self.batch}); memory "
                f"{self.memory_bandwidth / 1e9:.1f} GB/s; codec {self.codec_bytes_per_s / 1e9:.2f} GB/s; gRPC "
                f"loopback round trip {self.grpc_rtt_s * 1e6:.0f} us")


def calibration_path() -> Path:
    if os.environ.get("TANDEM_SIM_CALIBRATION"):
        return Path(os.environ["TANDEM_SIM_CALIBRATION"])
    home = Path(os.environ.get("TANDEM_HOME", Path.home() / ".cache" / "tandem"))
    return home / "sim" / "calibration.json"


def load_calibration(path: str | Path | None = None) -> Calibration:
    path = Path(path) if path else calibration_path()
    if not path.exists():
        raise FileNotFoundError(f"no calibration at {path}: run `tandem sim calibrate` first")
    return Calibration(**json.loads(path.read_text()))


def save_calibration(cal: Calibration, path: str | Path | None = None) -> Path:
    path = Path(path) if path else calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(cal), indent=2) + "\n")
    return path


def _best_seconds(fn, min_time: float, min_reps: int = 3, warmup: int = 2) -> float:
    """The fastest of repeated runs over at least `min_time` seconds: what the hardware does when it is ours (on a
    shared machine the slower repetitions measure other people's work, as timeit's documentation argues)."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_matmul(shape: ModelShape, tokens: int, min_time: float = 0.5) -> float:
    import torch
    a = torch.randn(tokens, shape.hidden)
    b = torch.randn(shape.hidden, shape.intermediate)
    return 2.0 * tokens * shape.hidden * shape.intermediate / _best_seconds(lambda: a @ b, min_time)


def _llama(shape: ModelShape, blocks: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=blocks, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                      head_dim=shape.head_dim, max_position_embeddings=4096, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def measure_block(shape: ModelShape, batch: int, seq: int, blocks: int = 4, min_time: float = 2.0) -> float:
    """FLOP/s of forward + backward through frozen decoder blocks, padded batch as the cloud receives it."""
    import torch
    from model.segments import BlockRun
    model = _llama(shape, blocks)
    run = BlockRun(model, range(blocks))
    hidden = torch.randn(batch, seq, shape.hidden)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1::2, seq * 3 // 4:] = 0  # right padding on every other row, as real batches have

    def step():
        x = hidden.clone().requires_grad_(True)
        out = run(x, mask)
        out.backward(torch.ones_like(out))

    flops = block_compute(shape, batch, seq).flops * blocks
    return flops / _best_seconds(step, min_time)


def measure_memory_bandwidth(nbytes: int = 256 << 20, min_time: float = 0.5) -> float:
    import torch
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return 2.0 * nbytes / _best_seconds(lambda: dst.copy_(src), min_time)


def measure_codec(shape: ModelShape, batch: int, seq: int, min_time: float = 0.5) -> float:
    """Bytes/s of one hidden state through encode -> serialize -> parse -> decode (what every wire tensor costs)."""
    import torch
    from protocol import pb
    from protocol.tensors import decode, encode
    t = torch.randn(batch, seq, shape.hidden)

    def roundtrip():
        wire = pb.EdgeMessage(output_grad=pb.OutputGrad(grad=encode(t, pb.FLOAT32))).SerializeToString()
        decode(pb.EdgeMessage.FromString(wire).output_grad.grad, shape=[batch, seq, shape.hidden])

    return t.numel() * 4 / _best_seconds(roundtrip, min_time)


def measure_grpc_rtt(rounds: int = 300) -> float:
    """Median round trip of a tiny message on one bidirectional gRPC stream over 127.0.0.1."""
    from concurrent import futures
    import queue

    import grpc

    def echo(requests, context):
        for r in requests:
            yield r

    handler = grpc.method_handlers_generic_handler("tandem.sim.Echo", {
        "Step": grpc.stream_stream_rpc_method_handler(echo, request_deserializer=None, response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream("/tandem.sim.Echo/Step")
            outbox: queue.Queue = queue.Queue()
            replies = call(iter(outbox.get, None))
            times = []
            for i in range(rounds + 20):
                t0 = time.perf_counter()
                outbox.put(b"x")
                next(replies)
                if i >= 20:
                    times.append(time.perf_counter() - t0)
            outbox.put(None)
            for _ in replies:
                pass
        return statistics.median(times)
    finally:
        server.stop(0)


def _machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 8e9


CURVE_SEQS = (16, 32, 64, 128)


def calibrate(model: str = "smollm2-135m", batch: int = 4, seq: int = 64, blocks: int = 4,
              quick: bool = False) -> Calibration:
    """Run every microbenchmark (about 20 s; `quick` shortens each for tests)."""
    import torch
    shape = load_shape(model)
    scale = 0.1 if quick else 1.0
    seqs = sorted(set(CURVE_SEQS) | {seq})
    curve = [[batch * t, measure_block(shape, batch, t, blocks, 1.5 * scale)] for t in seqs]
    return Calibration(
        machine=_machine(), threads=torch.get_num_threads(), measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        model=shape.name, batch=batch, seq=seq,
        matmul_flops=measure_matmul(shape, batch * seq, 1.0 * scale),
        block_flops=dict((t, f) for t, f in curve)[batch * seq], block_curve=curve,
        memory_bandwidth=measure_memory_bandwidth((256 if not quick else 32) << 20, 0.5 * scale),
        memory_bytes=_memory_bytes(),
        codec_bytes_per_s=measure_codec(shape, batch, seq, 0.5 * scale),
        grpc_rtt_s=measure_grpc_rtt(300 if not quick else 50))
