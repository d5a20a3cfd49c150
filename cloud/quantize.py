"""`tandem cloud serve --quantize int8|int4`: the cloud holds the frozen weights of the blocks it serves in 8 or
4 bits (QLoRA's idea, on the cloud); the edge keeps its full-precision LoRA. Only the blocks' linears are
quantized: the embedding, norms and LM head are the edge's.

    quantize_blocks(model, mode)          every nn.Linear of the family's blocks, in place -> MemoryReport
    quantized_linear(linear, mode, group) one linear, frozen
    weight_bytes(modules)                 the actual storage of their tensors, quantization state included
    dense_weight(linear)                  a linear's weight as [out, in] in full precision (de-quantized if need be)

The library is optimum-quanto (0.2.7): int8 is `qint8` with one absmax scale per output row; int4 is `qint4`, packed
two to a byte, with a scale and a shift (the group's minimum) per group of 32 input features. 32 is GGUF Q4_1's
block, and Q4_1 holds each block as 16 even steps from its minimum to its maximum, so the grid of a weight that came
from a Q4_1 file, as SmolLM2-135M's does, is found again exactly: on the 28 middle blocks the blocks' output error is
0.000 at 0.188 of the fp32 weight bytes, against 0.203 for groups of 64 (0.157) and 0.315 for quanto's own default
of 96 here (0.146); int8 errs 0.025 at 0.252 (`python bench/quantize_error.py`, 2026-12-03). On a checkpoint in full
precision int4 is ordinary min-max 4-bit in groups of 32: on random Gaussian weights of SmolLM2's shapes a weight's
relative error is about 0.08 (tests/test_quantize.py); no such real checkpoint is on our machines to measure
accuracy on. SST-2 dev after 100 steps of carried LoRA, seeds 0, 1, 2 (`python bench/quantized_cloud.py --seeds 0,1,2`,
2026-12-03): int8 +0.7 pt from fp32, int4 +0.0 pt (the same losses as fp32's).

Picked by measurement: bitsandbytes (QLoRA's NF4, blocks of 64) erred 0.213 on the same blocks at 0.130, 0.078 at
0.160 with down_proj in int8, and cost 1.6 pt of SST-2 dev accuracy over three seeds (`bench/quantized_cloud.py`,
2026-12-03); its CPU eval mode also repacks the 4-bit weight for a kernel without a backward. torchao has no packed
int4 on CPU (`IntxWeightOnlyConfig` keeps one int8 per 4-bit value, over the 0.2 budget). quanto is in maintenance
mode (its README, since November 2025); it is the one of the three with a packed, grouped, asymmetric int4 on CPU
(in plain torch ops at this group size, so on any device; CUDA is not run here). Its frozen QLinear de-quantizes the weight in each forward and backpropagates to the input through its own
autograd function; no weight has a gradient.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from model.families import family_of

MODES = ("none", "int8", "int4")
INT4_GROUP = 32  # --quantize int4's group: GGUF Q4_1's block, so a Q4_1 checkpoint's grid is held exactly
MiB = 2 ** 20


@dataclass(frozen=True)
class MemoryReport:
    """What the served blocks' weights take (`weight_bytes`), before and after, and the process RSS after."""
    mode: str
    dtype: str  # the weights' dtype as loaded
    blocks: int
    linears: int  # linears quantized
    before: int  # bytes of the blocks' weights as loaded
    after: int  # bytes of the blocks' weights now
    rss: int  # the process's resident memory after quantizing

    @property
    def ratio(self) -> float:
        return self.after / self.before

    def line(self) -> str:
        held = f"{self.mode}, {self.ratio:.3f} of {self.before / MiB:.1f} MiB {self.dtype}" if self.mode != "none" \
            else self.dtype
        return f"{self.blocks} blocks' weights {self.after / MiB:.1f} MiB ({held}), RSS {self.rss / MiB:.0f} MiB"


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"--quantize must be one of {', '.join(MODES)}, got {mode!r}")


def quantize_blocks(model, mode: str, blocks=None, int4_group: int = INT4_GROUP) -> MemoryReport:
    """Quantize every nn.Linear of the family's blocks (or of the blocks numbered in `blocks`) in place, frozen; int4
    in groups of `int4_group` input features. "none" changes nothing and only measures."""
    check_mode(mode)
    all_blocks = family_of(model).blocks(model)
    chosen = [all_blocks[i] for i in (range(len(all_blocks)) if blocks is None else blocks)]
    dtype = str(next(chosen[0].parameters()).dtype).removeprefix("torch.")
    before, count = weight_bytes(chosen), 0
    if mode != "none":
        for block in chosen:
            linears = [(name, m) for name, m in block.named_modules() if type(m) is nn.Linear]
            if not linears:
                raise ValueError(f"--quantize {mode}: this {model.config.model_type} model's blocks hold no nn.Linear "
                                 "to quantize (GPT-2's are Conv1D, quantized ones are not nn.Linear)")
            for name, linear in linears:
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent), leaf, quantized_linear(linear, mode, int4_group))
            count += len(linears)
        _release_freed_memory()
    return MemoryReport(mode, dtype, len(chosen), count, before, weight_bytes(chosen), rss_bytes())


def quantized_linear(linear: nn.Linear, mode: str, int4_group: int) -> nn.Module:
    """optimum-quanto's QLinear holding `linear`'s weight in `mode`, frozen, on its device and in its dtype."""
    from optimum.quanto import QLinear, qint4, qint8
    q = QLinear.from_module(linear, weights=qint8 if mode == "int8" else qint4)
    if mode == "int4":
        if linear.in_features % int4_group:
            raise ValueError(f"--quantize int4: a linear has {linear.in_features} input features, not a multiple of "
                             f"the group of {int4_group}; use --quantize int8")
        q.weight_group_size = int4_group
    q.freeze()  # the weight is quantized now, once: concurrent steps then only read the module
    q.weight.requires_grad_(False)
    if q.bias is not None:
        q.bias.requires_grad_(False)
    return q


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """`linear`'s weight as [out, in] in full precision: de-quantized for a quantized linear, as is for an nn.Linear
    (what DoRA's weight norm needs)."""
    from optimum.quanto import QTensor
    w = linear.weight
    return w.dequantize() if isinstance(w, QTensor) else w


def _tensors(module: nn.Module):
    """Every plain tensor the module holds: a quantized weight's inner tensors (packed data, scales, shifts)."""
    def inner(t):
        if hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                yield from inner(getattr(t, name))
        else:
            yield t
    for t in [*module.parameters(), *module.buffers()]:
        yield from inner(t.data if isinstance(t, nn.Parameter) else t)


def weight_bytes(modules) -> int:
    """Bytes of every tensor the modules hold (parameters, buffers, quantization state), each storage once."""
    seen: dict[tuple, int] = {}
    for module in modules:
        for t in _tensors(module):
            seen[t.device, t.data_ptr()] = max(seen.get((t.device, t.data_ptr()), 0), t.nbytes)
    return sum(seen.values())


def rss_bytes() -> int:
    """The process's resident memory now (Linux /proc; elsewhere its peak, from getrusage: bytes on macOS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _release_freed_memory() -> None:
    """Give the freed full-precision weights back to the OS (glibc keeps small freed chunks), so RSS shows them
    gone."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
