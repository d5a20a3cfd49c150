"""Cost of one training step for each way Tandem can fine-tune: compute and peak memory on each side, exact bytes
per direction, round trips, and time from device and link profiles. The FLOPs, optimizer traffic and kept
activations of the pieces (blocks, LoRA, LM head) are in sim.compute.

Paths
  local-full   all weights trained on the edge (embedding, blocks, head), AdamW
  local-peft   the PEFT method on every block (or its virtual tokens before the input), all on the edge
  split        edge-bottom (k blocks) and edge-top (m blocks + head) on the edge with the method on them; the cloud
               runs the frozen middle blocks (Tandem `--cloud-lora none`)
  dlora        split + LoRA on every cloud block, computed on the edge from inputs the cloud sends (DLoRA);
               `active_fraction` < 1 is Kill & Revive (only that share of cloud blocks runs its LoRA this step)
  carried      split + LoRA (DoRA, (IA)³) on every (active) cloud block whose weights ride the step's first message
               and whose gradients come back with the last: the cloud computes the sites, the edge keeps weights and
               optimizer; prefix tuning: every cloud block's prefix rides it, the edge's encoder makes them
  offsite      offsite-tuning: the edge trains k bottom and m top blocks (adapters, full weights) around an emulator
               that keeps `emulator_fraction` of the middle blocks (layer drop); nothing crosses per step
  federated    every client runs `local_steps` local-PEFT steps, then uploads its adapter and downloads the average

PEFT methods (`Workload.peft`: lora, with `dora`, ia3, adapter, prompt, ptuning, prefix): the remote paths are a
method's --cloud-lora modes as protocol/step.py WIRE_PATTERNS declares them: split = none (the method on the edge's
blocks, or prompt / P-tuning's virtual tokens, with which every block runs on T + V tokens), dlora = edge (LoRA,
adapters), carried = carried (LoRA, DoRA, (IA)³, and prefix tuning, whose only remote path it is: every block's
attention has V more keys); `paths_for` lists a method's paths. local-full and offsite train whole weights: no
method.

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

from sim.compute import (ADAM_BYTES_PER_PARAM, adapter_compute, INPUT_METHODS, SIM_METHODS, SST2_TRAIN, Compute, Workload,
                         activation_elements_per_token, attention_flops, block_compute, head_compute, lora_compute,
                         peft_blocks, prefix_compute, prompt_compute, site_compute, site_params)
from sim.profiles import DeviceProfile, LinkProfile
from sim.shape import ModelShape
from protocol.step import WIRE_PATTERNS, Traffic
from sim.stepcost import Phase, SideCost, StepCost
from sim.wire import WireSetup, cloud_blocks, method_setup, step_traffic

PATHS = ("local-full", "local-peft", "split", "dlora", "carried", "offsite", "federated")
REMOTE_MODES = {"split": "none", "dlora": "edge", "carried": "carried"}  # remote path -> its --cloud-lora mode
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "ia3": "(IA)³", "adapter": "bottleneck adapters",
                "prompt": "prompt tuning", "ptuning": "P-tuning", "prefix": "prefix tuning"}
OPTIMIZER_STATE_BYTES = 12  # fp32 gradient + two fp32 moments per trained weight
NPY_HEADER = 128  # numpy .npy header Flower puts before each array it ships (format 1.0, padded)


def path_problem(path: str, w: Workload) -> str | None:
    """Why `path` does not exist for the workload's PEFT method (one line), or None when it does."""
    if path not in PATHS:
        return f"unknown path {path!r}: one of {', '.join(PATHS)}"
    if w.peft not in SIM_METHODS or w.peft not in WIRE_PATTERNS:
        return f"the simulator does not model --peft {w.peft}: it knows {', '.join(SIM_METHODS)}"
    if w.dora and w.peft != "lora":
        return f"DoRA is a LoRA variant: --peft {w.peft} has none"
    if w.peft == "prefix":
        from sim.wire import check_prefix
        try:
            check_prefix(w.prefix_tokens, w.prefix_projection)
        except ValueError as e:
            return str(e)
    mode = REMOTE_MODES.get(path)
    if mode is None:
        return None
    modes = WIRE_PATTERNS[w.peft]
    if mode not in modes:
        return (f"--peft {w.peft} has no {path} path: it takes --cloud-lora {' or '.join(modes)} "
                f"({', '.join(p for p, m in REMOTE_MODES.items() if m in modes)})")
    if w.dora and mode == "edge":
        return "DoRA has no dlora path: its branch needs the base weights, which the edge has not (use carried)"
    return None


