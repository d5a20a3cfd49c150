"""Device and link profiles: how fast a side computes, how much it holds, how fast and far away the link is.

Two kinds of figures live here, and every profile says which it is in `source`:
  - measured: `here` comes from `tandem sim calibrate` (sim/calibrate.py) on this machine; the testbed links use the
    rate we set with `tc` and the round trip measured on loopback.
  - documented: the other devices use the vendor's peak figure times an efficiency (the fraction of peak that LLM
    training reaches), both cited. Predictions for them are only as good as those two numbers; they are printed
    with every what-if table.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

GB = 1e9


@dataclass(frozen=True)
class DeviceProfile:
    """One side's compute. `flops` is the sustained training throughput used for compute time (FLOP/s); where it
    was measured at several sizes, `flops_curve` holds (tokens per step, FLOP/s) and `throughput(tokens)` follows it
    (small batches run matrices too small to reach full speed)."""
    name: str
    flops: float  # sustained FLOP/s for transformer training steps
    memory_bandwidth: float  # bytes/s (optimizer steps and memory-bound batches)
    memory: float  # bytes the side can use for weights + activations + optimizer state
    dtype_bytes: int  # bytes per weight/activation element when training here (4 = fp32, 2 = bf16)
    codec: float  # bytes/s to encode + serialize + parse + decode wire tensors (protocol/tensors.py)
    source: str
    peak_flops: float = 0.0
    efficiency: float = 1.0
    kernel_overhead: float = 0.0  # seconds of fixed cost per cloud job (launches, Python, scheduling)
    flops_curve: tuple[tuple[int, float], ...] = ()  # measured (tokens, FLOP/s), tokens ascending

    def throughput(self, tokens: float | None = None) -> float:
        """FLOP/s at `tokens` tokens per step: interpolated in log(tokens) between measured sizes, the nearest
        measured size outside them; `flops` where no curve was measured."""
        curve = self.flops_curve
        if not curve or tokens is None:
            return self.flops
        if tokens <= curve[0][0]:
            return curve[0][1]
        for (t0, f0), (t1, f1) in zip(curve, curve[1:]):
            if tokens <= t1:
                a = math.log(tokens / t0) / math.log(t1 / t0)
                return f0 + a * (f1 - f0)
        return curve[-1][1]


# Efficiency for GPUs: Meta reports 38-43 % BF16 model-FLOPs utilisation training Llama 3 on H100s
# ("The Llama 3 Herd of Models", 2024, Table 4); we use 0.40 for every datacenter/desktop GPU.
GPU_EFFICIENCY = 0.40
# Efficiency for CPUs: on this machine a whole decoder block (fwd+bwd) reaches ~0.55 of the GEMM rate, and GEMM
# ~0.95 of the AVX-512 peak (tandem sim calibrate); we use 0.5 of peak for other CPUs.
CPU_EFFICIENCY = 0.50
# Wire codec speed for devices we cannot measure: a few memory copies per byte; 2 GB/s is what a laptop-class
# machine reaches with numpy copies (an assumption, printed). GPU jobs also pay a fixed 2 ms each for kernel
# launches and Python (an assumption; it only matters for many small DLoRA slices).
ASSUMED_CODEC = 2 * GB

DEVICES: dict[str, DeviceProfile] = {
    "h100-sxm": DeviceProfile(
        "h100-sxm", 989.4e12 * GPU_EFFICIENCY, 3.35e12, 80 * GB, 2, ASSUMED_CODEC,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989.4 TFLOPS BF16 dense, 3.35 TB/s HBM3, 80 GB; "
        "efficiency 0.40 (Llama 3 paper, Table 4)", 989.4e12, GPU_EFFICIENCY, 2e-3),
    "a100-80gb": DeviceProfile(
        "a100-80gb", 312e12 * GPU_EFFICIENCY, 2.039e12, 80 * GB, 2, ASSUMED_CODEC,
        "NVIDIA A100 datasheet (SXM 80GB): 312 TFLOPS BF16 dense, 2.039 TB/s HBM2e; efficiency 0.40",
        312e12, GPU_EFFICIENCY, 2e-3),
    "rtx-4090": DeviceProfile(
        "rtx-4090", 165.2e12 * GPU_EFFICIENCY, 1.008e12, 24 * GB, 2, ASSUMED_CODEC,
        "NVIDIA Ada Lovelace architecture whitepaper, Appendix A: 165.2 TFLOPS BF16 (FP32 accumulate) dense, "
        "1008 GB/s GDDR6X, 24 GB; efficiency 0.40", 165.2e12, GPU_EFFICIENCY, 2e-3),
    "apple-m2": DeviceProfile(
        "apple-m2", 3.6e12 * GPU_EFFICIENCY, 100 * GB, 16 * GB, 4, ASSUMED_CODEC,
        "Apple M2 press release (June 2022): 3.6 TFLOPS FP32 GPU, 100 GB/s unified memory; 16 GB model; "
        "efficiency 0.40", 3.6e12, GPU_EFFICIENCY, 2e-3),
    "raspberry-pi-5": DeviceProfile(
        "raspberry-pi-5", 153.6e9 * CPU_EFFICIENCY, 17 * GB, 8 * GB, 4, 1 * GB,
        "Raspberry Pi 5 product brief: 4x Cortex-A76 at 2.4 GHz (2x128-bit NEON FMA/cycle = 16 FP32 FLOP/cycle/core"
        " -> 153.6 GFLOPS peak), LPDDR4X-4267 32-bit (17 GB/s), 8 GB; efficiency 0.5, codec 1 GB/s assumed",
        153.6e9, CPU_EFFICIENCY),
}


def here(compute: str = "block", cal=None) -> DeviceProfile:
    """This machine, from `tandem sim calibrate` (or the Calibration `cal`). `compute="block"` uses the measured
    decoder-block training throughput, `"matmul"` the bare GEMM rate (which leaves out norms, softmax, rotary,
    activations and autograd)."""
    from sim.calibrate import load_calibration
    cal = cal or load_calibration()
    flops = {"block": cal.block_flops, "matmul": cal.matmul_flops}[compute]
    curve = tuple((int(t), float(f)) for t, f in cal.block_curve) if compute == "block" else ()
    sizes = ", ".join(f"{t} tokens {f / 1e9:.0f}" for t, f in curve)
    return DeviceProfile(
        "here", flops, cal.memory_bandwidth, cal.memory_bytes, 4, cal.codec_bytes_per_s,
        f"measured by `tandem sim calibrate` on {cal.machine} ({cal.threads} threads, {cal.measured_at}): "
        f"{compute} benchmark " + (f"GFLOP/s fp32 at {sizes}" if curve else f"{flops / 1e9:.0f} GFLOP/s fp32"),
        cal.matmul_flops, flops / cal.matmul_flops, flops_curve=curve)


HERE = ("here", "here-block", "here-matmul")  # this machine: need `tandem sim calibrate`
DEVICE_NAMES = (*HERE, *DEVICES)  # every name `device_profile` takes (the --edge / --cloud choices)


def no_calibration() -> FileNotFoundError:
    """The one-line answer when `here` is asked for before `tandem sim calibrate`."""
    from sim.calibrate import calibration_path
    return FileNotFoundError(f"the `here` profile needs a calibration and there is none at {calibration_path()}: "
                             f"run `tandem sim calibrate`, or pick a documented profile: {', '.join(DEVICES)}")


def device_profile(name: str) -> DeviceProfile:
    """A documented device by name (no calibration needed), or `here` / `here-matmul` from the calibration."""
    if name in HERE:
        try:
            return here("matmul" if name == "here-matmul" else "block")
        except FileNotFoundError:
            raise no_calibration() from None
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"unknown device {name!r}: use 'here' (after `tandem sim calibrate`) or one of "
                         f"{sorted(DEVICES)}") from None


# ---- links ---------------------------------------------------------------------------------------------------------
HTTP2_FRAME_PAYLOAD = 16384  # gRPC's default HTTP/2 max frame size
HTTP2_FRAME_HEADER = 9
TCP_IP_HEADERS = 52  # IPv4 20 + TCP 20 + timestamps option 12
ETHERNET_HEADER = 14  # what Linux tbf counts of each packet on a veth/Ethernet device


@dataclass(frozen=True)
class LinkProfile:
    """An edge's link to the cloud. Rates in bits/s of link capacity (what `tc tbf rate` or a provider quotes)."""
    name: str
    up_bps: float
    down_bps: float
    rtt: float  # seconds, one request/answer exchange with tiny messages (network + gRPC software)
    source: str
    mtu: int = 1500

    @property
    def efficiency(self) -> float:
        """Share of the link rate that carries TCP payload: each MTU-sized packet carries MTU-52 bytes of payload
        and costs MTU+14 bytes of the rate (HTTP/2 frame headers are added per byte in `transfer_seconds`)."""
        return (self.mtu - TCP_IP_HEADERS) / (self.mtu + ETHERNET_HEADER)

    def transfer_seconds(self, wire_bytes: float, direction: str) -> float:
        """Serialization time of one gRPC message of `wire_bytes` on this link (no latency)."""
        framed = wire_bytes * (1 + HTTP2_FRAME_HEADER / HTTP2_FRAME_PAYLOAD)
        rate = self.up_bps if direction == "up" else self.down_bps
        return framed * 8 / (rate * self.efficiency)

    def with_rtt(self, rtt: float) -> "LinkProfile":
        return replace(self, rtt=rtt, source=f"{self.source}; rtt {rtt * 1e3:.3g} ms")


