"""Cost of one training step for each way Tandem can fine-tune: compute and peak memory on each side, exact bytes
per direction, round trips, and time from device and link profiles.

Paths
  local-full   all weights trained on the edge (embedding, blocks, head), AdamW
  local-peft   LoRA on every block, all on the edge
  split        edge-bottom (k blocks) and edge-top (m blocks + head) on the edge with local LoRA; the cloud runs the
               frozen middle blocks (Tandem `--cloud-lora none`)
  dlora        split + LoRA on every cloud block, computed on the edge from inputs the cloud sends (DLoRA);
               `active_fraction` < 1 is Kill & Revive (only that share of cloud blocks runs its LoRA this step)
  offsite      offsite-tuning: the edge trains k bottom and m top blocks (adapters, full weights) around an emulator
               that keeps `emulator_fraction` of the middle blocks (layer drop); nothing crosses per step
  federated    every client runs `local_steps` local-PEFT steps, then uploads its LoRA and downloads the average

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

Compute time = FLOPs / the device's throughput at the step's tokens (measured at several sizes for `here`).
Time of one step = edge compute + cloud compute + for each message: transfer (wire bytes with HTTP/2 framing over
the link's payload rate) + codec (encode/serialize/parse/decode at the devices' measured or assumed rate) + half a
round trip of latency. Every part is sequential in Tandem's protocol, so they add. Cloud compute is
max(FLOPs / sustained FLOP/s, weights read / memory bandwidth) + a fixed per-job overhead.

Peak memory: weights in the device dtype + 12 bytes per trained weight (fp32 gradient and two Adam moments; +4 for
an fp32 master copy when the device trains in 16-bit) + the activations autograd keeps for backward, per token:
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
from dataclasses import dataclass, replace

from sim.profiles import DeviceProfile, LinkProfile
from sim.shape import INPUT_GROUPS, ModelShape
from protocol.step import Traffic
from sim.wire import WireSetup, cloud_blocks, dlora_setup, step_traffic

PATHS = ("local-full", "local-peft", "split", "dlora", "offsite", "federated")
ADAM_BYTES_PER_PARAM = 28  # fp32 AdamW step: read w, g, m, v (16 B), write w, m, v (12 B)
OPTIMIZER_STATE_BYTES = 12  # fp32 gradient + two fp32 moments per trained weight
NPY_HEADER = 128  # numpy .npy header Flower puts before each array it ships (format 1.0, padded)
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


# ---- FLOPs and bytes of the pieces --------------------------------------------------------------------------------
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


# ---- a step as phases ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """One sequential piece of a step. Cloud phases carry their work so a shared cloud can re-time them."""
    where: str  # "edge", "cloud", "up", "down"
    seconds: float  # duration when this edge is alone
    what: str = ""
    flops: float = 0.0  # cloud: FLOPs of this job
    weight_bytes: float = 0.0  # cloud: weights this job reads
    key: str = ""  # cloud: jobs with the same key use the same weights and may run as one batch
    wire_bytes: int = 0
    tokens: int = 0  # cloud: tokens this job processes (a batch of jobs runs at the throughput of their sum)


@dataclass(frozen=True)
class SideCost:
    """FLOPs, time and peak memory of one side for one step."""
    flops: float = 0.0
    seconds: float = 0.0
    weight_bytes: float = 0.0
    state_bytes: float = 0.0  # gradients + optimizer moments
    activation_bytes: float = 0.0
    trained_params: int = 0

    @property
    def peak_bytes(self) -> float:
        return self.weight_bytes + self.state_bytes + self.activation_bytes


@dataclass(frozen=True)
class StepCost:
    """Everything predicted for one training step of one path (per step; a federated round is amortized)."""
    path: str
    model: str
    workload: Workload
    edge: SideCost
    cloud: SideCost
    bytes_up: float
    bytes_down: float
    payload_up: float
    payload_down: float
    messages: int
    round_trips: float
    transfer_s: float
    codec_s: float
    latency_s: float
    phases: tuple[Phase, ...] = ()
    one_time_bytes: float = 0.0  # offsite: the emulator download; bytes that are not per step
    traffic: Traffic | None = None
    notes: tuple[str, ...] = ()
    edge_fits: bool = True
    cloud_fits: bool = True

    @property
    def step_s(self) -> float:
        return self.edge.seconds + self.cloud.seconds + self.transfer_s + self.codec_s + self.latency_s

    @property
    def epoch_s(self) -> float:
        return self.step_s * self.workload.steps_per_epoch

    @property
    def bytes_total(self) -> float:
        return self.bytes_up + self.bytes_down


def _side(device: DeviceProfile, c: Compute, weights: int, tokens: int,
          flops_seconds: float | None = None) -> SideCost:
    extra = OPTIMIZER_STATE_BYTES + (4 if device.dtype_bytes < 4 else 0)
    seconds = c.flops / device.throughput(tokens) + c.optimizer_bytes / device.memory_bandwidth
    return SideCost(c.flops, seconds if flops_seconds is None else flops_seconds, weights * device.dtype_bytes,
                    c.trained * extra, c.activations * device.dtype_bytes, c.trained)


def cloud_job_seconds(device: DeviceProfile, flops: float, weight_bytes: float, tokens: int | None = None) -> float:
    """A cloud job over `tokens` tokens: compute- or memory-bound (weights read once per job), plus the fixed
    per-job overhead."""
    return (max(flops / device.throughput(tokens), weight_bytes / device.memory_bandwidth)
            + device.kernel_overhead)


def _message_phase(msg, link: LinkProfile, edge: DeviceProfile, cloud: DeviceProfile) -> Phase:
    codec = msg.payload_bytes * (0.5 / edge.codec + 0.5 / cloud.codec)
    seconds = link.transfer_seconds(msg.wire_bytes, msg.direction) + codec + link.rtt / 2
    return Phase(msg.direction, seconds, msg.kind, wire_bytes=msg.wire_bytes)


def _local(shape: ModelShape, path: str, w: Workload, edge: DeviceProfile, cloud: DeviceProfile,
           c: Compute, weights: int, notes=()) -> StepCost:
    side = _side(edge, c, weights, w.tokens)
    phases = (Phase("edge", side.seconds, "forward + backward + optimizer"),)
    return StepCost(path, shape.name, w, side, SideCost(), 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, phases, notes=tuple(notes),
                    edge_fits=side.peak_bytes <= edge.memory)


def local_full(shape, w, edge, cloud, link) -> StepCost:
    c = Compute(optimizer_bytes=ADAM_BYTES_PER_PARAM * shape.embedding_params, trained=shape.embedding_params)
    c = c + block_compute(shape, w.batch, w.seq, train_weights=True).times(shape.layers)
    c = c + head_compute(shape, w, train_head=not shape.tied_embeddings)
    if shape.tied_embeddings:  # the tied head's dW still costs its matmul
        c = c + Compute(backward=2.0 * shape.hidden * shape.vocab * w.head_positions)
    return _local(shape, "local-full", w, edge, cloud, c, shape.total_params,
                  ["every weight trained with AdamW on the edge"])


def local_peft(shape, w, edge, cloud, link) -> StepCost:
    c = _peft_blocks(shape, w, range(shape.layers)) + head_compute(shape, w)
    return _local(shape, "local-peft", w, edge, cloud, c, shape.total_params,
                  [f"LoRA r={w.rank} on {','.join(w.targets)} of all {shape.layers} blocks, all on the edge"])


def _peft_blocks(shape: ModelShape, w: Workload, blocks) -> Compute:
    c = Compute()
    for i in blocks:
        c = c + block_compute(shape, w.batch, w.seq, input_grad=i != 0, lora=w.targets, rank=w.rank)
    return c


def remote(shape: ModelShape, path: str, w: Workload, edge: DeviceProfile, cloud: DeviceProfile,
           link: LinkProfile) -> StepCost:
    """split and dlora: the message sequence of the step, with the compute of each side between messages."""
    cb = cloud_blocks(shape, w.k, w.m)
    if path == "split":
        setup = WireSetup(w.k, w.m, w.wire_up, w.wire_down)
    else:
        setup = dlora_setup(shape, w.k, w.m, w.wire_up, w.wire_down, w.targets, w.active_fraction)
    traffic = step_traffic(shape, setup, w.batch, w.seq, step=w.step_index)
    groups = setup.groups() if setup.lora_blocks else []
    active = setup.active()

    bottom = _peft_blocks(shape, w, range(w.k))
    top = _peft_blocks(shape, w, range(shape.layers - w.m, shape.layers)) + head_compute(shape, w)
    site = {g: lora_compute(shape, w.tokens, w.rank, ts) for g, ts in groups}  # one group at one block
    edge_c = bottom + top + sum((site[g].times(len(active)) for g, _ in groups), Compute())
    # Every cloud LoRA is a trained weight held on the edge (Kill & Revive only pauses some of them).
    idle = len(setup.lora_blocks) - len(active)
    edge_c = edge_c + Compute(trained=idle * shape.lora_params(w.rank, w.targets))
    edge_weights = shape.embedding_params + shape.head_params + (w.k + w.m) * shape.block_params
    cloud_block = block_compute(shape, w.batch, w.seq)  # frozen, input gradient needed
    cloud_c = cloud_block.times(len(cb))
    cloud_weight_bytes = len(cb) * shape.block_params * cloud.dtype_bytes

    # Cloud work is cut into slices at each LoRA exchange; the same weights are read by forward and backward.
    n_slices = 1 + len(active) * len(groups)
    fwd_slice, bwd_slice = cloud_c.forward / n_slices, cloud_c.backward / n_slices
    wb_slice = cloud_weight_bytes / n_slices

    phases: list[Phase] = []
    fwd_i = bwd_i = 0

    def edge_time(flops: float, optimizer_bytes: float = 0.0) -> float:
        return flops / edge.throughput(w.tokens) + optimizer_bytes / edge.memory_bandwidth

    def cloud_phase(kind: str, i: int):
        flops = fwd_slice if kind == "fwd" else bwd_slice
        phases.append(Phase("cloud", cloud_job_seconds(cloud, flops, wb_slice, w.tokens), f"cloud {kind} slice {i}",
                            flops, wb_slice, f"{kind}:{i}", tokens=w.tokens))

    phases.append(Phase("edge", edge_time(bottom.forward), "edge bottom forward"))
    for msg in traffic.messages:
        phases.append(_message_phase(msg, link, edge, cloud))
        if msg.kind in ("begin", "lora_reply"):
            cloud_phase("fwd", fwd_i)
            fwd_i += 1
        elif msg.kind in ("output_grad", "lora_grad_reply"):
            cloud_phase("bwd", bwd_i)
            bwd_i += 1
        elif msg.kind == "lora_request":
            phases.append(Phase("edge", edge_time(site[msg.group].forward), "edge LoRA forward"))
        elif msg.kind == "lora_grad_request":
            phases.append(Phase("edge", edge_time(site[msg.group].backward), "edge LoRA backward"))
        elif msg.kind == "hidden":
            phases.append(Phase("edge", edge_time(top.flops), "edge top forward + backward"))
    phases.append(Phase("edge", edge_time(bottom.backward, edge_c.optimizer_bytes), "edge bottom backward + opt"))

    edge_s = sum(p.seconds for p in phases if p.where == "edge")
    cloud_s = sum(p.seconds for p in phases if p.where == "cloud")
    edge_side = _side(edge, edge_c, edge_weights, w.tokens, edge_s)
    # DLoRA: the edge also keeps the LoRA outputs it computed for the cloud until their gradients come.
    kept = w.tokens * sum(shape.linear(t)[1] for _, ts in groups for t in ts) * len(active) * edge.dtype_bytes
    edge_side = replace(edge_side, activation_bytes=edge_side.activation_bytes + kept)
    cloud_side = SideCost(cloud_c.flops, cloud_s, cloud_weight_bytes, 0.0,
                          cloud_c.activations * cloud.dtype_bytes, 0)
    codec = sum(m.payload_bytes for m in traffic.messages) * (0.5 / edge.codec + 0.5 / cloud.codec)
    transfer = sum(link.transfer_seconds(m.wire_bytes, m.direction) for m in traffic.messages)
    notes = [f"cut k={w.k}, m={w.m}: {len(cb)} frozen cloud blocks; wire up {w.wire_up}, down {w.wire_down}"]
    if path == "dlora":
        notes.append(f"DLoRA r={w.rank} on {','.join(w.targets)} of {len(setup.lora_blocks)} cloud blocks, "
                     f"{len(active)} active (fraction {w.active_fraction:g})")
    return StepCost(path, shape.name, w, edge_side, cloud_side, traffic.bytes_up, traffic.bytes_down,
                    traffic.payload_up, traffic.payload_down, len(traffic.messages), traffic.round_trips, transfer,
                    codec, len(traffic.messages) * link.rtt / 2, tuple(phases), traffic=traffic, notes=tuple(notes),
                    edge_fits=edge_side.peak_bytes <= edge.memory, cloud_fits=cloud_side.peak_bytes <= cloud.memory)


def split(shape, w, edge, cloud, link) -> StepCost:
    return remote(shape, "split", w, edge, cloud, link)


def dlora(shape, w, edge, cloud, link) -> StepCost:
    return remote(shape, "dlora", w, edge, cloud, link)


def offsite(shape, w, edge, cloud, link) -> StepCost:
    middle = shape.layers - w.k - w.m
    kept = max(1, round(w.emulator_fraction * middle))
    c = Compute()
    for i in range(w.k):  # bottom adapter: trained weights; its input (the frozen embedding) needs no gradient
        c = c + block_compute(shape, w.batch, w.seq, train_weights=True, input_grad=i != 0)
    c = c + block_compute(shape, w.batch, w.seq).times(kept)  # the emulator: frozen, passes gradients down
    c = c + block_compute(shape, w.batch, w.seq, train_weights=True).times(w.m) + head_compute(shape, w)
    weights = shape.embedding_params + shape.head_params + (w.k + w.m + kept) * shape.block_params
    cost = _local(shape, "offsite", w, edge, cloud, c, weights,
                  [f"emulator keeps {kept} of {middle} middle blocks (layer drop, fraction {w.emulator_fraction:g});"
                   f" adapters = {w.k} bottom + {w.m} top blocks, fully trained; one-time download of the emulator"])
    return replace(cost, one_time_bytes=weights * edge.dtype_bytes)


def federated(shape, w, edge, cloud, link) -> StepCost:
    """A round = `local_steps` local-PEFT steps + upload of the LoRA + download of the average; per step amortized.
    Bytes are the fp32 adapter plus a .npy header per array (Flower's own framing is not counted exactly)."""
    local = local_peft(shape, w, edge, cloud, link)
    arrays = 2 * len(w.targets) * shape.layers
    adapter = 4 * shape.layers * shape.lora_params(w.rank, w.targets) + NPY_HEADER * arrays
    n = w.local_steps
    transfer = link.transfer_seconds(adapter, "up") + link.transfer_seconds(adapter, "down")
    codec = adapter * (1 / edge.codec)  # serialize on upload, parse on download
    phases = (*local.phases * n, Phase("up", link.transfer_seconds(adapter, "up") + link.rtt / 2, "upload LoRA"),
              Phase("cloud", 0.0, "aggregate (FedAvg; negligible)"),
              Phase("down", link.transfer_seconds(adapter, "down") + link.rtt / 2, "download average"))
    edge_side = local.edge
    return StepCost("federated", shape.name, w, edge_side, SideCost(), adapter / n, adapter / n,
                    (adapter - NPY_HEADER * arrays) / n, (adapter - NPY_HEADER * arrays) / n, 2 / n, 1 / n,
                    transfer / n, codec / n, link.rtt / n, phases,
                    notes=(f"round = {n} local LoRA steps + exchange of the {adapter / 1e6:.2f} MB adapter; "
                           f"per-step figures are the round divided by {n}",), edge_fits=local.edge_fits)


COSTS = {"local-full": local_full, "local-peft": local_peft, "split": split, "dlora": dlora, "offsite": offsite,
         "federated": federated}


def predict(shape: ModelShape, path: str, w: Workload, edge: DeviceProfile, cloud: DeviceProfile,
            link: LinkProfile) -> StepCost:
    try:
        fn = COSTS[path]
    except KeyError:
        raise ValueError(f"unknown path {path!r}: one of {PATHS}") from None
    return fn(shape, w, edge, cloud, link)


def predict_all(shape, w, edge, cloud, link, paths=PATHS) -> list[StepCost]:
    return [predict(shape, p, w, edge, cloud, link) for p in paths]


__all__ = ["PATHS", "Workload", "Compute", "Phase", "SideCost", "StepCost", "predict", "predict_all",
           "block_compute", "head_compute", "lora_compute", "attention_flops", "cloud_job_seconds",
           "activation_elements_per_token"]
