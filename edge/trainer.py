"""The edge client: private data, the edge segments, every LoRA weight, and an ordinary PyTorch training loop.

    bottom (embedding + k blocks, local LoRA)  ->  RemoteCloud (cloud blocks over gRPC)  ->  top (m blocks, norm,
    LM head, loss)

Modes (`lora.cloud`, --cloud-lora): "none" — the cloud blocks are frozen and carry no LoRA (split training);
"edge" — DLoRA: the cloud blocks carry LoRA too, computed and trained here on the edge from the LoRA inputs the
cloud sends.
The loop itself is model/training.py's `fit` and `evaluate`; the cloud link retries a failed remote step itself.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import tasks as T
from edge.config import EdgeConfig
from edge.link import CloudLink
from edge.remote import RemoteCloud
from model.load import DTYPES, fingerprint, load_model
from model.lora import LoRAConfig, LoRASet
from model.segments import EdgeBottom, EdgeTop, cut_of, drop_blocks
from model.training import Checkpoint, FitOptions, FitResult, endless_batches, evaluate as evaluate_hidden, fit
from privacy.defences.noise import add_gaussian_noise, clip_rows, rms
from protocol.tensors import wire_dtype


@dataclass
class StepRecord:
    step: int
    loss: float
    bytes_up: int
    bytes_down: int
    payload_up: int
    payload_down: int
    messages_up: int
    messages_down: int
    edge_seconds: float
    cloud_seconds: float
    step_seconds: float
    active_blocks: list[int] = field(default_factory=list)


class EdgeModel(nn.Module):
    """The edge's whole model: bottom, the cloud stand-in, top. `lora` holds every trainable weight."""

    def __init__(self, model, cfg: EdgeConfig, link: CloudLink | None):
        super().__init__()
        cut = cut_of(model, cfg.k, cfg.m)
        self.cut, self.task = cut, T.TASKS[cfg.data.task]
        local = [*cut.bottom, *cut.top]
        remote_blocks = list(cut.cloud) if cfg.lora.cloud == "edge" else []
        lo = cfg.lora
        self.lora = LoRASet(model, LoRAConfig(lo.r, lo.alpha, lo.dropout, tuple(lo.targets),
                                              sorted(local + remote_blocks)))
        self.lora.to(device=cfg.device, dtype=DTYPES[cfg.dtype])
        self.fingerprint = fingerprint(model)
        for p in model.parameters():
            p.requires_grad_(False)
        self.lora.attach(model, local)
        drop_blocks(model, cut.cloud)  # the edge never holds the cloud's weights
        self.bottom, self.top = EdgeBottom(model, cut), EdgeTop(model, cut)
        self.cloud = RemoteCloud(link, wire_dtype(cfg.wire_up), wire_dtype(cfg.wire_down),
                                 self.lora if remote_blocks else None, remote_blocks, lo.targets)
        self.noise_sigma, self.noise_clip = cfg.noise.sigma, cfg.noise.clip

    def hidden(self, batch: T.Batch) -> torch.Tensor:
        h = self.bottom(batch.input_ids, batch.attention_mask)
        if self.noise_clip is not None:  # what leaves the device is clipped, then noised (privacy/defences/noise.py)
            h = clip_rows(h, self.noise_clip)
        if self.noise_sigma > 0:  # sigma relative to the RMS of what is sent, over real tokens
            h = add_gaussian_noise(h, self.noise_sigma * rms(h.detach(), batch.attention_mask))
        h = self.cloud(h, batch.attention_mask)
        return self.top(h, batch.attention_mask)

    def loss(self, batch: T.Batch):
        return T.loss_from_hidden(self.task, self.hidden(batch), batch, self.top.lm_head)


@dataclass
class TrainResult:
    metrics: dict  # what out_dir/metrics.json holds: config (no token), evaluations, step records, summary
    model: EdgeModel  # the trained model

    def adapter(self) -> dict[str, torch.Tensor]:
        """The trained LoRA in PEFT format (the state dict of out_dir/adapter)."""
        return self.model.lora.peft_state_dict()


