"""Work of the pieces of a training step: FLOPs, optimizer memory traffic, trained weights and the activations
autograd keeps, per decoder block, LoRA site and LM head (sim.costmodel turns them into time and memory per path).

FLOPs (per step, B sequences of T tokens, t = B*T):
  linear layer in->out       forward 2*t*in*out; backward 2*t*in*out for dX, the same again for dW when trained
  attention (per block)      forward 4*B*T^2*heads*head_dim (QK^T and PV, full T^2: the cloud passes an explicit
                             padding mask, so no causal skipping); backward twice that
  LoRA rank r on in->out     forward 2*t*r*(in+out); backward twice that
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
  LM head             fp32 logits and their gradient at the positions that need them
The frozen-block figure is checked against what autograd actually saves (tests/test_sim_costmodel.py); the rest of
the memory model is an estimate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from sim.shape import INPUT_GROUPS, ModelShape

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

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

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


def attention_flops(shape: ModelShape, batch: int, seq: int) -> float:
    return 4.0 * batch * seq * seq * shape.q_dim


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


def block_compute(shape: ModelShape, batch: int, seq: int, *, backward: bool = True, train_weights: bool = False,
                  input_grad: bool = True, lora: tuple[str, ...] = (), rank: int = 8) -> Compute:
    """One decoder block. `input_grad`: its input needs a gradient (false only for the lowest trained block)."""
    t = batch * seq
    lin = 2.0 * t * sum(i * o for i, o in shape.linears().values())
    att = attention_flops(shape, batch, seq)
    c = Compute(forward=lin + att)
    if backward:
        skipped = 0.0 if input_grad else 2.0 * t * sum(i * o for n, (i, o) in shape.linears().items()
                                                        if INPUT_GROUPS[n] == "attn_in")
        bwd = (lin - skipped) + (lin if train_weights else 0.0) + 2 * att
        trained = shape.block_params if train_weights else 0
        c = Compute(lin + att, bwd, ADAM_BYTES_PER_PARAM * trained, trained,
                    float(t * activation_elements_per_token(shape, train_weights)))
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
    """LoRA on `blocks` (frozen weights); the lowest block (0) needs no input gradient."""
    c = Compute()
    for i in blocks:
        c = c + block_compute(shape, w.batch, w.seq, input_grad=i != 0, lora=w.targets, rank=w.rank)
    return c


__all__ = ["Workload", "Compute", "ADAM_BYTES_PER_PARAM", "SST2_TRAIN", "attention_flops",
           "activation_elements_per_token", "lora_compute", "block_compute", "head_compute", "peft_blocks"]
