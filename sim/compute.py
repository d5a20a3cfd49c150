"""Work of the pieces of a training step: FLOPs, optimizer memory traffic, trained weights and the activations
autograd keeps, per decoder block, LoRA site and LM head (sim.costmodel turns them into time and memory per path).

FLOPs (per step, B sequences of T tokens, t = B*T):
  linear layer in->out       forward 2*t*in*out; backward 2*t*in*out for dX, the same again for dW when trained
  attention (per block)      forward 4*B*T^2*heads*head_dim (QK^T and PV, full T^2: the cloud passes an explicit
                             padding mask, so no causal skipping); backward twice that
  LoRA rank r on in->out     forward 2*t*r*(in+out); backward twice that
  DoRA (LoRA + magnitude)    + per site and step the weight norm ||W + s B A||: 2*out*r*in for B A, 3*out*in to add
                             W, square and sum (not differentiated, as PEFT); the rescale by m / norm 3*t*out forward,
                             6*t*out backward
  (IA)³ on in->out           a vector of d = out (or in, feed-forward): forward t*d, backward 3*t*d (dX, dl)
  prompt / P-tuning          every block runs on T + V tokens and passes gradients down to the virtual tokens;
                             P-tuning's encoder MLP (H -> h -> h -> H) runs once a step on V rows
  prefix tuning              every block's attention has V more keys and values: T x (V + T) scores, forward
                             4*B*T*(V+T)*heads*head_dim (backward twice that, the prefixes' gradients inside);
                             the linears still see T tokens. The edge makes all L layers' prefixes once a step:
                             a table (nothing computed) or, with --prefix-projection h, PEFT's PrefixEncoder MLP
                             (kv_dim -> h -> L*2*kv_dim, kv_dim = kv heads x head dim) on V rows
  LM head                    forward 2*H*V per position that needs logits (classify: B, lm: B*T); backward dX the
                             same, dW again only in full fine-tuning
  the lowest adapted block   receives no input gradient: its q/k/v input-gradient matmuls are skipped
  norms, softmax, rotary, SiLU: no FLOPs counted; their time is inside the measured block throughput (calibrate)
Optimizer: AdamW in fp32 moves 28 bytes per trained weight (read weight, grad, 2 moments; write 3) -> memory time.

Activations autograd keeps for backward, per token:
  frozen block        2H + 4*q_dim + 3I: the two norm inputs; q, k, v (k and v expanded to every query head, as
                      transformers' SDPA path keeps them) and the attention output; gate, up and SiLU(gate). Inputs
                      of frozen linears are not kept (autograd saves them only for weight gradients).
  trained block       + 2H + q_dim + I: the inputs of q/k/v, o, gate/up and down
  LoRA                + the input of each input group + r per target
  DoRA                + the base output and the branch output per target (for the magnitude's gradient)
  (IA)³               + the scaled tensor per target (d per token, for the vector's gradient)
  prefix              + the V prefix keys and values per sequence (expanded to every query head, as the step's)
  LM head             fp32 logits and their gradient at the positions that need them
The frozen-block figure is checked against what autograd actually saves (tests/test_sim_costmodel.py); the rest of
the memory model is an estimate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from sim.shape import INPUT_GROUPS, ModelShape
from sim.wire import ADAPTER_TARGETS, INPUT_METHODS, SIM_METHODS, SITE_METHODS, ia3_sites

ADAM_BYTES_PER_PARAM = 28  # fp32 AdamW step: read w, g, m, v (16 B), write w, m, v (12 B)
SST2_TRAIN = 67349  # examples in the SST-2 training split (the default epoch)


@dataclass(frozen=True)
class Workload:
    """What one training step processes and how the model is cut."""
    batch: int = 8
    seq: int = 128  # padded tokens per sequence
    task: str = "classify"  # classify: logits at one position per sequence; lm: at every position
    k: int = 1  # edge-bottom blocks
    m: int = 1  # edge-top blocks
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    wire_up: str = "fp32"
    wire_down: str = "fp32"
    active_fraction: float = 1.0  # DLoRA + Kill & Revive: share of cloud blocks whose LoRA runs
    emulator_fraction: float = 0.5  # offsite-tuning: share of middle blocks the emulator keeps
    local_steps: int = 10  # federated: local steps per round
    epoch_examples: int = SST2_TRAIN
    step_index: int = 1  # Begin.step (its varint length changes the byte count by a byte or two)
    peft: str = "lora"  # the PEFT method (--peft): lora, ia3, adapter, prompt, ptuning, prefix (sim.wire.SIM_METHODS)
    adapter_reduction: int = 16  # adapter: bottleneck = the site's output width / this
    adapter_targets: tuple[str, ...] = ()  # adapter: the linears followed by an adapter; () = sim.wire.ADAPTER_TARGETS
    dora: bool = False  # lora: DoRA's magnitude per site (--lora-dora)
    ia3_targets: tuple[str, ...] = ()  # ia3: scaled linears; () = PEFT's defaults (sim.wire.ia3_sites)
    ia3_feedforward: tuple[str, ...] = ()  # ia3: of those, the ones scaled at their input
    prompt_tokens: int = 20  # prompt, ptuning: virtual tokens V before every sequence
    ptuning_hidden: int | None = None  # ptuning: the encoder MLP's hidden size (None: the model's)
    prefix_tokens: int = 20  # prefix: virtual keys and values V in front of every layer's attention
    prefix_projection: int | None = None  # prefix: the PrefixEncoder MLP's hidden size (None: a table, P-tuning v2)

    @property
    def tokens(self) -> int:
        """Real tokens of the step (what the LM head and the data count)."""
        return self.batch * self.seq

    @property
    def virtual_tokens(self) -> int:
        return self.prompt_tokens if self.peft in INPUT_METHODS else 0

    @property
    def prefix_keys(self) -> int:
        """Keys and values every block's attention has in front of the sequence's (prefix tuning's V; else 0)."""
        return self.prefix_tokens if self.peft == "prefix" else 0

    @property
    def block_seq(self) -> int:
        """Tokens per sequence every block runs on: the real ones, plus prompt / P-tuning's virtual tokens."""
        return self.seq + self.virtual_tokens

    @property
    def block_tokens(self) -> int:
        return self.batch * self.block_seq

    @property
    def method(self) -> str:
        """The method's name as the cost model and the carried mode know it: lora, dora, ia3, adapter, prompt,
        ptuning, prefix."""
        return "dora" if self.peft == "lora" and self.dora else self.peft

    def sites(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(targets, feed-forward targets) of a site method's every adapted block; ((), ()) for an input method and
        prefix tuning."""
        if self.peft == "ia3":
            return ia3_sites(self.ia3_targets, self.ia3_feedforward)
        if self.peft == "adapter":
            return tuple(self.adapter_targets) or ADAPTER_TARGETS, ()
        return (tuple(self.targets), ()) if self.peft == "lora" else ((), ())

    @property
    def head_positions(self) -> int:
        return self.batch if self.task == "classify" else self.tokens

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.epoch_examples / self.batch)


@dataclass(frozen=True)
class Compute:
    """One side's work for one piece of the model in one step."""
    forward: float = 0.0
    backward: float = 0.0
    optimizer_bytes: float = 0.0  # memory traffic of the optimizer step
    trained: int = 0  # trained weights
    activations: float = 0.0  # elements kept for backward

    @property
    def flops(self) -> float:
        return self.forward + self.backward

    def __add__(self, o: "Compute") -> "Compute":
        return Compute(self.forward + o.forward, self.backward + o.backward, self.optimizer_bytes + o.optimizer_bytes,
                       self.trained + o.trained, self.activations + o.activations)

    def times(self, n: float) -> "Compute":
        return Compute(self.forward * n, self.backward * n, self.optimizer_bytes * n, int(self.trained * n),
                       self.activations * n)


def attention_flops(shape: ModelShape, batch: int, seq: int, prefix: int = 0) -> float:
    """Scores and weighted values of one block: `seq` queries over `prefix` + `seq` keys per sequence."""
    return 4.0 * batch * seq * (prefix + seq) * shape.q_dim


def activation_elements_per_token(shape: ModelShape, trained: bool = False) -> int:
    """Elements one block keeps for backward per token (see the module docstring)."""
    frozen = 2 * shape.hidden + 4 * shape.q_dim + 3 * shape.intermediate
    return frozen + (2 * shape.hidden + shape.q_dim + shape.intermediate if trained else 0)


def lora_compute(shape: ModelShape, tokens: int, rank: int, targets, train: bool = True) -> Compute:
    """LoRA of `targets` at one block: forward, backward (dA, dB, dX), its optimizer step, and what it keeps for
    backward (one input per input group, shared by its targets, and each target's rank-r intermediate)."""
    fwd = sum(2.0 * tokens * rank * (i + o) for i, o in (shape.linear(t) for t in targets))
    if not train:
        return Compute(fwd)
    n = shape.lora_params(rank, targets)
    inputs = {INPUT_GROUPS[t]: shape.linear(t)[0] for t in targets}
    return Compute(fwd, 2 * fwd, ADAM_BYTES_PER_PARAM * n, n, tokens * (sum(inputs.values()) + rank * len(targets)))


def dora_compute(shape: ModelShape, tokens: int, rank: int, targets, train: bool = True) -> Compute:
    """What DoRA adds to the LoRA of `targets` at one block (see the module docstring): the weight norm every step,
    the rescale by magnitude / norm, the magnitude [out] trained, the base and branch outputs kept."""
    dims = [shape.linear(t) for t in targets]
    norm = sum(2.0 * o * rank * i + 3.0 * o * i for i, o in dims)
    outs = sum(o for _, o in dims)
    fwd = norm + 3.0 * tokens * outs
    if not train:
        return Compute(fwd)
    return Compute(fwd, 6.0 * tokens * outs, ADAM_BYTES_PER_PARAM * outs, outs, 2.0 * tokens * outs)


def ia3_compute(shape: ModelShape, tokens: int, targets, feedforward=(), train: bool = True) -> Compute:
    """(IA)³ vectors of `targets` at one block: an elementwise scale of each site's output (input for the
    `feedforward` ones), its gradient, the vectors trained, the scaled tensors kept."""
    d = sum(shape.linear(t)[0 if t in feedforward else 1] for t in targets)
    if not train:
        return Compute(tokens * d)
    return Compute(tokens * d, 3.0 * tokens * d, ADAM_BYTES_PER_PARAM * d, d, float(tokens * d))


def adapter_compute(shape: ModelShape, tokens: int, reduction: int, targets, train: bool = True) -> Compute:
    """Bottleneck adapters after `targets` at one block: down (out -> out / reduction), swish, up, on each site's
    output; backward (weights and input), the optimizer step, and what it keeps (the site output, the bottleneck)."""
    widths = [shape.linear(t)[1] for t in targets]
    fwd = sum(4.0 * tokens * o * max(1, o // reduction) for o in widths)
    if not train:
        return Compute(fwd)
    n = sum(2 * o * max(1, o // reduction) + o + max(1, o // reduction) for o in widths)
    return Compute(fwd, 2 * fwd, ADAM_BYTES_PER_PARAM * n, n,
                   float(tokens * sum(o + 2 * max(1, o // reduction) for o in widths)))


def site_params(shape: ModelShape, w: "Workload") -> int:
    """Trained weights of the method at one adapted block (0 for an input method)."""
    return site_compute(shape, w, tokens=0).trained


def site_compute(shape: ModelShape, w: "Workload", tokens: int | None = None, train: bool = True) -> Compute:
    """The method's sites at one adapted block over `tokens` (default: the step's): LoRA (+ DoRA), (IA)³, or nothing
    for an input method."""
    tokens = w.block_tokens if tokens is None else tokens
    targets, feedforward = w.sites()
    if w.peft == "ia3":
        return ia3_compute(shape, tokens, targets, feedforward, train)
    if w.peft == "adapter":
        return adapter_compute(shape, tokens, w.adapter_reduction, targets, train)
    if w.peft != "lora":
        return Compute()
    c = lora_compute(shape, tokens, w.rank, targets, train)
    return c + dora_compute(shape, tokens, w.rank, targets, train) if w.dora else c


def prompt_compute(shape: ModelShape, w: "Workload") -> Compute:
    """The virtual tokens (prompt: V x H embeddings, nothing computed; P-tuning: PEFT's encoder, an embedding table
    and an MLP H -> h -> h -> H run on the V rows once a step) and their optimizer."""
    if w.peft not in INPUT_METHODS:
        return Compute()
    V, H = w.prompt_tokens, shape.hidden
    trained, fwd = V * H, 0.0
    if w.peft == "ptuning":
        h = w.ptuning_hidden or H
        macs = H * h + h * h + h * H
        trained += macs + 2 * h + H  # the three linears' weights and biases
        fwd = 2.0 * V * macs
    return Compute(fwd, 2 * fwd, ADAM_BYTES_PER_PARAM * trained, trained, float(V * H))


def prefix_compute(shape: ModelShape, w: "Workload") -> Compute:
    """Prefix tuning's encoder, PEFT's PrefixEncoder with token_dim = kv_dim (PEFT's for GQA): all L layers'
    prefixes once a step. Without a projection a table [V, L*2*kv_dim], looked up (nothing computed); with
    projection h an embedding [V, kv_dim] and an MLP kv_dim -> h -> tanh -> L*2*kv_dim (both with biases) on the V
    rows: forward 2*V*(kv_dim*h + h*L*2*kv_dim), backward twice that (weights and the rows' inputs); kept: the
    rows and the tanh output."""
    if w.peft != "prefix":
        return Compute()
    V, h, out = w.prefix_tokens, w.prefix_projection, shape.layers * 2 * shape.kv_dim
    if h is None:
        trained = V * out
        return Compute(0.0, 0.0, ADAM_BYTES_PER_PARAM * trained, trained, 0.0)
    kv = shape.kv_dim
    trained = V * kv + kv * h + h + h * out + out
    fwd = 2.0 * V * (kv * h + h * out)
    return Compute(fwd, 2 * fwd, ADAM_BYTES_PER_PARAM * trained, trained, float(V * (kv + h)))


def prefix_params(shape: ModelShape, w: "Workload") -> int:
    """Trained weights of prefix tuning (sum(p.numel() for p in PrefixSet(...).parameters())); 0 for others."""
    return prefix_compute(shape, w).trained


def block_compute(shape: ModelShape, batch: int, seq: int, *, backward: bool = True, train_weights: bool = False,
                  input_grad: bool = True, lora: tuple[str, ...] = (), rank: int = 8, prefix: int = 0) -> Compute:
    """One decoder block. `input_grad`: its input needs a gradient (false only for the lowest trained block).
    `prefix`: prefix tuning's V keys and values in front of its attention (and kept for backward)."""
    t = batch * seq
    lin = 2.0 * t * sum(i * o for i, o in shape.linears().values())
    att = attention_flops(shape, batch, seq, prefix)
    c = Compute(forward=lin + att)
    if backward:
        skipped = 0.0 if input_grad else 2.0 * t * sum(i * o for n, (i, o) in shape.linears().items()
                                                        if INPUT_GROUPS[n] == "attn_in")
        bwd = (lin - skipped) + (lin if train_weights else 0.0) + 2 * att
        trained = shape.block_params if train_weights else 0
        c = Compute(lin + att, bwd, ADAM_BYTES_PER_PARAM * trained, trained,
                    float(t * activation_elements_per_token(shape, train_weights) + batch * prefix * 2 * shape.q_dim))
    if lora:
        c = c + lora_compute(shape, t, rank, lora, train=backward)
    return c


def head_compute(shape: ModelShape, w: Workload, *, train_head: bool = False, backward: bool = True) -> Compute:
    """Final norm + LM head at the positions that need logits; the logits (fp32) and their gradient are kept."""
    p = w.head_positions
    fwd = 2.0 * shape.hidden * shape.vocab * p
    trained = shape.vocab * shape.hidden if train_head else 0
    if not backward:
        return Compute(fwd)
    return Compute(fwd, fwd * (2 if train_head else 1), ADAM_BYTES_PER_PARAM * trained, trained, 2.0 * p * shape.vocab)


def peft_blocks(shape: ModelShape, w: Workload, blocks) -> Compute:
    """`blocks` (frozen weights) with the method's sites, on the tokens blocks see (T + V with virtual tokens; a
    prefix's V keys in front of each attention); the lowest block (0) needs no input gradient, unless virtual tokens
    below it train (a prefix's gradient comes from the attention itself, not through the block's input)."""
    c = Compute()
    for i in blocks:
        c = c + block_compute(shape, w.batch, w.block_seq, input_grad=i != 0 or w.peft in INPUT_METHODS,
                              prefix=w.prefix_keys)
        c = c + site_compute(shape, w)
    return c


__all__ = ["Workload", "Compute", "ADAM_BYTES_PER_PARAM", "SST2_TRAIN", "SITE_METHODS", "INPUT_METHODS",
           "SIM_METHODS", "attention_flops", "activation_elements_per_token", "lora_compute", "dora_compute",
           "ia3_compute", "site_params", "site_compute", "prompt_compute", "prefix_compute", "prefix_params",
           "block_compute", "head_compute", "peft_blocks"]
