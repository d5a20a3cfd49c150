"""`tandem cloud serve --quantize int8|int4`: the cloud holds the frozen weights of the blocks it serves in 8 or
4 bits (QLoRA's idea, on the cloud); the edge keeps its full-precision LoRA. Only the blocks' linears are
quantized: the embedding, norms and LM head are the edge's. int4 is NF4 for every linear but the MLP's output
projection (`down_proj`), which stays in int8, as llama.cpp's Q4_K_M keeps ffn_down at higher precision: on
SmolLM2-135M's 28 middle blocks the blocks' output error falls from 0.213 (all NF4, 0.130 of the fp32 weight bytes)
to 0.078 (0.160 of fp32); int8 for the attention projections as well errs more, 0.112 at 0.191, and so does int8 for
v_proj too, 0.085 at 0.164 (`python bench/quantize_error.py`, 2026-12-03; the same measurement as below).

    quantize_blocks(model, mode)   every nn.Linear of the family's blocks, in place -> MemoryReport
    weight_bytes(modules)          the actual storage of their tensors, quantization state included
    dense_weight(linear)           a linear's weight as [out, in] in full precision (de-quantized if need be)

The library is bitsandbytes (QLoRA's own: int8 is its `Linear8bitLt` without outliers, per-row absmax scales;
int4 its `Linear4bit` NF4 in blocks of 64 with double-quantized scales), picked by measurement against torchao 0.18
and optimum-quanto 0.2.7: the linears of SmolLM2-135M's 28 middle blocks (378 MiB in fp32), CPU, one thread, a
batch of 8 SST-2 sentences, forward and backward to the input with the weights frozen (all three backpropagate),
and the relative error of the blocks' output against fp32 (fp32 took 1.7 s; the times are of a shared machine):

    library          int8: weights  fwd+bwd  error      int4: weights  fwd+bwd  error
    bitsandbytes           0.251    0.89x    0.025            0.130    1.05x    0.21
    optimum-quanto         0.251    1.00x    0.025            0.145    1.01x    0.43
    torchao                0.252    1.10x    0.029            0.289    1.04x    0.28

torchao has no packed int4 on CPU (its int4 formats need CUDA; `IntxWeightOnlyConfig` keeps one int8 per 4-bit
value, over the 0.2 budget); optimum-quanto is in maintenance mode (its README, since November 2025) and its int4
(groups of 128) errs twice as much as NF4. This module's linears (training mode, below) measure the same as
bitsandbytes' row: int8 0.251 and 0.025, int4 0.130 and 0.21.

In eval mode bitsandbytes' linears change on CPU: the int8 one casts the activations to fp16 and warns on every
call; the 4-bit one, on CPUs with AVX512-BF16, repacks its weight in place for a bf16 kernel at the first forward
without gradient, and backward through that kernel is wrong (torch warns it has no autograd kernel). So the cloud's
linears always stay in training mode (`_frozen`), whose path is weight-only on CPU (the weight de-quantized per call,
F.linear in the input's dtype; on CUDA int8 is LLM.int8's int8 matmul, not measured here). No weight has a gradient.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from model.families import family_of

MODES = ("none", "int8", "int4")
INT8_UNDER_INT4 = ("down_proj",)  # --quantize int4 holds these linears in int8 (the module docstring says why)
MiB = 2 ** 20
# bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional kernel (from the `kernels` package, which
# fetches it from the Hub at run time) is missing; it falls back to its own.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


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


def quantize_blocks(model, mode: str, blocks=None, int8_under_int4: tuple[str, ...] = INT8_UNDER_INT4) -> MemoryReport:
    """Quantize every nn.Linear of the family's blocks (or of the blocks numbered in `blocks`) in place, frozen; under
    "int4", the linears named in `int8_under_int4` in int8. "none" changes nothing and only measures."""
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
                held = "int8" if mode == "int4" and leaf in int8_under_int4 else mode
                setattr(block.get_submodule(parent), leaf, _quantized(linear, held))
            count += len(linears)
        _release_freed_memory()
    return MemoryReport(mode, dtype, len(chosen), count, before, weight_bytes(chosen), rss_bytes())


def _quantized(linear: nn.Linear, mode: str) -> nn.Module:
    """The bitsandbytes linear holding `linear`'s weight in `mode`, on its device, frozen. bitsandbytes quantizes
    when a CPU parameter moves to its device."""
    import bitsandbytes as bnb
    device, dtype = linear.weight.device, linear.weight.dtype
    weight = linear.weight.detach().cpu()
    shape = dict(input_features=linear.in_features, output_features=linear.out_features, bias=False, device="meta")
    if mode == "int8":
        q = _frozen(bnb.nn.Linear8bitLt)(**shape, has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        q = _frozen(bnb.nn.Linear4bit)(**shape, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    q.bias = linear.bias if linear.bias is None else linear.bias.requires_grad_(False)
    q = q.to(device)
    if mode == "int8":
        q.init_8bit_state()  # now, not in the first forward: concurrent steps then only read the module
    return q


@functools.lru_cache(maxsize=None)
def _frozen(cls: type) -> type:
    """`cls`, a bitsandbytes linear, that stays in training mode (see the module docstring)."""
    class Frozen(cls):
        def train(self, mode: bool = True):
            return super().train(True)
    Frozen.__name__ = Frozen.__qualname__ = f"Frozen{cls.__name__}"
    return Frozen


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """`linear`'s weight as [out, in] in the compute dtype: de-quantized for the bitsandbytes linears, as is for an
    nn.Linear (what DoRA's weight norm needs)."""
    w = linear.weight
    if hasattr(w, "quant_state"):  # 4-bit
        import bitsandbytes.functional as bf
        return bf.dequantize_4bit(w.data, w.quant_state).to(linear.compute_dtype or torch.float32)
    state = getattr(linear, "state", None)
    if state is not None and getattr(state, "SCB", None) is not None:  # 8-bit, per-row absmax scales
        return state.CB.float() * (state.SCB.float().unsqueeze(1) / 127)
    return w


def _tensors(module: nn.Module):
    for t in [*module.parameters(), *module.buffers()]:
        yield t
        qs = getattr(t, "quant_state", None)  # 4-bit: absmax (8-bit when double-quantized), code, and their state
        while qs is not None:
            yield from (x for x in (qs.absmax, qs.code, qs.offset) if isinstance(x, torch.Tensor))
            qs = qs.state2
    for m in module.modules():
        state = getattr(m, "state", None)  # 8-bit: the int8 weight and its row scales live in the matmul state
        yield from (x for x in (getattr(state, "CB", None), getattr(state, "SCB", None)) if isinstance(x, torch.Tensor))


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