def paths_for(w: Workload) -> tuple[str, ...]:
    """The paths the workload's PEFT method has, in PATHS order."""
    return tuple(p for p in PATHS if path_problem(p, w) is None)


def method_note(w: Workload) -> str:
    """The method as a table note: LoRA r=8 on q_proj,v_proj; (IA)³ on k_proj,v_proj,down_proj ...; prompt ..."""
    targets, feedforward = w.sites()
    name = METHOD_NAMES[w.method]
    if w.peft == "lora":
        return f"{name} r={w.rank} on {','.join(targets)}"
    if w.peft == "ia3":
        return f"{name} on {','.join(targets)}" + (f" (input-scaled: {','.join(feedforward)})" if feedforward else "")
    if w.peft == "adapter":
        return f"{name} (reduction {w.adapter_reduction}) after {','.join(targets)}"
    if w.peft == "prefix":
        encoder = (f"from an encoder MLP of hidden {w.prefix_projection}" if w.prefix_projection is not None
                   else "a table (P-tuning v2)")
        return (f"{name}: {w.prefix_tokens} virtual keys and values in front of every block's attention, "
                f"{encoder}; attention T x (V + T) = {w.seq} x {w.prefix_tokens + w.seq}")
    encoder = f", from an encoder MLP of hidden {w.ptuning_hidden or 'H'}" if w.peft == "ptuning" else ""
    return f"{name}: {w.prompt_tokens} virtual tokens{encoder}; every block runs on T + V = {w.block_seq} tokens"


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
           c: Compute, weights: int, notes=(), tokens: int | None = None) -> StepCost:
    side = _side(edge, c, weights, w.tokens if tokens is None else tokens)
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
    c = prompt_compute(shape, w) + prefix_compute(shape, w) + peft_blocks(shape, w, range(shape.layers))
    c = c + head_compute(shape, w)
    where = "" if w.peft in INPUT_METHODS else f" of all {shape.layers} blocks"
    return _local(shape, "local-peft", w, edge, cloud, c, shape.total_params,
                  [f"{method_note(w)}{where}, all on the edge"], tokens=w.block_tokens)


@dataclass(frozen=True)
class _EdgeWork:
    """The edge's share of a split/DLoRA step."""
    bottom: Compute  # edge-bottom blocks
    top: Compute  # edge-top blocks + head
    site: dict  # DLoRA: LoRA group -> its work at one cloud block
    total: Compute  # all of it, with every cloud LoRA the edge trains


def _remote_setup(shape: ModelShape, path: str, w: Workload) -> WireSetup:
    """The wire setup of the path for the workload's method (sim.wire.method_setup reads WIRE_PATTERNS)."""
    targets, feedforward = w.sites()
    return method_setup(shape, w.peft, REMOTE_MODES[path], w.k, w.m, w.wire_up, w.wire_down, targets or None,
                        w.rank, w.dora, feedforward, w.active_fraction, w.prompt_tokens, w.prefix_tokens,
                        w.prefix_projection)


