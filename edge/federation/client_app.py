"""The Tandem ClientApp: one edge device of a federation. Its data never leaves it.

Each round the ServerApp sends the global adapter of the federation's PEFT method (`peft`: LoRA with its DoRA and
rsLoRA variants, (IA)³, bottleneck adapters, prompt tuning, P-tuning, prefix tuning) and the round's instructions
(a ConfigRecord, keys below). The device starts from that adapter, trains `local-steps` steps on its own data, and
replies with its adapter, in the same wire dtype and key order, plus metrics: its number of training examples (the
FedAvg weight), its loss, and the split traffic of every step. The adapter is the method's PEFT state dict, or for
P-tuning and prefix tuning with a projection the encoder's own weights (protocol/federation.py `exchange`; PEFT's
form of it is the encoder's output, which loads as a table without the encoder). Prefix tuning trains carried
(cloud-lora carried): the cloud blocks' prefixes ride each step. Two ways to train, per device:
  cloud     through the shared cloud backbone, split, DLoRA or carried (the ordinary `edge.trainer.train`)
  emulator  locally, on an offsite-tuning bundle (adapter blocks + a compressed emulator of the middle,
            `tandem offsite build`): no cloud traffic at all; plain LoRA only. The bundle's adapter blocks must be
            the federation's LoRA sites, i.e. split with cut-bottom / cut-top = the bundle's bottom / top blocks.
For evaluation a device runs its slice of the dev set through the cloud with the global adapter (the full backbone:
what the federation's adapter is for).

The instructions (each round's ConfigRecord, then the device's node config, which wins: partition-id,
num-partitions, train-file, train-mode, cloud-address, cloud-token) are the fields of `Instructions` in
protocol/federation.py, in kebab-case; the ServerApp sends them from the same dataclass.

A Ray actor runs many simulated devices one after another, so the backbone is loaded once per process and every
round gets fresh modules that share its frozen weights (see `device_model`).
"""
from __future__ import annotations

import copy
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import tasks as T
from protocol.federation import Instructions, csv, exchanged_state, load_exchanged
from edge.federation.mods import clip_when_asked, secaggplus_when_asked
from edge.data import load_items
from edge.trainer import EdgeConfig, build_edge, evaluate as evaluate_edge, train as train_edge
from model.load import Loaded, load_model
from model.segments import cut_of, family_of


def method_flags(ins: Instructions) -> dict:
    """The edge trainer's flags of the round's PEFT method: its own options only (edge/methods.py refuses another
    method's options set to other than their defaults)."""
    if ins.peft == "lora":
        return dict(peft="lora", lora_r=ins.lora_r, lora_alpha=ins.lora_alpha, lora_targets=ins.targets,
                    lora_freeze_a=ins.freeze_a, lora_dora=ins.lora_dora, lora_rslora=ins.lora_rslora)
    if ins.freeze_a:
        raise ValueError(f"the server asks to freeze LoRA's A (FFA-LoRA) of peft {ins.peft}, which has none: "
                         f"the federation needs strategy fedavg")
    if ins.peft == "ia3":
        return dict(peft="ia3", ia3_targets=csv(ins.ia3_targets), ia3_feedforward=csv(ins.ia3_feedforward))
    if ins.peft == "adapter":
        return dict(peft="adapter", adapter_reduction=ins.adapter_reduction, adapter_targets=csv(ins.adapter_targets))
    if ins.peft == "prefix":  # prefix-projection 0: none (the edge's --prefix-projection default)
        return dict(peft="prefix", prefix_tokens=ins.prefix_tokens, prefix_projection=ins.prefix_projection or None)
    flags = dict(peft=ins.peft, prompt_tokens=ins.prompt_tokens)
    if ins.prompt_init_text:
        flags["prompt_init_text"] = ins.prompt_init_text
    if ins.ptuning_hidden:
        flags["ptuning_hidden"] = ins.ptuning_hidden
    return flags


def edge_config(ins: Instructions, train_file: str | None, steps: int) -> EdgeConfig:
    """The edge trainer's config for this round's instructions."""
    return EdgeConfig.of(cloud=ins.cloud_address, token=ins.cloud_token or None, tls_dir=ins.cloud_tls_dir or None,
                         model=ins.model, task=ins.task,
                         train_file=train_file, k=ins.cut_bottom, m=ins.cut_top, cloud_lora=ins.cloud_lora,
                         **method_flags(ins), lr=ins.lr, steps=steps, batch_size=ins.batch_size,
                         seed=ins.seed_this_round, wire_up=ins.wire_up, wire_down=ins.wire_down,
                         eval_examples=ins.eval_examples, eval_batch_size=ins.eval_batch_size, eval_before=False,
                         eval_after=False, progress=False, name=f"edge-{ins.partition_id}")


# ---- the backbone, once per process -------------------------------------------------------------------------------

_BACKBONES: dict[tuple, Loaded] = {}