# A WAN round trip between a user and a cloud region; ~20 ms is typical for same-continent broadband (assumption,
# printed with every what-if table; set --rtt-ms to change it).
WAN_RTT = 0.020
LINKS: dict[str, LinkProfile] = {
    "lte": LinkProfile("lte", 10e6, 40e6, 0.050, "assumed 4G/LTE: 10 Mbit/s up, 40 Mbit/s down, 50 ms RTT"),
    "home-20-100": LinkProfile("home-20-100", 20e6, 100e6, 0.050,
                               "assumed home broadband: 20 Mbit/s up, 100 Mbit/s down, 50 ms RTT"),
    "wifi-100mbit": LinkProfile("wifi-100mbit", 100e6, 100e6, WAN_RTT, "assumed broadband: 100 Mbit/s, 20 ms"),
    "fiber-1gbit": LinkProfile("fiber-1gbit", 1e9, 1e9, WAN_RTT, "assumed fiber: 1 Gbit/s symmetric, 20 ms"),
}


def rate_link(rate_bps: float, rtt: float = WAN_RTT, name: str | None = None, source: str = "") -> LinkProfile:
    """A symmetric link of `rate_bps`."""
    return LinkProfile(name or rate_name(rate_bps), rate_bps, rate_bps, rtt,
                       source or f"symmetric {rate_bps / 1e6:g} Mbit/s, rtt {rtt * 1e3:g} ms (assumed)")