def _edge_work(shape: ModelShape, w: Workload, setup: WireSetup, groups, active) -> _EdgeWork:
    # virtual tokens go in below block 0; a prefix's encoder makes every layer's, the cloud's too, before block 0
    bottom = prompt_compute(shape, w) + prefix_compute(shape, w) + peft_blocks(shape, w, range(w.k))
    top = peft_blocks(shape, w, range(shape.layers - w.m, shape.layers)) + head_compute(shape, w)
    site = {g: adapter_compute(shape, w.block_tokens, w.adapter_reduction, ts) if w.peft == "adapter"
            else lora_compute(shape, w.block_tokens, w.rank, ts) for g, ts in groups}  # one group at one block
    total = bottom + top + sum((site[g].times(len(active)) for g, _ in groups), Compute())
    # Every cloud site is a trained weight held on the edge (Kill & Revive only pauses some of them); carried: the
    # cloud computes them, the edge only steps their optimizer.
    per_block = site_params(shape, w) if setup.lora_blocks else 0
    idle = len(setup.lora_blocks) - len(active)
    total = total + Compute(trained=idle * per_block)
    if setup.carried:
        n = len(active) * per_block
        total = total + Compute(optimizer_bytes=ADAM_BYTES_PER_PARAM * n, trained=n)
    return _EdgeWork(bottom, top, site, total)


def _remote_phases(traffic: Traffic, work: _EdgeWork, cloud_c: Compute, read_bytes: float, n_slices: int,
                   w: Workload, edge: DeviceProfile, cloud: DeviceProfile, link: LinkProfile,
                   alone: bool = False) -> list[Phase]:
    """The step in order: each message, and the cloud slice or edge compute that follows it.
    Cloud work is cut into slices at each LoRA exchange; the same weights (`read_bytes`) are read by forward and
    backward.
    `alone`: the cloud runs this step's jobs in no batch with other sessions' (carried DoRA, (IA)³ and prefix)."""
    fwd_slice, bwd_slice = cloud_c.forward / n_slices, cloud_c.backward / n_slices
    wb_slice = read_bytes / n_slices
    phases: list[Phase] = []
    fwd_i = bwd_i = 0

    def edge_phase(what: str, flops: float, optimizer_bytes: float = 0.0):
        seconds = flops / edge.throughput(w.block_tokens) + optimizer_bytes / edge.memory_bandwidth
        phases.append(Phase("edge", seconds, what))

    def cloud_phase(kind: str, i: int):
        flops = fwd_slice if kind == "fwd" else bwd_slice
        phases.append(Phase("cloud", cloud_job_seconds(cloud, flops, wb_slice, w.block_tokens),
                            f"cloud {kind} slice {i}", flops, wb_slice, f"{kind}:{i}", tokens=w.block_tokens,
                            alone=alone))

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


def _remote_notes(shape: ModelShape, path: str, w: Workload, n_cloud: int, setup: WireSetup,
                  active) -> tuple[str, ...]:
    notes = [f"cut k={w.k}, m={w.m}: {n_cloud} frozen cloud blocks; wire up {w.wire_up}, down {w.wire_down}"]
    if path == "split":
        where = "" if w.peft in INPUT_METHODS else f" on the edge's {w.k + w.m} blocks"
        notes.append(f"{method_note(w)}{where}")
    elif setup.method == "prefix":
        notes.append(f"carried {method_note(w)}; the edge makes all {shape.layers} layers' prefixes, each of the "
                     f"{len(setup.lora_blocks)} cloud blocks' (key and value [{shape.kv_heads}, {w.prefix_tokens}, "
                     f"{shape.head_dim}]) rides begin, its gradient input_grad; the cloud runs the step alone")
    else:
        notes.append(f"{'DLoRA' if path == 'dlora' else 'carried'} {method_note(w)} of {len(setup.lora_blocks)} "
                     f"cloud blocks, {len(active)} active (fraction {w.active_fraction:g})")
        if setup.carried and setup.method == "dora":
            notes.append("the cloud computes each site's weight norm ||W + s B A|| every step")
    return tuple(notes)


