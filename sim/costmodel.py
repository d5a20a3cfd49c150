"""Cost of one training step for each way Tandem can fine-tune: compute and peak memory on each side, exact bytes
per direction, round trips, and time from device and link profiles. The FLOPs, optimizer traffic and kept
activations of the pieces (blocks, LoRA, LM head) are in sim.compute.

Paths
  local-full   all weights trained on the edge (embedding, blocks, head), AdamW
  local-peft   LoRA on every block, all on the edge
  split        edge-bottom (k blocks) and edge-top (m blocks + head) on the edge with local LoRA; the cloud runs the
               frozen middle blocks (Tandem `--cloud-lora none`)
  dlora        split + LoRA on every cloud block, computed on the edge from inputs the cloud sends (DLoRA);
               `active_fraction` < 1 is Kill & Revive (only that share of cloud blocks runs its LoRA this step)
  carried      split + LoRA on every (active) cloud block whose weights ride the step's first message and whose
               gradients come back with the last: the cloud computes the LoRA, the edge keeps weights and optimizer
  offsite      offsite-tuning: the edge trains k bottom and m top blocks (adapters, full weights) around an emulator
               that keeps `emulator_fraction` of the middle blocks (layer drop); nothing crosses per step
  federated    every client runs `local_steps` local-PEFT steps, then uploads its LoRA and downloads the average

Compute time = FLOPs / the device's throughput at the step's tokens (measured at several sizes for `here`).
Time of one step = edge compute + cloud compute + for each message: transfer (wire bytes with HTTP/2 framing over
the link's payload rate) + codec (encode/serialize/parse/decode at the devices' measured or assumed rate) + half a
round trip of latency. Every part is sequential in Tandem's protocol, so they add. Cloud compute is
max(FLOPs / sustained FLOP/s, weights read / memory bandwidth) + a fixed per-job overhead.

Peak memory: weights in the device dtype + 12 bytes per trained weight (fp32 gradient and two Adam moments; +4 for
an fp32 master copy when the device trains in 16-bit) + the activations autograd keeps for backward (sim.compute).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from sim.compute import (ADAM_BYTES_PER_PARAM, SST2_TRAIN, Compute, Workload, activation_elements_per_token,
                         attention_flops, block_compute, head_compute, lora_compute, peft_blocks)
from sim.profiles import DeviceProfile, LinkProfile
from sim.shape import ModelShape
from protocol.step import Traffic
from sim.stepcost import Phase, SideCost, StepCost
from sim.wire import WireSetup, cloud_blocks, dlora_setup, step_traffic

PATHS = ("local-full", "local-peft", "split", "dlora", "carried", "offsite", "federated")
OPTIMIZER_STATE_BYTES = 12  # fp32 gradient + two fp32 moments per trained weight
NPY_HEADER = 128  # numpy .npy header Flower puts before each array it ships (format 1.0, padded)


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
    c = peft_blocks(shape, w, range(shape.layers)) + head_compute(shape, w)
    return _local(shape, "local-peft", w, edge, cloud, c, shape.total_params,
                  [f"LoRA r={w.rank} on {','.join(w.targets)} of all {shape.layers} blocks, all on the edge"])


@dataclass(frozen=True)
class _EdgeWork:
    """The edge's share of a split/DLoRA step."""
    bottom: Compute  # edge-bottom blocks
    top: Compute  # edge-top blocks + head
    site: dict  # LoRA group -> its work at one cloud block
    total: Compute  # all of it, with every cloud LoRA the edge trains


def _remote_setup(shape: ModelShape, path: str, w: Workload) -> WireSetup:
    if path == "split":
        return WireSetup(w.k, w.m, w.wire_up, w.wire_down)
    return dlora_setup(shape, w.k, w.m, w.wire_up, w.wire_down, w.targets, w.active_fraction,
                       carried=path == "carried", rank=w.rank)


def _edge_work(shape: ModelShape, w: Workload, setup: WireSetup, groups, active) -> _EdgeWork:
    bottom = peft_blocks(shape, w, range(w.k))
    top = peft_blocks(shape, w, range(shape.layers - w.m, shape.layers)) + head_compute(shape, w)
    site = {g: lora_compute(shape, w.tokens, w.rank, ts) for g, ts in groups}  # one group at one block
    total = bottom + top + sum((site[g].times(len(active)) for g, _ in groups), Compute())
    # Every cloud LoRA is a trained weight held on the edge (Kill & Revive only pauses some of them); carried: the
    # cloud computes them, the edge only steps their optimizer.
    idle = len(setup.lora_blocks) - len(active)
    total = total + Compute(trained=idle * shape.lora_params(w.rank, w.targets))
    if setup.carried:
        n = len(active) * shape.lora_params(w.rank, w.targets)
        total = total + Compute(optimizer_bytes=ADAM_BYTES_PER_PARAM * n, trained=n)
    return _EdgeWork(bottom, top, site, total)


