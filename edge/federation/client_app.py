"""The Tandem ClientApp: one edge device of a federation. Its data never leaves it; it trains through the cloud.

Each round the ServerApp sends the global LoRA adapter and the round's instructions (a ConfigRecord, keys below).
The device starts from that adapter, trains `local-steps` steps on its own data through the shared cloud backbone
(split or DLoRA: the ordinary `edge.trainer.train`), and replies with its adapter, in the same wire dtype and key
order, plus metrics: its number of training examples (the FedAvg weight), its loss, and the split traffic of every
step. For evaluation it runs its slice of the dev set through the cloud with the global adapter.

Instructions (train/evaluate ConfigRecord, set by cloud/federation/server_app.py):
  cloud-address, cloud-token       the backbone service every device shares
  model, task                      backbone spec (model.load) and task (tasks.TASKS)
  cut-bottom, cut-top, cloud-lora  the edge's blocks (k, m) and "none" (split) or "edge" (DLoRA)
  lora-r, lora-alpha, lora-targets adapter shape (targets comma-separated)
  freeze-a                         FFA-LoRA: train B only
  local-steps, batch-size, lr, seed, wire-up, wire-down
  partition-dir                    folder with client-<partition-id>.jsonl (empty: an IID shard of the shared set)
  server-round; evaluate only: eval-examples, eval-batch-size, dev-shard, dev-shards
Node config (per device, overrides): partition-id, num-partitions (set by the simulation), train-file, cloud-address,
cloud-token.

A Ray actor runs many simulated devices one after another, so the backbone is loaded once per process and every
round gets fresh modules that share its frozen weights (see `device_model`).
"""
from __future__ import annotations

import copy
import itertools
import json
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import tasks as T
from edge.federation.mods import clip_when_asked, secaggplus_when_asked
from edge.trainer import EdgeConfig, build_edge, evaluate as evaluate_edge, load_items, train as train_edge
from model.load import Loaded, load_model
from model.segments import cut_of, family_of


@dataclass
class Instructions:
    """One round's instructions to a device, from the server's ConfigRecord (kebab-case keys) and its node config."""
    cloud_address: str = ""
    cloud_token: str = ""
    model: str = "smollm2"
    task: str = "sst2"
    cut_bottom: int = 1
    cut_top: int = 1
    cloud_lora: str = "none"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: str = "q_proj,v_proj"
    freeze_a: bool = False
    local_steps: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    wire_up: str = "fp32"
    wire_down: str = "fp32"
    partition_dir: str = ""
    server_round: int = 0
    eval_examples: int = 500
    eval_batch_size: int = 32
    dev_shard: int = 0
    dev_shards: int = 1
    # node config
    partition_id: int = 0
    num_partitions: int = 1
    train_file: str = ""

    @classmethod
    def read(cls, config: ConfigRecord, node_config: dict) -> "Instructions":
        known = {f.name for f in fields(cls)}
        values = {}
        for source in (config, node_config):  # the device's own settings win
            for key, value in source.items():
                name = key.replace("-", "_")
                if name in known:
                    values[name] = value
        return cls(**values)

    def edge_config(self, train_file: str | None, steps: int) -> EdgeConfig:
        return EdgeConfig(cloud=self.cloud_address, token=self.cloud_token or None, model=self.model, task=self.task,
                          train_file=train_file, k=self.cut_bottom, m=self.cut_top, cloud_lora=self.cloud_lora,
                          lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                          lora_targets=tuple(t for t in self.lora_targets.split(",") if t),
                          lora_freeze_a=self.freeze_a, lr=self.lr, steps=steps, batch_size=self.batch_size,
                          seed=self.seed + 1000 * self.server_round + self.partition_id,  # new batches every round
                          wire_up=self.wire_up, wire_down=self.wire_down, eval_examples=self.eval_examples,
                          eval_batch_size=self.eval_batch_size, eval_before=False, eval_after=False,
                          progress=False, name=f"edge-{self.partition_id}")


# ---- the backbone, once per process -------------------------------------------------------------------------------

_BACKBONES: dict[tuple, Loaded] = {}


def device_model(spec: str, k: int, m: int) -> Loaded:
    """A fresh copy of the backbone as a device holds it. The first call in a process loads it and moves the cloud's
    blocks to the meta device (shapes only: the edge never runs them); every call returns new modules, so no LoRA
    hook of an earlier round carries over, that share the frozen weights, so a copy costs almost nothing."""
    key = (spec, k, m)
    if key not in _BACKBONES:
        loaded = load_model(spec)
        blocks = family_of(loaded.model).blocks(loaded.model)
        for b in cut_of(loaded.model, k, m).cloud:
            blocks[b].to("meta")
        _BACKBONES[key] = loaded
    base = _BACKBONES[key]
    shared = {id(t): t for t in itertools.chain(base.model.parameters(), base.model.buffers())}
    return Loaded(copy.deepcopy(base.model, shared), base.tokenizer, base.name)


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


# ---- the app ------------------------------------------------------------------------------------------------------

app = ClientApp()


@app.train(mods=[secaggplus_when_asked, clip_when_asked])
def train(msg: Message, context: Context) -> Message:
    """One round of local training through the cloud, from the global adapter."""
    ins = Instructions.read(msg.content["config"], dict(context.node_config))
    start = msg.content["arrays"]
    path = train_file_of(ins)
    t0 = time.perf_counter()
    result = train_edge(ins.edge_config(path, ins.local_steps),
                        loaded=device_model(ins.model, ins.cut_bottom, ins.cut_top),
                        initial_adapter=adapter_from_record(start))
    steps = result["steps"]
    session = result.get("cloud_session", {})
    metrics = MetricRecord({
        "num-examples": examples_in(ins.task, path),
        "partition-id": ins.partition_id,
        "train-loss": float(np.mean([s["loss"] for s in steps])),
        "train-loss-last": float(steps[-1]["loss"]),
        "train-seconds": time.perf_counter() - t0,
        "split-steps": len(steps),
        "split-bytes-up": sum(s["bytes_up"] for s in steps),
        "split-bytes-down": sum(s["bytes_down"] for s in steps),
        "split-step-bytes-up": [int(s["bytes_up"]) for s in steps],
        "split-step-bytes-down": [int(s["bytes_down"]) for s in steps],
        "cloud-bytes-received": int(session.get("bytes_received", 0)),  # the cloud's own count of this session
        "cloud-bytes-sent": int(session.get("bytes_sent", 0)),
    })
    arrays = record_like(result["_edge_model"].lora.peft_state_dict(), start)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global adapter on this device's slice of the dev set (shortest prompts batched together), via the cloud."""
    ins = Instructions.read(msg.content["config"], dict(context.node_config))
    cfg = ins.edge_config(None, 0)
    em, tok, link = build_edge(cfg, loaded=device_model(ins.model, ins.cut_bottom, ins.cut_top))
    try:
        em.lora.load_peft_state_dict(adapter_from_record(msg.content["arrays"]))
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