def remote(shape: ModelShape, path: str, w: Workload, edge: DeviceProfile, cloud: DeviceProfile,
           link: LinkProfile) -> StepCost:
    """split, dlora and carried: the message sequence of the step, with the compute of each side between messages."""
    if problem := path_problem(path, w):
        raise ValueError(problem)
    cb = cloud_blocks(shape, w.k, w.m)
    setup = _remote_setup(shape, path, w)
    traffic = step_traffic(shape, setup, w.batch, w.seq, step=w.step_index)
    groups = setup.groups() if setup.lora_blocks else []
    active = setup.active()
    work = _edge_work(shape, w, setup, groups, active)
    edge_weights = shape.embedding_params + shape.head_params + (w.k + w.m) * shape.block_params
    # frozen, input gradient needed; a prefix's V keys in front of every cloud block's attention
    cloud_c = block_compute(shape, w.batch, w.block_seq, prefix=w.prefix_keys).times(len(cb))
    cloud_weight_bytes = len(cb) * shape.block_params * cloud.dtype_bytes
    read_bytes = cloud_weight_bytes  # weights the cloud reads per step (memory-bound time)
    if setup.carried:  # the cloud runs the carried sites (forward, their gradients, dX; the optimizer is the edge's)
        lo = site_compute(shape, w).times(len(active))
        cloud_c = cloud_c + Compute(lo.forward, lo.backward, activations=lo.activations)
        if setup.method == "dora":  # the norm reads each site's W once more
            reread = sum(i * o for i, o in (shape.linear(t) for t in setup.lora_targets))
            read_bytes += len(active) * reread * cloud.dtype_bytes
    # as cloud/step_runner.py: of the carried steps only carried LoRA joins other sessions' batches (carried DoRA,
    # (IA)³ and prefix run alone)
    phases = _remote_phases(traffic, work, cloud_c, read_bytes, 1 + len(active) * len(groups), w, edge,
                            cloud, link, alone=setup.carried and setup.method != "lora")

    edge_s = sum(p.seconds for p in phases if p.where == "edge")
    cloud_s = sum(p.seconds for p in phases if p.where == "cloud")
    edge_side = _side(edge, work.total, edge_weights, w.block_tokens, edge_s)
    # DLoRA: the edge also keeps the LoRA outputs it computed for the cloud until their gradients come.
    kept = w.block_tokens * sum(shape.linear(t)[1] for _, ts in groups for t in ts) * len(active) * edge.dtype_bytes
    edge_side = replace(edge_side, activation_bytes=edge_side.activation_bytes + kept)
    cloud_side = SideCost(cloud_c.flops, cloud_s, cloud_weight_bytes, 0.0,
                          cloud_c.activations * cloud.dtype_bytes, 0)
    codec = sum(m.payload_bytes for m in traffic.messages) * (0.5 / edge.codec + 0.5 / cloud.codec)
    transfer = sum(link.transfer_seconds(m.wire_bytes, m.direction) for m in traffic.messages)
    return StepCost(path, shape.name, w, edge_side, cloud_side, traffic.bytes_up, traffic.bytes_down,
                    traffic.payload_up, traffic.payload_down, len(traffic.messages), traffic.round_trips, transfer,
                    codec, len(traffic.messages) * link.rtt / 2, tuple(phases), traffic=traffic,
                    notes=_remote_notes(shape, path, w, len(cb), setup, active),
                    edge_fits=edge_side.peak_bytes <= edge.memory, cloud_fits=cloud_side.peak_bytes <= cloud.memory)


def split(shape, w, edge, cloud, link) -> StepCost:
    return remote(shape, "split", w, edge, cloud, link)


def dlora(shape, w, edge, cloud, link) -> StepCost:
    return remote(shape, "dlora", w, edge, cloud, link)


def carried(shape, w, edge, cloud, link) -> StepCost:
    return remote(shape, "carried", w, edge, cloud, link)


def offsite(shape, w, edge, cloud, link) -> StepCost:
    """Whole adapter blocks trained around the emulator: the PEFT method does not change it."""
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