def device_model(spec: str, k: int, m: int, cloud_weights: bool = False) -> Loaded:
    """A fresh copy of the backbone as a device holds it. The first call in a process loads it and moves the cloud's
    blocks to the meta device (shapes only: the edge never runs them), unless `cloud_weights` (DoRA carried: the
    set starts its cloud sites' magnitudes from their base weights, as a standalone edge does before it drops the
    cloud's blocks); every call returns new modules, so no LoRA hook of an earlier round carries over, that share
    the frozen weights, so a copy costs almost nothing."""
    key = (spec, k, m, cloud_weights)
    if key not in _BACKBONES:
        loaded = load_model(spec)
        blocks = family_of(loaded.model).blocks(loaded.model)
        for b in cut_of(loaded.model, k, m).cloud if not cloud_weights else ():
            blocks[b].to("meta")
        _BACKBONES[key] = loaded
    base = _BACKBONES[key]
    shared = {id(t): t for t in itertools.chain(base.model.parameters(), base.model.buffers())}
    return Loaded(copy.deepcopy(base.model, shared), base.tokenizer, base.name)


_BUNDLES: dict = {}


def emulator_model(folder: str):
    """The offsite bundle's compact model (adapter blocks + emulator), verified and loaded once per process; every
    call returns fresh modules sharing its frozen weights, as `device_model` does."""
    from emulator.bundle import Emulated, load_bundle
    if folder not in _BUNDLES:
        _BUNDLES[folder] = load_bundle(folder)
    base = _BUNDLES[folder]
    shared = {id(t): t for t in itertools.chain(base.model.parameters(), base.model.buffers())}
    return Emulated(copy.deepcopy(base.model, shared), base.tokenizer, base.manifest, base.layout)


def train_on_emulator(ins: Instructions, start: dict[str, torch.Tensor],
                      train_file: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """`local-steps` steps of LoRA on the bundle's adapter blocks, from the global adapter, entirely on the device.
    Returns the adapter (named as in the full model) and the step losses."""
    from emulator.bundle import renumber
    from emulator.tune import TuneConfig, make_adapter, train_adapter
    if ins.peft != "lora" or ins.lora_dora or ins.lora_rslora:
        raise ValueError(f"a device on the offsite emulator trains plain LoRA, not peft {ins.peft}"
                         f"{' with DoRA' if ins.lora_dora else ' with rsLoRA' if ins.lora_rslora else ''}: "
                         f"train it through the cloud (train-mode cloud)")
    emulated = emulator_model(ins.emulator_bundle)
    to_full = dict(enumerate(emulated.layout.kept))
    to_compact = {b: j for j, b in to_full.items()}
    cfg = TuneConfig(task=ins.task, train_file=train_file, mode="lora", lr=ins.lr, steps=ins.local_steps,
                     batch_size=ins.batch_size, lora_r=ins.lora_r, lora_alpha=ins.lora_alpha,
                     lora_targets=ins.targets, eval_before=False, eval_after=False, seed=ins.seed_this_round,
                     progress=False)
    adapter = make_adapter(emulated.model, emulated.adapter_positions, "lora", cfg)
    sites = {renumber(k, to_full) for k in adapter.lora.peft_state_dict()}
    if sites != set(start):
        raise ValueError(f"the emulator bundle's adapter blocks {list(emulated.layout.adapter)} are not the "
                         f"federation's LoRA sites: train split (cloud-lora none) with cut-bottom / cut-top equal to "
                         f"the bundle's bottom / top blocks and the same lora-targets")
    adapter.lora.load_peft_state_dict({renumber(k, to_compact): v for k, v in start.items()})
    if ins.freeze_a:
        for name, p in adapter.lora.named_parameters():
            p.requires_grad_("lora_A" not in name)
    tok = emulated.tokenizer or T.tiny_tokenizer()
    task = T.TASKS[ins.task]
    items = T.encode(task, T.load_split(ins.task, "train", train_file), tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    record = train_adapter(adapter, task, items, cfg, pad_id)
    return adapter.state(to_full), record["losses"]


# ---- this device's data -------------------------------------------------------------------------------------------

_SHARDS: dict[tuple, str] = {}
_SIZES: dict[str, int] = {}


def train_file_of(ins: Instructions) -> str:
    """The device's own training file: its node config's, its partition's, or an IID shard of the shared set."""
    if ins.train_file:
        return ins.train_file
    if ins.partition_dir:
        path = Path(ins.partition_dir) / f"client-{ins.partition_id}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"no partition file {path} (run `tandem federate` or write one per device)")
        return str(path)
    key = (ins.task, ins.partition_id, ins.num_partitions)
    if key not in _SHARDS:  # written once per process: the trainer then reads a small file every round
        rows = T.load_split(ins.task, "train")[ins.partition_id::ins.num_partitions]
        fd, path = tempfile.mkstemp(prefix=f"tandem-{ins.task}-shard{ins.partition_id}-", suffix=".jsonl")
        with open(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        _SHARDS[key] = path
    return _SHARDS[key]


def examples_in(task: str, path: str) -> int:
    if path not in _SIZES:
        _SIZES[path] = len(T.load_split(task, "train", path))
    return _SIZES[path]


# ---- adapter <-> records ------------------------------------------------------------------------------------------

def adapter_from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), dtype=np.float32)) for k, v in record.items()}