def _remote_phases(traffic: Traffic, work: _EdgeWork, cloud_c: Compute, cloud_weight_bytes: float, n_slices: int,
                   w: Workload, edge: DeviceProfile, cloud: DeviceProfile, link: LinkProfile) -> list[Phase]:
    """The step in order: each message, and the cloud slice or edge compute that follows it.
    Cloud work is cut into slices at each LoRA exchange; the same weights are read by forward and backward."""
    fwd_slice, bwd_slice = cloud_c.forward / n_slices, cloud_c.backward / n_slices
    wb_slice = cloud_weight_bytes / n_slices
    phases: list[Phase] = []
    fwd_i = bwd_i = 0

    def edge_phase(what: str, flops: float, optimizer_bytes: float = 0.0):
        seconds = flops / edge.throughput(w.tokens) + optimizer_bytes / edge.memory_bandwidth
        phases.append(Phase("edge", seconds, what))

    def cloud_phase(kind: str, i: int):
        flops = fwd_slice if kind == "fwd" else bwd_slice
        phases.append(Phase("cloud", cloud_job_seconds(cloud, flops, wb_slice, w.tokens), f"cloud {kind} slice {i}",
                            flops, wb_slice, f"{kind}:{i}", tokens=w.tokens))

    edge_phase("edge bottom forward", work.bottom.forward)
    for msg in traffic.messages:
        phases.append(_message_phase(msg, link, edge, cloud))
        if msg.kind in ("begin", "lora_reply"):
            cloud_phase("fwd", fwd_i)
            fwd_i += 1
        elif msg.kind in ("output_grad", "lora_grad_reply"):
            cloud_phase("bwd", bwd_i)
            bwd_i += 1
        elif msg.kind == "lora_request":
            edge_phase("edge LoRA forward", work.site[msg.group].forward)
        elif msg.kind == "lora_grad_request":
            edge_phase("edge LoRA backward", work.site[msg.group].backward)
        elif msg.kind == "hidden":
            edge_phase("edge top forward + backward", work.top.flops)
    edge_phase("edge bottom backward + opt", work.bottom.backward, work.total.optimizer_bytes)
    return phases


def _remote_notes(path: str, w: Workload, n_cloud: int, setup: WireSetup, active) -> tuple[str, ...]:
    notes = [f"cut k={w.k}, m={w.m}: {n_cloud} frozen cloud blocks; wire up {w.wire_up}, down {w.wire_down}"]
    if path in ("dlora", "carried"):
        notes.append(f"{'DLoRA' if path == 'dlora' else 'carried LoRA'} r={w.rank} on {','.join(w.targets)} of {len(setup.lora_blocks)} cloud blocks, "
                     f"{len(active)} active (fraction {w.active_fraction:g})")
    return tuple(notes)


def remote(shape: ModelShape, path: str, w: Workload, edge: DeviceProfile, cloud: DeviceProfile,
           link: LinkProfile) -> StepCost:
    """split, dlora and carried: the message sequence of the step, with the compute of each side between messages."""
    cb = cloud_blocks(shape, w.k, w.m)
    setup = _remote_setup(shape, path, w)
    traffic = step_traffic(shape, setup, w.batch, w.seq, step=w.step_index)
    groups = setup.groups() if setup.lora_blocks else []
    active = setup.active()
    work = _edge_work(shape, w, setup, groups, active)
    edge_weights = shape.embedding_params + shape.head_params + (w.k + w.m) * shape.block_params
    cloud_c = block_compute(shape, w.batch, w.seq).times(len(cb))  # frozen, input gradient needed
    if setup.carried:  # the cloud runs the carried LoRA (forward, dA, dB, dX; no optimizer: that is the edge's)
        lo = lora_compute(shape, w.tokens, w.rank, w.targets).times(len(active))
        cloud_c = cloud_c + Compute(lo.forward, lo.backward, activations=lo.activations)
    cloud_weight_bytes = len(cb) * shape.block_params * cloud.dtype_bytes
    phases = _remote_phases(traffic, work, cloud_c, cloud_weight_bytes, 1 + len(active) * len(groups), w, edge,
                            cloud, link)

    edge_s = sum(p.seconds for p in phases if p.where == "edge")
    cloud_s = sum(p.seconds for p in phases if p.where == "cloud")
    edge_side = _side(edge, work.total, edge_weights, w.tokens, edge_s)
    # DLoRA: the edge also keeps the LoRA outputs it computed for the cloud until their gradients come.
    kept = w.tokens * sum(shape.linear(t)[1] for _, ts in groups for t in ts) * len(active) * edge.dtype_bytes
    edge_side = replace(edge_side, activation_bytes=edge_side.activation_bytes + kept)
    cloud_side = SideCost(cloud_c.flops, cloud_s, cloud_weight_bytes, 0.0,
                          cloud_c.activations * cloud.dtype_bytes, 0)
    codec = sum(m.payload_bytes for m in traffic.messages) * (0.5 / edge.codec + 0.5 / cloud.codec)
    transfer = sum(link.transfer_seconds(m.wire_bytes, m.direction) for m in traffic.messages)
    return StepCost(path, shape.name, w, edge_side, cloud_side, traffic.bytes_up, traffic.bytes_down,
                    traffic.payload_up, traffic.payload_down, len(traffic.messages), traffic.round_trips, transfer,
                    codec, len(traffic.messages) * link.rtt / 2, tuple(phases), traffic=traffic,
                    notes=_remote_notes(path, w, len(cb), setup, active),
                    edge_fits=edge_side.peak_bytes <= edge.memory, cloud_fits=cloud_side.peak_bytes <= cloud.memory)


def split(shape, w, edge, cloud, link) -> StepCost:
    return remote(shape, "split", w, edge, cloud, link)


def dlora(shape, w, edge, cloud, link) -> StepCost:
    return remote(shape, "dlora", w, edge, cloud, link)


def carried(shape, w, edge, cloud, link) -> StepCost:
    return remote(shape, "carried", w, edge, cloud, link)


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


COSTS = {"local-full": local_full, "local-peft": local_peft, "split": split, "dlora": dlora, "carried": carried,
         "offsite": offsite, "federated": federated}


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
           "activation_elements_per_token", "peft_blocks", "ADAM_BYTES_PER_PARAM", "OPTIMIZER_STATE_BYTES",
           "NPY_HEADER", "SST2_TRAIN"]