def build_edge(cfg: EdgeConfig, *, loaded=None, link: CloudLink | None = None):
    """Load the model, cut it, connect and open a session. Returns (edge_model, tokenizer, link)."""
    if cfg.lora.cloud not in ("none", "edge"):
        raise ValueError("cloud_lora must be 'none' or 'edge'")
    torch.manual_seed(cfg.optim.seed)
    loaded = loaded or load_model(cfg.model, dtype=DTYPES[cfg.dtype], device=cfg.device)
    link = link or CloudLink(cfg.link)
    em = EdgeModel(loaded.model, cfg, link)
    open_session(em, cfg)
    return em, loaded.tokenizer or T.tiny_tokenizer(), link


def open_session(em: EdgeModel, cfg: EdgeConfig):
    return em.cloud.link.open(fingerprint=em.fingerprint, k=cfg.k, m=cfg.m, wire_up=wire_dtype(cfg.wire_up),
                              wire_down=wire_dtype(cfg.wire_down),
                              lora_targets=cfg.lora.targets if em.cloud.lora_blocks else (),
                              lora_blocks=em.cloud.lora_blocks)


def load_items(cfg: EdgeConfig, tokenizer, split: str) -> list[dict]:
    d = cfg.data
    path = d.train_file if split == "train" else d.dev_file
    items = T.encode(T.TASKS[d.task], T.load_split(d.task, split, path), tokenizer)
    if split == "train":
        return items[d.shard::d.num_shards]
    return items[:cfg.eval.examples]


def evaluate(em: EdgeModel, items: list[dict], pad_id: int, batch_size: int = 32, label_ids=None,
             desc: str | None = None, position: int = 0) -> dict:
    """Classification: accuracy from the label words' logits. LM: perplexity. Runs through the cloud like training
    (with the link's retries), with every LoRA module: Kill & Revive's killed set is put aside meanwhile."""
    killed, em.cloud.killed = em.cloud.killed, set()
    try:
        return evaluate_hidden(em.hidden, em.top.lm_head, em.task, items, pad_id, label_ids, batch_size, desc,
                               position)
    finally:
        em.cloud.killed = killed


def train(cfg: EdgeConfig, *, loaded=None, link: CloudLink | None = None, on_step=None,
          step_hook=None, initial_adapter: dict | None = None) -> TrainResult:
    """Train, evaluate, save. The metrics are also written to out_dir/metrics.json, next to the adapter (PEFT
    format) and the checkpoint a crashed run resumes from.

    `on_step(record)` sees every StepRecord (live printing); `step_hook(em, step)` runs before each step;
    `initial_adapter` (PEFT-format state dict) starts from given LoRA weights (a federated round's global adapter).
    """
    em, tok, link = build_edge(cfg, loaded=loaded, link=link)
    try:
        metrics = _train_and_evaluate(em, tok, cfg, on_step, step_hook, initial_adapter)
    except BaseException:
        link.close()
        raise
    stats = link.close()
    if stats is not None:
        metrics["cloud_session"] = {"steps": stats.steps, "bytes_received": stats.bytes_received,
                                    "bytes_sent": stats.bytes_sent}
    if cfg.out_dir:
        out = Path(cfg.out_dir)
        em.lora.save_peft(out / "adapter", cfg.model)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return TrainResult(metrics, em)