def rate_name(rate_bps: float) -> str:
    """100e6 -> '100mbit', 1e9 -> '1gbit', 2.5e5 -> '250kbit'."""
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if rate_bps >= scale:
            return f"{rate_bps / scale:g}{unit}"
    return f"{rate_bps:g}bit"


# A gRPC round trip over loopback when this machine has not been calibrated: an assumption (printed with the link),
# near the 0.19 ms `sim.calibrate.measure_grpc_rtt` gave on the shared CPU machine Tandem is developed on.
ASSUMED_LOOPBACK_RTT = 200e-6


def testbed_link(rate_mbit: float, cal=None) -> LinkProfile:
    """A veth pair rate-limited with tbf: the set rate both ways; the round trip is the calibrated gRPC loopback
    round trip (a veth pair adds no propagation delay), or ASSUMED_LOOPBACK_RTT before any calibration."""
    from sim.calibrate import load_calibration
    try:
        rtt, how = (cal or load_calibration()).grpc_rtt_s, "calibrated gRPC loopback"
    except FileNotFoundError:
        rtt, how = ASSUMED_LOOPBACK_RTT, "assumed gRPC loopback; `tandem sim calibrate` measures it"
    return LinkProfile(f"testbed-{rate_mbit:g}mbit", rate_mbit * 1e6, rate_mbit * 1e6, rtt,
                       f"tc tbf {rate_mbit:g} Mbit/s both ways; rtt {rtt * 1e3:.3g} ms ({how})")


def link_profile(spec: str, rtt: float | None = None) -> LinkProfile:
    """`lte`, `wifi-100mbit`, `fiber-1gbit`, `testbed-50mbit`, or a rate like `100mbit` / `1gbit` / `250kbit`."""
    if spec.startswith("testbed-"):
        link = testbed_link(_rate(spec[len("testbed-"):]) / 1e6)
    elif spec in LINKS:
        link = LINKS[spec]
    else:
        link = rate_link(_rate(spec))
    return link.with_rtt(rtt) if rtt is not None else link


def _rate(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)\s*(k|m|g)bit", text.strip().lower())
    if not m:
        raise ValueError(f"unknown link {text!r}: use {sorted(LINKS)}, testbed-<N>mbit or a rate like 100mbit, 1gbit")
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