def adapter_arrays(shape: ModelShape, w: Workload) -> tuple[int, int]:
    """(weights, arrays) of the whole model's adapter as the federation averages it: LoRA's A and B per target and
    block (+ DoRA's magnitude), (IA)³'s vector per target and block, prompt tuning's [V, H] embeddings, P-tuning's
    encoder (its embedding table and MLP: the weights FedAvg averages, model/tuners METHODS), prefix tuning's
    prefixes [V, L*2*kv_dim] or, with a projection, its encoder (embedding, two linears with biases: the round's
    arrays are the encoder's weights, protocol/federation.py `exchange`)."""
    targets, _ = w.sites()
    if w.peft == "prefix":
        return prefix_compute(shape, w).trained, 1 if w.prefix_projection is None else 5
    if w.peft in INPUT_METHODS:
        return prompt_compute(shape, w).trained, 1 if w.peft == "prompt" else 7
    per_site = 1 if w.peft == "ia3" else 4 if w.peft == "adapter" else 3 if w.dora else 2
    return shape.layers * site_params(shape, w), per_site * len(targets) * shape.layers


def federated(shape, w, edge, cloud, link) -> StepCost:
    """A round = `local_steps` local-PEFT steps + upload of the adapter + download of the average; per step
    amortized. Bytes are the fp32 adapter plus a .npy header per array (Flower's own framing is not counted
    exactly)."""
    local = local_peft(shape, w, edge, cloud, link)
    weights, arrays = adapter_arrays(shape, w)
    adapter = 4 * weights + NPY_HEADER * arrays
    n = w.local_steps
    transfer = link.transfer_seconds(adapter, "up") + link.transfer_seconds(adapter, "down")
    codec = adapter * (1 / edge.codec)  # serialize on upload, parse on download
    phases = (*local.phases * n, Phase("up", link.transfer_seconds(adapter, "up") + link.rtt / 2, "upload adapter"),
              Phase("cloud", 0.0, "aggregate (FedAvg; negligible)"),
              Phase("down", link.transfer_seconds(adapter, "down") + link.rtt / 2, "download average"))
    edge_side = local.edge
    return StepCost("federated", shape.name, w, edge_side, SideCost(), adapter / n, adapter / n,
                    (adapter - NPY_HEADER * arrays) / n, (adapter - NPY_HEADER * arrays) / n, 2 / n, 1 / n,
                    transfer / n, codec / n, link.rtt / n, phases,
                    notes=(f"round = {n} local steps of {method_note(w)} + exchange of the {adapter / 1e6:.2f} MB "
                           f"adapter; per-step figures are the round divided by {n}",),
                    edge_fits=local.edge_fits)


COSTS = {"local-full": local_full, "local-peft": local_peft, "split": split, "dlora": dlora, "carried": carried,
         "offsite": offsite, "federated": federated}


def predict(shape: ModelShape, path: str, w: Workload, edge: DeviceProfile, cloud: DeviceProfile,
            link: LinkProfile) -> StepCost:
    """The cost of one step of `path` with the workload's PEFT method (a ValueError when the method has no such
    path: path_problem)."""
    if problem := path_problem(path, w):
        raise ValueError(problem)
    return COSTS[path](shape, w, edge, cloud, link)


def predict_all(shape, w, edge, cloud, link, paths=None) -> list[StepCost]:
    """Every path in `paths` (None: every path the workload's method has, paths_for)."""
    return [predict(shape, p, w, edge, cloud, link) for p in (paths_for(w) if paths is None else paths)]


__all__ = ["PATHS", "REMOTE_MODES", "path_problem", "paths_for", "method_note", "adapter_arrays", "Workload", "Compute",
           "Phase", "SideCost", "StepCost", "predict", "predict_all",
           "block_compute", "head_compute", "lora_compute", "attention_flops", "cloud_job_seconds",
           "activation_elements_per_token", "peft_blocks", "ADAM_BYTES_PER_PARAM", "OPTIMIZER_STATE_BYTES",
           "NPY_HEADER", "SST2_TRAIN"]