def _train_and_evaluate(em: EdgeModel, tok, cfg: EdgeConfig, on_step, step_hook, initial_adapter) -> dict:
    task, pad_id = em.task, tok.pad_token_id if tok.pad_token_id is not None else 0
    label_ids = T.label_token_ids(task, tok) if task.kind == "classify" else None
    if initial_adapter is not None:
        em.lora.load_peft_state_dict(initial_adapter)
    if cfg.lora.freeze_a:
        for name, p in em.lora.named_parameters():
            p.requires_grad_("lora_A" not in name)
    train_items = load_items(cfg, tok, "train")
    dev_items = load_items(cfg, tok, "dev") if (cfg.eval.before or cfg.eval.after) else []
    checkpoint = Checkpoint(cfg.out_dir) if cfg.out_dir else None
    metrics = {"config": cfg.public(), "cut": {"k": cfg.k, "m": cfg.m, "cloud_blocks": list(em.cut.cloud)},
               "trainable_parameters": sum(p.numel() for p in em.lora.parameters())}

    def score(when: str) -> dict:
        return evaluate(em, dev_items, pad_id, cfg.eval.batch_size, label_ids,
                        f"{cfg.name} dev ({when})" if cfg.progress else None, cfg.progress_row)

    if cfg.eval.before and not (checkpoint and checkpoint.exists()):  # a resumed run measured it before the crash
        metrics["eval_before"] = score("before")
    records = _fit(em, cfg, train_items, pad_id, checkpoint, on_step, step_hook).records
    em.eval()
    if cfg.eval.after:
        metrics["eval_after"] = score("after")
    metrics["steps"] = records
    metrics["summary"] = summarize(records)
    if em.cloud.lora_blocks:
        metrics["summary"]["active_fraction"] = (sum(len(r["active_blocks"]) for r in records)
                                                 / max(1, len(records) * len(em.cloud.lora_blocks)))
    return metrics


def _fit(em: EdgeModel, cfg: EdgeConfig, items: list[dict], pad_id: int, checkpoint: Checkpoint | None,
         on_step, step_hook) -> FitResult:
    """The steps, through model.training.fit; resumes from `checkpoint` at the same batch when it exists."""
    kr = None
    if cfg.kr.enabled and em.cloud.lora_blocks:
        from edge.killrevive import KillRevive
        kr = KillRevive(em.cloud.lora_blocks, cfg.kr)
    result = FitResult()

    def before_step(step: int) -> None:
        if kr:
            kr.before_step(em, step, result.losses[-1] if result.losses else None)
        if step_hook:
            step_hook(em, step)
        em.cloud.step = step

    def after_step(step: int, loss: float, seconds: float) -> dict:
        tr = em.cloud.last_traffic
        rec = StepRecord(step, loss, tr.bytes_up, tr.bytes_down, tr.payload_up, tr.payload_down, tr.messages_up,
                         tr.messages_down, seconds - tr.wait_seconds, tr.cloud_seconds, seconds,
                         em.cloud.active_blocks())
        if on_step:
            on_step(rec)
        return asdict(rec)

    o = cfg.optim
    batches = (b.to(cfg.device) for b in endless_batches(em.task, items, o.batch_size, pad_id, o.seed))
    opts = FitOptions(steps=o.steps, lr=o.lr, checkpoint_every=o.checkpoint_every,
                      progress=f"{cfg.name} train" if cfg.progress else None, progress_row=cfg.progress_row,
                      postfix=_traffic_postfix)
    em.train()
    return fit(lambda batch: em.loss(batch)[0], [p for p in em.lora.parameters() if p.requires_grad], batches, opts,
               state=em.lora.state_dict, load_state=em.lora.load_state_dict, checkpoint=checkpoint,
               before_step=before_step, after_step=after_step, result=result)


def _traffic_postfix(rec: dict) -> dict:
    return {"up_kB": f"{rec['bytes_up'] / 1e3:.0f}", "down_kB": f"{rec['bytes_down'] / 1e3:.0f}"}


def summarize(records: list[dict]) -> dict:
    if not records:
        return {}
    n = len(records)
    mean = lambda k: sum(r[k] for r in records) / n  # noqa: E731
    up, down = mean("bytes_up"), mean("bytes_down")
    pay = mean("payload_up") + mean("payload_down")
    return {"steps": n, "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "mean_loss_last10": sum(r["loss"] for r in records[-10:]) / min(10, n),
            "bytes_up_per_step": up, "bytes_down_per_step": down,
            "wire_over_payload": (up + down) / pay if pay else None,
            "edge_seconds_per_step": mean("edge_seconds"), "cloud_seconds_per_step": mean("cloud_seconds"),
            "step_seconds": mean("step_seconds")}


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


__all__ = ["EdgeConfig", "EdgeModel", "StepRecord", "TrainResult", "build_edge", "open_session", "load_items",
           "evaluate", "train", "summarize"]