def record_like(adapter: dict[str, torch.Tensor], like: ArrayRecord) -> ArrayRecord:
    """The trained adapter in the keys, order and dtype of the one received."""
    if set(adapter) != set(like.keys()):
        raise ValueError(f"the server's adapter has sites this device does not: {sorted(set(like.keys()) ^ set(adapter))[:3]}")
    return ArrayRecord({k: Array(adapter[k].numpy().astype(np.dtype(like[k].dtype))) for k in like.keys()})


def backbone_of(ins: Instructions) -> Loaded:
    """This device's copy of the backbone for the round's method (`device_model`)."""
    return device_model(ins.model, ins.cut_bottom, ins.cut_top,
                        cloud_weights=ins.peft == "lora" and ins.lora_dora and ins.cloud_lora == "carried")


def train_through_cloud(ins: Instructions, start: dict[str, torch.Tensor], path: str):
    """`local-steps` steps through the cloud from the round's adapter: (the trained adapter in the round's form,
    the step records, the cloud's session counts). P-tuning's adapter (and prefix tuning's with a projection) is its
    encoder's weights, which the trainer's `initial_adapter` (PEFT's form) cannot take: they are put in before the
    first step, in place (the optimizer holds the same parameters and has no state yet)."""
    cfg = edge_config(ins, path, ins.local_steps)
    if ins.exchange == "peft":
        result = train_edge(cfg, loaded=backbone_of(ins), initial_adapter=start)
    else:
        loaded = []

        def load_round(em, step: int) -> None:
            if step == 0:
                load_exchanged(em.lora, start, ins)
                loaded.append(step)

        result = train_edge(cfg, loaded=backbone_of(ins), step_hook=load_round)
        if not loaded:
            raise RuntimeError(f"the round's {ins.peft} encoder was never loaded: no training step ran (local-steps "
                               f"0?)")
    return exchanged_state(result.model.lora, ins), result.metrics["steps"], result.metrics.get("cloud_session", {})


# ---- the app ------------------------------------------------------------------------------------------------------

app = ClientApp()


@app.train(mods=[secaggplus_when_asked, clip_when_asked])
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the global adapter: through the cloud, or on the offsite emulator."""
    ins = Instructions.read(msg.content["config"], dict(context.node_config))
    start = msg.content["arrays"]
    path = train_file_of(ins)
    t0 = time.perf_counter()
    if ins.on_emulator:
        adapter, losses = train_on_emulator(ins, adapter_from_record(start), path)
        steps, session = [], {}
    else:
        adapter, steps, session = train_through_cloud(ins, adapter_from_record(start), path)
        losses = [s["loss"] for s in steps]
    metrics = MetricRecord({
        "num-examples": examples_in(ins.task, path),
        "partition-id": ins.partition_id,
        "on-emulator": int(ins.on_emulator),
        "local-steps": len(losses),
        "train-loss": float(np.mean(losses)),
        "train-loss-last": float(losses[-1]),
        "train-seconds": time.perf_counter() - t0,
        "split-steps": len(steps),  # steps through the cloud (0 on the emulator)
        "split-bytes-up": sum(s["bytes_up"] for s in steps),
        "split-bytes-down": sum(s["bytes_down"] for s in steps),
        "split-step-bytes-up": [int(s["bytes_up"]) for s in steps],
        "split-step-bytes-down": [int(s["bytes_down"]) for s in steps],
        "cloud-bytes-received": int(session.get("bytes_received", 0)),  # the cloud's own count of this session
        "cloud-bytes-sent": int(session.get("bytes_sent", 0)),
    })
    return Message(RecordDict({"arrays": record_like(adapter, start), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global adapter on this device's slice of the dev set (shortest prompts batched together), via the cloud."""
    ins = Instructions.read(msg.content["config"], dict(context.node_config))
    cfg = edge_config(ins, None, 0)
    em, tok, link = build_edge(cfg, loaded=backbone_of(ins))
    try:
        load_exchanged(em.lora, adapter_from_record(msg.content["arrays"]), ins)
        em.eval()
        items = load_items(cfg, tok, "dev")[ins.dev_shard::ins.dev_shards]
        items.sort(key=lambda it: len(it["ids"]))
        task = em.task
        label_ids = T.label_token_ids(task, tok) if task.kind == "classify" else None
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        result = evaluate_edge(em, items, pad_id, ins.eval_batch_size, label_ids)
    finally:
        stats = link.close()
    metrics = {"num-examples": len(items)}
    metrics.update({k: float(v) for k, v in result.items() if k not in ("examples", "tokens")})
    if stats is not None:
        metrics["cloud-bytes-received"] = int(stats.bytes_received)
        metrics["cloud-bytes-sent"] = int(stats.bytes_sent)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
